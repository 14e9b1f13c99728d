//! End-to-end load through a real Envoy (one worker) with h2load: CPU per Check of
//! Portcullis against an ideal minimal ext_authz server (SHA-256 + HashMap) run in the
//! same session, plus Portcullis with metering (ext_proc) on. The route answers with
//! Envoy's direct_response, so only Envoy and the authz server do work.
//!
//! Run: `cargo bench --bench envoy_load` (needs `envoy` and `h2load`:
//! scripts/install-envoy.sh, `apt-get install nghttp2-client`).

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_server::{Authorization, AuthorizationServer};
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse, DeniedHttpResponse, OkHttpResponse};
use envoy_types::pb::envoy::r#type::v3::HttpStatus;
use envoy_types::pb::google::rpc;
use portcullis::cli::BearerAuth;
use portcullis::pb;
use sha2::{Digest, Sha256};
use tonic::{Request, Response, Status};

const REQUESTS: u32 = 100_000;
const OWNER: &str = "bench-owner-token-0123456789abcdef";

/// The ideal server: SHA-256 of `x-api-key`, a HashMap lookup, a bare OK.
struct Ideal(HashMap<[u8; 32], u64>);

#[tonic::async_trait]
impl Authorization for Ideal {
    async fn check(&self, request: Request<CheckRequest>) -> Result<Response<CheckResponse>, Status> {
        let key = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .and_then(|h| h.headers.get("x-api-key"))
            .map(String::as_str)
            .unwrap_or("");
        let known = self.0.contains_key(&<[u8; 32]>::from(Sha256::digest(key.as_bytes())));
        let http_response = if known {
            HttpResponse::OkResponse(OkHttpResponse::default())
        } else {
            HttpResponse::DeniedResponse(DeniedHttpResponse {
                status: Some(HttpStatus { code: 401 }),
                ..Default::default()
            })
        };
        Ok(Response::new(CheckResponse {
            status: Some(rpc::Status { code: if known { 0 } else { 16 }, ..Default::default() }),
            http_response: Some(http_response),
            dynamic_metadata: None,
        }))
    }
}

fn serve_ideal(addr: &str, key: &str) {
    let mut keys: HashMap<[u8; 32], u64> =
        (0..10_000u64).map(|i| (Sha256::digest(format!("filler-{i}")).into(), i)).collect();
    keys.insert(Sha256::digest(key.as_bytes()).into(), 10_000);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        tonic::transport::Server::builder()
            .add_service(AuthorizationServer::new(Ideal(keys)))
            .serve(addr.parse().unwrap())
            .await
            .unwrap();
    });
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// utime + stime of a process, in seconds.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split(' ').collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc_sysconf_clk_tck() }
}

unsafe extern "C" {
    fn sysconf(name: i32) -> i64;
}

unsafe fn libc_sysconf_clk_tck() -> f64 {
    const SC_CLK_TCK: i32 = 2;
    unsafe { sysconf(SC_CLK_TCK) as f64 }
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "port {port} never opened");
        std::thread::sleep(Duration::from_millis(20));
    }
}

struct Envoy {
    child: Child,
    port: u16,
}

