//! Management tokens for the admin API: roles, gateway scopes and expiry.

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
}
