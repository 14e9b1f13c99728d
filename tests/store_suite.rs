//! One storage suite, run against every backend: SQLite (a fresh file) and PostgreSQL
//! (a fresh database on the local server, `PORTCULLIS_TEST_POSTGRES`).

use chrono::{DateTime, Duration, TimeZone, Utc};
use portcullis::domain::access::{AccessToken, AuditEvent, Role};
use portcullis::domain::budget::Counters;
use portcullis::domain::gateway::{Gateway, InboundAuth, UpstreamAuth};
use portcullis::domain::key::{ApiKey, Limits, ResetPeriod};
use portcullis::domain::pricing::Price;
use portcullis::domain::secret::{Secret, SecretKind};
use portcullis::domain::tokens::StoredToken;
use portcullis::store::sealing::Sealer;
use portcullis::store::{DynStore, Page, StoreError};
use uuid::Uuid;

const SEAL_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

/// A fresh database of one backend; PostgreSQL ones are dropped at the end.
struct Db {
    store: DynStore,
    url: String,
    drop_pg: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

fn pg_admin_url() -> String {
    std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

async fn sqlite() -> Db {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("suite.db").display());
    let store = portcullis::store::open(&url, Sealer::from_key(Some(SEAL_KEY)).unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    Db { store, url, drop_pg: None, _dir: Some(dir) }
}

async fn postgres() -> Db {
    use sqlx::Connection;
    let admin = pg_admin_url();
    let name = format!("portcullis_test_{}", Uuid::now_v7().simple());
    let mut c =
        sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL on 127.0.0.1:5432 (PORTCULLIS_TEST_POSTGRES)");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    let base = admin.rsplit_once('/').unwrap().0;
    let url = format!("{base}/{name}");
    let store = portcullis::store::open(&url, Sealer::from_key(Some(SEAL_KEY)).unwrap()).await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.expect("migrations run twice");
    Db { store, url, drop_pg: Some((admin, name)), _dir: None }
}

impl Db {
    async fn close(self) {
        drop(self.store);
        if let Some((admin, name)) = self.drop_pg {
            use sqlx::Connection;
            let mut c = sqlx::PgConnection::connect(&admin).await.unwrap();
            let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
        }
    }
}

fn t0() -> DateTime<Utc> {
    Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()
}

fn gateway(name: &str) -> Gateway {
    Gateway {
        id: Uuid::now_v7(),
        name: name.into(),
        inbound: InboundAuth::default(),
        upstream: Some(UpstreamAuth::new("authorization", "Bearer sk-suite-secret").unwrap()),
        default_reservation_tokens: 5,
        created_at: t0(),
    }
}

fn key(g: &Gateway, name: &str, secret: &Secret) -> ApiKey {
    ApiKey {
        id: Uuid::now_v7(),
        gateway_id: g.id,
        name: name.into(),
        prefix: secret.display_prefix(),
        enabled: true,
        legacy: false,
        limits: Limits {
            cost_limit_micros: Some(12_500_000),
            token_limit: Some(1000),
            requests_per_minute: Some(60),
            reset_period: ResetPeriod::Monthly,
        },
        created_at: t0(),
        expires_at: Some(t0() + Duration::days(30)),
        last_used_at: None,
    }
}

async fn gateways_and_keys(db: &Db) {
    let s = &db.store;
    let g = gateway("alpha");
    s.insert_gateway(&g).await.unwrap();
    assert!(matches!(s.insert_gateway(&gateway("alpha")).await, Err(StoreError::AlreadyExists("gateway"))));
    assert_eq!(s.get_gateway("alpha").await.unwrap().unwrap(), g, "round trip, provider key unsealed");
    let mut g2 = g.clone();
    g2.default_reservation_tokens = 9;
    g2.upstream = None;
    s.update_gateway(&g2).await.unwrap();
    assert_eq!(s.get_gateway("alpha").await.unwrap().unwrap(), g2);
    s.update_gateway(&g).await.unwrap();

    let secrets: Vec<Secret> = (0..5).map(|_| Secret::generate(SecretKind::ApiKey)).collect();
    let keys: Vec<ApiKey> = secrets.iter().enumerate().map(|(i, sec)| key(&g, &format!("k{i}"), sec)).collect();
    for (k, sec) in keys.iter().zip(&secrets) {
        s.insert_key(k, &sec.hash()).await.unwrap();
    }
    let dup_name = key(&g, "k0", &Secret::generate(SecretKind::ApiKey));
    let err = s.insert_key(&dup_name, &Secret::generate(SecretKind::ApiKey).hash()).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists("a key with this name in the gateway")), "{err:?}");
    let dup_secret = key(&g, "other", &secrets[0]);
    let err = s.insert_key(&dup_secret, &secrets[0].hash()).await.unwrap_err();
    assert!(matches!(err, StoreError::AlreadyExists("a key with this secret")), "{err:?}");
    assert_eq!(s.get_key(keys[0].id).await.unwrap().unwrap(), keys[0]);

