//! What the benches share: a chat-completion CheckRequest as Envoy sends it (reference
//! config: gateway in `context_extensions`, the body included), and ports for the
//! servers they start.
#![allow(dead_code)]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use prost::Message;

/// The chat completion every bench's Check carries.
pub const CHAT_BODY: &str =
    r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#;

/// A CheckRequest for `secret` on `gateway`, encoded.
pub fn check_request(secret: &str, gateway: &str) -> Vec<u8> {
    let authority = format!("{gateway}.gateway.local");
    let length = CHAT_BODY.len().to_string();
    let headers: HashMap<String, String> = [
        (":authority", authority.as_str()),
        (":method", "POST"),
        (":path", "/v1/chat/completions"),
        (":scheme", "http"),
        ("content-type", "application/json"),
        ("content-length", length.as_str()),
        ("user-agent", "OpenAI/Python 1.54.0"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "3f1c5e2a-7d4b-4c1e-9a6f-0b8d2e4f6a10"),
        ("x-api-key", secret),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            context_extensions: HashMap::from([("gateway".to_string(), gateway.to_string())]),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    host: authority.clone(),
                    scheme: "http".into(),
                    headers,
                    body: CHAT_BODY.into(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
    .encode_to_vec()
}

/// A port below Linux's ephemeral range (where outgoing connections never take one),
/// free when asked, never the same one twice in a process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 10_000) as u16;
    loop {
        let port = base + NEXT.fetch_add(1, Ordering::Relaxed);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Waits until something listens on `port` (30 s at most).
pub fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// An enabled key of `gateway_id` for `secret`, with `limits`, as the view holds it.
pub fn key(
    gateway_id: uuid::Uuid,
    name: String,
    secret: &portcullis::domain::secret::Secret,
    limits: portcullis::domain::key::Limits,
) -> (portcullis::domain::key::ApiKey, Vec<portcullis::domain::view::KeySecret>) {
    let key = portcullis::domain::key::ApiKey {
        id: uuid::Uuid::now_v7(),
        gateway_id,
        name,
        prefix: secret.display_prefix(),
        enabled: true,
        legacy: false,
        limits,
        created_at: chrono::Utc::now(),
        expires_at: None,
        last_used_at: None,
    };
    (key, vec![portcullis::domain::view::KeySecret::current(secret.hash())])
}
