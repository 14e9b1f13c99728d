//! Counters shared by every replica, in Redis: the second implementation of
//! [`Counters`]. One server-side script per Check decides every limit of a key at once,
//! with Redis's clock, and records the admission and the reservation; one script settles a
//! reservation, once, from any replica. While Redis is unreachable (short timeouts, a
//! circuit breaker) the replica decides with its own counters (`local`) or denies keys
//! with limits (`deny`).
//!
//! Layout: every key of one API key `k` shares the hash tag `{k}` (one Redis Cluster slot):
//! - `pc:{k}:rpm`: admission times (ms), newest first, none older than 60 s;
//! - `pc:{k}:b:<period start µs>`: the period's usage and reservations (integer fields
//!   `req`, `pt`, `ct`, `t` tokens, `m` micro-USD, `rt`/`rm` reserved), seeded when
//!   missing by the Check from the replica's memory and raised to the ledger in the
//!   background, expiring after the period;
//! - `pc:{k}:rz`: reservations in flight, `id:tokens:micros:period`, scored by deadline (ms);
//! - `pc:{k}:done`: settled ids → when, kept a while so a retried settle charges nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{RedisResult, Script};
use uuid::Uuid;

use crate::domain::budget::{BudgetDenial, Hold, Metered, Ticket};
use crate::domain::clock::{Mono, Now};
use crate::domain::counters::{Charge, CountFuture, Counters, InProcess, Outcome, Unavailable, Usage};
use crate::domain::key::{ApiKey, ResetPeriod};
use crate::domain::period;
use crate::domain::shards::Sharded;
use crate::domain::window::{Admission, WINDOW_MICROS};

/// What a replica does while Redis is unreachable (`--counter-failure-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum FailureMode {
    /// Decide with this replica's own counters: its share of each key's requests per
    /// minute (the limit divided by the replicas last seen alive), budgets against the
    /// last known usage.
    Local,
    /// Deny requests of keys with limits (503).
    Deny,
}

/// How the shared counters are set.
#[derive(Debug, Clone)]
pub struct Settings {
    pub url: String,
    /// Longest wait for one Redis call before it counts as failed.
    pub timeout: Duration,
    pub failure_mode: FailureMode,
    /// A reservation never settled is released after this.
    pub reservation_ttl: Duration,
}

/// Consecutive failed calls that open the breaker.
const BREAKER_FAILURES: u32 = 3;
/// How long an open breaker sends every decision to the failure mode before Redis is
/// tried again.
const BREAKER_OPEN_MICROS: i64 = 1_000_000;
/// Expired reservations released per Check, at most (bounded work in Redis).
const SWEEP_PER_CHECK: u32 = 16;
/// A replica is counted alive while its heartbeat is younger than this.
const REPLICA_ALIVE_MS: i64 = 10_000;
/// Budget hashes outlive their period by this (late settles); a budget that never resets
/// is kept (reconciliation and the seed step rebuild it if Redis loses it).
const BUDGET_GRACE_MS: i64 = 7 * 24 * 3_600_000;
/// Settles Redis missed (unreachable) waiting to be replayed, at most; beyond it the oldest
/// is dropped (counted): its reservation then waits for `--reservation-ttl` in Redis.
/// About 64 bytes each.
pub const MAX_MISSED_SETTLES: usize = 65_536;
/// Missed settles replayed per tick, at most (bounded work once Redis is back).
const REPLAY_PER_TICK: usize = 4_096;
/// Periods waiting for the seeder to read them from the ledger (queued, being read, or
/// whose read failed and is retried at the tick), at most; beyond it a request is dropped
/// (counted): that period's counters stay at what the replica's memory held (its mirror
/// of the ledger, at most a reconciliation old) until reconciliation raises them.
const SEED_QUEUE: usize = 1_024;
/// Lua numbers are doubles: every integer sent to a script stays below 2^53 (a limit
/// above it is as good as none).
const MAX_EXACT: u64 = 1 << 53;

/// A period's usage as the scripts take it: requests, prompt, completion and all tokens,
/// micro-USD, each within what Lua's numbers hold exactly.
fn exact_counts(requests: u64, prompt: u64, completion: u64, micros: i64) -> [i64; 5] {
    let n = |v: u64| v.min(MAX_EXACT) as i64;
    [n(requests), n(prompt), n(completion), n(prompt.saturating_add(completion)), micros.clamp(0, MAX_EXACT as i64)]
}

fn exact_counts_of(c: &crate::domain::budget::Counters) -> [i64; 5] {
    exact_counts(c.requests, c.prompt_tokens, c.completion_tokens, c.cost_micros)
}

const ADMIT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local rpm_limit = tonumber(ARGV[1])
local token_limit = tonumber(ARGV[2])
local cost_limit = tonumber(ARGV[3])
local budgeted = token_limit >= 0 or cost_limit >= 0
local function int(x) return string.format('%d', x) end
local function num(v) return tonumber(v or '0') or 0 end
-- Reservations past their deadline give their hold back (a bounded number per call).
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[7]))
for _, r in ipairs(stale) do
  local tok, mic, per = string.match(r, '^%d+:(%d+):(%d+):(%-?%d+)$')
  local bk = ARGV[8] .. (per or '')
  if tok then
    local h = redis.call('HMGET', bk, 'rt', 'rm')
    if h[1] then
      redis.call('HSET', bk, 'rt', int(math.max(0, num(h[1]) - tonumber(tok))), 'rm', int(math.max(0, num(h[2]) - tonumber(mic))))
    end
  end
end
if #stale > 0 then redis.call('ZREMRANGEBYRANK', KEYS[3], 0, #stale - 1) end
-- The window: admissions older than 60 s leave from the tail.
local in_window, oldest = 0, nil
if rpm_limit > 0 then
  while true do
    local last = redis.call('LINDEX', KEYS[1], -1)
    if not last then break end
    if now - tonumber(last) >= 60000 then redis.call('RPOP', KEYS[1]) else oldest = tonumber(last) break end
  end
  in_window = redis.call('LLEN', KEYS[1])
