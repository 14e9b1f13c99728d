//! Management tokens for the admin API: roles, gateway scopes and expiry.

use std::collections::HashMap;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};

use chrono::{DateTime, Duration, Utc};

use super::clock::Mono;
use uuid::Uuid;

use super::FieldError;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Role {
    Developer,
    Admin,
    Owner,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Developer => "developer",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "developer" => Some(Role::Developer),
            _ => None,
        }
    }

    /// What each role may do (SPEC §4): owners everything; admins gateways, keys, prices
    /// and audit; developers keys and usage, and reading gateways and prices.
    pub fn allows(self, action: Action) -> bool {
        use Action::*;
        match self {
            Role::Owner => true,
            Role::Admin => !matches!(action, ManageTokens),
            Role::Developer => matches!(action, ReadGateways | ReadKeys | WriteKeys | ReadPrices),
        }
    }
}

/// What an admin call does, for authorization.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    ReadGateways,
    WriteGateways,
    ReadKeys,
    WriteKeys,
    ReadPrices,
    WritePrices,
    ReadAudit,
    ManageTokens,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccessToken {
    pub id: Uuid,
    pub name: String,
    pub role: Role,
    /// Empty: every gateway.
    pub gateways: Vec<String>,
    pub created_at: DateTime<Utc>,
    pub expires_at: Option<DateTime<Utc>>,
    pub revoked_at: Option<DateTime<Utc>>,
}

impl AccessToken {
    /// Whether the token authenticates at `now`, last used at `last_used`.
    pub fn is_usable(&self, now: DateTime<Utc>, last_used: DateTime<Utc>, idle_timeout: Duration) -> bool {
        self.revoked_at.is_none() && self.expires_at.is_none_or(|e| e > now) && now - last_used < idle_timeout
    }
}

/// The bootstrap token is a secret the operator chooses: at least 32 characters (as hard
/// to guess as a generated token), and only visible ASCII so that it fits a header.
pub fn validate_bootstrap_secret(secret: &str) -> Result<(), FieldError> {
    if secret.len() < 32 || secret.len() > 512 || !secret.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(FieldError::new(
            "PORTCULLIS_BOOTSTRAP_TOKEN",
            "must be at least 32 and at most 512 visible ASCII characters without spaces (e.g. `openssl rand -hex 24`)",
        ));
    }
    Ok(())
}

/// One entry of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEvent {
    pub id: Uuid,
    pub at: DateTime<Utc>,
    pub token_id: Option<Uuid>,
    pub token_name: String,
    /// The RPC, e.g. `KeyService/UpdateKey`.
    pub action: String,
    pub gateway: Option<String>,
    pub target: String,
    /// `OK`, or `CODE: message`.
    pub result: String,
}

/// The most bytes an audit event keeps of any one value; longer values are cut (ending in
/// `…`), so no request, however large, makes a large row.
pub const AUDIT_VALUE_MAX_BYTES: usize = 256;

impl AuditEvent {
    /// The event with every value cut to [`AUDIT_VALUE_MAX_BYTES`].
    pub fn bounded(mut self) -> Self {
        for v in [&mut self.token_name, &mut self.action, &mut self.target, &mut self.result] {
            cut(v);
        }
        if let Some(g) = self.gateway.as_mut() {
            cut(g);
        }
        self
    }
}

/// A value the audit trail is filtered by (actor, target): stored values are at most
/// [`AUDIT_VALUE_MAX_BYTES`], so a longer one could never match whole.
pub fn validate_audit_filter(field: &'static str, v: &str) -> Result<(), FieldError> {
    if v.len() > AUDIT_VALUE_MAX_BYTES {
        return Err(FieldError::new(field, "must be at most 256 bytes"));
    }
    if v.chars().any(char::is_control) {
        return Err(FieldError::new(field, "must not contain control characters"));
    }
    Ok(())
}

/// An action the audit trail is filtered by: an RPC (`KeyService/UpdateKey`) or every RPC
/// of a service (`KeyService`).
pub fn validate_audit_action(v: &str) -> Result<(), FieldError> {
    let word = |w: &str| !w.is_empty() && w.len() <= 64 && w.bytes().all(|b| b.is_ascii_alphabetic());
    let ok = match v.split_once('/') {
        None => word(v),
        Some((service, rpc)) => word(service) && word(rpc),
    };
    if ok {
        Ok(())
    } else {
        Err(FieldError::new("action", "must be an RPC (KeyService/UpdateKey) or a service (KeyService)"))
    }
}

