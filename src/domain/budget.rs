//! Per-key usage counters for the current period, budget decisions and reservations
//! for in-flight requests. In memory; a flusher persists what changed.

use std::collections::{HashMap, VecDeque};

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::clock::{Mono, Now};
use super::key::{ApiKey, Limits, ResetPeriod};
use super::period;
use super::shards::{SHARDS, Sharded};

/// Tokens a request of a key with a token or USD limit reserves when it names no
/// `max_tokens` and its gateway's `default_reservation_tokens` is 0 (capped, like every
/// reservation, at what the key can still use this period).
pub const DEFAULT_RESERVATION_TOKENS: u64 = 4096;

/// A request's output cap above this reserves this much: no model writes more in one
/// response, and an absurd `max_tokens` must not show up as usage when a response that
/// reports none is charged its reservation.
pub const MAX_RESERVATION_TOKENS: u64 = 1 << 20;

/// At most this many expired reservations are remembered (oldest forgotten first), so a
/// stream that opens after its reservation expired is still charged at least its
/// reservation. About 64 bytes each. The bound is shared out evenly over the shards.
pub const MAX_EXPIRED_RESERVATIONS: usize = 65_536;

/// At most this many settled reservation ids are remembered (oldest forgotten first), so
/// settling one again charges nothing. The bound is shared out evenly over the shards.
pub const MAX_SETTLED_RESERVATIONS: usize = 65_536;

/// What one shard remembers.
const EXPIRED_PER_SHARD: usize = MAX_EXPIRED_RESERVATIONS / SHARDS;
const SETTLED_PER_SHARD: usize = MAX_SETTLED_RESERVATIONS / SHARDS;

/// One key's usage in its current period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counters {
    pub key_id: Uuid,
    pub reset_period: ResetPeriod,
    pub period_start: DateTime<Utc>,
    /// The next reset (cached: most calls only compare against it).
    pub period_end: Option<DateTime<Utc>>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: i64,
    pub reserved_tokens: u64,
    pub reserved_micros: i64,
    pub last_used_at: Option<DateTime<Utc>>,
    pub last_denied_at: Option<DateTime<Utc>>,
    pub last_deny_reason: Option<String>,
    /// Admitted requests per second over the last minute (a ring indexed by second of
    /// the monotonic clock).
    recent: [u32; 60],
    recent_second: i64,
}

impl Counters {
    fn new(key_id: Uuid, reset_period: ResetPeriod, now: DateTime<Utc>) -> Self {
        Self::empty(key_id, reset_period, period::bounds(reset_period, now).0)
    }

    /// No usage yet in the period starting at `period_start`.
    pub fn empty(key_id: Uuid, reset_period: ResetPeriod, period_start: DateTime<Utc>) -> Self {
        Counters {
            key_id,
            reset_period,
            period_start,
            period_end: period::bounds(reset_period, period_start).1,
            requests: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
            cost_micros: 0,
            reserved_tokens: 0,
            reserved_micros: 0,
            last_used_at: None,
            last_denied_at: None,
            last_deny_reason: None,
            recent: [0; 60],
            recent_second: 0,
        }
    }

    /// Counts one response's usage.
    fn count(&mut self, m: &Metered) {
        self.requests = self.requests.saturating_add(1);
        self.prompt_tokens = self.prompt_tokens.saturating_add(m.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(m.completion_tokens);
        self.cost_micros = self.cost_micros.saturating_add(m.cost_micros.max(0));
    }

    /// Adds another's usage counts (increments of the same key and period).
    pub fn add(&mut self, other: &Counters) {
        self.requests = self.requests.saturating_add(other.requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(other.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(other.completion_tokens);
        self.cost_micros = self.cost_micros.saturating_add(other.cost_micros.max(0));
    }

    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens.saturating_add(self.completion_tokens)
    }

    /// Moves to the period `now` is in. A new period resets usage (not reservations);
    /// a changed reset period re-keys the current usage without resetting it.
    fn roll(&mut self, reset_period: ResetPeriod, now: DateTime<Utc>) -> bool {
        if reset_period == self.reset_period && self.period_end.is_none_or(|end| now < end) {
            return false;
        }
        // First close the period that ran out under the old rule, so a rule change never
        // brings an ended period's usage into the new one.
        if self.period_end.is_some_and(|end| now >= end) {
            self.requests = 0;
            self.prompt_tokens = 0;
            self.completion_tokens = 0;
            self.cost_micros = 0;
        }
        let (start, end) = period::bounds(reset_period, now);
        self.reset_period = reset_period;
        self.period_start = start;
        self.period_end = end;
        true
    }

    /// Counts one admitted request in the approximate per-second ring of the last minute.
    fn count_recent(&mut self, now: Mono) {
        let sec = now.micros().div_euclid(1_000_000);
        let elapsed = sec.saturating_sub(self.recent_second);
        if elapsed > 0 {
            for i in 1..=elapsed.min(60) {
                self.recent[((self.recent_second + i).rem_euclid(60)) as usize] = 0;
            }
            self.recent_second = sec;
        }
        if elapsed > -60 {
            let slot = &mut self.recent[sec.rem_euclid(60) as usize];
            *slot = slot.saturating_add(1);
        }
    }

    /// Requests admitted in the last 60 seconds (to the second).
    pub fn requests_last_minute(&self, now: Mono) -> u32 {
        let elapsed = now.micros().div_euclid(1_000_000).saturating_sub(self.recent_second);
        if elapsed >= 60 {
            return 0;
        }
        // Slots older than a minute at `now` were not cleared yet: skip them.
        (0..60i64)
            .filter(|back| *back + elapsed.max(0) < 60)
            .map(|back| self.recent[(self.recent_second - back).rem_euclid(60) as usize])
            .fold(0u32, u32::saturating_add)
    }
}

/// Why a budget refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetDenial {
    /// `in_flight`: usage alone is under the limit; reservations of requests in flight
    /// hold the rest, which frees as they finish (not at the reset).
    Tokens {
        limit: u64,
        reset_at: Option<DateTime<Utc>>,
        in_flight: bool,
    },
    Cost {
        limit_micros: i64,
        reset_at: Option<DateTime<Utc>>,
        in_flight: bool,
    },
}

impl BudgetDenial {
    pub fn reason(&self) -> &'static str {
        match self {
            BudgetDenial::Tokens { .. } => "token_limit_exceeded",
            BudgetDenial::Cost { .. } => "budget_exceeded",
        }
    }
}

