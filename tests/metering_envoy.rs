//! Limits and metering end to end through a real Envoy: usage read from JSON and SSE
//! responses, token and USD budgets with resets, reservations under concurrency,
//! legacy keys and rotation.

mod common;

use std::time::Duration as StdDuration;

use chrono::Duration;
use common::*;
use portcullis::pb;
use tonic::Code;

const DEMO: &str = "demo.gateway.local";
const CHAT: &str = "/v1/chat/completions";

fn chat(stream: bool) -> String {
    format!(r#"{{"model":"gpt-4o-mini","stream":{stream},"messages":[{{"role":"user","content":"hi"}}]}}"#)
}

async fn set_mini_price(server: &TestServer) {
    let ch = server.channel().await;
    let mut prices = pb::pricing_service_client::PricingServiceClient::with_interceptor(
        ch,
        portcullis::cli::BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    let p = prices
        .set_model_price(pb::SetModelPriceRequest {
            price: Some(pb::ModelPrice {
                model: "gpt-4o-mini".into(),
                input_usd_per_million: "0.15".into(),
                output_usd_per_million: "0.60".into(),
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((p.input_usd_per_million.as_str(), p.output_usd_per_million.as_str()), ("0.15", "0.60"));
}

async fn key_with(keys: &mut Keys, name: &str, limits: pb::Limits) -> (String, String) {
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: name.into(),
            limits: Some(limits),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    (r.key.unwrap().id, r.secret)
}

async fn usage(keys: &mut Keys, id: &str) -> pb::KeyUsage {
    keys.get_key_usage(pb::GetKeyUsageRequest { id: id.into() }).await.unwrap().into_inner()
}

/// Waits until metering has recorded `n` requests for the key.
async fn metered(keys: &Keys, id: &str, n: u64) -> pb::KeyUsage {
    eventually(&format!("{n} metered requests"), StdDuration::from_secs(10), || {
        let mut keys = keys.clone();
        let id = id.to_string();
        async move {
            let u = usage(&mut keys, &id).await;
            (u.requests >= n).then_some(u)
        }
    })
    .await
}

async fn usage_matches_what_the_upstream_reported(stack: Stack) {
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    set_mini_price(&stack.server).await;
    let (id, secret) = key_with(&mut keys, "metered", pb::Limits::default()).await;
    let auth = |usage: &'static str| [("x-api-key", secret.clone()), ("x-fake-usage", usage.to_string())];
    let send = |path: &'static str, body: String, usage: &'static str| {
        let envoy = &stack.envoy;
        let h = auth(usage);
        async move {
            let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (*a, b.as_str())).collect();
            let mut h = h.clone();
            h.push(("accept-encoding", "gzip, br"));
            envoy.post(DEMO, path, &h, &body).await
        }
    };
    let r = send(CHAT, chat(false), "12,30").await;
    assert_eq!(r.status, 200, "{}", r.body);
    let r = send(CHAT, chat(true), "21,5").await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("\"usage\"") && r.body.contains("data: [DONE]"), "{}", r.body);
    let anthropic = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":64,"messages":[]}"#.to_string();
    assert_eq!(send("/v1/messages", anthropic, "25,15").await.status, 200);
    let anthropic = r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[]}"#.to_string();
    assert_eq!(send("/v1/messages", anthropic, "7,9").await.status, 200);

    let u = metered(&keys, &id, 4).await;
    assert_eq!(u.requests, 4);
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.total_tokens), (12 + 21 + 25 + 7, 30 + 5 + 15 + 9, 124));
    // Per response, rounded up to a micro-USD: 19.8 -> 20, 6.15 -> 7, 12.75 -> 13, 6.45 -> 7.
    assert_eq!(u.cost_usd, "0.000047");
    assert_eq!(u.reserved_tokens, 0);
    // Compressed bodies cannot be metered: the provider is asked for identity.
    let received = stack.upstream.received().await;
    assert!(received.iter().all(|r| r["headers"]["accept-encoding"] == "identity"), "{received:?}");
}

#[tokio::test]
async fn usage_matches_upstream_in_observability_mode() {
    usage_matches_what_the_upstream_reported(Stack::start().await).await;
}

#[tokio::test]
async fn usage_matches_upstream_in_blocking_mode() {
    let stack = Stack::start_with(|c| {
        assert!(c.contains("observability_mode: true"));
        c.replace("observability_mode: true", "observability_mode: false")
    })
    .await;
    usage_matches_what_the_upstream_reported(stack).await;
}

#[tokio::test]
async fn token_limit_stops_at_the_limit_and_frees_at_the_daily_reset() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let limits =
        pb::Limits { token_limit: Some(100), reset_period: pb::ResetPeriod::Daily as i32, ..Default::default() };
    let (id, secret) = key_with(&mut keys, "tokens", limits).await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "12,30")];
    // 0, 42, 84 tokens used before each: all under 100.
    for n in 1..=3 {
        assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await.status, 200);
        metered(&keys, &id, n).await;
    }
    let denied = stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await;
    assert_eq!(denied.status, 429, "{}", denied.body);
    assert_eq!(denied.json()["error"]["code"], "token_limit_exceeded");
    assert_eq!(denied.json()["error"]["type"], "rate_limit_error");
    assert!(denied.json()["error"]["message"].as_str().unwrap().contains("100 tokens"));
    // The manual clock is at 12:00 UTC: the next reset is 12 hours away.
    assert_eq!(denied.header("retry-after"), Some("43200"));
    let u = usage(&mut keys, &id).await;
    assert_eq!((u.requests, u.total_tokens), (3, 126));
    assert_eq!(u.last_deny_reason, "token_limit_exceeded");
    assert!(u.last_denied_at.is_some());
    assert_eq!(u.period_end.unwrap().seconds - u.period_start.unwrap().seconds, 86_400);

    // Raising the limit does not reset or inflate usage.
    keys.update_key(pb::UpdateKeyRequest {
        id: id.clone(),
        limits: Some(pb::Limits {
            token_limit: Some(200),
            reset_period: pb::ResetPeriod::Daily as i32,
            ..Default::default()
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(usage(&mut keys, &id).await.total_tokens, 126);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await.status, 200);
    metered(&keys, &id, 4).await;

    stack.server.clock.advance(Duration::hours(12));
    let u = usage(&mut keys, &id).await;
    assert_eq!((u.requests, u.total_tokens), (0, 0), "a new day");
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await.status, 200);
}

#[tokio::test]
async fn usd_limit_stops_at_the_budget_and_never_resets() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    set_mini_price(&stack.server).await;
    // Each response costs 20 micro-USD (12 prompt, 30 completion at $0.15/$0.60 per million).
    let (id, secret) =
        key_with(&mut keys, "usd", pb::Limits { cost_limit_usd: Some("0.00004".into()), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str())];
    let body = r#"{"model":"gpt-4o-mini","max_tokens":1,"messages":[]}"#;
    for n in 1..=2 {
        assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 200);
        metered(&keys, &id, n).await;
    }
    let denied = stack.envoy.post(DEMO, CHAT, &h, body).await;
    assert_eq!(denied.status, 429, "{}", denied.body);
    assert_eq!(denied.json()["error"]["code"], "budget_exceeded");
    assert!(denied.json()["error"]["message"].as_str().unwrap().contains("$0.00004"), "{}", denied.body);
    assert_eq!(denied.header("retry-after"), None, "RESET_PERIOD_NEVER sends no retry-after");
    let u = usage(&mut keys, &id).await;
    assert_eq!((u.cost_usd.as_str(), u.last_deny_reason.as_str()), ("0.00004", "budget_exceeded"));
    assert!(u.period_end.is_none());
    stack.server.clock.advance(Duration::days(40));
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 429);
}

