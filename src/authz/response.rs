//! Shapes CheckResponses: the one table from decisions to HTTP statuses and bodies.

use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
use envoy_types::pb::envoy::config::core::v3::{HeaderValue, HeaderValueOption};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckResponse, DeniedHttpResponse, OkHttpResponse};
use envoy_types::pb::envoy::r#type::v3::{HttpStatus, StatusCode};
use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
use envoy_types::pb::google::rpc;

use chrono::{DateTime, SecondsFormat, Utc};

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

pub fn from_decision(decision: &Decision, now: DateTime<Utc>) -> CheckResponse {
    match decision {
        Decision::Allow(a) => allow(a),
        // Operator error: fail closed with 503 and say which gateway.
        Decision::Deny(Denial::GatewayNotConfigured { name }) => {
            let body = serde_json::json!({"error": {
                "message": format!("gateway '{name}' is not configured"),
                "type": "server_error",
                "code": "gateway_not_configured",
            }});
            deny(StatusCode::ServiceUnavailable, RPC_UNAVAILABLE, body.to_string())
        }
        Decision::Deny(Denial::MissingKey) => {
            deny(StatusCode::Unauthorized, RPC_UNAUTHENTICATED, MISSING_KEY_BODY.to_string())
        }
        Decision::Deny(Denial::InvalidKey { .. }) => {
            deny(StatusCode::Unauthorized, RPC_UNAUTHENTICATED, INVALID_KEY_BODY.to_string())
        }
        Decision::Deny(Denial::RateLimited { admission: a, .. }) => {
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
        Decision::Deny(Denial::Budget { denial, rpm, .. }) => {
            let mut r = budget_denied(denial, now);
            if let (Some(a), Some(HttpResponse::DeniedResponse(d))) = (rpm, r.http_response.as_mut()) {
                d.headers.extend(rpm_headers(a));
            }
            r
        }
        Decision::Deny(Denial::Internal(_)) => internal_error(),
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

fn string_value(s: &str) -> Value {
    Value { kind: Some(Kind::StringValue(s.to_string())) }
}

fn allow(a: &Admitted) -> CheckResponse {
    let inbound = &a.gateway.inbound;
    let upstream = a.gateway.upstream.as_ref();
    let mut ok = OkHttpResponse::default();
    match inbound.location {
        KeyLocation::Header => {
            // Envoy removes after it sets: never remove the header we are about to set.
            if upstream.is_none_or(|u| u.header_name != inbound.key_name) {
                ok.headers_to_remove.push(inbound.key_name.clone());
            }
        }
        KeyLocation::Query => ok.query_parameters_to_remove.push(inbound.key_name.clone()),
    }
    if let Some(u) = upstream {
        ok.headers.push(set_header(&u.header_name, &u.value));
    }
    if let Some(rpm) = &a.rpm {
        ok.response_headers_to_add.extend(rpm_headers(rpm));
    }
    // Metering reads response bodies: ask the provider for an uncompressed one.
    ok.headers.push(set_header("accept-encoding", "identity"));
    let mut fields = std::collections::HashMap::with_capacity(3);
    fields.insert("key_id".to_string(), string_value(&a.key.id.to_string()));
    fields.insert("gateway".to_string(), string_value(&a.gateway.name));
    if let Some(r) = a.reservation {
        fields.insert("reservation".to_string(), string_value(&r.to_string()));
    }
    CheckResponse {
        status: Some(rpc::Status { code: RPC_OK, ..Default::default() }),
        http_response: Some(HttpResponse::OkResponse(ok)),
        dynamic_metadata: Some(Struct { fields }),
    }
}
