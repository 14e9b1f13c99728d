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
//!   `req`, `pt`, `ct`, `t` tokens, `m` micro-USD, `rt`/`rm` reserved), seeded from the
//!   ledger when missing, expiring after the period;
//! - `pc:{k}:rz`: reservations in flight, `id:tokens:micros:period`, scored by deadline (ms);
//! - `pc:{k}:done`: settled ids → when, kept a while so a retried settle charges nothing.

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
/// Lua numbers are doubles: every integer sent to a script stays below 2^53 (a limit
/// above it is as good as none).
const MAX_EXACT: u64 = 1 << 53;

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
local stale = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', now, 'LIMIT', 0, tonumber(ARGV[8]))
for _, r in ipairs(stale) do
  local tok, mic, per = string.match(r, '^%d+:(%d+):(%d+):(%-?%d+)$')
  local bk = ARGV[9] .. (per or '')
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
    -- Missing (a new period, or Redis lost it): seeded from the ledger, if absent.
    if ARGV[10] == '' then return {-1} end
    redis.call('HSET', KEYS[2], 'req', ARGV[10], 'pt', ARGV[11], 'ct', ARGV[12], 't', ARGV[13], 'm', ARGV[14], 'rt', '0', 'rm', '0')
    -- Kept until the period's end (by the replica's calendar, never before Redis's now)
    -- and a grace after it; a budget that never resets is kept.
    if tonumber(ARGV[7]) > 0 then
      redis.call('PEXPIREAT', KEYS[2], int(math.max(tonumber(ARGV[7]), now) + tonumber(ARGV[17])))
    end
    h = {ARGV[13], ARGV[14], '0', '0'}
  end
  used_t, used_m, rt, rm = num(h[1]), num(h[2]), num(h[3]), num(h[4])
  if token_limit >= 0 and used_t + rt >= token_limit then
    return {2, used_t < token_limit and 1 or 0, in_window, reset_in()}
  end
  if cost_limit >= 0 and used_m + rm >= cost_limit then
    return {3, used_m < cost_limit and 1 or 0, in_window, reset_in()}
  end
end
if rpm_limit > 0 then
  if in_window >= rpm_limit then return {1, 0, in_window, reset_in()} end
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
  redis.call('ZADD', KEYS[3], int(now + tonumber(ARGV[6])), ARGV[15] .. ':' .. int(tok) .. ':' .. int(mic) .. ':' .. ARGV[16])
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
  redis.call('HSET', KEYS[1], 'req', int(num(h[1]) + 1), 'pt', int(num(h[2]) + tonumber(ARGV[2])),
    'ct', int(num(h[3]) + tonumber(ARGV[3])), 't', int(num(h[4]) + tonumber(ARGV[4])),
    'm', int(num(h[5]) + tonumber(ARGV[5])), 'rt', int(rt), 'rm', int(rm))
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

/// Raises a period's counters to the ledger's totals where they are behind (never lowers
/// them: Redis is ahead by what was not flushed yet); returns how far behind tokens and
/// micro-USD were. Counters that are missing stay missing: the next Check seeds them.
const RAISE: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0} end
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
return drift
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
    admit: Script,
    settle: Script,
    attach: Script,
    usage: Script,
    heartbeat: Script,
    raise: Script,
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
}

impl SharedCounters {
    /// Connects lazily (a replica starts while Redis is down, in the failure mode).
    pub fn new(settings: Settings, local: InProcess) -> Result<Self, String> {
        let redis = Redis::open(&settings.url, settings.timeout)?;
        let mut seed = [0u8; 8];
        let _ = getrandom::fill(&mut seed);
        Ok(SharedCounters {
            redis,
            settings,
            local,
            health: Health { replicas: AtomicU32::new(1), ..Default::default() },
            replica_id: Uuid::now_v7().to_string(),
            rng: Mutex::new(u64::from_le_bytes(seed) | 1),
            admit: Script::new(ADMIT),
            settle: Script::new(SETTLE),
            attach: Script::new(ATTACH),
            usage: Script::new(USAGE),
            heartbeat: Script::new(HEARTBEAT),
            raise: Script::new(RAISE),
        })
    }

