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
    metering_without_metadata: AtomicU64,
    /// Responses of models without a price, by model.
    unpriced: Mutex<BTreeMap<String, u64>>,
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

    /// Counts a response of an unpriced model; true the first time the model is seen.
    pub fn unpriced(&self, model: &str) -> bool {
        let Ok(mut m) = self.unpriced.lock() else { return false };
        let n = m.entry(model.to_string()).or_insert(0);
        *n += 1;
        *n == 1
    }

    /// Counts a metering stream that carried no ext_authz metadata; returns the total.
    pub fn metering_without_metadata(&self) -> u64 {
        self.metering_without_metadata.fetch_add(1, Relaxed).saturating_add(1)
    }

    pub fn flush_failed(&self) {
        self.flush_failures.fetch_add(1, Relaxed);
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
        if let Ok(m) = self.unpriced.lock() {
            for (model, n) in m.iter() {
                let model = model.replace('\\', "\\\\").replace('"', "\\\"");
                let _ = writeln!(out, "portcullis_unpriced_model_responses_total{{model=\"{model}\"}} {n}");
            }
        }
        out
    }
}

/// Serves `GET /metrics` until `stop` resolves.
pub async fn serve(
    addr: SocketAddr,
    shared: std::sync::Arc<crate::state::Shared>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<anyhow::Result<()>>)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the metrics listener on {addr}"))?;
    let local = listener.local_addr()?;
    let task = tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let (stream, _) = tokio::select! {
                _ = &mut stop => return Ok(()),
                accepted = listener.accept() => accepted?,
            };
            let shared = std::sync::Arc::clone(&shared);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
                    let (status, body) = if req.uri().path() == "/metrics" {
                        let (g, k) = shared.view().map(|v| (v.gateway_count(), v.key_count())).unwrap_or((0, 0));
                        (200, shared.metrics.render(g, k))
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
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, svc).await;
            });
        }
    });
    Ok((local, task))
}
