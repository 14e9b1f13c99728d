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

impl StoredToken {
    /// A new unscoped owner token that never expires, named `name`.
    pub fn owner(name: &str, hash: SecretHash, prefix: String, bootstrap: bool, now: DateTime<Utc>) -> StoredToken {
        let token = AccessToken {
            id: Uuid::now_v7(),
            name: name.to_string(),
            role: Role::Owner,
            gateways: vec![],
            created_at: now,
            expires_at: None,
            revoked_at: None,
        };
        StoredToken { token, hash, prefix, last_used_at: None, bootstrap }
    }

    /// The bootstrap token the variable names (its secret chosen, so no prefix is kept:
    /// the first characters of a chosen secret are part of the secret).
    pub fn bootstrap(hash: SecretHash, now: DateTime<Utc>) -> StoredToken {
        StoredToken::owner("bootstrap", hash, String::new(), true, now)
    }

    /// Whether a stored token the variable names was revoked, expired or narrowed since
    /// (it must be an unscoped owner again).
    pub fn narrowed(&self) -> bool {
        let t = &self.token;
        t.role != Role::Owner || !t.gateways.is_empty() || t.revoked_at.is_some() || t.expires_at.is_some()
    }

    /// Whether it is not yet exactly what the variable makes it: a usable, unscoped owner
    /// marked as the bootstrap token, without a display prefix.
    pub fn needs_restoring(&self) -> bool {
        self.narrowed() || !self.bootstrap || !self.prefix.is_empty()
    }

    /// Makes it what the variable says: a usable, unscoped owner, the bootstrap token,
    /// without a display prefix.
    pub fn restore_as_bootstrap(&mut self) {
        self.token.role = Role::Owner;
        self.token.gateways.clear();
        self.token.revoked_at = None;
        self.token.expires_at = None;
        self.bootstrap = true;
        self.prefix.clear();
    }
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

    /// Takes a token as storage has it now (written by this or another replica):
    /// revocation, scope, expiry; last use only moves forward. Returns whether the token
    /// changed here (applying the same row twice changes nothing).
    pub fn apply(&mut self, stored: StoredToken) -> bool {
        let Some(e) = self.by_hash.get_mut(&stored.hash) else {
            self.insert(stored);
            return true;
        };
        let mut changed = false;
        if let Some(at) = stored.last_used_at {
            e.persisted = Some(e.persisted.map_or(at, |p| p.max(at)));
            if at > e.last_used {
                e.last_used = at;
                changed = true;
            }
        }
        let last_used_at = e.stored.last_used_at.max(stored.last_used_at);
        let same = e.stored.token == stored.token
            && e.stored.prefix == stored.prefix
            && e.stored.bootstrap == stored.bootstrap;
        if !same {
            e.stored = StoredToken { last_used_at, ..stored };
            changed = true;
        } else {
            e.stored.last_used_at = last_used_at;
        }
        changed
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

    /// Bootstrap tokens made with an earlier value of the variable, still live: a changed
    /// variable retires the secret it replaced.
    pub fn previous_bootstrap(&self, current: &SecretHash) -> Vec<Uuid> {
        self.by_hash
            .values()
            .map(|e| &e.stored)
            .filter(|s| s.bootstrap && s.hash != *current && s.token.revoked_at.is_none())
            .map(|s| s.token.id)
            .collect()
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

    #[test]
    fn bootstrap_tokens_are_restored_and_earlier_ones_retired() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let mut b = StoredToken::bootstrap(SecretHash::of("first-value-of-the-variable-0123456"), t0);
        assert!(!b.needs_restoring() && b.prefix.is_empty() && b.token.role == Role::Owner);
        b.token.gateways = vec!["demo".into()];
        b.token.revoked_at = Some(t0);
        assert!(b.narrowed() && b.needs_restoring());
        b.restore_as_bootstrap();
        assert!(!b.needs_restoring());
        let mut made_elsewhere = StoredToken::owner("owner", SecretHash::of("x"), "pcm_abcdefgh".into(), false, t0);
        assert!(!made_elsewhere.narrowed() && made_elsewhere.needs_restoring(), "not yet the bootstrap token");
        made_elsewhere.restore_as_bootstrap();
        assert!(made_elsewhere.prefix.is_empty() && made_elsewhere.bootstrap);

        let second = StoredToken::bootstrap(SecretHash::of("second-value-of-the-variable-012345"), t0);
        let (first_id, second_hash) = (b.token.id, second.hash);
        let mut r = TokenRegistry::new(vec![b, second], false, Duration::hours(1));
        assert_eq!(r.previous_bootstrap(&second_hash), vec![first_id]);
        r.revoke(first_id, t0);
        assert!(r.previous_bootstrap(&second_hash).is_empty(), "a revoked one is retired already");
    }

    #[test]
    fn a_token_from_storage_is_applied_once_and_its_last_use_only_moves_forward() {
        let t0 = DateTime::from_timestamp(1_800_000_000, 0).unwrap();
        let secret = "pcm_another-secret-for-the-registry-test";
        let mut stored = StoredToken::owner("ops", SecretHash::of(secret), "pcm_another".into(), false, t0);
        let mut r = TokenRegistry::new(vec![], false, Duration::hours(1));
        assert!(r.apply(stored.clone()), "new here");
        assert!(!r.apply(stored.clone()), "the same row twice");
        r.authenticate(secret, t0 + Duration::minutes(30)).unwrap();
        stored.last_used_at = Some(t0 + Duration::minutes(10));
        assert!(!r.apply(stored.clone()), "an older last use from elsewhere changes nothing");
        assert_eq!(r.find(stored.token.id).unwrap().1, t0 + Duration::minutes(30));
        stored.token.revoked_at = Some(t0 + Duration::minutes(40));
        assert!(r.apply(stored.clone()), "revoked elsewhere");
        assert!(r.authenticate(secret, t0 + Duration::minutes(41)).is_none());
    }
}