end
local function reset_in() if oldest then return oldest + 60000 - now end return 0 end
local used_t, used_m, rt, rm = 0, 0, 0, 0
if budgeted then
  local h = redis.call('HMGET', KEYS[2], 't', 'm', 'rt', 'rm')
  if not h[1] then
    -- Missing (a new period, or Redis lost it): the replica asks again with what its
    -- memory holds of the period (ARGV 11-15), set here if still absent, never added to;
    -- its seeder raises them to the ledger in the background (SEED).
    if ARGV[11] == '' then return {-1} end
    redis.call('HSET', KEYS[2], 'req', ARGV[11], 'pt', ARGV[12], 'ct', ARGV[13], 't', ARGV[14], 'm', ARGV[15], 'rt', '0', 'rm', '0')
    -- Kept until the period's end (by the replica's calendar, never before Redis's now)
    -- and a grace after it; a budget that never resets is kept.
    if tonumber(ARGV[16]) > 0 then
      redis.call('PEXPIREAT', KEYS[2], int(math.max(tonumber(ARGV[16]), now) + tonumber(ARGV[17])))
    end
    h = {ARGV[14], ARGV[15], '0', '0'}
  end
  used_t, used_m, rt, rm = num(h[1]), num(h[2]), num(h[3]), num(h[4])
  -- A refusal answers the usage too: the replica's last known usage, for the failure mode.
  if token_limit >= 0 and used_t + rt >= token_limit then
    return {2, used_t < token_limit and 1 or 0, in_window, reset_in(), 0, 0, int(used_t), int(used_m)}
  end
  if cost_limit >= 0 and used_m + rm >= cost_limit then
    return {3, used_m < cost_limit and 1 or 0, in_window, reset_in(), 0, 0, int(used_t), int(used_m)}
  end
end
if rpm_limit > 0 then
  if in_window >= rpm_limit then return {1, 0, in_window, reset_in(), 0, 0, int(used_t), int(used_m)} end
  redis.call('LPUSH', KEYS[1], int(now))
  redis.call('PEXPIRE', KEYS[1], 60000)
  in_window = in_window + 1
  if not oldest then oldest = now end
end
local tok, mic = 0, 0
if budgeted then
  tok = tonumber(ARGV[4])
  if token_limit >= 0 then tok = math.min(tok, token_limit - used_t - rt) end
  mic = tonumber(ARGV[5])
  if cost_limit >= 0 then mic = math.min(mic, cost_limit - used_m - rm) end
  mic = math.max(mic, 0)
  redis.call('HSET', KEYS[2], 'rt', int(rt + tok), 'rm', int(rm + mic))
  -- One member per reservation: id:tokens:micros:period, scored by its deadline.
  redis.call('ZADD', KEYS[3], int(now + tonumber(ARGV[6])), ARGV[9] .. ':' .. int(tok) .. ':' .. int(mic) .. ':' .. ARGV[10])
  redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[6]) * 4 + 86400000)
end
return {0, 0, in_window, reset_in(), int(tok), int(mic), int(used_t), int(used_m)}
"#;

const SETTLE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function int(x) return string.format('%d', x) end
local function num(v) return tonumber(v or '0') or 0 end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - tonumber(ARGV[8]))
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then return 0 end
-- Live (not swept yet): its hold comes back with the charge.
local live = redis.call('ZREM', KEYS[2], ARGV[7])
local h = redis.call('HMGET', KEYS[1], 'req', 'pt', 'ct', 't', 'm', 'rt', 'rm')
if h[1] then
  local rt, rm = num(h[6]), num(h[7])
  if live == 1 then
    rt = math.max(0, rt - tonumber(ARGV[9]))
    rm = math.max(0, rm - tonumber(ARGV[10]))
  end
  if ARGV[6] == '1' then
    -- Release only: the usage is in the ledger already (reconciliation raises to it).
    redis.call('HSET', KEYS[1], 'rt', int(rt), 'rm', int(rm))
  else
    redis.call('HSET', KEYS[1], 'req', int(num(h[1]) + 1), 'pt', int(num(h[2]) + tonumber(ARGV[2])),
      'ct', int(num(h[3]) + tonumber(ARGV[3])), 't', int(num(h[4]) + tonumber(ARGV[4])),
      'm', int(num(h[5]) + tonumber(ARGV[5])), 'rt', int(rt), 'rm', int(rm))
  end
end
redis.call('ZADD', KEYS[3], int(now), ARGV[1])
redis.call('PEXPIRE', KEYS[3], tonumber(ARGV[8]))
if live == 1 then return 1 end
return 2
"#;

const ATTACH: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return redis.call('ZADD', KEYS[1], 'XX', 'GT', string.format('%d', now + tonumber(ARGV[2])), ARGV[1])
"#;

const USAGE: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = 0
for _, at in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  if now - tonumber(at) < 60000 then n = n + 1 end
end
local h = redis.call('HMGET', KEYS[2], 'req', 'pt', 'ct', 'm', 'rt', 'rm')
if not h[1] then return {n} end
return {n, h[1], h[2], h[3], h[4], h[5], h[6]}
"#;

/// Raises the counters in KEYS[1] to ARGV 1-5 (requests, prompt, completion, total tokens,
/// micro-USD) where they are behind, never lowering them; `drift` holds how far behind
/// tokens and micro-USD were. The part of [`RAISE`] and [`SEED`] that is the same.
macro_rules! raise_fields {
    () => {
        r#"
local fields = {'req', 'pt', 'ct', 't', 'm'}
local drift = {0, 0}
for i, f in ipairs(fields) do
  local have = tonumber(redis.call('HGET', KEYS[1], f) or '0') or 0
  local want = tonumber(ARGV[i])
  if want > have then
    redis.call('HSET', KEYS[1], f, ARGV[i])
    if f == 't' then drift[1] = want - have end
    if f == 'm' then drift[2] = want - have end
  end
end
-- The split of a total a replica saw in Redis is not shared (its memory counts it as
-- completion): raised field by field, prompt and completion may overlap. The total
-- decides; completion gives up the overlap.
local h = redis.call('HMGET', KEYS[1], 'pt', 'ct', 't')
local pt, ct, tt = tonumber(h[1] or '0') or 0, tonumber(h[2] or '0') or 0, tonumber(h[3] or '0') or 0
if pt + ct > tt then redis.call('HSET', KEYS[1], 'ct', string.format('%d', math.max(tt - pt, 0))) end
"#
    };
}

/// Raises a period's counters to the ledger's totals where they are behind (never lowers
/// them: Redis is ahead by what was not flushed yet); returns how far behind tokens and
/// micro-USD were. Counters that are missing stay missing: the next Check seeds them.
const RAISE: &str =
    concat!("if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end\n", raise_fields!(), "return drift\n");

