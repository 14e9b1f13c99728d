//! Wiring: open storage, migrate, load the in-memory view, start listeners, drain on signal.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tonic::service::interceptor::InterceptedService as Intercepted;
use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::admin::PricingApi;
use crate::admin::access::AccessServiceServer;
use crate::admin::audit::AuditServiceServer;
use crate::admin::bootstrap::ensure_access;
use crate::admin::gateways::GatewayServiceServer;
use crate::admin::keys::KeyServiceServer;
use crate::admin::pricing::PricingServiceServer;
use crate::admin::usage::{UsageApi, UsageServiceServer};
use crate::admin::{AccessApi, AuditApi};
use crate::admin::{Admin, AdminAuth, AdminLimits, GatewayApi, KeyApi, MAX_REQUEST_BYTES};
use crate::authz::{self, AuthzService, MeterService, Services};
use crate::config::{ServeArgs, ServeRole};
use crate::console::AdminHttp;
use crate::domain::access::Rate;
use crate::domain::budget::Meters;
use crate::domain::check::Limiters;
use crate::domain::clock::Clock;
use crate::domain::counters::{Counters, InProcess};
use crate::domain::pricing::PriceBook;
use crate::domain::tokens::TokenRegistry;
use crate::domain::view::View;
use crate::listen::{self, FrontDoor, Limits, Protocols};
use crate::shared_counters::{self, SharedCounters};
use crate::state::Shared;
use crate::store::{self, DynStore};
use crate::upkeep::{self, Upkeep};

/// Names reported by `grpc.health.v1.Health` (besides the overall ""), per side.
const AUTHZ_HEALTH: &[&str] = &["envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor"];
const ADMIN_HEALTH: &[&str] = &[
    "portcullis.admin.v1.GatewayService",
    "portcullis.admin.v1.KeyService",
    "portcullis.admin.v1.PricingService",
    "portcullis.admin.v1.AccessService",
    "portcullis.admin.v1.AuditService",
    "portcullis.admin.v1.UsageService",
];

/// The service names this role serves, "" first.
fn health_names(role: ServeRole) -> Vec<&'static str> {
    let mut names = vec![""];
    if role != ServeRole::Admin {
        names.extend_from_slice(AUTHZ_HEALTH);
    }
    if role != ServeRole::Authz {
        names.extend_from_slice(ADMIN_HEALTH);
    }
    names
}

/// A started server.
pub struct Running {
    pub authz_addr: Option<SocketAddr>,
    pub admin_addr: Option<SocketAddr>,
    pub metrics_addr: Option<SocketAddr>,
    pub shared: Arc<Shared>,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<anyhow::Result<()>>>,
    health: HealthReporter,
    health_names: Vec<&'static str>,
    drain_timeout: Duration,
    shutdown_delay: Duration,
    store: DynStore,
}

/// Opens storage, runs migrations and nothing else.
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    let store = store::open(database_url, store::sealing::Sealer::default())
        .await
        .with_context(|| format!("opening {}", store::redact_url(database_url)))?;
    store.migrate().await.context("running migrations")?;
    Ok(())
}

/// Writes a consistent copy of the database at `url` to `to` (a new file).
pub async fn backup(url: &str, to: &std::path::Path) -> anyhow::Result<()> {
    let store = store::open_existing(url, store::sealing::Sealer::default())
        .await
        .with_context(|| format!("opening {}", store::redact_url(url)))?;
    store.backup(to).await.with_context(|| format!("backing up to {}", to.display()))?;
    store.release().await;
    eprintln!("backed up {} to {}", store::redact_url(url), to.display());
    Ok(())
}

