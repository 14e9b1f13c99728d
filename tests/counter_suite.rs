//! One counter suite, run against both implementations: in this process, and shared in
//! Redis (`PORTCULLIS_TEST_REDIS`, default `redis://127.0.0.1:6379`; every test uses fresh
//! key ids, so tests share the server). Then what only shared counters do: several
//! replicas counting together, settling on another replica, rebuilding lost counters from
//! the ledger, and outages (a private `redis-server` that the test stops and starts).

mod common;

use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Datelike, Duration, TimeZone, Utc};
use portcullis::domain::budget::{BudgetDenial, Hold, Metered, Meters, Ticket};
use portcullis::domain::clock::{Clock, Mono, Now, SystemClock};
use portcullis::domain::counters::{Counters, InProcess, Outcome, Unavailable, Usage};
use portcullis::domain::key::{ApiKey, Limits, NewKey, ResetPeriod};
use portcullis::shared_counters::{FailureMode, Settings, SharedCounters};
use uuid::Uuid;

use common::eventually;
use common::replicas::PrivateRedis;

fn redis_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The longest wait for Redis on a Check.
const TIMEOUT: StdDuration = StdDuration::from_millis(200);

/// Reservations never settled are released after this (short, so a test can see it).
const TTL: StdDuration = StdDuration::from_millis(300);

/// Counters of one implementation, with the meters (ledger, last uses) they record in.
struct Fixture {
    counters: Arc<dyn Counters>,
    meters: Arc<Meters>,
    shared: Option<Arc<SharedCounters>>,
}

fn in_process() -> Fixture {
    let meters = Arc::new(Meters::default());
    Fixture { counters: Arc::new(InProcess::new(Arc::clone(&meters))), meters, shared: None }
}

fn shared_on(url: &str, failure_mode: FailureMode) -> Fixture {
    let meters = Arc::new(Meters::default());
    let settings = Settings { url: url.into(), timeout: TIMEOUT, failure_mode, reservation_ttl: TTL };
    let shared = Arc::new(SharedCounters::new(settings, InProcess::new(Arc::clone(&meters))).unwrap());
    Fixture { counters: Arc::clone(&shared) as Arc<dyn Counters>, meters, shared: Some(shared) }
}

fn redis() -> Fixture {
    shared_on(&redis_url(), FailureMode::Deny)
}

fn key(limits: Limits) -> ApiKey {
    let created = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
    ApiKey::new(Uuid::now_v7(), "k", "pcs_x", NewKey::Managed { limits, expires_at: None }, created)
}

fn now() -> Now {
    SystemClock.read()
}

fn ask(tokens: u64, micros: i64) -> Hold {
    Hold { tokens, micros, prompt_tokens: 0 }
}

fn used(prompt: u64, completion: u64, cost: i64) -> Metered {
    Metered { prompt_tokens: prompt, completion_tokens: completion, cost_micros: cost }
}

impl Fixture {
    async fn admit(&self, k: &ApiKey, hold: Hold) -> Result<Outcome, Unavailable> {
        self.counters.admit(k, hold, now()).await
    }

    async fn admitted(&self, k: &ApiKey, hold: Hold) -> Option<Ticket> {
        match self.admit(k, hold).await {
            Ok(Outcome::Admitted { reservation, .. }) => reservation,
            other => panic!("expected an admission, got {other:?}"),
        }
    }

    /// Settles with charge `m`; `None` when the ticket was settled before.
    async fn settle(&self, k: &ApiKey, ticket: Option<Ticket>, m: Metered) -> Option<Metered> {
        let charge = move |_: Option<Hold>| m;
        self.counters.settle(k.id, Some(k.limits.reset_period), ticket, &charge, now()).await
    }

    async fn usage(&self, k: &ApiKey) -> Usage {
        self.counters.usage(k, now()).await.unwrap()
    }

    /// Lets unsettled reservations expire: the in-process sweep on a later clock; Redis
    /// releases them itself at the next Check after their deadline.
    async fn expire(&self) {
        if self.shared.is_none() {
            let later = Mono::from_micros(now().mono.micros() + 3_600_000_000);
            self.counters.sweep(later, Duration::from_std(TTL).unwrap());
        }
    }
}