#[tokio::test]
async fn reservations_bound_overshoot_under_concurrency() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "burst", pb::Limits { token_limit: Some(100), ..Default::default() }).await;
    // Each request asks for up to 50 completion tokens and uses 10 + 40 = 50 tokens.
    let body = r#"{"model":"gpt-4o-mini","max_tokens":50,"messages":[]}"#;
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "10,40"), ("x-fake-delay-ms", "300")];
    let all = futures_join(20, || stack.envoy.post(DEMO, CHAT, &h, body)).await;
    let admitted = all.iter().filter(|r| r.status == 200).count();
    let refused = all.iter().filter(|r| r.status == 429).count();
    assert_eq!(admitted + refused, 20, "{:?}", all.iter().map(|r| r.status).collect::<Vec<_>>());
    // Without reservations all 20 would pass while nothing was metered yet.
    assert_eq!(admitted, 2, "in-flight reservations hold the budget");
    let u = metered(&keys, &id, 2).await;
    assert_eq!(u.total_tokens, 100);
    assert_eq!(u.reserved_tokens, 0, "every reservation was settled");
}

/// Runs `n` copies of a request concurrently.
async fn futures_join<F, Fut>(n: usize, make: F) -> Vec<common::http::Response>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = common::http::Response>,
{
    let mut set = Vec::new();
    for _ in 0..n {
        set.push(make());
    }
    let mut out = Vec::new();
    let mut pinned: Vec<_> = set.into_iter().map(Box::pin).collect();
    // Poll all together.
    let results = std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out.iter().any(|(j, _)| *j == i) {
                continue;
            }
            match f.as_mut().poll(cx) {
                std::task::Poll::Ready(r) => out.push((i, r)),
                std::task::Poll::Pending => pending = true,
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(std::mem::take(&mut out)) }
    })
    .await;
    results.into_iter().map(|(_, r)| r).collect()
}

