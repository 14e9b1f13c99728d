//! Reading a request as Check sees it: the parts Envoy sends, and the API key where the
//! gateway says clients put it (a header or a query parameter), refusing every way a key
//! could be misread or slip past Envoy to the provider.

use std::borrow::Cow;
use std::collections::HashMap;

use super::gateway::{Gateway, KeyLocation};
use super::secret::{self, SecretKind, Shape};

/// A request's headers as Envoy sends them: lowercase names, a header sent more than once
/// joined with `,`.
pub trait Headers: std::fmt::Debug + Sync {
    /// The value of the header `name` (lowercase).
    fn get(&self, name: &str) -> Option<Cow<'_, str>>;

    /// Whether `f` holds for some header's name and value, as bytes (whatever they are:
    /// a key among bytes that are not UTF-8 is still there).
    fn any(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> bool;
}

impl Headers for HashMap<String, String> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        HashMap::get(self, name).map(|v| Cow::Borrowed(v.as_str()))
    }

    fn any(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> bool {
        self.iter().any(|(name, value)| f(name.as_bytes(), value.as_bytes()))
    }
}

/// What Check needs from an HTTP request.
#[derive(Debug, Clone, Copy)]
pub struct RequestParts<'a> {
    /// `context_extensions["gateway"]`.
    pub gateway: Option<&'a str>,
    pub headers: &'a dyn Headers,
    /// Path with query string.
    pub path: &'a str,
    /// The request body when Envoy sends it (`with_request_body`), else empty.
    pub body: &'a [u8],
}

/// Why a presented key is not accepted. Clients see one message for all of them;
/// the log says which.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidReason {
    /// Our prefix, wrong checksum: refused without a lookup.
    Malformed,
    /// No key has this secret (never issued, or deleted).
    Unknown,
    Disabled,
    Expired,
    /// A valid key of another gateway.
    OtherGateway,
    /// The key header or query parameter came more than once (Envoy joins a header
    /// sent twice with `,`): which one counts would be a guess.
    Repeated,
    /// A query parameter whose name reads as the key's name once decoded or case-folded
    /// (`api%5Fkey`, `API_KEY`, `x=1;api_key`) but is not spelled as it: Envoy removes
    /// only the literal name, so it would reach the provider.
    DisguisedName,
    /// The key (or another key of ours) is also in another header or elsewhere in the
    /// URL, which Envoy would pass on to the provider.
    AlsoElsewhere,
}

impl InvalidReason {
    pub fn as_str(self) -> &'static str {
        match self {
            InvalidReason::Malformed => "malformed",
            InvalidReason::Unknown => "unknown_or_deleted",
            InvalidReason::Disabled => "disabled",
            InvalidReason::Expired => "expired",
            InvalidReason::OtherGateway => "other_gateway",
            InvalidReason::Repeated => "repeated_key",
            InvalidReason::DisguisedName => "disguised_key_name",
            InvalidReason::AlsoElsewhere => "key_also_elsewhere",
        }
    }
}

impl std::fmt::Display for InvalidReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Reads the key where the gateway says clients put it: `Ok(None)` when absent or
/// blank. A key that could be misread or reach the provider is refused before any
/// lookup: sent twice, under a disguised query parameter name, or also present
/// elsewhere in the request's headers or URL (Envoy removes only the key's own
/// header or literal parameter).
pub fn extract_key<'a>(
    gateway: &Gateway,
    headers: &'a dyn Headers,
    path: &'a str,
) -> Result<Option<Cow<'a, str>>, InvalidReason> {
    let inbound = &gateway.inbound;
    let (raw, pair): (Cow<'a, str>, _) = match inbound.location {
        KeyLocation::Header => {
            let Some(value) = headers.get(&inbound.key_name) else { return Ok(None) };
            // Envoy joins a header sent twice with `,` (and so does the adapter for
            // `encode_raw_headers`); no key contains one.
            if value.contains(',') {
                return Err(InvalidReason::Repeated);
            }
            (value, None)
        }
        KeyLocation::Query => match query_param(path, &inbound.key_name)? {
            Some(QueryKey { value, pair }) => (value, Some(pair)),
            None => return Ok(None),
        },
    };
    let key = match raw {
        Cow::Borrowed(b) => Cow::Borrowed(strip_bearer(b)),
        Cow::Owned(o) => Cow::Owned(strip_bearer(&o).to_string()),
    };
    if key.is_empty() {
        return Ok(None);
    }
    if carried_elsewhere(gateway, &key, headers, path, pair) {
        return Err(InvalidReason::AlsoElsewhere);
    }
    Ok(Some(key))
}

