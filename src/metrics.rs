//! Prometheus metrics: counters the request path bumps with one atomic add, served as
//! text on `--metrics-addr`.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use tokio::net::TcpListener;

use crate::domain::check::{Decision, Denial};

/// Unpriced models counted one by one; the rest are counted as `model="other"`.
pub const UNPRICED_SERIES: usize = 100;
/// Model names are cut to this many bytes in labels.
pub const MODEL_LABEL_MAX: usize = 128;
const OTHER_MODEL: &str = "other";

/// The longest prefix of `s` of at most `max` bytes that ends on a character boundary.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A label value escaped as the Prometheus text format requires: `\\`, `\"` and `\n`.
struct LabelValue<'a>(&'a str);

impl std::fmt::Display for LabelValue<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for c in self.0.chars() {
            match c {
                '\\' => f.write_str("\\\\")?,
                '"' => f.write_str("\\\"")?,
                '\n' => f.write_str("\\n")?,
                c => f.write_char(c)?,
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
pub struct Metrics {
    allowed: AtomicU64,
    missing_key: AtomicU64,
    invalid_key: AtomicU64,
    rate_limited: AtomicU64,
    budget: AtomicU64,
    gateway_not_configured: AtomicU64,
    internal: AtomicU64,
    metered_responses: AtomicU64,
    prompt_tokens: AtomicU64,
    completion_tokens: AtomicU64,
    usage_missing: AtomicU64,
    flush_failures: AtomicU64,
    /// The last usage flush failed (the database did not answer); cleared by one that
    /// succeeds.
    database_down: std::sync::atomic::AtomicBool,
    metering_without_metadata: AtomicU64,
    /// Responses of models without a price, by model: at most `UNPRICED_SERIES` models
    /// (names cut to `MODEL_LABEL_MAX` bytes), the rest under `other`.
    unpriced: Mutex<BTreeMap<String, u64>>,
    /// The highest change version applied from storage, and when storage was last read
    /// (replicas on PostgreSQL; never set on SQLite, then not exported).
    view_version: AtomicU64,
    last_sync: Mutex<Option<std::time::Instant>>,
}

impl Metrics {
    pub fn check(&self, d: &Decision) {
        let c = match d {
            Decision::Allow(_) => &self.allowed,
            Decision::Deny(Denial::MissingKey) => &self.missing_key,
            Decision::Deny(Denial::InvalidKey { .. }) => &self.invalid_key,
            Decision::Deny(Denial::RateLimited { .. }) => &self.rate_limited,
            Decision::Deny(Denial::Budget { .. }) => &self.budget,
            Decision::Deny(Denial::GatewayNotConfigured { .. }) => &self.gateway_not_configured,
            Decision::Deny(Denial::Internal(_)) => &self.internal,
        };
        c.fetch_add(1, Relaxed);
    }

    pub fn internal_error(&self) {
        self.internal.fetch_add(1, Relaxed);
    }

    pub fn metered(&self, prompt: u64, completion: u64, usage_found: bool) {
        self.metered_responses.fetch_add(1, Relaxed);
        // Saturating: one response can report (or be charged) up to u64::MAX tokens.
        let _ = self.prompt_tokens.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(prompt)));
        let _ = self.completion_tokens.fetch_update(Relaxed, Relaxed, |v| Some(v.saturating_add(completion)));
        if !usage_found {
            self.usage_missing.fetch_add(1, Relaxed);
        }
    }

    /// Counts a response of an unpriced model; true the first time the model is seen (for
    /// models beyond the first `UNPRICED_SERIES`, the first time `other` is counted).
    pub fn unpriced(&self, model: &str) -> bool {
        let Ok(mut m) = self.unpriced.lock() else { return false };
        let model = truncate(model, MODEL_LABEL_MAX);
        if let Some(n) = m.get_mut(model) {
            *n += 1;
            return false;
        }
        let named = m.len() - usize::from(m.contains_key(OTHER_MODEL));
        if named >= UNPRICED_SERIES {
            let n = m.entry(OTHER_MODEL.to_string()).or_insert(0);
            *n += 1;
            return *n == 1;
        }
        m.insert(model.to_string(), 1);
        true
    }

    /// Counts a metering stream that carried no ext_authz metadata; returns the total.
    pub fn metering_without_metadata(&self) -> u64 {
        self.metering_without_metadata.fetch_add(1, Relaxed).saturating_add(1)
    }

    /// Storage was read for changes; the view holds every change up to `version`.
    pub fn synced(&self, version: i64) {
        self.view_version.fetch_max(u64::try_from(version).unwrap_or(0), Relaxed);
        if let Ok(mut at) = self.last_sync.lock() {
            *at = Some(std::time::Instant::now());
        }
    }

    pub fn flush_failed(&self) {
        self.flush_failures.fetch_add(1, Relaxed);
    }

