//! One counter suite, run against both implementations: in this process, and shared in
//! Redis (`PORTCULLIS_TEST_REDIS`, default `redis://127.0.0.1:6379`; every test uses fresh
//! key ids, so tests share the server). Then what only shared counters do: several
//! replicas counting together, settling on another replica, rebuilding lost counters from
//! the ledger, and outages (a private `redis-server` that the test stops and starts).

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration as StdDuration;

use chrono::{Datelike, Duration, TimeZone, Utc};
use portcullis::domain::budget::{BudgetDenial, Counters as LedgerRow, Hold, Metered, Meters, Ticket};
use portcullis::domain::clock::{Clock, Mono, Now, SystemClock};
use portcullis::domain::counters::{Counters, InProcess, Outcome, Unavailable, Usage};
use portcullis::domain::key::{ApiKey, Limits, NewKey, ResetPeriod};
use portcullis::shared_counters::{FailureMode, Settings, SharedCounters};
use uuid::Uuid;

use common::eventually;
use common::replicas::PrivateRedis;
use proptest::strategy::Strategy as _;

fn redis_url() -> String {
    std::env::var("PORTCULLIS_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// The longest wait for Redis on a Check.
const TIMEOUT: StdDuration = StdDuration::from_millis(200);

/// Reservations never settled are released after this (short, so a test can see it).
const TTL: StdDuration = StdDuration::from_millis(300);

/// The usage ledger as the seeder reads it (every replica's flushed increments), per key
/// and period start: what a test says the ledger holds. A read waits for a permit of
/// `gate` (open unless a test closes it: a database that does not answer) and fails while
/// `down` (a database that refuses).
#[derive(Default)]
struct FakeLedger {
    rows: std::sync::Mutex<HashMap<(Uuid, i64), LedgerRow>>,
    gate: Option<tokio::sync::Semaphore>,
    down: std::sync::atomic::AtomicBool,
}

type Ledger = Arc<FakeLedger>;

impl FakeLedger {
    fn holds(&self, row: LedgerRow) {
        self.rows.lock().unwrap().insert((row.key_id, row.period_start.timestamp_micros()), row);
    }

    /// Lets `n` reads through a closed gate.
    fn answer(&self, n: usize) {
        self.gate.as_ref().expect("a closed gate").add_permits(n);
    }
}

/// Counters of one implementation, with the meters (ledger, last uses) they record in.
struct Fixture {
    counters: Arc<dyn Counters>,
    meters: Arc<Meters>,
    shared: Option<Arc<SharedCounters>>,
    ledger: Ledger,
}

fn in_process() -> Fixture {
    let meters = Arc::new(Meters::default());
    let counters = Arc::new(InProcess::new(Arc::clone(&meters)));
    Fixture { counters, meters, shared: None, ledger: Ledger::default() }
}

fn shared_on(url: &str, failure_mode: FailureMode) -> Fixture {
    shared_with(url, failure_mode, TTL)
}

/// Shared counters on `url` whose seeder reads the fixture's ledger.
fn shared_with(url: &str, failure_mode: FailureMode, reservation_ttl: StdDuration) -> Fixture {
    shared_reading(url, failure_mode, reservation_ttl, Ledger::default())
}

/// Shared counters whose seeder's ledger reads wait until the test lets them through
/// ([`FakeLedger::answer`]).
fn shared_with_a_slow_ledger(failure_mode: FailureMode) -> Fixture {
    let ledger = Arc::new(FakeLedger { gate: Some(tokio::sync::Semaphore::new(0)), ..Default::default() });
    shared_reading(&redis_url(), failure_mode, TTL, ledger)
}

fn shared_reading(url: &str, failure_mode: FailureMode, reservation_ttl: StdDuration, ledger: Ledger) -> Fixture {
    let meters = Arc::new(Meters::default());
    let settings = Settings { url: url.into(), timeout: TIMEOUT, failure_mode, reservation_ttl };
    let shared = Arc::new(SharedCounters::new(settings, InProcess::new(Arc::clone(&meters))).unwrap());
    let reads = Arc::clone(&ledger);
    SharedCounters::spawn_seeder(&shared, move |key_id, period_start| {
        let ledger = Arc::clone(&reads);
        Box::pin(async move {
            if let Some(gate) = &ledger.gate {
                gate.acquire().await.map_err(|e| e.to_string())?.forget();
            }
            if ledger.down.load(std::sync::atomic::Ordering::Relaxed) {
                return Err("the database is down".to_string());
            }
            Ok(ledger.rows.lock().unwrap().get(&(key_id, period_start.timestamp_micros())).cloned())
        })
    });
    Fixture { counters: Arc::clone(&shared) as Arc<dyn Counters>, meters, shared: Some(shared), ledger }
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

/// Forgets everything Redis holds of `k` (a restart without persistence, a failover, an
/// eviction).
async fn redis_loses(k: &ApiKey) {
    assert!(common::replicas::redis_forgets(&redis_url(), &k.id.to_string()).await > 0, "Redis held the key");
}

/// Counters Redis lacks (lost in a restart without persistence, a failover, an eviction;
/// or a new period) are seeded by the Check at once from what this replica's memory holds
/// (its mirror of the ledger and the usage it has not written yet): the Check never waits
/// for the database. In the background the seeder reads the key's period from the ledger
/// (every replica's usage) and raises the counters to it plus this replica's unwritten
/// usage: set if absent, raised if behind, never added twice.
#[tokio::test]
async fn lost_counters_are_seeded_from_memory_at_once_and_raised_to_the_ledger() {
    let f = shared_with_a_slow_ledger(FailureMode::Deny);
    let shared = f.shared.as_ref().unwrap();
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    // Another replica spent 40 and wrote it to the ledger; this one's memory knows nothing.
    let start = Utc.timestamp_opt(0, 0).unwrap();
    let mut row = LedgerRow::empty(k.id, ResetPeriod::Never, start);
    (row.requests, row.prompt_tokens, row.completion_tokens) = (2, 15, 25);
    f.ledger.holds(row);
    // The ledger does not answer: the Check does not wait for it.
    let t = tokio::time::timeout(StdDuration::from_secs(2), f.admitted(&k, ask(100, 0)))
        .await
        .expect("the Check answers while the ledger read waits")
        .unwrap();
    assert_eq!(t.hold.tokens, 100, "seeded from memory, which knows nothing of the other replica's 40");
    assert_eq!(shared.status().outage_decisions, 0, "decided in Redis, not by the failure mode");
    assert_eq!(shared.status().seeds_pending, 1);
    // The ledger answers: the counters reach it.
    f.ledger.answer(1);
    eventually("raised to the ledger", StdDuration::from_secs(5), || async {
        let u = redis_usage(&redis_url(), &k).await;
        (u.requests == 2 && u.prompt_tokens + u.completion_tokens == 40).then_some(())
    })
    .await;
    assert_eq!(shared.status().seeds_pending, 0);
    // Refused: Redis shows this replica the key's 40 (now in its memory).
    assert!(matches!(f.admit(&k, ask(1, 0)).await, Ok(Outcome::Budget { .. })), "40 used, 100 held");
    f.settle(&k, Some(t), used(0, 10, 0)).await;
    // Redis loses everything of the key; this replica has not written its 10 yet.
    redis_loses(&k).await;
    let again = tokio::time::timeout(StdDuration::from_secs(2), f.admitted(&k, ask(100, 0)))
        .await
        .expect("the Check answers while the ledger read waits")
        .unwrap();
    assert_eq!(again.hold.tokens, 50, "memory: the 40 Redis showed at the refusal and its own unwritten 10");
    f.ledger.answer(1);
    eventually("raised to the ledger", StdDuration::from_secs(5), || async {
        (shared.status().seeds_pending == 0).then_some(())
    })
    .await;
    let u = redis_usage(&redis_url(), &k).await;
    assert_eq!(
        (u.requests, u.prompt_tokens + u.completion_tokens, u.reserved_tokens),
        (3, 50, 50),
        "the ledger's 2 requests and 40 and this replica's unwritten 1 and 10, once: raised, never added to the \
         memory seed (whose 40 seen in Redis, counted as completion, does not count the ledger's 15 of prompt again)"
    );
    assert!(matches!(f.admit(&k, ask(1, 0)).await, Ok(Outcome::Budget { .. })), "50 used, 50 held");
}

/// A key's period the ledger cannot be read for (the database down too) is still decided
/// in Redis, from memory: the failure mode decides only when Redis cannot be reached. The
/// read is tried again at each tick, and the counters reach the ledger once it answers.
#[tokio::test]
async fn a_key_whose_ledger_cannot_be_read_is_decided_from_memory_and_raised_when_it_answers() {
    let f = shared_on(&redis_url(), FailureMode::Deny);
    let shared = f.shared.as_ref().unwrap();
    f.ledger.down.store(true, std::sync::atomic::Ordering::Relaxed);
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    let mut row = LedgerRow::empty(k.id, ResetPeriod::Never, Utc.timestamp_opt(0, 0).unwrap());
    row.completion_tokens = 100;
    f.ledger.holds(row);
    let t = f.admitted(&k, ask(1, 0)).await.unwrap();
    assert_eq!(t.hold.tokens, 1, "admitted from memory");
    assert_eq!(shared.status().outage_decisions, 0, "not by the failure mode: Redis answered");
    f.ledger.down.store(false, std::sync::atomic::Ordering::Relaxed);
    eventually("the failed read is retried at the tick", StdDuration::from_secs(5), || async {
        shared.tick(now().mono).await;
        (shared.status().seeds_pending == 0).then_some(())
    })
    .await;
    assert!(
        matches!(f.admit(&k, ask(1, 0)).await, Ok(Outcome::Budget { denial: BudgetDenial::Tokens { .. }, .. })),
        "the ledger's 100 spent"
    );
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
    // Redis comes back empty (no persistence): the next Check seeds the key's counters
    // from this replica's memory (what it metered, outage usage included), once; the
    // seeder raises them to the ledger (empty here) and the unwritten usage: no change.
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

/// A budget Redis refused on a replica stays refused there in `local` mode: the refusal
/// tells the replica the key's usage (its last known usage), even though the usage was
/// metered and settled on another replica and this one never admitted the key.
#[tokio::test]
async fn a_budget_redis_refused_stays_refused_in_local_mode() {
    let mut r = PrivateRedis::start().await;
    let (a, b) = (shared_on(&r.url(), FailureMode::Local), shared_on(&r.url(), FailureMode::Local));
    let k = key(Limits { token_limit: Some(100), ..Default::default() });
    let t = a.admitted(&k, ask(100, 0)).await.unwrap();
    a.settle(&k, Some(t), used(40, 60, 0)).await;
    let refused = b.admit(&k, ask(1, 0)).await;
    assert!(matches!(refused, Ok(Outcome::Budget { denial: BudgetDenial::Tokens { .. }, .. })), "{refused:?}");
    r.down();
    let alone = b.admit(&k, ask(1, 0)).await;
    assert_eq!(b.shared.as_ref().unwrap().status().outage_decisions, 1, "decided in the failure mode");
    assert!(
        matches!(alone, Ok(Outcome::Budget { denial: BudgetDenial::Tokens { .. }, .. })),
        "the 100 Redis showed at the refusal, spent: {alone:?}"
    );
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
    // The pause ends by itself; the next tick records the admission decided meanwhile.
    eventually("Redis decides again", StdDuration::from_secs(10), || async {
        shared.tick(now().mono).await;
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

/// Waits until the seeder has raised the periods Checks seeded from memory to the ledger.
async fn seeded(shared: &SharedCounters) {
    eventually("the seeder is done", StdDuration::from_secs(5), || async {
        (shared.status().seeds_pending == 0).then_some(())
    })
    .await;
}

/// Makes the private Redis write its data to disk, so a restart is a blip that keeps it.
async fn save(r: &PrivateRedis) {
    let mut c = redis::Client::open(r.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let _: String = redis::cmd("SAVE").query_async(&mut c).await.unwrap();
}

/// A settle made while Redis is unreachable is replayed once it answers again: the
/// reservation is given back at once (not after `--reservation-ttl`), the usage is counted
/// once (the ledger has it and reconciliation raises Redis to it; the replay adds none),
/// and a retried settle of the same ticket, anywhere, still charges nothing.
#[tokio::test]
async fn a_settle_missed_while_redis_was_away_gives_its_reservation_back_when_it_returns() {
    let mut r = PrivateRedis::start().await;
    let f = shared_with(&r.url(), FailureMode::Local, StdDuration::from_secs(600));
    let shared = f.shared.as_ref().unwrap();
    let k = key(Limits { token_limit: Some(150), ..Default::default() });
    let t = f.admitted(&k, ask(100, 0)).await.unwrap();
    seeded(shared).await;
    save(&r).await;
    r.down();
    assert_eq!(f.settle(&k, Some(t), used(0, 30, 0)).await, Some(used(0, 30, 0)), "metered here meanwhile");
    assert_eq!(shared.status().settles_pending, 1);
    r.up().await;
    eventually("the missed settle is replayed", StdDuration::from_secs(10), || async {
        shared.tick(now().mono).await;
        (shared.status().settles_pending == 0).then_some(())
    })
    .await;
    let u = redis_usage(&r.url(), &k).await;
    assert_eq!((u.reserved_tokens, u.completion_tokens), (0, 0), "the hold is back, no usage added: {u:?}");
    // The ledger has the usage once; reconciliation raises Redis to it.
    let ledger = f.meters.take_dirty();
    assert_eq!(ledger.iter().map(|d| d.completion_tokens).sum::<u64>(), 30);
    shared.reconcile(&ledger, |_| true, now()).await;
    assert_eq!(redis_usage(&r.url(), &k).await.completion_tokens, 30);
    let g = shared_on(&r.url(), FailureMode::Deny);
    assert_eq!(g.settle(&k, Some(t), used(0, 30, 0)).await, None, "settled before");
    assert_eq!(f.admitted(&k, ask(500, 0)).await.unwrap().hold.tokens, 120, "150 less the 30 used");
    assert_eq!(shared.status().settles_dropped, 0);
}

/// Requests per minute across the failure mode's two transitions: going in, this
/// replica's window starts from the shared count it last saw (so it admits only what the
/// minute had left); coming back, what it admitted alone is recorded in Redis before it
/// counts there again (so Redis does not admit those slots twice).
#[tokio::test]
async fn the_window_holds_into_the_failure_mode_and_back() {
    let mut r = PrivateRedis::start().await;
    let f = shared_on(&r.url(), FailureMode::Local);
    let shared = f.shared.as_ref().unwrap();
    shared.tick(now().mono).await;
    assert_eq!(shared.status().replicas, 1);
    let k = key(Limits { requests_per_minute: Some(10), ..Default::default() });
    for _ in 0..6 {
        assert!(matches!(f.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. })));
    }
    save(&r).await;
    r.down();
    let mut alone = 0;
    for _ in 0..10 {
        if matches!(f.admit(&k, Hold::default()).await, Ok(Outcome::Admitted { .. })) {
            alone += 1;
        }
    }
    assert_eq!(alone, 4, "6 of 10 were taken in the shared window");
    r.up().await;
    let back = eventually("Redis decides again", StdDuration::from_secs(10), || async {
        shared.tick(now().mono).await;
        let before = shared.status().outage_decisions;
        let outcome = f.admit(&k, Hold::default()).await;
        (shared.status().outage_decisions == before).then_some(outcome)
    })
    .await;
    assert!(matches!(back, Ok(Outcome::RateLimited(_))), "the minute is full: {back:?}");
    assert_eq!(redis_usage(&r.url(), &k).await.requests_last_minute, 10);
}

/// One step of an arrival sequence: a Check of one of the keys, or the settle of the
/// `nth` admission so far with what its response used.
#[derive(Debug, Clone)]
enum Step {
    Admit { key: usize, tokens: u64 },
    Settle { nth: usize, tokens: u64 },
}

/// What both implementations must agree on for one step (times aside: Redis's clock
/// and this process's differ by the round trip).
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Admitted { remaining: Option<u32>, held: Option<u64> },
    RateLimited,
    Tokens { in_flight: bool },
    Settled(Option<Metered>),
    Other(String),
}

fn seen(o: Result<Outcome, Unavailable>) -> Seen {
    match o {
        Ok(Outcome::Admitted { rpm, reservation }) => {
            Seen::Admitted { remaining: rpm.map(|a| a.remaining), held: reservation.map(|t| t.hold.tokens) }
        }
        Ok(Outcome::RateLimited(_)) => Seen::RateLimited,
        Ok(Outcome::Budget { denial: BudgetDenial::Tokens { in_flight, .. }, .. }) => Seen::Tokens { in_flight },
        other => Seen::Other(format!("{other:?}")),
    }
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 40, ..Default::default() })]

    /// Property: on the same arrival sequence (within one minute: Redis takes its own
    /// clock, so every sequence runs well inside one window and the counts must match
    /// exactly), Redis admits, refuses and holds exactly as the in-process counters do.
    #[test]
    fn the_redis_counters_decide_as_the_in_process_ones(
        limits in proptest::collection::vec((1u32..8, proptest::option::of(10u64..300)), 3),
        steps in proptest::collection::vec(
            proptest::prop_oneof![
                3 => (0usize..3, 0u64..120).prop_map(|(key, tokens)| Step::Admit { key, tokens }),
                1 => (0usize..64, 0u64..120).prop_map(|(nth, tokens)| Step::Settle { nth, tokens }),
            ],
            1..40,
        ),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let (local, shared) = (in_process(), redis());
            let keys: Vec<ApiKey> = limits
                .iter()
                .map(|&(rpm, tokens)| key(Limits { requests_per_minute: Some(rpm), token_limit: tokens, ..Default::default() }))
                .collect();
            // Each admission's ticket from each implementation (their ids differ).
            let mut tickets: Vec<(usize, Option<Ticket>, Option<Ticket>)> = Vec::new();
            let mut settled = std::collections::HashSet::new();
            for step in &steps {
                match *step {
                    Step::Admit { key, tokens } => {
                        let k = &keys[key];
                        let (a, b) = (local.admit(k, ask(tokens, 0)).await, shared.admit(k, ask(tokens, 0)).await);
                        if let (Ok(Outcome::Admitted { reservation: ra, .. }), Ok(Outcome::Admitted { reservation: rb, .. })) = (a, b) {
                            tickets.push((key, ra, rb));
                        }
                        assert_eq!(seen(a), seen(b), "{step:?} of {steps:?} with {limits:?}");
                    }
                    Step::Settle { nth, tokens } => {
                        let Some(&(key, ta, tb)) = tickets.get(nth) else { continue };
                        if ta.is_none() || !settled.insert(nth) {
                            continue;
                        }
                        let k = &keys[key];
                        let m = used(0, tokens, 0);
                        let (a, b) = (local.settle(k, ta, m).await, shared.settle(k, tb, m).await);
                        assert_eq!(Seen::Settled(a), Seen::Settled(b), "{step:?} of {steps:?}");
                    }
                }
            }
            for k in &keys {
                let (a, b) = (local.usage(k).await, shared.usage(k).await);
                assert_eq!(
                    (a.requests, a.completion_tokens, a.reserved_tokens, a.requests_last_minute),
                    (b.requests, b.completion_tokens, b.reserved_tokens, b.requests_last_minute),
                );
            }
        });
    }
}