fn cut(s: &mut String) {
    const ELLIPSIS: &str = "…";
    if s.len() <= AUDIT_VALUE_MAX_BYTES {
        return;
    }
    let mut end = AUDIT_VALUE_MAX_BYTES - ELLIPSIS.len();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push_str(ELLIPSIS);
}

/// Whether to record a refused call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditAdmission {
    Record,
    /// Record it, saying that `skipped` refused calls since `since` were only counted.
    RecordWithSkipped {
        skipped: u64,
        since: DateTime<Utc>,
    },
    /// Count it only.
    Skip,
}

impl AuditAdmission {
    /// The note a recorded event carries about the calls counted before it.
    pub fn note(self) -> Option<String> {
        match self {
            AuditAdmission::RecordWithSkipped { skipped, since } => {
                Some(format!("(and {skipped} more since {}, not recorded one by one)", since.format("%Y-%m-%dT%H:%MZ")))
            }
            AuditAdmission::Record | AuditAdmission::Skip => None,
        }
    }
}

#[derive(Debug)]
struct Tally {
    minute: i64,
    recorded: u32,
    skipped: u64,
    skipped_since: Option<DateTime<Utc>>,
}

/// Refused calls are recorded one by one up to `per_minute` a minute per source (a token,
/// or all unauthenticated callers together); the rest are counted into the next one
/// recorded, so no caller can flood the trail (or the log) with refusals. Memory: one
/// small entry per source; sources with nothing pending are forgotten once the table
/// reaches `max_sources`.
#[derive(Debug)]
pub struct AuditRateLimit<K> {
    per_minute: u32,
    max_sources: usize,
    sources: HashMap<K, Tally>,
}

impl<K: Hash + Eq> AuditRateLimit<K> {
    pub fn new(per_minute: u32, max_sources: usize) -> Self {
        AuditRateLimit { per_minute, max_sources, sources: HashMap::new() }
    }

    pub fn admit(&mut self, source: K, now: DateTime<Utc>) -> AuditAdmission {
        let minute = now.timestamp().div_euclid(60);
        if !self.sources.contains_key(&source) && self.sources.len() >= self.max_sources {
            self.sources.retain(|_, t| t.skipped > 0 || t.minute == minute);
            if self.sources.len() >= self.max_sources {
                // Only reachable with more sources than tokens can exist; never grow.
                return AuditAdmission::Skip;
            }
        }
        let t = self.sources.entry(source).or_insert(Tally { minute, recorded: 0, skipped: 0, skipped_since: None });
        if t.minute != minute {
            t.minute = minute;
            t.recorded = 0;
        }
        if t.recorded >= self.per_minute {
            t.skipped = t.skipped.saturating_add(1);
            t.skipped_since.get_or_insert(now);
            return AuditAdmission::Skip;
        }
        t.recorded += 1;
        match t.skipped_since.take() {
            Some(since) => AuditAdmission::RecordWithSkipped { skipped: std::mem::take(&mut t.skipped), since },
            None => AuditAdmission::Record,
        }
    }
}

/// An allowance of events (failed guesses, writes): `burst` at once, then one more every
/// `interval` (GCRA: one timestamp, no timer), on the monotonic clock.
#[derive(Clone, Copy, Debug)]
struct Allowance {
    /// When the budget is whole again.
    full_at: Mono,
}

impl Allowance {
    fn new(now: Mono) -> Self {
        Allowance { full_at: now }
    }

    /// No event left: the allowance lacks more than `burst - 1` intervals.
    fn exhausted(&self, rate: Rate, now: Mono) -> bool {
        self.wait(rate, now) > 0
    }

    /// Microseconds until one more event is allowed (0: now).
    fn wait(&self, rate: Rate, now: Mono) -> i64 {
        let interval = rate.interval.num_microseconds().unwrap_or(i64::MAX);
        let window = interval.saturating_mul(i64::from(rate.burst.saturating_sub(1)));
        self.full_at.micros_since(now).saturating_sub(window).max(0)
    }

    fn spend(&mut self, rate: Rate, now: Mono) {
        self.full_at = self.full_at.max(now) + rate.interval;
    }

