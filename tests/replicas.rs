//! Several replicas on one PostgreSQL and one Redis behaving as one. Each test on a fresh
//! database of the local server (`PORTCULLIS_TEST_POSTGRES`) and the test Redis
//! (`PORTCULLIS_TEST_REDIS`) or a private one it stops and starts. The first tests run two
//! replicas in process (a manual clock, Check over gRPC on loopback); the rest run
//! `portcullis serve` processes behind a real Envoy (tests/common/replicas.rs) and assert
//! what a client sees: statuses, headers, JSON bodies, the admin API's usage.

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::replicas::*;
use common::*;
use portcullis::cli::BearerAuth;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use portcullis::pb::pricing_service_client::PricingServiceClient;
use portcullis::pb::usage_service_client::UsageServiceClient;
use sqlx::Connection;
use tonic::Code;

const DEMO: &str = "demo.gateway.local";
const CHAT: &str = "/v1/chat/completions";

/// How long a change may take to reach the other replica here: the promise is 1 s; the
/// margin is for a loaded test machine.
const WITHIN: Duration = Duration::from_secs(2);

async fn two_replicas(url: &str) -> (TestServer, TestServer) {
    let redis = redis_url();
    let flags = ["--redis-url", redis.as_str()];
    let a = TestServer::start_on(tempfile::tempdir().unwrap(), url.to_string(), &flags).await;
    let b = TestServer::start_on(tempfile::tempdir().unwrap(), url.to_string(), &flags).await;
    (a, b)
}

/// The HTTP status replica `server`'s Check answers for `secret` on gateway `gateway`
/// (200: allowed).
async fn check(server: &TestServer, gateway: &str, secret: &str) -> i32 {
    check_on(server.authz_port(), gateway, secret).await
}

/// The HTTP status the Check on `authz_port` answers.
async fn check_on(authz_port: u16, gateway: &str, secret: &str) -> i32 {
    Prober::connect(authz_port).await.key(gateway, secret).await.status
}

/// Waits until `server`'s Check answers `status` for `secret`.
async fn answers(server: &TestServer, gateway: &str, secret: &str, status: i32, what: &str) {
    eventually(what, WITHIN, || async move { (check(server, gateway, secret).await == status).then_some(()) }).await;
}

fn pricing(
    ch: tonic::transport::Channel,
) -> PricingServiceClient<tonic::service::interceptor::InterceptedService<tonic::transport::Channel, BearerAuth>> {
    PricingServiceClient::with_interceptor(ch, BearerAuth::new(OWNER_TOKEN).unwrap())
}

#[tokio::test]
async fn admin_changes_on_one_replica_reach_the_other_replicas_check_within_a_second() {
    let (url, name) = fresh_db().await;
    let (a, b) = two_replicas(&url).await;
    let (mut gw, mut keys) = a.clients().await;

    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, secret) = create_key(&mut keys, "demo", "replicated").await;
    answers(&b, "demo", &secret, 200, "B allows a key created on A").await;

    let update = |enabled: Option<bool>, limits: Option<pb::Limits>| pb::UpdateKeyRequest {
        id: key.id.clone(),
        enabled,
        limits,
        ..Default::default()
    };
    keys.update_key(update(Some(false), None)).await.unwrap();
    answers(&b, "demo", &secret, 401, "B denies a key disabled on A").await;
    keys.update_key(update(Some(true), None)).await.unwrap();
    answers(&b, "demo", &secret, 200, "B allows the key enabled again on A").await;

    // B counted its allowed Checks in the key's window (the manual clock stands still):
    // one request a minute is already spent there.
    let one_a_minute = pb::Limits { requests_per_minute: Some(1), ..Default::default() };
    keys.update_key(update(None, Some(one_a_minute))).await.unwrap();
    answers(&b, "demo", &secret, 429, "B applies limits set on A").await;
    keys.update_key(update(None, Some(pb::Limits::default()))).await.unwrap();
    answers(&b, "demo", &secret, 200, "B lifts limits lifted on A").await;

    let grace = prost_types::Duration { seconds: 3600, nanos: 0 };
    let rotated = keys
        .rotate_key(pb::RotateKeyRequest { id: key.id.clone(), grace_period: Some(grace) })
        .await
        .unwrap()
        .into_inner();
    answers(&b, "demo", &rotated.secret, 200, "B allows the new secret of a key rotated on A").await;
    assert_eq!(check(&b, "demo", &secret).await, 200, "the old secret is honoured during the grace period");
    b.clock.advance(chrono::Duration::seconds(3601));
    assert_eq!(check(&b, "demo", &secret).await, 401, "the old secret stops after the grace period");
    assert_eq!(check(&b, "demo", &rotated.secret).await, 200);

    let mut prices = pricing(a.channel().await);
    let price = pb::ModelPrice {
        model: "gpt-replica".into(),
        input_usd_per_million: "1.50".into(),
        output_usd_per_million: "6".into(),
    };
    prices.set_model_price(pb::SetModelPriceRequest { price: Some(price) }).await.unwrap();
    let priced = |server: &TestServer| {
        server.running().shared.limiters.prices.read().unwrap().get("gpt-replica").map(|p| p.input_micros_per_million)
    };
    let (priced, on_b) = (&priced, &b);
    eventually(
        "B's price book has a price set on A",
        WITHIN,
        || async move { priced(on_b).filter(|p| *p == 1_500_000) },
    )
    .await;
    prices.delete_model_price(pb::DeleteModelPriceRequest { model: "gpt-replica".into() }).await.unwrap();
    eventually(
        "B's price book drops a price deleted on A",
        WITHIN,
        || async move { priced(on_b).is_none().then_some(()) },
    )
    .await;

    keys.delete_key(pb::DeleteKeyRequest { id: key.id.clone() }).await.unwrap();
    answers(&b, "demo", &rotated.secret, 401, "B denies a key deleted on A").await;
    let (other, other_secret) = create_key(&mut keys, "demo", "second").await;
    answers(&b, "demo", &other_secret, 200, "B allows another key").await;
    gw.delete_gateway(pb::DeleteGatewayRequest { name: "demo".into(), force: true }).await.unwrap();
    let other_id: uuid::Uuid = other.id.parse().unwrap();
    eventually("B forgets a gateway deleted on A, with its keys", WITHIN, || async move {
        let view = on_b.running().shared.view().unwrap();
        (view.gateway("demo").is_none() && view.key_by_id(other_id).is_none()).then_some(())
    })
    .await;

    let metrics = b.running().shared.metrics.render(0, 0);
    assert!(metrics.contains("\nportcullis_view_version ") && metrics.contains("\nportcullis_view_sync_age_seconds "));
    drop((gw, keys, prices));
    let (mut a, mut b) = (a, b);
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}