async fn requests_per_minute_are_exact(f: &Fixture) {
    let k = key(Limits { requests_per_minute: Some(3), ..Default::default() });
    for left in [2, 1, 0] {
        match f.admit(&k, Hold::default()).await.unwrap() {
            Outcome::Admitted { rpm: Some(a), reservation: None } => assert_eq!((a.limit, a.remaining), (3, left)),
            other => panic!("{other:?}"),
        }
    }
    match f.admit(&k, Hold::default()).await.unwrap() {
        Outcome::RateLimited(a) => {
            assert_eq!((a.admitted, a.limit, a.remaining), (false, 3, 0));
            assert!((1..=60).contains(&a.retry_after_secs()), "{a:?}");
        }
        other => panic!("the fourth within a minute: {other:?}"),
    }
    assert_eq!(f.usage(&k).await.requests_last_minute, 3, "the refused one took no slot");
}

async fn reservations_are_capped_and_settled_once(f: &Fixture) {
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    let a = f.admitted(&k, ask(60, 0)).await.unwrap();
    let b = f.admitted(&k, ask(60, 0)).await.unwrap();
    assert_eq!((a.hold.tokens, b.hold.tokens), (60, 40), "never more than what is left");
    match f.admit(&k, ask(1, 0)).await.unwrap() {
        Outcome::Budget { denial: BudgetDenial::Tokens { limit: 100, in_flight: true, .. }, .. } => {}
        other => panic!("held in flight: {other:?}"),
    }
    assert_eq!(f.settle(&k, Some(a), used(10, 10, 0)).await, Some(used(10, 10, 0)));
    assert_eq!(f.settle(&k, Some(a), used(10, 10, 0)).await, None, "a second settle charges nothing");
    let u = f.usage(&k).await;
    assert_eq!((u.requests, u.prompt_tokens, u.completion_tokens, u.reserved_tokens), (1, 10, 10, 40));
    // The held tokens of the first are free again.
    let c = f.admitted(&k, ask(100, 0)).await.unwrap();
    assert_eq!(c.hold.tokens, 40);
    f.settle(&k, Some(b), used(0, 40, 0)).await;
    f.settle(&k, Some(c), used(0, 0, 0)).await;
    let u = f.usage(&k).await;
    assert_eq!((u.requests, u.prompt_tokens + u.completion_tokens, u.reserved_tokens), (3, 60, 0));
    // The ledger got each response once.
    let ledger: u64 = f.meters.take_dirty().iter().map(|d| d.requests).sum();
    assert_eq!(ledger, 3);
}

async fn cost_limits_hold_micro_usd(f: &Fixture) {
    let k = key(Limits { cost_limit_micros: Some(1_000), ..Default::default() });
    let a = f.admitted(&k, ask(5, 600)).await.unwrap();
    let b = f.admitted(&k, ask(5, 600)).await.unwrap();
    assert_eq!((a.hold.micros, b.hold.micros), (600, 400));
    match f.admit(&k, ask(5, 1)).await.unwrap() {
        Outcome::Budget { denial: BudgetDenial::Cost { limit_micros: 1_000, in_flight: true, .. }, .. } => {}
        other => panic!("{other:?}"),
    }
    f.settle(&k, Some(a), used(1, 1, 999)).await;
    f.settle(&k, Some(b), used(1, 1, 1)).await;
    match f.admit(&k, ask(5, 1)).await.unwrap() {
        Outcome::Budget { denial: BudgetDenial::Cost { in_flight: false, .. }, .. } => {}
        other => panic!("used up: {other:?}"),
    }
    assert_eq!(f.usage(&k).await.cost_micros, 1_000);
}

async fn a_refused_request_takes_nothing(f: &Fixture) {
    let k = key(Limits { requests_per_minute: Some(1), token_limit: Some(100), ..Default::default() });
    let a = f.admitted(&k, ask(50, 0)).await.unwrap();
    assert!(matches!(f.admit(&k, ask(50, 0)).await.unwrap(), Outcome::RateLimited(_)));
    assert_eq!(f.usage(&k).await.reserved_tokens, 50, "the refused request holds nothing");
    f.settle(&k, Some(a), used(1, 1, 0)).await;
    assert_eq!(f.usage(&k).await.reserved_tokens, 0);
}

async fn usage_counts_in_the_period_of_its_admission(f: &Fixture) {
    let k = key(Limits { token_limit: Some(1_000), reset_period: ResetPeriod::Monthly, ..Default::default() });
    let this = f.admitted(&k, ask(10, 0)).await.unwrap();
    let start = this.period_start;
    assert_eq!((start.day(), start.timestamp() % 86_400), (1, 0), "a monthly period starts on the 1st");
    // A response to a request admitted last month, settled now: last month's usage.
    let last_month = Ticket { period_start: start - Duration::days(20), ..this };
    let last_month = Ticket { id: this.id ^ 1, ..last_month };
    f.settle(&k, Some(last_month), used(500, 0, 0)).await;
    f.settle(&k, Some(this), used(7, 0, 0)).await;
    assert_eq!(f.usage(&k).await.prompt_tokens, 7);
    let ledger = f.meters.take_dirty();
    let of = |t| ledger.iter().filter(|d| d.period_start == t).map(|d| d.prompt_tokens).sum::<u64>();
    assert_eq!((of(start), of(last_month.period_start)), (7, 500));
}

