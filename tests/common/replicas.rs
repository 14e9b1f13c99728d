//! Several `portcullis serve` processes on one PostgreSQL database and one Redis, behind a
//! real Envoy, and the parts their tests stop and start: a private Redis, a TCP forwarder
//! in front of PostgreSQL that the test can cut, and a Check client aimed at one replica.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};
use sqlx::Connection;
use tokio::net::{TcpListener, TcpStream};
use tonic::transport::Channel;

use super::process::{Proc, clients};
use super::{Envoy, FakeUpstream, Gateways, Keys, OWNER_TOKEN, eventually, free_port, gateway_req, http};

/// The Redis the tests share (`PORTCULLIS_TEST_REDIS`, as scripts/test-services.sh sets).
pub fn redis_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The PostgreSQL the tests share (`PORTCULLIS_TEST_POSTGRES`), database `test`.
pub fn postgres_url() -> String {
    std::env::var("PORTCULLIS_TEST_POSTGRES").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

pub async fn admin_conn() -> sqlx::PgConnection {
    sqlx::PgConnection::connect(&postgres_url()).await.expect("PostgreSQL on 127.0.0.1:5432")
}

/// A fresh database on the test server: (URL, name), dropped by `drop_db`.
pub async fn fresh_db() -> (String, String) {
    let name = format!("portcullis_replicas_{}", uuid::Uuid::now_v7().simple());
    sqlx::query(&format!("CREATE DATABASE {name}")).execute(&mut admin_conn().await).await.unwrap();
    let url = format!("{}/{name}", postgres_url().rsplit_once('/').unwrap().0);
    (url, name)
}

pub async fn drop_db(name: &str) {
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).execute(&mut admin_conn().await).await;
}

/// Forgets everything the Redis at `url` holds of API key `id` (what a restart without
/// persistence, a failover or an eviction does to it); how many Redis keys it held.
pub async fn redis_forgets(url: &str, id: &str) -> usize {
    let mut conn = redis::Client::open(url).unwrap().get_multiplexed_async_connection().await.unwrap();
    let held: Vec<String> = redis::cmd("KEYS").arg(format!("pc:{{{id}}}:*")).query_async(&mut conn).await.unwrap();
    if !held.is_empty() {
        let _: i64 = redis::cmd("DEL").arg(&held).query_async(&mut conn).await.unwrap();
    }
    held.len()
}

/// What a Check answered, as Envoy passes it on to the client: the HTTP status (200:
/// allowed), the headers added to the response (or sent with the denial) and the body.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: i32,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Answer {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// The `error.code` of a denial's JSON body.
    pub fn code(&self) -> String {
        let v: serde_json::Value = serde_json::from_str(&self.body).unwrap_or_default();
        v["error"]["code"].as_str().unwrap_or_default().to_string()
    }
}

/// Calls one replica's Check directly (Envoy's round robin cannot be aimed), over one
/// connection, with the request Envoy would send for a chat completion.
#[derive(Clone)]
pub struct Prober(AuthorizationClient<Channel>);

impl Prober {
    pub async fn connect(authz_port: u16) -> Prober {
        let ch = Channel::from_shared(format!("http://127.0.0.1:{authz_port}")).unwrap().connect().await.unwrap();
        Prober(AuthorizationClient::new(ch))
    }