/// Raises a period's counters to the ledger: the ledger's totals plus what the seeder's
/// replica metered and did not write yet (ARGV 1-5). Present (a Check seeded them from
/// memory, or another replica did), they are raised to those totals where behind, never
/// added to; absent (the Check's seed did not get through), they are set, expiring after
/// the period (ARGV 6, by the replica's calendar, never before Redis's now) and a grace
/// (ARGV 7). Returns 1 when it created them.
const SEED: &str = concat!(
    r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('HSET', KEYS[1], 'req', ARGV[1], 'pt', ARGV[2], 'ct', ARGV[3], 't', ARGV[4], 'm', ARGV[5], 'rt', '0', 'rm', '0')
  if tonumber(ARGV[6]) > 0 then
    redis.call('PEXPIREAT', KEYS[1], string.format('%d', math.max(tonumber(ARGV[6]), now) + tonumber(ARGV[7])))
  end
  return 1
end
"#,
    raise_fields!(),
    "return 0\n"
);

/// Records admissions a replica decided alone while Redis was unreachable into a key's
/// window: ARGV are their ages (ms) when sent, so they land at Redis's now minus their
/// age, whatever the replica's clock says. The window stays newest first; returns how
/// many admissions it holds now.
const RECORD: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local times = {}
for _, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
  local at = tonumber(v)
  if at and now - at < 60000 then table.insert(times, at) end
end
for i = 1, #ARGV do
  local at = now - tonumber(ARGV[i])
  if now - at < 60000 then table.insert(times, at) end
end
table.sort(times, function(a, b) return a > b end)
redis.call('DEL', KEYS[1])
for _, at in ipairs(times) do redis.call('RPUSH', KEYS[1], string.format('%d', at)) end
if #times > 0 then redis.call('PEXPIRE', KEYS[1], 60000) end
return #times
"#;

const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], string.format('%d', now), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', now - tonumber(ARGV[2])))
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[2]) * 6)
return redis.call('ZCARD', KEYS[1])
"#;

/// The breaker and what the metrics show of the shared counters.
#[derive(Debug, Default)]
struct Health {
    /// Consecutive failed calls.
    failures: AtomicU32,
    /// While the monotonic clock is before this (µs), Redis is not tried.
    open_until: AtomicI64,
    /// The last state logged: false once Redis was found unreachable.
    down: AtomicBool,
    outage_decisions: AtomicU64,
    replicas: AtomicU32,
    /// Usage the ledger holds and Redis did not, found by the last reconciliation.
    drift_tokens: AtomicU64,
    drift_micros: AtomicU64,
}

/// Settles Redis did not get (unreachable, or a call that failed), replayed when it
/// answers again: release-only, since their usage is in this replica's ledger already and
/// reaches Redis by reconciliation (raised, never added). Bounded: beyond
/// [`MAX_MISSED_SETTLES`] the oldest is dropped and counted.
#[derive(Debug, Default)]
pub struct MissedSettles {
    queue: Mutex<VecDeque<(Uuid, Ticket)>>,
    dropped: AtomicU64,
}

impl MissedSettles {
    pub fn push(&self, key_id: Uuid, ticket: Ticket) {
        let mut q = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() >= MAX_MISSED_SETTLES {
            q.pop_front();
            self.dropped.fetch_add(1, Relaxed);
        }
        q.push_back((key_id, ticket));
    }

    fn pop(&self) -> Option<(Uuid, Ticket)> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).pop_front()
    }

    /// Puts one whose replay failed back in front.
    fn unpop(&self, key_id: Uuid, ticket: Ticket) {
        let mut q = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if q.len() < MAX_MISSED_SETTLES {
            q.push_front((key_id, ticket));
        } else {
            self.dropped.fetch_add(1, Relaxed);
        }
    }

    pub fn len(&self) -> usize {
        self.queue.lock().map_or(0, |q| q.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Relaxed)
    }
}

/// The last count of a key's shared window this replica saw (at a Check decided in
/// Redis): what a local window starts from when Redis goes away.
#[derive(Debug, Clone, Copy)]
struct Seen {
    count: u32,
    at: Mono,
}

/// A period's counters Redis lacked (seeded from the replica's memory by the Check), to be
/// raised to the ledger by the seeder.
#[derive(Debug, Clone, Copy)]
pub struct SeedRequest {
    pub key_id: Uuid,
    pub reset_period: ResetPeriod,
    pub period_start: DateTime<Utc>,
    period_end_ms: i64,
    /// When it was asked (or asked again), on the replica's monotonic clock and on this
    /// process's: the seeder's calls feed the breaker at the time they are made.
    asked: Mono,
    asked_at: std::time::Instant,
}

impl SeedRequest {
    /// The replica's monotonic clock now.
    fn now(&self) -> Mono {
        let elapsed = i64::try_from(self.asked_at.elapsed().as_micros()).unwrap_or(i64::MAX);
        Mono::from_micros(self.asked.micros().saturating_add(elapsed))
    }
}

/// A period the seeder reads (queued or being read), or one whose read or raise failed,
/// asked again at the next tick.
enum Seeding {
    Pending,
    Failed(SeedRequest),
}

/// How the seeder reads a key's period from the ledger: its totals (every replica's
/// increments), `None` when it has none.
pub type LedgerRead = Pin<Box<dyn Future<Output = Result<Option<crate::domain::budget::Counters>, String>> + Send>>;

/// One Redis (a multiplexed connection that reconnects by itself), or a Redis Cluster
/// (every key of one API key in one slot, by its hash tag).
enum Redis {
    Single(ConnectionManager),
    Cluster(Box<Cluster>),
}

struct Cluster {
    client: ClusterClient,
    /// Made at the first call that finds none (a replica starts while Redis is down).
    conn: tokio::sync::Mutex<Option<ClusterConnection>>,
    timeout: Duration,
}

/// A connection of either kind, for one call.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl redis::aio::ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a redis::Cmd) -> redis::RedisFuture<'a, redis::Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> redis::RedisFuture<'a, Vec<redis::Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(cmd, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

impl Redis {
    /// `url`, or several comma-separated URLs: the seed nodes of a Redis Cluster.
    fn open(url: &str, timeout: Duration) -> Result<Redis, String> {
        let connect_timeout = timeout.max(Duration::from_millis(250));
        let nodes: Vec<&str> = url.split(',').map(str::trim).filter(|u| !u.is_empty()).collect();
        let bad = |e: redis::RedisError| format!("--redis-url is not a Redis URL ({}): {e}", redact(url));
        if nodes.len() > 1 {
            let client = ClusterClient::builder(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(timeout)
                // A script that timed out may have run: never sent twice.
                .retries(0)
                .build()
                .map_err(bad)?;
            let conn = tokio::sync::Mutex::new(None);
            return Ok(Redis::Cluster(Box::new(Cluster { client, conn, timeout: connect_timeout })));
        }
        let client = redis::Client::open(url).map_err(bad)?;
        let config = ConnectionManagerConfig::new()
            .set_response_timeout(Some(timeout))
            .set_connection_timeout(Some(connect_timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|e| format!("connecting to Redis at {}: {e}", redact(url)))?;
        Ok(Redis::Single(conn))
    }

    async fn conn(&self) -> RedisResult<Conn> {
        match self {
            Redis::Single(c) => Ok(Conn::Single(c.clone())),
            Redis::Cluster(cluster) => {
                let Cluster { client, conn, timeout } = &**cluster;
                let mut slot = conn.lock().await;
                if let Some(c) = slot.as_ref() {
                    return Ok(Conn::Cluster(c.clone()));
                }
                let c = tokio::time::timeout(*timeout, client.get_async_connection())
                    .await
                    .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "connecting timed out")))??;
                *slot = Some(c.clone());
                Ok(Conn::Cluster(c))
            }
        }
    }
}

