//! One clap struct per command: every setting has a flag, an env var and a default.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::cli::CliCommand;
use crate::shared_counters::FailureMode;

#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about = "API keys with limits for LLM gateways built on Envoy")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// How the admin commands reach the admin API (before or after the subcommand).
    #[command(flatten)]
    pub conn: crate::cli::Connection,
}

// Parsed once per process: the size of `Serve` does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the Envoy-facing (authz) and operator-facing (admin) gRPC listeners.
    Serve(ServeArgs),
    /// Run the database migrations and exit.
    Migrate(DatabaseArgs),
    /// Write a consistent copy of the SQLite database to a new file, also while serving.
    Backup(BackupArgs),
    #[command(flatten)]
    Admin(CliCommand),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServeRole {
    /// Both listeners.
    All,
    /// Only the Envoy-facing listener (ext_authz, ext_proc, health).
    Authz,
    /// Only the admin listener.
    Admin,
}

#[derive(Debug, Clone, Args)]
pub struct DatabaseArgs {
    /// Storage: `sqlite://PATH` (created if missing).
    #[arg(long, env = "PORTCULLIS_DATABASE_URL", default_value = "sqlite://portcullis.db")]
    pub database_url: String,
}

#[derive(Debug, Clone, Args)]
pub struct BackupArgs {
    /// The file to write (must not exist yet).
    pub file: std::path::PathBuf,
    #[command(flatten)]
    pub database: DatabaseArgs,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Envoy-facing listener: ext_authz Check, ext_proc metering, health.
    #[arg(long, env = "PORTCULLIS_AUTHZ_ADDR", default_value = "127.0.0.1:50051")]
    pub authz_addr: SocketAddr,

    /// Operator-facing listener: admin API, health, reflection.
    #[arg(long, env = "PORTCULLIS_ADMIN_ADDR", default_value = "127.0.0.1:50052")]
    pub admin_addr: SocketAddr,

    /// Serve the web console on the admin listener (same port and origin as the admin API,
    /// which also answers gRPC-Web). `--console=false`: paths that are not gRPC get 404.
    #[arg(long, env = "PORTCULLIS_CONSOLE", default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub console: bool,

    /// Threads serving Envoy (ext_authz, ext_proc), each a single-threaded runtime of its own.
    /// One keeps CPU per Check lowest; raise it when one core cannot keep up.
    #[arg(long, env = "PORTCULLIS_AUTHZ_THREADS", default_value_t = 1)]
    pub authz_threads: usize,

    /// Serve Prometheus metrics (`GET /metrics`) on this address; off when unset.
    #[arg(long, env = "PORTCULLIS_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,

    /// Which listeners this process runs.
    #[arg(long, env = "PORTCULLIS_ROLE", value_enum, default_value_t = ServeRole::All)]
    pub role: ServeRole,

    #[command(flatten)]
    pub database: DatabaseArgs,

    /// Shared counters for several replicas (Redis; needs a PostgreSQL --database-url).
    /// Without it counters live in the process (one replica).
    #[arg(long, env = "PORTCULLIS_REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,

    /// While Redis is unreachable: `local` decides with this replica's own counters (its
    /// share of each key's requests per minute, budgets against the last known usage);
    /// `deny` answers 503 for keys with limits. Keys without limits never use Redis.
    #[arg(long, env = "PORTCULLIS_COUNTER_FAILURE_MODE", value_enum, default_value_t = FailureMode::Local)]
    pub counter_failure_mode: FailureMode,

    /// Longest wait for Redis on a Check before the failure mode decides (a few round trips).
    #[arg(long, env = "PORTCULLIS_REDIS_TIMEOUT", default_value = "50ms", value_parser = humantime::parse_duration)]
    pub redis_timeout: Duration,

    /// Encrypt provider credentials at rest: 64 hex characters (`openssl rand -hex 32`).
    #[arg(long, env = "PORTCULLIS_ENCRYPTION_KEY", hide_env_values = true)]
    pub encryption_key: Option<String>,

    /// Make sure an owner management token with this secret exists: at least 32 visible ASCII
    /// characters (`openssl rand -hex 24`). Changing it revokes the token the previous value made.
    #[arg(long, env = "PORTCULLIS_BOOTSTRAP_TOKEN", hide_env_values = true)]
    pub bootstrap_token: Option<String>,

    /// Management tokens unused for this long stop working.
    #[arg(long, env = "PORTCULLIS_SESSION_IDLE_TIMEOUT", default_value = "720h", value_parser = humantime::parse_duration)]
    pub session_idle_timeout: Duration,

    /// Development mode: also accept the management token `test-token` as an owner. Never in production.
    #[arg(long, env = "PORTCULLIS_DEV")]
    pub dev: bool,

    /// How long metered usage is buffered in memory before it is written (a crash loses at most this).
    #[arg(long, env = "PORTCULLIS_USAGE_FLUSH_INTERVAL", default_value = "1s", value_parser = humantime::parse_duration)]
    pub usage_flush_interval: Duration,

    /// A budget reservation metering has not settled after this long is released
    /// (a client gone before the response). Set it above your longest route timeout.
    #[arg(long, env = "PORTCULLIS_RESERVATION_TTL", default_value = "10m", value_parser = humantime::parse_duration)]
    pub reservation_ttl: Duration,