#[tokio::test]
async fn legacy_keys_authenticate_and_refuse_limits() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let import = |secret: &str, limits: Option<pb::Limits>| pb::ImportLegacyKeyRequest {
        gateway: "demo".into(),
        name: "legacy".into(),
        secret: secret.into(),
        limits,
    };
    let legacy_secret = "sk-legacy-0123456789abcdef";
    let s = keys
        .import_legacy_key(import(legacy_secret, Some(pb::Limits { token_limit: Some(5), ..Default::default() })))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("limits"));
    // A comma could never authenticate: Envoy joins a header sent twice with one.
    for bad in [
        "short-secret",
        "has spaces in it, sixteen+",
        "pcs_00000000000000000000000000000000000000",
        "sk-legacy,0123456789",
    ] {
        let s = keys.import_legacy_key(import(bad, None)).await.unwrap_err();
        assert_eq!(s.code(), Code::InvalidArgument, "{bad}");
        assert!(s.message().contains("secret"), "{}", s.message());
    }
    let key = keys.import_legacy_key(import(legacy_secret, None)).await.unwrap().into_inner();
    assert!(key.legacy);
    assert_eq!(key.prefix, "sk-leg");
    assert!(!format!("{key:?}").contains(legacy_secret));
    let dup = keys
        .import_legacy_key(pb::ImportLegacyKeyRequest { name: "again".into(), ..import(legacy_secret, None) })
        .await
        .unwrap_err();
    assert_eq!(dup.code(), Code::AlreadyExists);

    let r = stack.envoy.post(DEMO, CHAT, &[("x-api-key", legacy_secret)], &chat(false)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let s = keys
        .update_key(pb::UpdateKeyRequest {
            id: key.id.clone(),
            limits: Some(pb::Limits { requests_per_minute: Some(1), ..Default::default() }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!((s.code(), s.message().contains("limits")), (Code::InvalidArgument, true));
    let s = keys.rotate_key(pb::RotateKeyRequest { id: key.id.clone(), grace_period: None }).await.unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition);
    // Replacing it: a new key with limits, then disable the legacy one.
    keys.update_key(pb::UpdateKeyRequest { id: key.id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", legacy_secret)], &chat(false)).await.status, 401);
    metered(&keys, &key.id, 1).await;
}

#[tokio::test]
async fn rotation_keeps_the_old_secret_for_the_grace_period() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, old) = key_with(&mut keys, "rotating", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let send = |s: String| {
        let envoy = &stack.envoy;
        async move { envoy.post(DEMO, CHAT, &[("x-api-key", &s)], &chat(false)).await.status }
    };
    assert_eq!(send(old.clone()).await, 200);
    metered(&keys, &id, 1).await;

    let grace = prost_types::Duration { seconds: 300, nanos: 0 };
    let r =
        keys.rotate_key(pb::RotateKeyRequest { id: id.clone(), grace_period: Some(grace) }).await.unwrap().into_inner();
    let new = r.secret;
    let key = r.key.unwrap();
    assert_ne!(new, old);
    assert_eq!((key.id.as_str(), key.prefix.as_str()), (id.as_str(), &new[..12]));
    // One at a time: without max_tokens each request reserves what the key has left.
    assert_eq!(send(new.clone()).await, 200);
    metered(&keys, &id, 2).await;
    assert_eq!(send(old.clone()).await, 200, "the old secret works during the grace period");
    metered(&keys, &id, 3).await;
    stack.server.clock.advance(Duration::seconds(300));
    assert_eq!(send(old.clone()).await, 401, "and stops when it ends");
    assert_eq!(send(new.clone()).await, 200);
    let u = metered(&keys, &id, 4).await;
    assert_eq!(u.total_tokens, 4 * 42, "usage carries over");

    // Without a grace period the old secret stops at once.
    let r = keys.rotate_key(pb::RotateKeyRequest { id: id.clone(), grace_period: None }).await.unwrap().into_inner();
    assert_eq!(send(new).await, 401);
    assert_eq!(send(r.secret).await, 200);
    let s = keys
        .rotate_key(pb::RotateKeyRequest { id, grace_period: Some(prost_types::Duration { seconds: -1, nanos: 0 }) })
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
}

#[tokio::test]
async fn overview_reports_rpm_window_and_denials() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "rpm", pb::Limits { requests_per_minute: Some(2), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str())];
    for _ in 0..3 {
        stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await;
    }
    let u = metered(&keys, &id, 2).await;
    assert_eq!(u.requests_last_minute, 2);
    assert_eq!(u.last_deny_reason, "rate_limit_exceeded");
    assert_eq!(u.limits.unwrap().requests_per_minute, Some(2));
    keys.update_key(pb::UpdateKeyRequest { id: id.clone(), enabled: Some(false), ..Default::default() }).await.unwrap();
    stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await;
    assert_eq!(usage(&mut keys, &id).await.last_deny_reason, "disabled");
}

#[tokio::test]
async fn a_stream_without_usage_is_charged_its_reservation() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "sneaky", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":300,"messages":[]}"#;
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    let r = stack.envoy.post(DEMO, CHAT, &h, body).await;
    assert_eq!(r.status, 200);
    assert!(!r.body.contains("\"usage\":{"), "the upstream reported no usage: {}", r.body);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.reserved_tokens), (0, 300, 0), "charged max_tokens");
}

