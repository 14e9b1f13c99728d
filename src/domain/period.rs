//! Budget periods on UTC calendar boundaries: 00:00, Monday 00:00, the 1st at 00:00.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};

use super::key::ResetPeriod;

/// The period `now` falls in: its start, and its end (the next reset; none for NEVER).
pub fn bounds(period: ResetPeriod, now: DateTime<Utc>) -> (DateTime<Utc>, Option<DateTime<Utc>>) {
    let day = now.date_naive();
    let midnight = |d: NaiveDate| Utc.from_utc_datetime(&d.and_hms_opt(0, 0, 0).unwrap_or_default());
    match period {
        ResetPeriod::Never => (DateTime::UNIX_EPOCH, None),
        ResetPeriod::Daily => (midnight(day), Some(midnight(day) + Duration::days(1))),
        ResetPeriod::Weekly => {
            let monday = day - Duration::days(i64::from(day.weekday().num_days_from_monday()));
            (midnight(monday), Some(midnight(monday) + Duration::days(7)))
        }
        ResetPeriod::Monthly => {
            let first = day.with_day(1).unwrap_or(day);
            let next = if first.month() == 12 {
                NaiveDate::from_ymd_opt(first.year() + 1, 1, 1)
            } else {
                NaiveDate::from_ymd_opt(first.year(), first.month() + 1, 1)
            }
            .unwrap_or(first);
            (midnight(first), Some(midnight(next)))
        }
    }
}

/// Whole seconds from `now` until `at`, rounded up, at least 1.
pub fn secs_until(now: DateTime<Utc>, at: DateTime<Utc>) -> u64 {
    let micros = (at - now).num_microseconds().unwrap_or(i64::MAX).max(1) as u64;
    micros.div_ceil(1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(y: i32, m: u32, d: u32, h: u32, min: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, m, d, h, min, s).unwrap()
    }

    #[test]
    fn daily_resets_at_utc_midnight() {
        assert_eq!(
            bounds(ResetPeriod::Daily, at(2026, 11, 23, 13, 5, 0)),
            (at(2026, 11, 23, 0, 0, 0), Some(at(2026, 11, 24, 0, 0, 0)))
        );
        assert_eq!(
            bounds(ResetPeriod::Daily, at(2026, 11, 23, 0, 0, 0)).0,
            at(2026, 11, 23, 0, 0, 0),
            "midnight starts a day"
        );
        assert_eq!(bounds(ResetPeriod::Daily, at(2026, 12, 31, 23, 59, 59)).1, Some(at(2027, 1, 1, 0, 0, 0)));
        assert_eq!(bounds(ResetPeriod::Daily, at(2028, 2, 28, 12, 0, 0)).1, Some(at(2028, 2, 29, 0, 0, 0)), "leap day");
    }

    #[test]
    fn weekly_resets_on_monday() {
        // 2026-11-23 is a Monday.
        let monday = at(2026, 11, 23, 0, 0, 0);
        for day in 23..=29 {
            let (start, end) = bounds(ResetPeriod::Weekly, at(2026, 11, day, 18, 30, 0));
            assert_eq!((start, end), (monday, Some(at(2026, 11, 30, 0, 0, 0))), "2026-11-{day}");
        }
        assert_eq!(bounds(ResetPeriod::Weekly, at(2026, 11, 22, 23, 59, 59)).1, Some(monday), "Sunday night");
        // A week across a year end: Monday 2026-12-28 .. Monday 2027-01-04.
        assert_eq!(
            bounds(ResetPeriod::Weekly, at(2027, 1, 2, 0, 0, 0)),
            (at(2026, 12, 28, 0, 0, 0), Some(at(2027, 1, 4, 0, 0, 0)))
        );
    }

    #[test]
    fn monthly_resets_on_the_first() {
        assert_eq!(
            bounds(ResetPeriod::Monthly, at(2026, 1, 31, 23, 0, 0)),
            (at(2026, 1, 1, 0, 0, 0), Some(at(2026, 2, 1, 0, 0, 0)))
        );
        assert_eq!(bounds(ResetPeriod::Monthly, at(2026, 2, 28, 23, 59, 59)).1, Some(at(2026, 3, 1, 0, 0, 0)));
        assert_eq!(
            bounds(ResetPeriod::Monthly, at(2028, 2, 29, 12, 0, 0)),
            (at(2028, 2, 1, 0, 0, 0), Some(at(2028, 3, 1, 0, 0, 0))),
            "leap year"
        );
        assert_eq!(bounds(ResetPeriod::Monthly, at(2026, 12, 15, 0, 0, 0)).1, Some(at(2027, 1, 1, 0, 0, 0)));
        assert_eq!(
            bounds(ResetPeriod::Monthly, at(2026, 4, 30, 23, 59, 59)).1,
            Some(at(2026, 5, 1, 0, 0, 0)),
            "30-day month"
        );
        assert_eq!(bounds(ResetPeriod::Monthly, at(2026, 3, 1, 0, 0, 0)).0, at(2026, 3, 1, 0, 0, 0));
    }

    #[test]
    fn never_has_no_end() {
        assert_eq!(bounds(ResetPeriod::Never, at(2026, 5, 5, 5, 5, 5)), (DateTime::UNIX_EPOCH, None));
    }

    #[test]
    fn seconds_until_rounds_up() {
        let now = at(2026, 1, 1, 0, 0, 0);
        assert_eq!(secs_until(now, now + Duration::milliseconds(1500)), 2);
        assert_eq!(secs_until(now, now + Duration::seconds(3600)), 3600);
        assert_eq!(secs_until(now, now), 1);
    }
}
