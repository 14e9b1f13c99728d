//! The counters a Check decides limits with, behind one trait with two implementations:
//! in this process ([`InProcess`], one replica) and shared by every replica (Redis, in
//! `crate::counters`). A Check of a key with limits asks them once: every limit of the key
//! is decided at once, all or none, and an admission is recorded with its reservation.
//! Metering settles that reservation with what the response cost, on any replica, once.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::budget::{BudgetDenial, Hold, Metered, Meters, Ticket};
use super::clock::{Mono, Now};
use super::key::{ApiKey, ResetPeriod};
use super::window::{Admission, RequestWindows};

/// What a counters call answers with: at once (in process; no allocation on the request
/// path), or later (a remote store).
pub struct CountFuture<'a, T>(Answer<'a, T>);

enum Answer<'a, T> {
    /// Taken by the one poll that returns it.
    Ready(Option<T>),
    Later(Pin<Box<dyn Future<Output = T> + Send + 'a>>),
}

impl<'a, T> CountFuture<'a, T> {
    pub fn ready(value: T) -> Self {
        CountFuture(Answer::Ready(Some(value)))
    }

    pub fn later(f: impl Future<Output = T> + Send + 'a) -> Self {
        CountFuture(Answer::Later(Box::pin(f)))
    }

    /// The answer when it is already there (in-process counters), else the future.
    pub fn into_ready(self) -> Result<T, Self> {
        match self.0 {
            Answer::Ready(Some(value)) => Ok(value),
            other => Err(CountFuture(other)),
        }
    }
}

impl<T: Unpin> Future for CountFuture<'_, T> {
    type Output = T;

    fn poll(self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> std::task::Poll<T> {
        match &mut self.get_mut().0 {
            // Polled again after it answered (a caller's bug): it never answers twice.
            Answer::Ready(value) => value.take().map_or(std::task::Poll::Pending, std::task::Poll::Ready),
            Answer::Later(f) => f.as_mut().poll(cx),
        }
    }
}

/// What the counters answered for one request of a key with limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Admitted: a slot taken in the requests-per-minute window (keys with one) and a
    /// reservation held against the budgets (keys with one).
    Admitted { rpm: Option<Admission>, reservation: Option<Ticket> },
    /// The requests-per-minute window is full; nothing was taken.
    RateLimited(Admission),
    /// A budget is used up; nothing was taken. `rpm` is the window, untouched.
    Budget { denial: BudgetDenial, rpm: Option<Admission> },
}

/// The counters could not decide (a poisoned lock, the shared store unreachable with
/// `--counter-failure-mode deny`): the request is denied with 503.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unavailable(pub &'static str);

impl fmt::Display for Unavailable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// A key's usage in its current period, as the counters that decide see it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Usage {
    pub period_start: Option<DateTime<Utc>>,
    pub requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_micros: i64,
    pub reserved_tokens: u64,
    pub reserved_micros: i64,
    /// Requests admitted in the last 60 s (exact for keys with a requests-per-minute
    /// limit, to the second otherwise).
    pub requests_last_minute: u32,
}

/// How metering settles one response: what it is charged given what its reservation held.
pub type Charge<'a> = &'a (dyn Fn(Option<Hold>) -> Metered + Send + Sync);

/// Counters for requests per minute, budgets and reservations.
pub trait Counters: Send + Sync + fmt::Debug {
    /// Decides every limit of `key` for one request at once, all or none: its budgets
    /// (used plus reserved below each limit; a reservation of `ask`, capped at what the key
    /// can still use) and its requests-per-minute window (fewer than N admitted in the
    /// preceding 60 s). Admitting takes a slot and records the reservation; a denial takes
    /// nothing. Only for keys with at least one limit.
    fn admit<'a>(&'a self, key: &'a ApiKey, ask: Hold, now: Now) -> CountFuture<'a, Result<Outcome, Unavailable>>;

    /// The response to `ticket`'s request started metering: its reservation lives until
    /// settled, however long the response takes.
    fn attach<'a>(&'a self, key_id: Uuid, ticket: Ticket, now: Now) -> CountFuture<'a, ()>;

    /// Settles one metered response of `key_id`: charges what `charge` says (given what
    /// its reservation held) to the period its request was admitted in and gives the
    /// reservation back, once: settling the same ticket again charges nothing (`None`).
    /// Returns what was charged. `reset_period` is `None` once the key is deleted (its
    /// reservation is only given back).
    fn settle<'a>(
        &'a self,
        key_id: Uuid,
        reset_period: Option<ResetPeriod>,
        ticket: Option<Ticket>,
        charge: Charge<'a>,
        now: Now,
    ) -> CountFuture<'a, Option<Metered>>;

    /// The key's usage in its current period.
    fn usage<'a>(&'a self, key: &'a ApiKey, now: Now) -> CountFuture<'a, Result<Usage, Unavailable>>;

    /// Releases reservations older than `ttl` that no metering stream holds; returns how
    /// many. Also forgets idle windows.
    fn sweep(&self, now: Mono, ttl: Duration) -> usize;
}

