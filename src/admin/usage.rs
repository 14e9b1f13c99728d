//! `UsageService`: usage over time, per hour or day, of a key or a gateway.

use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use tonic::{Request, Response, Status};

use super::convert::{from_timestamp, timestamp};
use super::{Admin, AdminResult, Call, Kind};
use crate::domain::FieldError;
use crate::domain::access::Action;
use crate::domain::money;
use crate::pb;
use crate::pb::usage_service_server::UsageService;
use crate::store::{Granularity, HistoryQuery, HistoryRow, HistoryScope};

pub use crate::pb::usage_service_server::UsageServiceServer;

#[derive(Clone)]
pub struct UsageApi(pub Arc<Admin>);

/// The range asked for when the request names none.
const DEFAULT_RANGE_DAYS: i64 = 7;
/// The longest range per granularity: a month of hours, a year of days.
const MAX_HOURS_DAYS: i64 = 31;
const MAX_DAYS_DAYS: i64 = 366;

/// The range and bucket width of a request: `from` rounded down and `to` rounded up to
/// bucket starts (UTC), `to` defaulting to now and `from` to a week before `to`.
fn history_range(
    req: &pb::GetUsageHistoryRequest,
    now: DateTime<Utc>,
) -> Result<(Granularity, DateTime<Utc>, DateTime<Utc>), FieldError> {
    let (granularity, width, max_days) = match pb::Granularity::try_from(req.granularity) {
        Ok(pb::Granularity::Hour) => (Granularity::Hour, Duration::hours(1), MAX_HOURS_DAYS),
        Ok(pb::Granularity::Day | pb::Granularity::Unspecified) => (Granularity::Day, Duration::days(1), MAX_DAYS_DAYS),
        Err(_) => return Err(FieldError::new("granularity", "must be a Granularity")),
    };
    let to = req.to.as_ref().map(|t| from_timestamp("to", t)).transpose()?.unwrap_or(now);
    let from = req.from.as_ref().map(|t| from_timestamp("from", t)).transpose()?;
    let from = from.unwrap_or(to - Duration::days(DEFAULT_RANGE_DAYS));
    let w = width.num_microseconds().unwrap_or(1).max(1);
    let round = |t: DateTime<Utc>, up: bool| {
        let m = t.timestamp_micros();
        let down = m.div_euclid(w) * w;
        let m = if up && down != m { down.saturating_add(w) } else { down };
        DateTime::from_timestamp_micros(m).unwrap_or(t)
    };
    let (from, to) = (round(from, false), round(to, true));
    if to <= from {
        return Err(FieldError::new("to", "must be after from"));
    }
    if to - from > Duration::days(max_days) {
        return Err(match granularity {
            Granularity::Hour => FieldError::new("from", "hourly history spans at most 31 days"),
            Granularity::Day => FieldError::new("from", "daily history spans at most 366 days"),
        });
    }
    Ok((granularity, from, to))
}

fn bucket_to_pb(r: &HistoryRow) -> pb::UsageBucket {
    pb::UsageBucket {
        start: Some(timestamp(r.start)),
        model: r.model.clone().unwrap_or_default(),
        requests: r.requests,
        prompt_tokens: r.prompt_tokens,
        completion_tokens: r.completion_tokens,
        total_tokens: r.prompt_tokens.saturating_add(r.completion_tokens),
        cost_usd: money::format_usd(r.cost_micros),
    }
}

impl Admin {
    /// Whose history a request asks for: exactly one of a key (authorized on its gateway)
    /// and a gateway.
    async fn history_scope(&self, call: &mut Call, req: &pb::GetUsageHistoryRequest) -> AdminResult<HistoryScope> {
        match (req.key_id.is_empty(), req.gateway.is_empty()) {
            (false, true) => {
                let (key, _) = self.key_for(call, Action::ReadKeys, &req.key_id).await?;
                Ok(HistoryScope::Key(key.id))
            }
            (true, false) => {
                call.check(Action::ReadKeys, Some(&req.gateway))?;
                let gateway = self.gateway_by_name("gateway", &req.gateway).await?;
                call.target(gateway.name.clone());
                Ok(HistoryScope::Gateway(gateway.id))
            }
            (true, true) => Err(FieldError::new("key_id", "or gateway is required").into()),
            (false, false) => Err(FieldError::new("gateway", "cannot be combined with key_id").into()),
        }
    }
}

#[tonic::async_trait]
impl UsageService for UsageApi {
    async fn get_usage_history(
        &self,
        request: Request<pb::GetUsageHistoryRequest>,
    ) -> Result<Response<pb::UsageHistory>, Status> {
        self.0
            .serve(request, "UsageService/GetUsageHistory", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    let scope = admin.history_scope(&mut c, &req).await?;
                    let (granularity, from, to) = history_range(&req, admin.shared.clock.now())?;
                    let q = HistoryQuery { scope, from, to, granularity, by_model: req.by_model };
                    let rows = admin.store.usage_history(&q).await?;
                    AdminResult::Ok(pb::UsageHistory {
                        from: Some(timestamp(from)),
                        to: Some(timestamp(to)),
                        granularity: match granularity {
                            Granularity::Hour => pb::Granularity::Hour,
                            Granularity::Day => pb::Granularity::Day,
                        } as i32,
                        buckets: rows.iter().map(bucket_to_pb).collect(),
                    })
                }
                .await;
                (c, result)
            })
            .await
    }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;

    fn ts(t: DateTime<Utc>) -> Option<prost_types::Timestamp> {
        Some(timestamp(t))
    }

    #[test]
    fn ranges_default_to_a_week_and_round_to_whole_buckets() {
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 30, 0).unwrap();
        let day = |d| Utc.with_ymd_and_hms(2026, 11, d, 0, 0, 0).unwrap();
        let req = pb::GetUsageHistoryRequest::default();
        assert_eq!(history_range(&req, now).unwrap(), (Granularity::Day, day(16), day(24)));
        let hourly = pb::GetUsageHistoryRequest { granularity: pb::Granularity::Hour as i32, ..Default::default() };
        let (_, from, to) = history_range(&hourly, now).unwrap();
        assert_eq!((from, to), (now - Duration::days(7) - Duration::minutes(30), now + Duration::minutes(30)));

        let long = pb::GetUsageHistoryRequest { from: ts(now - Duration::days(32)), ..hourly.clone() };
        assert_eq!(history_range(&long, now).unwrap_err().field, "from");
        let month = pb::GetUsageHistoryRequest { from: ts(now - Duration::days(30)), ..Default::default() };
        assert!(history_range(&month, now).is_ok());
        let backwards =
            pb::GetUsageHistoryRequest { from: ts(now), to: ts(now - Duration::days(1)), ..Default::default() };
        assert_eq!(history_range(&backwards, now).unwrap_err().field, "to");
        let odd = pb::GetUsageHistoryRequest { granularity: 9, ..Default::default() };
        assert_eq!(history_range(&odd, now).unwrap_err().field, "granularity");
    }
}
