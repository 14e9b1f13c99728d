//! Protobuf <-> domain conversions for the admin API.

use chrono::{DateTime, Utc};
use prost_types::Timestamp;

use crate::domain::FieldError;
use crate::domain::gateway::{Gateway, InboundAuth, KeyLocation, UpstreamAuth};
use crate::domain::key::{ApiKey, KeyStatus, Limits, ResetPeriod};
use crate::domain::money;
use crate::pb;

pub fn timestamp(t: DateTime<Utc>) -> Timestamp {
    Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 }
}

/// `0001-01-01T00:00:00Z` and `9999-12-31T23:59:59Z`: the range of `google.protobuf.Timestamp`
/// (its JSON form has four-digit years; a later time breaks every protobuf-JSON client).
const MIN_TIMESTAMP_SECONDS: i64 = -62_135_596_800;
const MAX_TIMESTAMP_SECONDS: i64 = 253_402_300_799;
/// About 10,000 years: the range of `google.protobuf.Duration`.
const MAX_DURATION_SECONDS: i64 = 315_576_000_000;
const MAX_NANOS: i32 = 999_999_999;

pub fn from_timestamp(field: &'static str, t: &Timestamp) -> Result<DateTime<Utc>, FieldError> {
    if !(MIN_TIMESTAMP_SECONDS..=MAX_TIMESTAMP_SECONDS).contains(&t.seconds) {
        return Err(FieldError::new(field, "must lie between 0001-01-01T00:00:00Z and 9999-12-31T23:59:59Z"));
    }
    // Kept to the microsecond, as storage keeps it, so that a response and a later read agree.
    u32::try_from(t.nanos)
        .ok()
        .filter(|n| *n <= MAX_NANOS as u32)
        .and_then(|n| DateTime::from_timestamp(t.seconds, n / 1000 * 1000))
        .ok_or_else(|| FieldError::new(field, "must have nanos between 0 and 999,999,999"))
}

/// A valid `google.protobuf.Duration`: nanos within ±999,999,999 with the sign of the seconds.
pub fn from_duration(field: &'static str, d: &prost_types::Duration) -> Result<chrono::Duration, FieldError> {
    if !(-MAX_DURATION_SECONDS..=MAX_DURATION_SECONDS).contains(&d.seconds) {
        return Err(FieldError::new(field, "must lie within ±10,000 years"));
    }
    if !(-MAX_NANOS..=MAX_NANOS).contains(&d.nanos) || (d.seconds > 0 && d.nanos < 0) || (d.seconds < 0 && d.nanos > 0)
    {
        return Err(FieldError::new(field, "must have nanos within ±999,999,999 and of the same sign as seconds"));
    }
    Ok(chrono::Duration::seconds(d.seconds) + chrono::Duration::nanoseconds(i64::from(d.nanos)))
}

pub fn inbound_from_pb(a: Option<&pb::InboundAuth>) -> Result<InboundAuth, FieldError> {
    let Some(a) = a else {
        return Ok(InboundAuth::default());
    };
    let location = match pb::KeyLocation::try_from(a.location) {
        Ok(pb::KeyLocation::Unspecified | pb::KeyLocation::Header) => KeyLocation::Header,
        Ok(pb::KeyLocation::Query) => KeyLocation::Query,
        Err(_) => {
            return Err(FieldError::new("inbound_auth.location", "must be KEY_LOCATION_HEADER or KEY_LOCATION_QUERY"));
        }
    };
    InboundAuth::new(&a.key_name, location)
}

/// `None` or an empty header name means no provider credential.
pub fn upstream_from_pb(a: Option<&pb::UpstreamAuth>) -> Result<Option<UpstreamAuth>, FieldError> {
    match a {
        None => Ok(None),
        Some(a) if a.header_name.trim().is_empty() => {
            if a.value.is_empty() {
                Ok(None)
            } else {
                Err(FieldError::new("upstream_auth.header_name", "is required when value is set"))
            }
        }
        Some(a) => UpstreamAuth::new(&a.header_name, &a.value).map(Some),
    }
}

pub fn gateway_to_pb(g: &Gateway) -> pb::Gateway {
    pb::Gateway {
        id: g.id.to_string(),
        name: g.name.clone(),
        inbound_auth: Some(pb::InboundAuth {
            key_name: g.inbound.key_name.clone(),
            location: match g.inbound.location {
                KeyLocation::Header => pb::KeyLocation::Header,
                KeyLocation::Query => pb::KeyLocation::Query,
            } as i32,
        }),
        // The credential itself is write-only.
        upstream_auth: g.upstream.as_ref().map(|u| pb::UpstreamAuth {
            header_name: u.header_name.clone(),
            value: String::new(),
            value_set: true,
        }),
        default_reservation_tokens: g.default_reservation_tokens,
        created_at: Some(timestamp(g.created_at)),
    }
}

