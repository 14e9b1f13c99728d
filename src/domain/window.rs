//! Requests per minute over a true rolling 60-second window, per key.
//!
//! A request is admitted only if fewer than N requests were admitted in the 60 seconds
//! before it; denied requests take no slot. Each key keeps the times of its admitted
//! requests still inside the window (at most N of them), on the monotonic clock: a
//! wall-clock step neither frees slots early nor holds them longer.

use std::collections::{HashMap, VecDeque};

use uuid::Uuid;

use super::clock::Mono;
use super::shards::Sharded;

pub const WINDOW_MICROS: i64 = 60_000_000;

/// The outcome for one request of a key with a requests-per-minute limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub admitted: bool,
    pub limit: u32,
    /// Slots left after this request.
    pub remaining: u32,
    /// Microseconds until the oldest admitted request leaves the window
    /// (when a denied request would be admitted); 0 when the window is empty.
    pub reset_in_micros: i64,
}

impl Admission {
    /// Whole seconds until a slot frees, rounded up, at least 1.
    pub fn retry_after_secs(&self) -> u64 {
        (self.reset_in_micros.max(1) as u64).div_ceil(1_000_000)
    }
}

/// One key's admitted request times, oldest first.
#[derive(Debug, Default)]
pub struct Window(VecDeque<i64>);

impl Window {
    /// Admits or denies a request at `now` under `limit`.
    pub fn admit(&mut self, limit: u32, now: Mono) -> Admission {
        let now = now.micros();
        while self.0.front().is_some_and(|&t| now - t >= WINDOW_MICROS) {
            self.0.pop_front();
        }
        // A lowered limit can leave more than `limit` entries; drop the oldest extras
        // only once they age out (above), never by forgetting recent admissions.
        let in_window = self.0.len() as u64;
        let admitted = in_window < u64::from(limit);
        if admitted {
            self.0.push_back(now);
        }
        let used = self.0.len() as u64;
        let reset_in_micros = self.0.front().map_or(0, |&oldest| oldest + WINDOW_MICROS - now);
        Admission { admitted, limit, remaining: u64::from(limit).saturating_sub(used) as u32, reset_in_micros }
    }

    /// What `admit` would answer, without taking a slot.
    pub fn peek(&self, limit: u32, now: Mono) -> Admission {
        let now = now.micros();
        let inside: Vec<i64> = self.0.iter().copied().filter(|&t| now - t < WINDOW_MICROS).collect();
        Admission {
            admitted: (inside.len() as u64) < u64::from(limit),
            limit,
            remaining: u64::from(limit).saturating_sub(inside.len() as u64) as u32,
            reset_in_micros: inside.first().map_or(0, |&oldest| oldest + WINDOW_MICROS - now),
        }
    }

    /// How many admitted requests are inside the window at `now`.
    pub fn count(&self, now: Mono) -> usize {
        let now = now.micros();
        self.0.iter().filter(|&&t| now - t < WINDOW_MICROS).count()
    }
}

/// Every key's window, in this process, split by key over [`Sharded`] locks.
#[derive(Debug, Default)]
pub struct RequestWindows {
    windows: Sharded<HashMap<Uuid, Window>>,
}

impl RequestWindows {
    /// `None` only if the lock was poisoned: the caller must deny.
    pub fn admit(&self, key: Uuid, limit: u32, now: Mono) -> Option<Admission> {
        let mut windows = self.windows.of(key).lock().ok()?;
        Some(windows.entry(key).or_default().admit(limit, now))
    }

    pub fn peek(&self, key: Uuid, limit: u32, now: Mono) -> Option<Admission> {
        let windows = self.windows.of(key).lock().ok()?;
        Some(
            windows
                .get(&key)
                .map_or(Admission { admitted: limit > 0, limit, remaining: limit, reset_in_micros: 0 }, |w| {
                    w.peek(limit, now)
                }),
        )
    }

    pub fn count(&self, key: Uuid, now: Mono) -> usize {
        self.windows.of(key).lock().ok().and_then(|w| w.get(&key).map(|w| w.count(now))).unwrap_or(0)
    }

    /// Removes `key`'s window and returns its admission times (monotonic µs, oldest
    /// first): the shared counters record what was admitted here while Redis was away.
    pub fn take(&self, key: Uuid) -> Vec<i64> {
        self.windows.of(key).lock().ok().and_then(|mut w| w.remove(&key)).map(|w| w.0.into()).unwrap_or_default()
    }

    /// Puts admission times taken by [`RequestWindows::take`] back (recording them failed),
    /// with any admitted since.
    pub fn restore(&self, key: Uuid, times: Vec<i64>) {
        if let Ok(mut windows) = self.windows.of(key).lock() {
            let w = windows.entry(key).or_default();
            let mut all: Vec<i64> = times;
            all.extend(w.0.iter().copied());
            all.sort_unstable();
            w.0 = all.into();
        }
    }

