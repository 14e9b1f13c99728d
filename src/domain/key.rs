//! API keys: identity, status rules and limits.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::FieldError;
use super::secret::{DISPLAY_PREFIX_LEN, SecretKind, Shape, shape};

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

/// What a new key is: one of ours (with limits and expiry), or an imported legacy secret
/// (neither).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NewKey {
    Managed { limits: Limits, expires_at: Option<DateTime<Utc>> },
    Legacy,
}

/// Why a key cannot be rotated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RotationRefused {
    /// The grace period is out of range.
    Invalid(FieldError),
    /// Legacy keys keep the secret clients already hold.
    Legacy,
}

/// The longest grace period during which a rotated-out secret still works.
pub const MAX_ROTATION_GRACE_DAYS: i64 = 90;

pub const LEGACY_TAKES_NO_LIMITS: &str = "legacy keys take no limits; create a new key to get limits";

impl ApiKey {
    /// A new, enabled key of gateway `gateway_id` named `name` (trimmed) whose secret
    /// starts with `prefix_of_secret`: ours show their first 12 characters, a legacy
    /// secret (which may be short) only 6.
    pub fn new(gateway_id: Uuid, name: &str, secret_prefix: &str, kind: NewKey, now: DateTime<Utc>) -> ApiKey {
        let (legacy, limits, expires_at) = match kind {
            NewKey::Managed { limits, expires_at } => (false, limits, expires_at),
            NewKey::Legacy => (true, Limits::default(), None),
        };
        let shown = if legacy { 6 } else { DISPLAY_PREFIX_LEN };
        ApiKey {
            id: Uuid::now_v7(),
            gateway_id,
            name: name.trim().to_string(),
            prefix: secret_prefix.chars().take(shown).collect(),
            enabled: true,
            legacy,
            limits,
            created_at: now,
            expires_at,
            last_used_at: None,
        }
    }

    /// Legacy keys authenticate but take no limits.
    pub fn check_limits(&self) -> Result<(), FieldError> {
        if self.legacy && self.limits != Limits::default() {
            return Err(FieldError::new("limits", LEGACY_TAKES_NO_LIMITS));
        }
        Ok(())
    }

    /// Until when the current secret keeps working after a rotation at `now` with this
    /// grace period (`None`: it stops at once). Legacy keys are not rotated.
    pub fn rotation_grace(
        &self,
        grace: Duration,
        now: DateTime<Utc>,
    ) -> Result<Option<DateTime<Utc>>, RotationRefused> {
        if grace < Duration::zero() || grace > Duration::days(MAX_ROTATION_GRACE_DAYS) {
            return Err(RotationRefused::Invalid(FieldError::new("grace_period", "must be between 0 and 90 days")));
        }
        if self.legacy {
            return Err(RotationRefused::Legacy);
        }
        Ok((grace > Duration::zero()).then(|| now + grace))
    }

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

/// A legacy secret clients already hold: 16 to 512 visible ASCII characters.
pub fn validate_legacy_secret(s: &str) -> Result<(), FieldError> {
    // A comma is how Envoy joins a header sent twice: Check refuses such a value, so a
    // key containing one could never authenticate.
    if s.len() < 16 || s.len() > 512 || !s.bytes().all(|b| b.is_ascii_graphic() && b != b',') {
        return Err(FieldError::new("secret", "must be 16 to 512 visible ASCII characters without spaces or commas"));
    }
    if shape(s, SecretKind::ApiKey) == Shape::BadChecksum {
        return Err(FieldError::new("secret", "looks like a Portcullis key but its checksum is wrong"));
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
        let created = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let kind = NewKey::Managed { limits: Limits::default(), expires_at };
        ApiKey { enabled, ..ApiKey::new(Uuid::now_v7(), "token-user01", "pcs_abcdefgh", kind, created) }
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
    fn new_keys_legacy_rules_and_rotation() {
        let now = Utc.with_ymd_and_hms(2026, 3, 1, 0, 0, 0).unwrap();
        let limits = Limits { token_limit: Some(5), ..Default::default() };
        let ours = ApiKey::new(
            Uuid::now_v7(),
            " team ",
            "pcs_abcdefghijklmn",
            NewKey::Managed { limits, expires_at: None },
            now,
        );
        assert_eq!(
            (ours.name.as_str(), ours.prefix.as_str(), ours.legacy, ours.enabled),
            ("team", "pcs_abcdefgh", false, true)
        );
        assert_eq!((ours.limits, ours.created_at), (limits, now));
        let mut legacy = ApiKey::new(Uuid::now_v7(), "old", "sk-legacy-0123456789", NewKey::Legacy, now);
        assert_eq!((legacy.prefix.as_str(), legacy.legacy, legacy.limits), ("sk-leg", true, Limits::default()));
        assert!(legacy.check_limits().is_ok());
        legacy.limits = limits;
        assert_eq!(legacy.check_limits().unwrap_err().message, LEGACY_TAKES_NO_LIMITS);
        assert!(ours.check_limits().is_ok());
        // Rotation: the old secret works for the grace period, at most 90 days.
        assert_eq!(ours.rotation_grace(Duration::zero(), now), Ok(None));
        assert_eq!(ours.rotation_grace(Duration::hours(1), now), Ok(Some(now + Duration::hours(1))));
        assert!(matches!(ours.rotation_grace(Duration::days(91), now), Err(RotationRefused::Invalid(_))));
        assert!(matches!(ours.rotation_grace(Duration::seconds(-1), now), Err(RotationRefused::Invalid(_))));
        assert_eq!(legacy.rotation_grace(Duration::zero(), now), Err(RotationRefused::Legacy));
        // Legacy secrets.
        assert!(validate_legacy_secret("sk-legacy-0123456789").is_ok());
        assert_eq!(validate_legacy_secret("short").unwrap_err().field, "secret");
        assert_eq!(validate_legacy_secret("sk-legacy,0123456789").unwrap_err().field, "secret");
    }

    #[test]
    fn limits_validation() {
        assert!(Limits::default().is_empty());
        let l = Limits { requests_per_minute: Some(0), ..Default::default() };
        assert_eq!(l.validate().unwrap_err().field, "limits.requests_per_minute");
        assert!(Limits { requests_per_minute: Some(1), ..Default::default() }.validate().is_ok());
    }
}