    /// Whether the database answered the last usage flush; true when that changed its
    /// state (down, or back), for logging once per change.
    pub fn database(&self, up: bool) -> bool {
        self.database_down.swap(!up, Relaxed) == up
    }

    /// The Prometheus text exposition.
    pub fn render(&self, gateways: usize, keys: usize) -> String {
        let mut out = String::new();
        let mut family = |name: &str, kind: &str, help: &str| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
            name.to_string()
        };
        let checks = family("portcullis_checks_total", "counter", "ext_authz Checks by decision.");
        let mut lines = Vec::new();
        for (decision, c) in [
            ("allow", &self.allowed),
            ("missing_key", &self.missing_key),
            ("invalid_key", &self.invalid_key),
            ("rate_limited", &self.rate_limited),
            ("budget_exceeded", &self.budget),
            ("gateway_not_configured", &self.gateway_not_configured),
            ("internal_error", &self.internal),
        ] {
            lines.push(format!("{checks}{{decision=\"{decision}\"}} {}", c.load(Relaxed)));
        }
        for l in lines {
            let _ = writeln!(out, "{l}");
        }
        let simple = [
            (
                "portcullis_metered_responses_total",
                "counter",
                "Responses metered through ext_proc.",
                self.metered_responses.load(Relaxed),
            ),
            (
                "portcullis_metered_responses_without_usage_total",
                "counter",
                "Metered responses that reported no usage.",
                self.usage_missing.load(Relaxed),
            ),
            (
                "portcullis_metering_without_metadata_total",
                "counter",
                "Metered responses (other than denials) without ext_authz metadata: charged to no key; a misconfigured Envoy.",
                self.metering_without_metadata.load(Relaxed),
            ),
            (
                "portcullis_usage_flush_failures_total",
                "counter",
                "Usage flushes that failed (retried).",
                self.flush_failures.load(Relaxed),
            ),
            (
                "portcullis_database_up",
                "gauge",
                "1 while the database answers the usage flush; 0 while usage waits in memory.",
                u64::from(!self.database_down.load(Relaxed)),
            ),
            ("portcullis_gateways", "gauge", "Gateways in the in-memory view.", gateways as u64),
            ("portcullis_keys", "gauge", "Keys in the in-memory view.", keys as u64),
        ];
        for (name, kind, help, v) in simple {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP portcullis_metered_tokens_total Tokens metered, by kind.\n# TYPE portcullis_metered_tokens_total counter\n\
             portcullis_metered_tokens_total{{kind=\"prompt\"}} {}\nportcullis_metered_tokens_total{{kind=\"completion\"}} {}",
            self.prompt_tokens.load(Relaxed),
            self.completion_tokens.load(Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP portcullis_unpriced_model_responses_total Responses of models without a price (counted at cost 0).\n\
             # TYPE portcullis_unpriced_model_responses_total counter"
        );
        if let Some(at) = self.last_sync.lock().ok().and_then(|at| *at) {
            let _ = writeln!(
                out,
                "# HELP portcullis_view_version The highest change version (PostgreSQL) the in-memory view holds.\n\
                 # TYPE portcullis_view_version gauge\nportcullis_view_version {}\n\
                 # HELP portcullis_view_sync_age_seconds Seconds since the view was last brought up to date with storage.\n\
                 # TYPE portcullis_view_sync_age_seconds gauge\nportcullis_view_sync_age_seconds {:.3}",
                self.view_version.load(Relaxed),
                at.elapsed().as_secs_f64()
            );
        }
        if let Ok(m) = self.unpriced.lock() {
            for (model, n) in m.iter() {
                let _ =
                    writeln!(out, "portcullis_unpriced_model_responses_total{{model=\"{}\"}} {n}", LabelValue(model));
            }
        }
        out
    }
}

/// The shared counters' families (replicas with `--redis-url`).
pub fn counter_store(s: crate::shared_counters::CounterStatus) -> String {
    let families = [
        (
            "portcullis_counter_store_up",
            "gauge",
            "1 while the shared counters (Redis) answer; 0 while the failure mode decides.",
            u64::from(s.up),
        ),
        (
            "portcullis_counter_outage_decisions_total",
            "counter",
            "Checks decided by --counter-failure-mode because Redis did not answer.",
            s.outage_decisions,
        ),
        (
            "portcullis_counter_replicas",
            "gauge",
            "Replicas seen alive in Redis (each one's share of a window in the failure mode).",
            u64::from(s.replicas),
        ),
        (
            "portcullis_counter_drift_tokens",
            "gauge",
            "Tokens the usage ledger held beyond Redis at the last reconciliation (raised to the ledger).",
            s.drift_tokens,
        ),
        (
            "portcullis_counter_drift_micro_usd",
            "gauge",
            "Micro-USD the usage ledger held beyond Redis at the last reconciliation (raised to the ledger).",
            s.drift_micros,
        ),
        (
            "portcullis_counter_missed_settles",
            "gauge",
            "Settles Redis did not get (unreachable), waiting to give their reservations back there.",
            s.settles_pending,
        ),
        (
            "portcullis_counter_missed_settles_dropped_total",
            "counter",
            "Missed settles dropped beyond the bound (their reservations wait for --reservation-ttl).",
            s.settles_dropped,
        ),
        (
            "portcullis_counter_seeds_pending",
            "gauge",
            "Key periods Redis lacked, seeded from this replica's memory, whose ledger read (or its retry) is pending.",
            s.seeds_pending,
        ),
        (
            "portcullis_counter_seeds_dropped_total",
            "counter",
            "Ledger reads of key periods seeded from memory dropped beyond the bound (reconciliation raises them later).",
            s.seeds_dropped,
        ),
    ];
    let mut out = String::new();
    for (name, kind, help, v) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
    }
    out
}

/// Scrapers connected at once, at most; beyond it the listener waits for one to leave.
const METRICS_CONNECTIONS: usize = 64;
/// A connection that has not sent a request's headers within this is closed.
const METRICS_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves `GET /metrics`, the text `render` gives at each scrape, until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    render: impl Fn() -> String + Send + Sync + 'static,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics listener on {addr}"))?;
    let local = listener.local_addr()?;
    let render = std::sync::Arc::new(render);
    let task = tokio::spawn(async move {
        let mut listener = listener;
        let permits = std::sync::Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                _ = &mut stop => return Ok(()),
                permit = std::sync::Arc::clone(&permits).acquire_owned() => permit?,
            };
            // An accept error (e.g. out of file descriptors) is logged and retried, never fatal.
            let (stream, _) = tokio::select! {
                _ = &mut stop => return Ok(()),
                accepted = crate::listen::accept_next(&mut listener, "metrics") => accepted,
            };
            let render = std::sync::Arc::clone(&render);
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        (200, render())
                    } else {
                        (404, "not found: try /metrics\n".to_string())
                    };
                    async move {
                        Ok::<_, Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .header("content-type", "text/plain; version=0.0.4")
                                .body(Full::new(Bytes::from(body)))
                                .unwrap_or_default(),
                        )
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(hyper_util::rt::TokioTimer::new())
                    .header_read_timeout(METRICS_HEADER_TIMEOUT)
                    .serve_connection(io, svc)
                    .await;
            });
        }
    });
    Ok((local, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unpriced_lines(m: &Metrics) -> Vec<String> {
        m.render(0, 0)
            .lines()
            .filter(|l| l.starts_with("portcullis_unpriced_model_responses_total{"))
            .map(String::from)
            .collect()
    }

    #[test]
    fn a_model_name_cannot_inject_a_line_or_break_a_label() {
        let m = Metrics::default();
        m.unpriced("evil\"} 1\nportcullis_checks_total{decision=\"allow\"} 999999\n\\");
        let text = m.render(0, 0);
        assert!(!text.contains("\nportcullis_checks_total{decision=\"allow\"} 999999"), "{text}");
        assert_eq!(text.lines().filter(|l| l.starts_with("portcullis_checks_total{decision=\"allow\"}")).count(), 1);
        assert_eq!(
            unpriced_lines(&m),
            [
                r#"portcullis_unpriced_model_responses_total{model="evil\"} 1\nportcullis_checks_total{decision=\"allow\"} 999999\n\\"} 1"#
            ]
        );
    }

    #[test]
    fn unpriced_models_beyond_the_bound_are_counted_as_other() {
        let m = Metrics::default();
        for i in 0..UNPRICED_SERIES {
            assert!(m.unpriced(&format!("model-{i}")), "first sight of model-{i}");
        }
        assert!(!m.unpriced("model-0"), "seen before");
        assert!(m.unpriced("model-100"), "the first model beyond the bound is reported once");
        assert!(!m.unpriced("model-101"));
        let lines = unpriced_lines(&m);
        assert_eq!(lines.len(), UNPRICED_SERIES + 1);
        assert!(lines.contains(&r#"portcullis_unpriced_model_responses_total{model="other"} 2"#.to_string()));
        assert!(lines.contains(&r#"portcullis_unpriced_model_responses_total{model="model-0"} 2"#.to_string()));
        assert!(!lines.iter().any(|l| l.contains("model-100")));
    }

    #[test]
    fn long_model_names_are_cut_on_a_character_boundary() {
        let m = Metrics::default();
        m.unpriced(&"é".repeat(200));
        let lines = unpriced_lines(&m);
        assert_eq!(lines, [format!("portcullis_unpriced_model_responses_total{{model=\"{}\"}} 1", "é".repeat(64))]);
    }
}