#[tokio::test]
async fn default_reservation_holds_the_budget_while_requests_are_in_flight() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(pb::CreateGatewayRequest {
        name: "demo".into(),
        default_reservation_tokens: 60,
        ..Default::default()
    })
    .await
    .unwrap();
    let limits = pb::Limits { token_limit: Some(100), requests_per_minute: Some(50), ..Default::default() };
    let (id, secret) = key_with(&mut keys, "held", limits).await;
    // No max_tokens in the body: each request holds the gateway's 60 tokens while in flight.
    let slow = [("x-api-key", secret.as_str()), ("x-fake-delay-ms", "2000"), ("x-fake-usage", "5,5")];
    let in_flight = async {
        futures_pair(stack.envoy.post(DEMO, CHAT, &slow, "{}"), stack.envoy.post(DEMO, CHAT, &slow, "{}")).await
    };
    let probe = async {
        // Once both are admitted (60, then the 40 left: a reservation never exceeds what
        // the key can still use), a third is refused until they finish.
        let held = eventually("both requests hold their reservation", StdDuration::from_secs(5), || {
            let mut keys = keys.clone();
            let id = id.clone();
            async move { (usage(&mut keys, &id).await.reserved_tokens == 100).then_some(()) }
        });
        held.await;
        stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], "{}").await
    };
    let ((a, b), third) = tokio::join!(in_flight, probe);
    assert_eq!((a.status, b.status), (200, 200));
    assert_eq!(third.status, 429, "{}", third.body);
    assert_eq!(third.json()["error"]["code"], "token_limit_exceeded");
    assert!(third.json()["error"]["message"].as_str().unwrap().contains("requests in flight"), "{}", third.body);
    assert_eq!(third.header("retry-after"), Some("1"));
    // The key has a requests-per-minute limit: its headers come with the budget 429, no slot taken.
    assert_eq!(third.header("x-ratelimit-limit-requests"), Some("50"));
    assert_eq!(third.header("x-ratelimit-remaining-requests"), Some("48"));
    let u = metered(&keys, &id, 2).await;
    assert_eq!((u.total_tokens, u.reserved_tokens, u.requests_last_minute), (20, 0, 2));
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], "{}").await.status, 200);
}

async fn futures_pair<A: std::future::Future, B: std::future::Future>(a: A, b: B) -> (A::Output, B::Output) {
    tokio::join!(a, b)
}