    fn whole(&self, now: Mono) -> bool {
        self.full_at <= now
    }
}

/// Writes through the admin API per management token: `rate.burst` at once, then one
/// every `rate.interval`, so that no token (a leaked one, a runaway script) grows the key
/// table or the audit trail faster than that. Memory: one timestamp per token that wrote
/// lately; at most `max_tokens` (those with a whole allowance are forgotten first).
#[derive(Debug)]
pub struct WriteRate {
    rate: Rate,
    max_tokens: usize,
    tokens: HashMap<Option<Uuid>, Allowance>,
}

impl WriteRate {
    pub fn new(rate: Rate, max_tokens: usize) -> Self {
        WriteRate { rate, max_tokens, tokens: HashMap::new() }
    }

    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Takes one write for `token` (`None`: the `--dev` token), or says how many whole
    /// seconds until it may write again.
    pub fn admit(&mut self, token: Option<Uuid>, now: Mono) -> Result<(), u64> {
        if !self.tokens.contains_key(&token) && self.tokens.len() >= self.max_tokens {
            self.tokens.retain(|_, a| !a.whole(now));
        }
        let a = self.tokens.entry(token).or_insert_with(|| Allowance::new(now));
        match a.wait(self.rate, now) {
            0 => {
                a.spend(self.rate, now);
                Ok(())
            }
            wait => Err(u64::try_from(wait).unwrap_or(0).div_ceil(1_000_000).max(1)),
        }
    }
}

/// `burst` events at once, then one every `interval`.
#[derive(Clone, Copy, Debug)]
pub struct Rate {
    pub burst: u32,
    pub interval: Duration,
}

#[derive(Debug)]
struct Peer {
    failures: Allowance,
    /// A valid token came from here recently: the global lockout spares this peer.
    trusted_until: Option<Mono>,
}

impl Peer {
    fn trusted(&self, now: Mono) -> bool {
        self.trusted_until.is_some_and(|t| t > now)
    }
}

/// Throttles failed management-token authentication.
///
/// Each client address (an IPv6 client by its /64) has a budget of failures; once it is
/// spent, every token from that address is refused without being looked up, even a valid
/// one, until the budget refills: an answer that depended on the token would let guessing
/// go on. A global budget caps failures from all addresses together (guessing spread over
/// many addresses); once it is spent, only addresses a valid token came from in the last
/// day are still heard, so a distributed flood cannot lock the owner out of an address
/// it already uses, and a lockout of one address never affects another. A success never
/// refills a budget (a valid low-privilege token must not buy guesses at an owner's).
/// Memory: at most `max_peers` addresses; addresses with a whole budget and no trust go
/// first, and a full table of throttled addresses leaves new ones to the global budget.
#[derive(Debug)]
pub struct AuthThrottle {
    per_peer: Rate,
    global_rate: Rate,
    global: Allowance,
    trust: Duration,
    max_peers: usize,
    peers: HashMap<IpAddr, Peer>,
}

/// What the throttle says about a presented token.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Look the token up.
    Verify,
    /// Refuse it unseen: this address (or, for an unknown address, everyone) failed too often.
    Throttled,
}

impl AuthThrottle {
    /// Per address: 10 failures, then one every 6 s. All addresses together: 100, then
    /// one every 600 ms. Trust in an address lasts a day; 10,000 addresses at most.
    pub fn new(now: Mono) -> Self {
        Self::with(
            Rate { burst: 10, interval: Duration::seconds(6) },
            Rate { burst: 100, interval: Duration::milliseconds(600) },
            Duration::days(1),
            10_000,
            now,
        )
    }

    pub fn with(per_peer: Rate, global: Rate, trust: Duration, max_peers: usize, now: Mono) -> Self {
        AuthThrottle {
            per_peer,
            global_rate: global,
            global: Allowance::new(now),
            trust,
            max_peers,
            peers: HashMap::new(),
        }
    }

    /// Whether a token presented from `addr` may be looked up.
    pub fn admit(&self, addr: Option<IpAddr>, now: Mono) -> Verdict {
        let peer = self.peers.get(&peer_key(addr));
        if peer.is_some_and(|p| p.failures.exhausted(self.per_peer, now)) {
            return Verdict::Throttled;
        }
        if self.global.exhausted(self.global_rate, now) && !peer.is_some_and(|p| p.trusted(now)) {
            return Verdict::Throttled;
        }
        Verdict::Verify
    }