/// Whether the key, or any well-formed key of ours, is somewhere Envoy would pass on
/// to the provider: a header other than the key's own (and the provider-key header,
/// which Envoy overwrites), or the URL outside the key's own parameter `pair`.
fn carried_elsewhere(
    gateway: &Gateway,
    key: &str,
    headers: &dyn Headers,
    path: &str,
    pair: Option<std::ops::Range<usize>>,
) -> bool {
    let key_header = (gateway.inbound.location == KeyLocation::Header).then_some(gateway.inbound.key_name.as_bytes());
    let upstream_header = gateway.upstream.as_ref().map(|u| u.header_name.as_bytes());
    let in_headers = headers.any(&mut |name, value| {
        // `:path` is the URL, checked below without the key's own parameter.
        let skip = name == b":path" || Some(name) == key_header || Some(name) == upstream_header;
        !skip && carries_key(value, key)
    });
    let carried_in_url = |part: &str| {
        carries_key(part.as_bytes(), key)
            || part.contains('%') && carries_key(decode_all(part, false).0.as_bytes(), key)
    };
    in_headers
        || match pair {
            Some(p) => carried_in_url(&path[..p.start]) || carried_in_url(&path[p.end..]),
            None => carried_in_url(path),
        }
}

/// Whether `text` holds `key`, or any well-formed key of ours (checksum and all).
fn carries_key(text: &[u8], key: &str) -> bool {
    const API_KEY_LEN: usize = SecretKind::ApiKey.secret_len();
    let prefix = SecretKind::ApiKey.prefix().as_bytes();
    if text.len() >= key.len() && memchr::memmem::find(text, key.as_bytes()).is_some() {
        return true;
    }
    text.len() >= API_KEY_LEN
        && memchr::memmem::find_iter(text, prefix).any(|i| {
            text.get(i..i + API_KEY_LEN)
                .and_then(|k| std::str::from_utf8(k).ok())
                .is_some_and(|k| secret::shape(k, SecretKind::ApiKey) == Shape::Valid)
        })
}

/// Strips surrounding spaces and a leading `Bearer ` in any case.
pub fn strip_bearer(value: &str) -> &str {
    let v = value.trim();
    let rest = match v.get(..6) {
        Some(p) if p.eq_ignore_ascii_case("bearer") => &v[6..],
        _ => return v,
    };
    // "Bearer" alone, or followed by white space; "Bearerabc" is a value of its own.
    if rest.is_empty() || rest.starts_with(|c: char| c.is_ascii_whitespace()) { rest.trim() } else { v }
}

/// A key found in the query string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueryKey<'a> {
    /// The parameter's value, percent-decoded.
    pub value: Cow<'a, str>,
    /// The byte range of its `name=value` pair in the path: what Envoy removes.
    pub pair: std::ops::Range<usize>,
}

/// Query parameter `name` in `path`. The name must be spelled literally
/// and come once: a pair whose name only reads as `name` once decoded, case-folded,
/// trimmed or split at `;` (as some servers split) is refused as disguised, and the
/// name twice as repeated.
pub fn query_param<'a>(path: &'a str, name: &str) -> Result<Option<QueryKey<'a>>, InvalidReason> {
    let Some((before, query)) = path.split_once('?') else { return Ok(None) };
    let query = query.split_once('#').map_or(query, |(q, _)| q);
    let mut found = None;
    let mut at = before.len() + 1;
    for pair in query.split('&') {
        let range = at..at + pair.len();
        at = range.end + 1;
        for (i, part) in pair.split(';').enumerate() {
            let raw_name = part.split_once('=').map_or(part, |(k, _)| k);
            if i == 0 && raw_name == name {
                if found.is_some() {
                    return Err(InvalidReason::Repeated);
                }
                // The value of this part only: in `api_key;x=pcs_…` Envoy sees a parameter
                // named `api_key;x` (and leaves it), so a key there is no key of ours.
                let value = part.split_once('=').map_or("", |(_, v)| v);
                found = Some(QueryKey { value: percent_decode(value), pair: range.clone() });
            } else if reads_as(raw_name, name) {
                return Err(InvalidReason::DisguisedName);
            }
        }
    }
    Ok(found)
}

/// Whether a raw query parameter name reads as `name` to some server: percent- and
/// `+`-decoded (repeatedly), trimmed, in any case.
fn reads_as(raw: &str, name: &str) -> bool {
    if raw.is_ascii() && !raw.contains(['%', '+']) {
        return raw.trim().eq_ignore_ascii_case(name);
    }
    let (decoded, settled) = decode_all(raw, true);
    let lower = |s: &str| s.chars().flat_map(char::to_lowercase).collect::<String>();
    !settled || lower(decoded.trim()) == lower(name)
}

