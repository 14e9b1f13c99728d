//! End to end through a real Envoy: what clients see, and what the upstream receives.

mod common;

use chrono::Duration;
use common::*;
use portcullis::pb;

const DEMO: &str = "demo.gateway.local";
const OTHER: &str = "other.gateway.local";
const PATH: &str = "/v1/chat/completions";
const INVALID: &str =
    r#"{"error":{"message":"Invalid authentication token","type":"invalid_request_error","code":"invalid_api_key"}}"#;
const MISSING: &str =
    r#"{"error":{"message":"Missing authentication token","type":"invalid_request_error","code":"missing_api_key"}}"#;

fn assert_denied(r: &common::http::Response, status: u16, body: &str) {
    assert_eq!(r.status, status, "body: {}", r.body);
    assert_eq!(r.body, body);
    assert_eq!(r.header("content-type"), Some("application/json"));
}

async fn gateway_with_provider_key(gw: &mut Gateways, name: &str, inbound: Option<pb::InboundAuth>) {
    gw.create_gateway(pb::CreateGatewayRequest {
        name: name.into(),
        inbound_auth: inbound,
        upstream_auth: Some(pb::UpstreamAuth {
            header_name: "authorization".into(),
            value: "Bearer sk-provider-secret".into(),
            value_set: false,
        }),
        default_reservation_tokens: 0,
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn allowed_request_reaches_upstream_with_provider_key_and_without_client_key() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gateway_with_provider_key(&mut gw, "demo", None).await;
    let (key, secret) = create_key(&mut keys, "demo", "token-user01").await;

    let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["usage"]["completion_tokens"], 30);

    let received = stack.upstream.received().await;
    assert_eq!(received.len(), 1);
    let headers = &received[0]["headers"];
    assert_eq!(headers["authorization"], "Bearer sk-provider-secret");
    assert!(headers.get("x-api-key").is_none(), "client key leaked upstream: {headers}");
    assert_eq!(received[0]["path"], PATH);
    let as_text = received[0].to_string();
    assert!(!as_text.contains(&secret), "the client secret reached the upstream");
    assert!(!as_text.contains(&key.id), "nothing of ours but the provider key goes upstream");
}

#[tokio::test]
async fn missing_invalid_and_cross_gateway_keys_are_refused() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gw.create_gateway(gateway_req("other")).await.unwrap();
    let (_, demo_secret) = create_key(&mut keys, "demo", "demo-key").await;

    assert_denied(&stack.envoy.send(DEMO, PATH, &[]).await, 401, MISSING);
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", "   ")]).await, 401, MISSING);
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", "pcs_not-a-real-key")]).await, 401, INVALID);
    assert_denied(
        &stack.envoy.send(DEMO, PATH, &[("x-api-key", "sk-some-other-providers-key-123")]).await,
        401,
        INVALID,
    );
    let mut typo = demo_secret.clone();
    typo.replace_range(20..21, if &typo[20..21] == "a" { "b" } else { "a" });
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &typo)]).await, 401, INVALID);
    // A valid key of gateway demo is not a key of gateway other.
    assert_denied(&stack.envoy.send(OTHER, PATH, &[("x-api-key", &demo_secret)]).await, 401, INVALID);
    assert!(stack.upstream.received().await.is_empty(), "no refused request reaches the upstream");
    assert_eq!(stack.envoy.send(DEMO, PATH, &[("x-api-key", &demo_secret)]).await.status, 200);
}

