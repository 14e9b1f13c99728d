//! Every management token, by hash: who a presented secret is, whether it is still
//! usable (revocation, expiry, idle timeout), and when its last use is worth writing.
//! Authenticating needs no query; last use is persisted lazily.

use std::collections::HashMap;

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use super::access::{AccessToken, Principal, Role};
use super::secret::SecretHash;

/// The literal token `--dev` accepts as an owner.
pub const DEV_TOKEN: &str = "test-token";

/// Last use is written at most this often per token.
const LAST_USED_GRANULARITY_SECS: i64 = 60;

/// A token as stored, with what the registry tracks about it.
#[derive(Debug, Clone)]
pub struct StoredToken {
    pub token: AccessToken,
    pub hash: SecretHash,
    /// The first characters of the secret, shown in lists; empty for the bootstrap token.
    pub prefix: String,
    pub last_used_at: Option<DateTime<Utc>>,
    /// Made by `PORTCULLIS_BOOTSTRAP_TOKEN` (retired when the variable changes).
    pub bootstrap: bool,
}

#[derive(Debug)]
struct Entry {
    stored: StoredToken,
    /// When the token was last used (or created), for the idle timeout.
    last_used: DateTime<Utc>,
    /// The last-use time storage has.
    persisted: Option<DateTime<Utc>>,
}

/// Every management token, by hash.
#[derive(Debug)]
pub struct TokenRegistry {
    by_hash: HashMap<SecretHash, Entry>,
    dev: bool,
    idle_timeout: Duration,
}

impl TokenRegistry {
    pub fn new(tokens: Vec<StoredToken>, dev: bool, idle_timeout: Duration) -> Self {
        let mut r = TokenRegistry { by_hash: HashMap::new(), dev, idle_timeout };
        for t in tokens {
            r.insert(t);
        }
        r
    }

    pub fn insert(&mut self, stored: StoredToken) {
        let last_used = stored.last_used_at.unwrap_or(stored.token.created_at);
        let persisted = stored.last_used_at;
        self.by_hash.insert(stored.hash, Entry { stored, last_used, persisted });
    }

    pub fn get(&self, hash: &SecretHash) -> Option<&StoredToken> {
        self.by_hash.get(hash).map(|e| &e.stored)
    }

    /// Whether any owner token was ever created (usable or not).
    pub fn has_owner(&self) -> bool {
        self.by_hash.values().any(|e| e.stored.token.role == Role::Owner)
    }

    /// Marks a token used now (a restored bootstrap token starts a fresh idle period).
    pub fn touch(&mut self, hash: &SecretHash, now: DateTime<Utc>) {
        if let Some(e) = self.by_hash.get_mut(hash) {
            e.last_used = now;
        }
    }

    /// The principal for a presented secret, if it is a usable token; records the use.
    pub fn authenticate(&mut self, presented: &str, now: DateTime<Utc>) -> Option<Principal> {
        if self.dev && presented == DEV_TOKEN {
            return Some(Principal { token_id: None, name: "dev".into(), role: Role::Owner, gateways: vec![] });
        }
        let e = self.by_hash.get_mut(&SecretHash::of(presented))?;
        let t = &e.stored.token;
        if !t.is_usable(now, e.last_used, self.idle_timeout) {
            return None;
        }
        e.last_used = now;
        Some(Principal { token_id: Some(t.id), name: t.name.clone(), role: t.role, gateways: t.gateways.clone() })
    }

    /// Every token with its last use, oldest first.
    pub fn list(&self) -> Vec<(StoredToken, DateTime<Utc>)> {
        let mut all: Vec<_> = self.by_hash.values().map(|e| (e.stored.clone(), e.last_used)).collect();
        all.sort_by_key(|(s, _)| s.token.id);
        all
    }

    pub fn find(&self, id: Uuid) -> Option<(StoredToken, DateTime<Utc>)> {
        self.by_hash.values().find(|e| e.stored.token.id == id).map(|e| (e.stored.clone(), e.last_used))
    }

    pub fn revoke(&mut self, id: Uuid, at: DateTime<Utc>) {
        if let Some(e) = self.by_hash.values_mut().find(|e| e.stored.token.id == id) {
            e.stored.token.revoked_at.get_or_insert(at);
        }
    }

    /// Whether a token authenticates at `now`, given its last use.
    pub fn usable(&self, token: &AccessToken, last_used: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        token.is_usable(now, last_used, self.idle_timeout)
    }

    /// Last-use times storage should learn: at most one write a minute per token, or
    /// every newer one when `all` (at shutdown). Confirm with `persisted` once written.
    pub fn last_used_to_write(&self, all: bool) -> Vec<(Uuid, DateTime<Utc>)> {
        let granularity = if all { Duration::zero() } else { Duration::seconds(LAST_USED_GRANULARITY_SECS) };
        self.by_hash
            .values()
            .filter(|e| e.last_used > e.stored.token.created_at)
            .filter(|e| e.persisted.is_none_or(|p| e.last_used - p > granularity || (all && e.last_used > p)))
            .map(|e| (e.stored.token.id, e.last_used))
            .collect()
    }

    /// Storage has these last-use times.
    pub fn persisted(&mut self, written: &[(Uuid, DateTime<Utc>)]) {
        for e in self.by_hash.values_mut() {
            if let Some((_, at)) = written.iter().find(|(id, _)| *id == e.stored.token.id) {
                e.persisted = Some(e.persisted.map_or(*at, |p| p.max(*at)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_use_is_written_at_most_once_a_minute_not_per_call() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let token = AccessToken {
            id: Uuid::now_v7(),
            name: "ci".into(),
            role: Role::Admin,
            gateways: vec![],
            created_at: t0,
            expires_at: None,
            revoked_at: None,
        };
        let secret = "pcm_example-secret-for-the-registry-test";
        let hash = SecretHash::of(secret);
        let mut r = TokenRegistry::new(
            vec![StoredToken { token, hash, prefix: "pcm_example-".into(), last_used_at: None, bootstrap: false }],
            false,
            Duration::hours(1),
        );
        assert!(r.last_used_to_write(false).is_empty(), "never used");
        r.authenticate(secret, t0 + Duration::seconds(1)).unwrap();
        let first = r.last_used_to_write(false);
        assert_eq!(first.len(), 1);
        r.persisted(&first);
        for s in [10, 20, 30, 60] {
            r.authenticate(secret, t0 + Duration::seconds(s)).unwrap();
            assert!(r.last_used_to_write(false).is_empty(), "no write for a call {s}s later");
        }
        assert_eq!(r.last_used_to_write(true).len(), 1, "shutdown writes the newest use");
        r.authenticate(secret, t0 + Duration::seconds(62)).unwrap();
        assert_eq!(r.last_used_to_write(false), vec![(first[0].0, t0 + Duration::seconds(62))]);
        // Not confirmed (the write failed): still due.
        assert_eq!(r.last_used_to_write(false).len(), 1);
    }
}
