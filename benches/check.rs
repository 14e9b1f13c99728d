//! Check decision benchmark: Portcullis's full Check (decode CheckRequest, decide on a warm
//! view with 10 000 keys, shape and encode the CheckResponse) against an "ideal" baseline
//! measured in the same run (decode, SHA-256 + HashMap lookup, encode a bare OK).
//! Reported as ns per Check and as a ratio to the baseline. Run: `cargo bench --bench check`.

mod common;

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use chrono::Utc;
use common::{check_request, key};
use envoy_types::pb::envoy::service::auth::v3::{CheckRequest, CheckResponse};
use envoy_types::pb::google::rpc;
use portcullis::authz::{AuthzService, CheckInput};
use portcullis::domain::check::Limiters;
use portcullis::domain::clock::SystemClock;
use portcullis::domain::counters::now_or_never;
use portcullis::domain::gateway::{Gateway, InboundAuth, UpstreamAuth};
use portcullis::domain::key::{Limits, ResetPeriod};
use portcullis::domain::secret::{Secret, SecretKind};
use portcullis::domain::tokens::TokenRegistry;
use portcullis::domain::view::View;
use portcullis::state::Shared;
use prost::Message;
use sha2::{Digest, Sha256};
use uuid::Uuid;

const KEYS: usize = 10_000;
const ITERS: u32 = 300_000;

fn measure(name: &str, mut f: impl FnMut() -> usize) -> f64 {
    for _ in 0..ITERS / 10 {
        black_box(f());
    }
    let start = Instant::now();
    let mut bytes = 0;
    for _ in 0..ITERS {
        bytes += black_box(f());
    }
    let ns = start.elapsed().as_nanos() as f64 / f64::from(ITERS);
    println!("{name:<44} {ns:>8.0} ns/Check  ({bytes} response bytes)");
    ns
}

fn main() {
    let gateway = Gateway {
        id: Uuid::now_v7(),
        name: "demo".into(),
        inbound: InboundAuth::default(),
        upstream: Some(UpstreamAuth::new("authorization", "Bearer sk-provider").unwrap()),
        default_reservation_tokens: 0,
        created_at: Utc::now(),
    };
    let mut keys = Vec::new();
    let mut secrets = Vec::new();
    for i in 0..KEYS {
        let s = Secret::generate(SecretKind::ApiKey);
        let limits = match i {
            0 => Limits { requests_per_minute: Some(u32::MAX), ..Default::default() },
            // Every limit at once: budgets reserve (and metering would settle), the window admits.
            2 => Limits {
                requests_per_minute: Some(u32::MAX),
                token_limit: Some(u64::MAX),
                cost_limit_micros: Some(i64::MAX),
                reset_period: ResetPeriod::Monthly,
            },
            _ => Limits::default(),
        };
        keys.push(key(gateway.id, format!("k{i}"), &s, limits));
        secrets.push(s);
    }
    let ideal: HashMap<[u8; 32], u64> = keys.iter().enumerate().map(|(i, (_, h))| (h[0].hash.0, i as u64)).collect();
    let shared = Arc::new(Shared::new(
        View::new(vec![gateway], keys),
        TokenRegistry::new(vec![], false, chrono::Duration::hours(1)),
        Limiters::default(),
        Arc::new(SystemClock),
    ));
    let svc = AuthzService::new(shared);

    let with_rpm = check_request(secrets[0].expose(), "demo");
    let without = check_request(secrets[1].expose(), "demo");
    let all_limits = check_request(secrets[2].expose(), "demo");
    let unknown = check_request(Secret::generate(SecretKind::ApiKey).expose(), "demo");

    println!("Check decision, {KEYS} keys in the view, {ITERS} iterations each");
    let baseline = measure("baseline: decode + SHA-256 + HashMap + encode", || {
        let req = CheckRequest::decode(without.as_slice()).unwrap();
        let http = req.attributes.as_ref().and_then(|a| a.request.as_ref()).and_then(|r| r.http.as_ref()).unwrap();
        let key = http.headers.get("x-api-key").map(String::as_str).unwrap_or("");
        let code = match ideal.get(&<[u8; 32]>::from(Sha256::digest(key.as_bytes()))) {
            Some(_) => 0,
            None => 16,
        };
        let resp = CheckResponse { status: Some(rpc::Status { code, ..Default::default() }), ..Default::default() };
        resp.encode_to_vec().len()
    });
    let run = |bytes: &[u8]| {
        let req = CheckInput::decode(bytes).unwrap();
        now_or_never(svc.decide(&req)).expect("in-process counters answer at once").encode().len()
    };
    let allow = measure("portcullis: allow, no limits", || run(&without));
    let rpm = measure("portcullis: allow, requests/min limit", || run(&with_rpm));
    let all = measure("portcullis: allow, rpm + token + USD limits", || run(&all_limits));
    let deny = measure("portcullis: deny, unknown key", || run(&unknown));
    println!();
    println!(
        "ratio to baseline: allow {:.2}x, with rpm {:.2}x, with all limits {:.2}x, deny {:.2}x",
        allow / baseline,
        rpm / baseline,
        all / baseline,
        deny / baseline
    );
}
