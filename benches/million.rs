//! One million keys (issue 9, goal 6): memory, start-up and Check cost with a large view.
//!
//! For each backend (SQLite in a fresh file; PostgreSQL in a fresh database on
//! `PORTCULLIS_TEST_POSTGRES`, skipped with a message when unreachable) it seeds N keys,
//! each with all three limits (requests/min, tokens, USD), through the store in batches
//! (not through the admin API one by one), starts `portcullis serve` as a process and
//! reports: the time from spawn to gRPC health SERVING on the authz port, VmRSS and
//! VmHWM (peak) then, the first admin calls (ListGateways, a page of ListKeys,
//! CreateKey) and RSS a few seconds later. Then, in process, the cost of a Check (decode,
//! decide, encode; 1,000 keys in use, all three limits) with N keys in the view against
//! the same with 1,000 keys, in interleaved rounds: the ratio is what goal 6 bounds.
//!
//! Run: `cargo bench --bench million` (N = `MILLION_KEYS`, default 1000000; backends =
//! `MILLION_BACKENDS`, default `sqlite,postgres`; `MILLION_CHECK=0` skips the Check
//! rounds; `MILLION_USED=1` gives every key a last use, as keys in service have). Seeding a million keys takes about a minute per backend.

mod common;

use std::hint::black_box;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{check_request, free_port};
use portcullis::authz::{AuthzService, CheckInput};
use portcullis::cli::BearerAuth;
use portcullis::domain::check::Limiters;
use portcullis::domain::clock::SystemClock;
use portcullis::domain::counters::now_or_never;
use portcullis::domain::gateway::{Gateway, InboundAuth};
use portcullis::domain::key::{ApiKey, Limits, NewKey, ResetPeriod};
use portcullis::domain::secret::{Secret, SecretHash};
use portcullis::domain::tokens::TokenRegistry;
use portcullis::domain::view::{KeySecret, View};
use portcullis::pb;
use portcullis::state::Shared;
use portcullis::store::{self, sealing::Sealer};
use prost::Message;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use uuid::Uuid;

const OWNER: &str = "million-bench-owner-token-0123456789";
/// Keys per gateway: below `--max-keys-per-gateway`'s default, so CreateKey is allowed.
const KEYS_PER_GATEWAY: usize = 250_000;
/// Keys per `insert_keys` call while seeding.
const SEED_BATCH: usize = 50_000;
/// Keys a Check round cycles through (as the rig: 1,000 distinct keys).
const ACTIVE: usize = 1_000;

fn limits() -> Limits {
    Limits {
        requests_per_minute: Some(u32::MAX),
        token_limit: Some(i64::MAX as u64),
        cost_limit_micros: Some(i64::MAX),
        reset_period: ResetPeriod::Monthly,
    }
}

fn gateway(i: usize) -> Gateway {
    Gateway {
        id: Uuid::now_v7(),
        name: format!("g{i}"),
        inbound: InboundAuth::default(),
        upstream: None,
        default_reservation_tokens: 0,
        created_at: Utc::now(),
    }
}

/// A cheap distinct secret per key: Secret::generate reads the OS's random source once
/// per key, which would dominate seeding; these are as unique and as long.
fn secret(run: &str, i: usize) -> Secret {
    Secret::from_plaintext(format!("bench-{run}-{i:010}-0123456789abcdefghij"))
}

/// N keys (with all three limits) spread over gateways of `KEYS_PER_GATEWAY`, seeded
/// through the store, each with a last use if `used`; the gateways' names.
async fn seed(url: &str, n: usize, used: bool) -> Vec<String> {
    let s = store::open(url, Sealer::default()).await.unwrap();
    s.migrate().await.unwrap();
    let run = Uuid::now_v7().simple().to_string();
    let gateways: Vec<Gateway> = (0..n.div_ceil(KEYS_PER_GATEWAY).max(1)).map(gateway).collect();
    for g in &gateways {
        s.insert_gateway(g).await.unwrap();
    }
    let started = Instant::now();
    let mut batch = Vec::with_capacity(SEED_BATCH);
    for i in 0..n {
        let g = &gateways[i / KEYS_PER_GATEWAY];
        let sec = secret(&run, i);
        let kind = NewKey::Managed { limits: limits(), expires_at: None };
        let mut k = ApiKey::new(g.id, &format!("key-{i}"), sec.expose(), kind, Utc::now());
        if used {
            k.last_used_at = Some(Utc::now());
        }
        batch.push((k, sec.hash()));
        if batch.len() == SEED_BATCH || i + 1 == n {
            s.insert_keys(&batch).await.unwrap();
            batch.clear();
        }
    }
    s.release().await;
    eprintln!("  seeded {n} keys in {:.1} s", started.elapsed().as_secs_f64());
    gateways.into_iter().map(|g| g.name).collect()
}