    /// A presented token did not authenticate. Returns true when this failure spent the
    /// address's budget (the moment to log it, once).
    pub fn failed(&mut self, addr: Option<IpAddr>, now: Mono) -> bool {
        self.global.spend(self.global_rate, now);
        let (rate, key) = (self.per_peer, peer_key(addr));
        match self.peer_mut(key, now, false) {
            Some(p) => {
                p.failures.spend(rate, now);
                p.failures.exhausted(rate, now)
            }
            None => false,
        }
    }

    /// A valid token came from `addr`.
    pub fn succeeded(&mut self, addr: Option<IpAddr>, now: Mono) {
        let trust = now + self.trust;
        if let Some(p) = self.peer_mut(peer_key(addr), now, true) {
            p.trusted_until = Some(trust);
        }
    }

    /// The entry of `key`, made if there is room. `evict`: an address a valid token came
    /// from may take the place of a throttled untrusted one.
    fn peer_mut(&mut self, key: IpAddr, now: Mono, evict: bool) -> Option<&mut Peer> {
        if !self.peers.contains_key(&key) && self.peers.len() >= self.max_peers {
            self.peers.retain(|_, p| p.trusted(now) || !p.failures.whole(now));
            if self.peers.len() >= self.max_peers && evict {
                let victim = self.peers.iter().filter(|(_, p)| !p.trusted(now)).min_by_key(|(_, p)| p.failures.full_at);
                if let Some(victim) = victim.map(|(k, _)| *k) {
                    self.peers.remove(&victim);
                }
            }
            if self.peers.len() >= self.max_peers {
                return None;
            }
        }
        Some(self.peers.entry(key).or_insert_with(|| Peer { failures: Allowance::new(now), trusted_until: None }))
    }
}

/// The address a budget belongs to: IPv4 as is, IPv6 by its /64 (one subscriber holds a
/// whole /64), an unknown address as the unspecified one.
fn peer_key(addr: Option<IpAddr>) -> IpAddr {
    match addr.map(|a| a.to_canonical()) {
        Some(IpAddr::V6(v6)) => IpAddr::V6(Ipv6Addr::from(v6.to_bits() & !u128::from(u64::MAX))),
        Some(v4) => v4,
        None => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    }
}

/// Why a call is refused. The messages are the contract (SPEC §4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    Action,
    Gateway,
}

impl Refusal {
    pub fn message(self) -> &'static str {
        match self {
            Refusal::Action => "You don't have access to this action",
            Refusal::Gateway => "You don't have access to this gateway",
        }
    }
}

/// Who is calling: the authenticated token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `None` for the `--dev` token, which has no row.
    pub token_id: Option<Uuid>,
    pub name: String,
    pub role: Role,
    pub gateways: Vec<String>,
}

impl Principal {
    pub fn is_scoped(&self) -> bool {
        !self.gateways.is_empty()
    }

    pub fn reaches(&self, gateway: &str) -> bool {
        !self.is_scoped() || self.gateways.iter().any(|g| g == gateway)
    }

    /// May this principal do `action` (on `gateway`, when the call names one)?
    pub fn authorize(&self, action: Action, gateway: Option<&str>) -> Result<(), Refusal> {
        if !self.role.allows(action) {
            return Err(Refusal::Action);
        }
        match gateway {
            Some(g) if !self.reaches(g) => Err(Refusal::Gateway),
            _ => Ok(()),
        }
    }

    /// Actions that span every gateway (prices, audit without a gateway) need an unscoped token.
    pub fn authorize_global(&self, action: Action) -> Result<(), Refusal> {
        self.authorize(action, None)?;
        if self.is_scoped() { Err(Refusal::Gateway) } else { Ok(()) }
    }

