//! How Check throughput scales with `--authz-threads`: h2load straight at the authz
//! listener's `Check` (no Envoy), the same load against `portcullis serve` with one thread
//! and then with two, for a key without limits and for one with requests/min, token and
//! USD limits (1,000 keys of each kind loaded; h2load sends one CheckRequest, with a
//! chat-completion body, over and over). Prints requests per second and Portcullis's CPU
//! per Check for each, and the two-thread to one-thread throughput ratio.
//!
//! Run: `cargo bench --bench authz_threads` (needs `h2load`: `apt-get install
//! nghttp2-client`). `THREADS_REQUESTS` (200000), `THREADS_CONNECTIONS` (16),
//! `THREADS_STREAMS` (16), `THREADS_H2LOAD_THREADS` (2: h2load needs a core of its own to
//! drive two). On a machine with fewer than 4 cores, h2load and the server share them: the
//! ratio is then bounded by the cores left.

mod common;

use std::process::{Child, Command, Stdio};

use common::{check_request, free_port, wait_port};
use envoy_types::pb::envoy::service::auth::v3::CheckRequest;
use portcullis::cli::BearerAuth;
use portcullis::pb;
use prost::Message;

const OWNER: &str = "bench-owner-token-0123456789abcdef";
const KEYS: usize = 1_000;

fn env_or(name: &str, default: u32) -> u32 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// utime + stime of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn ticks_per_second() -> f64 {
    let out = Command::new("getconf").arg("CLK_TCK").output().ok();
    out.and_then(|o| String::from_utf8(o.stdout).ok()).and_then(|s| s.trim().parse().ok()).unwrap_or(100.0)
}

/// A CheckRequest as gRPC frames it (what h2load sends).
fn framed(message: Vec<u8>) -> Vec<u8> {
    let mut framed = vec![0u8];
    framed.extend_from_slice(&u32::try_from(message.len()).unwrap().to_be_bytes());
    framed.extend_from_slice(&message);
    framed
}

struct Server {
    child: Child,
    authz: u16,
    admin: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `portcullis serve` on the SQLite file `db` with `threads` authz threads and `flags`.
fn serve(db: &std::path::Path, threads: u32, flags: &[&str]) -> Server {
    let (authz, admin) = (free_port(), free_port());
    let child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--authz-addr", &format!("127.0.0.1:{authz}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--authz-threads", &threads.to_string(), "--log", "warn"])
        .args(flags)
        .arg("--database-url")
        .arg(format!("sqlite://{}", db.display()))
        .env("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(admin);
    wait_port(authz);
    Server { child, authz, admin }
}

/// Gateway "demo" with `KEYS` keys without limits and `KEYS` with all three; returns one
/// secret of each kind.
async fn seed(admin: u16) -> (String, String) {
    let ch =
        tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{admin}")).unwrap().connect().await.unwrap();
    let auth = BearerAuth::new(OWNER).unwrap();
    let mut gw = pb::gateway_service_client::GatewayServiceClient::with_interceptor(ch.clone(), auth.clone());
    let mut keys = pb::key_service_client::KeyServiceClient::with_interceptor(ch, auth);
    gw.create_gateway(pb::CreateGatewayRequest { name: "demo".into(), ..Default::default() }).await.unwrap();
    let limits = pb::Limits {
        cost_limit_usd: Some("1000000".into()),
        token_limit: Some(u64::MAX / 4),
        requests_per_minute: Some(100_000_000),
        reset_period: pb::ResetPeriod::Monthly as i32,
    };
    let mut secrets = (String::new(), String::new());
    for i in 0..KEYS {
        for (kind, limits) in [("plain", None), ("limited", Some(limits.clone()))] {
            let req = pb::CreateKeyRequest {
                gateway: "demo".into(),
                name: format!("{kind}-{i}"),
                limits: limits.clone(),
                expires_at: None,
            };
            let secret = keys.create_key(req).await.unwrap().into_inner().secret;
            match kind {
                "plain" => secrets.0 = secret,
                _ => secrets.1 = secret,
            }
        }
    }
    secrets
}

/// h2load at the Check RPC; returns requests per second. Every answer must be HTTP 200
/// (gRPC carries the decision; an allowed one is checked once before).
fn h2load(port: u16, body: &std::path::Path, n: u32) -> f64 {
    let (c, m, t) =
        (env_or("THREADS_CONNECTIONS", 16), env_or("THREADS_STREAMS", 16), env_or("THREADS_H2LOAD_THREADS", 2));
    let out = Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", &c.to_string(), "-m", &m.to_string(), "-t", &t.to_string()])
        .arg("-d")
        .arg(body)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"])
        .arg(format!("http://127.0.0.1:{port}/envoy.service.auth.v3.Authorization/Check"))
        .output()
        .expect("h2load on PATH (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let codes = text.lines().find(|l| l.starts_with("status codes:")).unwrap_or("");
    assert!(codes.contains(&format!("{n} 2xx")), "not every call succeeded:\n{text}");
    let rps = text.lines().find(|l| l.starts_with("finished in")).and_then(|l| l.split(", ").nth(1)).unwrap_or("0");
    rps.trim_end_matches(" req/s").parse().unwrap_or(0.0)
}

/// One allowed Check through tonic, so the body h2load repeats is known to be allowed.
async fn allowed(port: u16, secret: &str) -> bool {
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    let mut client = AuthorizationClient::connect(format!("http://127.0.0.1:{port}")).await.unwrap();
    let req = CheckRequest::decode(check_request(secret, "demo").as_slice()).unwrap();
    let r = client.check(req).await.unwrap().into_inner();
    r.status.is_some_and(|s| s.code == 0)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let n = env_or("THREADS_REQUESTS", 200_000);
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("bench.db");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    // Seeding writes more keys than one token's default write burst; each write is
    // committed when answered, so the server can be stopped at once after.
    let seeding = serve(&db, 1, &["--admin-write-burst", "100000", "--admin-writes-per-second", "100000"]);
    let secrets = rt.block_on(seed(seeding.admin));
    drop(seeding);
    let tick = ticks_per_second();
    println!(
        "h2load -n {n} straight at Check (no Envoy), {} cores; requests/s and Portcullis CPU per Check",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    for (kind, secret) in [("no limits", &secrets.0), ("rpm + token + USD limits", &secrets.1)] {
        let body = dir.path().join("check.bin");
        std::fs::write(&body, framed(check_request(secret, "demo"))).unwrap();
        let mut rps = Vec::new();
        for threads in [1, 2] {
            let server = serve(&db, threads, &[]);
            assert!(rt.block_on(allowed(server.authz, secret)), "the benchmark's key is allowed");
            h2load(server.authz, &body, n / 10); // warm up
            let before = cpu_ticks(server.child.id());
            let r = h2load(server.authz, &body, n);
            let cpu_us = (cpu_ticks(server.child.id()) - before) as f64 / tick * 1e6 / f64::from(n);
            println!("{kind:<26} --authz-threads {threads}: {r:>9.0} req/s  {cpu_us:>5.1} µs CPU/Check");
            rps.push(r);
        }
        println!("{kind:<26} two threads / one: {:.2}x", rps[1] / rps[0]);
    }
}