#[tokio::test]
async fn key_lifecycle_disable_reenable_expire_delete() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let expires = portcullis_ts(stack.server.clock.as_ref(), Duration::hours(1));
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "token-user01".into(),
            limits: None,
            expires_at: Some(expires),
        })
        .await
        .unwrap()
        .into_inner();
    let (id, secret) = (r.key.unwrap().id, r.secret);
    let auth = [("x-api-key", secret.as_str())];
    let send = || stack.envoy.send(DEMO, PATH, &auth);

    assert_eq!(send().await.status, 200);
    let set_enabled = |enabled| pb::UpdateKeyRequest { id: id.clone(), enabled: Some(enabled), ..Default::default() };
    let k = keys.update_key(set_enabled(false)).await.unwrap().into_inner();
    assert_eq!(k.status, pb::KeyStatus::Disabled as i32);
    assert_denied(&send().await, 401, INVALID);
    let k = keys.update_key(set_enabled(true)).await.unwrap().into_inner();
    assert_eq!(k.status, pb::KeyStatus::Active as i32);
    assert_eq!(send().await.status, 200);

    stack.server.clock.advance(Duration::hours(1));
    assert_denied(&send().await, 401, INVALID);
    let k = keys.get_key(pb::GetKeyRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(k.status, pb::KeyStatus::Expired as i32);
    let k = keys
        .update_key(pb::UpdateKeyRequest { id: id.clone(), clear_expires_at: true, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(k.status, pb::KeyStatus::Active as i32);
    assert_eq!(send().await.status, 200);

    keys.delete_key(pb::DeleteKeyRequest { id: id.clone() }).await.unwrap();
    assert_denied(&send().await, 401, INVALID);
    assert_eq!(stack.upstream.received().await.len(), 3);
}

fn portcullis_ts(clock: &portcullis::domain::clock::ManualClock, after: Duration) -> prost_types::Timestamp {
    use portcullis::domain::clock::Clock;
    let t = clock.now() + after;
    prost_types::Timestamp { seconds: t.timestamp(), nanos: 0 }
}

#[tokio::test]
async fn authorization_bearer_header_is_replaced_by_the_provider_key() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    let inbound = pb::InboundAuth { key_name: "Authorization".into(), location: pb::KeyLocation::Header as i32 };
    gateway_with_provider_key(&mut gw, "demo", Some(inbound)).await;
    let (_, secret) = create_key(&mut keys, "demo", "sdk").await;

    // What the OpenAI SDK sends.
    let r = stack.envoy.send(DEMO, PATH, &[("Authorization", &format!("Bearer {secret}"))]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = stack.upstream.received().await;
    assert_eq!(received[0]["headers"]["authorization"], "Bearer sk-provider-secret");
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await, 401, MISSING);
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("authorization", "Bearer pcs_wrong")]).await, 401, INVALID);
}

#[tokio::test]
async fn authorization_header_without_provider_key_is_removed() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    let inbound = pb::InboundAuth { key_name: "authorization".into(), location: pb::KeyLocation::Header as i32 };
    gw.create_gateway(pb::CreateGatewayRequest {
        name: "demo".into(),
        inbound_auth: Some(inbound),
        ..Default::default()
    })
    .await
    .unwrap();
    let (_, secret) = create_key(&mut keys, "demo", "sdk").await;
    let r = stack.envoy.send(DEMO, PATH, &[("authorization", &format!("bearer   {secret} "))]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = stack.upstream.received().await;
    assert!(received[0]["headers"].get("authorization").is_none(), "{}", received[0]);
}

#[tokio::test]
async fn query_parameter_key_is_accepted_and_stripped() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    let inbound = pb::InboundAuth { key_name: "api_key".into(), location: pb::KeyLocation::Query as i32 };
    gateway_with_provider_key(&mut gw, "demo", Some(inbound)).await;
    let (_, secret) = create_key(&mut keys, "demo", "query-client").await;

    let r = stack.envoy.send(DEMO, &format!("{PATH}?api-version=1&api_key={secret}&x=y"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = stack.upstream.received().await;
    let path = received[0]["path"].as_str().unwrap();
    assert!(!path.contains(&secret), "key left in the upstream URL: {path}");
    assert!(path.starts_with(PATH) && path.contains("api-version=1") && path.contains("x=y"), "{path}");
    assert_eq!(received[0]["headers"]["authorization"], "Bearer sk-provider-secret");
    let entry = stack.envoy.access_log_entry(|v| v["status"] == 200).await;
    assert_eq!(entry["path"], PATH, "the access log leaves the query (and its key) out");
    // In a header it is not where this gateway looks.
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await, 401, MISSING);
}

