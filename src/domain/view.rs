//! The in-memory view the request path reads: gateways by name, keys by secret hash.
//! Admin writes update it explicitly after they commit; nothing on the request path
//! touches storage.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use super::gateway::Gateway;
use super::key::ApiKey;
use super::secret::SecretHash;

/// One secret that authenticates a key; a rotated-out secret has an end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeySecret {
    pub hash: SecretHash,
    pub valid_until: Option<DateTime<Utc>>,
}

impl KeySecret {
    pub fn current(hash: SecretHash) -> Self {
        KeySecret { hash, valid_until: None }
    }
}

#[derive(Debug, Default)]
pub struct View {
    gateways: HashMap<String, Arc<Gateway>>,
    gateway_names: HashMap<Uuid, String>,
    keys: HashMap<SecretHash, (Arc<ApiKey>, Option<DateTime<Utc>>)>,
    secrets_by_key: HashMap<Uuid, Vec<KeySecret>>,
    keys_per_gateway: HashMap<Uuid, usize>,
}

impl View {
    pub fn new(gateways: Vec<Gateway>, keys: Vec<(ApiKey, Vec<KeySecret>)>) -> Self {
        let mut view = View::default();
        for g in gateways {
            view.upsert_gateway(g);
        }
        for (k, secrets) in keys {
            view.upsert_key(k, secrets);
        }
        view
    }

    pub fn gateway(&self, name: &str) -> Option<&Arc<Gateway>> {
        self.gateways.get(name)
    }

    /// A live gateway's name by id.
    pub fn gateway_name(&self, id: Uuid) -> Option<&str> {
        self.gateway_names.get(&id).map(String::as_str)
    }

    /// The key a secret belongs to, if that secret is valid at `now`.
    pub fn key_by_hash(&self, hash: &SecretHash, now: DateTime<Utc>) -> Option<&Arc<ApiKey>> {
        let (key, valid_until) = self.keys.get(hash)?;
        valid_until.is_none_or(|until| now < until).then_some(key)
    }

    pub fn key_by_id(&self, id: Uuid) -> Option<&Arc<ApiKey>> {
        let first = self.secrets_by_key.get(&id)?.first()?;
        self.keys.get(&first.hash).map(|(k, _)| k)
    }

    /// Every secret of a key, by id.
    pub fn secrets_of(&self, id: Uuid) -> Option<&[KeySecret]> {
        self.secrets_by_key.get(&id).map(Vec::as_slice)
    }

    /// The ids of every key of one gateway.
    pub fn key_ids_in(&self, gateway_id: Uuid) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> =
            self.keys.values().filter(|(k, _)| k.gateway_id == gateway_id).map(|(k, _)| k.id).collect();
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    pub fn key_count(&self) -> usize {
        self.secrets_by_key.len()
    }

    /// Keys of one gateway.
    pub fn keys_in(&self, gateway_id: Uuid) -> usize {
        self.keys_per_gateway.get(&gateway_id).copied().unwrap_or(0)
    }

    pub fn upsert_gateway(&mut self, gateway: Gateway) {
        let (id, name) = (gateway.id, gateway.name.clone());
        self.gateway_names.insert(id, name.clone());
        // A deleted gateway's name can be taken by a new one: the old id names nothing.
        if let Some(old) = self.gateways.insert(name, Arc::new(gateway))
            && old.id != id
        {
            self.gateway_names.remove(&old.id);
        }
    }

    /// Removes the gateway with this id, if it is still the one its name maps to, and
    /// every key that belongs to it.
    pub fn remove_gateway_by_id(&mut self, id: Uuid) {
        let Some(name) = self.gateway_names.get(&id).cloned() else { return };
        if self.gateways.get(&name).is_some_and(|g| g.id == id) {
            self.remove_gateway(&name);
        } else {
            self.gateway_names.remove(&id);
        }
    }

    /// Removes a gateway and every key that belongs to it.
    pub fn remove_gateway(&mut self, name: &str) {
        if let Some(g) = self.gateways.remove(name) {
            self.gateway_names.remove(&g.id);
            let ids: Vec<Uuid> = self.keys.values().filter(|(k, _)| k.gateway_id == g.id).map(|(k, _)| k.id).collect();
            for id in ids {
                self.remove_key(id);
            }
        }
    }