pub fn limits_from_pb(l: Option<&pb::Limits>) -> Result<Limits, FieldError> {
    let Some(l) = l else {
        return Ok(Limits::default());
    };
    let reset_period = match pb::ResetPeriod::try_from(l.reset_period) {
        Ok(pb::ResetPeriod::Never) => ResetPeriod::Never,
        Ok(pb::ResetPeriod::Daily) => ResetPeriod::Daily,
        Ok(pb::ResetPeriod::Weekly) => ResetPeriod::Weekly,
        Ok(pb::ResetPeriod::Monthly) => ResetPeriod::Monthly,
        Err(_) => {
            return Err(FieldError::new(
                "limits.reset_period",
                "must be RESET_PERIOD_NEVER, RESET_PERIOD_DAILY, RESET_PERIOD_WEEKLY or RESET_PERIOD_MONTHLY",
            ));
        }
    };
    let limits = Limits {
        cost_limit_micros: l
            .cost_limit_usd
            .as_deref()
            .map(|s| money::parse_usd("limits.cost_limit_usd", s))
            .transpose()?,
        token_limit: l.token_limit,
        requests_per_minute: l.requests_per_minute,
        reset_period,
    };
    limits.validate()?;
    Ok(limits)
}

pub fn limits_to_pb(l: &Limits) -> pb::Limits {
    pb::Limits {
        cost_limit_usd: l.cost_limit_micros.map(money::format_usd),
        token_limit: l.token_limit,
        requests_per_minute: l.requests_per_minute,
        reset_period: match l.reset_period {
            ResetPeriod::Never => pb::ResetPeriod::Never,
            ResetPeriod::Daily => pb::ResetPeriod::Daily,
            ResetPeriod::Weekly => pb::ResetPeriod::Weekly,
            ResetPeriod::Monthly => pb::ResetPeriod::Monthly,
        } as i32,
    }
}

pub fn key_to_pb(k: &ApiKey, gateway: &str, now: DateTime<Utc>) -> pb::ApiKey {
    pb::ApiKey {
        id: k.id.to_string(),
        gateway: gateway.to_string(),
        name: k.name.clone(),
        prefix: k.prefix.clone(),
        status: match k.status(now) {
            KeyStatus::Active => pb::KeyStatus::Active,
            KeyStatus::Disabled => pb::KeyStatus::Disabled,
            KeyStatus::Expired => pb::KeyStatus::Expired,
        } as i32,
        enabled: k.enabled,
        legacy: k.legacy,
        limits: Some(limits_to_pb(&k.limits)),
        created_at: Some(timestamp(k.created_at)),
        expires_at: k.expires_at.map(timestamp),
        last_used_at: k.last_used_at.map(timestamp),
        usage: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_outside_years_1_to_9999_are_refused() {
        let ok = |seconds, nanos| from_timestamp("expires_at", &Timestamp { seconds, nanos });
        assert!(ok(MIN_TIMESTAMP_SECONDS, 0).is_ok());
        assert_eq!(ok(MAX_TIMESTAMP_SECONDS, 999_999_999).unwrap().to_rfc3339(), "9999-12-31T23:59:59.999999+00:00");
        for (seconds, nanos) in
            [(MAX_TIMESTAMP_SECONDS + 1, 0), (MIN_TIMESTAMP_SECONDS - 1, 0), (i64::MAX, 0), (0, -1), (0, 1_000_000_000)]
        {
            assert_eq!(ok(seconds, nanos).unwrap_err().field, "expires_at", "{seconds} {nanos}");
        }
    }

    #[test]
    fn durations_follow_the_protobuf_rules() {
        let d = |seconds, nanos| from_duration("grace_period", &prost_types::Duration { seconds, nanos });
        assert_eq!(d(1, 500_000_000), Ok(chrono::Duration::milliseconds(1500)));
        assert_eq!(d(-1, -500_000_000), Ok(chrono::Duration::milliseconds(-1500)));
        assert_eq!(d(0, -5), Ok(chrono::Duration::nanoseconds(-5)));
        for (seconds, nanos) in [(0, 1_000_000_000), (0, -1_000_000_000), (1, -1), (-1, 1), (i64::MAX, 0)] {
            assert_eq!(d(seconds, nanos).unwrap_err().field, "grace_period", "{seconds} {nanos}");
        }
    }
}
