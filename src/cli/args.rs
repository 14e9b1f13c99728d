//! The admin client's command line: the global connection flags and one clap type per
//! resource command, with its flags and their help.

use std::path::PathBuf;

use clap::{Args, Subcommand, ValueEnum};

use crate::pb;

#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Admin API address.
    #[arg(long, env = "PORTCULLIS_ADMIN_URL", default_value = "http://127.0.0.1:50052", global = true)]
    pub admin_url: String,
    /// Management token.
    #[arg(long, env = "PORTCULLIS_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
    /// Trust this PEM CA (a private CA) for an https:// admin URL instead of the system roots.
    #[arg(long, env = "PORTCULLIS_CA", global = true)]
    pub ca: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum CliCommand {
    /// Create, list, inspect, update and delete gateways; see their usage over time.
    Gateways {
        #[command(subcommand)]
        cmd: GatewaysCmd,
    },
    /// Create, list, enable, disable, update, rotate and delete API keys; see their usage.
    Keys {
        #[command(subcommand)]
        cmd: KeysCmd,
    },
    /// Model prices (USD per million tokens) used to meter cost.
    Prices {
        #[command(subcommand)]
        cmd: PricesCmd,
    },
    /// Management tokens: create, list, revoke, whoami.
    Tokens {
        #[command(subcommand)]
        cmd: TokensCmd,
    },
    /// The audit trail: admin changes and refused calls, newest first.
    Audit(AuditArgs),
}