impl Drop for Envoy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn envoy(authz_port: u16, metering: bool, dir: &std::path::Path) -> Envoy {
    let port = free_port();
    let admin = free_port();
    let mut cfg = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/envoy/loopback.yaml")).unwrap();
    cfg = cfg
        .replace("__LISTEN_PORT__", &port.to_string())
        .replace("__ADMIN_PORT__", &admin.to_string())
        .replace("__AUTHZ_PORT__", &authz_port.to_string())
        .replace("__UPSTREAM_PORT__", &free_port().to_string())
        .replace(
            "route: {cluster: llm_upstream, timeout: 300s}",
            "direct_response: {status: 200, body: {inline_string: \"{\\\"usage\\\":{\\\"prompt_tokens\\\":1,\\\"completion_tokens\\\":1}}\"}}",
        );
    // No access log in the measurement.
    let start = cfg.find("          access_log:").unwrap();
    let end = cfg.find("          route_config:").unwrap();
    cfg.replace_range(start..end, "");
    if !metering {
        let start = cfg.find("          - name: envoy.filters.http.ext_proc").unwrap();
        let end = cfg.find("          - name: envoy.filters.http.router").unwrap();
        cfg.replace_range(start..end, "");
    }
    let path = dir.join(format!("envoy-{port}.yaml"));
    std::fs::write(&path, cfg).unwrap();
    let child = Command::new("envoy")
        .arg("-c")
        .arg(&path)
        .args(["--concurrency", "1", "--use-dynamic-base-id", "-l", "error"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("envoy on PATH (scripts/install-envoy.sh)");
    wait_port(port);
    Envoy { child, port }
}

/// Runs h2load; returns requests per second. Every response must be 2xx.
fn h2load(port: u16, key: &str, n: u32) -> f64 {
    let out = Command::new("h2load")
        .args(["-n", &n.to_string(), "-c", "16", "-m", "8", "-t", "1"])
        .args(["-H", ":authority: demo.gateway.local", "-H", &format!("x-api-key: {key}")])
        .arg(format!("http://127.0.0.1:{port}/v1/chat/completions"))
        .output()
        .expect("h2load on PATH (apt-get install nghttp2-client)");
    let text = String::from_utf8_lossy(&out.stdout);
    let ok = text.lines().find(|l| l.starts_with("status codes:")).unwrap_or("");
    assert!(ok.contains(&format!("{n} 2xx")), "not every request succeeded:\n{text}");
    let rps = text.lines().find(|l| l.starts_with("finished in")).and_then(|l| l.split(", ").nth(1)).unwrap_or("0");
    rps.trim_end_matches(" req/s").parse().unwrap_or(0.0)
}

/// CPU microseconds per Check of `pid` and requests/s, for one scenario.
fn measure(pid: u32, port: u16, key: &str) -> (f64, f64) {
    h2load(port, key, 5_000); // warm up
    let before = cpu_secs(pid);
    let rps = h2load(port, key, REQUESTS);
    let used = cpu_secs(pid) - before;
    (used * 1e6 / f64::from(REQUESTS), rps)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--serve-ideal") {
        return serve_ideal(&args[i + 1], &args[i + 2]);
    }
    if args.iter().any(|a| a == "--list") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();

    // Portcullis (release build of this crate), on the embedded SQLite default.
    let (authz, admin) = (free_port(), free_port());
    let mut portcullis = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--authz-addr", &format!("127.0.0.1:{authz}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .arg("--database-url")
        .arg(format!("sqlite://{}", dir.path().join("bench.db").display()))
        .env("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER)
        .env("PORTCULLIS_LOG", "warn")
        .env("TOKIO_WORKER_THREADS", std::env::var("BENCH_WORKERS").unwrap_or_else(|_| "2".into()))
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_port(admin);
    let (plain, limited) = rt.block_on(async {
        let ch = tonic::transport::Channel::from_shared(format!("http://127.0.0.1:{admin}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let auth = BearerAuth::new(OWNER).unwrap();
        let mut gw = pb::gateway_service_client::GatewayServiceClient::with_interceptor(ch.clone(), auth.clone());
        let mut keys = pb::key_service_client::KeyServiceClient::with_interceptor(ch, auth);
        gw.create_gateway(pb::CreateGatewayRequest { name: "demo".into(), ..Default::default() }).await.unwrap();
        for i in 0..2000 {
            let req =
                pb::CreateKeyRequest { gateway: "demo".into(), name: format!("filler-{i}"), ..Default::default() };
            keys.create_key(req).await.unwrap();
        }
        let mk = |name: &str, limits: Option<pb::Limits>| pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: name.into(),
            limits,
            expires_at: None,
        };
        let plain = keys.create_key(mk("plain", None)).await.unwrap().into_inner().secret;
        let limits = pb::Limits {
            cost_limit_usd: Some("1000000".into()),
            token_limit: Some(u64::MAX / 2),
            requests_per_minute: Some(10_000_000),
            reset_period: pb::ResetPeriod::Monthly as i32,
        };
        let limited = keys.create_key(mk("limited", Some(limits))).await.unwrap().into_inner().secret;
        (plain, limited)
    });

    // The ideal server, as its own process so its CPU is measured alone.
    let ideal_port = free_port();
    let mut ideal = Command::new(std::env::current_exe().unwrap())
        .args(["--serve-ideal", &format!("127.0.0.1:{ideal_port}"), &plain])
        .spawn()
        .unwrap();
    wait_port(ideal_port);

    let pid = portcullis.id();
    println!(
        "Envoy 1.40 (1 worker) -> ext_authz; h2load -n {REQUESTS} -c 16 -m 8; CPU of the authz server per request"
    );
    let rows = [
        ("ideal: SHA-256 + HashMap (tonic)", ideal.id(), ideal_port, plain.as_str(), false),
        ("portcullis: no limits", pid, authz, plain.as_str(), false),
        ("portcullis: rpm + token + USD limits", pid, authz, limited.as_str(), false),
        ("portcullis: limits + metering (ext_proc)", pid, authz, limited.as_str(), true),
    ];
    let mut baseline = 0.0;
    for (name, pid, port, key, metering) in rows {
        let e = envoy(port, metering, dir.path());
        let (us, rps) = measure(pid, e.port, key);
        if baseline == 0.0 {
            baseline = us;
        }
        println!("{name:<44} {us:>6.1} µs CPU/request  {rps:>8.0} req/s  {:>5.2}x", us / baseline);
    }
    for child in [&mut ideal, &mut portcullis] {
        let _ = child.kill();
        let _ = child.wait();
    }
}
