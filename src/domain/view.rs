//! The in-memory view the request path reads: gateways by name, keys by secret hash.
//! Admin writes update it explicitly after they commit; nothing on the request path
//! touches storage.
//!
//! Built to hold a million keys in a few hundred bytes each: every key is one slot (its
//! record and its current secret's hash) in a vector, found through two tables of slot
//! numbers (4 bytes a bucket) by secret hash and by id. Secrets other than a key's one
//! current secret (a rotated-out secret in its grace period) sit in a small map of their own.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use hashbrown::HashTable;
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

/// One key: its record and the hash of its first secret without an end (its current
/// secret), which `View::by_hash` finds it by.
#[derive(Debug)]
struct Slot {
    key: Arc<ApiKey>,
    hash: SecretHash,
}

#[derive(Debug, Default)]
pub struct View {
    gateways: HashMap<String, Arc<Gateway>>,
    gateway_names: HashMap<Uuid, String>,
    /// Every key; a removed key's slot is reused (`free`).
    slots: Vec<Option<Slot>>,
    free: Vec<u32>,
    /// Slots by their current secret's hash.
    by_hash: HashTable<u32>,
    /// Slots by key id.
    by_id: HashTable<u32>,
    ids: std::hash::RandomState,
    /// The secrets of keys that have other secrets than one current one (a rotated-out
    /// secret, or none at all), each key's in the order given.
    unusual: HashMap<Uuid, Vec<KeySecret>>,
    /// Those other secrets: the slot of their key and their end.
    others: HashMap<SecretHash, (u32, Option<DateTime<Utc>>)>,
    keys_per_gateway: HashMap<Uuid, usize>,
}

/// A secret hash is SHA-256: its first bytes are as good a hash as any.
fn hash_of(h: &SecretHash) -> u64 {
    u64::from_le_bytes([h.0[0], h.0[1], h.0[2], h.0[3], h.0[4], h.0[5], h.0[6], h.0[7]])
}

fn live(slots: &[Option<Slot>], i: u32) -> &Slot {
    slots[i as usize].as_ref().expect("the view's tables name live slots only")
}

impl View {
    pub fn new(gateways: Vec<Gateway>, keys: Vec<(ApiKey, Vec<KeySecret>)>) -> Self {
        let mut view = View::with_gateways(gateways);
        view.reserve_keys(keys.len());
        for (k, secrets) in keys {
            view.upsert_key(k, secrets);
        }
        view
    }

    /// A view of these gateways and no keys yet (they are added as storage reads them).
    pub fn with_gateways(gateways: Vec<Gateway>) -> Self {
        let mut view = View::default();
        for g in gateways {
            view.upsert_gateway(g);
        }
        view
    }

    /// Room for `n` more keys.
    pub fn reserve_keys(&mut self, n: usize) {
        self.slots.reserve(n);
        let (slots, ids) = (&self.slots, &self.ids);
        self.by_hash.reserve(n, |&i| hash_of(&live(slots, i).hash));
        self.by_id.reserve(n, |&i| ids.hash_one(live(slots, i).key.id));
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
        let slots = &self.slots;
        if let Some(&i) = self.by_hash.find(hash_of(hash), |&i| live(slots, i).hash == *hash) {
            return Some(&live(slots, i).key);
        }
        let (i, valid_until) = self.others.get(hash)?;
        valid_until.is_none_or(|until| now < until).then(|| &live(slots, *i).key)
    }

    fn slot_of(&self, id: Uuid) -> Option<u32> {
        let slots = &self.slots;
        self.by_id.find(self.ids.hash_one(id), |&i| live(slots, i).key.id == id).copied()
    }

    /// A key with no secret at all is in the view but found by nothing.
    pub fn key_by_id(&self, id: Uuid) -> Option<&Arc<ApiKey>> {
        let i = self.slot_of(id)?;
        if self.unusual.get(&id).is_some_and(Vec::is_empty) {
            return None;
        }
        Some(&live(&self.slots, i).key)
    }

