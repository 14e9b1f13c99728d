//! Usage flush benchmark: what writing the counters of N active keys costs on SQLite (the
//! default store), wall time per flush and per key, for N = 1,000, 10,000 and 100,000
//! (`FLUSH_KEYS=1000,5000` to choose). The keys are seeded through the store, not the API.
//! Run: `cargo bench --bench flush`.

use std::time::Instant;

use chrono::{TimeZone, Utc};
use portcullis::domain::budget::Counters;
use portcullis::domain::gateway::{Gateway, InboundAuth};
use portcullis::domain::key::{ApiKey, Limits, NewKey, ResetPeriod};
use portcullis::domain::secret::{Secret, SecretKind};
use portcullis::store::{self, sealing::Sealer};
use uuid::Uuid;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let sizes: Vec<usize> = std::env::var("FLUSH_KEYS")
        .unwrap_or_else(|_| "1000,10000,100000".into())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();
    println!("| active keys | flush (ms) | per key (µs) |\n|--:|--:|--:|");
    for n in sizes {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}", dir.path().join("flush.db").display());
        let s = store::open(&url, Sealer::default()).await.unwrap();
        s.migrate().await.unwrap();
        let now = Utc.with_ymd_and_hms(2026, 11, 23, 12, 0, 0).unwrap();
        let g = Gateway {
            id: Uuid::now_v7(),
            name: "bench".into(),
            inbound: InboundAuth::default(),
            upstream: None,
            default_reservation_tokens: 0,
            created_at: now,
        };
        s.insert_gateway(&g).await.unwrap();
        let limits = Limits { token_limit: Some(1_000_000), reset_period: ResetPeriod::Monthly, ..Default::default() };
        let mut counters = Vec::with_capacity(n);
        for i in 0..n {
            let secret = Secret::generate(SecretKind::ApiKey);
            let k =
                ApiKey::new(g.id, &format!("k{i}"), secret.expose(), NewKey::Managed { limits, expires_at: None }, now);
            s.insert_key(&k, &secret.hash()).await.unwrap();
            let mut c =
                Counters::empty(k.id, ResetPeriod::Monthly, Utc.with_ymd_and_hms(2026, 11, 1, 0, 0, 0).unwrap());
            (c.requests, c.prompt_tokens, c.completion_tokens, c.last_used_at) = (1, 10, 20, Some(now));
            counters.push(c);
        }
        // The first flush inserts the rows; the measured ones update them, as every second
        // under load.
        s.save_usage(&counters, now).await.unwrap();
        let rounds = 5;
        let started = Instant::now();
        for r in 0..rounds {
            for c in &mut counters {
                c.requests += 1 + r;
            }
            s.save_usage(&counters, now).await.unwrap();
        }
        let per_flush = started.elapsed().as_secs_f64() / rounds as f64;
        println!("| {n} | {:.1} | {:.2} |", per_flush * 1e3, per_flush * 1e6 / n as f64);
        s.release().await;
    }
}