    /// Inserts or replaces a key; `secrets` are every secret that authenticates it.
    pub fn upsert_key(&mut self, key: ApiKey, secrets: Vec<KeySecret>) {
        self.remove_key(key.id);
        *self.keys_per_gateway.entry(key.gateway_id).or_default() += 1;
        let key = Arc::new(key);
        for s in &secrets {
            self.keys.insert(s.hash, (Arc::clone(&key), s.valid_until));
        }
        self.secrets_by_key.insert(key.id, secrets);
    }

    /// Replaces a key's record, keeping the secrets it already has.
    pub fn replace_key(&mut self, key: ApiKey) {
        let secrets = self.secrets_by_key.get(&key.id).cloned().unwrap_or_default();
        self.upsert_key(key, secrets);
    }

    /// After a rotation: `new_hash` is current; the old current secret stays valid until
    /// `previous_valid_until` (or stops now); older rotated-out secrets stop.
    pub fn rotate_key(&mut self, id: Uuid, new_hash: SecretHash, previous_valid_until: Option<DateTime<Utc>>) {
        let Some(key) = self.key_by_id(id).cloned() else { return };
        let old = self.secrets_by_key.get(&id).and_then(|s| s.iter().find(|s| s.valid_until.is_none()).copied());
        let mut secrets = vec![KeySecret::current(new_hash)];
        if let (Some(old), Some(until)) = (old, previous_valid_until) {
            secrets.push(KeySecret { hash: old.hash, valid_until: Some(until) });
        }
        self.upsert_key((*key).clone(), secrets);
    }

    pub fn remove_key(&mut self, id: Uuid) {
        if let Some(secrets) = self.secrets_by_key.remove(&id) {
            let mut gateway = None;
            for s in secrets {
                if let Some((k, _)) = self.keys.remove(&s.hash) {
                    gateway = Some(k.gateway_id);
                }
            }
            if let Some(g) = gateway
                && let Some(n) = self.keys_per_gateway.get_mut(&g)
            {
                *n -= 1;
                if *n == 0 {
                    self.keys_per_gateway.remove(&g);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};

    use super::*;
    use crate::domain::gateway::InboundAuth;
    use crate::domain::key::{Limits, NewKey};

    fn gateway(name: &str) -> Gateway {
        Gateway {
            id: Uuid::now_v7(),
            name: name.into(),
            inbound: InboundAuth::default(),
            upstream: None,
            default_reservation_tokens: 0,
            created_at: Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap(),
        }
    }

    fn key(gateway: &Gateway) -> ApiKey {
        let kind = NewKey::Managed { limits: Limits::default(), expires_at: None };
        ApiKey::new(gateway.id, "k", "pcs_x", kind, gateway.created_at)
    }

    #[test]
    fn keys_are_counted_per_gateway_through_every_change() {
        let (a, b) = (gateway("a"), gateway("b"));
        let (k1, k2, k3) = (key(&a), key(&a), key(&b));
        let mut view = View::new(
            vec![a.clone(), b.clone()],
            vec![
                (k1.clone(), vec![KeySecret::current(SecretHash::of("1"))]),
                (k2.clone(), vec![KeySecret::current(SecretHash::of("2"))]),
                (k3.clone(), vec![KeySecret::current(SecretHash::of("3"))]),
            ],
        );
        assert_eq!((view.keys_in(a.id), view.keys_in(b.id)), (2, 1));
        view.replace_key(k1.clone());
        view.rotate_key(k1.id, SecretHash::of("1b"), Some(a.created_at));
        assert_eq!(view.keys_in(a.id), 2, "updates and rotations are no new keys");
        view.remove_key(k2.id);
        view.remove_key(k2.id);
        assert_eq!(view.keys_in(a.id), 1, "a key removed twice is counted once");
        view.remove_gateway("a");
        assert_eq!((view.keys_in(a.id), view.keys_in(b.id), view.key_count()), (0, 1, 1));
    }

    #[test]
    fn a_gateway_removed_by_id_spares_a_newer_one_of_the_same_name() {
        let (old, new) = (gateway("a"), gateway("a"));
        let mut view = View::new(vec![old.clone()], vec![]);
        view.upsert_gateway(new.clone());
        assert_eq!(view.gateway_name(old.id), None, "the old id names nothing once the name is taken");
        view.remove_gateway_by_id(old.id);
        assert_eq!(view.gateway("a").map(|g| g.id), Some(new.id));
        let k = key(&new);
        view.upsert_key(k.clone(), vec![KeySecret::current(SecretHash::of("n"))]);
        assert_eq!(view.key_ids_in(new.id), vec![k.id]);
        view.remove_gateway_by_id(new.id);
        assert_eq!((view.gateway_count(), view.key_count()), (0, 0));
    }
}