#[tokio::test]
async fn unpriced_models_count_tokens_at_cost_zero() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    set_mini_price(&stack.server).await;
    let (id, secret) = key_with(&mut keys, "mystery", pb::Limits::default()).await;
    let body = r#"{"model":"mystery-model-9000","messages":[]}"#;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], body).await.status, 200);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.total_tokens, u.cost_usd.as_str()), (42, "0.00"));
    // A dated variant of a priced model is priced.
    let body = r#"{"model":"gpt-4o-mini-2024-07-18","messages":[]}"#;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], body).await.status, 200);
    assert_eq!(metered(&keys, &id, 2).await.cost_usd, "0.00002");
}

#[tokio::test]
async fn a_reset_period_change_keeps_usage_across_a_restart() {
    let mut stack = Stack::start_full(&["--usage-flush-interval", "10ms"], |c| c).await;
    async fn rows(stack: &Stack, id: String) -> i64 {
        stack.server.db_count("SELECT COUNT(*) FROM key_usage WHERE key_id = ?", &id).await
    }
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let monthly =
        pb::Limits { token_limit: Some(10_000), reset_period: pb::ResetPeriod::Monthly as i32, ..Default::default() };
    let (id, secret) = key_with(&mut keys, "switch", monthly).await;
    let h = [("x-api-key", secret.as_str())];
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, "{}").await.status, 200);
    metered(&keys, &id, 1).await;
    eventually("this month's row", StdDuration::from_secs(5), || async {
        (rows(&stack, id.clone()).await == 1).then_some(())
    })
    .await;
    // MONTHLY -> NEVER: usage moves to a period that starts earlier, not reset, not inflated.
    let never = pb::Limits { token_limit: Some(10_000), ..Default::default() };
    keys.update_key(pb::UpdateKeyRequest { id: id.clone(), limits: Some(never), ..Default::default() }).await.unwrap();
    assert_eq!(usage(&mut keys, &id).await.total_tokens, 42);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, "{}").await.status, 200);
    metered(&keys, &id, 2).await;
    eventually("the never-resetting row", StdDuration::from_secs(5), || async {
        (rows(&stack, id.clone()).await == 2).then_some(())
    })
    .await;
    drop((gw, keys));
    stack.server.restart_with(&[]).await.unwrap();
    let (_, mut keys) = stack.server.clients().await;
    let u = usage(&mut keys, &id).await;
    assert_eq!((u.requests, u.total_tokens), (2, 84), "the row written last is the one loaded");
}

#[tokio::test]
async fn metrics_count_decisions_metering_and_unpriced_models() {
    let stack = Stack::start_full(&["--metrics-addr", "127.0.0.1:0"], |c| c).await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "m", pb::Limits { requests_per_minute: Some(1), ..Default::default() }).await;
    let body = r#"{"model":"mystery-model","messages":[]}"#;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], body).await.status, 200);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], body).await.status, 429);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[], body).await.status, 401);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", "pcs_nope")], body).await.status, 401);
    metered(&keys, &id, 1).await;
    let port = stack.server.running().metrics_addr.unwrap().port();
    let r = common::http::request(port, "GET", "metrics", "/metrics", &[], None).await;
    assert_eq!(r.status, 200);
    for line in [
        "portcullis_checks_total{decision=\"allow\"} 1",
        "portcullis_checks_total{decision=\"rate_limited\"} 1",
        "portcullis_checks_total{decision=\"missing_key\"} 1",
        "portcullis_checks_total{decision=\"invalid_key\"} 1",
        "portcullis_metered_responses_total 1",
        // Envoy meters the denials' local replies too (no metadata): not a misconfiguration.
        "portcullis_metering_without_metadata_total 0",
        "portcullis_metered_tokens_total{kind=\"completion\"} 30",
        "portcullis_unpriced_model_responses_total{model=\"mystery-model\"} 1",
        "portcullis_keys 1",
    ] {
        assert!(r.body.lines().any(|l| l == line), "no `{line}` in:\n{}", r.body);
    }
    assert_eq!(common::http::request(port, "GET", "metrics", "/other", &[], None).await.status, 404);
}

/// Answers the fake upstream holds now (`x-fake-hold`).
async fn upstream_held(stack: &Stack) -> u64 {
    let r = common::http::request(stack.upstream.port, "GET", "upstream", "/_fake/held", &[], None).await;
    serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["held"].as_u64().unwrap()
}

