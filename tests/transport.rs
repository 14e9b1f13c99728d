//! The listeners under hostile or careless clients: idle and half-open connections,
//! HTTP/2 limits and keepalive, accept errors, and TLS (Envoy → Portcullis over mTLS, the
//! CLI verifying the admin listener).

mod common;

use std::process::Stdio;
use std::time::Duration;

use common::tls::TestCerts;
use common::*;
use portcullis::pb;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_client::HealthClient;

const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
const DEMO: &str = "demo.gateway.local";
const PATH: &str = "/v1/chat/completions";
const H2_MAGIC: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// An empty SETTINGS frame: what completes a client's connection preface.
const EMPTY_SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
const SETTINGS_ACK: &[u8] = &[0, 0, 0, 4, 1, 0, 0, 0, 0];

async fn gateway_with_provider_key(gw: &mut Gateways) {
    gw.create_gateway(pb::CreateGatewayRequest {
        name: "demo".into(),
        upstream_auth: Some(pb::UpstreamAuth {
            header_name: "authorization".into(),
            value: "Bearer sk-provider-secret".into(),
            value_set: false,
        }),
        ..Default::default()
    })
    .await
    .unwrap();
}

/// Waits until the server closes `s` (end of stream or reset); whatever it sent before is ignored.
async fn closed_by_server(mut s: TcpStream) {
    let mut buf = [0u8; 256];
    let closed = tokio::time::timeout(Duration::from_secs(30), async {
        loop {
            match s.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the server kept an idle connection open");
}

/// `n` idle connections, then `n/10` that send half the magic and `n/10` that send the
/// magic but no SETTINGS frame.
async fn idle_connections(port: u16, n: usize) -> Vec<TcpStream> {
    let mut conns = Vec::new();
    for i in 0..n + n / 5 {
        let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        if i >= n + n / 10 {
            s.write_all(H2_MAGIC).await.unwrap();
        } else if i >= n {
            s.write_all(&H2_MAGIC[..10]).await.unwrap();
        }
        conns.push(s);
    }
    conns
}

#[tokio::test]
async fn idle_and_half_open_connections_are_closed_while_real_calls_still_pass() {
    let stack = Stack::start_full(&["--handshake-timeout", "1s"], |c| c).await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gateway_with_provider_key(&mut gw).await;
    let (_, secret) = create_key(&mut keys, "demo", "token-user01").await;
    let admin_port = stack.server.running().admin_addr.unwrap().port();

    let mut idle = idle_connections(stack.server.authz_port(), 300).await;
    idle.extend(idle_connections(admin_port, 300).await);

    // Envoy's first connection to the authz listener is opened now, among the idle ones.
    let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    // A new admin connection too.
    let (mut gw, _) = stack.server.clients().await;
    let listed = gw.list_gateways(pb::ListGatewaysRequest::default()).await.unwrap().into_inner();
    assert_eq!(listed.gateways.len(), 1);

    for s in idle {
        closed_by_server(s).await;
    }
    // Established connections are not handshakes: Envoy's keeps working.
    let r = stack.envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
}

/// Reads one HTTP/2 frame: (type, flags, payload).
async fn frame(s: &mut TcpStream) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    s.read_exact(&mut head).await.ok()?;
    let len = (usize::from(head[0]) << 16) | (usize::from(head[1]) << 8) | usize::from(head[2]);
    let mut payload = vec![0; len];
    s.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

/// Completes an HTTP/2 handshake, checks the server's MAX_CONCURRENT_STREAMS, then stays
/// silent: the server must PING, and close the connection when the PING goes unanswered.
async fn advertises_limit_then_pings_and_closes(port: u16, streams: u32) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    s.write_all(H2_MAGIC).await.unwrap();
    s.write_all(EMPTY_SETTINGS).await.unwrap();
    let (kind, flags, payload) = frame(&mut s).await.expect("the server's SETTINGS");
    assert_eq!((kind, flags), (4, 0), "the server's first frame is its SETTINGS");
    let max_streams = payload
        .chunks(6)
        .find(|c| c[..2] == [0, 3])
        .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
        .expect("SETTINGS_MAX_CONCURRENT_STREAMS is advertised");
    assert_eq!(max_streams, streams);
    s.write_all(SETTINGS_ACK).await.unwrap();

    let outcome = tokio::time::timeout(Duration::from_secs(30), async {
        let mut pinged = false;
        while let Some((kind, flags, _)) = frame(&mut s).await {
            if kind == 6 && flags & 1 == 0 {
                pinged = true;
            }
        }
        pinged
    })
    .await;
    assert_eq!(outcome, Ok(true), "the server PINGs a silent connection, then closes it");
}

#[tokio::test]
async fn both_listeners_limit_streams_and_close_connections_that_stop_answering_pings() {
    let server = TestServer::start_with(&[
        "--max-concurrent-streams",
        "7",
        "--http2-keepalive-interval",
        "200ms",
        "--http2-keepalive-timeout",
        "200ms",
    ])
    .await;
    advertises_limit_then_pings_and_closes(server.authz_port(), 7).await;
    advertises_limit_then_pings_and_closes(server.running().admin_addr.unwrap().port(), 7).await;
}

#[tokio::test]
async fn the_metrics_listener_survives_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("p.db").display());
    let (authz, admin, metrics) = (free_port(), free_port(), free_port());
    // `ulimit -n` lowers both limits, so the server cannot raise its own.
    let mut child = tokio::process::Command::new("sh")
        .args(["-c", r#"ulimit -n 64 && exec "$0" "$@""#, BIN, "serve", "--database-url", &db])
        .args(["--authz-addr", &format!("127.0.0.1:{authz}"), "--admin-addr", &format!("127.0.0.1:{admin}")])
        .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
        .env("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)
        .env("PORTCULLIS_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut wait_for = async |needle: &str| {
        let mut seen = Vec::new();
        let found = tokio::time::timeout(Duration::from_secs(30), async {
            while let Ok(Some(line)) = lines.next_line().await {
                let hit = line.contains(needle);
                seen.push(line);
                if hit {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no '{needle}' in stderr: {seen:#?}");
    };
    wait_for("metrics listener (/metrics) ready").await;

    // HTTP/2 connections to the admin listener take every descriptor the process may open
    // (they complete the preface, so they stay until keepalive gives up on them).
    let mut hogs = Vec::new();
    for _ in 0..80 {
        let mut s = TcpStream::connect(("127.0.0.1", admin)).await.unwrap();
        s.write_all(H2_MAGIC).await.unwrap();
        s.write_all(EMPTY_SETTINGS).await.unwrap();
        hogs.push(s);
    }
    wait_for("accepting a connection failed listener=\"admin\"").await;
    let scrape = tokio::spawn(async move { http::request(metrics, "GET", "metrics", "/metrics", &[], None).await });
    wait_for("accepting a connection failed listener=\"metrics\"").await;
    drop(hogs);
    let r = scrape.await.unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.contains("portcullis_checks_total"), "{}", r.body);

    let pid = child.id().unwrap().to_string();
    assert!(std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait()).await.unwrap().unwrap();
    assert!(status.success(), "SIGTERM after accept errors exits 0: {status:?}");
}

/// A health check on the authz listener over TLS as a client holding `identity` (cert, key
/// file names) or none; Err says how it failed.
async fn authz_health(port: u16, certs: &TestCerts, identity: Option<(&str, &str)>) -> Result<i32, String> {
    let mut tls =
        ClientTlsConfig::new().ca_certificate(Certificate::from_pem(certs.read("ca.pem"))).domain_name("portcullis");
    if let Some((cert, key)) = identity {
        tls = tls.identity(Identity::from_pem(certs.read(cert), certs.read(key)));
    }
    let channel = Channel::from_shared(format!("https://127.0.0.1:{port}"))
        .unwrap()
        .tls_config(tls)
        .map_err(|e| e.to_string())?
        .connect()
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let r = HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .map_err(|e| format!("check: {e:?}"))?;
    Ok(r.into_inner().status)
}

#[tokio::test]
async fn envoy_calls_portcullis_over_mtls_and_clients_without_a_mesh_certificate_are_refused() {
    let certs = TestCerts::generate();
    let server = TestServer::start_with(&[
        "--authz-tls-cert",
        &certs.arg("server.pem"),
        "--authz-tls-key",
        &certs.arg("server-key.pem"),
        "--authz-tls-client-ca",
        &certs.arg("ca.pem"),
    ])
    .await;
    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start_with(server.authz_port(), upstream.port, certs.mtls_envoy_config()).await;
    let (mut gw, mut keys) = server.clients().await;
    gateway_with_provider_key(&mut gw).await;
    let (key, secret) = create_key(&mut keys, "demo", "token-user01").await;

    // Check over mTLS: allowed, the provider key injected.
    let r = envoy.send(DEMO, PATH, &[("x-api-key", &secret)]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let received = upstream.received().await;
    assert_eq!(received[0]["headers"]["authorization"], "Bearer sk-provider-secret");
    // Metering over mTLS too.
    eventually("the response metered", Duration::from_secs(10), || {
        let mut keys = keys.clone();
        let id = key.id.clone();
        async move {
            let u = keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.ok()?.into_inner();
            (u.requests == 1 && u.total_tokens > 0).then_some(())
        }
    })
    .await;
    // A denial is also a Check answered over mTLS.
    let r = envoy.send(DEMO, PATH, &[("x-api-key", "pcs_not-a-real-key")]).await;
    assert_eq!(r.status, 401, "{}", r.body);

    let port = server.authz_port();
    assert_eq!(authz_health(port, &certs, Some(("envoy.pem", "envoy-key.pem"))).await, Ok(1), "SERVING to the mesh");
    let no_cert = authz_health(port, &certs, None).await;
    assert!(no_cert.is_err(), "a client without a certificate got {no_cert:?}");
    let rogue = authz_health(port, &certs, Some(("rogue.pem", "rogue-key.pem"))).await;
    assert!(rogue.is_err(), "a client with another CA's certificate got {rogue:?}");
    // Nor does plaintext get through.
    let plain = HealthClient::new(Channel::from_shared(format!("http://127.0.0.1:{port}")).unwrap().connect_lazy())
        .check(HealthCheckRequest { service: String::new() })
        .await;
    assert!(plain.is_err(), "plaintext got {plain:?}");
}

async fn cli(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let mut cmd = tokio::process::Command::new(BIN);
    cmd.args(args).env("PORTCULLIS_TOKEN", OWNER_TOKEN).env_remove("PORTCULLIS_CA").env_remove("PORTCULLIS_ADMIN_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().await.unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn the_cli_verifies_a_tls_admin_listener_against_its_ca() {
    let certs = TestCerts::generate();
    let server = TestServer::start_with(&[
        "--admin-tls-cert",
        &certs.arg("server.pem"),
        "--admin-tls-key",
        &certs.arg("server-key.pem"),
    ])
    .await;
    let url = format!("https://127.0.0.1:{}", server.running().admin_addr.unwrap().port());
    let ca = certs.arg("ca.pem");

    let (ok, out, err) = cli(&["tokens", "whoami", "--admin-url", &url, "--ca", &ca], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains("bootstrap"), "{out}");
    let (ok, _, err) =
        cli(&["gateways", "list", "--json"], &[("PORTCULLIS_ADMIN_URL", &url), ("PORTCULLIS_CA", &ca)]).await;
    assert!(ok, "PORTCULLIS_CA works as --ca: {err}");

    // Without --ca the system roots do not know this CA.
    let (ok, _, err) = cli(&["tokens", "whoami", "--admin-url", &url], &[]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: TLS: the admin API at"), "{err}");
    assert!(err.contains("--ca"), "{err}");
    // A CA that did not sign it.
    let (ok, _, err) = cli(&["tokens", "whoami", "--admin-url", &url, "--ca", &certs.arg("rogue-ca.pem")], &[]).await;
    assert!(!ok);
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    assert!(err.contains("not verified"), "{err}");
    // --ca with a plaintext URL is a mistake, said as such.
    let (ok, _, err) = cli(&["tokens", "whoami", "--admin-url", "http://127.0.0.1:1", "--ca", &ca], &[]).await;
    assert!(!ok);
    assert!(err.contains("--ca needs an https://"), "{err}");
}

#[tokio::test]
async fn bad_listener_settings_are_refused_at_start_naming_the_flag() {
    let certs = TestCerts::generate();
    let (cert, key) = (certs.arg("server.pem"), certs.arg("server-key.pem"));
    let missing = certs.arg("missing.pem");
    let cases: [(&[&str], &str); 6] = [
        (&["--handshake-timeout", "30s"], "--handshake-timeout"),
        (&["--max-connections", "0"], "--max-connections"),
        (&["--max-concurrent-streams", "0"], "--max-concurrent-streams"),
        (&["--admin-tls-cert", &missing, "--admin-tls-key", &key], "--admin-tls-cert"),
        (&["--authz-tls-cert", &cert, "--authz-tls-key", &cert], "--authz-tls-key"),
        (&["--authz-tls-cert", &cert, "--authz-tls-key", &key, "--authz-tls-client-ca", &key], "--authz-tls-client-ca"),
    ];
    for (flags, named) in cases {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("p.db").display());
        let err = TestServer::try_start_on(url, flags).await.err().unwrap_or_else(|| panic!("{flags:?} accepted"));
        assert!(err.contains(named), "{flags:?}: {err}");
        assert!(!err.contains("PRIVATE KEY"), "no key material in errors: {err}");
    }
}

#[tokio::test]
async fn metrics_labels_from_responses_are_escaped_and_bounded() {
    let stack = Stack::start_full(&["--metrics-addr", "127.0.0.1:0"], |c| c).await;
    let (mut gw, mut keys) = stack.server.clients().await;
    gw.create_gateway(gateway_req("demo")).await.unwrap();
    let (key, secret) = create_key(&mut keys, "demo", "token-user01").await;
    // The upstream answers with the model the request named: a newline in it must not add a
    // line to /metrics, and only 100 unpriced models get a series of their own.
    let evil = r#"evil\"} 1\nportcullis_checks_total{decision=\"allow\"} 999999\n"#;
    let mut models = vec![evil.to_string()];
    models.extend((1..=100).map(|i| format!("model-{i:03}")));
    for model in &models {
        let body = format!(r#"{{"model":"{model}","messages":[]}}"#);
        let r = stack.envoy.post(DEMO, PATH, &[("x-api-key", &secret)], &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    eventually("every response metered", Duration::from_secs(20), || {
        let mut keys = keys.clone();
        let id = key.id.clone();
        async move {
            let u = keys.get_key_usage(pb::GetKeyUsageRequest { id }).await.ok()?.into_inner();
            (u.requests == 101).then_some(())
        }
    })
    .await;
    let port = stack.server.running().metrics_addr.unwrap().port();
    let text = http::request(port, "GET", "metrics", "/metrics", &[], None).await.body;
    let allow: Vec<&str> =
        text.lines().filter(|l| l.starts_with("portcullis_checks_total{decision=\"allow\"}")).collect();
    assert_eq!(allow, ["portcullis_checks_total{decision=\"allow\"} 101"], "{text}");
    let unpriced: Vec<&str> =
        text.lines().filter(|l| l.starts_with("portcullis_unpriced_model_responses_total{")).collect();
    assert_eq!(unpriced.len(), 101, "100 models and `other`: {unpriced:#?}");
    assert!(unpriced.contains(&r#"portcullis_unpriced_model_responses_total{model="other"} 1"#), "{unpriced:#?}");
    assert!(unpriced.contains(&r#"portcullis_unpriced_model_responses_total{model="model-099"} 1"#));
    assert!(!text.contains("model-100"), "the 101st model has no series of its own");
    assert!(
        unpriced.contains(
            &r#"portcullis_unpriced_model_responses_total{model="evil\"} 1\nportcullis_checks_total{decision=\"allow\"} 999999\n"} 1"#
        ),
        "{unpriced:#?}"
    );
}

/// The authz listener serves Check, Process and health, nothing else: an admin call sent to
/// it by mistake (a CLI pointed at the wrong port) is answered `UNIMPLEMENTED` at once, and
/// the same connection goes on answering health checks.
#[tokio::test]
async fn the_authz_listener_answers_other_methods_unimplemented() {
    let server = TestServer::start().await;
    let url = format!("http://127.0.0.1:{}", server.authz_port());
    let channel = Channel::from_shared(url).unwrap().connect().await.unwrap();
    let mut gateways = pb::gateway_service_client::GatewayServiceClient::new(channel.clone());
    let refused = gateways.list_gateways(pb::ListGatewaysRequest {}).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unimplemented, "{refused:?}");
    let health = HealthClient::new(channel).check(HealthCheckRequest { service: String::new() }).await.unwrap();
    assert_eq!(health.into_inner().status, 1, "SERVING");
}