    pub fn status(&self) -> CounterStatus {
        CounterStatus {
            up: !self.health.down.load(Relaxed),
            outage_decisions: self.health.outage_decisions.load(Relaxed),
            replicas: self.health.replicas.load(Relaxed),
            drift_tokens: self.health.drift_tokens.load(Relaxed),
            drift_micros: self.health.drift_micros.load(Relaxed),
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
                // This replica's share: all replicas together never admit more than N.
                let replicas = self.health.replicas.load(Relaxed).max(1);
                let share = key.limits.requests_per_minute.map(|n| n / replicas);
                if share == Some(0) {
                    let limit = key.limits.requests_per_minute.unwrap_or(0);
                    let admission = Admission { admitted: false, limit, remaining: 0, reset_in_micros: WINDOW_MICROS };
                    return Ok(Outcome::RateLimited(admission));
                }
                self.local.admit_now(key, ask, share, now)
            }
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
        let mut seed: Option<[String; 5]> = None;
        // At most twice: the second time with the ledger's usage, when the period's counters
        // are missing (a new period, or Redis lost them).
        for _ in 0..2 {
            let mut inv = self.admit.prepare_invoke();
            inv.key(keys.rpm()).key(keys.budget()).key(keys.reservations());
            inv.arg(limits.requests_per_minute.unwrap_or(0))
                .arg(limit(limits.token_limit))
                .arg(limit(limits.cost_limit_micros.map(|m| m.max(0) as u64)))
                .arg(ask.tokens.min(MAX_EXACT))
                .arg(ask.micros.clamp(0, MAX_EXACT as i64))
                .arg(ttl_ms)
                .arg(period_end_ms)
                .arg(SWEEP_PER_CHECK)
                .arg(keys.budget_prefix());
            match &seed {
                None => inv.arg("").arg("").arg("").arg("").arg(""),
                Some(s) => inv.arg(&s[0]).arg(&s[1]).arg(&s[2]).arg(&s[3]).arg(&s[4]),
            };
            inv.arg(id).arg(start.timestamp_micros()).arg(BUDGET_GRACE_MS);
            let reply: Vec<i64> = self.call(inv, now.mono).await?;
            match reply.first() {
                Some(-1) => {
                    let known = self.local.usage_now(key, now).unwrap_or_default();
                    let same = known.period_start == Some(start);
                    let v = |n: u64| if same { n.min(MAX_EXACT).to_string() } else { "0".into() };
                    let total = known.prompt_tokens.saturating_add(known.completion_tokens);
                    let micros =
                        if same { known.cost_micros.clamp(0, MAX_EXACT as i64).to_string() } else { "0".into() };
                    seed =
                        Some([v(known.requests), v(known.prompt_tokens), v(known.completion_tokens), v(total), micros]);
                }
                Some(&code) => return Ok(self.outcome(key, code, &reply, ask, id, start, now)),
                None => return Err(()),
            }
        }
        Err(())
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
                // What this replica knows of the key's usage, for the failure mode.
                self.local.meters.observe_shared(
                    key.id,
                    key.limits.reset_period,
                    start,
                    at(6).max(0) as u64,
                    at(7).max(0),
                    now.wall,
                );
                Outcome::Admitted { rpm, reservation }
            }
            1 => Outcome::RateLimited(rpm.unwrap_or(Admission {
                admitted: false,
                limit: 0,
                remaining: 0,
                reset_in_micros: at(3).max(0) * 1000,
            })),
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
    async fn settle_shared(&self, key_id: Uuid, ticket: &Ticket, m: &Metered, now: Mono) -> Result<bool, ()> {
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
            .arg(0)
            .arg(Keys::member(ticket))
            .arg(tombstone_ms)
            .arg(ticket.hold.tokens.min(MAX_EXACT))
            .arg(ticket.hold.micros.clamp(0, MAX_EXACT as i64));
        self.call::<i64>(inv, now).await.map(|settled| settled != 0)
    }

    /// Once a second: announces this replica (the others count it for their share of each
    /// window in the failure mode) and probes Redis while it is down.
    pub async fn tick(&self, now: Mono) {
        let mut inv = self.heartbeat.prepare_invoke();
        inv.key("pc:replicas").arg(&self.replica_id).arg(REPLICA_ALIVE_MS);
        if let Ok(n) = self.call::<u32>(inv, now).await {
            self.health.replicas.store(n.max(1), Relaxed);
        }
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
            inv.key(keys.budget())
                .arg(row.requests.min(MAX_EXACT))
                .arg(row.prompt_tokens.min(MAX_EXACT))
                .arg(row.completion_tokens.min(MAX_EXACT))
                .arg(row.total_tokens().min(MAX_EXACT))
                .arg(row.cost_micros.clamp(0, MAX_EXACT as i64));
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
            if self.closed(now.mono)
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
            // reservation expires there and reconciliation brings the usage in from the
            // ledger.
            if let Some(ticket) = ticket
                && self.closed(now.mono)
                && self.settle_shared(key_id, &ticket, &metered, now.mono).await == Ok(false)
            {
                return None;
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