/// `portcullis audit` filters; all apply together.
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only events of this gateway.
    #[arg(long)]
    pub gateway: Option<String>,
    /// Only calls made by this management token (its name or id).
    #[arg(long)]
    pub actor: Option<String>,
    /// Only this RPC (KeyService/UpdateKey) or every RPC of a service (KeyService).
    #[arg(long)]
    pub action: Option<String>,
    /// Only events about this target (a gateway name, key id, model or token id).
    #[arg(long)]
    pub target: Option<String>,
    /// Only events at or after this time: RFC 3339, or a duration ago (e.g. 24h, 7d).
    #[arg(long)]
    pub since: Option<String>,
    /// Only events before this time: RFC 3339, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// At most this many events.
    #[arg(long, default_value_t = 50)]
    pub limit: usize,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum StatusArg {
    Active,
    Disabled,
    Expired,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum OrderArg {
    Name,
    CreatedAt,
    LastUsedAt,
    ExpiresAt,
    Spend,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum GranularityArg {
    Hour,
    Day,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Location {
    Header,
    Query,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Period {
    Never,
    Daily,
    Weekly,
    Monthly,
}

#[derive(Debug, Args)]
pub struct GatewaySettings {
    /// Header or query parameter clients put their key in (default x-api-key).
    #[arg(long)]
    pub(super) key_name: Option<String>,
    /// Where clients put their key.
    #[arg(long, value_enum)]
    pub(super) key_location: Option<Location>,
    /// Header that carries the provider credential upstream, e.g. authorization.
    #[arg(long)]
    pub(super) upstream_header: Option<String>,
    /// The provider credential, e.g. "Bearer sk-…" (write-only). Prefer the env var.
    #[arg(long, env = "PORTCULLIS_UPSTREAM_VALUE", hide_env_values = true)]
    pub(super) upstream_value: Option<String>,
    /// Tokens reserved for a request that names no max_tokens.
    #[arg(long)]
    pub(super) default_reservation_tokens: Option<u64>,
}

#[derive(Debug, Subcommand)]
pub enum GatewaysCmd {
    Create {
        name: String,
        #[command(flatten)]
        settings: GatewaySettings,
    },
    List,
    /// One gateway.
    Get {
        name: String,
    },
    Update {
        name: String,
        #[command(flatten)]
        settings: GatewaySettings,
        /// Stop sending a provider credential.
        #[arg(long, conflicts_with_all = ["upstream_header", "upstream_value"])]
        clear_upstream: bool,
    },
    Delete {
        name: String,
        /// Also delete the gateway's keys.
        #[arg(long)]
        force: bool,
    },
    /// Usage of all the gateway's keys over time, per hour or day (UTC), optionally per model.
    History {
        name: String,
        #[command(flatten)]
        range: HistoryArgs,
    },
}

/// The buckets `keys history` and `gateways history` ask for.
#[derive(Debug, Args)]
pub struct HistoryArgs {
    /// Bucket width.
    #[arg(long, value_enum, default_value = "day")]
    pub(super) by: GranularityArg,
    /// How many days back from now (hourly: at most 31; daily: at most 366).
    #[arg(long, default_value_t = 7)]
    pub(super) days: u32,
    /// One row per model.
    #[arg(long)]
    pub(super) by_model: bool,
}

#[derive(Debug, Args)]
pub struct LimitArgs {
    /// Spend cap in USD per period, e.g. 12.50.
    #[arg(long)]
    cost_limit: Option<String>,
    /// Token cap per period.
    #[arg(long)]
    token_limit: Option<u64>,
    /// Requests per rolling 60-second window.
    #[arg(long)]
    rpm: Option<u32>,
    /// When cost and token counters reset (UTC).
    #[arg(long, value_enum)]
    reset_period: Option<Period>,
}

impl LimitArgs {
    pub(super) fn any(&self) -> bool {
        self.cost_limit.is_some() || self.token_limit.is_some() || self.rpm.is_some() || self.reset_period.is_some()
    }

    pub(super) fn to_pb(&self) -> pb::Limits {
        pb::Limits {
            cost_limit_usd: self.cost_limit.clone(),
            token_limit: self.token_limit,
            requests_per_minute: self.rpm,
            reset_period: match self.reset_period.unwrap_or(Period::Never) {
                Period::Never => pb::ResetPeriod::Never,
                Period::Daily => pb::ResetPeriod::Daily,
                Period::Weekly => pb::ResetPeriod::Weekly,
                Period::Monthly => pb::ResetPeriod::Monthly,
            } as i32,
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum KeysCmd {
    /// Create a key; its secret is printed once.
    Create {
        name: String,
        #[arg(long)]
        gateway: String,
        #[command(flatten)]
        limits: LimitArgs,
        /// Expiry, RFC 3339 (e.g. 2027-01-01T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List a gateway's keys: name, prefix, status, limits, this period's usage, created, expires.
    List {
        #[arg(long)]
        gateway: String,
        /// Only keys whose name contains this (ignoring case).
        #[arg(long)]
        name: Option<String>,
        /// Only keys with this status.
        #[arg(long, value_enum)]
        status: Option<StatusArg>,
        /// Order by this (default: creation order).
        #[arg(long, value_enum)]
        order_by: Option<OrderArg>,
        /// Largest first.
        #[arg(long)]
        desc: bool,
        /// Fetch at most this many (default: all pages).
        #[arg(long)]
        limit: Option<usize>,
    },
    /// One key.
    Get { id: String },
    /// Let the key authenticate again (any time).
    Enable { id: String },
    /// Refuse the key from the next request on.
    Disable { id: String },
    /// Rename, change limits (replaces all of them) or expiry.
    Update {
        id: String,
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        limits: LimitArgs,
        #[arg(long)]
        expires_at: Option<String>,
        #[arg(long, conflicts_with = "expires_at")]
        clear_expires_at: bool,
    },
    /// Delete a key permanently.
    Delete { id: String },
    /// The Overview: usage in the current period against the key's limits.
    Usage { id: String },
    /// Usage over time, per hour or day (UTC), optionally per model.
    History {
        id: String,
        #[command(flatten)]
        range: HistoryArgs,
    },
    /// A new secret for the key (printed once); the old one works for --grace.
    Rotate {
        id: String,
        /// How long the old secret keeps working, e.g. 10m, 24h (default: stops now).
        #[arg(long, value_parser = humantime::parse_duration)]
        grace: Option<std::time::Duration>,
    },
    /// Bring a key clients already use under management (no limits). Reads the secret
    /// from PORTCULLIS_LEGACY_SECRET or --secret.
    ImportLegacy {
        name: String,
        #[arg(long)]
        gateway: String,
        #[arg(long, env = "PORTCULLIS_LEGACY_SECRET", hide_env_values = true)]
        secret: String,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum RoleArg {
    Owner,
    Admin,
    Developer,
}

#[derive(Debug, Subcommand)]
pub enum TokensCmd {
    /// Create a management token; its secret is printed once.
    Create {
        name: String,
        #[arg(long, value_enum)]
        role: RoleArg,
        /// Limit the token to these gateways (repeat or comma-separate); default: all.
        #[arg(long, value_delimiter = ',')]
        gateway: Vec<String>,
        /// Expiry, RFC 3339.
        #[arg(long)]
        expires_at: Option<String>,
    },
    List,
    Revoke {
        id: String,
    },
    /// The token you are using.
    Whoami,
}

#[derive(Debug, Subcommand)]
pub enum PricesCmd {
    /// Set a model's price, e.g. `prices set gpt-4o-mini --input 0.15 --output 0.60`.
    Set {
        model: String,
        /// USD per million prompt tokens.
        #[arg(long)]
        input: String,
        /// USD per million completion tokens.
        #[arg(long)]
        output: String,
    },
    List,
    Delete {
        model: String,
    },
}
