//! What deciding limits costs on each counter backend: a full Check (decode, decide,
//! encode) of keys with requests/min + token + USD limits (never reached), 1,000 keys in
//! turn, 32 Checks in flight, on the in-process counters and on Redis (one script per
//! Check, `PORTCULLIS_BENCH_REDIS`, default `redis://127.0.0.1:6379`). Prints Portcullis's
//! CPU per Check (this thread: the runtime and the Redis client share it), Redis's CPU per
//! Check (from `INFO cpu`) and Checks per second, each backend against the in-process one
//! in the same run; Redis commands per Check (from `INFO commandstats`: at most one round
//! trip for a key with limits, none without); and the latency one Check adds at c=1 with
//! Redis against in process. Run: `cargo bench --bench counters`.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use common::{check_request, key};
use portcullis::authz::{AuthzService, CheckInput};
use portcullis::domain::budget::Meters;
use portcullis::domain::check::Limiters;
use portcullis::domain::clock::SystemClock;
use portcullis::domain::counters::InProcess;
use portcullis::domain::gateway::{Gateway, InboundAuth};
use portcullis::domain::key::{Limits, ResetPeriod};
use portcullis::domain::pricing::PriceBook;
use portcullis::domain::secret::{Secret, SecretKind};
use portcullis::domain::tokens::TokenRegistry;
use portcullis::domain::view::View;
use portcullis::shared_counters::{FailureMode, Settings, SharedCounters};
use portcullis::state::Shared;
use prost::Message;
use uuid::Uuid;

const KEYS: usize = 1_000;
const IN_FLIGHT: usize = 32;
const CHECKS: usize = 64_000;

/// CPU this thread has used, in nanoseconds (`/proc/thread-self/schedstat`).
fn thread_cpu_ns() -> u64 {
    std::fs::read_to_string("/proc/thread-self/schedstat")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Redis's CPU so far, in microseconds (`INFO cpu`).
async fn redis_cpu_us(url: &str) -> u64 {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut c = client.get_multiplexed_async_connection().await.expect("Redis answers (PORTCULLIS_BENCH_REDIS)");
    let info: String = redis::cmd("INFO").arg("cpu").query_async(&mut c).await.expect("INFO cpu");
    info.lines()
        .filter(|l| l.starts_with("used_cpu_sys:") || l.starts_with("used_cpu_user:"))
        .filter_map(|l| l.split(':').nth(1)?.trim().parse::<f64>().ok())
        .map(|s| (s * 1e6) as u64)
        .sum()
}

/// Calls of each command Redis has run so far, `INFO` itself left out (`INFO commandstats`;
/// the commands a script runs are counted too, under their own names).
async fn redis_commands(url: &str) -> std::collections::BTreeMap<String, u64> {
    let client = redis::Client::open(url).expect("a Redis URL");
    let mut c = client.get_multiplexed_async_connection().await.expect("Redis answers (PORTCULLIS_BENCH_REDIS)");
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut c).await.expect("INFO commandstats");
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split("calls=").nth(1)?.split(',').next()?.parse().ok()?;
            (name != "info").then(|| (name.to_string(), calls))
        })
        .collect()
}

/// Redis's work per Check over `n` Checks of `requests`, one at a time: (round trips,
/// i.e. commands a client sent (a script call is one), commands in all, by name).
async fn commands_per_check(svc: &AuthzService, requests: &[Vec<u8>], url: &str, n: usize) -> (f64, f64, String) {
    let before = redis_commands(url).await;
    for i in 0..n {
        let req = CheckInput::decode(requests[i % requests.len()].as_slice()).unwrap();
        assert!(svc.decide(&req).await.is_allow(), "admitted");
    }
    let after = redis_commands(url).await;
    let delta: Vec<(String, f64)> = after
        .iter()
        .map(|(k, v)| (k.clone(), (v - before.get(k).copied().unwrap_or(0)) as f64 / n as f64))
        .filter(|(_, v)| *v > 0.0)
        .collect();
    // Everything but a script's own calls is sent by a client; inside a script, these are.
    let scripted = |k: &str| !(k.starts_with("eval") || k.starts_with("fcall") || k == "script" || k == "ping");
    let total: f64 = delta.iter().map(|(_, v)| v).sum();
    let trips: f64 = delta.iter().filter(|(k, _)| !scripted(k)).map(|(_, v)| v).sum();
    let by_name = delta.iter().map(|(k, v)| format!("{k} {v:.2}")).collect::<Vec<_>>().join(", ");
    (trips + 0.0, total + 0.0, by_name)
}

/// Latency of one Check at a time (c=1): (mean, p50, p99) in microseconds.
async fn latency_c1(svc: &AuthzService, requests: &[Vec<u8>], n: usize) -> (f64, f64, f64) {
    let mut took = Vec::with_capacity(n);
    for i in 0..n {
        let started = Instant::now();
        let req = CheckInput::decode(requests[i % requests.len()].as_slice()).unwrap();
        let resp = svc.decide(&req).await;
        std::hint::black_box(resp.encode());
        took.push(started.elapsed().as_secs_f64() * 1e6);
    }
    let mean = took.iter().sum::<f64>() / n as f64;
    took.sort_by(|a, b| a.total_cmp(b));
    (mean, took[n / 2], took[n * 99 / 100])
}

struct Run {
    cpu_ns: f64,
    redis_ns: f64,
    per_second: f64,
}

