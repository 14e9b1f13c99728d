//! API keys: identity, status rules and limits.

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::FieldError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ResetPeriod {
    #[default]
    Never,
    Daily,
    Weekly,
    Monthly,
}

impl ResetPeriod {
    pub fn as_str(self) -> &'static str {
        match self {
            ResetPeriod::Never => "never",
            ResetPeriod::Daily => "daily",
            ResetPeriod::Weekly => "weekly",
            ResetPeriod::Monthly => "monthly",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "never" => Some(ResetPeriod::Never),
            "daily" => Some(ResetPeriod::Daily),
            "weekly" => Some(ResetPeriod::Weekly),
            "monthly" => Some(ResetPeriod::Monthly),
            _ => None,
        }
    }
}

/// Per-key limits. `None` means unlimited.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Limits {
    pub cost_limit_micros: Option<i64>,
    pub token_limit: Option<u64>,
    pub requests_per_minute: Option<u32>,
    pub reset_period: ResetPeriod,
}

impl Limits {
    pub fn is_empty(&self) -> bool {
        self.cost_limit_micros.is_none() && self.token_limit.is_none() && self.requests_per_minute.is_none()
    }

    pub fn validate(&self) -> Result<(), FieldError> {
        if self.requests_per_minute == Some(0) {
            return Err(FieldError::new(
                "limits.requests_per_minute",
                "must be at least 1 (leave it unset for no limit)",
            ));
        }
        if self.token_limit.is_some_and(|t| t > i64::MAX as u64) {
            return Err(FieldError::new("limits.token_limit", "is too large"));
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    Disabled,
    Expired,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKey {
    pub id: Uuid,
    pub gateway_id: Uuid,
    pub name: String,
    /// The first 12 characters of the secret, shown in lists.
    pub prefix: String,
    pub enabled: bool,
    pub legacy: bool,
    pub limits: Limits,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub last_used_at: Option<DateTime<Utc>>,
}

impl ApiKey {
    /// Disabled wins over expired: re-enabling an expired key leaves it expired.
    pub fn status(&self, now: DateTime<Utc>) -> KeyStatus {
        if !self.enabled {
            KeyStatus::Disabled
        } else if self.expires_at.is_some_and(|e| e <= now) {
            KeyStatus::Expired
        } else {
            KeyStatus::Active
        }
    }
}

/// Key names: required, at most 128 characters, no control characters.
pub fn validate_key_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    if name.trim().is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if name.chars().count() > 128 {
        return Err(FieldError::new(field, "must be at most 128 characters"));
    }
    if name.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// An expiry must lie in the future.
pub fn validate_expiry(field: &'static str, at: DateTime<Utc>, now: DateTime<Utc>) -> Result<(), FieldError> {
    if at <= now {
        return Err(FieldError::new(field, "must be in the future"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone};

    use super::*;
    use crate::domain::clock::{Clock, ManualClock};

    fn key(enabled: bool, expires_at: Option<DateTime<Utc>>) -> ApiKey {
        ApiKey {
            id: Uuid::now_v7(),
            gateway_id: Uuid::now_v7(),
            name: "token-user01".into(),
            prefix: "pcs_abcdefgh".into(),
            enabled,
            legacy: false,
            limits: Limits::default(),
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
            expires_at,
            last_used_at: None,
        }
    }

    #[test]
    fn status_follows_the_clock() {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 3, 1, 12, 0, 0).unwrap());
        let k = key(true, Some(clock.now() + Duration::seconds(10)));
        assert_eq!(k.status(clock.now()), KeyStatus::Active);
        clock.advance(Duration::seconds(9));
        assert_eq!(k.status(clock.now()), KeyStatus::Active);
        clock.advance(Duration::seconds(1));
        assert_eq!(k.status(clock.now()), KeyStatus::Expired, "expires exactly at expires_at");
        assert_eq!(key(false, None).status(clock.now()), KeyStatus::Disabled);
        assert_eq!(key(false, Some(clock.now())).status(clock.now()), KeyStatus::Disabled);
        assert_eq!(key(true, None).status(clock.now()), KeyStatus::Active);
    }

    #[test]
    fn names_and_expiry() {
        assert!(validate_key_name("name", "token-user01").is_ok());
        assert_eq!(validate_key_name("name", " ").unwrap_err().field, "name");
        assert_eq!(validate_key_name("name", "a\nb").unwrap_err().field, "name");
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        assert!(validate_expiry("expires_at", now + Duration::seconds(1), now).is_ok());
        assert_eq!(validate_expiry("expires_at", now, now).unwrap_err().field, "expires_at");
    }

    #[test]
    fn limits_validation() {
        assert!(Limits::default().is_empty());
        let l = Limits { requests_per_minute: Some(0), ..Default::default() };
        assert_eq!(l.validate().unwrap_err().field, "limits.requests_per_minute");
        assert!(Limits { requests_per_minute: Some(1), ..Default::default() }.validate().is_ok());
    }
}