#[tokio::test]
async fn changes_reach_the_other_replica_without_a_notification_and_out_of_commit_order() {
    let (url, name) = fresh_db().await;
    let (mut a, mut b) = two_replicas(&url).await;
    let (mut gw, mut keys) = a.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (first, first_secret) = create_key(&mut keys, "demo", "first").await;
    let (second, second_secret) = create_key(&mut keys, "demo", "second").await;
    answers(&b, "demo", &first_secret, 200, "B has the first key").await;
    answers(&b, "demo", &second_secret, 200, "B has the second key").await;

    // A change made in SQL with the trigger (and so its NOTIFY) off, versioned by hand:
    // only the poll can find it.
    let mut db = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut tx = db.begin().await.unwrap();
    sqlx::query("ALTER TABLE api_keys DISABLE TRIGGER api_keys_updated").execute(&mut *tx).await.unwrap();
    sqlx::query(
        "UPDATE api_keys SET enabled = FALSE, version = nextval('portcullis_change_version'), \
         txid = CAST(CAST(pg_current_xact_id() AS TEXT) AS BIGINT) WHERE id = $1",
    )
    .bind(&first.id)
    .execute(&mut *tx)
    .await
    .unwrap();
    sqlx::query("ALTER TABLE api_keys ENABLE TRIGGER api_keys_updated").execute(&mut *tx).await.unwrap();
    tx.commit().await.unwrap();
    answers(&b, "demo", &first_secret, 401, "B sees a change nobody notified").await;

    // Versions commit out of order: the earlier one (held open) commits after a later one
    // was read; B must still see it.
    let mut early = sqlx::PgConnection::connect(&url).await.unwrap();
    let mut held = early.begin().await.unwrap();
    sqlx::query("UPDATE api_keys SET enabled = FALSE WHERE id = $1")
        .bind(&second.id)
        .execute(&mut *held)
        .await
        .unwrap();
    keys.update_key(pb::UpdateKeyRequest { id: first.id.clone(), enabled: Some(true), ..Default::default() })
        .await
        .unwrap();
    answers(&b, "demo", &first_secret, 200, "B sees the later change").await;
    held.commit().await.unwrap();
    answers(&b, "demo", &second_secret, 401, "B sees the earlier change that committed last").await;

    drop((gw, keys, db, early));
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}

