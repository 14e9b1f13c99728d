//! `portcullis` as a process: first-start owner token, state across a SIGTERM restart and a
//! crash, exit code 0 on SIGTERM, secrets never in the logs, `portcullis migrate`. The admin
//! client (the CLI) as a process is in `cli.rs`.

mod common;

use std::time::Duration;

use common::process::{BIN, Proc, clients};
use common::*;
use portcullis::pb;
use tokio::process::Command;

#[tokio::test]
async fn state_survives_a_sigterm_restart_and_secrets_stay_out_of_logs() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("state.db").display());
    let (authz, admin) = (free_port(), free_port());

    // First start: no owner token exists, so one is created and printed once.
    let mut p = Proc::spawn(&db, authz, admin, &[]);
    let lines = p.wait_for("admin listener").await;
    let token = lines
        .iter()
        .find_map(|l| l.trim().strip_prefix("pcm_").map(|rest| format!("pcm_{rest}")))
        .expect("the first owner token is printed");
    assert_eq!(token.len(), 42);

    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start(authz, upstream.port).await;
    let (mut gw, mut keys) = clients(admin, &token).await;
    gw.create_gateway(pb::CreateGatewayRequest {
        name: "demo".into(),
        upstream_auth: Some(pb::UpstreamAuth {
            header_name: "authorization".into(),
            value: "Bearer sk-provider-never-logged".into(),
            value_set: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
    let (kept, kept_secret) = create_key(&mut keys, "demo", "kept").await;
    let (disabled, disabled_secret) = create_key(&mut keys, "demo", "disabled").await;
    keys.update_key(pb::UpdateKeyRequest { id: disabled.id.clone(), enabled: Some(false), ..Default::default() })
        .await
        .unwrap();
    let send = |secret: String| {
        let envoy = &envoy;
        async move { envoy.send("demo.gateway.local", "/v1/chat/completions", &[("x-api-key", &secret)]).await.status }
    };
    assert_eq!(send(kept_secret.clone()).await, 200);
    assert_eq!(send(disabled_secret.clone()).await, 401);
    assert_eq!(send("pcs_wrong".into()).await, 401);
    drop((gw, keys));

    let (status, log1) = p.sigterm().await;
    assert!(status.success(), "SIGTERM exits 0, got {status:?}");
    assert!(log1.iter().any(|l| l.contains("stopped")), "{log1:#?}");

    // Second start on the same database: no new owner token, same state.
    let mut p = Proc::spawn(&db, authz, admin, &[]);
    let lines = p.wait_for("admin listener").await;
    assert!(!lines.iter().any(|l| l.contains("pcm_")), "no second owner token: {lines:#?}");
    let status = eventually("envoy reaches the restarted portcullis", Duration::from_secs(20), || {
        let s = kept_secret.clone();
        let send = &send;
        async move {
            let st = send(s).await;
            (st != 503).then_some(st)
        }
    })
    .await;
    assert_eq!(status, 200);
    assert_eq!(send(disabled_secret.clone()).await, 401);
    let (_, mut keys) = clients(admin, &token).await;
    let listed = keys
        .list_keys(pb::ListKeysRequest { gateway: "demo".into(), ..Default::default() })
        .await
        .unwrap()
        .into_inner()
        .keys;
    assert_eq!(listed.iter().map(|k| k.id.as_str()).collect::<Vec<_>>(), [kept.id.as_str(), disabled.id.as_str()]);
    keys.update_key(pb::UpdateKeyRequest { id: disabled.id.clone(), enabled: Some(true), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(send(disabled_secret.clone()).await, 200);
    let received = upstream.received().await;
    assert!(received.iter().all(|r| r["headers"]["authorization"] == "Bearer sk-provider-never-logged"));
    drop(keys);

    let (status, log2) = p.sigterm().await;
    assert!(status.success());
    let all = [log1, log2].concat().join("\n");
    for secret in [kept_secret.as_str(), disabled_secret.as_str(), "sk-provider-never-logged"] {
        assert!(!all.contains(secret), "a secret reached the logs");
    }
    assert!(all.contains("reason=disabled"), "denials say why: {all}");
    // One request can be followed: each Check, metered response and admin call in its span.
    let denial = all.lines().find(|l| l.contains("denied: invalid key")).expect("the disabled key's denial");
    assert!(denial.contains("check{gateway=\"demo\"") && denial.contains("decision=\"deny\""), "{denial}");
    assert!(all.lines().any(|l| l.contains("metering{key_id=Some(")), "{all}");
    let created = all.lines().find(|l| l.contains("admin call") && l.contains("KeyService/CreateKey")).unwrap();
    assert!(
        created.contains("admin_call{action=\"KeyService/CreateKey\"") && created.contains("gateway=\"demo\""),
        "{created}"
    );
    assert_eq!(all.matches(&token).count(), 1, "the owner token is printed exactly once");
}

#[tokio::test]
async fn bootstrap_token_is_an_owner_and_short_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("b.db").display());
    let out = Command::new(BIN)
        .args(["serve", "--database-url", &db, "--authz-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"])
        .env("PORTCULLIS_BOOTSTRAP_TOKEN", "short-bootstrap-secret-31-chars")
        .output()
        .await
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("PORTCULLIS_BOOTSTRAP_TOKEN: must be at least 32"), "{err}");
    assert!(!err.contains("short-bootstrap"), "{err}");

    let admin = free_port();
    let mut p = Proc::spawn(&db, free_port(), admin, &[("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)]);
    let lines = p.wait_for("admin listener").await;
    assert!(!lines.iter().any(|l| l.contains("pcm_")), "a bootstrap token replaces the printed one");
    let (mut gw, _) = clients(admin, OWNER_TOKEN).await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    assert!(p.sigterm().await.0.success());
}

#[tokio::test]
async fn dev_mode_warns_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("d.db").display());
    let admin = free_port();
    let mut p = Proc::spawn(
        &db,
        free_port(),
        admin,
        &[("PORTCULLIS_DEV", "true"), ("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)],
    );
    let lines = p.wait_for("admin listener").await;
    assert!(lines.iter().any(|l| l.contains("WARN") && l.contains("test-token")), "{lines:#?}");
    let (mut gw, _) = clients(admin, "test-token").await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    assert!(p.sigterm().await.0.success());
}

#[tokio::test]
async fn migrate_creates_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("m.db");
    let out = Command::new(BIN)
        .args(["migrate", "--database-url", &format!("sqlite://{}", path.display())])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(path.exists());
    let bad = Command::new(BIN).args(["migrate", "--database-url", "mysql://x"]).output().await.unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unsupported database URL"));
}

#[tokio::test]
async fn usage_survives_a_sigterm_restart() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("usage.db").display());
    let (authz, admin) = (free_port(), free_port());
    // A flush interval far longer than the test: only the SIGTERM flush can save the usage.
    let env = [("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN), ("PORTCULLIS_USAGE_FLUSH_INTERVAL", "1h")];
    let mut p = Proc::spawn(&db, authz, admin, &env);
    p.wait_for("admin listener").await;
    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start(authz, upstream.port).await;
    let (mut gw, mut keys) = clients(admin, OWNER_TOKEN).await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "budgeted".into(),
            limits: Some(pb::Limits { token_limit: Some(100), ..Default::default() }),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (id, secret) = (r.key.unwrap().id, r.secret);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "20,30"), ("content-type", "application/json")];
    let send =
        || common::http::request(envoy.port, "POST", "demo.gateway.local", "/v1/chat/completions", &h, Some(body));
    let usage = |keys: Keys| {
        let id = id.clone();
        async move {
            let mut keys = keys;
            keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.unwrap().into_inner()
        }
    };
    // Each request reserves (capped at the 100 tokens left) until it is metered: send the
    // second once the first is.
    for n in 1..=2 {
        assert_eq!(send().await.status, 200);
        eventually("metered requests", Duration::from_secs(10), || {
            let k = keys.clone();
            let u = usage(k);
            async move { (u.await.requests == n).then_some(()) }
        })
        .await;
    }
    drop((gw, keys));
    let (status, _) = p.sigterm().await;
    assert!(status.success());

    let mut p = Proc::spawn(&db, authz, admin, &env);
    p.wait_for("admin listener").await;
    let (_, keys) = clients(admin, OWNER_TOKEN).await;
    let u = usage(keys.clone()).await;
    assert_eq!((u.requests, u.prompt_tokens, u.completion_tokens), (2, 40, 60), "usage survived the restart");
    // The budget still holds after the restart: 100 tokens are used up.
    let denied = eventually("envoy reaches the restarted portcullis", Duration::from_secs(20), || {
        let send = &send;
        async move {
            let r = send().await;
            (r.status != 503).then_some(r)
        }
    })
    .await;
    assert_eq!(denied.status, 429, "{}", denied.body);
    let key = {
        let mut k = keys.clone();
        k.get_key(pb::GetKeyRequest { id: id.clone() }).await.unwrap().into_inner()
    };
    assert!(key.last_used_at.is_some(), "last_used_at was written by the flush");
    drop(keys);
    assert!(p.sigterm().await.0.success());
}

#[tokio::test]
async fn usage_reaches_storage_within_a_second_and_survives_a_crash() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crash.db");
    let db = format!("sqlite://{}", path.display());
    let (authz, admin) = (free_port(), free_port());
    let env = [("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)];
    let mut p = Proc::spawn(&db, authz, admin, &env);
    p.wait_for("admin listener").await;
    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start(authz, upstream.port).await;
    let (mut gw, mut keys) = clients(admin, OWNER_TOKEN).await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, secret) = create_key(&mut keys, "demo", "crashy").await;
    let h = [("x-api-key", secret.as_str()), ("x-fake-usage", "7,8"), ("content-type", "application/json")];
    for _ in 0..3 {
        let r = common::http::request(envoy.port, "POST", "demo.gateway.local", "/v1/chat/completions", &h, Some("{}"))
            .await;
        assert_eq!(r.status, 200);
    }
    // Watch the database itself: the periodic flush writes within about a second.
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&db).await.unwrap();
    let started = std::time::Instant::now();
    eventually("usage in the database", Duration::from_secs(5), || {
        let pool = pool.clone();
        let id = key.id.clone();
        async move {
            let row: Option<(i64, i64)> =
                sqlx::query_as("SELECT requests, prompt_tokens + completion_tokens FROM key_usage WHERE key_id = ?")
                    .bind(id)
                    .fetch_optional(&pool)
                    .await
                    .ok()
                    .flatten();
            (row == Some((3, 45))).then_some(())
        }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(3), "flushed in {:?}", started.elapsed());
    pool.close().await;
    // A crash (SIGKILL: no drain, no final flush) keeps what was flushed.
    p.child.kill().await.unwrap();
    drop((gw, keys));
    let mut p = Proc::spawn(&db, authz, admin, &env);
    p.wait_for("admin listener").await;
    let (_, mut keys) = clients(admin, OWNER_TOKEN).await;
    let u = keys.get_key_usage(pb::GetKeyUsageRequest { id: key.id.clone() }).await.unwrap().into_inner();
    assert_eq!((u.requests, u.total_tokens), (3, 45));
    drop(keys);
    assert!(p.sigterm().await.0.success());
}
