//! Several replicas on one PostgreSQL: an admin change made through one replica reaches
//! the other's Check within a second (LISTEN/NOTIFY, a poll, reloads), and the rules for
//! who may share a database. Each test on a fresh database of the local server
//! (`PORTCULLIS_TEST_POSTGRES`), both replicas in process, Check over gRPC on loopback.

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::*;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use portcullis::cli::BearerAuth;
use portcullis::pb;
use portcullis::pb::access_service_client::AccessServiceClient;
use portcullis::pb::pricing_service_client::PricingServiceClient;
use sqlx::Connection;
use tonic::Code;

/// The Redis the tests share (`PORTCULLIS_TEST_REDIS`, as scripts/test-services.sh sets).
fn redis_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}
const DEMO: &str = "demo.gateway.local";
const CHAT: &str = "/v1/chat/completions";

/// How long a change may take to reach the other replica here: the promise is 1 s; the
/// margin is for a loaded test machine.
const WITHIN: Duration = Duration::from_secs(2);

/// A fresh database on the test server, dropped by `drop_db`.
async fn fresh_db() -> (String, String) {
    let admin =
        std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("portcullis_replicas_{}", uuid::Uuid::now_v7().simple());
    let mut c = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL on 127.0.0.1:5432");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    (url, name)
}

async fn admin_conn() -> sqlx::PgConnection {
    let admin =
        std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    sqlx::PgConnection::connect(&admin).await.unwrap()
}

async fn drop_db(name: &str) {
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin_conn().await).await;
}

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
    check_with(authz_port, gateway, secret, &[]).await
}

/// The HTTP status replica `server`'s Check answers for a request with an empty body (it
/// holds nothing against budgets: only what was used decides).
async fn check_empty(server: &TestServer, gateway: &str, secret: &str) -> i32 {
    check_with(server.authz_port(), gateway, secret, &[("content-length", "0")]).await
}