pub struct SharedCounters {
    redis: Redis,
    settings: Settings,
    /// Decides while Redis is unreachable; also this replica's ledger and last uses (the
    /// same meters as `Limiters::meters`).
    local: InProcess,
    health: Health,
    replica_id: String,
    rng: Mutex<u64>,
    /// Settles Redis missed, replayed when it answers again.
    missed: MissedSettles,
    /// The last shared window count seen per key with a requests-per-minute limit.
    seen: Sharded<HashMap<Uuid, Seen>>,
    /// Keys with admissions decided here while Redis was away that Redis has not recorded
    /// yet; while any is left, this replica keeps deciding alone (so its own admissions
    /// never go uncounted in the window it decides with).
    unrecorded: Mutex<HashSet<Uuid>>,
    backlog: AtomicBool,
    /// Periods the seeder reads from the ledger (one read per key and period in flight),
    /// by key and period start (µs); bounded by [`SEED_QUEUE`].
    seeds: Mutex<HashMap<(Uuid, i64), Seeding>>,
    /// Seed requests dropped beyond the bound.
    seeds_dropped: AtomicU64,
    seed_tx: tokio::sync::mpsc::Sender<SeedRequest>,
    seed_rx: Mutex<Option<tokio::sync::mpsc::Receiver<SeedRequest>>>,
    admit: Script,
    settle: Script,
    attach: Script,
    usage: Script,
    heartbeat: Script,
    raise: Script,
    seed: Script,
    record: Script,
}

impl std::fmt::Debug for SharedCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SharedCounters").field("failure_mode", &self.settings.failure_mode).finish_non_exhaustive()
    }
}

/// What the metrics show of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CounterStatus {
    pub up: bool,
    pub outage_decisions: u64,
    pub replicas: u32,
    /// Tokens and micro-USD the ledger held beyond Redis at the last reconciliation.
    pub drift_tokens: u64,
    pub drift_micros: u64,
    /// Settles Redis missed, waiting to be replayed; and those dropped beyond the bound.
    pub settles_pending: u64,
    pub settles_dropped: u64,
    /// Periods seeded from memory waiting for their ledger read (or its retry); and seed
    /// requests dropped beyond the bound.
    pub seeds_pending: u64,
    pub seeds_dropped: u64,
}

impl SharedCounters {
    /// Connects lazily (a replica starts while Redis is down, in the failure mode).
    pub fn new(settings: Settings, local: InProcess) -> Result<Self, String> {
        let redis = Redis::open(&settings.url, settings.timeout)?;
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        let (seed_tx, seed_rx) = tokio::sync::mpsc::channel(SEED_QUEUE);
        Ok(SharedCounters {
            redis,
            settings,
            local,
            health: Health { replicas: AtomicU32::new(1), ..Default::default() },
            replica_id: Uuid::now_v7().to_string(),
            rng: Mutex::new(u64::from_le_bytes(seed) | 1),
            missed: MissedSettles::default(),
            seen: Sharded::default(),
            unrecorded: Mutex::new(HashSet::new()),
            backlog: AtomicBool::new(false),
            seeds: Mutex::new(HashMap::new()),
            seeds_dropped: AtomicU64::new(0),
            seed_tx,
            seed_rx: Mutex::new(Some(seed_rx)),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            attach: Script::new(ATTACH),
            usage: Script::new(USAGE),
            heartbeat: Script::new(HEARTBEAT),
            raise: Script::new(RAISE),
            seed: Script::new(SEED),
            record: Script::new(RECORD),
        })
    }

    pub fn status(&self) -> CounterStatus {
        CounterStatus {
            up: !self.health.down.load(Relaxed),
            outage_decisions: self.health.outage_decisions.load(Relaxed),
            replicas: self.health.replicas.load(Relaxed),
            drift_tokens: self.health.drift_tokens.load(Relaxed),
            drift_micros: self.health.drift_micros.load(Relaxed),
            settles_pending: self.missed.len() as u64,
            settles_dropped: self.missed.dropped(),
            seeds_pending: self.seeds.lock().map_or(0, |s| s.len() as u64),
            seeds_dropped: self.seeds_dropped.load(Relaxed),
        }
    }

    fn next_id(&self) -> u64 {
        let mut rng = self.rng.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        *rng ^= *rng >> 12;
        *rng ^= *rng << 25;
        *rng ^= *rng >> 27;
        rng.wrapping_mul(0x2545_F491_4F6C_DD1D).max(1)
    }

    /// Whether Redis may be tried now (the breaker is closed, or its pause is over).
    fn closed(&self, now: Mono) -> bool {
        now.micros() >= self.health.open_until.load(Relaxed)
    }

    fn succeeded(&self) {
        self.health.failures.store(0, Relaxed);
        self.health.open_until.store(0, Relaxed);
        if self.health.down.swap(false, Relaxed) {
            tracing::warn!("Redis is reachable again: counting on the shared counters");
        }
    }

    fn failed(&self, now: Mono, error: &dyn std::fmt::Display) {
        let failures = self.health.failures.fetch_add(1, Relaxed) + 1;
        if failures >= BREAKER_FAILURES {
            self.health.open_until.store(now.micros() + BREAKER_OPEN_MICROS, Relaxed);
            if !self.health.down.swap(true, Relaxed) {
                let mode = match self.settings.failure_mode {
                    FailureMode::Local => "deciding with this replica's own counters (--counter-failure-mode local)",
                    FailureMode::Deny => "denying keys with limits (--counter-failure-mode deny)",
                };
                tracing::error!(error = %error, "Redis is unreachable: {mode}");
            }
        }
    }

