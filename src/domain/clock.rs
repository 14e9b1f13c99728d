//! The injected clock: production reads the system time, tests move a manual one.
//!
//! Two readings. Wall time (UTC) is for what the calendar governs: key expiry, budget
//! periods, timestamps shown to people. Elapsed time (the monotonic reading) is for
//! what only durations govern: the rolling 60-second window and reservation expiry, so a
//! wall-clock step (NTP, an operator) neither frees window slots early nor revives or
//! expires reservations.

use std::sync::{Mutex, OnceLock};

use chrono::{DateTime, Duration, Utc};

/// A point on the monotonic clock: microseconds since an arbitrary origin (process start
/// in production). Only differences between two readings of the same clock mean anything.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Mono(i64);

impl Mono {
    pub const fn from_micros(micros: i64) -> Self {
        Mono(micros)
    }

    pub const fn micros(self) -> i64 {
        self.0
    }

    /// Microseconds from `earlier` to `self` (negative if `earlier` is later).
    pub const fn micros_since(self, earlier: Mono) -> i64 {
        self.0.saturating_sub(earlier.0)
    }
}

impl std::ops::Add<Duration> for Mono {
    type Output = Mono;

    /// `self` moved by `by`, saturating.
    fn add(self, by: Duration) -> Mono {
        let by = by.num_microseconds().unwrap_or(if by < Duration::zero() { i64::MIN } else { i64::MAX });
        Mono(self.0.saturating_add(by))
    }
}

/// Both readings, taken together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Now {
    pub wall: DateTime<Utc>,
    pub mono: Mono,
}

pub trait Clock: Send + Sync + 'static {
    /// Wall time (UTC): expiry, periods, timestamps.
    fn now(&self) -> DateTime<Utc>;
    /// Elapsed time: windows and reservation ages.
    fn monotonic(&self) -> Mono;
    /// Both readings.
    fn read(&self) -> Now {
        Now { wall: self.now(), mono: self.monotonic() }
    }
}

#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> DateTime<Utc> {
        Utc::now()
    }

    fn monotonic(&self) -> Mono {
        static ORIGIN: OnceLock<std::time::Instant> = OnceLock::new();
        let elapsed = ORIGIN.get_or_init(std::time::Instant::now).elapsed();
        Mono(i64::try_from(elapsed.as_micros()).unwrap_or(i64::MAX))
    }
}

/// A clock that only moves when told to. `advance` moves both readings (time passes);
/// `set` steps the wall clock only (what an NTP step or an operator does to a host).
#[derive(Debug)]
pub struct ManualClock(Mutex<Now>);

impl ManualClock {
    pub fn new(start: DateTime<Utc>) -> Self {
        ManualClock(Mutex::new(Now { wall: start, mono: Mono::default() }))
    }

    pub fn advance(&self, by: Duration) {
        let mut t = self.0.lock().unwrap_or_else(|e| e.into_inner());
        t.wall += by;
        t.mono = t.mono + by;
    }

    /// Steps the wall clock to `to`; elapsed time does not move.
    pub fn set(&self, to: DateTime<Utc>) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wall = to;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).wall
    }

    fn monotonic(&self) -> Mono {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).mono
    }

    fn read(&self) -> Now {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    #[test]
    fn advance_moves_both_readings_and_set_only_the_wall() {
        let start = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let c = ManualClock::new(start);
        let t0 = c.read();
        c.advance(Duration::seconds(5));
        assert_eq!(c.monotonic().micros_since(t0.mono), 5_000_000);
        c.set(start - Duration::hours(1));
        assert_eq!(c.now(), start - Duration::hours(1));
        assert_eq!(c.monotonic().micros_since(t0.mono), 5_000_000, "a wall step is not elapsed time");
    }

    #[test]
    fn the_system_clock_never_goes_back() {
        let c = SystemClock;
        let a = c.monotonic();
        let b = c.monotonic();
        assert!(b >= a);
    }
}