/// Meters one response of `key_id` on `server` over ext_proc, as Envoy sends it (the
/// ext_authz metadata without a reservation, then the response's headers and body with
/// its usage): charged to this replica's ledger.
async fn meter(server: &TestServer, key_id: &str, (prompt, completion): (u64, u64)) {
    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Part;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
    use envoy_types::pb::google::protobuf::{Struct, Value, value::Kind};
    let key_id = Value { kind: Some(Kind::StringValue(key_id.into())) };
    let authz = Struct { fields: HashMap::from([("key_id".to_string(), key_id)]) };
    let metadata = Metadata {
        filter_metadata: HashMap::from([("envoy.filters.http.ext_authz".into(), authz)]),
        ..Default::default()
    };
    let header =
        |k: &str, v: &str| HeaderValue { key: k.into(), raw_value: v.as_bytes().to_vec(), ..Default::default() };
    let headers = HttpHeaders {
        headers: Some(HeaderMap {
            headers: vec![header(":status", "200"), header("content-type", "application/json")],
        }),
        ..Default::default()
    };
    let body = format!(r#"{{"usage":{{"prompt_tokens":{prompt},"completion_tokens":{completion}}}}}"#).into_bytes();
    let stream = [
        ProcessingRequest {
            metadata_context: Some(metadata),
            request: Some(Part::ResponseHeaders(headers)),
            ..Default::default()
        },
        ProcessingRequest {
            request: Some(Part::ResponseBody(HttpBody { body, end_of_stream: true, ..Default::default() })),
            ..Default::default()
        },
    ];
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{}", server.authz_port()))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut replies = ExternalProcessorClient::new(ch).process(tokio_stream::iter(stream)).await.unwrap().into_inner();
    for _ in 0..2 {
        replies.message().await.unwrap().expect("a reply to each part");
    }
}

/// Redis loses a key's counters after another replica spent its budget and wrote that to
/// the ledger (and never to Redis, nor to this replica's memory): this replica's next
/// Check seeds the counters from its memory at once, and its seeder raises them to the
/// ledger in the background, so the Check refuses within one database round trip (well
/// inside a second; asserted within `WITHIN`), and the admin API reports the ledger's
/// usage.
#[tokio::test]
async fn after_redis_loses_a_key_a_budget_spent_on_the_other_replica_refuses_within_a_second() {
    let (url, name) = fresh_db().await;
    let (mut a, mut b) = two_replicas(&url).await;
    let (mut gw, mut keys) = a.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (id, secret) =
        key_with_limits(&mut keys, "budget", pb::Limits { token_limit: Some(1_000), ..Default::default() }).await;
    assert_eq!(check(&a, "demo", &secret).await, 200, "A counts the key in Redis");
    let key_id: uuid::Uuid = id.parse().unwrap();
    eventually("B knows the key", WITHIN, || async {
        b.running().shared.view().unwrap().key_by_id(key_id).is_some().then_some(())
    })
    .await;
    // B meters responses that use the whole budget; they reach the ledger, not Redis.
    meter(&b, &id, (600, 400)).await;
    eventually("B wrote its usage to the ledger", Duration::from_secs(5), || {
        let (url, id) = (url.clone(), id.clone());
        async move {
            let mut db = sqlx::PgConnection::connect(&url).await.ok()?;
            let tokens: Option<i64> =
                sqlx::query_scalar("SELECT prompt_tokens + completion_tokens FROM key_usage WHERE key_id = $1")
                    .bind(id)
                    .fetch_optional(&mut db)
                    .await
                    .ok()?;
            (tokens == Some(1_000)).then_some(())
        }
    })
    .await;
    // Redis restarts empty (for this key).
    redis_forgets(&redis_url(), &id).await;
    let lost = std::time::Instant::now();
    eventually("A's Check refuses the spent budget", WITHIN, || async {
        (check(&a, "demo", &secret).await == 429).then_some(())
    })
    .await;
    assert!(lost.elapsed() < WITHIN, "refused {:?} after Redis lost the key", lost.elapsed());
    let u = keys.get_key_usage(pb::GetKeyUsageRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!(u.total_tokens, 1_000, "the admin API reads the counters raised to the ledger: {u:?}");
    assert_eq!(check(&b, "demo", &secret).await, 429, "B reads the same counters");

    drop((gw, keys));
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}

#[tokio::test]
async fn replicas_share_a_database_only_with_shared_counters() {
    let (url, name) = fresh_db().await;
    let redis = redis_url();
    let with_redis: &[&str] = &["--redis-url", redis.as_str()];
    let mut shared = TestServer::start_on(tempfile::tempdir().unwrap(), url.clone(), with_redis).await;
    let err = TestServer::try_start_on(url.clone(), &[]).await.err().expect("a replica without --redis-url is refused");
    assert!(err.contains("another portcullis process is serving from this database"), "{err}");
    assert!(err.contains("--redis-url"), "the refusal says what to add: {err}");
    shared.stop().await;

    let mut alone = TestServer::start_on(tempfile::tempdir().unwrap(), url.clone(), &[]).await;
    let err =
        TestServer::try_start_on(url.clone(), with_redis).await.err().expect("no replica joins one serving alone");
    assert!(err.contains("another portcullis process is serving from this database alone"), "{err}");
    alone.stop().await;
    drop_db(&name).await;

    let dir = tempfile::tempdir().unwrap();
    let sqlite = format!("sqlite://{}", dir.path().join("p.db").display());
    let err = TestServer::try_start_on(sqlite, with_redis).await.err().expect("--redis-url with SQLite is refused");
    assert!(err.contains("--redis-url needs a PostgreSQL --database-url: SQLite serves one replica"), "{err}");
}

async fn key_with_limits(keys: &mut Keys, name: &str, limits: pb::Limits) -> (String, String) {
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: name.into(),
            limits: Some(limits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    (r.key.unwrap().id, r.secret)
}

/// A chat completion with a cap, so a Check holds a known reservation.
const BODY: &str = r#"{"model":"gpt-4o-mini","max_tokens":30,"messages":[{"role":"user","content":"hi"}]}"#;

/// A chat completion with key `secret` through the Envoy listening on `port`.
async fn post(port: u16, secret: &str) -> http::Response {
    let h = [("x-api-key", secret), ("content-type", "application/json")];
    http::request(port, "POST", DEMO, CHAT, &h, Some(BODY)).await
}

/// Sends `n` requests with key `secret` through Envoy at once; their responses.
async fn concurrently(envoy: &Envoy, secret: &str, n: usize) -> Vec<http::Response> {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (port, secret) = (envoy.port, secret.to_string());
        set.spawn(async move { post(port, &secret).await });
    }
    set.join_all().await
}

fn statuses(responses: &[http::Response]) -> Vec<u16> {
    responses.iter().map(|r| r.status).collect()
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

/// A key's usage as replica `r`'s admin API reports it.
async fn usage_of(r: &Replica, id: &str) -> pb::KeyUsage {
    let (_, mut keys) = r.clients().await;
    keys.get_key_usage(pb::GetKeyUsageRequest { id: id.into() }).await.unwrap().into_inner()
}

/// A key's usage in the ledger, as replica `r`'s usage history reports it: (requests,
/// total tokens) over the last day.
async fn ledger_of(r: &Replica, id: &str) -> Option<(u64, u64)> {
    let mut usage = UsageServiceClient::with_interceptor(r.channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    let history = usage
        .get_usage_history(pb::GetUsageHistoryRequest { key_id: id.into(), ..Default::default() })
        .await
        .ok()?
        .into_inner();
    Some(history.buckets.iter().fold((0, 0), |(r, t), b| (r + b.requests, t + b.total_tokens)))
}

/// Waits until every replica's metric `name` reads `value`.
async fn every_replica_reports(set: &Replicas, name: &str, value: f64) {
    for r in &set.replicas {
        eventually(&format!("{name} = {value}"), Duration::from_secs(15), || async move {
            (r.metric(name).await == Some(value)).then_some(())
        })
        .await;
    }
}

/// Creates keys with `limits` (in order), then one without limits, and waits until every
/// replica allows the last one: every replica then knows the others, made before it.
/// Returns the (id, secret) of each, the unlimited one last.
async fn keys_everywhere(set: &mut Replicas, limits: &[pb::Limits]) -> Vec<(String, String)> {
    let mut made = Vec::new();
    for (i, l) in limits.iter().enumerate() {
        made.push(key_with_limits(&mut set.keys, &format!("k{i}"), l.clone()).await);
    }
    made.push(key_with_limits(&mut set.keys, "unlimited", pb::Limits::default()).await);
    set.known_everywhere(&made.last().unwrap().1, 200).await;
    made
}

fn rpm(n: u32) -> pb::Limits {
    pb::Limits { requests_per_minute: Some(n), ..Default::default() }
}

fn tokens(n: u64) -> pb::Limits {
    pb::Limits { token_limit: Some(n), ..Default::default() }
}

/// Forty requests of one key sent at once through Envoy to three replicas: exactly the
/// key's 10 a minute are admitted, each with a different `x-ratelimit-remaining-requests`
/// (9 down to 0, as one replica would count), the other 30 refused with 429 and
/// `retry-after`; every replica's admin API reports the same 10 in the last minute.
#[tokio::test]
async fn forty_concurrent_requests_through_envoy_admit_exactly_n_across_three_replicas() {
    let mut set = Replicas::start(3, &[], Routing::Balanced).await;
    let made = keys_everywhere(&mut set, &[rpm(10)]).await;
    let (id, secret) = &made[0];
    let checks_before = checks_answered(&set).await;

    let responses = concurrently(&set.envoy, secret, 40).await;
    let got = statuses(&responses);
    assert_eq!((count(&got, 200), count(&got, 429)), (10, 30), "{got:?}");
    let mut remaining: Vec<u32> = responses
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.header("x-ratelimit-remaining-requests").expect("remaining on an allow").parse().unwrap())
        .collect();
    remaining.sort();
    assert_eq!(remaining, (0..10).collect::<Vec<u32>>(), "one shared count, each slot once");
    for r in responses.iter().filter(|r| r.status == 429) {
        assert_eq!(r.json()["error"]["code"], "rate_limit_exceeded", "{}", r.body);
        assert_eq!(
            (r.header("x-ratelimit-limit-requests"), r.header("x-ratelimit-remaining-requests")),
            (Some("10"), Some("0"))
        );
        assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s))));
    }
    for r in &set.replicas {
        assert_eq!(usage_of(r, id).await.requests_last_minute, 10, "every replica reads the shared window");
    }
    let checks_after = checks_answered(&set).await;
    let answered: Vec<f64> = checks_after.iter().zip(&checks_before).map(|(a, b)| a - b).collect();
    assert_eq!(answered.iter().sum::<f64>(), 40.0, "every Check answered once: {answered:?}");
    assert!(answered.iter().all(|n| *n > 0.0), "Envoy spread the Checks over every replica: {answered:?}");
    set.stop().await;
}

