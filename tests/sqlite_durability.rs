//! The embedded SQLite database as an operator handles it: the file alone holds every
//! change after SIGTERM, `portcullis backup` copies it consistently while serving, and a
//! file deleted or replaced under the running process is detected instead of silently
//! taking writes that vanish at the next start.

mod common;

use std::path::Path;

use common::process::{BIN, Proc, clients};
use common::*;
use tokio::process::Command;

async fn count(db: &Path, sql: &str) -> i64 {
    let url = format!("sqlite://{}?mode=ro", db.display());
    let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&url).await.unwrap();
    let n: i64 = sqlx::query_scalar(sql).fetch_one(&pool).await.unwrap();
    pool.close().await;
    n
}

const GATEWAYS: &str = "SELECT COUNT(*) FROM gateways WHERE deleted_at IS NULL";

#[tokio::test]
async fn after_sigterm_the_database_file_alone_holds_every_change() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("portcullis.db");
    let db = format!("sqlite://{}", file.display());
    let admin = free_port();
    let mut p = Proc::spawn(&db, free_port(), admin, &[("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)]);
    p.wait_for("admin listener").await;
    let (mut gw, _) = clients(admin, OWNER_TOKEN).await;
    for name in ["one", "two"] {
        gw.create_gateway(gateway_req(name)).await.unwrap();
    }
    let (status, _) = p.sigterm().await;
    assert!(status.success());

    // What an operator does: copy the database file, and only that file.
    let copy = tempfile::tempdir().unwrap();
    let copied = copy.path().join("portcullis.db");
    std::fs::copy(&file, &copied).unwrap();
    assert_eq!(count(&copied, GATEWAYS).await, 2, "the copy has every gateway without the -wal file");
}

#[tokio::test]
async fn backup_while_serving_writes_a_consistent_copy_that_serves() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("portcullis.db").display());
    let admin = free_port();
    let mut p = Proc::spawn(&db, free_port(), admin, &[("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)]);
    p.wait_for("admin listener").await;
    let (mut gw, mut keys) = clients(admin, OWNER_TOKEN).await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, _) = create_key(&mut keys, "demo", "kept").await;

    let out_dir = tempfile::tempdir().unwrap();
    let backup = out_dir.path().join("backup.db");
    let run = |args: Vec<String>| async move { Command::new(BIN).args(&args).output().await.unwrap() };
    let args =
        |to: &Path, from: &str| vec!["backup".into(), to.display().to_string(), "--database-url".into(), from.into()];
    let out = run(args(&backup, &db)).await;
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The server keeps serving while and after the copy is made.
    gw.create_gateway(gateway_req("after")).await.unwrap();

    let again = run(args(&backup, &db)).await;
    assert!(!again.status.success());
    let err = String::from_utf8_lossy(&again.stderr);
    assert!(err.contains("already exists") && err.lines().count() == 1, "{err}");
    let missing = out_dir.path().join("missing.db");
    let none = run(args(&out_dir.path().join("other.db"), &format!("sqlite://{}", missing.display()))).await;
    assert!(!none.status.success());
    assert!(!missing.exists(), "backing up a missing database creates nothing");
    let pg = run(args(&out_dir.path().join("pg.db"), "postgres://127.0.0.1:1/none")).await;
    assert!(!pg.status.success());
    let (status, _) = p.sigterm().await;
    assert!(status.success());

    assert_eq!(count(&backup, GATEWAYS).await, 1, "the copy is the state when it was taken");
    // The copy is a working database: portcullis serves from it.
    let url = format!("sqlite://{}", backup.display());
    let mut server = TestServer::start_on(out_dir, url, &[]).await;
    let (_, mut keys) = server.clients().await;
    let got = keys.get_key(portcullis::pb::GetKeyRequest { id: key.id.clone() }).await.unwrap().into_inner();
    assert_eq!((got.name.as_str(), got.gateway.as_str()), ("kept", "demo"));
    server.stop().await;
}

#[tokio::test]
async fn a_database_file_deleted_while_serving_is_detected_and_refuses_writes() {
    let mut server = TestServer::start().await;
    let file = server.dir.path().join("portcullis.db");
    let (mut gw, _) = server.clients().await;
    gw.create_gateway(gateway_req("before")).await.unwrap();

    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    let err = gw.create_gateway(gateway_req("lost")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(!file.exists(), "no empty database is created in its place");
    // Reads from storage are refused too; the view in memory still answers Check.
    let err = gw.list_gateways(portcullis::pb::ListGatewaysRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable);
    server.stop().await;
}

#[tokio::test]
async fn a_database_file_replaced_while_serving_is_detected_and_the_restart_opens_the_new_one() {
    let mut server = TestServer::start().await;
    let file = server.dir.path().join("portcullis.db");
    let (mut gw, _) = server.clients().await;
    gw.create_gateway(gateway_req("old")).await.unwrap();

    // Restore an older copy over the live file (with its write-ahead log gone), as a careless
    // operator restores a backup without stopping the server.
    let backup = server.dir.path().join("restore.db");
    let out = Command::new(BIN)
        .args(["backup", &backup.display().to_string(), "--database-url", &server.db_url])
        .output()
        .await
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    gw.create_gateway(gateway_req("newer")).await.unwrap();
    for suffix in ["-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
    }
    std::fs::rename(&backup, &file).unwrap();

    let err = gw.create_gateway(gateway_req("after")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "writes into the replaced file would be lost: {err:?}");
    assert_eq!(count(&file, GATEWAYS).await, 1, "nothing was written into the restored file");

    server.restart_with(&[]).await.unwrap();
    let (mut gw, _) = server.clients().await;
    let names: Vec<String> = gw
        .list_gateways(portcullis::pb::ListGatewaysRequest::default())
        .await
        .unwrap()
        .into_inner()
        .gateways
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["old"], "the restart serves the restored file");
    server.stop().await;
}