    /// Runs one script call with the timeout; feeds the breaker.
    async fn call<T: redis::FromRedisValue>(
        &self,
        invocation: redis::ScriptInvocation<'_>,
        now: Mono,
    ) -> Result<T, ()> {
        let call = async {
            let mut conn = self.redis.conn().await?;
            invocation.invoke_async::<T>(&mut conn).await
        };
        match tokio::time::timeout(self.settings.timeout, call).await {
            Ok(Ok(v)) => {
                self.succeeded();
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed(now, &e);
                Err(())
            }
            Err(_) => {
                self.failed(now, &"timed out");
                Err(())
            }
        }
    }

    /// Decides with this replica's own counters while Redis is unreachable.
    fn outage(&self, key: &ApiKey, ask: Hold, now: Now) -> Result<Outcome, Unavailable> {
        self.health.outage_decisions.fetch_add(1, Relaxed);
        match self.settings.failure_mode {
            FailureMode::Deny => Err(Unavailable("the shared counters (Redis) are unreachable")),
            FailureMode::Local => {
                let Some(limit) = key.limits.requests_per_minute else {
                    return self.local.admit_now(key, ask, None, now);
                };
                // This replica's share of the window (the limit over the replicas last seen
                // alive), less its share of what the shared window held when last seen:
                // those admissions are taken to leave only a minute after they were seen.
                let replicas = self.health.replicas.load(Relaxed).max(1);
                let (seeded, leaves_in) = self.seeded(key.id, replicas, now.mono);
                let share = (limit / replicas).saturating_sub(seeded);
                if share == 0 {
                    let reset_in_micros = if seeded > 0 { leaves_in } else { WINDOW_MICROS };
                    let admission = Admission { admitted: false, limit, remaining: 0, reset_in_micros };
                    return Ok(Outcome::RateLimited(admission));
                }
                // The headers show the key's limit, not the share.
                let as_key = |a: Admission| Admission { limit, ..a };
                let outcome = self.local.admit_now(key, ask, Some(share), now)?;
                Ok(match outcome {
                    Outcome::Admitted { rpm, reservation } => {
                        // Redis records it when it answers again.
                        if let Ok(mut keys) = self.unrecorded.lock() {
                            keys.insert(key.id);
                            self.backlog.store(true, Relaxed);
                        }
                        Outcome::Admitted { rpm: rpm.map(as_key), reservation }
                    }
                    Outcome::RateLimited(a) => Outcome::RateLimited(as_key(a)),
                    Outcome::Budget { denial, rpm } => Outcome::Budget { denial, rpm: rpm.map(as_key) },
                })
            }
        }
    }

    /// How many slots of `key_id`'s local window the shared window's last seen count
    /// takes (this replica's part of it: the count over the replicas, rounded up, so all
    /// of them together account for all of it), and in how many µs they free.
    fn seeded(&self, key_id: Uuid, replicas: u32, now: Mono) -> (u32, i64) {
        let seen = self.seen.of(key_id).lock().ok().and_then(|s| s.get(&key_id).copied());
        match seen {
            Some(Seen { count, at }) if now.micros_since(at) < WINDOW_MICROS => {
                (count.div_ceil(replicas), WINDOW_MICROS - now.micros_since(at))
            }
            _ => (0, 0),
        }
    }

    fn saw(&self, key_id: Uuid, count: u32, at: Mono) {
        if let Ok(mut seen) = self.seen.of(key_id).lock() {
            seen.insert(key_id, Seen { count, at });
        }
    }

    async fn admit_shared(&self, key: &ApiKey, ask: Hold, now: Now) -> Result<Outcome, ()> {
        let limits = &key.limits;
        let (start, end) = period::bounds(limits.reset_period, now.wall);
        let period_end_ms = end.map_or(0, |e| e.timestamp_millis());
        let keys = Keys::of(key.id, start);
        let id = self.next_id();
        let limit = |l: Option<u64>| l.map_or(-1, |l| l.min(MAX_EXACT) as i64);
        let ttl_ms = self.settings.reservation_ttl.as_millis().min(u128::from(u32::MAX)) as i64;
        let mut seed: Option<[i64; 5]> = None;
        // At most twice: the second time with what this replica's memory holds of the
        // period, when its counters are missing (a new period, or Redis lost them). The
        // Check never reads the database: the seeder raises them to the ledger afterwards.
        for _ in 0..2 {
            let mut inv = self.admit.prepare_invoke();
            inv.key(keys.rpm()).key(keys.budget()).key(keys.reservations());
            inv.arg(limits.requests_per_minute.unwrap_or(0))
                .arg(limit(limits.token_limit))
                .arg(limit(limits.cost_limit_micros.map(|m| m.max(0) as u64)))
                .arg(ask.tokens.min(MAX_EXACT))
                .arg(ask.micros.clamp(0, MAX_EXACT as i64))
                .arg(ttl_ms)
                .arg(SWEEP_PER_CHECK)
                .arg(keys.budget_prefix())
                .arg(id)
                .arg(start.timestamp_micros());
            match &seed {
                None => inv.arg("").arg("").arg("").arg("").arg(""),
                Some(s) => inv.arg(s[0]).arg(s[1]).arg(s[2]).arg(s[3]).arg(s[4]),
            };
            inv.arg(period_end_ms).arg(BUDGET_GRACE_MS);
            let reply: Vec<i64> = self.call(inv, now.mono).await?;
            match reply.first() {
                Some(-1) if seed.is_none() => {
                    seed = Some(self.remembered(key, start, now));
                    self.ask_ledger(SeedRequest {
                        key_id: key.id,
                        reset_period: limits.reset_period,
                        period_start: start,
                        period_end_ms,
                        asked: now.mono,
                        asked_at: std::time::Instant::now(),
                    });
                }
                Some(-1) | None => return Err(()),
                Some(&code) => return Ok(self.outcome(key, code, &reply, ask, id, start, now)),
            }
        }
        Err(())
    }

    /// What this replica's memory holds of `key`'s period starting `start`, as the admit
    /// script's seed (requests, prompt, completion and all tokens, micro-USD): its mirror of
    /// the ledger (raised by reconciliation and by what Redis showed at its Checks) with
    /// the usage it metered and has not written yet. Nothing for another period.
    fn remembered(&self, key: &ApiKey, start: DateTime<Utc>, now: Now) -> [i64; 5] {
        let known = self.local.usage_now(key, now).unwrap_or_default();
        if known.period_start != Some(start) {
            return [0; 5];
        }
        exact_counts(known.requests, known.prompt_tokens, known.completion_tokens, known.cost_micros)
    }