/// The HTTP status the Check on `authz_port` answers, with `extra` request headers.
async fn check_with(authz_port: u16, gateway: &str, secret: &str, extra: &[(&str, &str)]) -> i32 {
    let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{authz_port}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let headers = HashMap::from([
        (":authority".to_string(), format!("{gateway}.gateway.local")),
        (":method".to_string(), "POST".to_string()),
        (":path".to_string(), "/v1/chat/completions".to_string()),
        ("content-type".to_string(), "application/json".to_string()),
        ("x-api-key".to_string(), secret.to_string()),
    ]);
    let headers = headers.into_iter().chain(extra.iter().map(|(k, v)| (k.to_string(), v.to_string()))).collect();
    let req = CheckRequest {
        attributes: Some(AttributeContext {
            context_extensions: HashMap::from([("gateway".to_string(), gateway.to_string())]),
            request: Some(Request {
                http: Some(HttpRequest {
                    method: "POST".into(),
                    path: "/v1/chat/completions".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    };
    let r = AuthorizationClient::new(ch).check(req).await.expect("Check answers").into_inner();
    match r.http_response {
        Some(HttpResponse::OkResponse(_)) => 200,
        Some(HttpResponse::DeniedResponse(d)) => d.status.map_or(0, |s| s.code),
        other => panic!("unexpected Check answer {other:?}"),
    }
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
async fn a_management_token_revoked_on_one_replica_is_refused_by_the_other() {
    let (url, name) = fresh_db().await;
    let (mut a, mut b) = two_replicas(&url).await;
    let mut access = AccessServiceClient::with_interceptor(a.channel().await, BearerAuth::new(OWNER_TOKEN).unwrap());
    let made = access
        .create_access_token(pb::CreateAccessTokenRequest {
            name: "ops".into(),
            role: pb::Role::Admin as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let id = made.token.unwrap().id;
    // Waited for in B's registry, not by calling B: failed attempts throttle the address,
    // and the manual clock never lets it try again.
    let token_id: uuid::Uuid = id.parse().unwrap();
    let on_b_server = &b;
    eventually("B knows a token made on A", WITHIN, || async move {
        on_b_server.running().shared.tokens.read().unwrap().find(token_id).map(|_| ())
    })
    .await;
    let (mut on_b, _) = b.clients_with(&made.secret).await;
    on_b.list_gateways(pb::ListGatewaysRequest {}).await.expect("B accepts a token made on A");
    access.revoke_access_token(pb::RevokeAccessTokenRequest { id }).await.unwrap();
    eventually("B refuses a token revoked on A", WITHIN, || {
        let mut on_b = on_b.clone();
        async move {
            let r = on_b.list_gateways(pb::ListGatewaysRequest {}).await;
            r.err().filter(|s| s.code() == Code::Unauthenticated).map(|_| ())
        }
    })
    .await;
    assert_eq!(on_b.list_gateways(pb::ListGatewaysRequest {}).await.unwrap_err().code(), Code::Unauthenticated);
    drop((access, on_b));
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

#[tokio::test]
async fn with_the_database_down_check_answers_from_memory_admin_is_unavailable_and_sync_resumes() {
    /// Advisory locks held on database `name` (each replica's claim).
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

    let (url, name) = fresh_db().await;
    let (mut a, mut b) = two_replicas(&url).await;
    let (mut gw, mut keys) = a.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (kept, secret) = create_key(&mut keys, "demo", "kept").await;
    let budget = pb::Limits { token_limit: Some(1_000_000), ..Default::default() };
    let (limited_id, limited) = key_with_limits(&mut keys, "limited", budget).await;
    answers(&b, "demo", &secret, 200, "B has the key").await;
    answers(&a, "demo", &limited, 200, "A counts the limited key in Redis").await;
    assert_eq!(claims(&name).await, 2, "each replica claims the database");

    let mut c = admin_conn().await;
    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false")).execute(&mut c).await.unwrap();
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(&name)
        .execute(&mut c)
        .await
        .unwrap();
    let down = gw.create_gateway(gateway_req("during-outage")).await.unwrap_err();
    assert_eq!(down.code(), Code::Unavailable, "{down:?}");
    assert_eq!(check(&a, "demo", &secret).await, 200, "A's Check answers from memory");
    assert_eq!(check(&b, "demo", &secret).await, 200, "B's Check answers from memory");
    assert_eq!(claims(&name).await, 0, "the claims ended with their connections");
    // Redis loses the limited key's counters while the database is down: A's Check does
    // not wait for the ledger; it seeds them from memory and decides in Redis (not by the
    // failure mode), and the ledger read waits for the database.
    redis_forgets(&limited_id).await;
    let counters = a.running().shared.shared_counters.clone().expect("A counts in Redis");
    let before = counters.status().outage_decisions;
    let answered = tokio::time::timeout(Duration::from_secs(5), check(&a, "demo", &limited))
        .await
        .expect("A's Check answers while the database is unreachable");
    assert_eq!(answered, 200, "A's Check answers from memory");
    assert_eq!(counters.status().outage_decisions, before, "decided in Redis, not by the failure mode");
    assert!(counters.status().seeds_pending >= 1, "the ledger read waits for the database: {:?}", counters.status());
    // Usage metered meanwhile waits in memory.
    meter(&a, &kept.id, (3, 4)).await;
    meter(&b, &kept.id, (3, 4)).await;

    sqlx::query(&format!("ALTER DATABASE {name} ALLOW_CONNECTIONS true")).execute(&mut c).await.unwrap();
    // ... and is in the ledger once the database is back, each replica's increments added.
    eventually("the usage metered while down is written", Duration::from_secs(15), || {
        let (url, id) = (url.clone(), kept.id.clone());
        async move {
            let mut db = sqlx::PgConnection::connect(&url).await.ok()?;
            let row: Option<(i64, i64, i64)> =
                sqlx::query_as("SELECT requests, prompt_tokens, completion_tokens FROM key_usage WHERE key_id = $1")
                    .bind(id)
                    .fetch_optional(&mut db)
                    .await
                    .ok()?;
            (row == Some((2, 6, 8))).then_some(())
        }
    })
    .await;
    eventually("the ledger read is done once the database answers", Duration::from_secs(15), || async {
        (counters.status().seeds_pending == 0).then_some(())
    })
    .await;
    // The claims that ended with the killed connections are taken again.
    eventually("both replicas claim the database again", Duration::from_secs(15), || {
        let name = &name;
        async move { (claims(name).await == 2).then_some(()) }
    })
    .await;
    let (_, later) = eventually("A writes again", Duration::from_secs(15), || {
        let mut keys = keys.clone();
        async move {
            let r = keys
                .create_key(pb::CreateKeyRequest { gateway: "demo".into(), name: "after".into(), ..Default::default() })
                .await
                .ok()?
                .into_inner();
            Some((r.key?, r.secret))
        }
    })
    .await;
    eventually("B follows again", Duration::from_secs(15), || {
        let later = later.clone();
        let b = &b;
        async move { (check(b, "demo", &later).await == 200).then_some(()) }
    })
    .await;

    drop((gw, keys));
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}

/// Forgets everything Redis holds of API key `id` (what a Redis restarted empty, a
/// failover or an eviction does to it).
async fn redis_forgets(id: &str) {
    let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let held: Vec<String> = redis::cmd("KEYS").arg(format!("pc:{{{id}}}:*")).query_async(&mut conn).await.unwrap();
    if !held.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(&held).query_async(&mut conn).await.unwrap();
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
    assert_eq!(check_empty(&a, "demo", &secret).await, 200, "A counts the key in Redis");
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
    redis_forgets(&id).await;
    let lost = std::time::Instant::now();
    eventually("A's Check refuses the spent budget", WITHIN, || async {
        (check_empty(&a, "demo", &secret).await == 429).then_some(())
    })
    .await;
    assert!(lost.elapsed() < WITHIN, "refused {:?} after Redis lost the key", lost.elapsed());
    let u = usage_on(&a, &id).await;
    assert_eq!(u.total_tokens, 1_000, "the admin API reads the counters raised to the ledger: {u:?}");
    assert_eq!(check_empty(&b, "demo", &secret).await, 429, "B reads the same counters");

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

/// The loopback Envoy config with every replica in `ports` as an endpoint of the
/// ext_authz / ext_proc cluster (health-checked, round robin), panic mode off.
fn every_replica(ports: &[u16]) -> impl FnOnce(String) -> String + use<> {
    let endpoints: String = ports
        .iter()
        .map(|p| {
            format!("        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n")
        })
        .collect();
    move |config: String| {
        let one = "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __AUTHZ_PORT__}}}\n";
        assert!(config.contains(one), "the loopback config lists the authz endpoint as expected");
        config.replace(one, &endpoints).replace(
            "  - name: portcullis_authz\n",
            "  - name: portcullis_authz\n    common_lb_config: {healthy_panic_threshold: {value: 0}}\n",
        )
    }
}

/// Checks a replica answered and responses it metered, from its metrics.
fn work_done(server: &TestServer) -> (u64, u64) {
    let text = server.running().shared.metrics.render(0, 0);
    let sum = |prefix: &str| {
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum::<u64>()
    };
    (sum("portcullis_checks_total{"), sum("portcullis_metered_responses_total "))
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

async fn usage_on(server: &TestServer, id: &str) -> pb::KeyUsage {
    let (_, mut keys) = server.clients().await;
    keys.get_key_usage(pb::GetKeyUsageRequest { id: id.into() }).await.unwrap().into_inner()
}

/// Through a real Envoy balancing Checks and metering streams over two replicas: a key's
/// requests per minute are exact across them, its token budget is shared (a response is
/// settled by whichever replica meters it), and both replicas report the same usage.
#[tokio::test]
async fn limits_are_exact_across_replicas_behind_envoy() {
    let (url, name) = fresh_db().await;
    let (a, b) = two_replicas(&url).await;
    let upstream = FakeUpstream::start().await;
    let envoy =
        Envoy::start_with(a.authz_port(), upstream.port, every_replica(&[a.authz_port(), b.authz_port()])).await;
    let (mut gw, mut keys) = a.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let rpm = pb::Limits { requests_per_minute: Some(5), ..Default::default() };
    let (per_minute_id, per_minute) = key_with_limits(&mut keys, "rpm", rpm).await;
    let tokens = pb::Limits { token_limit: Some(100), ..Default::default() };
    let (budget_id, budget) = key_with_limits(&mut keys, "budget", tokens).await;
    for id in [&per_minute_id, &budget_id] {
        let id: uuid::Uuid = id.parse().unwrap();
        eventually("B knows the keys", WITHIN, || async {
            b.running().shared.view().unwrap().key_by_id(id).is_some().then_some(())
        })
        .await;
    }

    let h = [("x-api-key", per_minute.as_str())];
    let mut statuses = Vec::new();
    for _ in 0..12 {
        let r = envoy.send(DEMO, CHAT, &h).await;
        if r.status == 429 {
            assert!(r.header("retry-after").is_some_and(|s| s.parse::<u64>().is_ok_and(|s| (1..=60).contains(&s))));
            assert_eq!(r.header("x-ratelimit-limit-requests"), Some("5"));
        }
        statuses.push(r.status);
    }
    assert_eq!(statuses.iter().filter(|s| **s == 200).count(), 5, "5 a minute across both replicas: {statuses:?}");
    assert_eq!(statuses.iter().filter(|s| **s == 429).count(), 7, "{statuses:?}");

    // 42 tokens a response (the fake upstream's 12 + 30): three fit under 100, the fourth
    // is refused, whichever replica checked or metered each one.
    let h = [("x-api-key", budget.as_str())];
    for n in 1..=3u64 {
        assert_eq!(envoy.send(DEMO, CHAT, &h).await.status, 200, "request {n}");
        eventually("the response is settled", WITHIN, || async {
            let u = usage_on(&a, &budget_id).await;
            (u.requests == n && u.reserved_tokens == 0).then_some(())
        })
        .await;
    }
    let refused = envoy.send(DEMO, CHAT, &h).await;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"]["code"], "token_limit_exceeded");
    for server in [&a, &b] {
        let u = usage_on(server, &budget_id).await;
        assert_eq!((u.requests, u.total_tokens), (3, 126), "every replica reads the shared counters");
    }
    // Round robin over one cluster for both filters: a request's Check and its metering
    // stream usually go to different replicas (here, every time).
    let (on_a, on_b) = (work_done(&a), work_done(&b));
    assert_eq!(on_a.0 + on_b.0, 16, "every Check answered once: {on_a:?} {on_b:?}");
    assert_eq!(on_a.1 + on_b.1, 8, "every allowed response metered once: {on_a:?} {on_b:?}");
    assert!(on_a.0 + on_a.1 > 0 && on_b.0 + on_b.1 > 0, "both replicas served: {on_a:?} {on_b:?}");
    drop(envoy);
    let (mut a, mut b) = (a, b);
    a.stop().await;
    b.stop().await;
    drop_db(&name).await;
}

/// Two `portcullis serve` processes on a fresh PostgreSQL database and the test Redis,
/// with one more setting each, behind a real Envoy balancing both; gateway "demo" created.
struct ProcessPair {
    name: String,
    a: common::process::Proc,
    b: common::process::Proc,
    authz_a: u16,
    authz_b: u16,
    envoy: Envoy,
    _upstream: FakeUpstream,
    keys: Keys,
}

impl ProcessPair {
    async fn start(setting: (&str, &str)) -> ProcessPair {
        use common::process::{Proc, clients};
        let (url, name) = fresh_db().await;
        let redis = redis_url();
        let env = [("PORTCULLIS_REDIS_URL", redis.as_str()), setting, ("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)];
        let (authz_a, authz_b) = (free_port(), free_port());
        let (admin_a, admin_b) = (free_port(), free_port());
        let mut a = Proc::spawn(&url, authz_a, admin_a, &env);
        a.wait_for("admin listener").await;
        let mut b = Proc::spawn(&url, authz_b, admin_b, &env);
        b.wait_for("admin listener").await;
        let upstream = FakeUpstream::start().await;
        let envoy = Envoy::start_with(authz_a, upstream.port, every_replica(&[authz_a, authz_b])).await;
        let (mut gw, keys) = clients(admin_a, OWNER_TOKEN).await;
        gw.create_gateway(gateway_req("demo")).await.unwrap();
        ProcessPair { name, a, b, authz_a, authz_b, envoy, _upstream: upstream, keys }
    }
}

/// A replica killed (SIGKILL) under load: Envoy's health checks take it out, the other
/// keeps serving, no key goes over its limit, and the reservation the dead replica made
/// expires after `--reservation-ttl` instead of holding the budget for ever.
#[tokio::test]
async fn a_killed_replica_leaves_the_others_serving_and_its_reservations_expire() {
    let ProcessPair { name, mut a, b, authz_a, authz_b, envoy, _upstream, mut keys } =
        ProcessPair::start(("PORTCULLIS_RESERVATION_TTL", "2s")).await;
    let (_, per_minute) =
        key_with_limits(&mut keys, "rpm", pb::Limits { requests_per_minute: Some(20), ..Default::default() }).await;
    let (_, budget) =
        key_with_limits(&mut keys, "budget", pb::Limits { token_limit: Some(100), ..Default::default() }).await;
    let (_, probe) = key_with_limits(&mut keys, "probe", pb::Limits::default()).await;
    eventually("B knows the keys", WITHIN, || async { (check_on(authz_b, "demo", &probe).await == 200).then_some(()) })
        .await;
    // A admits a request of the budget key whose response never comes: it holds the budget.
    assert_eq!(check_on(authz_a, "demo", &budget).await, 200);
    let h = [("x-api-key", per_minute.as_str())];
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(envoy.send(DEMO, CHAT, &h).await.status);
    }
    a.child.kill().await.unwrap();
    let hb = [("x-api-key", budget.as_str())];
    assert_eq!(check_on(authz_b, "demo", &budget).await, 429, "held in flight by the dead replica's reservation");
    // Checks that find A dead are retried on B (the reference config retries a Check that
    // never reached a replica); Envoy's health checks then take A out.
    for _ in 0..20 {
        statuses.push(envoy.send(DEMO, CHAT, &h).await.status);
    }
    eventually("Envoy's health checks take A out", Duration::from_secs(10), || async {
        let clusters = http::request(envoy.admin_port, "GET", "admin", "/clusters", &[], None).await;
        let flags = format!("portcullis_authz::127.0.0.1:{authz_a}::health_flags::");
        clusters.body.lines().any(|l| l.starts_with(&flags) && l.contains("failed_active_hc")).then_some(())
    })
    .await;
    for _ in 0..20 {
        statuses.push(envoy.send(DEMO, CHAT, &h).await.status);
    }
    let admitted = statuses.iter().filter(|s| **s == 200).count();
    assert_eq!(admitted, 20, "exactly the key's 20 a minute, across the kill: {statuses:?}");
    assert!(statuses[statuses.len() - 10..].iter().all(|s| *s == 429), "B keeps deciding: {statuses:?}");
    let failed = statuses.iter().filter(|s| **s == 503).count();
    assert!(failed <= 2, "one failed connection takes A out: {statuses:?}");
    // The dead replica's reservation holds the budget until its TTL, then frees it.
    eventually("the dead replica's reservation expires", Duration::from_secs(10), || async {
        (envoy.send(DEMO, CHAT, &hb).await.status == 200).then_some(())
    })
    .await;
    drop(envoy);
    let _ = b.sigterm().await;
    drop_db(&name).await;
}

/// A replica stopped with SIGTERM and `--shutdown-delay` reports NOT_SERVING, keeps
/// answering while Envoy's health checks move traffic to the other one, then drains and
/// exits 0: no request fails.
#[tokio::test]
async fn a_replica_stopped_gracefully_loses_no_request() {
    let ProcessPair { name, a, b, authz_b, envoy, _upstream, mut keys, .. } =
        ProcessPair::start(("PORTCULLIS_SHUTDOWN_DELAY", "3s")).await;
    let (_, secret) = key_with_limits(&mut keys, "k", pb::Limits::default()).await;
    eventually("B knows the key", WITHIN, || async { (check_on(authz_b, "demo", &secret).await == 200).then_some(()) })
        .await;
    let h = [("x-api-key", secret.as_str())];
    let stopping = tokio::spawn(a.sigterm());
    let mut statuses = Vec::new();
    while !stopping.is_finished() {
        statuses.push(envoy.send(DEMO, CHAT, &h).await.status);
    }
    let (status, _) = stopping.await.unwrap();
    assert!(status.success(), "exit 0 after the drain");
    for _ in 0..10 {
        statuses.push(envoy.send(DEMO, CHAT, &h).await.status);
    }
    assert!(statuses.len() > 20, "requests kept flowing during the stop: {}", statuses.len());
    assert!(statuses.iter().all(|s| *s == 200), "no request failed: {statuses:?}");
    drop(envoy);
    let _ = b.sigterm().await;
    drop_db(&name).await;
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