/// Counters in this process: exact for one replica.
#[derive(Debug, Default)]
pub struct InProcess {
    pub windows: RequestWindows,
    pub meters: Arc<Meters>,
}

impl InProcess {
    pub fn new(meters: Arc<Meters>) -> Self {
        InProcess { windows: RequestWindows::default(), meters }
    }

    /// [`Counters::admit`] without waiting: everything is in memory. `rpm_limit` is the
    /// window's limit (the key's, or this replica's share of it).
    pub fn admit_now(&self, key: &ApiKey, ask: Hold, rpm_limit: Option<u32>, now: Now) -> Result<Outcome, Unavailable> {
        let limits = &key.limits;
        // Budgets first, so a request they refuse takes no requests-per-minute slot.
        let reservation = if limits.token_limit.is_some() || limits.cost_limit_micros.is_some() {
            match self.meters.admit(key, ask, now) {
                Ok(Ok(r)) => Some(r),
                Ok(Err(denial)) => {
                    let rpm = rpm_limit.and_then(|l| self.windows.peek(key.id, l, now.mono));
                    return Ok(Outcome::Budget { denial, rpm });
                }
                Err(_) => return Err(Unavailable("meters lock poisoned")),
            }
        } else {
            None
        };
        let rpm = match rpm_limit {
            None => None,
            Some(limit) => match self.windows.admit(key.id, limit, now.mono) {
                Some(a) if a.admitted => Some(a),
                refused => {
                    if let Some(r) = reservation {
                        self.meters.release(key.id, r.id);
                    }
                    return match refused {
                        Some(a) => Ok(Outcome::RateLimited(a)),
                        None => Err(Unavailable("request windows lock poisoned")),
                    };
                }
            },
        };
        Ok(Outcome::Admitted { rpm, reservation })
    }

    /// [`Counters::usage`] without waiting.
    pub fn usage_now(&self, key: &ApiKey, now: Now) -> Result<Usage, Unavailable> {
        let c = self
            .meters
            .snapshot(key.id, key.limits.reset_period, now.wall)
            .ok_or(Unavailable("meters lock poisoned"))?;
        let requests_last_minute = match key.limits.requests_per_minute {
            Some(_) => self.windows.count(key.id, now.mono).try_into().unwrap_or(u32::MAX),
            None => c.requests_last_minute(now.mono),
        };
        Ok(Usage {
            period_start: Some(c.period_start),
            requests: c.requests,
            prompt_tokens: c.prompt_tokens,
            completion_tokens: c.completion_tokens,
            cost_micros: c.cost_micros,
            reserved_tokens: c.reserved_tokens,
            reserved_micros: c.reserved_micros,
            requests_last_minute,
        })
    }
}

impl Counters for InProcess {
    fn admit<'a>(&'a self, key: &'a ApiKey, ask: Hold, now: Now) -> CountFuture<'a, Result<Outcome, Unavailable>> {
        CountFuture::ready(self.admit_now(key, ask, key.limits.requests_per_minute, now))
    }

    fn attach<'a>(&'a self, key_id: Uuid, ticket: Ticket, now: Now) -> CountFuture<'a, ()> {
        self.meters.attach(key_id, ticket.id, now.mono);
        CountFuture::ready(())
    }

    fn settle<'a>(
        &'a self,
        key_id: Uuid,
        reset_period: Option<ResetPeriod>,
        ticket: Option<Ticket>,
        charge: Charge<'a>,
        now: Now,
    ) -> CountFuture<'a, Option<Metered>> {
        let m = self.meters.record(key_id, reset_period, ticket, charge, now.wall);
        CountFuture::ready(m)
    }

    fn usage<'a>(&'a self, key: &'a ApiKey, now: Now) -> CountFuture<'a, Result<Usage, Unavailable>> {
        CountFuture::ready(self.usage_now(key, now))
    }

    fn sweep(&self, now: Mono, ttl: Duration) -> usize {
        self.windows.sweep(now);
        self.meters.expire_reservations(now, ttl)
    }
}

/// Polls `f` once: its output if it completed at once (as in-process counters always do),
/// else `None` (it is dropped).
pub fn now_or_never<F: Future>(f: F) -> Option<F::Output> {
    let mut f = std::pin::pin!(f);
    let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
    match f.as_mut().poll(&mut cx) {
        std::task::Poll::Ready(out) => Some(out),
        std::task::Poll::Pending => None,
    }
}