    /// Every secret of a key, by id, in the order it was given.
    pub fn secrets_of(&self, id: Uuid) -> Option<Vec<KeySecret>> {
        let i = self.slot_of(id)?;
        Some(match self.unusual.get(&id) {
            Some(secrets) => secrets.clone(),
            None => vec![KeySecret::current(live(&self.slots, i).hash)],
        })
    }

    fn keys(&self) -> impl Iterator<Item = &Arc<ApiKey>> {
        self.slots.iter().flatten().map(|s| &s.key)
    }

    /// The ids of every key of one gateway.
    pub fn key_ids_in(&self, gateway_id: Uuid) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = self.keys().filter(|k| k.gateway_id == gateway_id).map(|k| k.id).collect();
        ids.sort_unstable();
        ids
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    pub fn key_count(&self) -> usize {
        self.by_id.len()
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
            for id in self.key_ids_in(g.id) {
                self.remove_key(id);
            }
        }
    }

    /// Inserts or replaces a key; `secrets` are every secret that authenticates it. A
    /// secret another key had moves to this one.
    pub fn upsert_key(&mut self, key: ApiKey, secrets: Vec<KeySecret>) {
        self.remove_key(key.id);
        *self.keys_per_gateway.entry(key.gateway_id).or_default() += 1;
        let current = secrets.iter().find(|s| s.valid_until.is_none()).map(|s| s.hash);
        let (id, key) = (key.id, Arc::new(key));
        // A key without a current secret keeps a hash no table finds it by.
        let slot = Slot { key, hash: current.unwrap_or(SecretHash([0; 32])) };
        let i = match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                u32::try_from(self.slots.len() - 1).expect("fewer than 4 billion keys")
            }
        };
        let slots = &self.slots;
        let ids = &self.ids;
        self.by_id.insert_unique(ids.hash_one(id), i, |&j| ids.hash_one(live(slots, j).key.id));
        if let Some(hash) = current {
            self.others.remove(&hash);
            match self.by_hash.find_mut(hash_of(&hash), |&j| live(slots, j).hash == hash) {
                Some(j) => *j = i,
                None => {
                    self.by_hash.insert_unique(hash_of(&hash), i, |&j| hash_of(&live(slots, j).hash));
                }
            }
        }
        let usual = secrets.len() == 1 && current.is_some();
        if !usual {
            let mut first = true;
            for s in &secrets {
                if first && Some(s.hash) == current {
                    first = false;
                    continue;
                }
                if let Ok(e) = self.by_hash.find_entry(hash_of(&s.hash), |&j| live(slots, j).hash == s.hash) {
                    e.remove();
                }
                self.others.insert(s.hash, (i, s.valid_until));
            }
            self.unusual.insert(id, secrets);
        }
    }

    /// Replaces a key's record, keeping the secrets it already has.
    pub fn replace_key(&mut self, key: ApiKey) {
        let secrets = self.secrets_of(key.id).unwrap_or_default();
        self.upsert_key(key, secrets);
    }

    /// After a rotation: `new_hash` is current; the old current secret stays valid until
    /// `previous_valid_until` (or stops now); older rotated-out secrets stop.
    pub fn rotate_key(&mut self, id: Uuid, new_hash: SecretHash, previous_valid_until: Option<DateTime<Utc>>) {
        let Some(key) = self.key_by_id(id).cloned() else { return };
        let old = self.secrets_of(id).and_then(|s| s.iter().find(|s| s.valid_until.is_none()).copied());
        let mut secrets = vec![KeySecret::current(new_hash)];
        if let (Some(old), Some(until)) = (old, previous_valid_until) {
            secrets.push(KeySecret { hash: old.hash, valid_until: Some(until) });
        }
        self.upsert_key((*key).clone(), secrets);
    }

    pub fn remove_key(&mut self, id: Uuid) {
        let Some(i) = self.slot_of(id) else { return };
        let ids = &self.ids;
        if let Ok(e) = self.by_id.find_entry(ids.hash_one(id), |&j| j == i) {
            e.remove();
        }
        let slot = self.slots[i as usize].take().expect("a live slot");
        self.free.push(i);
        // Only the entries that still name this slot: a secret another key took is its.
        if let Ok(e) = self.by_hash.find_entry(hash_of(&slot.hash), |&j| j == i) {
            e.remove();
        }
        if let Some(secrets) = self.unusual.remove(&id) {
            for s in secrets {
                if self.others.get(&s.hash).is_some_and(|(j, _)| *j == i) {
                    self.others.remove(&s.hash);
                }
            }
        }
        let g = slot.key.gateway_id;
        if let Some(n) = self.keys_per_gateway.get_mut(&g) {
            *n -= 1;
            if *n == 0 {
                self.keys_per_gateway.remove(&g);
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

    #[test]
    fn rotated_out_secrets_work_until_their_end_and_go_with_their_key() {
        let g = gateway("a");
        let (k, other) = (key(&g), key(&g));
        let t = g.created_at;
        let (old, new) = (SecretHash::of("old"), SecretHash::of("new"));
        let mut view = View::new(vec![g.clone()], vec![(k.clone(), vec![KeySecret::current(old)])]);
        view.rotate_key(k.id, new, Some(t + chrono::Duration::hours(1)));
        let found = |view: &View, h: &SecretHash, at| view.key_by_hash(h, at).map(|k| k.id);
        assert_eq!(found(&view, &new, t), Some(k.id));
        assert_eq!(found(&view, &old, t), Some(k.id), "the old secret works during the grace period");
        assert_eq!(found(&view, &old, t + chrono::Duration::hours(1)), None, "and stops at its end");
        let secrets =
            vec![KeySecret::current(new), KeySecret { hash: old, valid_until: Some(t + chrono::Duration::hours(1)) }];
        assert_eq!(view.secrets_of(k.id), Some(secrets.clone()), "in the order given");
        view.replace_key(k.clone());
        assert_eq!(view.secrets_of(k.id), Some(secrets), "an update keeps every secret");
        // A rotation without grace drops the old secret.
        view.rotate_key(k.id, SecretHash::of("newer"), None);
        assert_eq!((found(&view, &new, t), found(&view, &old, t)), (None, None));
        assert_eq!(view.secrets_of(k.id), Some(vec![KeySecret::current(SecretHash::of("newer"))]));
        // A secret another key is given moves to it; removing the first key leaves it there.
        view.upsert_key(other.clone(), vec![KeySecret::current(SecretHash::of("newer"))]);
        assert_eq!(found(&view, &SecretHash::of("newer"), t), Some(other.id));
        view.remove_key(k.id);
        assert_eq!(found(&view, &SecretHash::of("newer"), t), Some(other.id));
        assert_eq!((view.key_by_id(k.id).is_none(), view.key_count()), (true, 1));
        // A key without a secret is counted but found by nothing.
        view.upsert_key(k.clone(), vec![]);
        assert_eq!((view.key_by_id(k.id).is_none(), view.key_count(), view.keys_in(g.id)), (true, 2, 2));
        assert_eq!(view.secrets_of(k.id), Some(vec![]));
    }

    #[test]
    fn slots_of_removed_keys_are_reused() {
        let g = gateway("a");
        let keys: Vec<ApiKey> = (0..100).map(|_| key(&g)).collect();
        let mut view = View::with_gateways(vec![g.clone()]);
        for (i, k) in keys.iter().enumerate() {
            view.upsert_key(k.clone(), vec![KeySecret::current(SecretHash::of(&i.to_string()))]);
        }
        for k in &keys[..50] {
            view.remove_key(k.id);
        }
        for (i, k) in keys[..50].iter().enumerate() {
            view.upsert_key(k.clone(), vec![KeySecret::current(SecretHash::of(&format!("again-{i}")))]);
        }
        assert_eq!((view.slots.len(), view.key_count(), view.keys_in(g.id)), (100, 100, 100));
        let now = g.created_at;
        for (i, k) in keys.iter().enumerate() {
            let secret = if i < 50 { format!("again-{i}") } else { i.to_string() };
            assert_eq!(view.key_by_hash(&SecretHash::of(&secret), now).map(|k| k.id), Some(k.id));
            assert_eq!(view.key_by_id(k.id).map(|k| k.id), Some(k.id));
        }
        assert_eq!(view.key_by_hash(&SecretHash::of("0"), now), None, "a removed key's secret finds nothing");
    }
}
