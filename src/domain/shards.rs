//! Per-key state split over a fixed set of locks by key id, so Checks of different keys
//! on different threads (and the flusher) rarely wait on one another, and no lock on the
//! request path is global.

use std::sync::Mutex;

use uuid::Uuid;

/// How many locks per-key state is split over.
pub const SHARDS: usize = 16;

/// A shard on its own cache lines: two threads taking neighbouring locks do not slow
/// each other down.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(Mutex<T>);

#[derive(Debug)]
pub struct Sharded<T> {
    shards: [Padded<T>; SHARDS],
}

impl<T: Default> Default for Sharded<T> {
    fn default() -> Self {
        Sharded { shards: std::array::from_fn(|_| Padded::default()) }
    }
}

impl<T> Sharded<T> {
    /// The lock that holds `key`'s state.
    pub fn of(&self, key: Uuid) -> &Mutex<T> {
        &self.shards[index(key)].0
    }

    /// Every shard, for work over all keys (flushing, sweeping).
    pub fn all(&self) -> impl Iterator<Item = &Mutex<T>> {
        self.shards.iter().map(|p| &p.0)
    }
}

/// Key ids are UUIDv7 (a timestamp, then random bits) or, imported, any UUID: mixing both
/// halves spreads either kind evenly.
fn index(key: Uuid) -> usize {
    let (hi, lo) = key.as_u64_pair();
    ((hi ^ lo).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARDS.trailing_zeros())) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_spread_over_every_shard_and_stay_in_theirs() {
        let sharded: Sharded<Vec<Uuid>> = Sharded::default();
        for _ in 0..1600 {
            let id = Uuid::now_v7();
            sharded.of(id).lock().unwrap().push(id);
            assert!(sharded.of(id).lock().unwrap().contains(&id), "the same key finds the same shard");
        }
        let sizes: Vec<usize> = sharded.all().map(|s| s.lock().unwrap().len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 1600);
        assert!(sizes.iter().all(|&n| (40..=160).contains(&n)), "about 100 each: {sizes:?}");
    }
}