    /// The Check of a request to `gateway` with `headers` (the key among them) and `body`.
    pub async fn check(&mut self, gateway: &str, headers: &[(&str, &str)], body: &str) -> Answer {
        let mut all = HashMap::from([
            (":authority".to_string(), format!("{gateway}.gateway.local")),
            (":method".to_string(), "POST".to_string()),
            (":path".to_string(), "/v1/chat/completions".to_string()),
            ("content-type".to_string(), "application/json".to_string()),
            ("content-length".to_string(), body.len().to_string()),
        ]);
        all.extend(headers.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let req = CheckRequest {
            attributes: Some(AttributeContext {
                context_extensions: HashMap::from([("gateway".to_string(), gateway.to_string())]),
                request: Some(Request {
                    http: Some(HttpRequest {
                        method: "POST".into(),
                        path: "/v1/chat/completions".into(),
                        headers: all,
                        body: body.into(),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
        };
        let r = self.0.check(req).await.expect("Check answers").into_inner();
        let pairs = |h: Vec<envoy_types::pb::envoy::config::core::v3::HeaderValueOption>| {
            h.into_iter().filter_map(|o| o.header).map(|h| (h.key, h.value)).collect::<Vec<_>>()
        };
        match r.http_response {
            Some(HttpResponse::OkResponse(ok)) => {
                Answer { status: 200, headers: pairs(ok.response_headers_to_add), body: String::new() }
            }
            Some(HttpResponse::DeniedResponse(d)) => {
                Answer { status: d.status.map_or(0, |s| s.code), headers: pairs(d.headers), body: d.body }
            }
            other => panic!("unexpected Check answer {other:?}"),
        }
    }

    /// The Check of a request with key `secret` in `x-api-key` and no body.
    pub async fn key(&mut self, gateway: &str, secret: &str) -> Answer {
        self.check(gateway, &[("x-api-key", secret)], "").await
    }
}

/// How Envoy reaches the replicas.
#[derive(Clone, Copy, PartialEq)]
pub enum Routing {
    /// Every replica is an endpoint of the one cluster both filters call (round robin,
    /// health-checked, panic mode off): a Check and its metering stream may reach any.
    Balanced,
    /// ext_authz calls replica 0 only and ext_proc replica 1 only: every reservation is
    /// made on one replica and settled on the other.
    Split,
}

/// The loopback Envoy config with every replica in `ports` as an endpoint of the
/// ext_authz / ext_proc cluster (health-checked, round robin), panic mode off.
pub fn every_replica(ports: &[u16]) -> impl FnOnce(String) -> String + use<> {
    let endpoints = endpoint_lines(ports);
    move |config: String| {
        assert!(config.contains(ONE_ENDPOINT), "the loopback config lists the authz endpoint as expected");
        config.replace(ONE_ENDPOINT, &endpoints).replace(
            "  - name: portcullis_authz\n",
            "  - name: portcullis_authz\n    common_lb_config: {healthy_panic_threshold: {value: 0}}\n",
        )
    }
}

const ONE_ENDPOINT: &str =
    "        - endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: __AUTHZ_PORT__}}}\n";

fn endpoint_lines(ports: &[u16]) -> String {
    ports
        .iter()
        .map(|p| {
            format!("        - endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {p}}}}}}}\n")
        })
        .collect()
}

/// The loopback config with ext_authz on `authz` and ext_proc on a cluster of its own,
/// `portcullis_meter`, on `meter` (the same settings otherwise).
fn split(authz: u16, meter: u16) -> impl FnOnce(String) -> String {
    move |config: String| {
        let start = config.find("  - name: portcullis_authz\n").expect("the authz cluster");
        let end = config.find("  - name: llm_upstream\n").expect("the upstream cluster");
        let meter_cluster = config[start..end]
            .replace("portcullis_authz", "portcullis_meter")
            .replace(ONE_ENDPOINT, &endpoint_lines(&[meter]));
        let authz_cluster = config[start..end].replace(ONE_ENDPOINT, &endpoint_lines(&[authz]));
        let clusters = format!("{}{authz_cluster}{meter_cluster}{}", &config[..start], &config[end..]);
        let ext_proc = clusters.find("envoy.filters.http.ext_proc").expect("the ext_proc filter");
        let (head, tail) = clusters.split_at(ext_proc);
        let tail = tail.replacen("cluster_name: portcullis_authz", "cluster_name: portcullis_meter", 1);
        format!("{head}{tail}")
    }
}

/// One `portcullis serve` process and its ports.
pub struct Replica {
    pub proc: Option<Proc>,
    pub authz: u16,
    pub admin: u16,
    pub metrics: u16,
}

impl Replica {
    pub async fn prober(&self) -> Prober {
        Prober::connect(self.authz).await
    }

    /// Admin clients of this replica, as the owner.
    pub async fn clients(&self) -> (Gateways, Keys) {
        clients(self.admin, OWNER_TOKEN).await
    }

    pub async fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://127.0.0.1:{}", self.admin)).unwrap().connect().await.unwrap()
    }

    /// A metric's value (summed over its labels), from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let r = http::try_request(self.metrics, "GET", "metrics", "/metrics", &[], None).await?;
        let values: Vec<f64> = r
            .body
            .lines()
            .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{')))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    }

    /// SIGKILL: the process dies at once, with whatever it held.
    pub async fn kill(&mut self) {
        if let Some(mut p) = self.proc.take() {
            p.child.kill().await.unwrap();
        }
    }
}

/// Replicas as processes on one database and one Redis, behind one Envoy, with the fake
/// upstream; gateway "demo" created.
pub struct Replicas {
    pub db_name: String,
    pub db_url: String,
    pub replicas: Vec<Replica>,
    pub envoy: Envoy,
    pub upstream: FakeUpstream,
    /// Admin clients of replica 0, as the owner.
    pub gateways: Gateways,
    pub keys: Keys,
}

impl Replicas {
    /// `n` replicas on a fresh database and the test Redis, with `env` set on each.
    pub async fn start(n: usize, env: &[(&str, &str)], routing: Routing) -> Replicas {
        let (url, name) = fresh_db().await;
        Self::start_on(n, &url, &name, &redis_url(), env, routing, |c| c).await
    }

    /// `n` replicas on `db_url` (database `db_name`, dropped by `stop`) and `redis`, with
    /// Envoy's config changed by `edit`.
    pub async fn start_on(
        n: usize,
        db_url: &str,
        db_name: &str,
        redis: &str,
        env: &[(&str, &str)],
        routing: Routing,
        edit: impl FnOnce(String) -> String,
    ) -> Replicas {
        let mut replicas = Vec::new();
        for _ in 0..n {
            let (authz, admin, metrics) = (free_port(), free_port(), free_port());
            let metrics_addr = format!("127.0.0.1:{metrics}");
            let mut all = vec![
                ("PORTCULLIS_REDIS_URL", redis),
                ("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN),
                ("PORTCULLIS_METRICS_ADDR", metrics_addr.as_str()),
            ];
            all.extend_from_slice(env);
            let mut proc = Proc::spawn(db_url, authz, admin, &all);
            proc.wait_for("admin listener").await;
            replicas.push(Replica { proc: Some(proc), authz, admin, metrics });
        }
        let upstream = FakeUpstream::start().await;
        let ports: Vec<u16> = replicas.iter().map(|r| r.authz).collect();
        let envoy = match routing {
            Routing::Balanced => {
                let balanced = every_replica(&ports);
                Envoy::start_with(ports[0], upstream.port, |c| edit(balanced(c))).await
            }
            Routing::Split => {
                let split = split(ports[0], ports[1]);
                Envoy::start_with(ports[0], upstream.port, |c| edit(split(c))).await
            }
        };
        let (mut gateways, keys) = replicas[0].clients().await;
        gateways.create_gateway(gateway_req("demo")).await.unwrap();
        Replicas { db_name: db_name.into(), db_url: db_url.into(), replicas, envoy, upstream, gateways, keys }
    }

    /// Waits until every replica's Check answers `status` for `secret` on gateway "demo".
    pub async fn known_everywhere(&self, secret: &str, status: i32) {
        for r in &self.replicas {
            let p = r.prober().await;
            eventually("every replica knows the key", Duration::from_secs(5), || {
                let mut p = p.clone();
                async move { (p.key("demo", secret).await.status == status).then_some(()) }
            })
            .await;
        }
    }

    /// SIGTERM to every replica still running, then drops the database.
    pub async fn stop(mut self) {
        for r in &mut self.replicas {
            if let Some(p) = r.proc.take() {
                let _ = p.sigterm().await;
            }
        }
        drop_db(&self.db_name).await;
    }
}

/// A TCP forwarder the test can cut: clients (replicas) connect to `port`, it relays to
/// `target`. Cut, it closes every relayed connection and every new one at once, as a
/// database server that went away; restored, it relays again.
pub struct Forwarder {
    pub port: u16,
    state: Arc<Mutex<Relays>>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Default)]
struct Relays {
    cut: bool,
    open: Vec<tokio::task::AbortHandle>,
}

impl Forwarder {
    pub async fn start(target: &str) -> Forwarder {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(Relays::default()));
        let relays = Arc::clone(&state);
        let target = target.to_string();
        let task = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if relays.lock().unwrap().cut {
                    continue;
                }
                let target = target.clone();
                let relay = tokio::spawn(async move {
                    if let Ok(mut server) = TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                });
                let mut relays = relays.lock().unwrap();
                relays.open.retain(|r| !r.is_finished());
                relays.open.push(relay.abort_handle());
            }
        });
        Forwarder { port, state, task }
    }

    /// The PostgreSQL URL `url` (host 127.0.0.1:5432) through this forwarder.
    pub fn url_for(&self, url: &str) -> String {
        url.replace("127.0.0.1:5432", &format!("127.0.0.1:{}", self.port))
    }

    pub fn cut(&self) {
        let mut relays = self.state.lock().unwrap();
        relays.cut = true;
        for r in relays.open.drain(..) {
            r.abort();
        }
    }

    pub fn restore(&self) {
        self.state.lock().unwrap().cut = false;
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.cut();
        self.task.abort();
    }
}

/// A private Redis the test can stop and start again (empty: no persistence) on the same
/// port.
pub struct PrivateRedis {
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub child: Option<std::process::Child>,
}

impl PrivateRedis {
    pub async fn start() -> PrivateRedis {
        let mut r = PrivateRedis::unstarted();
        r.up().await;
        r
    }

    /// On a free port, not running yet.
    pub fn unstarted() -> PrivateRedis {
        PrivateRedis { port: free_port(), dir: tempfile::tempdir().unwrap(), child: None }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn up(&mut self) {
        self.up_with(&[]).await;
    }

    pub async fn up_with(&mut self, extra: &[&str]) {
        let bin = std::env::var("PORTCULLIS_TEST_REDIS_SERVER").unwrap_or_else(|_| "redis-server".into());
        let child = std::process::Command::new(bin)
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(extra)
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server (scripts/test-services.sh installs it; PORTCULLIS_TEST_REDIS_SERVER names it)");
        self.child = Some(child);
        let url = self.url();
        eventually("the private Redis answers", Duration::from_secs(10), || {
            let url = url.clone();
            async move {
                let client = redis::Client::open(url).ok()?;
                let mut c = client.get_multiplexed_async_connection().await.ok()?;
                redis::cmd("PING").query_async::<String>(&mut c).await.ok()
            }
        })
        .await;
    }

    pub fn down(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        self.down();
    }
}