    /// A token may only hand out (or revoke) what it holds itself: no higher role and no
    /// gateway beyond its own scope.
    pub fn may_manage(&self, role: Role, gateways: &[String]) -> Result<(), Refusal> {
        self.authorize(Action::ManageTokens, None)?;
        if role > self.role {
            return Err(Refusal::Action);
        }
        if self.is_scoped() && (gateways.is_empty() || !gateways.iter().all(|g| self.reaches(g))) {
            return Err(Refusal::Gateway);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::*;

    fn who(role: Role, gateways: &[&str]) -> Principal {
        Principal { token_id: None, name: "t".into(), role, gateways: gateways.iter().map(|g| g.to_string()).collect() }
    }

    #[test]
    fn role_table() {
        let all = [ReadGateways, WriteGateways, ReadKeys, WriteKeys, ReadPrices, WritePrices, ReadAudit, ManageTokens];
        let allowed = |r: Role| all.iter().filter(|a| r.allows(**a)).copied().collect::<Vec<_>>();
        assert_eq!(allowed(Role::Owner), all.to_vec());
        assert_eq!(
            allowed(Role::Admin),
            vec![ReadGateways, WriteGateways, ReadKeys, WriteKeys, ReadPrices, WritePrices, ReadAudit]
        );
        assert_eq!(allowed(Role::Developer), vec![ReadGateways, ReadKeys, WriteKeys, ReadPrices]);
    }

    #[test]
    fn scopes() {
        let dev = who(Role::Developer, &["alpha"]);
        assert_eq!(dev.authorize(WriteKeys, Some("alpha")), Ok(()));
        assert_eq!(dev.authorize(WriteKeys, Some("beta")), Err(Refusal::Gateway));
        assert_eq!(dev.authorize(WriteGateways, Some("alpha")), Err(Refusal::Action), "role before scope");
        assert_eq!(dev.authorize_global(ReadPrices), Err(Refusal::Gateway));
        assert_eq!(who(Role::Developer, &[]).authorize_global(ReadPrices), Ok(()));
        assert_eq!(Refusal::Gateway.message(), "You don't have access to this gateway");
    }

    #[test]
    fn tokens_cannot_escalate() {
        let owner = who(Role::Owner, &[]);
        assert_eq!(owner.may_manage(Role::Owner, &[]), Ok(()));
        let scoped = who(Role::Owner, &["alpha"]);
        assert_eq!(scoped.may_manage(Role::Developer, &["alpha".into()]), Ok(()));
        assert_eq!(scoped.may_manage(Role::Developer, &[]), Err(Refusal::Gateway), "unscoped is wider");
        assert_eq!(scoped.may_manage(Role::Developer, &["beta".into()]), Err(Refusal::Gateway));
        assert_eq!(who(Role::Admin, &[]).may_manage(Role::Developer, &[]), Err(Refusal::Action));
    }

    #[test]
    fn expiry_and_idle_timeout() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut t = AccessToken {
            id: Uuid::now_v7(),
            name: "t".into(),
            role: Role::Admin,
            gateways: vec![],
            created_at: t0,
            expires_at: Some(t0 + Duration::hours(2)),
            revoked_at: None,
        };
        let idle = Duration::hours(1);
        assert!(t.is_usable(t0 + Duration::minutes(59), t0, idle));
        assert!(!t.is_usable(t0 + Duration::hours(1), t0, idle), "idle for the whole timeout");
        assert!(t.is_usable(t0 + Duration::minutes(90), t0 + Duration::minutes(60), idle));
        assert!(!t.is_usable(t0 + Duration::hours(2), t0 + Duration::minutes(119), idle), "expires_at");
        t.revoked_at = Some(t0);
        assert!(!t.is_usable(t0, t0, idle));
    }

    #[test]
    fn audit_filters_are_bounded_and_actions_shaped() {
        assert!(validate_audit_action("KeyService").is_ok());
        assert!(validate_audit_action("KeyService/UpdateKey").is_ok());
        for bad in ["", "KeyService/", "/UpdateKey", "Key Service", "KeyService/Update/Key", "KeyService%"] {
            assert_eq!(validate_audit_action(bad).unwrap_err().field, "action", "{bad}");
        }
        assert!(validate_audit_filter("target", &"x".repeat(256)).is_ok());
        assert_eq!(validate_audit_filter("target", &"x".repeat(257)).unwrap_err().field, "target");
        assert_eq!(validate_audit_filter("actor", "a\nb").unwrap_err().field, "actor");
    }

    #[test]
    fn audit_values_are_cut_to_a_bound() {
        let long = "é".repeat(3 * 1024 * 1024);
        let e = AuditEvent {
            id: Uuid::now_v7(),
            at: DateTime::from_timestamp(0, 0).unwrap(),
            token_id: None,
            token_name: long.clone(),
            action: "KeyService/CreateKey".into(),
            gateway: Some(long.clone()),
            target: long.clone(),
            result: long,
        }
        .bounded();
        for v in [&e.token_name, e.gateway.as_ref().unwrap(), &e.target, &e.result] {
            assert!(v.len() <= AUDIT_VALUE_MAX_BYTES && v.ends_with('…'), "{}", v.len());
        }
        assert_eq!(e.action, "KeyService/CreateKey");
    }

    #[test]
    fn refusals_are_recorded_up_to_a_rate_per_source_then_counted() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut limit = AuditRateLimit::new(3, 100);
        for _ in 0..3 {
            assert_eq!(limit.admit("a", t0), AuditAdmission::Record);
        }
        for _ in 0..5 {
            assert_eq!(limit.admit("a", t0 + Duration::seconds(1)), AuditAdmission::Skip);
        }
        assert_eq!(limit.admit("b", t0), AuditAdmission::Record, "per source");
        let next = limit.admit("a", t0 + Duration::minutes(7));
        assert_eq!(next, AuditAdmission::RecordWithSkipped { skipped: 5, since: t0 + Duration::seconds(1) });
        assert_eq!(next.note().unwrap(), "(and 5 more since 2027-01-15T08:00Z, not recorded one by one)");
        assert_eq!(limit.admit("a", t0 + Duration::minutes(7)), AuditAdmission::Record, "reported once");
    }