/// What a request holds against its key's budgets while it is in flight: tokens (its
/// prompt estimate and the output it may be given) and micro-USD, each capped at what
/// the key could still use when it was admitted, and the part of those tokens that is its
/// prompt estimate (the least a response that reports no usage is charged for its prompt).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Hold {
    pub tokens: u64,
    pub micros: i64,
    pub prompt_tokens: u64,
}

/// A reservation as it travels from the Check that made it to the metering of its
/// response (in Envoy's dynamic metadata), possibly on another replica: its id, what it
/// holds and the period it was admitted in, so whoever settles it needs to ask nobody.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ticket {
    pub id: u64,
    pub hold: Hold,
    /// Start of the budget period the request was admitted in.
    pub period_start: DateTime<Utc>,
}

/// `id.tokens.micros.prompt.period_start_micros`, all decimal.
impl std::fmt::Display for Ticket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let Ticket { id, hold, period_start } = self;
        let micros = period_start.timestamp_micros();
        write!(f, "{id}.{}.{}.{}.{micros}", hold.tokens, hold.micros, hold.prompt_tokens)
    }
}

impl Ticket {
    /// Reads what [`Display`](std::fmt::Display) wrote; `None` for anything else.
    pub fn decode(s: &str) -> Option<Ticket> {
        let mut parts = s.split('.');
        let id = parts.next()?.parse().ok()?;
        let tokens = parts.next()?.parse().ok()?;
        let micros = parts.next()?.parse().ok()?;
        let prompt_tokens = parts.next()?.parse().ok()?;
        let period_start = DateTime::from_timestamp_micros(parts.next()?.parse().ok()?)?;
        if parts.next().is_some() {
            return None;
        }
        Some(Ticket { id, hold: Hold { tokens, micros, prompt_tokens }, period_start })
    }
}

#[derive(Debug, Clone, Copy)]
struct Reservation {
    key_id: Uuid,
    hold: Hold,
    /// When it was made (or last revived), on the monotonic clock.
    created: Mono,
    /// Its response's metering stream is open: it is settled when the stream ends, never
    /// expired before.
    attached: bool,
}

#[derive(Debug, Default)]
struct Inner {
    keys: HashMap<Uuid, Counters>,
    reservations: HashMap<u64, Reservation>,
    /// Reservations the sweep released, by id, with when (monotonic), oldest first in
    /// `expired_order`; bounded by `EXPIRED_PER_SHARD`.
    expired: HashMap<u64, (Reservation, Mono)>,
    expired_order: VecDeque<u64>,
    rng: u64,
    /// Keys whose last use or denial changed since the last flush.
    dirty: std::collections::HashSet<Uuid>,
    /// What was metered since the last flush, per key and period: the ledger's increments.
    deltas: HashMap<(Uuid, DateTime<Utc>), Counters>,
    /// Reservations settled here, oldest first in `settled_order`; bounded by
    /// `SETTLED_PER_SHARD`.
    settled: std::collections::HashSet<u64>,
    settled_order: VecDeque<u64>,
    /// Usage over time since the last flush: per key, hour and model.
    /// (Most hours of a key see one model: found without building a key.)
    history: HashMap<(Uuid, DateTime<Utc>), Vec<UsageBucket>>,
}

impl Inner {
    /// Reservation ids: xorshift64* seeded once from the OS, so an id from before a
    /// restart never names a new reservation, without a syscall per request.
    fn next_id(&mut self) -> u64 {
        if self.rng == 0 {
            self.rng = random_seed();
        }
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_F491_4F6C_DD1D).max(1)
    }

    fn counters(&mut self, key_id: Uuid, reset_period: ResetPeriod, now: DateTime<Utc>) -> &mut Counters {
        let Inner { keys, dirty, deltas, .. } = self;
        let c = keys.entry(key_id).or_insert_with(|| Counters::new(key_id, reset_period, now));
        let before = c.period_start;
        // A rule change inside a running period re-keys its usage (see `roll`).
        let rekeyed = c.reset_period != reset_period && c.period_end.is_none_or(|end| now < end);
        if c.roll(reset_period, now) {
            let after = (c.period_start, c.reset_period);
            dirty.insert(key_id);
            // What was metered here and not written yet moves with it (the store carried
            // what was written when the rule changed).
            if rekeyed
                && before != after.0
                && let Some(mut pending) = deltas.remove(&(key_id, before))
            {
                (pending.period_start, pending.reset_period) = after;
                pending.period_end = period::bounds(after.1, after.0).1;
                deltas
                    .entry((key_id, after.0))
                    .or_insert_with(|| Counters::empty(key_id, after.1, after.0))
                    .add(&pending);
            }
        }
        c
    }
}

/// A key's usage in one hour with one model: a row of the usage history (increments
/// until the ledger adds them up).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageBucket {
    pub key_id: Uuid,
    /// The start of the hour.
    pub hour: DateTime<Utc>,
    /// The model the response named; empty when it named none.
    pub model: String,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: i64,
}

impl UsageBucket {
    fn add(&mut self, requests: u64, m: &Metered) {
        self.requests = self.requests.saturating_add(requests);
        self.prompt_tokens = self.prompt_tokens.saturating_add(m.prompt_tokens);
        self.completion_tokens = self.completion_tokens.saturating_add(m.completion_tokens);
        self.cost_micros = self.cost_micros.saturating_add(m.cost_micros.max(0));
    }
}

/// The longest model name kept in the usage history (longer ones are cut): a response
/// names its model, and nothing a response says may grow memory without bound.
const MAX_HISTORY_MODEL: usize = 128;

