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

pub fn from_timestamp(field: &'static str, t: &Timestamp) -> Result<DateTime<Utc>, FieldError> {
    u32::try_from(t.nanos)
        .ok()
        .and_then(|n| DateTime::from_timestamp(t.seconds, n))
        .ok_or_else(|| FieldError::new(field, "is not a valid timestamp"))
}

pub fn inbound_from_pb(a: Option<&pb::InboundAuth>) -> Result<InboundAuth, FieldError> {
    let Some(a) = a else {
        return Ok(InboundAuth::default());
    };
    let location = match pb::KeyLocation::try_from(a.location) {
        Ok(pb::KeyLocation::Unspecified | pb::KeyLocation::Header) => KeyLocation::Header,
        Ok(pb::KeyLocation::Query) => KeyLocation::Query,
        Err(_) => {
            return Err(FieldError::new("inbound_auth.location", format!("unknown location {}", a.location)));
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
            return Err(FieldError::new("limits.reset_period", format!("unknown period {}", l.reset_period)));
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
    }
}
