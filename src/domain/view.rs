//! The in-memory view the request path reads: gateways by name, keys by secret hash.
//! Admin writes update it explicitly after they commit; nothing on the request path
//! touches storage.

use std::collections::HashMap;
use std::sync::Arc;

use uuid::Uuid;

use super::gateway::Gateway;
use super::key::ApiKey;
use super::secret::SecretHash;

#[derive(Debug, Default)]
pub struct View {
    gateways: HashMap<String, Arc<Gateway>>,
    gateway_names: HashMap<Uuid, String>,
    keys: HashMap<SecretHash, Arc<ApiKey>>,
    hashes_by_key: HashMap<Uuid, Vec<SecretHash>>,
}

impl View {
    pub fn new(gateways: Vec<Gateway>, keys: Vec<(ApiKey, SecretHash)>) -> Self {
        let mut view = View::default();
        for g in gateways {
            view.upsert_gateway(g);
        }
        for (k, h) in keys {
            view.upsert_key(k, vec![h]);
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

    pub fn key_by_hash(&self, hash: &SecretHash) -> Option<&Arc<ApiKey>> {
        self.keys.get(hash)
    }

    pub fn gateway_count(&self) -> usize {
        self.gateways.len()
    }

    pub fn key_count(&self) -> usize {
        self.hashes_by_key.len()
    }

    pub fn upsert_gateway(&mut self, gateway: Gateway) {
        self.gateway_names.insert(gateway.id, gateway.name.clone());
        self.gateways.insert(gateway.name.clone(), Arc::new(gateway));
    }

    /// Removes a gateway and every key that belongs to it.
    pub fn remove_gateway(&mut self, name: &str) {
        if let Some(g) = self.gateways.remove(name) {
            self.gateway_names.remove(&g.id);
            let ids: Vec<Uuid> = self.keys.values().filter(|k| k.gateway_id == g.id).map(|k| k.id).collect();
            for id in ids {
                self.remove_key(id);
            }
        }
    }

    /// Inserts or replaces a key; `hashes` are every secret that authenticates it.
    pub fn upsert_key(&mut self, key: ApiKey, hashes: Vec<SecretHash>) {
        self.remove_key(key.id);
        let key = Arc::new(key);
        for h in &hashes {
            self.keys.insert(*h, Arc::clone(&key));
        }
        self.hashes_by_key.insert(key.id, hashes);
    }

    /// Replaces a key's record, keeping the secrets it already has.
    pub fn replace_key(&mut self, key: ApiKey) {
        let hashes = self.hashes_by_key.get(&key.id).cloned().unwrap_or_default();
        self.upsert_key(key, hashes);
    }

    pub fn remove_key(&mut self, id: Uuid) {
        if let Some(hashes) = self.hashes_by_key.remove(&id) {
            for h in hashes {
                self.keys.remove(&h);
            }
        }
    }
}