    /// Asks the seeder, without waiting, to raise a period's counters to the ledger: one
    /// read per key and period in flight, whichever Checks ask; beyond [`SEED_QUEUE`] the
    /// request is dropped (counted). The Check goes on at once.
    fn ask_ledger(&self, request: SeedRequest) {
        let slot = (request.key_id, request.period_start.timestamp_micros());
        let Ok(mut seeds) = self.seeds.lock() else { return };
        match seeds.get(&slot) {
            Some(Seeding::Pending) => {}
            // Asked again at the next tick.
            Some(Seeding::Failed(_)) => {}
            None if seeds.len() >= SEED_QUEUE => {
                self.seeds_dropped.fetch_add(1, Relaxed);
            }
            None => {
                if self.seed_tx.try_send(request).is_ok() {
                    seeds.insert(slot, Seeding::Pending);
                } else {
                    self.seeds_dropped.fetch_add(1, Relaxed);
                }
            }
        }
    }

    /// Sends the seeder the periods whose read or raise failed (the tick, once a second).
    fn retry_seeds(&self, now: Mono) {
        let Ok(mut seeds) = self.seeds.lock() else { return };
        for state in seeds.values_mut() {
            if let Seeding::Failed(request) = *state {
                let request = SeedRequest { asked: now, asked_at: std::time::Instant::now(), ..request };
                match self.seed_tx.try_send(request) {
                    Ok(()) => *state = Seeding::Pending,
                    Err(_) => return,
                }
            }
        }
    }

    /// Raises the period `request` names to `ledger` (its totals in the ledger, every
    /// replica's flushed increments) plus what this replica metered and has not written
    /// yet (read after the ledger, so an increment flushed meanwhile counts at most once):
    /// set if absent, raised where behind if present, never added to. A failed read or
    /// raise is asked again at the next tick.
    pub async fn seed(&self, request: SeedRequest, ledger: Result<Option<crate::domain::budget::Counters>, String>) {
        let slot = (request.key_id, request.period_start.timestamp_micros());
        let raised = match ledger {
            Ok(_) if !self.closed(request.now()) => false,
            Ok(row) => {
                let mut total = row.unwrap_or_else(|| {
                    crate::domain::budget::Counters::empty(request.key_id, request.reset_period, request.period_start)
                });
                if let Some(mine) = self.local.meters.pending(request.key_id, request.period_start) {
                    total.add(&mine);
                }
                let keys = Keys::of(request.key_id, request.period_start);
                let mut inv = self.seed.prepare_invoke();
                inv.key(keys.budget())
                    .arg(&exact_counts_of(&total)[..])
                    .arg(request.period_end_ms)
                    .arg(BUDGET_GRACE_MS);
                self.call::<i64>(inv, request.now()).await.is_ok()
            }
            Err(e) => {
                tracing::debug!(error = %e, key = %request.key_id, "could not read the ledger to raise the key's counters; retried at the next tick");
                false
            }
        };
        if let Ok(mut seeds) = self.seeds.lock() {
            if raised {
                seeds.remove(&slot);
            } else {
                seeds.insert(slot, Seeding::Failed(request));
            }
        }
    }

    /// Reads the admit script's answer.
    #[allow(clippy::too_many_arguments)]
    fn outcome(
        &self,
        key: &ApiKey,
        code: i64,
        r: &[i64],
        ask: Hold,
        id: u64,
        start: DateTime<Utc>,
        now: Now,
    ) -> Outcome {
        let at = |i: usize| r.get(i).copied().unwrap_or(0);
        let rpm = key.limits.requests_per_minute.map(|limit| {
            let used = at(2).max(0) as u64;
            Admission {
                admitted: code == 0,
                limit,
                remaining: u64::from(limit).saturating_sub(used) as u32,
                reset_in_micros: at(3).max(0).saturating_mul(1000),
            }
        });
        let (_, reset_at) = period::bounds(key.limits.reset_period, now.wall);
        // What this replica knows of the key's usage, for the failure mode: what Redis
        // showed, whether it admitted or refused (a budget refused here stays refused
        // here if Redis goes away).
        if key.limits.token_limit.is_some() || key.limits.cost_limit_micros.is_some() {
            self.local.meters.observe_shared(
                key.id,
                key.limits.reset_period,
                start,
                at(6).max(0) as u64,
                at(7).max(0),
                now.wall,
            );
        }
        match code {
            0 => {
                let reservation =
                    (key.limits.token_limit.is_some() || key.limits.cost_limit_micros.is_some()).then(|| {
                        let tokens = at(4).max(0) as u64;
                        Ticket {
                            id,
                            hold: Hold { tokens, micros: at(5).max(0), prompt_tokens: ask.prompt_tokens.min(tokens) },
                            period_start: start,
                        }
                    });
                if key.limits.requests_per_minute.is_some() {
                    self.saw(key.id, at(2).clamp(0, i64::from(u32::MAX)) as u32, now.mono);
                }
                Outcome::Admitted { rpm, reservation }
            }
            1 => {
                self.saw(key.id, at(2).clamp(0, i64::from(u32::MAX)) as u32, now.mono);
                Outcome::RateLimited(rpm.unwrap_or(Admission {
                    admitted: false,
                    limit: 0,
                    remaining: 0,
                    reset_in_micros: at(3).max(0) * 1000,
                }))
            }
            2 => Outcome::Budget {
                denial: BudgetDenial::Tokens {
                    limit: key.limits.token_limit.unwrap_or(0),
                    reset_at,
                    in_flight: at(1) == 1,
                },
                rpm,
            },
            _ => Outcome::Budget {
                denial: BudgetDenial::Cost {
                    limit_micros: key.limits.cost_limit_micros.unwrap_or(0),
                    reset_at,
                    in_flight: at(1) == 1,
                },
                rpm,
            },
        }
    }

    /// Settles in Redis; `Ok(false)` when the ticket was settled before (by any replica).
    /// Without `m`, only gives the reservation back (and remembers the ticket as settled):
    /// the replay of a settle Redis missed, whose usage the ledger has.
    async fn settle_shared(&self, key_id: Uuid, ticket: &Ticket, m: Option<&Metered>, now: Mono) -> Result<bool, ()> {
        let release_only = m.is_none();
        let m = m.copied().unwrap_or_default();
        let keys = Keys::of(key_id, ticket.period_start);
        let tokens = m.prompt_tokens.saturating_add(m.completion_tokens).min(MAX_EXACT);
        let tombstone_ms = (self.settings.reservation_ttl.as_millis() as i64).max(600_000) * 2;
        let mut inv = self.settle.prepare_invoke();
        inv.key(keys.budget()).key(keys.reservations()).key(keys.done());
        inv.arg(ticket.id)
            .arg(m.prompt_tokens.min(MAX_EXACT))
            .arg(m.completion_tokens.min(MAX_EXACT))
            .arg(tokens)
            .arg(m.cost_micros.clamp(0, MAX_EXACT as i64))
            .arg(u8::from(release_only))
            .arg(Keys::member(ticket))
            .arg(tombstone_ms)
            .arg(ticket.hold.tokens.min(MAX_EXACT))
            .arg(ticket.hold.micros.clamp(0, MAX_EXACT as i64));
        self.call::<i64>(inv, now).await.map(|settled| settled != 0)
    }