#[tokio::test]
async fn gateway_changes_apply_to_the_next_request() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (_, secret) = create_key(&mut keys, "demo", "k").await;
    assert_eq!(stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await.status, 200);
    gw.update_gateway(pb::UpdateGatewayRequest {
        name: "demo".into(),
        inbound_auth: Some(pb::InboundAuth { key_name: "x-portcullis-key".into(), location: 0 }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await, 401, MISSING);
    assert_eq!(stack.envoy.send(DEMO, PATH, &[("X-Portcullis-Key", &secret)]).await.status, 200);
    let received = stack.upstream.received().await;
    assert!(received[1]["headers"].get("x-portcullis-key").is_none());
    gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: true }).await.unwrap();
    let r = stack.envoy.send(DEMO, PATH, &[("x-portcullis-key", &secret)]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["message"], "gateway 'demo' is not configured");
}

#[tokio::test]
async fn unknown_or_unnamed_gateway_fails_closed_with_503() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (_, secret) = create_key(&mut keys, "demo", "k").await;

    let r = stack.envoy.send("ghost.gateway.local", PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.header("content-type"), Some("application/json"));
    assert_eq!(r.json()["error"]["message"], "gateway 'ghost' is not configured");
    let r = stack.envoy.send("unrouted.example", PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"]["message"], "gateway '' is not configured");
    assert!(stack.upstream.received().await.is_empty());
}

#[tokio::test]
async fn requests_per_minute_limit_stops_at_exactly_n_with_rate_limit_headers() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "rpm-3".into(),
            limits: Some(pb::Limits { requests_per_minute: Some(3), ..Default::default() }),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let auth = [("x-api-key", r.secret.as_str())];
    for remaining in ["2", "1", "0"] {
        let r = stack.envoy.send(DEMO, PATH, &auth).await;
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.header("x-ratelimit-limit-requests"), Some("3"));
        assert_eq!(r.header("x-ratelimit-remaining-requests"), Some(remaining));
    }
    let denied = stack.envoy.send(DEMO, PATH, &auth).await;
    assert_eq!(denied.status, 429, "{}", denied.body);
    assert_eq!(denied.header("content-type"), Some("application/json"));
    assert_eq!(denied.json()["error"]["type"], "rate_limit_error");
    assert_eq!(denied.json()["error"]["code"], "rate_limit_exceeded");
    assert!(denied.json()["error"]["message"].as_str().unwrap().contains("3 requests per minute"));
    assert_eq!(denied.header("retry-after"), Some("60"));
    assert_eq!(denied.header("x-ratelimit-limit-requests"), Some("3"));
    assert_eq!(denied.header("x-ratelimit-remaining-requests"), Some("0"));
    assert_eq!(denied.header("x-ratelimit-reset-requests"), Some("60s"));

    // Denied requests use no slot: the window frees exactly 60 s after the first admission.
    stack.server.clock.advance(Duration::seconds(59));
    let denied = stack.envoy.send(DEMO, PATH, &auth).await;
    assert_eq!((denied.status, denied.header("retry-after")), (429, Some("1")));
    stack.server.clock.advance(Duration::seconds(1));
    let r = stack.envoy.send(DEMO, PATH, &auth).await;
    assert_eq!(r.status, 200);
    // All three earlier admissions (same instant on the manual clock) have left together.
    assert_eq!(r.header("x-ratelimit-remaining-requests"), Some("2"));
    assert_eq!(stack.upstream.received().await.len(), 4, "only admitted requests reach the upstream");

    // Keys without a limit get no rate-limit headers.
    let (_, free) = create_key(&mut keys, "demo", "unlimited").await;
    let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &free)]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-ratelimit-limit-requests"), None);
}

#[tokio::test]
async fn a_wall_clock_step_does_not_free_request_slots() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "rpm-1".into(),
            limits: Some(pb::Limits { requests_per_minute: Some(1), ..Default::default() }),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let auth = [("x-api-key", r.secret.as_str())];
    assert_eq!(stack.envoy.send(DEMO, PATH, &auth).await.status, 200);
    // The host's clock is stepped (NTP, an operator) 10 minutes forward: no time passed.
    use portcullis::domain::clock::Clock;
    let clock = &stack.server.clock;
    clock.set(clock.now() + Duration::minutes(10));
    let denied = stack.envoy.send(DEMO, PATH, &auth).await;
    assert_eq!((denied.status, denied.header("retry-after")), (429, Some("60")), "{}", denied.body);
    // Stepped back an hour: the slot frees after 60 s of elapsed time all the same.
    clock.set(clock.now() - Duration::hours(1));
    clock.advance(Duration::seconds(60));
    assert_eq!(stack.envoy.send(DEMO, PATH, &auth).await.status, 200);
}