    /// How long SIGTERM waits for in-flight calls before exiting.
    #[arg(long, env = "PORTCULLIS_DRAIN_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,

    /// After SIGTERM, keep serving this long while health reports NOT_SERVING, so load
    /// balancers (Envoy's health checks) move traffic to the other replicas before this one
    /// stops accepting. Set it above two health-check intervals behind a balancer.
    #[arg(long, env = "PORTCULLIS_SHUTDOWN_DELAY", default_value = "0s", value_parser = humantime::parse_duration)]
    pub shutdown_delay: Duration,

    /// TLS on the admin listener: PEM certificate chain (with --admin-tls-key).
    #[arg(long, env = "PORTCULLIS_ADMIN_TLS_CERT", requires = "admin_tls_key")]
    pub admin_tls_cert: Option<PathBuf>,

    /// TLS on the admin listener: PEM private key (with --admin-tls-cert).
    #[arg(long, env = "PORTCULLIS_ADMIN_TLS_KEY", requires = "admin_tls_cert")]
    pub admin_tls_key: Option<PathBuf>,

    /// TLS on the authz listener: PEM certificate chain (with --authz-tls-key).
    #[arg(long, env = "PORTCULLIS_AUTHZ_TLS_CERT", requires = "authz_tls_key")]
    pub authz_tls_cert: Option<PathBuf>,

    /// TLS on the authz listener: PEM private key (with --authz-tls-cert).
    #[arg(long, env = "PORTCULLIS_AUTHZ_TLS_KEY", requires = "authz_tls_cert")]
    pub authz_tls_key: Option<PathBuf>,

    /// Verify client certificates on the authz listener against this PEM CA bundle: only
    /// clients holding a certificate it signed (the mesh's Envoys) can call Check.
    #[arg(long, env = "PORTCULLIS_AUTHZ_TLS_CLIENT_CA", requires = "authz_tls_cert")]
    pub authz_tls_client_ca: Option<PathBuf>,

    /// Open connections each gRPC listener (authz, admin) holds at most; at the cap it stops
    /// accepting until one closes.
    #[arg(long, env = "PORTCULLIS_MAX_CONNECTIONS", default_value_t = 1000)]
    pub max_connections: usize,

    /// A connection that has not completed its TLS handshake and HTTP/2 preface within this
    /// is closed (at most 10s).
    #[arg(long, env = "PORTCULLIS_HANDSHAKE_TIMEOUT", default_value = "5s", value_parser = humantime::parse_duration)]
    pub handshake_timeout: Duration,

    /// Concurrent HTTP/2 streams per connection (Envoy opens another connection beyond it).
    #[arg(long, env = "PORTCULLIS_MAX_CONCURRENT_STREAMS", default_value_t = 1024)]
    pub max_concurrent_streams: u32,

    /// Send an HTTP/2 PING on a connection idle this long ...
    #[arg(long, env = "PORTCULLIS_HTTP2_KEEPALIVE_INTERVAL", default_value = "30s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_interval: Duration,

    /// ... and close it when the PING is not answered within this.
    #[arg(long, env = "PORTCULLIS_HTTP2_KEEPALIVE_TIMEOUT", default_value = "10s", value_parser = humantime::parse_duration)]
    pub http2_keepalive_timeout: Duration,

    /// An admin call that has not finished after this fails with DEADLINE_EXCEEDED (clients
    /// may ask for less with grpc-timeout).
    #[arg(long, env = "PORTCULLIS_ADMIN_REQUEST_TIMEOUT", default_value = "30s", value_parser = humantime::parse_duration)]
    pub admin_request_timeout: Duration,

    /// Admin writes one management token may make at once ...
    #[arg(long, env = "PORTCULLIS_ADMIN_WRITE_BURST", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub admin_write_burst: u32,

    /// ... and then per second (a refused write gets RESOURCE_EXHAUSTED with when to retry).
    #[arg(long, env = "PORTCULLIS_ADMIN_WRITES_PER_SECOND", default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub admin_writes_per_second: u32,

    /// Keys one gateway may have (creating or importing more is refused).
    #[arg(long, env = "PORTCULLIS_MAX_KEYS_PER_GATEWAY", default_value_t = 1_000_000)]
    pub max_keys_per_gateway: usize,

    /// Audit events older than this are deleted (hourly); 0 keeps them all.
    #[arg(long, env = "PORTCULLIS_AUDIT_RETENTION", default_value = "365d", value_parser = humantime::parse_duration)]
    pub audit_retention: Duration,

    /// Usage history (each key's usage per hour and model, for charts) older than this is
    /// deleted (hourly); 0 keeps it all.
    #[arg(long, env = "PORTCULLIS_USAGE_HISTORY_RETENTION", default_value = "90d", value_parser = humantime::parse_duration)]
    pub usage_history_retention: Duration,

    /// Log filter (tracing `EnvFilter` syntax), e.g. `info` or `portcullis=debug`.
    #[arg(long, env = "PORTCULLIS_LOG", default_value = "info")]
    pub log: String,
}
