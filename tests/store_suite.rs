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
use portcullis::domain::view::KeySecret;
use portcullis::store::sealing::Sealer;
use portcullis::store::{AuditQuery, DynStore, KeyOrder, KeyQuery, StoreError};
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

fn key_query(gateway_id: Uuid, order: KeyOrder, descending: bool, limit: u32) -> KeyQuery {
    KeyQuery { gateway_id, name_contains: None, status: None, order, descending, after: None, limit, now: t0() }
}

fn audit(gateway: Option<&str>, before: Option<Uuid>) -> AuditQuery {
    AuditQuery { gateway: gateway.map(str::to_string), before, limit: 10, ..Default::default() }
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

    let first = s.search_keys(&key_query(g.id, KeyOrder::Id, false, 2)).await.unwrap();
    assert_eq!(first.iter().map(|(k, _)| k.id).collect::<Vec<_>>(), [keys[0].id, keys[1].id]);
    let after = KeyQuery { after: Some(first[1].1.clone()), ..key_query(g.id, KeyOrder::Id, false, 10) };
    let rest = s.search_keys(&after).await.unwrap();
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
        ids.push(e.id);
    }
    let all = s.search_audit(&audit(None, None)).await.unwrap();
    assert_eq!(all.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t2", "t1", "t0"], "newest first");
    let beta = s.search_audit(&AuditQuery { limit: 1, ..audit(Some("beta"), None) }).await.unwrap();
    assert_eq!(beta[0].target, "t2");
    let next = s.search_audit(&audit(Some("beta"), Some(ids[2]))).await.unwrap();
    assert_eq!(next.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t0"]);

    // Retention: events from before the cutoff go, a batch at a time, oldest first.
    assert_eq!(s.prune_audit(t0() + Duration::seconds(2), 1).await.unwrap(), 1);
    let left = s.search_audit(&audit(None, None)).await.unwrap();
    assert_eq!(left.iter().map(|e| e.target.as_str()).collect::<Vec<_>>(), ["t2", "t1"], "the oldest went first");
    assert_eq!(portcullis::upkeep::prune_audit(&**s, t0() + Duration::seconds(2)).await, 1);
    assert_eq!(portcullis::upkeep::prune_audit(&**s, t0() + Duration::seconds(2)).await, 0);
    let left = s.search_audit(&audit(None, None)).await.unwrap();
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

/// ListKeys' search: by name (ignoring case; LIKE's characters are literal), by status,
/// in every order both ways (spend from the current period's ledger row), in keyset pages
/// that add up to the whole listing.
async fn keys_are_searched_by_name_and_status_in_every_order(db: &Db) {
    use portcullis::domain::key::KeyStatus;
    let s = &db.store;
    let g = gateway("search");
    s.insert_gateway(&g).await.unwrap();
    let other = gateway("other");
    s.insert_gateway(&other).await.unwrap();
    let hours = Duration::hours;
    // name, enabled, expires in (days), last used (hours ago), spend this month (micros)
    let specs = [
        ("Alpha", true, Some(10), Some(1), 300),
        ("beta_1", true, None, None, 100),
        ("GAMMA%", false, Some(5), Some(3), 0),
        ("alphabet", true, Some(-1), Some(2), 200),
    ];
    let mut usage = Vec::new();
    for (i, (name, enabled, expires, used, spend)) in specs.into_iter().enumerate() {
        let secret = Secret::generate(SecretKind::ApiKey);
        let mut k = key(&g, name, &secret);
        k.enabled = enabled;
        k.created_at = t0() - hours(i as i64);
        k.expires_at = expires.map(|d| t0() + Duration::days(d));
        k.last_used_at = used.map(|h| t0() - hours(h));
        s.insert_key(&k, &secret.hash()).await.unwrap();
        let month = portcullis::domain::period::bounds(ResetPeriod::Monthly, t0()).0;
        let mut c = Counters::empty(k.id, ResetPeriod::Monthly, month);
        (c.requests, c.cost_micros) = (1, spend);
        usage.push(c);
        // Last month's spend is not this period's.
        let mut old = Counters::empty(k.id, ResetPeriod::Monthly, month - Duration::days(3));
        old.cost_micros = 1_000_000 * (4 - i as i64);
        usage.push(old);
    }
    s.save_usage(&usage, t0()).await.unwrap();
    let outsider = Secret::generate(SecretKind::ApiKey);
    s.insert_key(&key(&other, "alpha-elsewhere", &outsider), &outsider.hash()).await.unwrap();
    let gone = Secret::generate(SecretKind::ApiKey);
    let gone_key = key(&g, "alpha-deleted", &gone);
    s.insert_key(&gone_key, &gone.hash()).await.unwrap();
    s.delete_key(gone_key.id, t0()).await.unwrap();

    let names =
        |rows: Vec<(ApiKey, portcullis::store::KeyCursor)>| rows.into_iter().map(|(k, _)| k.name).collect::<Vec<_>>();
    let orders = [
        (KeyOrder::Id, ["Alpha", "beta_1", "GAMMA%", "alphabet"]),
        (KeyOrder::Name, ["Alpha", "alphabet", "beta_1", "GAMMA%"]),
        (KeyOrder::CreatedAt, ["alphabet", "GAMMA%", "beta_1", "Alpha"]),
        (KeyOrder::LastUsedAt, ["beta_1", "GAMMA%", "alphabet", "Alpha"]),
        (KeyOrder::ExpiresAt, ["alphabet", "GAMMA%", "Alpha", "beta_1"]),
        (KeyOrder::Spend, ["GAMMA%", "beta_1", "alphabet", "Alpha"]),
    ];
    for (order, want) in orders {
        for descending in [false, true] {
            let mut want: Vec<&str> = want.to_vec();
            if descending {
                want.reverse();
            }
            let all = names(s.search_keys(&key_query(g.id, order, descending, 10)).await.unwrap());
            assert_eq!(all, want, "{order:?} descending={descending}");
            // One key a page, each page after the last one's cursor.
            let mut paged = Vec::new();
            let mut q = key_query(g.id, order, descending, 1);
            while let Some((k, cursor)) = s.search_keys(&q).await.unwrap().pop() {
                paged.push(k.name);
                q.after = Some(cursor);
            }
            assert_eq!(paged, want, "{order:?} descending={descending}, paged");
        }
    }

    let filtered = |name: Option<&str>, status: Option<KeyStatus>| {
        let q =
            KeyQuery { name_contains: name.map(str::to_string), status, ..key_query(g.id, KeyOrder::Name, false, 10) };
        async move { names(s.search_keys(&q).await.unwrap()) }
    };
    assert_eq!(filtered(Some("ALPHA"), None).await, ["Alpha", "alphabet"]);
    assert_eq!(filtered(Some("_"), None).await, ["beta_1"], "_ is literal");
    assert_eq!(filtered(Some("a%"), None).await, ["GAMMA%"], "% is literal");
    assert_eq!(filtered(None, Some(KeyStatus::Active)).await, ["Alpha", "beta_1"]);
    assert_eq!(filtered(None, Some(KeyStatus::Disabled)).await, ["GAMMA%"]);
    assert_eq!(filtered(None, Some(KeyStatus::Expired)).await, ["alphabet"]);
    assert_eq!(filtered(Some("alpha"), Some(KeyStatus::Active)).await, ["Alpha"]);
    assert!(filtered(Some("zeta"), None).await.is_empty());
}

/// Audit events filtered by actor (id or name), action (an RPC or a service), target and
/// time range, all together.
async fn audit_events_are_filtered(db: &Db) {
    let s = &db.store;
    let (ci, ops) = (Uuid::now_v7(), Uuid::now_v7());
    let events = [
        (ci, "ci", "KeyService/UpdateKey", "k1", 0),
        (ci, "ci", "KeyService/DeleteKey", "k2", 10),
        (ops, "ops", "GatewayService/CreateGateway", "g1", 20),
        (ops, "ops", "KeyService/UpdateKey", "k1", 30),
    ];
    for (token, name, action, target, secs) in events {
        let e = AuditEvent {
            id: Uuid::now_v7(),
            at: t0() + Duration::seconds(secs),
            token_id: Some(token),
            token_name: name.into(),
            action: action.into(),
            gateway: Some("demo".into()),
            target: target.into(),
            result: "OK".into(),
        };
        s.insert_audit(&e).await.unwrap();
    }
    let find = |q: AuditQuery| async move {
        let q = AuditQuery { limit: 10, ..q };
        s.search_audit(&q).await.unwrap().into_iter().map(|e| (e.token_name, e.action, e.target)).collect::<Vec<_>>()
    };
    let one = |n: &str, a: &str, t: &str| (n.to_string(), a.to_string(), t.to_string());
    assert_eq!(find(AuditQuery { actor: Some("ci".into()), ..Default::default() }).await.len(), 2);
    assert_eq!(find(AuditQuery { actor: Some(ops.to_string()), ..Default::default() }).await.len(), 2, "by token id");
    assert_eq!(
        find(AuditQuery { action: Some("KeyService".into()), ..Default::default() }).await,
        [
            one("ops", "KeyService/UpdateKey", "k1"),
            one("ci", "KeyService/DeleteKey", "k2"),
            one("ci", "KeyService/UpdateKey", "k1")
        ]
    );
    assert_eq!(
        find(AuditQuery { action: Some("Key".into()), ..Default::default() }).await.len(),
        0,
        "a whole service name"
    );
    assert_eq!(
        find(AuditQuery {
            action: Some("KeyService/UpdateKey".into()),
            target: Some("k1".into()),
            actor: Some("ci".into()),
            ..Default::default()
        })
        .await,
        [one("ci", "KeyService/UpdateKey", "k1")]
    );
    let range = AuditQuery {
        from: Some(t0() + Duration::seconds(10)),
        to: Some(t0() + Duration::seconds(30)),
        ..Default::default()
    };
    assert_eq!(
        find(range).await,
        [one("ops", "GatewayService/CreateGateway", "g1"), one("ci", "KeyService/DeleteKey", "k2")],
        "from included, to excluded"
    );
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

async fn many_keys_are_inserted_at_once_or_not_at_all(db: &Db) {
    let s = &db.store;
    let g = gateway("bulk");
    s.insert_gateway(&g).await.unwrap();
    // More than one statement's worth, so the chunks are seen to join up.
    let secrets: Vec<Secret> = (0..1_203).map(|_| Secret::generate(SecretKind::ApiKey)).collect();
    let keys: Vec<(ApiKey, _)> =
        secrets.iter().enumerate().map(|(i, sec)| (key(&g, &format!("bulk-{i}"), sec), sec.hash())).collect();
    s.insert_keys(&keys).await.unwrap();
    let snap = s.load().await.unwrap();
    assert_eq!(snap.keys.len(), keys.len());
    for (k, hash) in [&keys[0], &keys[1_202]] {
        let (loaded, loaded_secrets) = snap.keys.iter().find(|(x, _)| x.id == k.id).unwrap();
        assert_eq!((loaded, loaded_secrets.as_slice()), (k, &[KeySecret::current(*hash)][..]));
    }
    // A name taken (in the second chunk) inserts none of them.
    let sec = Secret::generate(SecretKind::ApiKey);
    let mut again: Vec<(ApiKey, _)> = (0..1_001)
        .map(|i| {
            let sec = Secret::generate(SecretKind::ApiKey);
            (key(&g, &format!("again-{i}"), &sec), sec.hash())
        })
        .collect();
    again.push((key(&g, "bulk-7", &sec), sec.hash()));
    assert!(matches!(s.insert_keys(&again).await, Err(StoreError::AlreadyExists(_))));
    assert_eq!(s.load().await.unwrap().keys.len(), keys.len());
}

/// The ledger's rows are stamped with the database's clock, whatever the writing replica's
/// clock says, so reconciliation (rows changed since the database's last read) never misses
/// the rows of a replica whose clock is behind; a key's period reads back as written.
async fn ledger_rows_carry_the_database_clock(db: &Db) {
    let s = &db.store;
    let g = gateway("ledger");
    s.insert_gateway(&g).await.unwrap();
    let sec = Secret::generate(SecretKind::ApiKey);
    let k = key(&g, "stamped", &sec);
    s.insert_key(&k, &sec.hash()).await.unwrap();
    let (_, read_at) = s.usage_changed_since(DateTime::UNIX_EPOCH).await.unwrap();
    let mut c = Counters::empty(k.id, ResetPeriod::Never, DateTime::UNIX_EPOCH);
    (c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micros) = (2, 10, 20, 30);
    let an_hour_behind = Utc::now() - Duration::hours(1);
    s.save_usage(std::slice::from_ref(&c), an_hour_behind).await.unwrap();
    let (rows, _) = s.usage_changed_since(read_at - Duration::minutes(1)).await.unwrap();
    let row = rows.iter().find(|r| r.key_id == k.id).expect("the row is seen as changed since the last read");
    assert_eq!((row.requests, row.prompt_tokens, row.completion_tokens, row.cost_micros), (2, 10, 20, 30));
    let period = s.period_usage(k.id, DateTime::UNIX_EPOCH).await.unwrap().expect("the key's period");
    assert_eq!((period.requests, period.total_tokens(), period.cost_micros), (2, 30, 30));
    assert!(s.period_usage(k.id, t0()).await.unwrap().is_none(), "no usage in another period");
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
    keys_are_searched_by_name_and_status_in_every_order,
    audit_events_are_filtered,
    usage_history_adds_up_and_reads_back,
    gateways_and_keys,
    usage_prices_tokens_and_audit,
    provider_keys_are_sealed,
    a_flush_of_many_keys_writes_each,
    changes_since_returns_every_change_the_view_needs,
    many_keys_are_inserted_at_once_or_not_at_all,
    ledger_rows_carry_the_database_clock,
);