/// VmRSS and VmHWM of a process, in MB.
fn memory(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
            .map_or(f64::NAN, |kb| kb / 1024.0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Serve {
    child: Child,
    log: std::path::PathBuf,
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Started {
    ready: Duration,
    rss: f64,
    peak: f64,
    calls: Vec<(&'static str, Duration)>,
    settled_rss: f64,
}

/// Starts `portcullis serve` on `url`, waits for SERVING, measures.
async fn serve(url: &str, gateways: &[String], dir: &std::path::Path) -> Started {
    let (authz, admin) = (free_port(), free_port());
    let log = dir.join("serve.log");
    let started = Instant::now();
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--database-url", url, "--bootstrap-token", OWNER])
        .args(["--authz-addr", &format!("127.0.0.1:{authz}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .env("PORTCULLIS_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut serve = Serve { child, log };
    let pid = serve.child.id();
    let ready = loop {
        if let Ok(Some(status)) = serve.child.try_wait() {
            panic!("portcullis exited with {status}: {}", std::fs::read_to_string(&serve.log).unwrap_or_default());
        }
        assert!(started.elapsed() < Duration::from_secs(300), "not SERVING after 300 s");
        let serving = async {
            let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{authz}"))
                .unwrap()
                .connect()
                .await
                .ok()?;
            let r = HealthClient::new(ch).check(HealthCheckRequest { service: String::new() }).await.ok()?;
            (r.into_inner().status == tonic_health::ServingStatus::Serving as i32).then_some(())
        };
        if serving.await.is_some() {
            break started.elapsed();
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let (rss, peak) = memory(pid);

    let ch =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{admin}")).unwrap().connect().await.unwrap();
    let auth = BearerAuth::new(OWNER).unwrap();
    let mut gw = pb::gateway_service_client::GatewayServiceClient::with_interceptor(ch.clone(), auth.clone());
    let mut keys = pb::key_service_client::KeyServiceClient::with_interceptor(ch, auth);
    let mut calls = Vec::new();
    let t = Instant::now();
    let listed = gw.list_gateways(pb::ListGatewaysRequest::default()).await.unwrap().into_inner();
    calls.push(("ListGateways (the first call)", t.elapsed()));
    assert_eq!(listed.gateways.len(), gateways.len());
    let t = Instant::now();
    let page = keys
        .list_keys(pb::ListKeysRequest { gateway: gateways[0].clone(), page_size: 100, ..Default::default() })
        .await
        .unwrap()
        .into_inner();
    calls.push(("ListKeys, first page of 100", t.elapsed()));
    assert_eq!(page.keys.len(), 100);
    let t = Instant::now();
    keys.create_key(pb::CreateKeyRequest {
        gateway: gateways[0].clone(),
        name: "one-more".into(),
        limits: Some(pb::Limits { token_limit: Some(1000), ..Default::default() }),
        expires_at: None,
    })
    .await
    .unwrap();
    calls.push(("CreateKey", t.elapsed()));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (settled_rss, _) = memory(pid);
    Started { ready, rss, peak, calls, settled_rss }
}

/// An authz service over a view of `n` keys (all three limits), and Checks of `ACTIVE` of
/// them spread over the whole view.
fn check_setup(n: usize) -> (AuthzService, Vec<Vec<u8>>) {
    let g = gateway(0);
    let run = Uuid::now_v7().simple().to_string();
    let step = (n / ACTIVE).max(1);
    let mut requests = Vec::with_capacity(ACTIVE);
    let keys: Vec<(ApiKey, Vec<KeySecret>)> = (0..n)
        .map(|i| {
            let sec = secret(&run, i);
            if i % step == 0 && requests.len() < ACTIVE {
                requests.push(check_request(sec.expose(), &g.name));
            }
            let kind = NewKey::Managed { limits: limits(), expires_at: None };
            let k = ApiKey::new(g.id, &format!("key-{i}"), sec.expose(), kind, Utc::now());
            (k, vec![KeySecret::current(SecretHash::of(sec.expose()))])
        })
        .collect();
    let shared = Arc::new(Shared::new(
        View::new(vec![g], keys),
        TokenRegistry::new(vec![], false, chrono::Duration::hours(1)),
        Limiters::default(),
        Arc::new(SystemClock),
    ));
    (AuthzService::new(shared), requests)
}

/// ns per Check over `rounds` passes through the requests.
fn check_ns(svc: &AuthzService, requests: &[Vec<u8>], passes: usize) -> f64 {
    let started = Instant::now();
    let mut allowed = 0;
    for _ in 0..passes {
        for r in requests {
            let req = CheckInput::decode(r.as_slice()).unwrap();
            let resp = now_or_never(svc.decide(&req)).expect("in-process counters answer at once");
            allowed += usize::from(resp.is_allow());
            black_box(resp.encode());
        }
    }
    assert_eq!(allowed, passes * requests.len(), "every Check is allowed");
    started.elapsed().as_nanos() as f64 / (passes * requests.len()) as f64
}

async fn postgres_database() -> Option<(String, String, String)> {
    use sqlx::Connection;
    let admin =
        std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let mut c = match sqlx::PgConnection::connect(&admin).await {
        Ok(c) => c,
        Err(e) => {
            println!("PostgreSQL: skipped, {} is unreachable ({e})", store::redact_url(&admin));
            return None;
        }
    };
    let name = format!("million_{}", Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut c).await.unwrap();
    let url = format!("{}/{name}", admin.rsplit_once('/').unwrap().0);
    Some((admin, name, url))
}

async fn analyze(url: &str) {
    use sqlx::Connection;
    let mut c = sqlx::PgConnection::connect(url).await.unwrap();
    sqlx::query("ANALYZE").execute(&mut c).await.unwrap();
}

async fn drop_postgres(admin: &str, name: &str) {
    use sqlx::Connection;
    if let Ok(mut c) = sqlx::PgConnection::connect(admin).await {
        let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut c).await;
    }
}

fn report(backend: &str, n: usize, used: bool, s: &Started) {
    let used = if used { ", each used before" } else { "" };
    println!("{backend}, {n} keys with all three limits{used}:");
    println!("  SERVING after          {:>8.2} s", s.ready.as_secs_f64());
    println!("  RSS at SERVING         {:>8.0} MB", s.rss);
    println!("  peak RSS (VmHWM)       {:>8.0} MB", s.peak);
    for (what, took) in &s.calls {
        println!("  {what:<30} {:>8.1} ms", took.as_secs_f64() * 1e3);
    }
    println!("  RSS 3 s later          {:>8.0} MB", s.settled_rss);
    println!("  bytes per key (RSS)    {:>8.0}", s.settled_rss * 1024.0 * 1024.0 / n as f64);
}

#[tokio::main]
async fn main() {
    let n: usize = std::env::var("MILLION_KEYS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000_000);
    let backends = std::env::var("MILLION_BACKENDS").unwrap_or_else(|_| "sqlite,postgres".into());
    let used = std::env::var("MILLION_USED").is_ok_and(|v| v == "1");
    for backend in backends.split(',').map(str::trim) {
        // `MILLION_KEEP=1`: the seeded SQLite file and the server's log stay, for a profile.
        let tmp = tempfile::tempdir().unwrap();
        let (dir, _tmp) = match std::env::var("MILLION_KEEP").is_ok_and(|v| v == "1") {
            true => (tmp.keep(), None),
            false => (tmp.path().to_path_buf(), Some(tmp)),
        };
        if _tmp.is_none() {
            println!("keeping {}", dir.display());
        }
        let dir = dir.as_path();
        match backend {
            "sqlite" => {
                let url = format!("sqlite://{}", dir.join("million.db").display());
                let gateways = seed(&url, n, used).await;
                report("SQLite", n, used, &serve(&url, &gateways, dir).await);
            }
            "postgres" => {
                let Some((admin, name, url)) = postgres_database().await else { continue };
                let gateways = seed(&url, n, used).await;
                // What autovacuum does within a minute of a bulk load: the planner needs the
                // table's statistics to read a gateway's keys from their index.
                analyze(&url).await;
                let started = serve(&url, &gateways, dir).await;
                drop_postgres(&admin, &name).await;
                report("PostgreSQL", n, used, &started);
            }
            other => println!("unknown backend '{other}' in MILLION_BACKENDS (sqlite, postgres)"),
        }
    }
    if std::env::var("MILLION_CHECK").is_ok_and(|v| v == "0") {
        return;
    }
    let (small, small_requests) = check_setup(ACTIVE);
    let (large, large_requests) = check_setup(n);
    // Warm both (each key's counters and window are made at its first Check).
    check_ns(&small, &small_requests, 5);
    check_ns(&large, &large_requests, 5);
    let (mut a, mut b) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        a.push(check_ns(&small, &small_requests, 100));
        b.push(check_ns(&large, &large_requests, 100));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (a, b) = (median(&mut a), median(&mut b));
    println!("Check (decode, decide, encode), all three limits, {ACTIVE} keys in use, median of 7 interleaved rounds:");
    println!("  {ACTIVE} keys in the view  {a:>8.0} ns/Check");
    println!("  {n} keys in the view  {b:>8.0} ns/Check");
    println!("  ratio {:.3} (goal 6: at most 1.10)", b / a);
}