#[tokio::test]
async fn check_answers_from_memory_while_the_database_is_unavailable() {
    use sqlx::Connection;
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, secret) = create_key(&mut keys, "demo", "resilient").await;

    // Another process holds the database exclusively: every write of portcullis waits
    // (busy timeout), then fails.
    let url = format!("sqlite://{}", stack.server.dir.path().join("portcullis.db").display());
    let mut lock = sqlx::sqlite::SqliteConnection::connect(&url).await.unwrap();
    sqlx::query("BEGIN EXCLUSIVE").execute(&mut lock).await.unwrap();

    // Envoy gives ext_authz 0.5 s: a Check that touched the database would time out (503).
    for _ in 0..5 {
        let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", "pcs_nope")]).await, 401, INVALID);
    let disable = pb::UpdateKeyRequest { id: key.id.clone(), enabled: Some(false), ..Default::default() };
    let s = keys.update_key(disable.clone()).await.unwrap_err();
    assert_eq!(s.code(), tonic::Code::Unavailable, "{}", s.message());
    assert!(!s.message().contains("locked"), "driver messages stay in the log: {}", s.message());
    // The failed write changed nothing: the key still works.
    assert_eq!(stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await.status, 200);

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    let k = keys.get_key(pb::GetKeyRequest { id: key.id.clone() }).await.unwrap().into_inner();
    assert!(k.enabled, "no half-written row");
    keys.update_key(disable).await.unwrap();
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await, 401, INVALID);
}

#[tokio::test]
async fn several_authz_threads_serve_envoy() {
    let stack = Stack::start_full(&["--authz-threads", "3"], |c| c).await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, secret) = create_key(&mut keys, "demo", "threads").await;
    for _ in 0..10 {
        assert_eq!(stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await.status, 200);
    }
    keys.update_key(pb::UpdateKeyRequest { id: key.id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    assert_denied(&stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await, 401, INVALID);
    let usage = eventually("10 metered requests", std::time::Duration::from_secs(10), || {
        let mut keys = keys.clone();
        let id = key.id.clone();
        async move {
            let u = keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.unwrap().into_inner();
            (u.requests == 10).then_some(u)
        }
    })
    .await;
    assert_eq!(usage.total_tokens, 420);
}

#[tokio::test]
async fn disguised_or_repeated_query_key_names_are_refused_and_never_reach_the_upstream() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    let inbound = pb::InboundAuth { key_name: "api_key".into(), location: pb::KeyLocation::Query as i32 };
    gateway_with_provider_key(&mut gw, "demo", Some(inbound)).await;
    let (_, k) = create_key(&mut keys, "demo", "query-client").await;

    // Envoy removes only the literal `api_key`: each of these would have carried the key
    // (or a copy of it) to the provider.
    for (query, headers) in [
        (format!("api%5Fkey={k}"), vec![]),
        (format!("api%5fkey={k}&x=1"), vec![]),
        (format!("API_KEY={k}"), vec![]),
        (format!("api_key={k}&api%5Fkey={k}"), vec![]),
        (format!("api_key={k}&api_key={k}"), vec![]),
        (format!("x=1;api_key={k}"), vec![]),
        (format!("api_key+={k}"), vec![]),
        (format!("api_key={k}&note={k}"), vec![]),
        (format!("api_key={k}"), vec![("x-api-key", k.clone())]),
        (format!("api_key={k}"), vec![("api_key", k.clone())]),
    ] {
        let h: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let r = stack.envoy.send(DEMO, &format!("{PATH}?{query}"), &h).await;
        assert_denied(&r, 401, INVALID);
    }
    assert!(stack.upstream.received().await.is_empty(), "no refused request reaches the upstream");

    let r = stack.envoy.send(DEMO, &format!("{PATH}?api_key={k}&x=y"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = stack.upstream.received().await;
    assert_eq!(received.len(), 1);
    assert_eq!(received[0]["path"], format!("{PATH}?x=y"));
    assert!(!received[0].to_string().contains(&k), "the key reached the upstream: {}", received[0]);
}

/// The loopback config with ext_authz sending `header_map` (one entry per header line)
/// instead of `headers` (a header sent twice joined with `,`).
fn raw_headers(config: String) -> String {
    let at = "              status_on_error: {code: ServiceUnavailable}\n";
    assert!(config.contains(at));
    config.replace(at, &format!("{at}              encode_raw_headers: true\n"))
}

async fn key_header_sent_twice_is_refused(stack: Stack) {
    let (mut gw, mut keys) = stack.server.clients().await;
    gateway_with_provider_key(&mut gw, "demo", None).await;
    let (_, k) = create_key(&mut keys, "demo", "twice").await;
    let (_, other) = create_key(&mut keys, "demo", "other").await;

    for second in [k.as_str(), other.as_str(), "", "pcs_not-a-key"] {
        let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &k), ("x-api-key", second)]).await;
        assert_denied(&r, 401, INVALID);
        let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", second), ("X-Api-Key", &k)]).await;
        assert_denied(&r, 401, INVALID);
    }
    assert!(stack.upstream.received().await.is_empty());
    // Once is fine, and the provider sees neither key.
    assert_eq!(stack.envoy.send(DEMO, PATH, &[("x-api-key", &k)]).await.status, 200);
    let received = stack.upstream.received().await;
    assert!(!received[0].to_string().contains(&k), "{}", received[0]);
}