    let first = s.list_keys(g.id, Page { after: None, limit: 2 }).await.unwrap();
    assert_eq!(first.iter().map(|k| k.id).collect::<Vec<_>>(), [keys[0].id, keys[1].id]);
    let after = first[1].id.to_string();
    let rest = s.list_keys(g.id, Page { after: Some(&after), limit: 10 }).await.unwrap();
    assert_eq!(rest.len(), 3);

    let mut changed = keys[1].clone();
    changed.enabled = false;
    changed.name = "renamed".into();
    changed.limits = Limits::default();
    changed.expires_at = None;
    s.update_key(&changed, t0()).await.unwrap();
    assert_eq!(s.get_key(changed.id).await.unwrap().unwrap(), changed);

    let new = Secret::generate(SecretKind::ApiKey);
    s.rotate_key(keys[2].id, &new.hash(), &new.display_prefix(), Some(t0() + Duration::hours(1))).await.unwrap();
    s.delete_key(keys[3].id, t0()).await.unwrap();
    assert!(matches!(s.delete_key(keys[3].id, t0()).await, Err(StoreError::NotFound)));
    assert!(s.get_key(keys[3].id).await.unwrap().is_none());

    let snap = s.load().await.unwrap();
    assert_eq!(snap.gateways, vec![g.clone()]);
    assert_eq!(snap.keys.len(), 4, "deleted keys are not loaded");
    let rotated = snap.keys.iter().find(|(k, _)| k.id == keys[2].id).unwrap();
    assert_eq!(rotated.0.prefix, new.display_prefix());
    assert_eq!(rotated.1.len(), 2);
    assert_eq!(rotated.1[0].hash, new.hash());
    assert_eq!((rotated.1[1].hash, rotated.1[1].valid_until), (secrets[2].hash(), Some(t0() + Duration::hours(1))));

    assert!(matches!(s.delete_gateway(g.id, false, t0()).await, Err(StoreError::GatewayHasKeys(4))));
    assert_eq!(s.delete_gateway(g.id, true, t0()).await.unwrap().len(), 4);
    assert!(s.get_gateway("alpha").await.unwrap().is_none());
    s.insert_gateway(&gateway("alpha")).await.expect("a deleted gateway's name is free again");
}

