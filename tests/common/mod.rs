//! Real parts for integration tests: portcullis in-process (or as a process), a real
//! Envoy, the project's fake upstream, and a small HTTP/1.1 client. Everything on 127.0.0.1.
#![allow(dead_code)]

pub mod http;
pub mod process;
pub mod replicas;
pub mod tls;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeZone, Utc};
use clap::Parser;
use portcullis::app::{self, Running};
use portcullis::cli::BearerAuth;
use portcullis::config::{Cli, Command as PcCommand};
use portcullis::domain::clock::ManualClock;
use portcullis::pb;
use portcullis::pb::gateway_service_client::GatewayServiceClient;
use portcullis::pb::key_service_client::KeyServiceClient;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// The owner token every test server is bootstrapped with.
pub const OWNER_TOKEN: &str = "owner-token-for-tests-0123456789";

pub type Gateways = GatewayServiceClient<InterceptedService<Channel, BearerAuth>>;
pub type Keys = KeyServiceClient<InterceptedService<Channel, BearerAuth>>;

pub fn manifest_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Waits for `probe` to succeed, polling; fails the test after `timeout`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Portcullis running in this process on a manual clock and a fresh SQLite file (or
/// another database URL).
pub struct TestServer {
    pub running: Option<Running>,
    pub clock: Arc<ManualClock>,
    pub dir: tempfile::TempDir,
    pub db_url: String,
}

impl TestServer {
    pub async fn start() -> TestServer {
        Self::start_with(&[]).await
    }

    pub async fn start_with(extra: &[&str]) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("portcullis.db").display());
        Self::start_on(dir, url, extra).await
    }

    /// On the database at `db_url`.
    pub async fn start_on(dir: tempfile::TempDir, db_url: String, extra: &[&str]) -> TestServer {
        let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()));
        let running = Self::boot(&db_url, Arc::clone(&clock), extra).await.expect("portcullis starts");
        TestServer { running: Some(running), clock, dir, db_url }
    }

    /// Starts on `db_url`, or says why it cannot.
    pub async fn try_start_on(db_url: String, extra: &[&str]) -> Result<TestServer, String> {
        let clock = Arc::new(ManualClock::new(Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap()));
        let running = Self::boot(&db_url, Arc::clone(&clock), extra).await?;
        Ok(TestServer { running: Some(running), clock, dir: tempfile::tempdir().unwrap(), db_url })
    }

    async fn boot(db: &str, clock: Arc<ManualClock>, extra: &[&str]) -> Result<Running, String> {
        let mut argv = vec!["portcullis", "serve", "--authz-addr", "127.0.0.1:0", "--admin-addr", "127.0.0.1:0"];
        argv.extend_from_slice(&["--database-url", db, "--bootstrap-token", OWNER_TOKEN]);
        argv.extend_from_slice(extra);
        let PcCommand::Serve(args) = Cli::try_parse_from(argv).unwrap().command else { unreachable!() };
        app::start(&args, clock).await.map_err(|e| format!("{e:#}"))
    }

    /// Stops and starts again on the same database with other flags; the error if start fails.
    pub async fn restart_with(&mut self, extra: &[&str]) -> Result<(), String> {
        self.stop().await;
        self.running = Some(Self::boot(&self.db_url.clone(), Arc::clone(&self.clock), extra).await?);
        Ok(())
    }

    /// Rows of a query on the server's SQLite file (read beside the server).
    pub async fn db_count(&self, sql: &str, bind: &str) -> i64 {
        let pool = sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect(&self.db_url).await.unwrap();
        let n: i64 = sqlx::query_scalar(sql).bind(bind).fetch_one(&pool).await.unwrap();
        pool.close().await;
        n
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("server is running")
    }

    pub fn authz_port(&self) -> u16 {
        self.running().authz_addr.unwrap().port()
    }

    pub fn admin_url(&self) -> String {
        format!("http://{}", self.running().admin_addr.unwrap())
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(self.admin_url()).unwrap().connect().await.unwrap()
    }

    pub async fn clients_with(&self, token: &str) -> (Gateways, Keys) {
        let ch = self.channel().await;
        let auth = BearerAuth::new(token).unwrap();
        (GatewayServiceClient::with_interceptor(ch.clone(), auth.clone()), KeyServiceClient::with_interceptor(ch, auth))
    }

    pub async fn clients(&self) -> (Gateways, Keys) {
        self.clients_with(OWNER_TOKEN).await
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await.unwrap();
        }
    }
}

pub fn gateway_req(name: &str) -> pb::CreateGatewayRequest {
    pb::CreateGatewayRequest { name: name.into(), ..Default::default() }
}

/// Creates a key and returns (key, secret).
pub async fn create_key(keys: &mut Keys, gateway: &str, name: &str) -> (pb::ApiKey, String) {
    let r = keys
        .create_key(pb::CreateKeyRequest { gateway: gateway.into(), name: name.into(), ..Default::default() })
        .await
        .expect("create key")
        .into_inner();
    (r.key.unwrap(), r.secret)
}

/// A port for a child process to listen on, free when asked. It is taken below Linux's
/// ephemeral range (32768–60999), where the kernel never puts the local end of an outgoing
/// connection: a port from bind(0) could be taken by any test's client before the child
/// binds it. Each test process starts its search elsewhere, so concurrent ones rarely meet.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % SPAN,
        Ordering::Relaxed,
        Ordering::Relaxed,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// The project's fake OpenAI-compatible upstream (tools/fake_upstream.py).
pub struct FakeUpstream {
    _child: Child,
    pub port: u16,
}

