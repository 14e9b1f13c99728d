//! Portcullis on PostgreSQL end to end: admin writes, Check through a real Envoy,
//! metering, and state and usage across a restart.

mod common;

use common::*;
use portcullis::pb;
use sqlx::Connection;

#[tokio::test]
async fn portcullis_runs_on_postgres() {
    let admin =
        std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let name = format!("portcullis_e2e_{}", uuid::Uuid::now_v7().simple());
    let mut c = sqlx::PgConnection::connect(&admin).await.expect("PostgreSQL on 127.0.0.1:5432");
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);

    let mut server = TestServer::start_on(tempfile::tempdir().unwrap(), url.clone(), &[]).await;
    // A second replica on the same database is refused, not silently inconsistent.
    let err = TestServer::try_start_on(url.clone(), &[]).await.err().expect("a second replica is refused");
    assert!(err.contains("another portcullis process is serving from this database"), "{err}");
    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start(server.authz_port(), upstream.port).await;
    let (mut gw, mut keys) = server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let limits = pb::Limits { token_limit: Some(100), ..Default::default() };
    let r = keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "pg".into(),
            limits: Some(limits),
            expires_at: None,
        })
        .await
        .unwrap()
        .into_inner();
    let (id, secret) = (r.key.unwrap().id, r.secret);
    let r = envoy.send("demo.gateway.local", "/v1/chat/completions", &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    eventually("metered", std::time::Duration::from_secs(10), || {
        let mut keys = keys.clone();
        let id = id.clone();
        async move {
            (keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.unwrap().into_inner().requests == 1).then_some(())
        }
    })
    .await;
    drop((gw, keys));

    // A restart on the same database keeps keys and usage (the authz port changes, so
    // check the state through the admin API and the view).
    server.restart_with(&[]).await.unwrap();
    let (_, mut keys) = server.clients().await;
    let u = keys.get_key_usage(pb::GetKeyUsageRequest { id: id.clone() }).await.unwrap().into_inner();
    assert_eq!((u.requests, u.total_tokens), (1, 42));
    assert_eq!(server.running().shared.view().unwrap().key_count(), 1);
    drop(keys);
    server.stop().await;
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
}