/// What metering learned about one response.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Metered {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: i64,
}

/// Every key's counters, reservations and pending ledger increments in this process,
/// split by key over [`SHARDS`] locks.
#[derive(Debug, Default)]
pub struct Meters {
    shards: Sharded<Inner>,
}

/// The lock was poisoned: callers on the request path deny.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetersUnavailable;

impl Meters {
    pub fn new(counters: Vec<Counters>) -> Self {
        let meters = Meters::default();
        for c in counters {
            if let Ok(mut inner) = meters.shards.of(c.key_id).lock() {
                inner.keys.insert(c.key_id, c);
            }
        }
        meters
    }

    /// Check for a key with a token or cost limit: deny once used (plus in-flight
    /// reservations) has reached a limit, else reserve `tokens` /
    /// `micros` for this request, each capped at what the key can still use this period
    /// (so a request is admitted while any budget remains and nothing is reserved in
    /// flight). Returns the reservation.
    pub fn admit(&self, key: &ApiKey, ask: Hold, now: Now) -> Result<Result<Ticket, BudgetDenial>, MetersUnavailable> {
        let Hold { tokens, micros, prompt_tokens } = ask;
        let mut inner = self.shards.of(key.id).lock().map_err(|_| MetersUnavailable)?;
        let Limits { cost_limit_micros, token_limit, reset_period, .. } = key.limits;
        let c = inner.counters(key.id, reset_period, now.wall);
        let reset_at = c.period_end;
        let denial = if let Some(limit) = token_limit
            && c.total_tokens().saturating_add(c.reserved_tokens) >= limit
        {
            Some(BudgetDenial::Tokens { limit, reset_at, in_flight: c.total_tokens() < limit })
        } else if let Some(limit) = cost_limit_micros
            && c.cost_micros.saturating_add(c.reserved_micros) >= limit
        {
            Some(BudgetDenial::Cost { limit_micros: limit, reset_at, in_flight: c.cost_micros < limit })
        } else {
            None
        };
        if let Some(denial) = denial {
            return Ok(Err(denial));
        }
        // Under both limits here, so what is left is positive.
        let tokens = match token_limit {
            Some(limit) => tokens.min(limit.saturating_sub(c.total_tokens().saturating_add(c.reserved_tokens))),
            None => tokens,
        };
        let micros = match cost_limit_micros {
            Some(limit) => micros.min(limit.saturating_sub(c.cost_micros.saturating_add(c.reserved_micros))),
            None => micros,
        }
        .max(0);
        c.reserved_tokens = c.reserved_tokens.saturating_add(tokens);
        c.reserved_micros = c.reserved_micros.saturating_add(micros);
        let period_start = c.period_start;
        let id = loop {
            let id = inner.next_id();
            if !inner.reservations.contains_key(&id) && !inner.expired.contains_key(&id) {
                break id;
            }
        };
        // The prompt floor is part of what is held, never more.
        let hold = Hold { tokens, micros, prompt_tokens: prompt_tokens.min(tokens) };
        let r = Reservation { key_id: key.id, hold, created: now.mono, attached: false };
        inner.reservations.insert(id, r);
        Ok(Ok(Ticket { id, hold, period_start }))
    }

    /// The metering stream of a reservation's response has opened: from now on only the
    /// end of that stream settles it. A reservation that had already expired (the response
    /// took longer than the TTL to start) is held again. False if it is unknown.
    pub fn attach(&self, key_id: Uuid, reservation: u64, now: Mono) -> bool {
        let Ok(mut inner) = self.shards.of(key_id).lock() else { return false };
        if let Some(r) = inner.reservations.get_mut(&reservation) {
            if r.key_id != key_id {
                return false;
            }
            r.attached = true;
            return true;
        }
        if inner.expired.get(&reservation).is_none_or(|(r, _)| r.key_id != key_id) {
            return false;
        }
        let Some((mut r, _)) = inner.expired.remove(&reservation) else { return false };
        r.attached = true;
        r.created = now;
        if let Some(c) = inner.keys.get_mut(&key_id) {
            c.reserved_tokens = c.reserved_tokens.saturating_add(r.hold.tokens);
            c.reserved_micros = c.reserved_micros.saturating_add(r.hold.micros);
        }
        inner.reservations.insert(reservation, r);
        true
    }

    /// Reservations in flight and how many of them have an open metering stream.
    pub fn in_flight(&self) -> (usize, usize) {
        let (mut all, mut attached) = (0, 0);
        for shard in self.shards.all() {
            let Ok(inner) = shard.lock() else { continue };
            all += inner.reservations.len();
            attached += inner.reservations.values().filter(|r| r.attached).count();
        }
        (all, attached)
    }

    /// Gives a reservation back without usage (the request was refused after all).
    pub fn release(&self, key_id: Uuid, reservation: u64) -> Option<Hold> {
        let mut inner = self.shards.of(key_id).lock().ok()?;
        release(&mut inner, key_id, reservation)
    }

    /// Notes an admitted request (`last_used_at`, requests in the last minute).
    pub fn touch(&self, key_id: Uuid, reset_period: ResetPeriod, now: Now) {
        if let Ok(mut inner) = self.shards.of(key_id).lock() {
            let c = inner.counters(key_id, reset_period, now.wall);
            c.last_used_at = Some(now.wall);
            c.count_recent(now.mono);
            inner.dirty.insert(key_id);
        }
    }

    /// Notes a denied request of the key (the Overview's last denial and its reason).
    pub fn note_denial(&self, key_id: Uuid, reset_period: ResetPeriod, reason: &str, now: DateTime<Utc>) {
        if let Ok(mut inner) = self.shards.of(key_id).lock() {
            note_denial(&mut inner, key_id, reset_period, reason, now);
        }
    }

    /// What a reservation of `key_id` made here holds (also when the sweep released it).
    pub fn held(&self, key_id: Uuid, reservation: u64) -> Option<Hold> {
        let inner = self.shards.of(key_id).lock().ok()?;
        match (inner.reservations.get(&reservation), inner.expired.get(&reservation)) {
            (Some(r), _) | (None, Some((r, _))) if r.key_id == key_id => Some(r.hold),
            _ => None,
        }
    }

