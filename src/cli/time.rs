//! Parsing time flags (`--expires-at`) into proto timestamps, shared by `keys` and `tokens`.

use anyhow::Context;

/// An RFC 3339 time as a proto timestamp; errors name the flag.
pub(super) fn timestamp(field: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t =
        chrono::DateTime::parse_from_rfc3339(s).with_context(|| format!("{field}: '{s}' is not an RFC 3339 time"))?;
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}