async fn run(svc: Arc<AuthzService>, requests: Arc<Vec<Vec<u8>>>, redis: Option<&str>) -> Run {
    let go = |n: usize| {
        let mut set = tokio::task::JoinSet::new();
        for worker in 0..IN_FLIGHT {
            let (svc, requests) = (Arc::clone(&svc), Arc::clone(&requests));
            set.spawn(async move {
                for i in 0..n / IN_FLIGHT {
                    let bytes = &requests[(worker * 31 + i) % requests.len()];
                    let req = CheckInput::decode(bytes.as_slice()).unwrap();
                    let resp = svc.decide(&req).await;
                    assert!(resp.is_allow(), "admitted");
                    std::hint::black_box(resp.encode());
                }
            });
        }
        set.join_all()
    };
    go(CHECKS / 8).await;
    let redis_before = match redis {
        Some(url) => redis_cpu_us(url).await,
        None => 0,
    };
    let (cpu, wall) = (thread_cpu_ns(), Instant::now());
    go(CHECKS).await;
    let (cpu, wall) = (thread_cpu_ns() - cpu, wall.elapsed());
    let redis_ns = match redis {
        Some(url) => (redis_cpu_us(url).await - redis_before) as f64 * 1000.0 / CHECKS as f64,
        None => 0.0,
    };
    Run { cpu_ns: cpu as f64 / CHECKS as f64, redis_ns, per_second: CHECKS as f64 / wall.as_secs_f64() }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let redis_url = std::env::var("PORTCULLIS_BENCH_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let gateway = Gateway {
        id: Uuid::now_v7(),
        name: "demo".into(),
        inbound: InboundAuth::default(),
        upstream: None,
        default_reservation_tokens: 0,
        created_at: Utc::now(),
    };
    let limits = Limits {
        requests_per_minute: Some(1_000_000),
        token_limit: Some(1 << 40),
        cost_limit_micros: Some(1 << 50),
        reset_period: ResetPeriod::Monthly,
    };
    let mut keys = Vec::new();
    let mut requests = Vec::new();
    for i in 0..KEYS {
        let s = Secret::generate(SecretKind::ApiKey);
        keys.push(key(gateway.id, format!("k{i}"), &s, limits));
        requests.push(check_request(s.expose(), "demo"));
    }
    let requests = Arc::new(requests);
    let mut unlimited_requests = Vec::new();
    for i in 0..100 {
        let s = Secret::generate(SecretKind::ApiKey);
        keys.push(key(
            gateway.id,
            format!("free{i}"),
            &s,
            Limits { reset_period: ResetPeriod::Never, ..Default::default() },
        ));
        unlimited_requests.push(check_request(s.expose(), "demo"));
    }
    let service = |limiters: Limiters| {
        let view = View::new(vec![gateway.clone()], keys.clone());
        let tokens = TokenRegistry::new(vec![], false, chrono::Duration::hours(1));
        Arc::new(AuthzService::new(Arc::new(Shared::new(view, tokens, limiters, Arc::new(SystemClock)))))
    };
    let in_process = service(Limiters::default());
    let meters = Arc::new(Meters::default());
    let settings = Settings {
        url: redis_url.clone(),
        // Long: a loaded machine must not turn a slow answer into a refusal here.
        timeout: Duration::from_secs(2),
        failure_mode: FailureMode::Deny,
        reservation_ttl: Duration::from_secs(600),
    };
    let counters = SharedCounters::new(settings, InProcess::new(Arc::clone(&meters))).expect("a Redis URL");
    let mut limiters = Limiters::in_process(Arc::clone(&meters), PriceBook::default());
    limiters.counters = Arc::new(counters);
    let on_redis = service(limiters);

    println!(
        "Checks of keys with requests/min + token + USD limits: {KEYS} keys, {IN_FLIGHT} in flight, {CHECKS} Checks"
    );
    let mut rounds = Vec::new();
    for _ in 0..2 {
        let a = run(Arc::clone(&in_process), Arc::clone(&requests), None).await;
        let b = run(Arc::clone(&on_redis), Arc::clone(&requests), Some(&redis_url)).await;
        rounds.push((a, b));
    }
    for (i, (a, b)) in rounds.iter().enumerate() {
        println!(
            "round {}: in process {:>6.0} ns CPU/Check {:>8.0} Checks/s | Redis: portcullis {:>6.0} ns + redis {:>6.0} ns CPU/Check {:>8.0} Checks/s",
            i + 1,
            a.cpu_ns,
            a.per_second,
            b.cpu_ns,
            b.redis_ns,
            b.per_second
        );
    }
    let (a, b) = rounds.last().expect("two rounds");
    let with_limits = commands_per_check(&on_redis, &requests, &redis_url, 10_000).await;
    let without = commands_per_check(&on_redis, &unlimited_requests, &redis_url, 10_000).await;
    let (in_mean, in_p50, in_p99) = latency_c1(&in_process, &requests, 20_000).await;
    let (r_mean, r_p50, r_p99) = latency_c1(&on_redis, &requests, 20_000).await;
    println!();
    println!(
        "Redis counters vs in process: portcullis CPU {:.2}x, portcullis + Redis CPU {:.2}x, Checks/s {:.2}x (one client thread)",
        b.cpu_ns / a.cpu_ns,
        (b.cpu_ns + b.redis_ns) / a.cpu_ns,
        b.per_second / a.per_second
    );
    println!(
        "Redis per Check (INFO commandstats, 10000 Checks each): key with limits {:.3} round trips, {:.2} commands ({}); key without limits {:.3} round trips, {:.3} commands",
        with_limits.0, with_limits.1, with_limits.2, without.0, without.1
    );
    println!(
        "latency at c=1 (20000 Checks): in process mean {in_mean:.1} us p50 {in_p50:.1} p99 {in_p99:.1} | Redis mean {r_mean:.1} us p50 {r_p50:.1} p99 {r_p99:.1} | added by Redis: mean {:.1} us, p50 {:.1} us",
        r_mean - in_mean,
        r_p50 - in_p50
    );
}
