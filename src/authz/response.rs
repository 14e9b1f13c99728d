//! Shapes CheckResponses: the one table from decisions to HTTP statuses and bodies.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::rpc;

use chrono::{DateTime, SecondsFormat, Utc};

use super::wire::{self, Answer, Out, Text};
use crate::domain::budget::BudgetDenial;
use crate::domain::check::{Admitted, Decision, Denial};
use crate::domain::gateway::KeyLocation;
use crate::domain::window::Admission;
use crate::domain::{money, period};

const MISSING_KEY_BODY: &str =
    r#"{"error":{"message":"Missing authentication token","type":"invalid_request_error","code":"missing_api_key"}}"#;
const INVALID_KEY_BODY: &str =
    r#"{"error":{"message":"Invalid authentication token","type":"invalid_request_error","code":"invalid_api_key"}}"#;
const INTERNAL_BODY: &str = r#"{"error":{"message":"The authorization service is unavailable","type":"server_error","code":"service_unavailable"}}"#;

/// `retry-after` when a budget is held by in-flight reservations rather than used up.
const IN_FLIGHT_RETRY_SECS: u64 = 1;

// google.rpc.Code values. Envoy only tells OK from not-OK; these make its logs readable.
const RPC_OK: i32 = 0;
const RPC_RESOURCE_EXHAUSTED: i32 = 8;
const RPC_UNAVAILABLE: i32 = 14;
const RPC_UNAUTHENTICATED: i32 = 16;

pub fn from_decision(decision: Decision, now: DateTime<Utc>) -> Answer {
    let denial = match decision {
        Decision::Allow(a) => return Answer::Allow(a),
        Decision::Deny(denial) => denial,
    };
    Answer::Other(denied(&denial, now))
}

fn denied(denial: &Denial, now: DateTime<Utc>) -> CheckResponse {
    match denial {
        // Operator error: fail closed with 503 and say which gateway.
        Denial::GatewayNotConfigured { name } => {
            let body = serde_json::json!({"error": {
                "message": format!("gateway '{name}' is not configured"),
                "type": "server_error",
                "code": "gateway_not_configured",
            }});
            deny(StatusCode::ServiceUnavailable, RPC_UNAVAILABLE, body.to_string())
        }
        Denial::MissingKey => deny(StatusCode::Unauthorized, RPC_UNAUTHENTICATED, MISSING_KEY_BODY.to_string()),
        Denial::InvalidKey { .. } => deny(StatusCode::Unauthorized, RPC_UNAUTHENTICATED, INVALID_KEY_BODY.to_string()),
        Denial::RateLimited { admission: a, .. } => {
            let retry = a.retry_after_secs();
            let body = serde_json::json!({"error": {
                "message": format!(
                    "Rate limit reached: {} requests per minute. A request slot frees in {retry}s.",
                    a.limit
                ),
                "type": "rate_limit_error",
                "code": "rate_limit_exceeded",
            }});
            let mut r = deny(StatusCode::TooManyRequests, RPC_RESOURCE_EXHAUSTED, body.to_string());
            if let Some(HttpResponse::DeniedResponse(d)) = r.http_response.as_mut() {
                d.headers.push(set_header("retry-after", &retry.to_string()));
                d.headers.extend(rpm_headers(a));
                d.headers.push(set_header("x-ratelimit-reset-requests", &format!("{retry}s")));
            }
            r
        }
        Denial::Budget { denial, rpm, .. } => {
            let mut r = budget_denied(denial, now);
            if let (Some(a), Some(HttpResponse::DeniedResponse(d))) = (rpm, r.http_response.as_mut()) {
                d.headers.extend(rpm_headers(a));
            }
            r
        }
        Denial::Internal(_) => internal_error(),
    }
}

fn set_header(key: &str, value: &str) -> HeaderValueOption {
    header(key, value, HeaderAppendAction::OverwriteIfExistsOrAdd)
}