async fn an_unsettled_reservation_expires(f: &Fixture) {
    let k = key(Limits { token_limit: Some(10), ..Default::default() });
    f.admitted(&k, ask(10, 0)).await.unwrap();
    assert!(matches!(f.admit(&k, ask(1, 0)).await.unwrap(), Outcome::Budget { .. }));
    f.expire().await;
    eventually("the reservation expires", StdDuration::from_secs(5), || async {
        matches!(f.admit(&k, ask(1, 0)).await, Ok(Outcome::Admitted { .. })).then_some(())
    })
    .await;
}

macro_rules! test_with_both_counters {
    ($($name:ident),* $(,)?) => {
        mod in_process_counters {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::in_process()).await;
                }
            )*
        }
        mod redis_counters {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(&super::redis()).await;
                }
            )*
        }
    };
}

/// A Redis Cluster of three primaries on free ports, stopped when dropped.
struct Cluster {
    nodes: Vec<PrivateRedis>,
}

impl Cluster {
    async fn start() -> Cluster {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            let mut node = PrivateRedis::unstarted();
            // The cluster bus gets a free port of its own: the default (the port + 10000) may be
            // taken, or above 65535.
            let bus = common::free_port().to_string();
            node.up_with(&["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf", "--cluster-port", &bus])
                .await;
            nodes.push(node);
        }
        let cli = std::env::var("PORTCULLIS_TEST_REDIS_SERVER")
            .map(|s| s.replace("redis-server", "redis-cli"))
            .unwrap_or_else(|_| "redis-cli".into());
        let out = std::process::Command::new(cli)
            .args(["--cluster", "create"])
            .args(nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)))
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("redis-cli (Debian's redis-tools, installed with redis-server)");
        assert!(out.status.success(), "redis-cli --cluster create: {}", String::from_utf8_lossy(&out.stdout));
        for node in &nodes {
            let url = node.url();
            eventually("every node sees the cluster ready", StdDuration::from_secs(20), || {
                let url = url.clone();
                async move {
                    let client = redis::Client::open(url).ok()?;
                    let mut c = client.get_multiplexed_async_connection().await.ok()?;
                    let info: String = redis::cmd("CLUSTER").arg("INFO").query_async(&mut c).await.ok()?;
                    info.contains("cluster_state:ok").then_some(())
                }
            })
            .await;
        }
        Cluster { nodes }
    }

    /// Every node, comma-separated: how `--redis-url` names a cluster.
    fn url(&self) -> String {
        self.nodes.iter().map(PrivateRedis::url).collect::<Vec<_>>().join(",")
    }
}

macro_rules! test_on_a_cluster {
    ($($name:ident),* $(,)?) => {
        mod redis_cluster_counters {
            $(
                #[tokio::test]
                async fn $name() {
                    let cluster = super::Cluster::start().await;
                    super::$name(&super::shared_on(&cluster.url(), super::FailureMode::Deny)).await;
                }
            )*
        }
    };
}

test_on_a_cluster!(
    requests_per_minute_are_exact,
    reservations_are_capped_and_settled_once,
    usage_counts_in_the_period_of_its_admission,
    an_unsettled_reservation_expires,
);

test_with_both_counters!(
    requests_per_minute_are_exact,
    reservations_are_capped_and_settled_once,
    cost_limits_hold_micro_usd,
    a_refused_request_takes_nothing,
    usage_counts_in_the_period_of_its_admission,
    an_unsettled_reservation_expires,
);

/// Replicas on one Redis admit exactly N per minute between them, however the requests
/// interleave.
#[tokio::test]
async fn replicas_admit_exactly_n_between_them() {
    let (a, b) = (redis(), redis());
    let k = key(Limits { requests_per_minute: Some(10), token_limit: Some(1_000_000), ..Default::default() });
    let tries = (0..40).map(|i| {
        let f = if i % 2 == 0 { &a } else { &b };
        f.admit(&k, ask(1, 0))
    });
    let outcomes = futures_join(tries).await;
    let admitted = outcomes.iter().filter(|o| matches!(o, Ok(Outcome::Admitted { .. }))).count();
    let limited = outcomes.iter().filter(|o| matches!(o, Ok(Outcome::RateLimited(_)))).count();
    assert_eq!((admitted, limited), (10, 30));
    assert_eq!(b.usage(&k).await.reserved_tokens, 10, "every admission's reservation, seen from either");
}