    /// Once a second: announces this replica (the others count it for their share of each
    /// window in the failure mode) and probes Redis while it is down. Once Redis answers,
    /// asks the seeder again for the periods whose ledger read or raise failed, records what
    /// this replica admitted alone meanwhile and replays the settles it missed.
    pub async fn tick(&self, now: Mono) {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key("pc:replicas").arg(&self.replica_id).arg(REPLICA_ALIVE_MS);
        if let Ok(n) = self.call::<u32>(inv, now).await {
            self.health.replicas.store(n.max(1), Relaxed);
            self.retry_seeds(now);
            if self.record_backlog(now).await {
                self.replay_settles(now).await;
            }
        }
    }

    /// Records into Redis's windows the admissions this replica decided alone while Redis
    /// was away (until then it keeps deciding alone); true once none is left.
    async fn record_backlog(&self, now: Mono) -> bool {
        if !self.backlog.load(Relaxed) {
            return true;
        }
        let keys: Vec<Uuid> = match self.unrecorded.lock() {
            Ok(mut keys) => keys.drain().collect(),
            Err(_) => return false,
        };
        for (i, &key_id) in keys.iter().enumerate() {
            let times = self.local.windows.take(key_id);
            let ages: Vec<i64> = times
                .iter()
                .map(|&t| (now.micros() - t).max(0) / 1000)
                .filter(|&age| age < WINDOW_MICROS / 1000)
                .collect();
            if ages.is_empty() {
                continue;
            }
            let mut inv = self.record.prepare_invoke();
            inv.key(Keys::of(key_id, DateTime::UNIX_EPOCH).rpm());
            for age in &ages {
                inv.arg(age);
            }
            match self.call::<i64>(inv, now).await {
                Ok(count) => self.saw(key_id, count.clamp(0, i64::from(u32::MAX)) as u32, now),
                Err(()) => {
                    self.local.windows.restore(key_id, times);
                    if let Ok(mut left) = self.unrecorded.lock() {
                        left.extend(&keys[i..]);
                    }
                    return false;
                }
            }
        }
        match self.unrecorded.lock() {
            Ok(left) if left.is_empty() => {
                self.backlog.store(false, Relaxed);
                true
            }
            _ => false,
        }
    }

    /// Replays settles Redis missed (a bounded number per call): each gives its
    /// reservation back, once, and adds no usage (the ledger has it; reconciliation raises
    /// Redis to it), so nothing counts twice.
    async fn replay_settles(&self, now: Mono) {
        for _ in 0..REPLAY_PER_TICK {
            let Some((key_id, ticket)) = self.missed.pop() else { return };
            if self.settle_shared(key_id, &ticket, None, now).await.is_err() {
                self.missed.unpop(key_id, ticket);
                return;
            }
        }
    }

    /// Runs the seeder: each period whose counters Redis lacked (seeded from memory by a
    /// Check) is read from the ledger with `read`, off the request path, and its counters
    /// raised to it. Ends with the counters.
    pub fn spawn_seeder(
        counters: &Arc<SharedCounters>,
        read: impl Fn(Uuid, DateTime<Utc>) -> LedgerRead + Send + 'static,
    ) {
        let Some(mut requests) = counters.seed_rx.lock().ok().and_then(|mut rx| rx.take()) else { return };
        let counters = Arc::downgrade(counters);
        tokio::spawn(async move {
            while let Some(request) = requests.recv().await {
                let row = read(request.key_id, request.period_start).await;
                let Some(counters) = counters.upgrade() else { break };
                counters.seed(request, row).await;
            }
        });
    }

    /// Reconciles with the ledger: `rows` are ledger totals (every replica's increments)
    /// per key and period. What this replica knows of each key rises to them (its seeds
    /// and its failure mode start from there), and each budgeted key's counters in Redis
    /// rise to them where they are behind (a settle Redis missed while unreachable, usage
    /// decided in the failure mode): raised, never added, so nothing counts twice. The
    /// drift found is kept for the metrics.
    pub async fn reconcile(&self, rows: &[crate::domain::budget::Counters], budgeted: impl Fn(Uuid) -> bool, now: Now) {
        let (mut tokens, mut micros) = (0u64, 0u64);
        let mut reached = true;
        for row in rows {
            self.local.meters.observe_ledger(row, now.wall);
            if !budgeted(row.key_id) {
                continue;
            }
            if !self.closed(now.mono) {
                reached = false;
                continue;
            }
            let keys = Keys::of(row.key_id, row.period_start);
            let mut inv = self.raise.prepare_invoke();
            inv.key(keys.budget()).arg(&exact_counts_of(row)[..]);
            match self.call::<Vec<i64>>(inv, now.mono).await {
                Ok(d) => {
                    tokens = tokens.saturating_add(d.first().copied().unwrap_or(0).max(0) as u64);
                    micros = micros.saturating_add(d.get(1).copied().unwrap_or(0).max(0) as u64);
                }
                Err(()) => reached = false,
            }
        }
        if reached {
            self.health.drift_tokens.store(tokens, Relaxed);
            self.health.drift_micros.store(micros, Relaxed);
            if tokens > 0 || micros > 0 {
                tracing::warn!(tokens, micros, "Redis counters were behind the usage ledger: raised to it");
            }
        }
    }

    /// Forgets this replica at shutdown, so the others' shares grow at once.
    pub async fn leave(&self) {
        let forget = redis::cmd("ZREM").arg("pc:replicas").arg(&self.replica_id).to_owned();
        let call = async {
            let mut conn = self.redis.conn().await?;
            forget.query_async::<i64>(&mut conn).await
        };
        let _ = tokio::time::timeout(self.settings.timeout, call).await;
    }
}

impl Counters for SharedCounters {
    fn admit<'a>(&'a self, key: &'a ApiKey, ask: Hold, now: Now) -> CountFuture<'a, Result<Outcome, Unavailable>> {
        CountFuture::later(async move {
            // Admissions decided here while Redis was away are recorded there first.
            if self.closed(now.mono)
                && !self.backlog.load(Relaxed)
                && let Ok(outcome) = self.admit_shared(key, ask, now).await
            {
                return Ok(outcome);
            }
            self.outage(key, ask, now)
        })
    }

