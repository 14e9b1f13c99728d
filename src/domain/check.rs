//! The Check decision: a pure function of the view, the request and the clock.
//! Identify the gateway, find the key, check its status. Denials are data.

use std::sync::Arc;

use uuid::Uuid;

use super::asked::{Asked, AskedModel};
use super::budget::{BudgetDenial, DEFAULT_RESERVATION_TOKENS, Hold, MAX_RESERVATION_TOKENS, Meters, Ticket};
use super::clock::Now;
use super::counters::{Counters, InProcess, Outcome};
use super::estimate;
use super::gateway::Gateway;
use super::key::{ApiKey, KeyStatus};
use super::pricing::{PriceBook, cost_micros};
use super::request::{InvalidReason, RequestParts, extract_key};
use super::secret::{self, SecretHash, SecretKind, Shape};
use super::usage::BodyKind;
use super::view::View;
use super::window::Admission;

/// What a decision reads and updates: the counters that decide limits (in this process,
/// or shared by every replica), this process's usage ledger and last uses, and prices.
#[derive(Debug)]
pub struct Limiters {
    pub counters: Arc<dyn Counters>,
    /// Usage metered here (the ledger's increments), last use and denial of each key,
    /// and what this process knows of each key's usage.
    pub meters: Arc<Meters>,
    pub prices: std::sync::RwLock<PriceBook>,
}

impl Default for Limiters {
    fn default() -> Self {
        Limiters::in_process(Arc::default(), PriceBook::default())
    }
}