/// Runs futures concurrently on this task.
async fn futures_join<F: std::future::Future>(futures: impl Iterator<Item = F>) -> Vec<F::Output> {
    let mut pinned: Vec<_> = futures.map(Box::pin).collect();
    let mut done: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if done[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => done[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending { std::task::Poll::Pending } else { std::task::Poll::Ready(()) }
    })
    .await;
    done.into_iter().map(|d| d.expect("every future finished")).collect()
}

/// A reservation made by one replica's Check is settled by another's metering: usage
/// counted once, the hold given back, a retry on a third replica charging nothing.
#[tokio::test]
async fn a_reservation_is_settled_on_any_replica_once() {
    let (a, b, c) = (redis(), redis(), redis());
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    let t = a.admitted(&k, ask(80, 0)).await.unwrap();
    assert_eq!(b.settle(&k, Some(t), used(5, 15, 0)).await, Some(used(5, 15, 0)));
    assert_eq!(c.settle(&k, Some(t), used(5, 15, 0)).await, None, "settled before, by another replica");
    assert!(c.meters.take_dirty().is_empty(), "nothing for c's ledger either");
    let u = a.usage(&k).await;
    assert_eq!((u.requests, u.prompt_tokens + u.completion_tokens, u.reserved_tokens), (1, 20, 0), "counted once");
}

