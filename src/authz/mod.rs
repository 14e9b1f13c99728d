//! Envoy-facing: the ext_authz `Check`.

mod grpc;
mod meter;
mod response;
mod serve;
mod wire;

pub use meter::MeterService;
pub use serve::{Services, serve};
pub use wire::{Answer, CheckInput};

use std::borrow::Cow;
use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::Arc;

use wire::HeaderLine;

use crate::domain::check::{self, Decision, Denial, Step};
use crate::domain::request::{Headers, RequestParts};
use crate::state::Shared;

pub struct AuthzService {
    shared: Arc<Shared>,
}

impl AuthzService {
    pub fn new(shared: Arc<Shared>) -> Self {
        AuthzService { shared }
    }

    /// Decides one CheckRequest. Never fails: faults become a 503 denial. Its span (at
    /// debug level, free when off) names the gateway, the key and the decision.
    #[tracing::instrument(level = "debug", name = "check", skip_all, fields(gateway, key_id, decision))]
    pub async fn decide(&self, req: &CheckInput) -> Answer {
        let attrs = req.attributes.as_ref();
        let gateway = attrs.and_then(|a| a.context_extensions.get("gateway"));
        let gateway = gateway.as_deref();
        let span = tracing::Span::current();
        if !span.is_disabled() {
            span.record("gateway", gateway.unwrap_or(""));
        }
        let http = attrs.and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref());
        let empty = Vec::new();
        // Envoy sends `headers` unless `encode_raw_headers` is on; then only `header_map`.
        let raw;
        let (headers, path): (&dyn Headers, _) = match http {
            Some(h) if h.headers.is_empty() && h.header_map.is_some() => {
                raw = joined_headers(h.header_map.iter().flat_map(|m| &m.headers));
                (&raw, wire::text(&h.path))
            }
            Some(h) => (&h.headers, wire::text(&h.path)),
            None => (&empty, Cow::Borrowed("")),
        };
        let body = match http {
            Some(h) if !h.raw_body.is_empty() => &h.raw_body[..],
            Some(h) => &h.body[..],
            None => &[],
        };
        let parts = RequestParts { gateway, headers, path: &path, body };
        // One reading of each clock: wall time for expiry and periods, elapsed time for windows.
        let at = self.shared.clock.read();
        let now = at.wall;
        let limiters = &self.shared.limiters;
        let step = match self.shared.view() {
            Ok(view) => check::identify(&view, limiters, &parts, at),
            Err(e) => {
                tracing::error!(error = %e, "check denied: internal error");
                self.shared.metrics.internal_error();
                return Answer::Other(response::internal_error());
            }
        };
        // The view's lock is not held while the counters decide (they may be remote).
        let decision = match step {
            Step::Done(decision) => decision,
            Step::Limit(pending) => check::limit(limiters, pending, at).await,
        };
        if !span.is_disabled() {
            let (key_id, outcome) = match &decision {
                Decision::Allow(a) => (Some(a.key.id), "allow"),
                Decision::Deny(d) => (d.key_id(), "deny"),
            };
            if let Some(id) = key_id {
                span.record("key_id", tracing::field::display(id));
            }
            span.record("decision", outcome);
        }
        self.shared.metrics.check(&decision);
        log_decision(&decision);
        response::from_decision(decision, now)
    }
}

/// `header_map` entries (one per header line) as Envoy writes `headers`: lowercase
/// names, and a header sent more than once joined with `,`, so a key header sent twice
/// reads the same whichever encoding Envoy uses (and is refused).
fn joined_headers<'a>(entries: impl Iterator<Item = &'a HeaderLine>) -> HashMap<String, String> {
    let mut out: HashMap<String, String> = HashMap::new();
    for line in entries {
        let value = line.value();
        match out.entry(wire::text(&line.key).to_ascii_lowercase()) {
            Entry::Occupied(mut joined) => {
                let joined = joined.get_mut();
                joined.push(',');
                joined.push_str(&value);
            }
            Entry::Vacant(slot) => {
                slot.insert(value.into_owned());
            }
        }
    }
    out
}

fn log_decision(decision: &Decision) {
    match decision {
        Decision::Allow(a) => {
            tracing::trace!(gateway = %a.gateway.name, key_id = %a.key.id, "allowed");
        }
        Decision::Deny(Denial::GatewayNotConfigured { name }) => {
            // An operator error: the Envoy route names a gateway we do not have.
            tracing::warn!(gateway = %name, "denied: gateway is not configured");
        }
        Decision::Deny(Denial::MissingKey) => tracing::debug!("denied: missing key"),
        Decision::Deny(Denial::RateLimited { key_id, admission }) => {
            tracing::info!(key_id = %key_id, limit = admission.limit, "denied: requests per minute exceeded")
        }
        Decision::Deny(Denial::Budget { key_id, denial, .. }) => {
            tracing::info!(key_id = %key_id, reason = denial.reason(), "denied: budget used up")
        }
        Decision::Deny(Denial::Internal(cause)) => tracing::error!(cause, "denied: internal error"),
        Decision::Deny(Denial::InvalidKey { reason, key_id }) => match key_id {
            Some(id) => tracing::info!(reason = %reason, key_id = %id, "denied: invalid key"),
            None => tracing::info!(reason = %reason, "denied: invalid key"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(key: &str, value: &str, raw: bool) -> HeaderLine {
        let (key, value) = (key.to_string().into(), value.to_string().into());
        if raw {
            HeaderLine { key, raw_value: value, ..Default::default() }
        } else {
            HeaderLine { key, value, ..Default::default() }
        }
    }

    #[test]
    fn raw_header_entries_read_as_envoy_joins_headers() {
        let entries = [entry("X-Api-Key", "a", true), entry("accept", "*/*", false), entry("x-api-key", "b", false)];
        let joined = joined_headers(entries.iter());
        assert_eq!(joined.get("x-api-key").map(String::as_str), Some("a,b"), "a header sent twice is visible");
        assert_eq!(joined.get("accept").map(String::as_str), Some("*/*"));
        assert_eq!(joined.len(), 2);
    }
}
