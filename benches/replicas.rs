//! Throughput of two replicas against one behind one Envoy: `portcullis serve` processes
//! (this build) on a fresh PostgreSQL database and Redis (`PORTCULLIS_TEST_POSTGRES`,
//! `PORTCULLIS_TEST_REDIS`), Envoy in front (the loopback config, its route answering
//! itself so no upstream is measured), and `h2load` (Debian's nghttp2-client) sending
//! chat completions of one key with requests/min + token limits (never reached): every
//! request is one Check, one Redis script. Prints requests per second for each, and the
//! replicas' CPU per request. Run: `cargo bench --bench replicas`.

#[path = "../tests/common/mod.rs"]
mod harness;

use harness::replicas::{Replicas, Routing, fresh_db, redis_url};
use portcullis::pb;

const REQUESTS: &str = "40000";
const CONNECTIONS: &str = "8";
const STREAMS: &str = "1";

/// The route answers itself, with a usage object for metering.
fn answer_locally(config: String) -> String {
    let body = r#"{\"id\":\"x\",\"model\":\"gpt-4o-mini\",\"usage\":{\"prompt_tokens\":1,\"completion_tokens\":1,\"total_tokens\":2}}"#;
    config.replacen(
        "                route: {cluster: llm_upstream, timeout: 300s}",
        &format!("                direct_response: {{status: 200, body: {{inline_string: \"{body}\"}}}}"),
        1,
    )
}

/// CPU a process has used, in clock ticks (`/proc/PID/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    f.get(11).and_then(|u| u.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|s| s.parse::<u64>().ok()).unwrap_or(0)
}

async fn measure(n: usize) -> (f64, f64) {
    let (url, name) = fresh_db().await;
    let mut set = Replicas::start_on(
        n,
        &url,
        &name,
        &redis_url(),
        &[("PORTCULLIS_LOG", "warn,portcullis::app=info")],
        Routing::Balanced,
        answer_locally,
    )
    .await;
    let limits = pb::Limits { requests_per_minute: Some(1_000_000), token_limit: Some(1 << 40), ..Default::default() };
    let r = set
        .keys
        .create_key(pb::CreateKeyRequest {
            gateway: "demo".into(),
            name: "bench".into(),
            limits: Some(limits),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    set.known_everywhere(&r.secret, 200).await;
    let dir = tempfile::tempdir().unwrap();
    let body = dir.path().join("body.json");
    std::fs::write(&body, harness_body()).unwrap();
    let target = format!("http://127.0.0.1:{}/v1/chat/completions", set.envoy.port);
    let h2load = |n: &str| {
        let out = std::process::Command::new("h2load")
            .args(["-n", n, "-c", CONNECTIONS, "-m", STREAMS, "-d"])
            .arg(&body)
            .args(["-H", ":authority: demo.gateway.local", "-H", "content-type: application/json"])
            .args(["-H", &format!("x-api-key: {}", r.secret)])
            .arg(&target)
            .output()
            .expect("h2load (apt-get install nghttp2-client)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Envoy sends no Check to a replica until its health check passed.
    let admin = set.envoy.admin_port;
    harness::eventually("Envoy sees every replica healthy", std::time::Duration::from_secs(20), || async move {
        let clusters = harness::http::request(admin, "GET", "admin", "/clusters", &[], None).await;
        let flags: Vec<&str> = clusters
            .body
            .lines()
            .filter(|l| l.starts_with("portcullis_authz::") && l.contains("::health_flags::"))
            .collect();
        (flags.len() == n && flags.iter().all(|l| l.ends_with("::healthy"))).then_some(())
    })
    .await;
    let warm = h2load("4000");
    if !warm.contains("status codes: 4000 2xx") {
        let one = std::process::Command::new("curl")
            .args([
                "-si",
                "--http2-prior-knowledge",
                "-H",
                "host: demo.gateway.local",
                "-H",
                "content-type: application/json",
            ])
            .args(["-H", &format!("x-api-key: {}", r.secret), "--data-binary"])
            .arg(format!("@{}", body.display()))
            .arg(&target)
            .output()
            .unwrap();
        panic!("{warm}\none request: {}", String::from_utf8_lossy(&one.stdout));
    }
    let pids: Vec<u32> = set.replicas.iter().filter_map(|r| r.proc.as_ref()?.child.id()).collect();
    let before: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let out = h2load(REQUESTS);
    let after: u64 = pids.iter().map(|p| cpu_ticks(*p)).sum();
    let per_second = out
        .lines()
        .find(|l| l.starts_with("finished in"))
        .and_then(|l| l.split(", ").nth(1)?.split(' ').next()?.parse::<f64>().ok())
        .unwrap_or_else(|| panic!("h2load output: {out}"));
    assert!(out.contains(&format!("status codes: {REQUESTS} 2xx")), "{out}");
    let status = out.lines().find(|l| l.starts_with("status codes:")).unwrap_or("").to_string();
    println!("{n} replica(s): {status}");
    let ticks_per_s = 100.0;
    let cpu_us = (after - before) as f64 / ticks_per_s * 1e6 / REQUESTS.parse::<f64>().unwrap();
    set.stop().await;
    (per_second, cpu_us)
}

fn harness_body() -> &'static str {
    r#"{"model":"gpt-4o-mini","max_tokens":64,"messages":[{"role":"user","content":"Say hello."}]}"#
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    println!("{REQUESTS} chat completions through one Envoy, {CONNECTIONS} connections x {STREAMS} streams (h2load)");
    let (one, one_cpu) = measure(1).await;
    let (two, two_cpu) = measure(2).await;
    println!("1 replica:  {one:>8.0} requests/s, portcullis CPU {one_cpu:.0} us/request");
    println!("2 replicas: {two:>8.0} requests/s, portcullis CPU {two_cpu:.0} us/request (both together)");
    println!(
        "2 vs 1: {:.2}x requests/s on {} cores",
        two / one,
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
}