    #[test]
    fn the_rate_limit_table_stays_bounded() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut limit = AuditRateLimit::new(1, 10);
        for i in 0..1000 {
            limit.admit(i, t0 + Duration::minutes(i));
            assert!(limit.sources.len() <= 10);
        }
    }

    fn ip(s: &str) -> Option<IpAddr> {
        Some(s.parse().unwrap())
    }

    #[test]
    fn failed_guesses_lock_one_address_until_its_budget_refills() {
        let t0 = Mono::from_micros(1_800_000_000_000_000);
        let rate = Rate { burst: 3, interval: Duration::seconds(10) };
        let mut t =
            AuthThrottle::with(rate, Rate { burst: 100, interval: Duration::seconds(1) }, Duration::days(1), 100, t0);
        let attacker = ip("192.0.2.7");
        for i in 0..3 {
            assert_eq!(t.admit(attacker, t0), Verdict::Verify, "guess {i}");
            assert_eq!(t.failed(attacker, t0), i == 2, "the third failure spends the budget");
        }
        assert_eq!(t.admit(attacker, t0), Verdict::Throttled);
        assert_eq!(t.admit(attacker, t0 + Duration::seconds(9)), Verdict::Throttled);
        assert_eq!(t.admit(ip("192.0.2.8"), t0), Verdict::Verify, "another address is unaffected");
        assert_eq!(t.admit(ip("2001:db8::1"), t0), Verdict::Verify);
        // One more guess every interval; the whole budget after the whole window.
        assert_eq!(t.admit(attacker, t0 + Duration::seconds(10)), Verdict::Verify);
        t.failed(attacker, t0 + Duration::seconds(10));
        assert_eq!(t.admit(attacker, t0 + Duration::seconds(10)), Verdict::Throttled);
        let later = t0 + Duration::seconds(50);
        for _ in 0..3 {
            assert_eq!(t.admit(attacker, later), Verdict::Verify);
            t.failed(attacker, later);
        }
        assert_eq!(t.admit(attacker, later), Verdict::Throttled);
        // A success does not refill it.
        t.succeeded(attacker, later);
        assert_eq!(t.admit(attacker, later), Verdict::Throttled);
    }

    #[test]
    fn writes_are_limited_per_token() {
        let t0 = Mono::from_micros(1_800_000_000_000_000);
        let mut w = WriteRate::new(Rate { burst: 3, interval: Duration::milliseconds(500) }, 2);
        let (a, b) = (Some(Uuid::now_v7()), Some(Uuid::now_v7()));
        for _ in 0..3 {
            assert_eq!(w.admit(a, t0), Ok(()));
        }
        assert_eq!(w.admit(a, t0), Err(1), "retry in a second (rounded up)");
        assert_eq!(w.admit(b, t0), Ok(()), "another token is unaffected");
        assert_eq!(w.admit(a, t0 + Duration::milliseconds(499)), Err(1));
        assert_eq!(w.admit(a, t0 + Duration::milliseconds(500)), Ok(()));
        // A third token finds the table full of tokens still spending: it still gets its own.
        assert_eq!(w.admit(None, t0 + Duration::milliseconds(500)), Ok(()));
        assert!(w.tokens.len() <= 3);
        assert_eq!(w.admit(Some(Uuid::now_v7()), t0 + Duration::hours(1)), Ok(()));
        assert_eq!(w.tokens.len(), 1, "whole allowances are forgotten when the table is full");
    }

    #[test]
    fn an_ipv6_client_is_one_address_per_64() {
        let t0 = Mono::from_micros(1_800_000_000_000_000);
        let rate = Rate { burst: 2, interval: Duration::seconds(10) };
        let mut t =
            AuthThrottle::with(rate, Rate { burst: 100, interval: Duration::seconds(1) }, Duration::days(1), 100, t0);
        t.failed(ip("2001:db8:0:1::1"), t0);
        t.failed(ip("2001:db8:0:1:ffff::2"), t0);
        assert_eq!(t.admit(ip("2001:db8:0:1::3"), t0), Verdict::Throttled);
        assert_eq!(t.admit(ip("2001:db8:0:2::1"), t0), Verdict::Verify);
        t.failed(ip("::ffff:192.0.2.1"), t0);
        t.failed(ip("192.0.2.1"), t0);
        assert_eq!(t.admit(ip("192.0.2.1"), t0), Verdict::Throttled, "IPv4-mapped is the IPv4 address");
    }

    #[test]
    fn a_distributed_flood_spares_addresses_a_valid_token_came_from() {
        let t0 = Mono::from_micros(1_800_000_000_000_000);
        let per_peer = Rate { burst: 3, interval: Duration::seconds(10) };
        let global = Rate { burst: 5, interval: Duration::seconds(1) };
        let mut t = AuthThrottle::with(per_peer, global, Duration::hours(24), 100, t0);
        let owner = ip("198.51.100.1");
        t.succeeded(owner, t0);
        for i in 0..5 {
            t.failed(ip(&format!("203.0.113.{i}")), t0);
        }
        assert_eq!(t.admit(ip("203.0.113.99"), t0), Verdict::Throttled, "new addresses wait out the flood");
        assert_eq!(t.admit(owner, t0), Verdict::Verify, "the owner's address is still heard");
        assert_eq!(t.admit(ip("203.0.113.99"), t0 + Duration::seconds(1)), Verdict::Verify, "one more a second");
        assert_eq!(t.admit(owner, t0 + Duration::hours(25)), Verdict::Verify);
    }

    #[test]
    fn the_address_table_stays_bounded() {
        let t0 = Mono::from_micros(1_800_000_000_000_000);
        let per_peer = Rate { burst: 1, interval: Duration::hours(1) };
        let global = Rate { burst: 1_000_000, interval: Duration::milliseconds(1) };
        let mut t = AuthThrottle::with(per_peer, global, Duration::hours(24), 10, t0);
        let owner = ip("198.51.100.1");
        for i in 0..1000u32 {
            t.failed(Some(IpAddr::V4(i.into())), t0);
            assert!(t.peers.len() <= 10);
        }
        t.succeeded(owner, t0);
        assert!(t.peers.len() <= 10 && t.peers.get(&owner.unwrap()).is_some_and(|p| p.trusted(t0)));
        for i in 1000..2000u32 {
            t.failed(Some(IpAddr::V4(i.into())), t0);
        }
        assert!(t.peers.contains_key(&owner.unwrap()), "trusted addresses are kept");
    }

    #[test]
    fn bootstrap_secrets_are_long_visible_ascii() {
        assert!(validate_bootstrap_secret(&"a".repeat(32)).is_ok());
        assert!(validate_bootstrap_secret("owner-token-for-tests-0123456789").is_ok());
        for bad in
            ["a".repeat(31), format!(" {}", "a".repeat(32)), format!("{}\u{e9}", "a".repeat(32)), "a".repeat(513)]
        {
            assert_eq!(validate_bootstrap_secret(&bad).unwrap_err().field, "PORTCULLIS_BOOTSTRAP_TOKEN");
        }
    }
}