/// Checks each replica has answered so far, from its metrics.
async fn checks_answered(set: &Replicas) -> Vec<f64> {
    let mut out = Vec::new();
    for r in &set.replicas {
        out.push(r.metric("portcullis_checks_total").await.unwrap_or(0.0));
    }
    out
}

/// Envoy sends every Check to replica 0 and every metering stream to replica 1: each
/// reservation is made on one and settled on the other (usage counted once, the hold
/// released), and the budget those settles spent is refused by replica 0 through Envoy
/// and by replica 1's own Check.
#[tokio::test]
async fn a_reservation_made_on_one_replica_is_settled_on_the_other_and_the_spent_budget_refuses_on_both() {
    let mut set = Replicas::start(2, &[], Routing::Split).await;
    let made = keys_everywhere(&mut set, &[tokens(100)]).await;
    let (id, secret) = &made[0];
    let h = [("x-api-key", secret.as_str())];
    // 42 tokens a response (the fake upstream's 12 + 30): three fit under 100.
    for n in 1..=3u64 {
        let r = set.envoy.post(DEMO, CHAT, &h, BODY).await;
        assert_eq!(r.status, 200, "request {n}: {}", r.body);
        let on_1 = &set.replicas[1];
        eventually("replica 1 settles the reservation replica 0 made", WITHIN, || async move {
            let u = usage_of(on_1, id).await;
            (u.requests == n && u.reserved_tokens == 0).then_some(())
        })
        .await;
    }
    let (made_on, settled_on) = (&set.replicas[0], &set.replicas[1]);
    assert_eq!(made_on.metric("portcullis_metered_responses_total").await.unwrap_or(0.0), 0.0);
    assert_eq!(settled_on.metric("portcullis_metered_responses_total").await, Some(3.0), "settled on replica 1");
    for r in &set.replicas {
        let u = usage_of(r, id).await;
        assert_eq!((u.requests, u.total_tokens, u.reserved_tokens), (3, 126, 0), "counted once, seen by both");
    }
    let refused = set.envoy.post(DEMO, CHAT, &h, BODY).await;
    assert_eq!(refused.status, 429, "replica 0 refuses the budget replica 1 spent");
    assert_eq!(refused.json()["error"]["code"], "token_limit_exceeded");
    let own = settled_on.prober().await.check("demo", &h, BODY).await;
    assert_eq!((own.status, own.code().as_str()), (429, "token_limit_exceeded"), "replica 1 refuses it too");
    set.stop().await;
}

/// The longest a change may take to be enforced by every replica (SPEC §6).
const ONE_SECOND: Duration = Duration::from_secs(1);