    /// Records one metered response and settles its reservation in one step (no Check
    /// sees the reservation gone and the usage not yet counted), once: a ticket settled
    /// here before is charged nothing (`None`). `charge` gets what the reservation held
    /// (also when the sweep had already released it, or when another replica made it) and
    /// says what to record; the usage counts in the period the request was admitted in.
    /// `reset_period` is `None` once the key is deleted: the reservation is only given back.
    pub fn record(
        &self,
        key_id: Uuid,
        reset_period: Option<ResetPeriod>,
        ticket: Option<Ticket>,
        charge: impl FnOnce(Option<Hold>) -> Metered,
        now: DateTime<Utc>,
    ) -> Option<Metered> {
        let Ok(mut inner) = self.shards.of(key_id).lock() else { return Some(charge(ticket.map(|t| t.hold))) };
        if ticket.is_some_and(|t| inner.settled.contains(&t.id)) {
            return None;
        }
        let held = ticket.map(|t| settle(&mut inner, key_id, t.id).unwrap_or(t.hold));
        let m = charge(held);
        if let Some(period) = reset_period {
            add_usage(&mut inner, key_id, period, ticket.map(|t| t.period_start), &m, now);
        }
        if let Some(t) = ticket {
            inner.settled.insert(t.id);
            inner.settled_order.push_back(t.id);
            while inner.settled_order.len() > SETTLED_PER_SHARD {
                if let Some(old) = inner.settled_order.pop_front() {
                    inner.settled.remove(&old);
                }
            }
        }
        Some(m)
    }

    /// Raises what this process knows of a key's usage in the period starting
    /// `period_start` to what the shared counters hold (never lowers it), so budgets decided
    /// here while they are unreachable start from the last known usage.
    pub fn observe_shared(
        &self,
        key_id: Uuid,
        reset_period: ResetPeriod,
        period_start: DateTime<Utc>,
        tokens: u64,
        micros: i64,
        now: DateTime<Utc>,
    ) {
        if let Ok(mut inner) = self.shards.of(key_id).lock() {
            let c = inner.counters(key_id, reset_period, now);
            if c.period_start == period_start {
                // The split between prompt and completion is not shared; the total is.
                c.completion_tokens = c.completion_tokens.max(tokens.saturating_sub(c.prompt_tokens));
                c.cost_micros = c.cost_micros.max(micros);
            }
        }
    }

    /// The key's counters for the period `now` is in.
    pub fn snapshot(&self, key_id: Uuid, reset_period: ResetPeriod, now: DateTime<Utc>) -> Option<Counters> {
        let mut inner = self.shards.of(key_id).lock().ok()?;
        Some(inner.counters(key_id, reset_period, now).clone())
    }

    /// Moves a key's counters to its (changed) reset period now, with the usage metered
    /// here and not written yet (see `Inner::counters`).
    pub fn follow_rule(&self, key_id: Uuid, reset_period: ResetPeriod, now: DateTime<Utc>) {
        if let Ok(mut inner) = self.shards.of(key_id).lock()
            && inner.keys.contains_key(&key_id)
        {
            inner.counters(key_id, reset_period, now);
        }
    }

    /// Counts one metered response in the usage history: its key's hour at `at`, by model.
    pub fn note_history(&self, key_id: Uuid, model: &str, at: DateTime<Utc>, m: &Metered) {
        let secs = at.timestamp();
        let hour = DateTime::from_timestamp(secs - secs.rem_euclid(3600), 0).unwrap_or(DateTime::UNIX_EPOCH);
        let mut end = model.len().min(MAX_HISTORY_MODEL);
        while !model.is_char_boundary(end) {
            end -= 1;
        }
        let model = &model[..end];
        if let Ok(mut inner) = self.shards.of(key_id).lock() {
            add_history(&mut inner, key_id, hour, model, 1, m);
        }
    }

    /// The usage history since the last call, for the flusher.
    pub fn take_history(&self) -> Vec<UsageBucket> {
        let mut out = Vec::new();
        for shard in self.shards.all() {
            if let Ok(mut inner) = shard.lock() {
                out.extend(inner.history.drain().flat_map(|(_, b)| b));
            }
        }
        out
    }

    /// Puts what a failed flush took back (increments add up).
    pub fn restore_history(&self, failed: Vec<UsageBucket>) {
        for b in failed {
            if let Ok(mut inner) = self.shards.of(b.key_id).lock() {
                let m = Metered {
                    prompt_tokens: b.prompt_tokens,
                    completion_tokens: b.completion_tokens,
                    cost_micros: b.cost_micros,
                };
                add_history(&mut inner, b.key_id, b.hour, &b.model, b.requests, &m);
            }
        }
    }

    /// Raises what this process knows of a key's usage to the ledger's totals for the same
    /// period (all replicas' increments), never lowering it.
    pub fn observe_ledger(&self, row: &Counters, now: DateTime<Utc>) {
        if let Ok(mut inner) = self.shards.of(row.key_id).lock() {
            let c = inner.counters(row.key_id, row.reset_period, now);
            if c.period_start == row.period_start {
                c.requests = c.requests.max(row.requests);
                c.prompt_tokens = c.prompt_tokens.max(row.prompt_tokens);
                c.completion_tokens = c.completion_tokens.max(row.completion_tokens);
                c.cost_micros = c.cost_micros.max(row.cost_micros);
            }
        }
    }

    /// Usage of `key_id`'s period starting `period_start` metered here and not written to
    /// the ledger yet (what a seed from the ledger adds to it).
    pub fn pending(&self, key_id: Uuid, period_start: DateTime<Utc>) -> Option<Counters> {
        self.shards.of(key_id).lock().ok()?.deltas.get(&(key_id, period_start)).cloned()
    }