    fn attach<'a>(&'a self, key_id: Uuid, ticket: Ticket, now: Now) -> CountFuture<'a, ()> {
        // A reservation made here while Redis was down.
        self.local.meters.attach(key_id, ticket.id, now.mono);
        CountFuture::later(async move {
            if !self.closed(now.mono) {
                return;
            }
            let keys = Keys::of(key_id, ticket.period_start);
            // An open stream keeps its reservation for another TTL; a replica that dies
            // mid-stream stops extending it, and it expires.
            let ttl_ms = self.settings.reservation_ttl.as_millis().min(u128::from(u32::MAX)) as i64;
            let mut inv = self.attach.prepare_invoke();
            inv.key(keys.reservations()).arg(Keys::member(&ticket)).arg(ttl_ms);
            let _ = self.call::<i64>(inv, now.mono).await;
        })
    }

    fn settle<'a>(
        &'a self,
        key_id: Uuid,
        reset_period: Option<ResetPeriod>,
        ticket: Option<Ticket>,
        charge: Charge<'a>,
        now: Now,
    ) -> CountFuture<'a, Option<Metered>> {
        // What the reservation held: a reservation made here while Redis was down, or the
        // ticket's word.
        let held = ticket.map(|t| self.local.meters.held(key_id, t.id).unwrap_or(t.hold));
        let metered = charge(held);
        CountFuture::later(async move {
            // Redis says whether any replica settled this ticket before; unreachable, the
            // settle is queued and its reservation given back there once Redis answers,
            // and reconciliation brings the usage in from the ledger.
            if let Some(ticket) = ticket {
                let settled = if self.closed(now.mono) {
                    self.settle_shared(key_id, &ticket, Some(&metered), now.mono).await
                } else {
                    Err(())
                };
                match settled {
                    Ok(false) => return None,
                    Ok(true) => {}
                    Err(()) => self.missed.push(key_id, ticket),
                }
            }
            // This replica's ledger and what it knows of the key, once per ticket (releasing
            // a reservation made here).
            self.local.meters.record(key_id, reset_period, ticket, |_| metered, now.wall)
        })
    }

    fn usage<'a>(&'a self, key: &'a ApiKey, now: Now) -> CountFuture<'a, Result<Usage, Unavailable>> {
        CountFuture::later(async move {
            let known = self.local.usage_now(key, now)?;
            if !self.closed(now.mono) {
                return Ok(known);
            }
            let (start, _) = period::bounds(key.limits.reset_period, now.wall);
            let keys = Keys::of(key.id, start);
            let mut inv = self.usage.prepare_invoke();
            inv.key(keys.rpm()).key(keys.budget());
            let Ok(r) = self.call::<Vec<i64>>(inv, now.mono).await else { return Ok(known) };
            let at = |i: usize| r.get(i).copied().unwrap_or(0).max(0);
            let mut u = known;
            if key.limits.requests_per_minute.is_some() {
                u.requests_last_minute = at(0).min(i64::from(u32::MAX)) as u32;
            }
            if r.len() > 1 {
                u.period_start = Some(start);
                u.requests = at(1) as u64;
                u.prompt_tokens = at(2) as u64;
                u.completion_tokens = at(3) as u64;
                u.cost_micros = at(4);
                u.reserved_tokens = at(5) as u64;
                u.reserved_micros = at(6);
            }
            Ok(u)
        })
    }

    fn sweep(&self, now: Mono, ttl: chrono::Duration) -> usize {
        // Redis sweeps its reservations at each Check; these are the failure mode's.
        for shard in self.seen.all() {
            if let Ok(mut seen) = shard.lock() {
                seen.retain(|_, s| now.micros_since(s.at) < WINDOW_MICROS);
            }
        }
        self.local.sweep(now, ttl)
    }
}

/// The Redis keys of one API key (and one budget period), under its hash tag; each built
/// only when a call uses it.
struct Keys {
    /// `pc:{<key id>}:`.
    tag: String,
    period_start_micros: i64,
}

impl Keys {
    fn of(key_id: Uuid, period_start: DateTime<Utc>) -> Keys {
        Keys { tag: format!("pc:{{{key_id}}}:"), period_start_micros: period_start.timestamp_micros() }
    }

    /// Admission times of the requests-per-minute window, newest first.
    fn rpm(&self) -> String {
        format!("{}rpm", self.tag)
    }

    /// Every period's usage hash starts with this.
    fn budget_prefix(&self) -> String {
        format!("{}b:", self.tag)
    }

    /// The period's usage and reservations.
    fn budget(&self) -> String {
        format!("{}b:{}", self.tag, self.period_start_micros)
    }

    /// Reservations in flight: `id:tokens:micros:period start` scored by deadline (ms).
    fn reservations(&self) -> String {
        format!("{}rz", self.tag)
    }

    /// Settled reservation ids, kept a while.
    fn done(&self) -> String {
        format!("{}done", self.tag)
    }

    /// A reservation's member in the reservations set, as the admit script wrote it: the
    /// ticket says everything in it.
    fn member(ticket: &Ticket) -> String {
        format!(
            "{}:{}:{}:{}",
            ticket.id,
            ticket.hold.tokens,
            ticket.hold.micros,
            ticket.period_start.timestamp_micros()
        )
    }
}

/// A Redis URL with any password replaced, fit for logs and errors.
pub fn redact(url: &str) -> String {
    crate::store::redact_url(url)
}

/// Whether Redis answers a PING (within 2 s): `start` logs its state once.
pub async fn ping(counters: &Arc<SharedCounters>) -> RedisResult<()> {
    let ping = async {
        let mut conn = counters.redis.conn().await?;
        redis::cmd("PING").query_async::<String>(&mut conn).await
    };
    match tokio::time::timeout(Duration::from_secs(2), ping).await {
        Ok(r) => r.map(drop),
        Err(_) => Err(redis::RedisError::from((redis::ErrorKind::Io, "timed out"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missed_settles_are_bounded_dropping_the_oldest() {
        let missed = MissedSettles::default();
        let ticket = |id| Ticket { id, hold: Hold::default(), period_start: DateTime::UNIX_EPOCH };
        let key = Uuid::now_v7();
        for id in 0..=MAX_MISSED_SETTLES as u64 {
            missed.push(key, ticket(id));
        }
        assert_eq!((missed.len(), missed.dropped()), (MAX_MISSED_SETTLES, 1));
        assert_eq!(missed.pop().map(|(_, t)| t.id), Some(1), "the oldest went first");
        missed.unpop(key, ticket(1));
        assert_eq!(missed.pop().map(|(_, t)| t.id), Some(1), "a failed replay goes back in front");
    }
}