async fn usage_prices_tokens_and_audit(db: &Db) {
    let s = &db.store;
    let g = gateway("beta");
    s.insert_gateway(&g).await.unwrap();
    let sec = Secret::generate(SecretKind::ApiKey);
    let k = key(&g, "used", &sec);
    s.insert_key(&k, &sec.hash()).await.unwrap();

    let mut c = Counters::empty(k.id, ResetPeriod::Monthly, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
    c.requests = 3;
    c.prompt_tokens = 30;
    c.completion_tokens = 12;
    c.cost_micros = 77;
    c.last_used_at = Some(t0());
    c.last_denied_at = Some(t0());
    c.last_deny_reason = Some("budget_exceeded".into());
    s.save_usage(std::slice::from_ref(&c), t0()).await.unwrap();
    // Another replica's increments for the same key and period add up; its older last use
    // and denial do not move the key's back.
    let mut other = Counters::empty(k.id, ResetPeriod::Monthly, c.period_start);
    (other.requests, other.prompt_tokens, other.completion_tokens, other.cost_micros) = (1, 5, 6, 3);
    other.last_used_at = Some(t0() - Duration::seconds(5));
    other.last_denied_at = Some(t0() - Duration::seconds(5));
    other.last_deny_reason = Some("rate_limit_exceeded".into());
    s.save_usage(std::slice::from_ref(&other), t0()).await.expect("increments, written again");
    let snap = s.load().await.unwrap();
    let u = snap.usage.iter().find(|u| u.key_id == k.id).unwrap();
    assert_eq!((u.requests, u.prompt_tokens, u.completion_tokens, u.cost_micros), (4, 35, 18, 80));
    assert_eq!((u.period_start, u.last_deny_reason.as_deref()), (c.period_start, Some("budget_exceeded")));
    assert_eq!(snap.keys.iter().find(|(x, _)| x.id == k.id).unwrap().0.last_used_at, Some(t0()));
    // A later denial moves forward; a counter saturates instead of wrapping.
    let mut later = Counters::empty(k.id, ResetPeriod::Monthly, c.period_start);
    later.last_denied_at = Some(t0() + Duration::seconds(1));
    later.last_deny_reason = Some("disabled".into());
    later.cost_micros = i64::MAX;
    s.save_usage(std::slice::from_ref(&later), t0()).await.unwrap();
    let snap = s.load().await.unwrap();
    let u = snap.usage.iter().find(|u| u.key_id == k.id).unwrap();
    assert_eq!((u.cost_micros, u.last_deny_reason.as_deref()), (i64::MAX, Some("disabled")));

    let p = Price { input_micros_per_million: 150_000, output_micros_per_million: 600_000 };
    s.set_price("gpt-4o-mini", &p, t0()).await.unwrap();
    s.set_price("gpt-4o-mini", &p, t0()).await.expect("set is an upsert");
    assert_eq!(s.list_prices().await.unwrap(), vec![("gpt-4o-mini".to_string(), p)]);
    s.delete_price("gpt-4o-mini").await.unwrap();
    assert!(matches!(s.delete_price("gpt-4o-mini").await, Err(StoreError::NotFound)));

    let secret = Secret::generate(SecretKind::AccessToken);
    let token = AccessToken {
        id: Uuid::now_v7(),
        name: "ci".into(),
        role: Role::Admin,
        gateways: vec!["beta".into()],
        created_at: t0(),
        expires_at: None,
        revoked_at: None,
    };
    s.insert_access_token(&StoredToken {
        token: token.clone(),
        hash: secret.hash(),
        prefix: secret.display_prefix(),
        last_used_at: None,
        bootstrap: false,
    })
    .await
    .unwrap();
    s.save_token_last_used(&[(token.id, t0() + Duration::minutes(5))]).await.unwrap();
    s.save_token_last_used(&[(token.id, t0())]).await.expect("an older time never moves it back");
    s.revoke_access_token(token.id, t0()).await.unwrap();
    let loaded = s.load().await.unwrap().access_tokens;
    let t = loaded.iter().find(|t| t.token.id == token.id).unwrap();
    assert_eq!(
        (t.token.revoked_at, t.last_used_at, t.token.gateways.clone()),
        (Some(t0()), Some(t0() + Duration::minutes(5)), vec!["beta".to_string()])
    );
    s.restore_owner_token(&secret.hash()).await.unwrap();
    let loaded = s.load().await.unwrap().access_tokens;
    let t = loaded.iter().find(|t| t.token.id == token.id).unwrap();
    assert_eq!((t.token.role, t.token.revoked_at, t.token.gateways.len()), (Role::Owner, None, 0));
    assert!(t.bootstrap && t.prefix.is_empty(), "restored as the bootstrap token, without a display prefix");

    let mut ids = Vec::new();
    for (i, gw) in ["beta", "gamma", "beta"].iter().enumerate() {
        let e = AuditEvent {
            id: Uuid::now_v7(),
            at: t0() + Duration::seconds(i as i64),
            token_id: Some(token.id),
            token_name: "ci".into(),
            action: "KeyService/UpdateKey".into(),
            gateway: Some(gw.to_string()),
            target: format!("t{i}"),
            result: "OK".into(),
        };
        s.insert_audit(&e).await.unwrap();
        ids.push(e.id.to_string());
    }
    let all = s.list_audit(None, None, 10).await.unwrap();
    assert_eq!(all.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t2", "t1", "t0"], "newest first");
    let beta = s.list_audit(Some("beta"), None, 1).await.unwrap();
    assert_eq!(beta[0].target, "t2");
    let next = s.list_audit(Some("beta"), Some(&ids[2]), 10).await.unwrap();
    assert_eq!(next.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t0"]);

    // Retention: events from before the cutoff go, a batch at a time, oldest first.
    assert_eq!(s.prune_audit(t0() + Duration::seconds(2), 1).await.unwrap(), 1);
    let left = s.list_audit(None, None, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t2", "t1"], "the oldest went first");
    assert_eq!(portcullis::upkeep::prune_audit(&**s, t0() + Duration::seconds(2)).await, 1);
    assert_eq!(portcullis::upkeep::prune_audit(&**s, t0() + Duration::seconds(2)).await, 0);
    let left = s.list_audit(None, None, 10).await.unwrap();
    assert_eq!(left.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t2"], "the cutoff itself stays");
}

/// The provider key is sealed in the table, whatever the backend.
async fn provider_keys_are_sealed(db: &Db) {
    db.store.insert_gateway(&gateway("sealed")).await.unwrap();
    let raw: String = if db.url.starts_with("sqlite") {
        let pool = sqlx::SqlitePool::connect(&db.url).await.unwrap();
        sqlx::query_scalar("SELECT upstream_value FROM gateways WHERE name = 'sealed'").fetch_one(&pool).await.unwrap()
    } else {
        let pool = sqlx::PgPool::connect(&db.url).await.unwrap();
        let v = sqlx::query_scalar("SELECT upstream_value FROM gateways WHERE name = 'sealed'")
            .fetch_one(&pool)
            .await
            .unwrap();
        pool.close().await;
        v
    };
    assert!(raw.starts_with("enc:v1:") && !raw.contains("sk-suite-secret"), "{raw}");
}

/// A flush of more keys than one statement holds (two statements per 500 keys) writes
/// every one of them, and skips a key deleted meanwhile.
async fn a_flush_of_many_keys_writes_each(db: &Db) {
    let s = &db.store;
    let g = gateway("many");
    s.insert_gateway(&g).await.unwrap();
    let start = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let mut counters = Vec::new();
    for i in 0..1203u64 {
        let sec = Secret::generate(SecretKind::ApiKey);
        let k = key(&g, &format!("k{i}"), &sec);
        s.insert_key(&k, &sec.hash()).await.unwrap();
        let mut c = Counters::empty(k.id, ResetPeriod::Monthly, start);
        (c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micros) = (i, 2 * i, 3 * i, 4 * i as i64);
        c.last_used_at = Some(t0() + Duration::seconds(i as i64));
        c.last_deny_reason = (i % 2 == 0).then(|| "rate_limit_exceeded".to_string());
        counters.push(c);
    }
    // Not in api_keys: skipped, not an error.
    counters.push(Counters::empty(Uuid::now_v7(), ResetPeriod::Monthly, start));
    s.save_usage(&counters, t0()).await.unwrap();
    let snap = s.load().await.unwrap();
    assert_eq!(snap.usage.len(), 1203);
    for c in &counters[..1203] {
        let u = snap.usage.iter().find(|u| u.key_id == c.key_id).unwrap();
        assert_eq!(
            (u.requests, u.prompt_tokens, u.completion_tokens, u.cost_micros),
            (c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micros)
        );
        assert_eq!(u.last_deny_reason, c.last_deny_reason);
        assert_eq!(snap.keys.iter().find(|(k, _)| k.id == c.key_id).unwrap().0.last_used_at, c.last_used_at);
    }
}

/// Replicas follow each other through `changes_since` (PostgreSQL; SQLite serves one
/// replica and says so). The same change may come twice (the cursor's margin, widened by
/// transactions of other tests on the same server): assertions look for, not count.
async fn changes_since_returns_every_change_the_view_needs(db: &Db) {
    let s = &db.store;
    if !s.is_shared() {
        assert!(matches!(s.changes_since(0).await, Err(StoreError::Unsupported(_))));
        return;
    }
    let start = s.changes_since(0).await.unwrap();
    assert!(start.is_empty(), "a fresh database has nothing to follow");
    let g = gateway("gamma");
    s.insert_gateway(&g).await.unwrap();
    let sec = Secret::generate(SecretKind::ApiKey);
    let k = key(&g, "followed", &sec);
    s.insert_key(&k, &sec.hash()).await.unwrap();
    let p = Price { input_micros_per_million: 1, output_micros_per_million: 2 };
    s.set_price("m-follow", &p, t0()).await.unwrap();
    let token =
        StoredToken::owner("followed", Secret::generate(SecretKind::AccessToken).hash(), "pcm_x".into(), false, t0());
    s.insert_access_token(&token).await.unwrap();

    let c = s.changes_since(start.next).await.unwrap();
    assert!(c.gateways.contains(&g));
    assert!(c.keys.iter().any(|(x, secrets)| *x == k && secrets.len() == 1));
    assert!(c.prices.contains(&("m-follow".to_string(), p)));
    assert!(c.access_tokens.iter().any(|t| t.token.id == token.token.id));
    assert!(c.removed_keys.is_empty() && c.removed_gateways.is_empty() && c.removed_prices.is_empty());
    assert!(c.version > start.version && c.next >= start.next);

    // A usage flush writes last use on the key row: no change the view needs.
    let mut used = Counters::empty(k.id, ResetPeriod::Monthly, t0());
    used.requests = 1;
    used.last_used_at = Some(t0());
    s.save_usage(&[used], t0()).await.unwrap();
    let after_usage = s.changes_since(c.next).await.unwrap();
    assert!(after_usage.version <= c.version, "no new version for usage");

    s.rotate_key(k.id, &Secret::generate(SecretKind::ApiKey).hash(), "pcs_new", Some(t0() + Duration::hours(1)))
        .await
        .unwrap();
    s.revoke_access_token(token.token.id, t0()).await.unwrap();
    let r = s.changes_since(c.next).await.unwrap();
    assert!(r.keys.iter().any(|(x, secrets)| x.id == k.id && secrets.len() == 2), "a rotated key with both secrets");
    assert!(r.access_tokens.iter().any(|t| t.token.id == token.token.id && t.token.revoked_at.is_some()));
    assert!(r.version > c.version);

    s.delete_price("m-follow").await.unwrap();
    s.delete_gateway(g.id, true, t0()).await.unwrap();
    let d = s.changes_since(r.next).await.unwrap();
    assert_eq!((d.removed_keys.as_slice(), d.removed_gateways.as_slice()), ([k.id].as_slice(), [g.id].as_slice()));
    assert_eq!(d.removed_prices, vec!["m-follow".to_string()]);
    assert!(d.keys.is_empty() && d.gateways.is_empty() && d.prices.is_empty());
    assert!(s.list_prices().await.unwrap().is_empty(), "a deleted price is not listed");

    s.set_price("m-follow", &p, t0()).await.unwrap();
    let all = s.changes_since(0).await.unwrap();
    assert!(all.prices.contains(&("m-follow".to_string(), p)) && all.removed_prices.is_empty(), "set again");
    assert!(all.removed_keys.contains(&k.id) && all.removed_gateways.contains(&g.id), "from 0: deletions too");
}

/// Usage history: increments per key, hour and model add up, read back per hour or day,
/// per key or gateway, by model or not; old hours are pruned.
async fn usage_history_adds_up_and_reads_back(db: &Db) {
    use portcullis::domain::budget::UsageBucket;
    use portcullis::store::{Granularity, HistoryQuery, HistoryScope};
    let s = &db.store;
    let g = gateway("hist");
    s.insert_gateway(&g).await.unwrap();
    let (a, b) = (Secret::generate(SecretKind::ApiKey), Secret::generate(SecretKind::ApiKey));
    let (ka, kb) = (key(&g, "a", &a), key(&g, "b", &b));
    s.insert_key(&ka, &a.hash()).await.unwrap();
    s.insert_key(&kb, &b.hash()).await.unwrap();
    let day = Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap();
    let bucket = |k: &ApiKey, hours: i64, model: &str, n: u64| UsageBucket {
        key_id: k.id,
        hour: day + Duration::hours(hours),
        model: model.into(),
        requests: n,
        prompt_tokens: 10 * n,
        completion_tokens: 20 * n,
        cost_micros: 5 * n as i64,
    };
    let rows = [bucket(&ka, 1, "m1", 1), bucket(&ka, 1, "m2", 2), bucket(&ka, 30, "m1", 4), bucket(&kb, 2, "m1", 8)];
    s.save_usage_history(&rows).await.unwrap();
    s.save_usage_history(&rows[..1]).await.expect("increments add up");
    let q = |scope, granularity, by_model| HistoryQuery {
        scope,
        from: day,
        to: day + Duration::days(2),
        granularity,
        by_model,
    };
    let per_day = s.usage_history(&q(HistoryScope::Key(ka.id), Granularity::Day, false)).await.unwrap();
    let got: Vec<_> = per_day.iter().map(|r| (r.start, r.requests, r.completion_tokens, r.cost_micros)).collect();
    assert_eq!(got, vec![(day, 4, 80, 20), (day + Duration::days(1), 4, 80, 20)]);
    let by_model = s.usage_history(&q(HistoryScope::Key(ka.id), Granularity::Hour, true)).await.unwrap();
    let got: Vec<_> = by_model.iter().map(|r| (r.start, r.model.as_deref(), r.requests)).collect();
    let h = |n| day + Duration::hours(n);
    assert_eq!(got, vec![(h(1), Some("m1"), 2), (h(1), Some("m2"), 2), (h(30), Some("m1"), 4)]);
    let gateway = s.usage_history(&q(HistoryScope::Gateway(g.id), Granularity::Day, false)).await.unwrap();
    assert_eq!(gateway.iter().map(|r| r.requests).collect::<Vec<_>>(), vec![12, 4], "both keys, per day");
    assert_eq!(s.prune_usage_history(day + Duration::hours(2), 10).await.unwrap(), 2, "the hour-1 rows");
    let left = s.usage_history(&q(HistoryScope::Gateway(g.id), Granularity::Day, false)).await.unwrap();
    assert_eq!(left.iter().map(|r| r.requests).collect::<Vec<_>>(), vec![8, 4]);
}

macro_rules! test_with_all_storage_impls {
    ($($name:ident),* $(,)?) => {
        mod sqlite_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = super::sqlite().await;
                    super::$name(&db).await;
                    db.close().await;
                }
            )*
        }
        mod postgres_backend {
            $(
                #[tokio::test]
                async fn $name() {
                    let db = super::postgres().await;
                    super::$name(&db).await;
                    db.close().await;
                }
            )*
        }
    };
}

test_with_all_storage_impls!(
    usage_history_adds_up_and_reads_back,
    gateways_and_keys,
    usage_prices_tokens_and_audit,
    provider_keys_are_sealed,
    a_flush_of_many_keys_writes_each,
    changes_since_returns_every_change_the_view_needs
);
