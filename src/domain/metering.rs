//! Settling one metered response: the rule for what it is charged, and its recording
//! against the key's counters with its reservation settled, in one step. The ext_proc
//! adapter only gathers what the response showed ([`Observed`]).

use uuid::Uuid;

use super::budget::{Hold, Metered, Ticket};
use super::check::Limiters;
use super::clock::Now;
use super::estimate;
use super::key::Limits;
use super::pricing::{Price, cost_micros};
use super::usage::Reported;

/// What metering saw of one response.
#[derive(Debug, Clone, Default)]
pub struct Observed {
    /// Its HTTP status; 0 when Envoy did not send the response headers.
    pub status: u16,
    /// The usage it reported, if any.
    pub reported: Reported,
    /// The estimate of its generated content, in tokens (0 for a body that was not read).
    pub content_tokens: u64,
    /// Its stream ended normally (not cut).
    pub complete: bool,
}

/// What settling recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settled {
    pub metered: Metered,
    /// The response named a model (or reported usage) that has no price.
    pub unpriced: bool,
}

impl Observed {
    /// A response whose status never came through may have succeeded: it counts as one.
    pub fn succeeded(&self) -> bool {
        self.status == 0 || (200..300).contains(&self.status)
    }

    /// Usage the provider reported is charged as reported. A successful response that
    /// reports none (a stream without `stream_options.include_usage`, a compressed body),
    /// that was cut before its end, or whose last usage was a first count (Anthropic's
    /// `message_start` says 1 output token; an error event may follow it) is charged an
    /// estimate: its prompt from the request, its completion from its content, never less
    /// than its reservation `held`. Leaving usage out, or cutting the stream, never
    /// escapes a budget. A failed response that reports nothing costs nothing.
    pub fn charge(&self, price: Option<&Price>, held: Option<Hold>) -> Metered {
        let r = &self.reported;
        if self.succeeded() && (!r.found || !r.last || !self.complete) {
            estimate::charge_unreported(r, self.content_tokens, price, held)
        } else if r.found {
            Metered {
                prompt_tokens: r.prompt_tokens,
                completion_tokens: r.completion_tokens,
                cost_micros: price.map_or(0, |p| cost_micros(p, r.prompt_tokens, r.completion_tokens)),
            }
        } else {
            Metered::default()
        }
    }
}

/// Settles a response of key `key_id` (whose limits are `limits`, `None` once the key is
/// deleted): prices it at its model's prices (for a key with a USD limit, an unpriced or
/// unnamed model at the book's highest prices, as its reservation was), then has the
/// counters record it against the period its request was admitted in and settle its
/// reservation, once. A deleted key's reservation is only given back.
pub async fn settle(
    limiters: &Limiters,
    key_id: Uuid,
    limits: Option<Limits>,
    reservation: Option<Ticket>,
    seen: &Observed,
    now: Now,
) -> Settled {
    let model = seen.reported.model.as_deref().unwrap_or("");
    let (price, highest) = match limiters.prices.read() {
        Ok(book) => (book.lookup(model).copied(), book.highest().copied()),
        Err(_) => (None, None),
    };
    let unpriced = price.is_none() && (seen.reported.found || (seen.succeeded() && !model.is_empty()));
    let cost_limited = limits.is_some_and(|l| l.cost_limit_micros.is_some());
    let price = price.or(highest.filter(|_| cost_limited));
    let charge = |held: Option<Hold>| seen.charge(price.as_ref(), held);
    let settled = limiters.counters.settle(key_id, limits.map(|l| l.reset_period), reservation, &charge, now).await;
    // A response settled before (a retried settle) counts nowhere again.
    let metered = settled.unwrap_or_default();
    if settled.is_some() && limits.is_some() {
        limiters.meters.note_history(key_id, model, now.wall, &metered);
    }
    Settled { metered, unpriced }
}

#[cfg(test)]
mod tests {
    use chrono::TimeZone;

    use chrono::{DateTime, Utc};

    use super::*;
    use crate::domain::key::{ApiKey, NewKey, ResetPeriod};
    use crate::domain::pricing::PriceBook;