#[tokio::test]
async fn a_key_header_sent_twice_is_refused_when_envoy_joins_headers() {
    key_header_sent_twice_is_refused(Stack::start().await).await;
}

#[tokio::test]
async fn a_key_header_sent_twice_is_refused_when_envoy_sends_raw_headers() {
    key_header_sent_twice_is_refused(Stack::start_with(raw_headers).await).await;
}

#[tokio::test]
async fn a_key_in_a_second_header_is_refused_unless_envoy_overwrites_it() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    gateway_with_provider_key(&mut gw, "other", None).await;
    let (_, k) = create_key(&mut keys, "demo", "sdk").await;
    let (_, o) = create_key(&mut keys, "other", "sdk").await;
    // No provider key: `authorization` would reach the provider as it came.
    let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &k), ("authorization", &format!("Bearer {k}"))]).await;
    assert_denied(&r, 401, INVALID);
    let r = stack.envoy.send(DEMO, &format!("{PATH}?key={k}"), &[("x-api-key", &k)]).await;
    assert_denied(&r, 401, INVALID);
    assert!(stack.upstream.received().await.is_empty());
    // The provider key replaces `authorization`: a copy there is harmless.
    let r = stack.envoy.send(OTHER, PATH, &[("x-api-key", &o), ("authorization", &format!("Bearer {o}"))]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = stack.upstream.received().await;
    assert_eq!(received[0]["headers"]["authorization"], "Bearer sk-provider-secret");
    assert!(!received[0].to_string().contains(&o), "{}", received[0]);
}

#[tokio::test]
async fn a_stream_with_a_huge_event_is_read_to_its_usage() {
    const HUGE: usize = 6 * 1024 * 1024;
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, k) = create_key(&mut keys, "demo", "big-stream").await;

    // One event of 6 MiB of `data:` lines with no blank line, then the usage chunk.
    let padding = HUGE.to_string();
    let headers = [("x-api-key", k.as_str()), ("x-fake-sse-padding", padding.as_str()), ("x-fake-usage", "7,11")];
    let body = r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#;
    let r = stack.envoy.post(DEMO, PATH, &headers, body).await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() > HUGE, "the upstream sent {} bytes", r.body.len());

    let usage = eventually("the large stream metered", std::time::Duration::from_secs(20), || {
        let mut keys = keys.clone();
        let id = key.id.clone();
        async move {
            let u = keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.unwrap().into_inner();
            (u.requests == 1).then_some(u)
        }
    })
    .await;
    // Read through in constant memory: the usage chunk after it counts.
    assert_eq!((usage.prompt_tokens, usage.completion_tokens), (7, 11));
}