/// Counters Redis lost (a restart without persistence, a failover, an eviction) are
/// rebuilt from what the replica's ledger knows, once: set if absent, never added twice.
#[tokio::test]
async fn lost_counters_are_rebuilt_from_the_ledger() {
    let f = redis();
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    let t = f.admitted(&k, ask(10, 0)).await.unwrap();
    f.settle(&k, Some(t), used(30, 20, 0)).await;
    let mut conn = redis::Client::open(redis_url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let lost: Vec<String> = redis::cmd("KEYS").arg(format!("pc:{{{}}}:*", k.id)).query_async(&mut conn).await.unwrap();
    assert!(!lost.is_empty());
    let _: i64 = redis::cmd("DEL").arg(&lost).query_async(&mut conn).await.unwrap();
    let again = f.admitted(&k, ask(100, 0)).await.unwrap();
    assert_eq!(again.hold.tokens, 50, "50 used before the loss: 50 left");
    let g = redis();
    assert_eq!(g.usage(&k).await.prompt_tokens + g.usage(&k).await.completion_tokens, 50, "seeded once");
}

/// Redis down: `local` keeps deciding with the replica's own counters (counted in the
/// status), `deny` refuses keys with limits; when Redis is back, counting is shared again
/// and the settles it missed reach it.
#[tokio::test]
async fn outages_follow_the_failure_mode_and_recover() {
    let mut r = PrivateRedis::start().await;
    let local = shared_on(&r.url(), FailureMode::Local);
    let deny = shared_on(&r.url(), FailureMode::Deny);
    let k = key(Limits { token_limit: Some(1_000), ..Default::default() });
    let held = local.admitted(&k, ask(100, 0)).await.unwrap();
    assert!(local.shared.as_ref().unwrap().status().up);
    r.down();
    // Local: answered from this replica's counters.
    let during = local.admitted(&k, ask(100, 0)).await.unwrap();
    local.settle(&k, Some(held), used(0, 60, 0)).await;
    local.settle(&k, Some(during), used(0, 40, 0)).await;
    let status = local.shared.as_ref().unwrap().status();
    assert!(!status.up && status.outage_decisions >= 1, "{status:?}");
    // Deny: keys with limits get 503.
    assert!(matches!(deny.admit(&k, ask(1, 0)).await, Err(Unavailable(_))));
    // Redis comes back empty (no persistence): the next Check rebuilds the key's counters
    // from what this replica's ledger holds, outage usage included, once.
    r.up().await;
    let shared = local.shared.as_ref().unwrap();
    eventually("Redis counts again", StdDuration::from_secs(10), || async {
        shared.tick(now().mono).await;
        shared.status().up.then_some(())
    })
    .await;
    let after = local.admitted(&k, ask(1, 0)).await.unwrap();
    assert_eq!(after.hold.tokens, 1);
    let u = redis_usage(&r.url(), &k).await;
    assert_eq!((u.completion_tokens, u.reserved_tokens), (100, 1), "{u:?}");
    assert!(matches!(deny.admit(&k, ask(1, 0)).await, Ok(Outcome::Admitted { .. })));
}

/// Reconciliation raises Redis to the ledger where it is behind (a settle it missed),
/// never lowers it (it is ahead by what was not flushed yet), and reports the drift.
#[tokio::test]
async fn reconciliation_raises_redis_to_the_ledger() {
    let f = redis();
    let k = key(Limits { token_limit: Some(1_000), cost_limit_micros: Some(1_000_000), ..Default::default() });
    let t = f.admitted(&k, ask(10, 10)).await.unwrap();
    f.settle(&k, Some(t), used(10, 10, 10)).await;
    let mut row = portcullis::domain::budget::Counters::empty(k.id, ResetPeriod::Never, t.period_start);
    (row.requests, row.prompt_tokens, row.completion_tokens, row.cost_micros) = (3, 50, 70, 500);
    let shared = f.shared.as_ref().unwrap();
    shared.reconcile(std::slice::from_ref(&row), |_| true, now()).await;
    let status = shared.status();
    assert_eq!((status.drift_tokens, status.drift_micros), (100, 490), "120 - 20 tokens, 500 - 10 micro-USD");
    let u = f.usage(&k).await;
    assert_eq!((u.requests, u.prompt_tokens, u.completion_tokens, u.cost_micros), (3, 50, 70, 500));
    shared.reconcile(std::slice::from_ref(&row), |_| true, now()).await;
    assert_eq!(shared.status().drift_tokens, 0, "caught up");
    let behind = portcullis::domain::budget::Counters::empty(k.id, ResetPeriod::Never, t.period_start);
    shared.reconcile(std::slice::from_ref(&behind), |_| true, now()).await;
    assert_eq!(f.usage(&k).await.completion_tokens, 70, "never lowered");
}

/// Redis slow (every client paused for 3 s): a Check waits at most `--redis-timeout`, then the
/// failure mode decides; when Redis answers again the counting is shared again.
#[tokio::test]
async fn a_slow_redis_costs_a_timeout_not_the_check() {
    let r = PrivateRedis::start().await;
    let f = shared_on(&r.url(), FailureMode::Local);
    let k = key(Limits { requests_per_minute: Some(100), ..Default::default() });
    assert!(matches!(f.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. })));
    let shared = f.shared.as_ref().unwrap();
    assert_eq!(shared.status().outage_decisions, 0);
    let client = redis::Client::open(r.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("CLIENT").arg("PAUSE").arg(3_000).arg("ALL").query_async(&mut c).await.unwrap();
    // The Check answers from this replica's counters instead of waiting for Redis: within
    // the timeout (200 ms here) and a margin for a loaded machine, far below the 3 s pause.
    let started = std::time::Instant::now();
    assert!(matches!(f.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. })));
    let waited = started.elapsed();
    assert!(waited <= TIMEOUT + StdDuration::from_millis(300), "the Check waited {waited:?} for a paused Redis");
    assert_eq!(shared.status().outage_decisions, 1, "decided in the failure mode: {:?}", shared.status());
    // The pause ends by itself.
    eventually("Redis decides again", StdDuration::from_secs(10), || async {
        let before = shared.status().outage_decisions;
        let answered = matches!(f.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. }));
        (answered && shared.status().outage_decisions == before).then_some(())
    })
    .await;
}

async fn redis_usage(url: &str, k: &ApiKey) -> Usage {
    let f = shared_on(url, FailureMode::Deny);
    f.usage(k).await
}

/// In the failure mode each replica admits its share of a key's requests per minute, so
/// all of them together never admit more than the limit.
#[tokio::test]
async fn a_replica_alone_admits_its_share_of_the_window() {
    let mut r = PrivateRedis::start().await;
    let (a, b) = (shared_on(&r.url(), FailureMode::Local), shared_on(&r.url(), FailureMode::Local));
    for f in [&a, &b] {
        f.shared.as_ref().unwrap().tick(now().mono).await;
    }
    a.shared.as_ref().unwrap().tick(now().mono).await;
    assert_eq!(a.shared.as_ref().unwrap().status().replicas, 2);
    r.down();
    let k = key(Limits { requests_per_minute: Some(5), ..Default::default() });
    let mut admitted = 0;
    for _ in 0..10 {
        if matches!(a.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. })) {
            admitted += 1;
        }
    }
    assert_eq!(admitted, 2, "5 per minute over 2 replicas: 2 each");
}