/// Decoding rounds [`decode_all`] does at most: a name still encoded after them is a
/// disguise in itself.
const DECODE_ROUNDS: usize = 4;

/// Percent-decodes (and with `plus`, reads `+` as a space) until nothing changes, as a
/// server that decodes more than once would, for at most [`DECODE_ROUNDS`] rounds;
/// `false` when it would still change.
fn decode_all(s: &str, plus: bool) -> (Cow<'_, str>, bool) {
    let mut out = Cow::Borrowed(s);
    for _ in 0..DECODE_ROUNDS {
        let once = percent_decode(&out);
        let once = if plus && once.contains('+') { Cow::Owned(once.replace('+', " ")) } else { once };
        if once == out {
            return (out, true);
        }
        out = Cow::Owned(once.into_owned());
    }
    let settled = percent_decode(&out) == out && !(plus && out.contains('+'));
    (out, settled)
}

/// `%XY` sequences decoded; invalid ones and invalid UTF-8 kept as they are (lossy).
pub fn percent_decode(s: &str) -> Cow<'_, str> {
    if !s.contains('%') {
        return Cow::Borrowed(s);
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%'
            && i + 2 < b.len()
            && let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2]))
        {
            out.push((h * 16 + l) as u8);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Cow::Owned(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value_of(path: &str, name: &str) -> Option<String> {
        query_param(path, name).unwrap().map(|q| q.value.into_owned())
    }

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(value_of("/p?k=a%20b", "k").as_deref(), Some("a b"));
        assert_eq!(value_of("/p?a=1&k=Bearer%20x#frag", "k").as_deref(), Some("Bearer x"));
        assert_eq!(value_of("/p?k", "k").as_deref(), Some(""));
        assert_eq!(value_of("/p?k=%zz%2", "k").as_deref(), Some("%zz%2"));
        assert_eq!(value_of("/p", "k"), None);
        // `k;x=v` is a parameter `k;x` to Envoy, which leaves it: no value of ours.
        assert_eq!(value_of("/p?k;x=pcs_abc", "k").as_deref(), Some(""));
        assert_eq!(value_of("/p?k=pcs_abc;x=1", "k").as_deref(), Some("pcs_abc"));
        // The range is the `name=value` pair Envoy removes.
        let path = "/p?a=1&k=v&b=2";
        let found = query_param(path, "k").unwrap().unwrap();
        assert_eq!(&path[found.pair], "k=v");
    }

    /// Header lines as bytes, some not UTF-8 (Envoy may send any byte in a value).
    #[derive(Debug)]
    struct Raw(Vec<(&'static str, Vec<u8>)>);

    impl Headers for Raw {
        fn get(&self, name: &str) -> Option<Cow<'_, str>> {
            self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| String::from_utf8_lossy(v))
        }

        fn any(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> bool {
            self.0.iter().any(|(n, v)| f(n.as_bytes(), v))
        }
    }

    /// A key in a second header is found among bytes that are not UTF-8, whether it is
    /// the presented key or any other well-formed key of ours.
    #[test]
    fn a_key_among_bytes_that_are_not_text_is_still_seen() {
        let gateway = Gateway {
            id: uuid::Uuid::nil(),
            name: "demo".into(),
            inbound: super::super::gateway::InboundAuth::new("x-api-key", KeyLocation::Header).unwrap(),
            upstream: None,
            default_reservation_tokens: 0,
            created_at: chrono::DateTime::UNIX_EPOCH,
        };
        let key = secret::Secret::generate(SecretKind::ApiKey);
        let other = secret::Secret::generate(SecretKind::ApiKey);
        for hidden in [key.expose(), other.expose()] {
            let mut value = b"\xff\xfe ".to_vec();
            value.extend_from_slice(hidden.as_bytes());
            value.extend_from_slice(b" \xc3");
            let headers = Raw(vec![("x-api-key", key.expose().as_bytes().to_vec()), ("x-note", value)]);
            assert_eq!(extract_key(&gateway, &headers, "/").err(), Some(InvalidReason::AlsoElsewhere));
        }
        let clean = Raw(vec![("x-api-key", key.expose().as_bytes().to_vec()), ("x-note", b"\xff pcs_".to_vec())]);
        assert_eq!(extract_key(&gateway, &clean, "/").ok().flatten().as_deref(), Some(key.expose()));
    }
}