    /// Forgets windows with nothing left inside them.
    pub fn sweep(&self, now: Mono) {
        for shard in self.windows.all() {
            if let Ok(mut w) = shard.lock() {
                w.retain(|_, win| win.count(now) > 0);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;

    fn t0() -> Mono {
        Mono::from_micros(3_600_000_000)
    }

    #[test]
    fn admits_n_then_denies_until_the_oldest_leaves() {
        let mut w = Window::default();
        let start = t0();
        for i in 0..3 {
            let a = w.admit(3, start + Duration::seconds(i * 10));
            assert!(a.admitted);
            assert_eq!(a.remaining, 2 - i as u32);
        }
        let a = w.admit(3, start + Duration::seconds(30));
        assert!(!a.admitted);
        assert_eq!(a.remaining, 0);
        assert_eq!(a.reset_in_micros, 30_000_000);
        assert_eq!(a.retry_after_secs(), 30);
        // 59.999 s after the first: still inside.
        assert!(!w.admit(3, start + Duration::milliseconds(59_999)).admitted);
        // Exactly 60 s after the first: it has left.
        let a = w.admit(3, start + Duration::seconds(60));
        assert!(a.admitted);
        assert_eq!(a.remaining, 0);
        assert_eq!(a.reset_in_micros, 10_000_000);
    }

    #[test]
    fn retry_after_rounds_up() {
        let a = Admission { admitted: false, limit: 1, remaining: 0, reset_in_micros: 1_000_001 };
        assert_eq!(a.retry_after_secs(), 2);
        let a = Admission { admitted: false, limit: 1, remaining: 0, reset_in_micros: 0 };
        assert_eq!(a.retry_after_secs(), 1);
    }

    #[test]
    fn a_lowered_limit_keeps_recent_admissions() {
        let mut w = Window::default();
        for i in 0..5 {
            assert!(w.admit(10, t0() + Duration::seconds(i)).admitted);
        }
        assert!(!w.admit(2, t0() + Duration::seconds(10)).admitted);
        assert_eq!(w.count(t0() + Duration::seconds(10)), 5);
    }

    /// xorshift64*: deterministic randomness without a dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }
    }

    /// Property: over random arrival times and limits, the admitted set is exactly what the
    /// rule says (admit iff fewer than N admitted in the preceding 60 s), so no 60-second
    /// span ever holds more than N admissions and denied requests never free a slot.
    #[test]
    fn rolling_window_property() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..300 {
            let limit = 1 + (rng.next() % 12) as u32;
            let mut w = Window::default();
            let mut now = t0().micros();
            let mut admitted: Vec<i64> = Vec::new();
            for _ in 0..400 {
                // Bursts and gaps: mostly sub-second steps, sometimes long pauses.
                now += match rng.next() % 10 {
                    0 => (rng.next() % 90_000_000) as i64,
                    1 => 0,
                    _ => (rng.next() % 2_000_000) as i64,
                };
                let at = Mono::from_micros(now);
                let a = w.admit(limit, at);
                let recent = admitted.iter().filter(|&&t| now - t < WINDOW_MICROS).count();
                assert_eq!(a.admitted, recent < limit as usize, "case {case}: rule violated");
                if a.admitted {
                    admitted.push(now);
                    assert_eq!(a.remaining as usize, limit as usize - recent - 1);
                } else {
                    let oldest = admitted.iter().copied().filter(|&t| now - t < WINDOW_MICROS).min().unwrap();
                    assert_eq!(a.reset_in_micros, oldest + WINDOW_MICROS - now, "case {case}");
                }
            }
            // No 60-second span holds more than `limit` admissions.
            for (i, &t) in admitted.iter().enumerate() {
                let in_span = admitted[i..].iter().take_while(|&&u| u - t < WINDOW_MICROS).count();
                assert!(in_span <= limit as usize, "case {case}: {in_span} > {limit} within 60 s");
            }
        }
    }

    #[test]
    fn taken_times_come_back_in_order() {
        let ws = RequestWindows::default();
        let k = Uuid::now_v7();
        assert!(ws.admit(k, 5, t0()).unwrap().admitted);
        let taken = ws.take(k);
        assert_eq!(taken, [t0().micros()]);
        assert_eq!(ws.count(k, t0()), 0);
        assert!(ws.admit(k, 5, t0() + Duration::seconds(1)).unwrap().admitted);
        ws.restore(k, taken);
        assert_eq!(ws.take(k), [t0().micros(), (t0() + Duration::seconds(1)).micros()]);
    }

    #[test]
    fn windows_are_per_key_and_swept_when_empty() {
        let ws = RequestWindows::default();
        let (a, b) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(ws.admit(a, 1, t0()).unwrap().admitted);
        assert!(!ws.admit(a, 1, t0()).unwrap().admitted);
        assert!(ws.admit(b, 1, t0()).unwrap().admitted);
        assert_eq!(ws.count(a, t0()), 1);
        ws.sweep(t0() + Duration::seconds(60));
        assert_eq!(ws.count(a, t0()), 0, "swept");
    }
}