    fn now() -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 6, 1, 0, 0, 0).unwrap()
    }

    fn limiters() -> Limiters {
        let p = |i, o| Price { input_micros_per_million: i, output_micros_per_million: o };
        Limiters::in_process(
            Default::default(),
            PriceBook::new([
                ("cheap".to_string(), p(1_000_000, 2_000_000)),
                ("dear".to_string(), p(10_000_000, 30_000_000)),
            ]),
        )
    }

    fn key(limits: Limits) -> ApiKey {
        ApiKey::new(Uuid::now_v7(), "k", "pcs_x", NewKey::Managed { limits, expires_at: None }, now())
    }

    fn reported(model: &str, prompt: u64, completion: u64, last: bool) -> Reported {
        Reported { model: Some(model.into()), prompt_tokens: prompt, completion_tokens: completion, found: true, last }
    }

    fn seen(status: u16, reported: Reported, content_tokens: u64, complete: bool) -> Observed {
        Observed { status, reported, content_tokens, complete }
    }

    #[test]
    fn the_charge_rule() {
        let price = Price { input_micros_per_million: 1_000_000, output_micros_per_million: 2_000_000 };
        let held = Some(Hold { tokens: 100, micros: 0, prompt_tokens: 20 });
        let full = seen(200, reported("m", 7, 9, true), 3, true);
        assert_eq!(
            full.charge(Some(&price), held),
            Metered { prompt_tokens: 7, completion_tokens: 9, cost_micros: 25 }
        );
        // No usage, a first count only, or cut: the estimate, the hold as the floor.
        let floor = Metered { prompt_tokens: 20, completion_tokens: 80, cost_micros: 20 + 6 };
        assert_eq!(seen(200, Reported::default(), 3, true).charge(Some(&price), held), floor);
        assert_eq!(seen(0, Reported::default(), 3, true).charge(Some(&price), held), floor, "status unknown");
        let first = seen(200, reported("m", 7, 1, false), 3, true).charge(Some(&price), held);
        assert_eq!((first.prompt_tokens, first.completion_tokens), (20, 80));
        let cut = seen(200, reported("m", 7, 9, true), 3, false).charge(None, held);
        assert_eq!((cut.prompt_tokens, cut.completion_tokens, cut.cost_micros), (20, 80, 0));
        // A failed response costs what it reported, or nothing.
        assert_eq!(seen(500, Reported::default(), 3, true).charge(Some(&price), held), Metered::default());
        let failed = seen(400, reported("m", 7, 0, true), 0, true).charge(Some(&price), held);
        assert_eq!(failed, Metered { prompt_tokens: 7, completion_tokens: 0, cost_micros: 7 });
    }

    #[tokio::test]
    async fn settling_prices_records_and_settles_in_one_step() {
        let l = limiters();
        let usd = key(Limits { cost_limit_micros: Some(1_000_000), ..Default::default() });
        let at = Now { wall: now(), mono: Default::default() };
        let hold = Hold { tokens: 10, micros: 50, prompt_tokens: 0 };
        let r = l.meters.admit(&usd, hold, at).unwrap().unwrap();
        // An unpriced model on a USD-limited key: the highest prices ($10 and $30 per million).
        let s =
            settle(&l, usd.id, Some(usd.limits), Some(r), &seen(200, reported("other", 1, 1, true), 0, true), at).await;
        assert_eq!((s.metered.cost_micros, s.unpriced), (40, true));
        let c = l.meters.snapshot(usd.id, ResetPeriod::Never, now()).unwrap();
        assert_eq!((c.requests, c.cost_micros, c.reserved_micros), (1, 40, 0));
        // The usage history has it under its hour and model, once (a second settle of the
        // same ticket counts nowhere).
        let again =
            settle(&l, usd.id, Some(usd.limits), Some(r), &seen(200, reported("other", 1, 1, true), 0, true), at).await;
        assert_eq!(again.metered, Metered::default());
        let history = l.meters.take_history();
        assert_eq!(history.len(), 1);
        assert_eq!((history[0].model.as_str(), history[0].requests, history[0].cost_micros), ("other", 1, 40));
        assert_eq!(history[0].hour, now(), "the hour it was settled in");
        // Without a USD limit an unpriced model costs nothing; a priced one its price.
        let tokens = key(Limits { token_limit: Some(1000), ..Default::default() });
        let s =
            settle(&l, tokens.id, Some(tokens.limits), None, &seen(200, reported("other", 1, 1, true), 0, true), at)
                .await;
        assert_eq!((s.metered.cost_micros, s.unpriced), (0, true));
        let s =
            settle(&l, tokens.id, Some(tokens.limits), None, &seen(200, reported("cheap", 1, 1, true), 0, true), at)
                .await;
        assert_eq!((s.metered.cost_micros, s.unpriced), (3, false));
        // A deleted key: its reservation is given back, nothing is recorded.
        let r = l.meters.admit(&usd, hold, at).unwrap().unwrap();
        let s = settle(&l, usd.id, None, Some(r), &seen(200, Reported::default(), 0, true), at).await;
        assert_eq!(s.metered.completion_tokens, 10, "charged its hold, for the metrics");
        let c = l.meters.snapshot(usd.id, ResetPeriod::Never, now()).unwrap();
        assert_eq!((c.requests, c.reserved_micros), (1, 0));
    }
}