    /// What to write to the ledger since the last call: per key and period, the usage
    /// metered here (increments: other replicas add theirs), with each key's last use and
    /// denial. A key whose last use changed without usage comes with zero increments.
    pub fn take_dirty(&self) -> Vec<Counters> {
        let mut out = Vec::new();
        for shard in self.shards.all() {
            if let Ok(mut inner) = shard.lock() {
                take_dirty(&mut inner, &mut out);
            }
        }
        out
    }

    /// Puts what a failed flush took back, to be written with the next one (increments
    /// add up; nothing is counted twice).
    pub fn restore(&self, failed: Vec<Counters>) {
        for d in failed {
            if let Ok(mut inner) = self.shards.of(d.key_id).lock() {
                inner.dirty.insert(d.key_id);
                let slot = inner
                    .deltas
                    .entry((d.key_id, d.period_start))
                    .or_insert_with(|| Counters::empty(d.key_id, d.reset_period, d.period_start));
                slot.add(&d);
            }
        }
    }

    /// Releases reservations older than `ttl` whose response never started metering (a
    /// client gone before the response, a missing ext_proc). One whose metering stream is
    /// open is kept until the stream ends. Each released one is remembered (bounded) so a
    /// stream that opens after all is still charged at least what it held; those are
    /// forgotten after another `ttl`. Ages are measured on the monotonic clock.
    pub fn expire_reservations(&self, now: Mono, ttl: Duration) -> usize {
        let ttl = ttl.num_microseconds().unwrap_or(i64::MAX);
        let mut released = 0;
        for shard in self.shards.all() {
            if let Ok(mut inner) = shard.lock() {
                released += expire_reservations(&mut inner, now, ttl);
            }
        }
        released
    }

    /// Whether counters of this key are held.
    pub fn holds(&self, key_id: Uuid) -> bool {
        self.shards.of(key_id).lock().is_ok_and(|inner| inner.keys.contains_key(&key_id))
    }

    /// Forgets a deleted key's counters (its stored history stays).
    pub fn forget(&self, key_id: Uuid) {
        if let Ok(mut inner) = self.shards.of(key_id).lock() {
            inner.keys.remove(&key_id);
        }
    }
}

/// One shard's part of [`Meters::take_dirty`], appended to `out`.
fn take_dirty(inner: &mut Inner, out: &mut Vec<Counters>) {
    let first = out.len();
    out.extend(inner.deltas.drain().map(|(_, d)| d));
    for d in &mut out[first..] {
        if let Some(c) = inner.keys.get(&d.key_id) {
            d.last_used_at = c.last_used_at;
            d.last_denied_at = c.last_denied_at;
            d.last_deny_reason.clone_from(&c.last_deny_reason);
        }
        inner.dirty.remove(&d.key_id);
    }
    for id in inner.dirty.drain() {
        if let Some(c) = inner.keys.get(&id) {
            let mut d = Counters::empty(id, c.reset_period, c.period_start);
            d.last_used_at = c.last_used_at;
            d.last_denied_at = c.last_denied_at;
            d.last_deny_reason.clone_from(&c.last_deny_reason);
            out.push(d);
        }
    }
}

/// One shard's part of [`Meters::expire_reservations`]; `ttl` in microseconds.
fn expire_reservations(inner: &mut Inner, now: Mono, ttl: i64) -> usize {
    let mut stale: Vec<(Mono, u64)> = inner
        .reservations
        .iter()
        .filter(|(_, r)| !r.attached && now.micros_since(r.created) > ttl)
        .map(|(id, r)| (r.created, *id))
        .collect();
    stale.sort_unstable();
    for &(_, id) in &stale {
        if let Some(r) = inner.reservations.get(&id).copied()
            && release(inner, r.key_id, id).is_some()
        {
            inner.expired.insert(id, (r, now));
            inner.expired_order.push_back(id);
        }
    }
    // Forget the oldest: by age, then down to the bound. Ids settled meanwhile are
    // gone from the map already; their entries in the order are skipped.
    while let Some(&id) = inner.expired_order.front() {
        let keep = match inner.expired.get(&id) {
            None => false,
            Some((_, at)) => now.micros_since(*at) <= ttl && inner.expired_order.len() <= EXPIRED_PER_SHARD,
        };
        if keep {
            break;
        }
        inner.expired_order.pop_front();
        inner.expired.remove(&id);
    }
    stale.len()
}

/// Adds `requests` and `m` to the usage history of `key_id` in `hour` with `model`.
fn add_history(inner: &mut Inner, key_id: Uuid, hour: DateTime<Utc>, model: &str, requests: u64, m: &Metered) {
    let buckets = inner.history.entry((key_id, hour)).or_default();
    let at = match buckets.iter().position(|b| b.model == model) {
        Some(at) => at,
        None => {
            buckets.push(UsageBucket {
                key_id,
                hour,
                model: model.to_string(),
                requests: 0,
                prompt_tokens: 0,
                completion_tokens: 0,
                cost_micros: 0,
            });
            buckets.len() - 1
        }
    };
    buckets[at].add(requests, m);
}

/// Counts one metered response: in the key's counters when it belongs to their period, and
/// in the ledger's increments for its period.
fn add_usage(
    inner: &mut Inner,
    key_id: Uuid,
    reset_period: ResetPeriod,
    admitted_in: Option<DateTime<Utc>>,
    m: &Metered,
    now: DateTime<Utc>,
) {
    let c = inner.counters(key_id, reset_period, now);
    let period_start = admitted_in.unwrap_or(c.period_start);
    if period_start == c.period_start {
        c.count(m);
    }
    let reset_period = c.reset_period;
    inner
        .deltas
        .entry((key_id, period_start))
        .or_insert_with(|| Counters::empty(key_id, reset_period, period_start))
        .count(m);
    inner.dirty.insert(key_id);
}

fn note_denial(inner: &mut Inner, key_id: Uuid, reset_period: ResetPeriod, reason: &str, now: DateTime<Utc>) {
    let c = inner.counters(key_id, reset_period, now);
    c.last_denied_at = Some(now);
    if c.last_deny_reason.as_deref() != Some(reason) {
        c.last_deny_reason = Some(reason.to_string());
    }
    inner.dirty.insert(key_id);
}