impl Limiters {
    /// Counters in this process (one replica).
    pub fn in_process(meters: Arc<Meters>, prices: PriceBook) -> Self {
        Limiters {
            counters: Arc::new(InProcess::new(Arc::clone(&meters))),
            meters,
            prices: std::sync::RwLock::new(prices),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// The route names no gateway, or one we do not know: an operator error.
    GatewayNotConfigured {
        name: String,
    },
    MissingKey,
    InvalidKey {
        reason: InvalidReason,
        key_id: Option<Uuid>,
    },
    /// The key's requests-per-minute window is full.
    RateLimited {
        key_id: Uuid,
        admission: Admission,
    },
    /// The key's token or USD budget for this period is used up.
    Budget {
        key_id: Uuid,
        denial: BudgetDenial,
        /// The key's requests-per-minute window, untouched, for the rate-limit headers.
        rpm: Option<Admission>,
    },
    /// A fault inside Portcullis: fail closed.
    Internal(&'static str),
}

impl Denial {
    /// The key the denial is about, when one was found.
    pub fn key_id(&self) -> Option<Uuid> {
        match self {
            Denial::InvalidKey { key_id, .. } => *key_id,
            Denial::RateLimited { key_id, .. } | Denial::Budget { key_id, .. } => Some(*key_id),
            Denial::MissingKey | Denial::GatewayNotConfigured { .. } | Denial::Internal(_) => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Admitted {
    pub gateway: Arc<Gateway>,
    pub key: Arc<ApiKey>,
    /// Present for keys with a requests-per-minute limit.
    pub rpm: Option<Admission>,
    /// The budget reservation metering settles (keys with a token or USD limit).
    pub reservation: Option<Ticket>,
}

#[derive(Debug, Clone)]
pub enum Decision {
    Allow(Admitted),
    Deny(Denial),
}

/// A request of a known, active key with limits: what is left to decide, by the counters.
#[derive(Debug, Clone)]
pub struct Pending {
    pub gateway: Arc<Gateway>,
    pub key: Arc<ApiKey>,
    /// What the request would hold against the key's budgets.
    pub ask: Hold,
}

/// The first step of a decision, under the view: either the decision, or a key with limits
/// for the counters to decide.
#[derive(Debug, Clone)]
pub enum Step {
    Done(Decision),
    Limit(Pending),
}

/// Identifies the gateway, finds the key and checks its status (on wall time). A key
/// without limits is admitted here (marked used); one with limits is left to [`limit`]
/// with what the request would reserve. A denial of a known key is noted for its Overview.
pub fn identify(view: &View, limiters: &Limiters, req: &RequestParts<'_>, at: Now) -> Step {
    let now = at.wall;
    let name = req.gateway.unwrap_or("");
    let Some(gateway) = view.gateway(name) else {
        return Step::Done(Decision::Deny(Denial::GatewayNotConfigured { name: name.to_string() }));
    };
    let invalid = |reason, key_id| Step::Done(Decision::Deny(Denial::InvalidKey { reason, key_id }));
    let presented = match extract_key(gateway, req.headers, req.path) {
        Ok(Some(presented)) => presented,
        Ok(None) => return Step::Done(Decision::Deny(Denial::MissingKey)),
        Err(reason) => return invalid(reason, None),
    };
    if secret::shape(&presented, SecretKind::ApiKey) == Shape::BadChecksum {
        return invalid(InvalidReason::Malformed, None);
    }
    let Some(key) = view.key_by_hash(&SecretHash::of(&presented), now) else {
        return invalid(InvalidReason::Unknown, None);
    };
    let limits = &key.limits;
    let meters = &limiters.meters;
    // A denial of a known key is noted for its Overview, with the key at hand.
    let refused = |reason: InvalidReason| {
        meters.note_denial(key.id, limits.reset_period, reason.as_str(), now);
        invalid(reason, Some(key.id))
    };
    if key.gateway_id != gateway.id {
        return refused(InvalidReason::OtherGateway);
    }
    match key.status(now) {
        KeyStatus::Active => {}
        KeyStatus::Disabled => return refused(InvalidReason::Disabled),
        KeyStatus::Expired => return refused(InvalidReason::Expired),
    }
    let budgeted = limits.token_limit.is_some() || limits.cost_limit_micros.is_some();
    if !budgeted && limits.requests_per_minute.is_none() {
        meters.touch(key.id, limits.reset_period, at);
        let admitted = Admitted { gateway: Arc::clone(gateway), key: Arc::clone(key), rpm: None, reservation: None };
        return Step::Done(Decision::Allow(admitted));
    }
    let ask = if budgeted {
        reservation_for(gateway, limits.cost_limit_micros.is_some(), req, limiters)
    } else {
        Hold::default()
    };
    Step::Limit(Pending { gateway: Arc::clone(gateway), key: Arc::clone(key), ask })
}

/// Decides the limits of a key that has some, with the counters (one step, all or none):
/// budgets (reserving for this request) and the requests-per-minute window. An admission
/// marks the key used; a denial is noted for its Overview.
pub async fn limit(limiters: &Limiters, p: Pending, at: Now) -> Decision {
    let Pending { gateway, key, ask } = p;
    let outcome = limiters.counters.admit(&key, ask, at).await;
    let meters = &limiters.meters;
    let reset_period = key.limits.reset_period;
    match outcome {
        Ok(Outcome::Admitted { rpm, reservation }) => {
            meters.touch(key.id, reset_period, at);
            Decision::Allow(Admitted { gateway, key, rpm, reservation })
        }
        Ok(Outcome::RateLimited(admission)) => {
            meters.note_denial(key.id, reset_period, "rate_limit_exceeded", at.wall);
            Decision::Deny(Denial::RateLimited { key_id: key.id, admission })
        }
        Ok(Outcome::Budget { denial, rpm }) => {
            meters.note_denial(key.id, reset_period, denial.reason(), at.wall);
            Decision::Deny(Denial::Budget { key_id: key.id, denial, rpm })
        }
        Err(unavailable) => Decision::Deny(Denial::Internal(unavailable.0)),
    }
}

/// What an in-flight request holds against budgets (see [`Asked`]): nothing for a read
/// (`GET`, `HEAD`, `DELETE`, `OPTIONS`) or an empty body; else its prompt estimate
/// plus its output cap (the largest it names; else the gateway default, else
/// `DEFAULT_RESERVATION_TOKENS`; at least the default when the body could not be read
/// whole) for each choice it asks for, at most `MAX_RESERVATION_TOKENS`; and, for a cost
/// limit, those tokens at the requested model's prices, or at the highest prices of the
/// book when the model is unnamed, unpriced or named twice. `Meters::admit` caps both at
/// what the key can still use.
fn reservation_for(gateway: &Gateway, cost_limited: bool, req: &RequestParts<'_>, limiters: &Limiters) -> Hold {
    let declared = req.headers.get("content-length").and_then(|v| v.trim().parse::<u64>().ok());
    // Reads (listing models, fetching a file or a batch) and empty bodies generate
    // nothing: they hold nothing, so a response without usage is charged nothing.
    let method = req.headers.get(":method");
    let method = method.as_deref().unwrap_or("");
    let reads = matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if reads || (req.body.is_empty() && declared == Some(0)) {
        return Hold::default();
    }
    // Bytes Envoy did not send count as prompt only in a JSON body (not an upload).
    let json =
        req.headers.get("content-type").is_none_or(|ct| matches!(BodyKind::of(&ct), BodyKind::Json | BodyKind::Unsaid));
    let asked = Asked::read(req.body, declared.filter(|_| json));
    let default = Some(gateway.default_reservation_tokens).filter(|&t| t > 0).unwrap_or(DEFAULT_RESERVATION_TOKENS);
    let cap = match asked.output_cap {
        Some(cap) if asked.unreadable => cap.max(default),
        Some(cap) => cap,
        None => default,
    };
    let output = cap.saturating_mul(asked.choices).min(MAX_RESERVATION_TOKENS);
    let prompt_tokens = estimate::tokens(asked.prompt_bytes).min(MAX_RESERVATION_TOKENS);
    let micros = if cost_limited {
        limiters.prices.read().ok().map_or(0, |book| {
            let price = match &asked.model {
                AskedModel::One(model) => book.lookup(model).or(book.highest()),
                AskedModel::Unnamed | AskedModel::Several => book.highest(),
            };
            price.map_or(0, |p| cost_micros(p, prompt_tokens, output))
        })
    } else {
        0
    };
    Hold { tokens: prompt_tokens.saturating_add(output).min(MAX_RESERVATION_TOKENS), micros, prompt_tokens }
}

#[cfg(test)]
mod tests {
    use chrono::{Duration, TimeZone, Utc};

    use std::collections::HashMap;

    use super::*;
    use crate::domain::clock::{Clock, ManualClock};
    use crate::domain::counters::now_or_never;

    /// One request decided as the Check does: [`identify`], then [`limit`].
    async fn decide(view: &View, limiters: &Limiters, req: &RequestParts<'_>, at: Now) -> Decision {
        match identify(view, limiters, req, at) {
            Step::Done(d) => d,
            Step::Limit(p) => limit(limiters, p, at).await,
        }
    }
    use crate::domain::gateway::{DEFAULT_KEY_NAME, InboundAuth, KeyLocation, UpstreamAuth};
    use crate::domain::key::{Limits, NewKey};
    use crate::domain::request::strip_bearer;
    use crate::domain::secret::Secret;
    use crate::domain::view::KeySecret;

    struct Fixture {
        view: View,
        limiters: Limiters,
        clock: ManualClock,
        secret: Secret,
        key_id: Uuid,
    }

    fn gateway(name: &str, inbound: InboundAuth) -> Gateway {
        Gateway {
            id: Uuid::now_v7(),
            name: name.into(),
            inbound,
            upstream: None,
            default_reservation_tokens: 0,
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    fn fixture(inbound: InboundAuth) -> Fixture {
        let clock = ManualClock::new(Utc.with_ymd_and_hms(2026, 2, 1, 0, 0, 0).unwrap());
        let demo = gateway("demo", inbound);
        let other = gateway("other", InboundAuth::default());
        let secret = Secret::generate(SecretKind::ApiKey);
        let kind = NewKey::Managed { limits: Limits::default(), expires_at: Some(clock.now() + Duration::hours(1)) };
        let key = ApiKey::new(demo.id, "token-user01", secret.expose(), kind, clock.now());
        let key_id = key.id;
        let view = View::new(vec![demo, other], vec![(key, vec![KeySecret::current(secret.hash())])]);
        Fixture { view, limiters: Limiters::default(), clock, secret, key_id }
    }

    fn run(f: &Fixture, gateway: Option<&str>, headers: &[(&str, &str)], path: &str) -> Decision {
        let headers: HashMap<String, String> = headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let req = RequestParts { gateway, headers: &headers, path, body: b"" };
        now_or_never(decide(&f.view, &f.limiters, &req, f.clock.read())).expect("in-process counters answer at once")
    }

    fn denial(d: Decision) -> Denial {
        match d {
            Decision::Deny(d) => d,
            Decision::Allow(a) => panic!("expected a denial, got an allow for key {}", a.key.id),
        }
    }

    #[test]
    fn active_key_in_default_header_is_admitted() {
        let f = fixture(InboundAuth::default());
        match run(&f, Some("demo"), &[(DEFAULT_KEY_NAME, f.secret.expose())], "/v1/chat/completions") {
            Decision::Allow(a) => {
                assert_eq!(a.key.id, f.key_id);
                assert_eq!(a.gateway.name, "demo");
            }
            Decision::Deny(d) => panic!("denied: {d:?}"),
        }
    }

    #[test]
    fn bearer_prefix_and_spaces_are_stripped() {
        assert_eq!(strip_bearer("Bearer abc"), "abc");
        assert_eq!(strip_bearer("  bEaReR   abc  "), "abc");
        assert_eq!(strip_bearer("abc"), "abc");
        assert_eq!(strip_bearer("Bearer"), "");
        assert_eq!(strip_bearer("Bearer\tabc"), "abc");
        assert_eq!(strip_bearer("Bearer "), "");
        assert_eq!(strip_bearer("Bearerabc"), "Bearerabc");
        let f = fixture(InboundAuth::new("Authorization", KeyLocation::Header).unwrap());
        let value = format!("BEARER {}", f.secret.expose());
        assert!(matches!(run(&f, Some("demo"), &[("authorization", &value)], "/"), Decision::Allow(_)));
    }

    #[test]
    fn missing_and_blank_keys() {
        let f = fixture(InboundAuth::default());
        assert_eq!(denial(run(&f, Some("demo"), &[], "/")), Denial::MissingKey);
        assert_eq!(denial(run(&f, Some("demo"), &[("x-api-key", "  ")], "/")), Denial::MissingKey);
        assert_eq!(denial(run(&f, Some("demo"), &[("x-api-key", "Bearer ")], "/")), Denial::MissingKey);
        // The key in another header does not count.
        let d = run(&f, Some("demo"), &[("authorization", f.secret.expose())], "/");
        assert_eq!(denial(d), Denial::MissingKey);
    }

    #[test]
    fn unknown_gateway_fails_closed() {
        let f = fixture(InboundAuth::default());
        let h = [("x-api-key", f.secret.expose())];
        assert_eq!(denial(run(&f, Some("nope"), &h, "/")), Denial::GatewayNotConfigured { name: "nope".into() });
        assert_eq!(denial(run(&f, None, &h, "/")), Denial::GatewayNotConfigured { name: "".into() });
    }

    #[test]
    fn invalid_keys_say_why() {
        let f = fixture(InboundAuth::default());
        let reason = |d: Decision| match denial(d) {
            Denial::InvalidKey { reason, .. } => reason,
            other => panic!("{other:?}"),
        };
        let mut typo = f.secret.expose().to_string();
        typo.replace_range(10..11, if &typo[10..11] == "x" { "y" } else { "x" });
        assert_eq!(reason(run(&f, Some("demo"), &[("x-api-key", &typo)], "/")), InvalidReason::Malformed);
        let stranger = Secret::generate(SecretKind::ApiKey);
        assert_eq!(reason(run(&f, Some("demo"), &[("x-api-key", stranger.expose())], "/")), InvalidReason::Unknown);
        assert_eq!(
            reason(run(&f, Some("other"), &[("x-api-key", f.secret.expose())], "/")),
            InvalidReason::OtherGateway
        );
    }

    #[test]
    fn status_changes_apply_to_the_next_decision() {
        let mut f = fixture(InboundAuth::default());
        let h = [("x-api-key", f.secret.expose().to_string())];
        let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (*a, b.as_str())).collect();
        let mut key = (**f.view.key_by_hash(&f.secret.hash(), f.clock.now()).unwrap()).clone();
        key.enabled = false;
        f.view.replace_key(key.clone());
        assert!(matches!(
            denial(run(&f, Some("demo"), &h, "/")),
            Denial::InvalidKey { reason: InvalidReason::Disabled, key_id: Some(id) } if id == f.key_id
        ));
        key.enabled = true;
        f.view.replace_key(key);
        assert!(matches!(run(&f, Some("demo"), &h, "/"), Decision::Allow(_)));
        f.clock.advance(Duration::hours(1));
        assert!(matches!(
            denial(run(&f, Some("demo"), &h, "/")),
            Denial::InvalidKey { reason: InvalidReason::Expired, .. }
        ));
        f.view.remove_key(f.key_id);
        assert!(matches!(
            denial(run(&f, Some("demo"), &h, "/")),
            Denial::InvalidKey { reason: InvalidReason::Unknown, .. }
        ));
    }

    #[test]
    fn requests_per_minute_are_enforced_after_status() {
        let mut f = fixture(InboundAuth::default());
        let h = [("x-api-key", f.secret.expose().to_string())];
        let h: Vec<(&str, &str)> = h.iter().map(|(a, b)| (*a, b.as_str())).collect();
        let mut key = (**f.view.key_by_hash(&f.secret.hash(), f.clock.now()).unwrap()).clone();
        key.limits.requests_per_minute = Some(2);
        f.view.replace_key(key.clone());
        for remaining in [1, 0] {
            match run(&f, Some("demo"), &h, "/") {
                Decision::Allow(a) => assert_eq!(a.rpm.map(|r| (r.limit, r.remaining)), Some((2, remaining))),
                Decision::Deny(d) => panic!("{d:?}"),
            }
        }
        f.clock.advance(Duration::seconds(20));
        match denial(run(&f, Some("demo"), &h, "/")) {
            Denial::RateLimited { key_id, admission } => {
                assert_eq!(key_id, f.key_id);
                assert_eq!(admission.retry_after_secs(), 40);
            }
            other => panic!("{other:?}"),
        }
        // A disabled key is refused as invalid, and uses no slot.
        key.enabled = false;
        f.view.replace_key(key.clone());
        assert!(matches!(denial(run(&f, Some("demo"), &h, "/")), Denial::InvalidKey { .. }));
        key.enabled = true;
        f.view.replace_key(key);
        f.clock.advance(Duration::seconds(40));
        assert!(matches!(run(&f, Some("demo"), &h, "/"), Decision::Allow(_)));
        let key = f.view.key_by_hash(&f.secret.hash(), f.clock.now()).unwrap();
        let usage = now_or_never(f.limiters.counters.usage(key, f.clock.read())).unwrap().unwrap();
        assert_eq!(usage.requests_last_minute, 1, "the first two left the window");
    }

    #[test]
    fn query_parameter_location() {
        let f = fixture(InboundAuth::new("api_key", KeyLocation::Query).unwrap());
        let path = format!("/v1/chat/completions?x=1&api_key={}&y=2", f.secret.expose());
        assert!(matches!(run(&f, Some("demo"), &[], &path), Decision::Allow(_)));
        // A header of the same name is not the query parameter.
        assert_eq!(denial(run(&f, Some("demo"), &[("api_key", f.secret.expose())], "/")), Denial::MissingKey);
        assert_eq!(denial(run(&f, Some("demo"), &[], "/v1?api_key=")), Denial::MissingKey);
        assert_eq!(denial(run(&f, Some("demo"), &[], "/v1?api_keyx=1")), Denial::MissingKey);
    }

    fn reason(d: Decision) -> InvalidReason {
        match denial(d) {
            Denial::InvalidKey { reason, key_id: None } => reason,
            other => panic!("expected an invalid key before any lookup, got {other:?}"),
        }
    }

    #[test]
    fn query_names_that_only_decode_to_the_key_name_are_refused() {
        let f = fixture(InboundAuth::new("api_key", KeyLocation::Query).unwrap());
        let k = f.secret.expose();
        for query in [
            format!("api%5Fkey={k}"),
            format!("api%5fkey={k}"),
            format!("API_KEY={k}"),
            format!("Api_Key={k}"),
            format!("api_key+={k}"),
            format!("%20api_key={k}"),
            format!("api%255Fkey={k}"),
            format!("api_\u{212A}ey={k}"),
            format!("x=1;api_key={k}"),
            // The literal name too, beside a disguised one that Envoy would leave.
            format!("api_key={k}&api%5Fkey={k}"),
            format!("api_key={k};api_key={k}"),
            format!("api%25252525255Fkey={k}"),
        ] {
            let path = format!("/v1/chat/completions?{query}");
            assert_eq!(reason(run(&f, Some("demo"), &[], &path)), InvalidReason::DisguisedName, "{query}");
        }
        // Other names are other parameters.
        let path = format!("/v1?api_key={k}&api_keys=1&my_api_key=2&api%5Fkey2=3");
        assert!(matches!(run(&f, Some("demo"), &[], &path), Decision::Allow(_)));
    }

    #[test]
    fn the_key_parameter_twice_is_refused() {
        let f = fixture(InboundAuth::new("api_key", KeyLocation::Query).unwrap());
        let k = f.secret.expose();
        for query in
            [format!("api_key={k}&api_key={k}"), format!("api_key=x&api_key={k}"), format!("api_key={k}&api_key")]
        {
            let path = format!("/v1?{query}");
            assert_eq!(reason(run(&f, Some("demo"), &[], &path)), InvalidReason::Repeated, "{query}");
        }
    }

    #[test]
    fn a_key_also_elsewhere_in_the_request_is_refused() {
        let f = fixture(InboundAuth::new("api_key", KeyLocation::Query).unwrap());
        let k = f.secret.expose();
        let other = Secret::generate(SecretKind::ApiKey);
        let path = format!("/v1?api_key={k}");
        for (name, value) in [
            ("api_key", k.to_string()),
            ("authorization", format!("Bearer {k}")),
            ("x-api-key", k.to_string()),
            ("x-forwarded-for", format!("1.2.3.4, {k}")),
            ("x-other", other.expose().to_string()),
        ] {
            let d = run(&f, Some("demo"), &[(name, value.as_str())], &path);
            assert_eq!(reason(d), InvalidReason::AlsoElsewhere, "{name}");
        }
        for path in [
            format!("/v1?api_key={k}&note={k}"),
            format!("/v1/{k}?api_key={k}"),
            format!("/v1?api_key={k}&q=pcs%5F{}", &k[4..]),
            format!("/v1?api_key={k}&q={}", other.expose()),
            format!("/v1?api_key={k}#{k}"),
        ] {
            assert_eq!(reason(run(&f, Some("demo"), &[], &path)), InvalidReason::AlsoElsewhere, "{path}");
        }
        // Envoy's `:path` is the URL itself; a mistyped key elsewhere is no key.
        let mut typo = other.expose().to_string();
        typo.replace_range(10..11, if &typo[10..11] == "x" { "y" } else { "x" });
        let h = [(":path", path.as_str()), ("x-note", typo.as_str())];
        assert!(matches!(run(&f, Some("demo"), &h, &path), Decision::Allow(_)));
    }

    #[test]
    fn a_key_header_sent_twice_is_refused() {
        let f = fixture(InboundAuth::default());
        let k = f.secret.expose();
        // What Envoy sends for a header given twice: the values joined with `,`.
        for value in [format!("{k},{k}"), format!("{k}, {k}"), format!("{k},"), format!("Bearer {k},Bearer x")] {
            let d = run(&f, Some("demo"), &[("x-api-key", value.as_str())], "/");
            assert_eq!(reason(d), InvalidReason::Repeated, "{value}");
        }
    }

    #[test]
    fn a_header_key_also_in_another_header_or_the_url_is_refused() {
        let mut f = fixture(InboundAuth::default());
        let k = f.secret.expose().to_string();
        let bearer = format!("Bearer {k}");
        let h = [("x-api-key", k.as_str()), ("authorization", bearer.as_str())];
        assert_eq!(reason(run(&f, Some("demo"), &h, "/")), InvalidReason::AlsoElsewhere);
        let path = format!("/v1?key={k}");
        assert_eq!(reason(run(&f, Some("demo"), &[("x-api-key", &k)], &path)), InvalidReason::AlsoElsewhere);
        // Envoy overwrites the provider-key header: a copy there never reaches the provider.
        let mut demo = (**f.view.gateway("demo").unwrap()).clone();
        demo.upstream = Some(UpstreamAuth::new("authorization", "Bearer sk-provider").unwrap());
        f.view.upsert_gateway(demo);
        assert!(matches!(run(&f, Some("demo"), &h, "/"), Decision::Allow(_)));
    }

    fn with_limits(f: &mut Fixture, limits: Limits) -> Vec<(&'static str, String)> {
        let mut key = (**f.view.key_by_hash(&f.secret.hash(), f.clock.now()).unwrap()).clone();
        key.limits = limits;
        f.view.replace_key(key);
        vec![("x-api-key", f.secret.expose().to_string())]
    }

    fn run_body(f: &Fixture, h: &[(&str, String)], body: &[u8]) -> Decision {
        let headers: HashMap<String, String> = h.iter().map(|(k, v)| (k.to_string(), v.clone())).collect();
        let req = RequestParts { gateway: Some("demo"), headers: &headers, path: "/", body };
        now_or_never(decide(&f.view, &f.limiters, &req, f.clock.read())).expect("in-process counters answer at once")
    }

    fn reserved(f: &Fixture) -> u64 {
        let period = crate::domain::key::ResetPeriod::Never;
        f.limiters.meters.snapshot(f.key_id, period, f.clock.now()).unwrap().reserved_tokens
    }

    #[test]
    fn a_wall_clock_step_does_not_free_window_slots() {
        let mut f = fixture(InboundAuth::default());
        let h = with_limits(&mut f, Limits { requests_per_minute: Some(1), ..Default::default() });
        assert!(matches!(run_body(&f, &h, b""), Decision::Allow(_)));
        // NTP steps the wall clock 2 minutes forward (still before the key expires).
        f.clock.set(f.clock.now() + Duration::minutes(2));
        assert!(matches!(denial(run_body(&f, &h, b"")), Denial::RateLimited { .. }), "one second has not passed");
        // And back an hour: the slot does not stay taken longer either.
        f.clock.set(f.clock.now() - Duration::hours(1));
        f.clock.advance(Duration::seconds(60));
        assert!(matches!(run_body(&f, &h, b""), Decision::Allow(_)), "60 s of elapsed time");
    }

    #[test]
    fn a_request_without_max_tokens_still_reserves_for_budgeted_keys() {
        let mut f = fixture(InboundAuth::default());
        let h = with_limits(&mut f, Limits { token_limit: Some(1_000_000), ..Default::default() });
        assert!(matches!(run_body(&f, &h, br#"{"model":"m"}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), DEFAULT_RESERVATION_TOKENS, "the gateway default is 0: the built-in default");
        // `max_tokens: 0` is no way around it.
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":0}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), 2 * DEFAULT_RESERVATION_TOKENS);
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":7}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), 2 * DEFAULT_RESERVATION_TOKENS + 7);
        // Capped at what the key can still use; the next request is refused while it is held.
        let h = with_limits(&mut f, Limits { token_limit: Some(8_200), ..Default::default() });
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":18446744073709551615}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), 8_200);
        assert!(matches!(denial(run_body(&f, &h, b"")), Denial::Budget { .. }));
    }

    #[test]
    fn an_absurd_max_tokens_reserves_at_most_the_ceiling_on_a_usd_only_key() {
        let mut f = fixture(InboundAuth::default());
        let h = with_limits(&mut f, Limits { cost_limit_micros: Some(1_000_000), ..Default::default() });
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":18446744073709551615}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), MAX_RESERVATION_TOKENS, "no token limit to cap it: the ceiling does");
    }

    fn reserved_micros(f: &Fixture) -> i64 {
        let period = crate::domain::key::ResetPeriod::Never;
        f.limiters.meters.snapshot(f.key_id, period, f.clock.now()).unwrap().reserved_micros
    }

    #[test]
    fn a_reservation_holds_the_prompt_and_every_choice() {
        let mut f = fixture(InboundAuth::default());
        let h = with_limits(&mut f, Limits { token_limit: Some(1_000_000), ..Default::default() });
        // 40 bytes of prompt text: 10 tokens; 3 choices of at most 100.
        let body = format!(r#"{{"max_tokens":100,"n":3,"messages":[{{"content":"{}"}}]}}"#, "a".repeat(40));
        assert!(matches!(run_body(&f, &h, body.as_bytes()), Decision::Allow(_)));
        assert_eq!(reserved(&f), 10 + 300);
        // A cap written as a float or a string is a cap all the same.
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":1e4}"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), 310 + 10_000);
        // A body that cannot be read whole reserves at least the default.
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":5,"messages":[{"#), Decision::Allow(_)));
        assert_eq!(reserved(&f), 10_310 + DEFAULT_RESERVATION_TOKENS);
    }

    #[test]
    fn a_usd_only_key_reserves_at_the_highest_price_when_the_model_is_unpriced() {
        let mut f = fixture(InboundAuth::default());
        let h = with_limits(&mut f, Limits { cost_limit_micros: Some(1_000_000), ..Default::default() });
        {
            let mut book = f.limiters.prices.write().unwrap();
            let p = |i, o| crate::domain::pricing::Price { input_micros_per_million: i, output_micros_per_million: o };
            book.set("cheap".into(), p(1_000_000, 2_000_000));
            book.set("dear".into(), p(10_000_000, 30_000_000));
        }
        // 1000 output tokens at $2 per million: 2,000 micro-USD.
        assert!(matches!(run_body(&f, &h, br#"{"model":"cheap","max_tokens":1000}"#), Decision::Allow(_)));
        assert_eq!(reserved_micros(&f), 2_000);
        // Unpriced, unnamed, or two names: at $30 per million, the book's highest.
        for body in [
            &br#"{"model":"unpriced","max_tokens":1000}"#[..],
            br#"{"max_tokens":1000}"#,
            br#"{"model":"cheap","model":"dear","max_tokens":1000}"#,
        ] {
            let before = reserved_micros(&f);
            assert!(matches!(run_body(&f, &h, body), Decision::Allow(_)));
            assert_eq!(reserved_micros(&f) - before, 30_000, "{}", String::from_utf8_lossy(body));
        }
        // So concurrency is bounded: the budget holds about 1,000,000 / 30,000 of them.
        let mut admitted = 4;
        while matches!(run_body(&f, &h, br#"{"model":"unpriced","max_tokens":1000}"#), Decision::Allow(_)) {
            admitted += 1;
            assert!(admitted < 100, "unbounded");
        }
        assert_eq!(admitted, 35);
    }

    #[test]
    fn reads_and_empty_bodies_hold_nothing_and_uploads_only_what_arrived() {
        let mut f = fixture(InboundAuth::default());
        let mut h = with_limits(&mut f, Limits { token_limit: Some(1_000_000), ..Default::default() });
        h.push((":method", "GET".into()));
        assert!(matches!(run_body(&f, &h, b""), Decision::Allow(_)));
        assert_eq!(reserved(&f), 0, "GET /v1/models");
        h.pop();
        h.push((":method", "POST".into()));
        h.push(("content-length", "0".into()));
        assert!(matches!(run_body(&f, &h, b""), Decision::Allow(_)));
        assert_eq!(reserved(&f), 0, "an empty POST");
        h.pop();
        // Envoy not sending the body: the default is held.
        h.push(("content-length", "300".into()));
        assert!(matches!(run_body(&f, &h, b""), Decision::Allow(_)));
        assert_eq!(reserved(&f), 75 + DEFAULT_RESERVATION_TOKENS, "300 unsent bytes of JSON: 75 tokens");
        // A 10 MB upload: only what arrived is read, nothing of the rest counts as prompt.
        h.pop();
        h.push(("content-length", "10000000".into()));
        h.push(("content-type", "multipart/form-data; boundary=x".into()));
        assert!(matches!(run_body(&f, &h, b"--x\r\n"), Decision::Allow(_)));
        assert_eq!(reserved(&f), 75 + 2 * DEFAULT_RESERVATION_TOKENS);
    }

    fn last_denial(f: &Fixture, period: crate::domain::key::ResetPeriod) -> Option<String> {
        f.limiters.meters.snapshot(f.key_id, period, f.clock.now()).unwrap().last_deny_reason
    }

    #[test]
    fn a_denial_of_a_known_key_is_noted_by_the_decision_itself() {
        let mut f = fixture(InboundAuth::default());
        let h =
            with_limits(&mut f, Limits { requests_per_minute: Some(1), token_limit: Some(10), ..Default::default() });
        let period = crate::domain::key::ResetPeriod::Never;
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":5}"#), Decision::Allow(_)));
        assert_eq!(last_denial(&f, period), None);
        assert!(matches!(denial(run_body(&f, &h, br#"{"max_tokens":1}"#)), Denial::RateLimited { .. }));
        assert_eq!(last_denial(&f, period).as_deref(), Some("rate_limit_exceeded"));
        assert_eq!(reserved(&f), 5, "the refused request's reservation was given back");
        f.clock.advance(Duration::seconds(60));
        assert!(matches!(run_body(&f, &h, br#"{"max_tokens":5}"#), Decision::Allow(_)));
        assert!(matches!(denial(run_body(&f, &h, br#"{"max_tokens":5}"#)), Denial::Budget { .. }));
        assert_eq!(last_denial(&f, period).as_deref(), Some("token_limit_exceeded"));
        let mut key = (**f.view.key_by_hash(&f.secret.hash(), f.clock.now()).unwrap()).clone();
        key.enabled = false;
        f.view.replace_key(key);
        assert!(matches!(denial(run_body(&f, &h, b"")), Denial::InvalidKey { .. }));
        assert_eq!(last_denial(&f, period).as_deref(), Some("disabled"));
    }
}