/// From `since` (an admin call's return), how long until each replica first passes
/// `enforced(i)` (polled back to back); fails if any takes more than a second.
async fn enforced_everywhere_within_a_second<F, Fut>(
    what: &str,
    since: Instant,
    replicas: usize,
    enforced: F,
) -> Vec<Duration>
where
    F: Fn(usize) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = bool> + Send,
{
    let mut set = tokio::task::JoinSet::new();
    for i in 0..replicas {
        let enforced = enforced.clone();
        set.spawn(async move {
            loop {
                if enforced(i).await {
                    return (i, since.elapsed());
                }
                if since.elapsed() > 5 * ONE_SECOND {
                    return (i, since.elapsed());
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
    }
    let mut took = set.join_all().await;
    took.sort();
    let took: Vec<Duration> = took.into_iter().map(|(_, d)| d).collect();
    eprintln!("{what}: enforced after {took:?}");
    assert!(took.iter().all(|d| *d <= ONE_SECOND), "{what}: every replica within 1 s, took {took:?}");
    took
}

/// Every kind of change (SPEC §6, issue 8 item 5), each made through one of three replicas
/// in turn, is enforced by every replica's Check or admin API within a second of the admin
/// call's return, measured.
#[tokio::test]
async fn every_kind_of_change_is_enforced_by_every_replica_within_a_second() {
    let mut set = Replicas::start(3, &[], Routing::Balanced).await;
    let n = set.replicas.len();
    // A key per replica with a USD budget, for the price probe (created before the clock starts).
    let usd = pb::Limits { cost_limit_usd: Some("0.5".into()), ..Default::default() };
    let priced_keys = keys_everywhere(&mut set, &vec![usd; n]).await;
    let mut probers = Vec::new();
    let mut admins = Vec::new();
    for r in &set.replicas {
        probers.push(r.prober().await);
        admins.push(r.clients().await);
    }
    let probers = Arc::new(probers);
    let status_is = |gateway: &'static str, header: &'static str, secret: String, status: i32| {
        let probers = Arc::clone(&probers);
        move |i: usize| {
            let (mut p, secret) = (probers[i].clone(), secret.clone());
            async move { p.check(gateway, &[(header, secret.as_str())], "").await.status == status }
        }
    };
    let via = |k: usize| k % n;
    // Each replica refuses a token's read of gateway `demo` with `code`.
    let read_refused = |clients: &Arc<Vec<Gateways>>, code: Code| {
        let clients = Arc::clone(clients);
        move |i: usize| {
            let mut gw = clients[i].clone();
            async move {
                let r = gw.get_gateway(pb::GetGatewayRequest { name: "demo".into() }).await;
                r.err().is_some_and(|s| s.code() == code)
            }
        }
    };

    // Gateways: created (its Checks stop answering 503 gateway_not_configured), updated
    // (the key header renamed).
    let (gw, _) = &mut admins[via(0)];
    gw.create_gateway(gateway_req("other")).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second(
        "gateway created",
        t,
        n,
        status_is("other", "x-api-key", "pcs_unknown".into(), 401),
    )
    .await;
    let (_, keys) = &mut admins[via(1)];
    let (_, other_secret) = create_key(keys, "other", "on-other").await;
    let t = Instant::now();
    enforced_everywhere_within_a_second(
        "key created",
        t,
        n,
        status_is("other", "x-api-key", other_secret.clone(), 200),
    )
    .await;
    let (gw, _) = &mut admins[via(2)];
    let inbound = pb::InboundAuth { key_name: "x-other-key".into(), location: pb::KeyLocation::Header as i32 };
    gw.update_gateway(pb::UpdateGatewayRequest {
        name: "other".into(),
        inbound_auth: Some(inbound),
        ..Default::default()
    })
    .await
    .unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("gateway updated", t, n, status_is("other", "x-other-key", other_secret, 200))
        .await;

    // Keys: created, disabled, enabled, rotated, limited, deleted; a legacy key imported.
    let (_, keys) = &mut admins[via(3)];
    let (key, secret) = create_key(keys, "demo", "changing").await;
    let t = Instant::now();
    enforced_everywhere_within_a_second("key created", t, n, status_is("demo", "x-api-key", secret.clone(), 200)).await;
    let update = |enabled: Option<bool>, limits: Option<pb::Limits>| pb::UpdateKeyRequest {
        id: key.id.clone(),
        enabled,
        limits,
        ..Default::default()
    };
    let (_, keys) = &mut admins[via(4)];
    keys.update_key(update(Some(false), None)).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("key disabled", t, n, status_is("demo", "x-api-key", secret.clone(), 401))
        .await;
    let (_, keys) = &mut admins[via(5)];
    keys.update_key(update(Some(true), None)).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("key enabled", t, n, status_is("demo", "x-api-key", secret.clone(), 200)).await;
    let (_, keys) = &mut admins[via(6)];
    let rotated =
        keys.rotate_key(pb::RotateKeyRequest { id: key.id.clone(), grace_period: None }).await.unwrap().into_inner();
    let t = Instant::now();
    let (old, new) =
        (status_is("demo", "x-api-key", secret, 401), status_is("demo", "x-api-key", rotated.secret.clone(), 200));
    enforced_everywhere_within_a_second("key rotated", t, n, move |i| {
        let (old, new) = (old(i), new(i));
        async move { old.await && new.await }
    })
    .await;
    let (_, keys) = &mut admins[via(7)];
    keys.update_key(update(None, Some(rpm(1)))).await.unwrap();
    let t = Instant::now();
    // The first replica to apply it admits one (the limit's only slot); from then on
    // every replica that applies it refuses.
    enforced_everywhere_within_a_second(
        "key limited",
        t,
        n,
        status_is("demo", "x-api-key", rotated.secret.clone(), 429),
    )
    .await;
    let (_, keys) = &mut admins[via(8)];
    keys.delete_key(pb::DeleteKeyRequest { id: key.id.clone() }).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("key deleted", t, n, status_is("demo", "x-api-key", rotated.secret, 401)).await;
    let legacy = "legacy-secret-0123456789abcdef".to_string();
    let (_, keys) = &mut admins[via(9)];
    keys.import_legacy_key(pb::ImportLegacyKeyRequest {
        gateway: "demo".into(),
        name: "legacy".into(),
        secret: legacy.clone(),
        limits: None,
    })
    .await
    .unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("legacy key imported", t, n, status_is("demo", "x-api-key", legacy, 200)).await;

    // A price: with none in the book a request to an unpriced model holds no USD; once a
    // replica has the price, a request holds the key's whole $0.50 (1,000 tokens at $1,000
    // per million) and the next one is refused while it is in flight (one probe late).
    let mut prices = pricing(set.replicas[via(10)].channel().await);
    let price = pb::ModelPrice {
        model: "gpt-dear".into(),
        input_usd_per_million: "1000".into(),
        output_usd_per_million: "1000".into(),
    };
    prices.set_model_price(pb::SetModelPriceRequest { price: Some(price) }).await.unwrap();
    let t = Instant::now();
    let secrets: Arc<Vec<String>> = Arc::new(priced_keys.iter().map(|(_, s)| s.clone()).collect());
    let p = Arc::clone(&probers);
    enforced_everywhere_within_a_second("price set", t, n, move |i| {
        let (mut p, secret) = (p[i].clone(), secrets[i].clone());
        async move {
            let body = r#"{"model":"gpt-dear","max_tokens":1000}"#;
            let a = p.check("demo", &[("x-api-key", secret.as_str())], body).await;
            a.status == 429 && a.code() == "budget_exceeded"
        }
    })
    .await;

    // Management tokens: revoked (refused), scope narrowed in the database (refused on a
    // gateway it no longer reaches). There is no RPC that changes a token's scope: the
    // change is made in SQL, as an operator would, and reaches replicas the same way.
    let mut access =
        AccessServiceClient::with_interceptor(set.replicas[0].channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    let mut made = Vec::new();
    for name in ["revoked", "narrowed"] {
        let r = access
            .create_access_token(pb::CreateAccessTokenRequest {
                name: name.into(),
                role: pb::Role::Admin as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        made.push((r.token.unwrap().id, r.secret));
    }
    let mut as_token = Vec::new();
    for (_, secret) in &made {
        let mut per_replica = Vec::new();
        for r in &set.replicas {
            let (gw, _) = common::process::clients(r.admin, secret).await;
            // Waited for with a pause between tries: each refusal spends one of the
            // address's ten failures.
            eventually("every replica accepts the new token", Duration::from_secs(5), || {
                let mut gw = gw.clone();
                async move {
                    let ok = gw.get_gateway(pb::GetGatewayRequest { name: "demo".into() }).await.is_ok();
                    if !ok {
                        tokio::time::sleep(Duration::from_millis(200)).await;
                    }
                    ok.then_some(())
                }
            })
            .await;
            per_replica.push(gw);
        }
        as_token.push(Arc::new(per_replica));
    }
    let mut access_1 = AccessServiceClient::with_interceptor(
        set.replicas[via(11)].channel().await,
        BearerAuth::new(OWNER_TOKEN).unwrap(),
    );
    access_1.revoke_access_token(pb::RevokeAccessTokenRequest { id: made[0].0.clone() }).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second(
        "management token revoked",
        t,
        n,
        read_refused(&as_token[0], Code::Unauthenticated),
    )
    .await;
    let mut db = sqlx::PgConnection::connect(&set.db_url).await.unwrap();
    sqlx::query("UPDATE access_tokens SET gateways = '[\"other\"]' WHERE CAST(id AS TEXT) = $1")
        .bind(&made[1].0)
        .execute(&mut db)
        .await
        .unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second(
        "management token scope narrowed",
        t,
        n,
        read_refused(&as_token[1], Code::PermissionDenied),
    )
    .await;
    drop((db, admins, access, access_1, prices, as_token));
    set.stop().await;
}

/// The replicas' `LISTEN` connections killed by the database: changes made right after
/// still reach every replica within a second (the poll), each replica listens again, and
/// changes made then arrive within a second too.
#[tokio::test]
async fn changes_arrive_within_a_second_after_the_listening_connection_is_killed() {
    let mut set = Replicas::start(2, &[], Routing::Balanced).await;
    let made = keys_everywhere(&mut set, &[]).await;
    let (id, secret) = made[0].clone();
    let n = set.replicas.len();
    let mut probers = Vec::new();
    for r in &set.replicas {
        probers.push(r.prober().await);
    }
    let probers = Arc::new(probers);
    let answers = |status: i32| {
        let (probers, secret) = (Arc::clone(&probers), secret.clone());
        move |i: usize| {
            let (mut p, secret) = (probers[i].clone(), secret.clone());
            async move { p.key("demo", &secret).await.status == status }
        }
    };
    let listeners = |db: String| async move {
        let pids: Vec<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = $1 ORDER BY pid",
        )
        .bind(db)
        .fetch_all(&mut admin_conn().await)
        .await
        .unwrap();
        pids
    };
    let before = eventually("every replica listens", Duration::from_secs(10), || async {
        Some(listeners(set.db_name.clone()).await).filter(|p| p.len() == n)
    })
    .await;
    let killed: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%' AND datname = $1",
    )
    .bind(&set.db_name)
    .fetch_all(&mut admin_conn().await)
    .await
    .unwrap();
    assert_eq!(killed, vec![true; n], "each replica's listener killed");
    set.keys
        .update_key(pb::UpdateKeyRequest { id: id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("key disabled, listeners killed", t, n, answers(401)).await;
    eventually("every replica listens again", Duration::from_secs(15), || async {
        let now = listeners(set.db_name.clone()).await;
        (now.len() == n && now.iter().all(|p| !before.contains(p))).then_some(())
    })
    .await;
    set.keys.update_key(pb::UpdateKeyRequest { id, enabled: Some(true), ..Default::default() }).await.unwrap();
    let t = Instant::now();
    enforced_everywhere_within_a_second("key enabled, listening again", t, n, answers(200)).await;
    set.stop().await;
}

/// Advisory locks held on database `name` (each replica's claim on it).
async fn claims(name: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM pg_locks l JOIN pg_database d ON d.oid = l.database \
         WHERE l.locktype = 'advisory' AND l.granted AND d.datname = $1",
    )
    .bind(name)
    .fetch_one(&mut admin_conn().await)
    .await
    .unwrap()
}

/// Waits until `n` replicas claim database `name`.
async fn claimed_by(name: &str, n: i64, what: &str) {
    eventually(what, Duration::from_secs(15), || async move { (claims(name).await == n).then_some(()) }).await;
}

/// Waits until the ledger holds (requests, total tokens) `want` for key `id`, as replica
/// `r`'s usage history reads it.
async fn in_the_ledger(r: &Replica, id: &str, want: (u64, u64), within: Duration) {
    eventually(&format!("{want:?} in the ledger"), within, || async move {
        (ledger_of(r, id).await == Some(want)).then_some(())
    })
    .await;
}

/// Metric `name` summed over every replica.
async fn summed(set: &Replicas, name: &str) -> f64 {
    let mut sum = 0.0;
    for r in &set.replicas {
        sum += r.metric(name).await.unwrap_or(0.0);
    }
    sum
}

/// PostgreSQL unreachable (the replicas reach it through a forwarder the test cuts): Checks
/// through Envoy keep being answered and metered, the admin API answers UNAVAILABLE, the
/// replicas' claims on the database end with their connections; counters Redis loses
/// meanwhile are seeded from memory and decided in Redis (not by the failure mode) while
/// the ledger read waits for the database. Once it is back, the usage metered meanwhile
/// reaches the ledger (each replica's increments added), the ledger reads finish, the
/// claims are taken again and changes reach the other replica again.
#[tokio::test]
async fn with_postgres_unreachable_checks_go_on_admin_is_unavailable_and_usage_is_written_afterwards() {
    let (url, name) = fresh_db().await;
    let forwarder = Forwarder::start("127.0.0.1:5432").await;
    let mut set =
        Replicas::start_on(2, &forwarder.url_for(&url), &name, &redis_url(), &[], Routing::Balanced, |c| c).await;
    let made = keys_everywhere(&mut set, &[tokens(1_000)]).await;
    let (id, secret) = made[0].clone();
    let h = [("x-api-key", secret.as_str())];
    assert_eq!(set.envoy.post(DEMO, CHAT, &h, BODY).await.status, 200);
    in_the_ledger(&set.replicas[0], &id, (1, 42), Duration::from_secs(10)).await;
    claimed_by(&name, 2, "each replica claims the database").await;

    forwarder.cut();
    let down = set.gateways.create_gateway(gateway_req("during-outage")).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    let (_, mut on_1) = set.replicas[1].clients().await;
    let down = on_1.get_key_usage(pb::GetKeyUsageRequest { id: id.clone() }).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    claimed_by(&name, 0, "the claims end with their connections").await;
    // Redis loses the key's counters while the database is down.
    assert!(redis_forgets(&redis_url(), &id).await > 0, "Redis held the key");
    let set_ref = &set;
    let outage_before = summed(set_ref, "portcullis_counter_outage_decisions_total").await;
    let metered_before = summed(set_ref, "portcullis_metered_responses_total").await;
    for n in 0..4 {
        let r = tokio::time::timeout(Duration::from_secs(5), set.envoy.post(DEMO, CHAT, &h, BODY))
            .await
            .expect("the Check does not wait for the database");
        assert_eq!(r.status, 200, "request {n} during the outage: {}", r.body);
    }
    assert_eq!(
        summed(set_ref, "portcullis_counter_outage_decisions_total").await,
        outage_before,
        "decided in Redis, not by the failure mode"
    );
    assert!(summed(set_ref, "portcullis_counter_seeds_pending").await >= 1.0, "the ledger read waits for the database");
    eventually("the four responses are metered", WITHIN, || async move {
        (summed(set_ref, "portcullis_metered_responses_total").await == metered_before + 4.0).then_some(())
    })
    .await;

    forwarder.restore();
    eventually("the admin API answers again", Duration::from_secs(20), || {
        let mut gw = set_ref.gateways.clone();
        async move { gw.get_gateway(pb::GetGatewayRequest { name: "demo".into() }).await.ok().map(|_| ()) }
    })
    .await;
    // The usage metered during the outage is in the ledger.
    in_the_ledger(&set.replicas[1], &id, (5, 210), Duration::from_secs(20)).await;
    every_replica_reports(set_ref, "portcullis_counter_seeds_pending", 0.0).await;
    // Redis lost the first response's 42 tokens: the seeder's read raises the counters to
    // the ledger and this replica's unwritten usage; what the other replica had not
    // written at the read comes with reconciliation (every 5 s). Counted once.
    eventually("Redis's counters raised to the ledger", Duration::from_secs(15), || {
        let id = id.clone();
        async move {
            let u = usage_of(&set_ref.replicas[0], &id).await;
            ((u.requests, u.total_tokens) == (5, 210)).then_some(())
        }
    })
    .await;
    claimed_by(&name, 2, "both replicas claim the database again").await;
    let (_, later) = key_with_limits(&mut set.keys, "after", pb::Limits::default()).await;
    let mut on_1 = set.replicas[1].prober().await;
    eventually("replica 1 follows changes again", Duration::from_secs(15), || {
        let (mut p, later) = (on_1.clone(), later.clone());
        async move { (p.key("demo", &later).await.status == 200).then_some(()) }
    })
    .await;
    assert_eq!(on_1.key("demo", &later).await.status, 200);
    set.stop().await;
    drop(forwarder);
}

/// Two replicas on a private Redis in `mode`, with a token budget of 100 spent (three
/// responses of 42 tokens, in the ledger, and refused by each replica's Check), a key of
/// 4 requests a minute and one without limits: (set, budget (id, secret), rpm (id,
/// secret), unlimited secret, redis).
async fn on_a_private_redis(mode: &str) -> (Replicas, (String, String), (String, String), String, PrivateRedis) {
    let redis = PrivateRedis::start().await;
    let (url, name) = fresh_db().await;
    let env = [("PORTCULLIS_COUNTER_FAILURE_MODE", mode)];
    let mut set = Replicas::start_on(2, &url, &name, &redis.url(), &env, Routing::Balanced, |c| c).await;
    let made = keys_everywhere(&mut set, &[tokens(100), rpm(4)]).await;
    let (budget_id, budget) = made[0].clone();
    let h = [("x-api-key", budget.as_str())];
    for _ in 0..3 {
        assert_eq!(set.envoy.post(DEMO, CHAT, &h, BODY).await.status, 200);
    }
    in_the_ledger(&set.replicas[0], &budget_id, (3, 126), Duration::from_secs(10)).await;
    let refused = set.envoy.post(DEMO, CHAT, &h, BODY).await;
    assert_eq!((refused.status, refused.json()["error"]["code"].clone()), (429, "token_limit_exceeded".into()));
    // Each replica's own Check is refused by Redis: each now knows the spent budget (the
    // usage it last knew is what an outage decides from; a replica that has not seen it
    // learns it at its next reconciliation, 5 s).
    for r in &set.replicas {
        let a = r.prober().await.key("demo", &budget).await;
        assert_eq!((a.status, a.code().as_str()), (429, "token_limit_exceeded"), "seen by every replica");
    }
    (set, (budget_id, budget), made[1].clone(), made[2].1.clone(), redis)
}

/// Redis stopped with `--counter-failure-mode local`: keys with limits keep being decided
/// (each replica its share of 4 a minute, the spent budget still refused), keys without
/// limits are unaffected. Redis restarted empty: the counters are rebuilt from the ledger
/// (the budget still refuses), and requests per minute are exact again, counting what
/// was admitted during the outage.
#[tokio::test]
async fn with_redis_down_local_mode_keeps_deciding_and_an_empty_redis_is_rebuilt_from_the_ledger() {
    let (set, (_, budget), (_, per_minute), unlimited, mut redis) = on_a_private_redis("local").await;
    redis.down();
    for _ in 0..4 {
        assert_eq!(post(set.envoy.port, &unlimited).await.status, 200, "a key without limits never touches Redis");
        let r = post(set.envoy.port, &budget).await;
        assert_eq!((r.status, r.json()["error"]["code"].clone()), (429, "token_limit_exceeded".into()), "spent before");
    }
    let mut during = Vec::new();
    for _ in 0..8 {
        during.push(post(set.envoy.port, &per_minute).await.status);
    }
    let admitted_during = count(&during, 200);
    assert_eq!(admitted_during + count(&during, 429), 8, "decided, not failed: {during:?}");
    assert!((1..=4).contains(&admitted_during), "each replica its share of 4 a minute: {during:?}");
    every_replica_reports(&set, "portcullis_counter_store_up", 0.0).await;
    let mut outage_decisions = 0.0;
    for r in &set.replicas {
        outage_decisions += r.metric("portcullis_counter_outage_decisions_total").await.unwrap_or(0.0);
    }
    assert!(outage_decisions >= 8.0, "the failure mode's decisions are counted: {outage_decisions}");

    redis.up().await;
    every_replica_reports(&set, "portcullis_counter_store_up", 1.0).await;
    for r in &set.replicas {
        let a = r.prober().await.key("demo", &budget).await;
        assert_eq!((a.status, a.code().as_str()), (429, "token_limit_exceeded"), "rebuilt from the ledger");
    }
    // Within the same minute: the key's 4 less what the outage admitted, exactly.
    let after = statuses(&concurrently(&set.envoy, &per_minute, 12).await);
    assert_eq!(count(&after, 200), 4 - admitted_during, "4 a minute across the outage: {during:?} then {after:?}");
    // A key first used now: exact.
    let mut set = set;
    let (_, fresh) = key_with_limits(&mut set.keys, "fresh", rpm(5)).await;
    // Known everywhere once a key made after it is (probing it would take its slots).
    let (_, after_fresh) = key_with_limits(&mut set.keys, "after-fresh", pb::Limits::default()).await;
    set.known_everywhere(&after_fresh, 200).await;
    let fresh_got = statuses(&concurrently(&set.envoy, &fresh, 12).await);
    assert_eq!((count(&fresh_got, 200), count(&fresh_got, 429)), (5, 7), "{fresh_got:?}");
    set.stop().await;
}

/// Redis stopped with `--counter-failure-mode deny`: keys with limits get 503 with a JSON
/// body, keys without limits are unaffected; Redis back empty, they are decided again, the
/// spent budget still refused and its counters rebuilt from the ledger.
#[tokio::test]
async fn with_redis_down_deny_mode_answers_503_for_keys_with_limits_only() {
    let (set, (budget_id, budget), (_, per_minute), unlimited, mut redis) = on_a_private_redis("deny").await;
    redis.down();
    for _ in 0..4 {
        assert_eq!(post(set.envoy.port, &unlimited).await.status, 200, "a key without limits never touches Redis");
        for secret in [&per_minute, &budget] {
            let r = post(set.envoy.port, secret).await;
            assert_eq!(
                (r.status, r.json()["error"]["code"].clone()),
                (503, "service_unavailable".into()),
                "{}",
                r.body
            );
        }
    }
    redis.up().await;
    every_replica_reports(&set, "portcullis_counter_store_up", 1.0).await;
    assert_eq!(post(set.envoy.port, &per_minute).await.status, 200);
    for r in &set.replicas {
        let a = r.prober().await.key("demo", &budget).await;
        assert_eq!((a.status, a.code().as_str()), (429, "token_limit_exceeded"), "the budget spent before");
    }
    // The counters Redis lost are raised to the ledger (the seeder's read, one database
    // round trip after the first Check): every replica's admin API reads the ledger's.
    for r in &set.replicas {
        eventually("the counters rebuilt from the ledger", WITHIN, || async {
            let u = usage_of(r, &budget_id).await;
            ((u.requests, u.total_tokens) == (3, 126)).then_some(())
        })
        .await;
    }
    set.stop().await;
}

/// One of three replicas killed (SIGKILL) while eight clients send requests through Envoy:
/// the others keep serving (only requests in flight to the dead one may fail, and none
/// once Envoy took it out), a key of 60 a minute admits 60 across the kill (less only the
/// ones in flight to the dead replica, which Redis may have counted), never more, and
/// the reservation the dead replica made expires after `--reservation-ttl`.
#[tokio::test]
async fn a_replica_killed_under_load_leaves_the_others_serving_and_no_key_over_its_limit() {
    let mut set = Replicas::start(3, &[("PORTCULLIS_RESERVATION_TTL", "2s")], Routing::Balanced).await;
    let made = keys_everywhere(&mut set, &[rpm(60), tokens(100)]).await;
    let ((_, per_minute), (_, budget), (_, unlimited)) = (made[0].clone(), made[1].clone(), made[2].clone());
    // Replica 0 admits a request of the budget key whose response never comes.
    // No output cap: it holds the default 4,096 tokens, capped at the 100 left.
    let uncapped = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
    let h = [("x-api-key", budget.as_str())];
    assert_eq!(set.replicas[0].prober().await.check("demo", &h, uncapped).await.status, 200);

    const WORKERS: usize = 8;
    let results = Arc::new(std::sync::Mutex::new(Vec::<(bool, u16)>::new()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut load = tokio::task::JoinSet::new();
    for w in 0..WORKERS {
        let (results, stop, port) = (Arc::clone(&results), Arc::clone(&stop), set.envoy.port);
        let (limited, secret) = if w % 2 == 0 { (true, per_minute.clone()) } else { (false, unlimited.clone()) };
        load.spawn(async move {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let r = post(port, &secret).await;
                results.lock().unwrap().push((limited, r.status));
            }
        });
    }
    let answered = |n: usize| {
        let results = Arc::clone(&results);
        move || {
            let len = results.lock().unwrap().len();
            async move { (len >= n).then_some(len) }
        }
    };
    eventually("load flows", Duration::from_secs(20), answered(30)).await;
    set.replicas[0].kill().await;
    let at_kill = results.lock().unwrap().len();
    let held = set.replicas[1].prober().await.check("demo", &h, uncapped).await;
    assert_eq!((held.status, held.code().as_str()), (429, "token_limit_exceeded"), "held by the dead replica");
    let dead = set.replicas[0].authz;
    let admin_port = set.envoy.admin_port;
    eventually("Envoy's health checks take the dead replica out", Duration::from_secs(10), || async move {
        let clusters = http::request(admin_port, "GET", "admin", "/clusters", &[], None).await;
        let flags = format!("portcullis_authz::127.0.0.1:{dead}::health_flags::");
        clusters.body.lines().any(|l| l.starts_with(&flags) && l.contains("failed_active_hc")).then_some(())
    })
    .await;
    let out_at = results.lock().unwrap().len();
    eventually("load flows on the others", Duration::from_secs(30), answered(out_at + 100)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    load.join_all().await;
    let results = results.lock().unwrap().clone();

    let limited: Vec<u16> = results.iter().filter(|(l, _)| *l).map(|(_, s)| *s).collect();
    let free: Vec<u16> = results.iter().filter(|(l, _)| !*l).map(|(_, s)| *s).collect();
    // Never over the limit; below it only by requests of the key that were in flight to
    // the dead replica (Redis may have admitted one whose answer died with the replica).
    let (admitted, lost) = (count(&limited, 200), count(&limited, 503));
    assert!(admitted <= 60, "never over the key's 60 a minute across the kill (killed after {at_kill}): {admitted}");
    assert!(admitted + lost >= 60, "no slot lost but to a request in flight at the kill: {admitted} + {lost}");
    assert!(count(&limited, 429) > 0, "the load went past the limit");
    assert_eq!(count(&free, 200) + count(&free, 503), free.len(), "{free:?}");
    let failed = count(&limited, 503) + count(&free, 503);
    assert!(failed <= WORKERS, "at most the requests in flight to the dead replica fail: {failed}");
    assert!(results[out_at..].iter().all(|(_, s)| *s != 503), "none once Envoy took it out");
    eventually("the dead replica's reservation expires", Duration::from_secs(10), || async {
        (set.envoy.post(DEMO, CHAT, &h, BODY).await.status == 200).then_some(())
    })
    .await;
    set.stop().await;
}

/// A replica stopped with SIGTERM and `--shutdown-delay` reports NOT_SERVING, keeps
/// answering while Envoy's health checks move traffic to the other one, then drains and
/// exits 0: no request fails.
#[tokio::test]
async fn a_replica_stopped_gracefully_loses_no_request() {
    let mut set = Replicas::start(2, &[("PORTCULLIS_SHUTDOWN_DELAY", "3s")], Routing::Balanced).await;
    let made = keys_everywhere(&mut set, &[]).await;
    let secret = made[0].1.clone();
    let h = [("x-api-key", secret.as_str())];
    let stopping = tokio::spawn(set.replicas[0].proc.take().unwrap().sigterm());
    let mut got = Vec::new();
    while !stopping.is_finished() {
        got.push(set.envoy.send(DEMO, CHAT, &h).await.status);
    }
    let (status, _) = stopping.await.unwrap();
    assert!(status.success(), "exit 0 after the drain");
    for _ in 0..10 {
        got.push(set.envoy.send(DEMO, CHAT, &h).await.status);
    }
    assert!(got.len() > 20, "requests kept flowing during the stop: {}", got.len());
    assert!(got.iter().all(|s| *s == 200), "no request failed: {got:?}");
    set.stop().await;
}

/// Replicas started at the same moment on a fresh database with the same
/// `--bootstrap-token` both start and both accept it (the second to store it takes the
/// first's).
#[tokio::test]
async fn replicas_started_together_share_the_bootstrap_token() {
    let (url, name) = fresh_db().await;
    let redis = redis_url();
    let flags = ["--redis-url", redis.as_str()];
    // Migrated first, so the two race on the token alone.
    portcullis::app::migrate(&url).await.unwrap();
    let (a, b) =
        tokio::join!(TestServer::try_start_on(url.clone(), &flags), TestServer::try_start_on(url.clone(), &flags));
    let (mut a, mut b) = (a.expect("one replica starts"), b.expect("the other starts too"));
    for server in [&a, &b] {
        let (mut gw, _) = server.clients().await;
        gw.list_gateways(pb::ListGatewaysRequest::default()).await.expect("the bootstrap token is accepted");
    }
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}