async fn release_upstream(stack: &Stack) {
    common::http::request(stack.upstream.port, "POST", "upstream", "/_fake/release", &[], Some("{}")).await;
}

#[tokio::test]
async fn streams_without_usage_are_never_free() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    // The gateway reserves nothing by default and the requests name no max_tokens.
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    set_mini_price(&stack.server).await;
    let (id, secret) =
        key_with(&mut keys, "free-rider", pb::Limits { token_limit: Some(100), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    let mut statuses = Vec::new();
    for n in 1..=5 {
        let r = stack.envoy.post(DEMO, CHAT, &h, &chat(true)).await;
        statuses.push(r.status);
        if r.status == 200 {
            assert!(!r.body.contains("\"usage\""), "{}", r.body);
            metered(&keys, &id, n).await;
        }
    }
    assert_eq!(statuses, [200, 429, 429, 429, 429], "the built-in reservation (capped at the 100 left) is charged");
    let u = usage(&mut keys, &id).await;
    // The prompt ("user", "hi": 6 bytes) is 2 tokens of it; the rest of the hold is charged
    // as completion.
    assert_eq!((u.requests, u.prompt_tokens, u.completion_tokens, u.reserved_tokens), (1, 2, 98, 0));

    // With a small reservation, the content that went through the meter is charged:
    // "Hello from the fake upstream." is 29 bytes, 8 tokens at 4 bytes a token, rounded up.
    let (id, secret) =
        key_with(&mut keys, "estimated", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    let tiny = |stream: bool| format!(r#"{{"model":"gpt-4o-mini","stream":{stream},"max_tokens":1,"messages":[]}}"#);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &tiny(false)).await.status, 200);
    let u = metered(&keys, &id, 1).await;
    // 8 tokens at $0.60 per million: 4.8 micro-USD, rounded up.
    assert_eq!((u.completion_tokens, u.cost_usd.as_str()), (8, "0.000005"), "JSON without usage");
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &tiny(true)).await.status, 200);
    let u = metered(&keys, &id, 2).await;
    assert_eq!(u.completion_tokens, 16, "the stream's five content deltas add up to the same 29 bytes");
}

#[tokio::test]
async fn a_huge_max_tokens_without_usage_keeps_the_budget_exhausted_across_a_restart() {
    let mut stack = Stack::start_full(&["--usage-flush-interval", "10ms"], |c| c).await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "huge", pb::Limits { token_limit: Some(100), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":18446744073709551615,"messages":[]}"#;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 200);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.completion_tokens, u.reserved_tokens), (100, 0), "the reservation was capped at what was left");
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 429);
    let sql = "SELECT COUNT(*) FROM key_usage WHERE key_id = ? AND completion_tokens = 100";
    eventually("the usage row", StdDuration::from_secs(5), || async {
        (stack.server.db_count(sql, &id).await == 1).then_some(())
    })
    .await;
    drop((gw, keys));
    stack.server.restart_with(&[]).await.unwrap();
    // The restarted server listens on a new port: an Envoy pointed at it.
    stack.envoy = Envoy::start(stack.server.authz_port(), stack.upstream.port).await;
    let (_, mut keys) = stack.server.clients().await;
    assert_eq!(usage(&mut keys, &id).await.total_tokens, 100);
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 429, "still exhausted after a restart");

    // A stored count that is impossible (negative: what a wrapped u64 was written as) is
    // read back as exhausted, never as empty.
    drop(keys);
    stack.server.stop().await;
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&stack.server.db_url).await.unwrap();
    sqlx::query("UPDATE key_usage SET completion_tokens = -1 WHERE key_id = ?").bind(&id).execute(&pool).await.unwrap();
    pool.close().await;
    stack.server.restart_with(&[]).await.unwrap();
    stack.envoy = Envoy::start(stack.server.authz_port(), stack.upstream.port).await;
    let (_, mut keys) = stack.server.clients().await;
    assert_eq!(usage(&mut keys, &id).await.completion_tokens, u64::MAX);
    let denied = stack.envoy.post(DEMO, CHAT, &h, body).await;
    assert_eq!((denied.status, denied.json()["error"]["code"].as_str()), (429, Some("token_limit_exceeded")));
}

