//! Gateways: what Envoy routes name, where their clients put keys, and the provider credential.

use std::fmt;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::FieldError;

pub const DEFAULT_KEY_NAME: &str = "x-api-key";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum KeyLocation {
    #[default]
    Header,
    Query,
}

impl KeyLocation {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyLocation::Header => "header",
            KeyLocation::Query => "query",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "header" => Some(KeyLocation::Header),
            "query" => Some(KeyLocation::Query),
            _ => None,
        }
    }
}

/// Where a gateway's clients send their key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InboundAuth {
    /// A header name (stored lowercase) or a query parameter name (as given).
    pub key_name: String,
    pub location: KeyLocation,
}

impl Default for InboundAuth {
    fn default() -> Self {
        InboundAuth { key_name: DEFAULT_KEY_NAME.to_string(), location: KeyLocation::Header }
    }
}

impl InboundAuth {
    /// Validates and normalises; an empty name means the default.
    pub fn new(key_name: &str, location: KeyLocation) -> Result<Self, FieldError> {
        let key_name = key_name.trim();
        let key_name = if key_name.is_empty() { DEFAULT_KEY_NAME } else { key_name };
        let key_name = match location {
            KeyLocation::Header => {
                validate_header_name("inbound_auth.key_name", key_name)?;
                key_name.to_ascii_lowercase()
            }
            KeyLocation::Query => {
                if key_name.len() > 128 || !key_name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.~".contains(&b))
                {
                    return Err(FieldError::new(
                        "inbound_auth.key_name",
                        "must be a query parameter name of at most 128 letters, digits, '-', '_', '.' or '~'",
                    ));
                }
                key_name.to_string()
            }
        };
        Ok(InboundAuth { key_name, location })
    }
}

/// The provider credential Envoy sends upstream. The value is write-only.
#[derive(Clone, PartialEq, Eq)]
pub struct UpstreamAuth {
    /// Lowercase header name, e.g. `authorization`.
    pub header_name: String,
    pub value: String,
}

impl fmt::Debug for UpstreamAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamAuth").field("header_name", &self.header_name).field("value", &"<redacted>").finish()
    }
}

impl UpstreamAuth {
    pub fn new(header_name: &str, value: &str) -> Result<Self, FieldError> {
        let header_name = header_name.trim();
        validate_header_name("upstream_auth.header_name", header_name)?;
        let lower = header_name.to_ascii_lowercase();
        if lower == "host" || lower == "content-length" || lower == "transfer-encoding" {
            return Err(FieldError::new(
                "upstream_auth.header_name",
                "cannot be host, content-length or transfer-encoding",
            ));
        }
        if value.is_empty() {
            return Err(FieldError::new("upstream_auth.value", "is required when header_name is set"));
        }
        // RFC 9110 field-value: visible ASCII, space and tab.
        if !value.bytes().all(|b| b == b' ' || b == b'\t' || (0x21..=0x7e).contains(&b)) {
            return Err(FieldError::new("upstream_auth.value", "must be visible ASCII (no control characters)"));
        }
        Ok(UpstreamAuth { header_name: lower, value: value.to_string() })
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gateway {
    pub id: Uuid,
    pub name: String,
    pub inbound: InboundAuth,
    pub upstream: Option<UpstreamAuth>,
    pub default_reservation_tokens: u64,
    pub created_at: DateTime<Utc>,
}

/// Gateway names are what Envoy routes carry: `[a-z0-9][a-z0-9-]{0,62}`.
pub fn validate_gateway_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    let b = name.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= 63
        && (b[0].is_ascii_lowercase() || b[0].is_ascii_digit())
        && b.iter().all(|&c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else if name.is_empty() {
        Err(FieldError::new(field, "is required"))
    } else {
        Err(FieldError::new(field, "must match [a-z0-9][a-z0-9-]{0,62}"))
    }
}

/// An HTTP header name (RFC 9110 token), not a pseudo-header.
pub fn validate_header_name(field: &'static str, name: &str) -> Result<(), FieldError> {
    const TCHAR: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err(FieldError::new(field, "is required"));
    }
    if name.len() > 128 || !name.bytes().all(|b| b.is_ascii_alphanumeric() || TCHAR.contains(&b)) {
        return Err(FieldError::new(field, "must be an HTTP header name of at most 128 characters (RFC 9110 token)"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_names() {
        for ok in ["demo", "a", "0", "team-a-prod", &"a".repeat(63)] {
            assert!(validate_gateway_name("name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "Demo", "a_b", "a.b", "a b", &"a".repeat(64), "ä"] {
            let e = validate_gateway_name("name", bad).unwrap_err();
            assert_eq!(e.field, "name");
        }
    }

    #[test]
    fn inbound_auth_normalises_header_names() {
        let a = InboundAuth::new("X-Custom-Key", KeyLocation::Header).unwrap();
        assert_eq!(a.key_name, "x-custom-key");
        assert_eq!(InboundAuth::new("", KeyLocation::Header).unwrap(), InboundAuth::default());
        let q = InboundAuth::new("api_Key", KeyLocation::Query).unwrap();
        assert_eq!(q.key_name, "api_Key");
        assert_eq!(InboundAuth::new("bad header", KeyLocation::Header).unwrap_err().field, "inbound_auth.key_name");
        assert_eq!(InboundAuth::new(":path", KeyLocation::Header).unwrap_err().field, "inbound_auth.key_name");
        assert_eq!(InboundAuth::new("a&b", KeyLocation::Query).unwrap_err().field, "inbound_auth.key_name");
    }

    #[test]
    fn upstream_auth_rules_and_redaction() {
        let u = UpstreamAuth::new("Authorization", "Bearer sk-secret").unwrap();
        assert_eq!(u.header_name, "authorization");
        assert!(!format!("{u:?}").contains("sk-secret"));
        assert_eq!(UpstreamAuth::new("authorization", "").unwrap_err().field, "upstream_auth.value");
        assert_eq!(UpstreamAuth::new("host", "x").unwrap_err().field, "upstream_auth.header_name");
        assert_eq!(UpstreamAuth::new("a", "x\r\ny").unwrap_err().field, "upstream_auth.value");
        assert_eq!(UpstreamAuth::new("a", "x\u{7f}y").unwrap_err().field, "upstream_auth.value");
        assert_eq!(UpstreamAuth::new("a", "clé").unwrap_err().field, "upstream_auth.value");
        assert!(UpstreamAuth::new("a", "Bearer sk-\tok").is_ok());
    }
}
