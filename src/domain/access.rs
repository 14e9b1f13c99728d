//! Management tokens for the admin API: roles, gateway scopes and expiry.

use std::collections::HashMap;
use std::hash::Hash;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

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
}