#[tokio::test]
async fn an_open_stream_keeps_its_reservation_past_the_ttl() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "long", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":300,"messages":[]}"#;
    // The upstream sends the headers and the first chunk, then holds the stream open.
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1"), ("x-fake-hold", "after-first")];
    let shared = &stack.server.running().shared;
    let probe = async {
        eventually("the metering stream holds the reservation", StdDuration::from_secs(10), || async {
            (shared.limiters.meters.in_flight() == (1, 1)).then_some(())
        })
        .await;
        // Longer than the TTL passes while the stream is still open; the sweep runs.
        stack.server.clock.advance(Duration::minutes(11));
        let released = portcullis::upkeep::sweep(shared, Duration::minutes(10));
        let reserved = usage(&mut keys.clone(), &id).await.reserved_tokens;
        release_upstream(&stack).await;
        (released, reserved)
    };
    let (r, (released, reserved)) = tokio::join!(stack.envoy.post(DEMO, CHAT, &h, body), probe);
    assert_eq!(r.status, 200);
    assert_eq!((released, reserved), (0, 300), "the open stream keeps its reservation");
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.completion_tokens, u.reserved_tokens), (300, 0), "and is charged it when it ends");
}

#[tokio::test]
async fn a_response_that_starts_after_its_reservation_expired_is_still_charged_it() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "late", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":300,"messages":[]}"#;
    // The upstream holds its answer: no metering stream yet.
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1"), ("x-fake-hold", "before")];
    let shared = &stack.server.running().shared;
    let probe = async {
        eventually("the upstream holds the request", StdDuration::from_secs(10), || async {
            (upstream_held(&stack).await == 1).then_some(())
        })
        .await;
        stack.server.clock.advance(Duration::minutes(11));
        let released = portcullis::upkeep::sweep(shared, Duration::minutes(10));
        let reserved = usage(&mut keys.clone(), &id).await.reserved_tokens;
        release_upstream(&stack).await;
        (released, reserved)
    };
    let (r, (released, reserved)) = tokio::join!(stack.envoy.post(DEMO, CHAT, &h, body), probe);
    assert_eq!(r.status, 200);
    assert_eq!((released, reserved), (1, 0), "no stream was open: the sweep released it");
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.completion_tokens, u.reserved_tokens), (300, 0), "the late stream is still charged its reservation");
}

#[tokio::test]
async fn metering_without_ext_authz_metadata_is_counted() {
    let forwarding = "              metadata_options:\n                forwarding_namespaces:\n                  untyped: [\"envoy.filters.http.ext_authz\"]\n";
    let stack = Stack::start_full(&["--metrics-addr", "127.0.0.1:0"], |c| {
        assert!(c.contains(forwarding));
        c.replace(forwarding, "")
    })
    .await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "unmetered", pb::Limits::default()).await;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], &chat(false)).await.status, 200);
    let port = stack.server.running().metrics_addr.unwrap().port();
    eventually("the misconfiguration counted", StdDuration::from_secs(10), || async {
        let r = common::http::request(port, "GET", "metrics", "/metrics", &[], None).await;
        r.body.lines().any(|l| l == "portcullis_metering_without_metadata_total 1").then_some(())
    })
    .await;
    assert_eq!(usage(&mut keys, &id).await.requests, 0, "nothing to charge it to");
}

#[tokio::test]
async fn a_stream_cut_after_partial_usage_is_charged_what_it_carried() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "cut", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    // Anthropic's message_start says 25 input and 1 output token; the text delta follows
    // ("Hello from the fake upstream.", 29 bytes: 8 tokens); then the connection is cut
    // before message_delta would report the output.
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "25,500"), ("x-fake-cut-after", "3")];
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":1,"messages":[]}"#;
    let r = common::http::try_request(
        stack.envoy.port,
        "POST",
        DEMO,
        "/v1/messages",
        &[h[0], h[1], h[2], ("content-type", "application/json")],
        Some(body),
    )
    .await;
    assert!(r.is_none_or(|r| !r.body.contains("message_delta")), "the stream was cut");
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.reserved_tokens), (25, 8, 0), "not the 1 reported so far");
}

#[tokio::test]
async fn a_response_without_usage_is_charged_its_prompt_too() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "long-prompt", pb::Limits { token_limit: Some(10_000), ..Default::default() }).await;
    // 404 bytes of prompt text (the content and "user"): 101 tokens at 4 bytes a token.
    let body = format!(
        r#"{{"model":"gpt-4o-mini","max_tokens":1,"messages":[{{"role":"user","content":"{}"}}]}}"#,
        "a".repeat(400)
    );
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &body).await.status, 200);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.reserved_tokens), (101, 8, 0));
}