/// Serves Envoy on a runtime of its own with one thread: the request path never pays for
/// cross-thread wake-ups (measured: ~10 % less CPU per Check than on the shared runtime).
/// Returns once the listener has drained and the metering it started has been recorded.
fn serve_authz(
    listener: std::net::TcpListener,
    door: FrontDoor,
    limits: Limits,
    shared: Arc<Shared>,
    health: tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
    drain: Duration,
) -> anyhow::Result<()> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the authz runtime")?;
    rt.block_on(async {
        let incoming = door.incoming(TcpListener::from_std(listener)?);
        let services = Services {
            authz: Arc::new(AuthzService::new(Arc::clone(&shared))),
            meter: Arc::new(MeterService::new(Arc::clone(&shared))),
            health,
        };
        authz::serve(incoming, limits, services, stop).await;
        // Metering tasks live on this runtime: let them record before it goes away.
        let _ = tokio::time::timeout(drain, shared.metering_recorded()).await;
        Ok(())
    })
}

async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding the {what} listener on {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

pub async fn start(args: &ServeArgs, clock: Arc<dyn Clock>) -> anyhow::Result<Running> {
    let limits = Limits::from_args(args)?;
    let (authz_tls, admin_tls) = listen::tls_from_args(args)?;
    listen::raise_open_files_limit(&limits);
    let url = store::redact_url(&args.database.database_url);
    let sealer = store::sealing::Sealer::from_key(args.encryption_key.as_deref()).map_err(anyhow::Error::msg)?;
    let store = store::open(&args.database.database_url, sealer).await.with_context(|| format!("opening {url}"))?;
    if args.redis_url.is_some() && !store.is_shared() {
        bail!("--redis-url needs a PostgreSQL --database-url: SQLite serves one replica");
    }
    store.migrate().await.context("running migrations")?;
    // Replicas with shared counters share the database; without them, one serves it.
    match args.redis_url {
        None => store.claim().await.context("claiming the database")?,
        Some(_) => store.claim_shared().await.context("claiming the database")?,
    }
    // Following other replicas' changes starts from before the load, not from scratch
    // (which would read every key again at once).
    let cursor = store.change_cursor().await.context("reading the change cursor")?;
    // Keys go into the view as storage reads them: never all held twice, and its tables
    // sized once (growing them re-reads every key).
    let mut view = View::default();
    view.reserve_keys(usize::try_from(store.count_keys().await.context("counting keys")?).unwrap_or(0));
    let snapshot = store
        .load_each(&mut |k, secrets| view.upsert_key(k, secrets))
        .await
        .context("loading gateways, keys and tokens")?;
    let idle = chrono::Duration::from_std(args.session_idle_timeout).context("--session-idle-timeout is too large")?;
    if idle <= chrono::Duration::zero() {
        bail!("--session-idle-timeout must be longer than 0s");
    }
    let mut tokens = TokenRegistry::new(snapshot.access_tokens, args.dev, idle);
    let first_owner = args.role != ServeRole::Authz;
    ensure_access(&*store, &mut tokens, args.bootstrap_token.as_deref(), first_owner, clock.now()).await?;
    if args.dev {
        tracing::warn!(
            "--dev is on: the management token `test-token` is accepted as an owner; never use this in production"
        );
    }
    for g in snapshot.gateways {
        view.upsert_gateway(g);
    }
    tracing::info!(database = %url, gateways = view.gateway_count(), keys = view.key_count(), "storage migrated and view loaded");
    let meters = Arc::new(Meters::new(snapshot.usage));
    let mut limiters = Limiters::in_process(Arc::clone(&meters), PriceBook::new(snapshot.prices));
    let mut shared_counters = None;
    if let Some(url) = &args.redis_url {
        let settings = shared_counters::Settings {
            url: url.clone(),
            timeout: args.redis_timeout,
            failure_mode: args.counter_failure_mode,
            reservation_ttl: args.reservation_ttl,
        };
        let counters = Arc::new(SharedCounters::new(settings, InProcess::new(meters)).map_err(anyhow::Error::msg)?);
        match shared_counters::ping(&counters).await {
            Ok(()) => tracing::info!(redis = %shared_counters::redact(url), "shared counters (Redis) reachable"),
            Err(e) => tracing::error!(
                redis = %shared_counters::redact(url),
                error = %e,
                mode = ?args.counter_failure_mode,
                "shared counters (Redis) unreachable at start: deciding in the failure mode until it answers"
            ),
        }
        limiters.counters = Arc::clone(&counters) as Arc<dyn Counters>;
        shared_counters = Some(counters);
    }
    let mut shared = Shared::new(view, tokens, limiters, clock);
    shared.shared_counters = shared_counters;
    let shared = Arc::new(shared);

    let ttl = chrono::Duration::from_std(args.reservation_ttl).context("--reservation-ttl is too large")?;
    let retention = chrono::Duration::from_std(args.audit_retention).context("--audit-retention is too large")?;
    upkeep::spawn(
        &shared,
        &store,
        Upkeep {
            reservation_ttl: ttl,
            audit_retention: retention,
            usage_history_retention: chrono::Duration::from_std(args.usage_history_retention)
                .context("--usage-history-retention is too large")?,
            flush_every: args.usage_flush_interval,
        },
    );
    crate::sync::spawn(&shared, &store, cursor);

    let (health, health_server) = tonic_health::server::health_reporter();
    let (shutdown, rx) = watch::channel(false);
    let signal = move || {
        let mut rx = rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    let mut tasks = Vec::new();
    let mut authz_addr = None;
    let mut admin_addr = None;

    if args.role != ServeRole::Admin {
        let listener = std::net::TcpListener::bind(args.authz_addr)
            .with_context(|| format!("binding the authz listener on {}", args.authz_addr))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        authz_addr = Some(addr);
        let threads = args.authz_threads.max(1);
        let tls = authz_tls.is_some();
        // One connection cap across the threads sharing the listener.
        let door = FrontDoor::new("authz", &limits, authz_tls, Protocols::Http2);
        for _ in 0..threads {
            let listener = listener.try_clone().context("sharing the authz listener")?;
            let (door, shared, health, stop, drain) =
                (door.clone(), Arc::clone(&shared), health_server.clone(), signal(), args.drain_timeout);
            tasks.push(tokio::task::spawn_blocking(move || {
                serve_authz(listener, door, limits, shared, health, stop, drain)
            }));
        }
        let client_certs = args.authz_tls_client_ca.is_some();
        tracing::info!(%addr, threads, tls, client_certs, "authz listener (ext_authz, ext_proc, health) ready");
    }
    if args.role != ServeRole::Authz {
        let (listener, addr) = bind(args.admin_addr, "admin").await?;
        let tls = admin_tls.is_some();
        let incoming = FrontDoor::new("admin", &limits, admin_tls, Protocols::Http2AndHttp1).incoming(listener);
        admin_addr = Some(addr);
        let writes = Rate {
            burst: args.admin_write_burst,
            interval: chrono::Duration::microseconds(1_000_000 / i64::from(args.admin_writes_per_second.max(1))),
        };
        let admin_limits = AdminLimits { writes, max_keys_per_gateway: args.max_keys_per_gateway };
        let admin = Admin::new(Arc::clone(&shared), Arc::clone(&store), admin_limits);
        let auth = AdminAuth::new(Arc::clone(&shared));
        let reflection_v1 = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()
            .context("building reflection v1")?;
        let reflection_v1alpha = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(crate::pb::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1alpha()
            .context("building reflection v1alpha")?;
        let routes = tonic::service::Routes::new(health_server.clone())
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(Intercepted::new(
                GatewayServiceServer::new(GatewayApi(Arc::clone(&admin))).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth.clone(),
            ))
            .add_service(Intercepted::new(
                KeyServiceServer::new(KeyApi(Arc::clone(&admin))).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth.clone(),
            ))
            .add_service(Intercepted::new(
                PricingServiceServer::new(PricingApi(Arc::clone(&admin))).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth.clone(),
            ))
            .add_service(Intercepted::new(
                AccessServiceServer::new(AccessApi(Arc::clone(&admin))).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth.clone(),
            ))
            .add_service(Intercepted::new(
                AuditServiceServer::new(AuditApi(Arc::clone(&admin))).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth.clone(),
            ))
            .add_service(Intercepted::new(
                UsageServiceServer::new(UsageApi(admin)).max_decoding_message_size(MAX_REQUEST_BYTES),
                auth,
            ));
        // gRPC, gRPC-Web (browsers: HTTP/1.1 too) and the console's files on one port.
        let service = AdminHttp::new(routes, args.console);
        let server = limits.server().timeout(args.admin_request_timeout).accept_http1(true);
        let stop = signal();
        tasks
            .push(tokio::spawn(async move { Ok(server.serve_with_incoming_shutdown(service, incoming, stop).await?) }));
        let console = args.console;
        tracing::info!(%addr, tls, console, "admin listener (admin API, gRPC-Web, health, reflection, console) ready");
    }
    let mut metrics_addr = None;
    if let Some(addr) = args.metrics_addr {
        let scraped = Arc::clone(&shared);
        let render = move || {
            let (g, k) = scraped.view().map(|v| (v.gateway_count(), v.key_count())).unwrap_or((0, 0));
            let mut text = scraped.metrics.render(g, k);
            if let Some(c) = &scraped.shared_counters {
                text.push_str(&crate::metrics::counter_store(c.status()));
            }
            text
        };
        let (local, task) = crate::metrics::serve(addr, render, signal()).await?;
        metrics_addr = Some(local);
        tasks.push(task);
        tracing::info!(addr = %local, "metrics listener (/metrics) ready");
    }
    let health_names = health_names(args.role);
    for name in &health_names {
        health.set_service_status(name, ServingStatus::Serving).await;
    }
    Ok(Running {
        authz_addr,
        admin_addr,
        metrics_addr,
        shared,
        shutdown,
        tasks,
        health,
        health_names,
        drain_timeout: args.drain_timeout,
        shutdown_delay: args.shutdown_delay,
        store,
    })
}

impl Running {
    /// Health to NOT_SERVING, stop accepting, finish in-flight calls (bounded), flush usage.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        for name in &self.health_names {
            self.health.set_service_status(name, ServingStatus::NotServing).await;
        }
        if !self.shutdown_delay.is_zero() {
            tracing::info!(delay = ?self.shutdown_delay, "NOT_SERVING: still answering while balancers move traffic away");
            tokio::time::sleep(self.shutdown_delay).await;
        }
        let _ = self.shutdown.send(true);
        let deadline = tokio::time::Instant::now() + self.drain_timeout;
        let drain = async {
            // The authz listeners return once the metering they started is recorded.
            for task in self.tasks {
                task.await.context("listener task panicked")?.context("listener failed")?;
            }
            anyhow::Ok(())
        };
        let drained = match tokio::time::timeout_at(deadline, drain).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(timeout = ?self.drain_timeout, "drain timed out; exiting with calls still open");
                Ok(())
            }
        };
        if let Some(counters) = &self.shared.shared_counters {
            // The other replicas' shares of each window grow at once.
            counters.leave().await;
        }
        if !upkeep::flush_usage(&*self.store, &self.shared, true).await {
            tracing::error!("usage of the last second could not be written");
        }
        self.store.release().await;
        drained
    }
}

/// Runs `serve` until SIGTERM or Ctrl-C, then drains.
pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let running = start(&args, Arc::new(crate::domain::clock::SystemClock)).await?;
    wait_for_signal().await?;
    tracing::info!("shutting down: health NOT_SERVING, draining");
    running.shutdown().await?;
    tracing::info!("stopped");
    Ok(())
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::select! {
        _ = term.recv() => {}
        r = tokio::signal::ctrl_c() => r.context("waiting for Ctrl-C")?,
    }
    Ok(())
}