impl FakeUpstream {
    pub async fn start() -> FakeUpstream {
        let mut child = Command::new("python3")
            .arg(manifest_dir().join("tools/fake_upstream.py"))
            .args(["--port", "0"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("python3 runs the fake upstream");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("fake upstream starts")
            .unwrap()
            .unwrap();
        let port = line.strip_prefix("listening on ").expect("port line").trim().parse().unwrap();
        FakeUpstream { _child: child, port }
    }

    /// What the upstream received, oldest first.
    pub async fn received(&self) -> Vec<serde_json::Value> {
        let r = http::request(self.port, "GET", "upstream", "/_fake/requests", &[], None).await;
        serde_json::from_str::<Vec<serde_json::Value>>(&r.body).unwrap()
    }
}

pub fn envoy_bin() -> String {
    std::env::var("PORTCULLIS_ENVOY_BIN").unwrap_or_else(|_| "envoy".into())
}

/// A real Envoy running envoy/loopback.yaml.
pub struct Envoy {
    _child: Child,
    /// Access-log lines (JSON) Envoy wrote to stdout.
    access_log: Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    pub port: u16,
    pub admin_port: u16,
    _dir: tempfile::TempDir,
}

impl Envoy {
    pub async fn start(authz_port: u16, upstream_port: u16) -> Envoy {
        Self::start_with(authz_port, upstream_port, |c| c).await
    }

    /// Starts with the loopback config changed by `edit` (e.g. ext_proc in blocking mode).
    pub async fn start_with(authz_port: u16, upstream_port: u16, edit: impl FnOnce(String) -> String) -> Envoy {
        let dir = tempfile::tempdir().unwrap();
        let template = edit(std::fs::read_to_string(manifest_dir().join("envoy/loopback.yaml")).unwrap());
        let config = template
            .replace("__LISTEN_PORT__", "0")
            .replace("__ADMIN_PORT__", "0")
            .replace("__AUTHZ_PORT__", &authz_port.to_string())
            .replace("__UPSTREAM_PORT__", &upstream_port.to_string());
        let config_path = dir.path().join("envoy.yaml");
        std::fs::write(&config_path, config).unwrap();
        let admin_path = dir.path().join("admin-address");
        let mut child = Command::new(envoy_bin())
            .arg("-c")
            .arg(&config_path)
            .arg("--admin-address-path")
            .arg(&admin_path)
            .args(["--use-dynamic-base-id", "--concurrency", "1", "-l", "warning"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run `{}` ({e}): run scripts/install-envoy.sh", envoy_bin()));
        let access_log = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = Arc::clone(&access_log);
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Ok(v) = serde_json::from_str(&line) {
                    sink.lock().unwrap().push(v);
                }
            }
        });
        let admin_port: u16 = eventually("envoy admin address", Duration::from_secs(30), || {
            let p = admin_path.clone();
            async move {
                let s = std::fs::read_to_string(p).ok()?;
                s.trim().rsplit(':').next()?.parse().ok()
            }
        })
        .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                panic!("envoy exited before it was ready ({status}); its log is above");
            }
            assert!(tokio::time::Instant::now() < deadline, "timed out waiting for envoy ready");
            let r = http::try_request(admin_port, "GET", "admin", "/ready", &[], None).await;
            if r.is_some_and(|r| r.status == 200) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The listener binds port 0; the admin API says which port it got.
        let port = eventually("envoy's listener port", Duration::from_secs(10), || async move {
            let r = http::try_request(admin_port, "GET", "admin", "/listeners?format=json", &[], None).await?;
            let listeners: serde_json::Value = serde_json::from_str(&r.body).ok()?;
            let port = &listeners["listener_statuses"][0]["local_address"]["socket_address"]["port_value"];
            u16::try_from(port.as_u64()?).ok()
        })
        .await;
        Envoy { _child: child, access_log, port, admin_port, _dir: dir }
    }

    /// Waits for an access-log entry that `matches`.
    pub async fn access_log_entry(&self, matches: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        eventually("an Envoy access-log entry", Duration::from_secs(10), || {
            let found = self.access_log.lock().unwrap().iter().find(|v| matches(v)).cloned();
            async move { found }
        })
        .await
    }

    /// Sends `body` as JSON to gateway `host`.
    pub async fn post(&self, host: &str, path: &str, headers: &[(&str, &str)], body: &str) -> http::Response {
        let mut h = headers.to_vec();
        h.push(("content-type", "application/json"));
        http::request(self.port, "POST", host, path, &h, Some(body)).await
    }

    /// Sends a request to gateway `host` ("demo.gateway.local", ...).
    pub async fn send(&self, host: &str, path: &str, headers: &[(&str, &str)]) -> http::Response {
        let body = r#"{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}]}"#;
        let mut h = headers.to_vec();
        h.push(("content-type", "application/json"));
        http::request(self.port, "POST", host, path, &h, Some(body)).await
    }
}

/// A full stack: portcullis (in-process, manual clock), the fake upstream and Envoy.
pub struct Stack {
    pub server: TestServer,
    pub upstream: FakeUpstream,
    pub envoy: Envoy,
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(|c| c).await
    }

    pub async fn start_with(edit: impl FnOnce(String) -> String) -> Stack {
        Self::start_full(&[], edit).await
    }

    /// With extra `serve` flags and an edited Envoy config.
    pub async fn start_full(flags: &[&str], edit: impl FnOnce(String) -> String) -> Stack {
        let server = TestServer::start_with(flags).await;
        let upstream = FakeUpstream::start().await;
        let envoy = Envoy::start_with(server.authz_port(), upstream.port, edit).await;
        Stack { server, upstream, envoy }
    }
}