/// Releases a reservation of `key_id`, or takes it from the expired ones; returns what
/// it held.
fn settle(inner: &mut Inner, key_id: Uuid, reservation: u64) -> Option<Hold> {
    if let Some(held) = release(inner, key_id, reservation) {
        return Some(held);
    }
    if inner.expired.get(&reservation).is_none_or(|(r, _)| r.key_id != key_id) {
        return None;
    }
    inner.expired.remove(&reservation).map(|(r, _)| r.hold)
}

/// Releases a reservation of `key_id`; returns what it held.
fn release(inner: &mut Inner, key_id: Uuid, reservation: u64) -> Option<Hold> {
    if inner.reservations.get(&reservation).is_none_or(|r| r.key_id != key_id) {
        return None;
    }
    let r = inner.reservations.remove(&reservation)?;
    if let Some(c) = inner.keys.get_mut(&r.key_id) {
        c.reserved_tokens = c.reserved_tokens.saturating_sub(r.hold.tokens);
        c.reserved_micros = c.reserved_micros.saturating_sub(r.hold.micros).max(0);
    }
    Some(r.hold)
}

fn random_seed() -> u64 {
    let mut b = [0u8; 8];
    // Without randomness, fall back to the clock: ids only need to differ.
    if getrandom::fill(&mut b).is_err() {
        return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64);
    }
    u64::from_le_bytes(b) | 1
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use super::*;
    use crate::domain::clock::{Clock, ManualClock};
    use crate::domain::key::NewKey;

    fn hold(tokens: u64, micros: i64) -> Hold {
        Hold { tokens, micros, prompt_tokens: 0 }
    }

    fn key(limits: Limits) -> ApiKey {
        let created = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        ApiKey::new(Uuid::now_v7(), "k", "pcs_x", NewKey::Managed { limits, expires_at: None }, created)
    }

    /// `wall` with the monotonic clock at its origin.
    fn at(wall: DateTime<Utc>) -> Now {
        Now { wall, mono: Mono::default() }
    }

    fn used(prompt: u64, completion: u64, cost: i64) -> Metered {
        Metered { prompt_tokens: prompt, completion_tokens: completion, cost_micros: cost }
    }

    #[test]
    fn tickets_travel_whole_and_nothing_else_reads_as_one() {
        let t = Ticket {
            id: u64::MAX,
            hold: Hold { tokens: 4096, micros: 12_345, prompt_tokens: 96 },
            period_start: Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).unwrap(),
        };
        assert_eq!(Ticket::decode(&t.to_string()), Some(t));
        for bad in ["", "1", "1.2.3.4", "1.2.3.4.5.6", "x.2.3.4.5", "1.2.3.4.99999999999999999999"] {
            assert_eq!(Ticket::decode(bad), None, "{bad}");
        }
    }

    #[test]
    fn token_limit_denies_once_used_reaches_it_and_frees_at_the_reset() {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 1, 31, 22, 0, 0).unwrap());
        let k = key(Limits { token_limit: Some(100), reset_period: ResetPeriod::Monthly, ..Default::default() });
        let m = Meters::default();
        let r = m.admit(&k, hold(0, 0), clock.read()).unwrap().unwrap();
        m.record(k.id, Some(k.limits.reset_period), Some(r), |_| used(40, 59, 0), clock.now());
        assert!(m.admit(&k, hold(0, 0), clock.read()).unwrap().is_ok(), "99 < 100");
        m.record(k.id, Some(k.limits.reset_period), None, |_| used(0, 1, 0), clock.now());
        let denied = m.admit(&k, hold(0, 0), clock.read()).unwrap().unwrap_err();
        let feb = Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap();
        assert_eq!(denied, BudgetDenial::Tokens { limit: 100, reset_at: Some(feb), in_flight: false });
        clock.set(feb);
        assert!(m.admit(&k, hold(0, 0), clock.read()).unwrap().is_ok(), "a new month starts from zero");
        let c = m.snapshot(k.id, k.limits.reset_period, clock.now()).unwrap();
        assert_eq!((c.requests, c.total_tokens(), c.period_start), (0, 0, feb));
    }

    #[test]
    fn reservations_count_and_settle() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let k = key(Limits { token_limit: Some(100), ..Default::default() });
        let m = Meters::default();
        let a = m.admit(&k, hold(60, 0), at(now)).unwrap().unwrap();
        let b = m.admit(&k, hold(60, 0), at(now)).unwrap().unwrap();
        assert_eq!(
            m.admit(&k, hold(60, 0), at(now)).unwrap().unwrap_err(),
            BudgetDenial::Tokens { limit: 100, reset_at: None, in_flight: true },
            "120 reserved >= 100, nothing used yet"
        );
        m.record(k.id, Some(k.limits.reset_period), Some(a), |_| used(10, 10, 0), now);
        m.release(k.id, b.id);
        let c = m.snapshot(k.id, k.limits.reset_period, now).unwrap();
        assert_eq!((c.total_tokens(), c.reserved_tokens, c.requests), (20, 0, 1));
        // An unsettled reservation expires.
        m.admit(&k, hold(80, 0), at(now)).unwrap().unwrap();
        assert!(m.admit(&k, hold(1, 0), at(now)).unwrap().is_err());
        let mono = Mono::default();
        assert_eq!(m.expire_reservations(mono + Duration::minutes(9), Duration::minutes(10)), 0);
        assert_eq!(m.expire_reservations(mono + Duration::minutes(11), Duration::minutes(10)), 1);
        assert!(m.admit(&k, hold(1, 0), at(now)).unwrap().is_ok());
    }

    #[test]
    fn cost_limit_and_never_period() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let k = key(Limits { cost_limit_micros: Some(1_000), ..Default::default() });
        let m = Meters::default();
        m.record(k.id, Some(k.limits.reset_period), None, |_| used(1, 1, 999), now);
        let r = m.admit(&k, hold(0, 5), at(now)).unwrap().unwrap();
        assert_eq!(
            m.admit(&k, hold(0, 0), at(now)).unwrap().unwrap_err(),
            BudgetDenial::Cost { limit_micros: 1_000, reset_at: None, in_flight: true }
        );
        m.release(k.id, r.id);
        assert!(m.admit(&k, hold(0, 0), at(now)).unwrap().is_ok());
    }

    #[test]
    fn requests_in_the_last_minute_to_the_second() {
        let t0 = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let k = key(Limits::default());
        let m = Meters::default();
        // Elapsed seconds on the monotonic clock; the wall clock stands still (it does not matter).
        let at_sec = |s: i64| Now { wall: t0, mono: Mono::from_micros(s * 1_000_000 + 250_000) };
        for s in [0, 0, 10, 59] {
            m.touch(k.id, ResetPeriod::Never, at_sec(s));
        }
        let count = |at: i64| m.snapshot(k.id, ResetPeriod::Never, t0).unwrap().requests_last_minute(at_sec(at).mono);
        assert_eq!(count(59), 4);
        assert_eq!(count(60), 2, "the two at 0 s left");
        assert_eq!(count(70), 1);
        assert_eq!(count(119), 0);
        assert_eq!(count(500), 0);
        m.touch(k.id, ResetPeriod::Never, at_sec(500));
        assert_eq!(count(500), 1, "stale slots were cleared");
    }

    #[test]
    fn a_rule_change_after_the_period_ended_does_not_revive_it() {
        let april = Utc.with_ymd_and_hms(2026, 4, 20, 0, 0, 0).unwrap();
        let k = key(Limits { token_limit: Some(100), reset_period: ResetPeriod::Monthly, ..Default::default() });
        let m = Meters::default();
        m.record(k.id, Some(ResetPeriod::Monthly), None, |_| used(90, 0, 0), april);
        let may = Utc.with_ymd_and_hms(2026, 5, 20, 0, 0, 0).unwrap();
        let c = m.snapshot(k.id, ResetPeriod::Daily, may).unwrap();
        assert_eq!((c.total_tokens(), c.period_start), (0, may), "April's usage stays in April");
    }

    #[test]
    fn reservations_are_released_only_for_their_key() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let (a, b) = (key(Limits { token_limit: Some(10), ..Default::default() }), key(Limits::default()));
        let m = Meters::default();
        let r = m.admit(&a, hold(10, 0), at(now)).unwrap().unwrap();
        assert_eq!(m.release(b.id, r.id), None, "another key's id settles nothing");
        assert!(m.admit(&a, hold(1, 0), at(now)).unwrap().is_err());
        assert_eq!(m.release(a.id, r.id), Some(hold(10, 0)));
        assert_eq!(m.release(a.id, r.id), None, "once");
    }

    #[test]
    fn changing_the_reset_period_keeps_usage() {
        let now = Utc.with_ymd_and_hms(2026, 5, 20, 0, 0, 0).unwrap();
        let mut k = key(Limits { token_limit: Some(1000), ..Default::default() });
        let m = Meters::default();
        m.record(k.id, Some(ResetPeriod::Never), None, |_| used(300, 0, 0), now);
        k.limits.reset_period = ResetPeriod::Monthly;
        let c = m.snapshot(k.id, ResetPeriod::Monthly, now).unwrap();
        assert_eq!(c.total_tokens(), 300, "no reset, no inflation");
        assert_eq!(c.period_start, Utc.with_ymd_and_hms(2026, 5, 1, 0, 0, 0).unwrap());
        assert_eq!(m.take_dirty().len(), 1);
        assert!(m.take_dirty().is_empty());
    }

    #[test]
    fn reservations_are_capped_at_what_the_key_can_still_use() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let k = key(Limits { token_limit: Some(100), cost_limit_micros: Some(50), ..Default::default() });
        let m = Meters::default();
        m.record(k.id, Some(k.limits.reset_period), None, |_| used(30, 0, 20), now);
        let ask = Hold { tokens: u64::MAX, micros: i64::MAX, prompt_tokens: 1_000_000 };
        let r = m.admit(&k, ask, at(now)).unwrap().unwrap();
        let c = m.snapshot(k.id, k.limits.reset_period, now).unwrap();
        assert_eq!((c.reserved_tokens, c.reserved_micros), (70, 30), "the rest of the budget, no more");
        assert!(m.admit(&k, hold(1, 0), at(now)).unwrap().is_err(), "nothing left in flight");
        // Charged its (capped) reservation, the key is exactly exhausted; nothing wraps.
        let charged = m
            .record(
                k.id,
                Some(k.limits.reset_period),
                Some(r),
                |held| {
                    assert_eq!(held.unwrap().prompt_tokens, 70, "the prompt floor is within the hold");
                    used(0, held.unwrap().tokens, held.unwrap().micros)
                },
                now,
            )
            .unwrap();
        assert_eq!((charged.completion_tokens, charged.cost_micros), (70, 30));
        assert_eq!(m.release(k.id, r.id), None);
        let c = m.snapshot(k.id, k.limits.reset_period, now).unwrap();
        assert_eq!((c.total_tokens(), c.cost_micros, c.reserved_tokens, c.reserved_micros), (100, 50, 0, 0));
        assert!(m.admit(&k, hold(0, 0), at(now)).unwrap().is_err());
        // A key without a token limit reserves what it asks for; counters saturate.
        let free = key(Limits { cost_limit_micros: Some(i64::MAX), ..Default::default() });
        let r = m.admit(&free, hold(u64::MAX, -5), at(now)).unwrap().unwrap();
        m.record(
            free.id,
            Some(ResetPeriod::Never),
            Some(r),
            |held| used(u64::MAX, held.unwrap().tokens, i64::MAX),
            now,
        );
        m.record(free.id, Some(ResetPeriod::Never), None, |_| used(u64::MAX, u64::MAX, i64::MAX), now);
        let c = m.snapshot(free.id, ResetPeriod::Never, now).unwrap();
        assert_eq!(
            (c.prompt_tokens, c.completion_tokens, c.cost_micros, c.reserved_micros),
            (u64::MAX, u64::MAX, i64::MAX, 0)
        );
        let mut requests = c.clone();
        requests.requests = u64::MAX;
        let m = Meters::new(vec![requests]);
        m.record(free.id, Some(ResetPeriod::Never), None, |_| used(0, 0, 0), now);
        assert_eq!(m.snapshot(free.id, ResetPeriod::Never, now).unwrap().requests, u64::MAX, "saturates");
    }

    #[test]
    fn an_attached_reservation_outlives_the_ttl_and_an_expired_one_still_floors_the_charge() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let ttl = Duration::minutes(10);
        let k = key(Limits { token_limit: Some(1000), ..Default::default() });
        let m = Meters::default();
        let t0 = Mono::default();
        let open = m.admit(&k, hold(300, 0), at(now)).unwrap().unwrap();
        let late = m.admit(&k, hold(200, 0), at(now)).unwrap().unwrap();
        assert!(m.attach(k.id, open.id, t0 + Duration::seconds(1)), "its stream opened");
        assert_eq!(m.in_flight(), (2, 1));
        assert_eq!(m.expire_reservations(t0 + Duration::minutes(30), ttl), 1, "only the one with no stream");
        let c = m.snapshot(k.id, k.limits.reset_period, now).unwrap();
        assert_eq!(c.reserved_tokens, 300, "the open stream still holds its reservation");
        // The open stream ends reporting nothing: its reservation is what it is charged.
        let charged = m
            .record(k.id, Some(k.limits.reset_period), Some(open), |held| used(0, held.unwrap().tokens, 0), now)
            .unwrap();
        assert_eq!(charged.completion_tokens, 300);
        // The expired one's stream ends after all: still charged what it held.
        let charged = m
            .record(k.id, Some(k.limits.reset_period), Some(late), |held| used(0, held.unwrap().tokens, 0), now)
            .unwrap();
        assert_eq!(charged.completion_tokens, 200);
        let again = m.record(k.id, Some(k.limits.reset_period), Some(late), |_| used(0, 999, 0), now);
        assert_eq!(again, None, "settled once: a second settle charges nothing");
        let c = m.snapshot(k.id, k.limits.reset_period, now).unwrap();
        assert_eq!((c.total_tokens(), c.reserved_tokens, c.requests), (500, 0, 2));
    }

    #[test]
    fn a_stream_that_opens_after_its_reservation_expired_holds_it_again() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let ttl = Duration::minutes(10);
        let k = key(Limits { token_limit: Some(1000), ..Default::default() });
        let other = key(Limits { token_limit: Some(1000), ..Default::default() });
        let m = Meters::default();
        let t0 = Mono::default();
        let r = m.admit(&k, hold(400, 0), at(now)).unwrap().unwrap();
        assert_eq!(m.expire_reservations(t0 + Duration::minutes(11), ttl), 1);
        assert!(!m.attach(other.id, r.id, t0 + Duration::minutes(12)), "not another key's");
        assert!(m.attach(k.id, r.id, t0 + Duration::minutes(12)));
        assert_eq!(m.snapshot(k.id, k.limits.reset_period, now).unwrap().reserved_tokens, 400);
        assert_eq!(m.expire_reservations(t0 + Duration::hours(5), ttl), 0, "attached: kept");
        assert_eq!(m.release(k.id, r.id), Some(hold(400, 0)));
        // Expired ones are forgotten after another TTL.
        let r = m.admit(&k, hold(10, 0), at(now)).unwrap().unwrap();
        let t1 = t0 + Duration::hours(6);
        assert_eq!(m.expire_reservations(t1, ttl), 1);
        assert_eq!(m.expire_reservations(t1 + Duration::minutes(11), ttl), 0);
        assert_eq!(m.release(k.id, r.id), None);
    }

    #[test]
    fn expired_reservations_are_remembered_within_a_bound() {
        let now = Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap();
        let k = key(Limits { token_limit: Some(u64::MAX), ..Default::default() });
        let m = Meters::default();
        let ids: Vec<u64> = (0..EXPIRED_PER_SHARD + 10)
            .map(|i| {
                let made = Now { wall: now, mono: Mono::from_micros(i as i64) };
                m.admit(&k, hold(1, 0), made).unwrap().unwrap().id
            })
            .collect();
        let later = Mono::default() + Duration::minutes(11);
        assert_eq!(m.expire_reservations(later, Duration::minutes(10)), ids.len());
        let inner = m.shards.of(k.id).lock().unwrap();
        assert_eq!((inner.expired.len(), inner.expired_order.len()), (EXPIRED_PER_SHARD, EXPIRED_PER_SHARD));
        assert!(
            !inner.expired.contains_key(&ids[0]) && inner.expired.contains_key(&ids[ids.len() - 1]),
            "oldest first"
        );
    }

    #[test]
    fn a_wall_clock_step_neither_expires_nor_revives_reservations() {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 5, 5, 0, 0, 0).unwrap());
        let ttl = Duration::minutes(10);
        let k = key(Limits { token_limit: Some(100), ..Default::default() });
        let m = Meters::default();
        m.admit(&k, hold(100, 0), clock.read()).unwrap().unwrap();
        // NTP steps the wall clock a day forward: the reservation is a second old, not a day.
        clock.set(clock.now() + Duration::days(1));
        clock.advance(Duration::seconds(1));
        assert_eq!(m.expire_reservations(clock.monotonic(), ttl), 0);
        assert!(m.admit(&k, hold(1, 0), clock.read()).unwrap().is_err(), "still held");
        clock.advance(ttl);
        assert_eq!(m.expire_reservations(clock.monotonic(), ttl), 1, "expires after the TTL of elapsed time");
        // A step back does not make a new reservation look young forever, nor an old one new.
        let r = m.admit(&k, hold(100, 0), clock.read()).unwrap().unwrap();
        clock.set(clock.now() - Duration::days(30));
        clock.advance(ttl + Duration::seconds(1));
        assert_eq!(m.expire_reservations(clock.monotonic(), ttl), 1);
        assert_eq!(m.release(k.id, r.id), None);
    }
}