/// 429 for a used-up token or USD budget: which limit, its value, when it frees.
fn budget_denied(denial: &BudgetDenial, now: DateTime<Utc>) -> CheckResponse {
    let (code, what, reset_at, in_flight) = match denial {
        BudgetDenial::Tokens { limit, reset_at, in_flight } => {
            ("token_limit_exceeded", format!("Token limit of {limit} tokens"), reset_at, in_flight)
        }
        BudgetDenial::Cost { limit_micros, reset_at, in_flight } => {
            ("budget_exceeded", format!("Budget of ${} USD", money::format_usd(*limit_micros)), reset_at, in_flight)
        }
    };
    let (when, retry) = match (in_flight, reset_at) {
        // Requests in flight hold the rest: it frees as they finish.
        (true, _) => ("the rest is held by requests in flight; retry shortly".to_string(), Some(IN_FLIGHT_RETRY_SECS)),
        (false, Some(at)) => {
            let secs = period::secs_until(now, *at);
            (format!("it resets at {} (in {secs}s)", at.to_rfc3339_opts(SecondsFormat::Secs, true)), Some(secs))
        }
        (false, None) => ("it does not reset".to_string(), None),
    };
    let body = serde_json::json!({"error": {
        "message": format!("{what} reached for this key; {when}."),
        "type": "rate_limit_error",
        "code": code,
    }});
    let mut r = deny(StatusCode::TooManyRequests, RPC_RESOURCE_EXHAUSTED, body.to_string());
    if let (Some(secs), Some(HttpResponse::DeniedResponse(d))) = (retry, r.http_response.as_mut()) {
        d.headers.push(set_header("retry-after", &secs.to_string()));
    }
    r
}

/// `x-ratelimit-limit-requests` / `x-ratelimit-remaining-requests`.
fn rpm_headers(a: &Admission) -> [HeaderValueOption; 2] {
    [
        set_header("x-ratelimit-limit-requests", &a.limit.to_string()),
        set_header("x-ratelimit-remaining-requests", &a.remaining.to_string()),
    ]
}

/// Any fault on the request path: deny with 503, never allow.
pub fn internal_error() -> CheckResponse {
    deny(StatusCode::ServiceUnavailable, RPC_UNAVAILABLE, INTERNAL_BODY.to_string())
}

fn header(key: &str, value: &str, action: HeaderAppendAction) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue { key: key.to_string(), value: value.to_string(), ..Default::default() }),
        append_action: action as i32,
        ..Default::default()
    }
}

fn deny(status: StatusCode, rpc_code: i32, body: String) -> CheckResponse {
    CheckResponse {
        status: Some(rpc::Status { code: rpc_code, ..Default::default() }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus { code: status as i32 }),
            headers: vec![set_header("content-type", "application/json")],
            body,
        })),
        dynamic_metadata: None,
    }
}

/// Writes an allowed request's `CheckResponse` (field numbers of
/// `envoy.service.auth.v3`): OK; remove the client's key (header or query parameter); set
/// the provider key and `accept-encoding: identity` upstream; the requests-per-minute
/// headers for the client; dynamic metadata `key_id`, `gateway` and, with a budget,
/// `reservation`. Written straight from the decision: nothing is allocated.
pub(super) fn write_allow(a: &Admitted, out: &mut Out) {
    let inbound = &a.gateway.inbound;
    let upstream = a.gateway.upstream.as_ref();
    let rpm = a.rpm.as_ref().map(|rpm| (Text::<10>::of(rpm.limit), Text::<10>::of(rpm.remaining)));
    let mut id = [0u8; 36];
    let key_id: &str = a.key.id.hyphenated().encode_lower(&mut id);
    let reservation = a.reservation.map(Text::<128>::of);
    // CheckResponse.status: google.rpc.Status with code OK (0), written empty.
    wire::message(out, 1, |status| wire::int(status, 1, RPC_OK as u64));
    // CheckResponse.ok_response
    wire::message(out, 3, |ok| {
        if let Some(u) = upstream {
            set_header_field(ok, 2, &u.header_name, &u.value);
        }
        // Metering reads response bodies: ask the provider for an uncompressed one.
        set_header_field(ok, 2, "accept-encoding", "identity");
        match inbound.location {
            // Envoy removes after it sets: never remove the header we are about to set.
            KeyLocation::Header if upstream.is_none_or(|u| u.header_name != inbound.key_name) => {
                wire::string(ok, 5, &inbound.key_name);
            }
            KeyLocation::Header => {}
            KeyLocation::Query => wire::string(ok, 8, &inbound.key_name),
        }
        if let Some((limit, remaining)) = &rpm {
            set_header_field(ok, 6, "x-ratelimit-limit-requests", limit.as_str());
            set_header_field(ok, 6, "x-ratelimit-remaining-requests", remaining.as_str());
        }
    });
    // CheckResponse.dynamic_metadata: a Struct of string Values.
    wire::message(out, 4, |md| {
        metadata_field(md, "key_id", key_id);
        metadata_field(md, "gateway", &a.gateway.name);
        if let Some(r) = &reservation {
            metadata_field(md, "reservation", r.as_str());
        }
    });
}

