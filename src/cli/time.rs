//! Parsing time flags (`--expires-at`, `--since`) into proto timestamps, shared by `keys`,
//! `tokens` and `audit`.

use anyhow::Context;

/// An RFC 3339 time as a proto timestamp; errors name the flag.
pub(super) fn timestamp(field: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t =
        chrono::DateTime::parse_from_rfc3339(s).with_context(|| format!("{field}: '{s}' is not an RFC 3339 time"))?;
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}

/// An RFC 3339 time, or a duration before now (`24h`, `7d`), as a proto timestamp.
pub(super) fn time_or_ago(field: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    if let Ok(ago) = humantime::parse_duration(s) {
        let ago = chrono::Duration::from_std(ago).with_context(|| format!("{field}: '{s}' is too long ago"))?;
        let t =
            chrono::Utc::now().checked_sub_signed(ago).with_context(|| format!("{field}: '{s}' is too long ago"))?;
        return Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 });
    }
    timestamp(field, s).with_context(|| format!("{field}: '{s}' is neither an RFC 3339 time nor a duration like 24h"))
}