#[tokio::test]
async fn an_anthropic_stream_that_errors_after_message_start_is_charged_its_content() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "overloaded", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    // message_start (25 in, 1 out so far), the text delta (29 bytes: 8 tokens), then an
    // `error` event; the stream itself ends cleanly, without message_delta.
    let h = [
        ("x-api-key", secret.as_str()),
        ("x-fake-usage", "25,500"),
        ("x-fake-error-after", "3"),
        ("content-type", "application/json"),
    ];
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":1,"messages":[]}"#;
    let r = common::http::request(stack.envoy.port, "POST", DEMO, "/v1/messages", &h, Some(body)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.contains("overloaded_error") && !r.body.contains("message_delta"), "{}", r.body);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens), (25, 8), "not the 1 output token message_start said");
}

#[tokio::test]
async fn a_usd_only_key_holds_its_budget_for_an_unpriced_model() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    set_mini_price(&stack.server).await;
    // $0.0001: 100 micro-USD. 1000 output tokens of a model without a price reserve at the
    // book's highest output price ($0.60 per million): 600, capped at the 100 left.
    let (id, secret) =
        key_with(&mut keys, "usd-only", pb::Limits { cost_limit_usd: Some("0.0001".into()), ..Default::default() })
            .await;
    let body = r#"{"model":"no-price-model","max_tokens":1000,"messages":[]}"#;
    let held = [("x-api-key", secret.as_str()), ("x-fake-hold", "before"), ("x-fake-usage", "5,5")];
    let probe = async {
        eventually("the first request is held upstream", StdDuration::from_secs(10), || async {
            (upstream_held(&stack).await == 1).then_some(())
        })
        .await;
        let reserved = usage(&mut keys.clone(), &id).await.reserved_usd;
        let second = stack.envoy.post(DEMO, CHAT, &[("x-api-key", secret.as_str())], body).await;
        release_upstream(&stack).await;
        (reserved, second)
    };
    let (first, (reserved, second)) = tokio::join!(stack.envoy.post(DEMO, CHAT, &held, body), probe);
    assert_eq!(first.status, 200);
    assert_eq!(reserved, "0.0001", "the whole budget is held while it is in flight");
    assert_eq!((second.status, second.json()["error"]["code"].as_str()), (429, Some("budget_exceeded")));
    // And its usage is not free: 5 + 5 tokens at the highest prices ($0.15 and $0.60 per
    // million), 3.75 micro-USD rounded up.
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens, u.cost_usd.as_str()), (5, 5, "0.000004"));
}

#[tokio::test]
async fn a_json_body_larger_than_any_buffer_is_read_to_its_usage() {
    let stack = Stack::start().await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) = key_with(&mut keys, "big", pb::Limits::default()).await;
    // 20 MiB of content, then the usage.
    let h = [("x-api-key", secret.as_str()), ("x-fake-json-padding", "20971520"), ("x-fake-usage", "7,11")];
    let r = stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await;
    assert_eq!(r.status, 200);
    assert!(r.body.len() > 20 << 20);
    let u = metered(&keys, &id, 1).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens), (7, 11));
}

#[tokio::test]
async fn a_response_whose_headers_envoy_does_not_send_is_still_charged() {
    let stack = Stack::start_with(|c| {
        assert!(c.contains("response_header_mode: SEND"));
        c.replace("response_header_mode: SEND", "response_header_mode: SKIP")
    })
    .await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with(&mut keys, "no-status", pb::Limits { token_limit: Some(1000), ..Default::default() }).await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-no-usage", "1")];
    let body = r#"{"model":"gpt-4o-mini","stream":true,"max_tokens":1,"messages":[]}"#;
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, body).await.status, 200);
    let u = metered(&keys, &id, 1).await;
    assert_eq!(u.completion_tokens, 8, "the stream's content, read without its content-type");
    // With usage reported, it is read as well.
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "3,4")];
    assert_eq!(stack.envoy.post(DEMO, CHAT, &h, &chat(false)).await.status, 200);
    let u = metered(&keys, &id, 2).await;
    assert_eq!((u.prompt_tokens, u.completion_tokens), (3, 12));
}