/// A `HeaderValueOption` field that overwrites (or adds) `key: value`.
fn set_header_field(out: &mut Out, tag: u32, key: &str, value: &str) {
    wire::message(out, tag, |option| {
        wire::message(option, 1, |header| {
            wire::string(header, 1, key);
            wire::string(header, 2, value);
        });
        wire::int(option, 3, HeaderAppendAction::OverwriteIfExistsOrAdd as u64);
    });
}

/// One entry of `Struct.fields`: `name` to a string `Value`.
fn metadata_field(out: &mut Out, name: &str, value: &str) {
    wire::message(out, 1, |entry| {
        wire::string(entry, 1, name);
        wire::message(entry, 2, |v| wire::string(v, 3, value));
    });
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use envoy_types::pb::google::protobuf::value::Kind;
    use std::sync::Arc;

    use chrono::{DateTime, Duration, TimeZone};
    use serde_json::json;
    use uuid::Uuid;

    use super::*;
    use crate::domain::budget::{Hold, Ticket};
    use crate::domain::gateway::{Gateway, InboundAuth, UpstreamAuth};
    use crate::domain::key::{ApiKey, Limits};
    use crate::domain::request::InvalidReason;

    const KEY_ID: Uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap()
    }

    fn denied(r: &CheckResponse) -> &DeniedHttpResponse {
        match &r.http_response {
            Some(HttpResponse::DeniedResponse(d)) => d,
            other => panic!("expected a denied response, got {other:?}"),
        }
    }

    /// Header names and values in order; each must overwrite, never append.
    fn headers(h: &[HeaderValueOption]) -> Vec<(&str, &str)> {
        h.iter()
            .map(|o| {
                assert_eq!(o.append_action, HeaderAppendAction::OverwriteIfExistsOrAdd as i32);
                let v = o.header.as_ref().expect("a header");
                (v.key.as_str(), v.value.as_str())
            })
            .collect()
    }

    fn rpc_code(r: &CheckResponse) -> i32 {
        r.status.as_ref().expect("a gRPC status").code
    }

    fn admission(admitted: bool, limit: u32, remaining: u32, reset_in_micros: i64) -> Admission {
        Admission { admitted, limit, remaining, reset_in_micros }
    }

    #[test]
    fn key_gateway_and_internal_denials_are_401_or_503_with_a_json_error_body() {
        let invalid = |reason| Denial::InvalidKey { reason, key_id: Some(KEY_ID) };
        let missing = r#"{"error":{"message":"Missing authentication token","type":"invalid_request_error","code":"missing_api_key"}}"#;
        let bad = r#"{"error":{"message":"Invalid authentication token","type":"invalid_request_error","code":"invalid_api_key"}}"#;
        let unavailable = json!({"error": {
            "message": "The authorization service is unavailable", "type": "server_error", "code": "service_unavailable",
        }});
        let not_configured = json!({"error": {
            "message": "gateway 'demo' is not configured", "type": "server_error", "code": "gateway_not_configured",
        }});
        // (denial, HTTP status, gRPC code, body)
        let mut cases = vec![
            (Denial::MissingKey, 401, 16, serde_json::from_str(missing).unwrap()),
            (Denial::GatewayNotConfigured { name: "demo".into() }, 503, 14, not_configured),
            (Denial::Internal("meters lock poisoned"), 503, 14, unavailable.clone()),
        ];
        // Clients see one body for every reason; only the log tells them apart.
        for reason in [
            InvalidReason::Malformed,
            InvalidReason::Unknown,
            InvalidReason::Disabled,
            InvalidReason::Expired,
            InvalidReason::OtherGateway,
            InvalidReason::Repeated,
            InvalidReason::DisguisedName,
            InvalidReason::AlsoElsewhere,
        ] {
            cases.push((invalid(reason), 401, 16, serde_json::from_str(bad).unwrap()));
        }
        let unknown = Denial::InvalidKey { reason: InvalidReason::Unknown, key_id: None };
        cases.push((unknown, 401, 16, serde_json::from_str(bad).unwrap()));
        for (denial, status, rpc, body) in cases {
            let r = from_decision(Decision::Deny(denial.clone()), now()).to_response();
            let d = denied(&r);
            assert_eq!(d.status.as_ref().map(|s| s.code), Some(status), "{denial:?}");
            assert_eq!(rpc_code(&r), rpc, "{denial:?}");
            assert_eq!(headers(&d.headers), [("content-type", "application/json")], "{denial:?}");
            let sent: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            assert_eq!(sent, body, "{denial:?}");
            assert_eq!(r.dynamic_metadata, None, "{denial:?}");
        }
        // The 401 bodies are the specification's bytes.
        assert_eq!(denied(&from_decision(Decision::Deny(Denial::MissingKey), now()).to_response()).body, missing);
        let r = from_decision(Decision::Deny(invalid(InvalidReason::Expired)), now()).to_response();
        assert_eq!(denied(&r).body, bad);
        // A fault outside any decision answers the same as an internal denial.
        let r = internal_error();
        assert_eq!((denied(&r).status.as_ref().unwrap().code, rpc_code(&r)), (503, 14));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&denied(&r).body).unwrap(), unavailable);
    }

    #[test]
    fn limit_denials_are_429_and_say_which_limit_and_when_to_retry() {
        let soon = now() + Duration::seconds(90);
        let tokens = |reset_at, in_flight| BudgetDenial::Tokens { limit: 1000, reset_at, in_flight };
        let cost = |reset_at, in_flight| BudgetDenial::Cost { limit_micros: 12_500_000, reset_at, in_flight };
        let budget = |denial, rpm| Denial::Budget { key_id: KEY_ID, denial, rpm };
        let rate_limited = |admission| Denial::RateLimited { key_id: KEY_ID, admission };
        // (denial, body code, body message, headers after content-type)
        let cases = vec![
            (
                rate_limited(admission(false, 5, 0, 12_300_000)),
                "rate_limit_exceeded",
                "Rate limit reached: 5 requests per minute. A request slot frees in 13s.",
                vec![
                    ("retry-after", "13"),
                    ("x-ratelimit-limit-requests", "5"),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "13s"),
                ],
            ),
            (
                // An empty window still says at least one second.
                rate_limited(admission(false, 0, 0, 0)),
                "rate_limit_exceeded",
                "Rate limit reached: 0 requests per minute. A request slot frees in 1s.",
                vec![
                    ("retry-after", "1"),
                    ("x-ratelimit-limit-requests", "0"),
                    ("x-ratelimit-remaining-requests", "0"),
                    ("x-ratelimit-reset-requests", "1s"),
                ],
            ),
            (
                budget(tokens(Some(soon), false), None),
                "token_limit_exceeded",
                "Token limit of 1000 tokens reached for this key; it resets at 2026-02-01T00:01:30Z (in 90s).",
                vec![("retry-after", "90")],
            ),
            (
                // Part of a second rounds up.
                budget(tokens(Some(now() + Duration::milliseconds(89_500)), false), None),
                "token_limit_exceeded",
                "Token limit of 1000 tokens reached for this key; it resets at 2026-02-01T00:01:29Z (in 90s).",
                vec![("retry-after", "90")],
            ),
            (
                budget(tokens(Some(soon), true), None),
                "token_limit_exceeded",
                "Token limit of 1000 tokens reached for this key; the rest is held by requests in flight; retry shortly.",
                vec![("retry-after", "1")],
            ),
            (
                budget(tokens(None, false), None),
                "token_limit_exceeded",
                "Token limit of 1000 tokens reached for this key; it does not reset.",
                vec![],
            ),
            (
                budget(cost(Some(soon), false), None),
                "budget_exceeded",
                "Budget of $12.50 USD reached for this key; it resets at 2026-02-01T00:01:30Z (in 90s).",
                vec![("retry-after", "90")],
            ),
            (
                budget(cost(None, true), None),
                "budget_exceeded",
                "Budget of $12.50 USD reached for this key; the rest is held by requests in flight; retry shortly.",
                vec![("retry-after", "1")],
            ),
            (
                budget(cost(None, false), None),
                "budget_exceeded",
                "Budget of $12.50 USD reached for this key; it does not reset.",
                vec![],
            ),
            (
                // An RPM key's window, untouched by the refused request: its headers, no reset.
                budget(tokens(Some(soon), false), Some(admission(true, 10, 4, 30_000_000))),
                "token_limit_exceeded",
                "Token limit of 1000 tokens reached for this key; it resets at 2026-02-01T00:01:30Z (in 90s).",
                vec![
                    ("retry-after", "90"),
                    ("x-ratelimit-limit-requests", "10"),
                    ("x-ratelimit-remaining-requests", "4"),
                ],
            ),
            (
                budget(cost(None, false), Some(admission(true, 10, 10, 0))),
                "budget_exceeded",
                "Budget of $12.50 USD reached for this key; it does not reset.",
                vec![("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "10")],
            ),
        ];
        for (denial, code, message, extra) in cases {
            let r = from_decision(Decision::Deny(denial.clone()), now()).to_response();
            let d = denied(&r);
            assert_eq!(d.status.as_ref().map(|s| s.code), Some(429), "{denial:?}");
            assert_eq!(rpc_code(&r), 8, "{denial:?}");
            let mut expected = vec![("content-type", "application/json")];
            expected.extend(extra);
            assert_eq!(headers(&d.headers), expected, "{denial:?}");
            let body: serde_json::Value = serde_json::from_str(&d.body).unwrap();
            let want = json!({"error": {"message": message, "type": "rate_limit_error", "code": code}});
            assert_eq!(body, want, "{denial:?}");
            assert_eq!(r.dynamic_metadata, None, "{denial:?}");
        }
    }

    fn admitted(
        inbound: InboundAuth,
        upstream: Option<(&str, &str)>,
        rpm: Option<Admission>,
        reservation: Option<u64>,
    ) -> Decision {
        let reservation = reservation.map(|id| Ticket {
            id,
            hold: Hold { tokens: 100, micros: 7, prompt_tokens: 3 },
            period_start: DateTime::UNIX_EPOCH,
        });
        let gateway = Gateway {
            id: Uuid::from_u128(7),
            name: "demo".into(),
            inbound,
            upstream: upstream.map(|(name, value)| UpstreamAuth::new(name, value).unwrap()),
            default_reservation_tokens: 0,
            created_at: now(),
        };
        let key = ApiKey {
            id: KEY_ID,
            gateway_id: gateway.id,
            name: "token-user01".into(),
            prefix: "pcs_AbCdEfGh".into(),
            enabled: true,
            legacy: false,
            limits: Limits::default(),
            created_at: now(),
            expires_at: None,
            last_used_at: None,
        };
        Decision::Allow(Admitted { gateway: Arc::new(gateway), key: Arc::new(key), rpm, reservation })
    }

    /// What Envoy does with an allowed request.
    #[derive(Debug, PartialEq)]
    struct Allowed<'a> {
        headers_to_remove: Vec<&'a str>,
        query_parameters_to_remove: Vec<&'a str>,
        upstream_headers: Vec<(&'a str, &'a str)>,
        client_headers: Vec<(&'a str, &'a str)>,
        metadata: BTreeMap<&'a str, &'a str>,
    }

    fn allowed(r: &CheckResponse) -> Allowed<'_> {
        assert_eq!(rpc_code(r), 0);
        let Some(HttpResponse::OkResponse(ok)) = &r.http_response else { panic!("expected an ok response: {r:?}") };
        let metadata = r.dynamic_metadata.as_ref().expect("dynamic metadata");
        Allowed {
            headers_to_remove: ok.headers_to_remove.iter().map(String::as_str).collect(),
            query_parameters_to_remove: ok.query_parameters_to_remove.iter().map(String::as_str).collect(),
            upstream_headers: headers(&ok.headers),
            client_headers: headers(&ok.response_headers_to_add),
            metadata: metadata
                .fields
                .iter()
                .map(|(k, v)| match &v.kind {
                    Some(Kind::StringValue(s)) => (k.as_str(), s.as_str()),
                    other => panic!("{k}: expected a string, got {other:?}"),
                })
                .collect(),
        }
    }

    #[test]
    fn an_allowed_request_loses_the_client_key_and_carries_the_provider_key_and_metadata() {
        const ID: &str = "01900000-0000-7000-8000-000000000001";
        let header = InboundAuth::default();
        let bearer = InboundAuth::new("Authorization", KeyLocation::Header).unwrap();
        let query = InboundAuth::new("api_key", KeyLocation::Query).unwrap();
        let provider = Some(("authorization", "Bearer sk-provider"));
        let identity = ("accept-encoding", "identity");
        let meta = |reservation: Option<&'static str>| {
            let mut m = BTreeMap::from([("key_id", ID), ("gateway", "demo")]);
            m.extend(reservation.map(|r| ("reservation", r)));
            m
        };
        let cases = [
            (
                "header key, no provider key, no limits",
                admitted(header.clone(), None, None, None),
                Allowed {
                    headers_to_remove: vec!["x-api-key"],
                    query_parameters_to_remove: vec![],
                    upstream_headers: vec![identity],
                    client_headers: vec![],
                    metadata: meta(None),
                },
            ),
            (
                "header key, provider key, an RPM window and a reservation",
                admitted(header, provider, Some(admission(true, 10, 9, 60_000_000)), Some(42)),
                Allowed {
                    headers_to_remove: vec!["x-api-key"],
                    query_parameters_to_remove: vec![],
                    upstream_headers: vec![("authorization", "Bearer sk-provider"), identity],
                    client_headers: vec![("x-ratelimit-limit-requests", "10"), ("x-ratelimit-remaining-requests", "9")],
                    metadata: meta(Some("42.100.7.3.0")),
                },
            ),
            (
                // Envoy removes after it sets: the provider key must not be removed.
                "the provider key in the client key's header",
                admitted(bearer.clone(), provider, None, Some(0)),
                Allowed {
                    headers_to_remove: vec![],
                    query_parameters_to_remove: vec![],
                    upstream_headers: vec![("authorization", "Bearer sk-provider"), identity],
                    client_headers: vec![],
                    metadata: meta(Some("0.100.7.3.0")),
                },
            ),
            (
                "header key, provider key elsewhere",
                admitted(bearer, Some(("x-api-key", "sk-provider")), None, None),
                Allowed {
                    headers_to_remove: vec!["authorization"],
                    query_parameters_to_remove: vec![],
                    upstream_headers: vec![("x-api-key", "sk-provider"), identity],
                    client_headers: vec![],
                    metadata: meta(None),
                },
            ),
            (
                "query key",
                admitted(query, provider, Some(admission(true, 3, 0, 1)), None),
                Allowed {
                    headers_to_remove: vec![],
                    query_parameters_to_remove: vec!["api_key"],
                    upstream_headers: vec![("authorization", "Bearer sk-provider"), identity],
                    client_headers: vec![("x-ratelimit-limit-requests", "3"), ("x-ratelimit-remaining-requests", "0")],
                    metadata: meta(None),
                },
            ),
        ];
        for (case, decision, want) in cases {
            assert_eq!(allowed(&from_decision(decision, now()).to_response()), want, "{case}");
        }
    }
}
