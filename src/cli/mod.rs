//! The admin client: `portcullis gateways …`, `portcullis keys …`.
//! Tables for people, `--json` for scripts, one-line errors.

mod output;

use std::path::PathBuf;

use anyhow::{Context, anyhow, bail};
use clap::{Args, Subcommand, ValueEnum};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use crate::pb;
use crate::pb::access_service_client::AccessServiceClient;
use crate::pb::audit_service_client::AuditServiceClient;
use crate::pb::gateway_service_client::GatewayServiceClient;
use crate::pb::key_service_client::KeyServiceClient;
use crate::pb::pricing_service_client::PricingServiceClient;

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
    /// Create, list, inspect, update and delete gateways.
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
    Audit {
        /// Only events of this gateway.
        #[arg(long)]
        gateway: Option<String>,
        /// At most this many events.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
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
    key_name: Option<String>,
    /// Where clients put their key.
    #[arg(long, value_enum)]
    key_location: Option<Location>,
    /// Header that carries the provider credential upstream, e.g. authorization.
    #[arg(long)]
    upstream_header: Option<String>,
    /// The provider credential, e.g. "Bearer sk-…" (write-only). Prefer the env var.
    #[arg(long, env = "PORTCULLIS_UPSTREAM_VALUE", hide_env_values = true)]
    upstream_value: Option<String>,
    /// Tokens reserved for a request that names no max_tokens.
    #[arg(long)]
    default_reservation_tokens: Option<u64>,
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
    fn any(&self) -> bool {
        self.cost_limit.is_some() || self.token_limit.is_some() || self.rpm.is_some() || self.reset_period.is_some()
    }

    fn to_pb(&self) -> pb::Limits {
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
    /// List a gateway's keys: name, prefix, status, limits, created, expires.
    List {
        #[arg(long)]
        gateway: String,
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

/// Adds `authorization: Bearer <token>` to every call.
#[derive(Clone)]
pub struct BearerAuth(MetadataValue<tonic::metadata::Ascii>);

impl BearerAuth {
    pub fn new(token: &str) -> anyhow::Result<Self> {
        MetadataValue::try_from(format!("Bearer {}", token.trim()))
            .map(BearerAuth)
            .map_err(|_| anyhow!("the management token has characters that cannot be sent"))
    }
}

impl tonic::service::Interceptor for BearerAuth {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

type Svc = InterceptedService<Channel, BearerAuth>;

/// An authenticated channel to the admin API.
async fn connect(conn: &Connection) -> anyhow::Result<(Channel, BearerAuth)> {
    let token =
        conn.token.as_deref().ok_or_else(|| anyhow!("no management token: pass --token or set PORTCULLIS_TOKEN"))?;
    let auth = BearerAuth::new(token)?;
    let endpoint = Endpoint::from_shared(conn.admin_url.clone())
        .with_context(|| format!("invalid --admin-url '{}'", conn.admin_url))?
        .connect_timeout(std::time::Duration::from_secs(5));
    let https = endpoint.uri().scheme_str() == Some("https");
    // https verifies the server: against --ca when given, else the system's roots.
    let endpoint = match (&conn.ca, https) {
        (Some(_), false) => bail!("--ca needs an https:// --admin-url (got {})", conn.admin_url),
        (Some(ca), true) => {
            let pem = std::fs::read(ca).with_context(|| format!("--ca: cannot read {}", ca.display()))?;
            crate::pem::read_certs("--ca", ca)?;
            endpoint.tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem)))?
        }
        (None, true) => endpoint.tls_config(ClientTlsConfig::new().with_native_roots())?,
        (None, false) => endpoint,
    };
    let channel = endpoint.connect().await.map_err(|e| connect_error(conn, &e))?;
    Ok((channel, auth))
}

/// Why the admin API could not be reached, in one line; an untrusted certificate says how to
/// trust it.
fn connect_error(conn: &Connection, e: &(dyn std::error::Error + 'static)) -> anyhow::Error {
    let mut cause = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.contains("certificate") {
        let hint = if conn.ca.is_some() {
            "check that --ca holds the CA that signed the admin listener's certificate and that the URL's host is in it"
        } else {
            "pass --ca <pem> (or PORTCULLIS_CA) with the CA that signed the admin listener's certificate"
        };
        return anyhow!("TLS: the admin API at {} was not verified ({cause}); {hint}", conn.admin_url);
    }
    anyhow!("cannot reach the admin API at {} ({cause})", conn.admin_url)
}

/// A gRPC status as one line: "key not found (NOT_FOUND)".
fn status_err(s: Status) -> anyhow::Error {
    anyhow!("{} ({})", s.message(), crate::pb::code_name(s.code()))
}

fn timestamp(field: &str, s: &str) -> anyhow::Result<prost_types::Timestamp> {
    let t =
        chrono::DateTime::parse_from_rfc3339(s).with_context(|| format!("{field}: '{s}' is not an RFC 3339 time"))?;
    Ok(prost_types::Timestamp { seconds: t.timestamp(), nanos: t.timestamp_subsec_nanos() as i32 })
}

fn inbound(s: &GatewaySettings) -> Option<pb::InboundAuth> {
    (s.key_name.is_some() || s.key_location.is_some()).then(|| pb::InboundAuth {
        key_name: s.key_name.clone().unwrap_or_default(),
        location: match s.key_location.unwrap_or(Location::Header) {
            Location::Header => pb::KeyLocation::Header,
            Location::Query => pb::KeyLocation::Query,
        } as i32,
    })
}

fn upstream(s: &GatewaySettings) -> Option<pb::UpstreamAuth> {
    (s.upstream_header.is_some() || s.upstream_value.is_some()).then(|| pb::UpstreamAuth {
        header_name: s.upstream_header.clone().unwrap_or_default(),
        value: s.upstream_value.clone().unwrap_or_default(),
        value_set: false,
    })
}

pub async fn run(cmd: CliCommand, conn: Connection) -> anyhow::Result<()> {
    let conn = &conn;
    match cmd {
        CliCommand::Gateways { cmd } => gateways(conn, cmd).await,
        CliCommand::Keys { cmd } => keys(conn, cmd).await,
        CliCommand::Prices { cmd } => prices(conn, cmd).await,
        CliCommand::Tokens { cmd } => tokens(conn, cmd).await,
        CliCommand::Audit { gateway, limit } => audit(conn, gateway, limit).await,
    }
}

async fn gateways(conn: &Connection, cmd: GatewaysCmd) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: GatewayServiceClient<Svc> = GatewayServiceClient::with_interceptor(channel, auth);
    let out = output::Out { json: conn.json };
    match cmd {
        GatewaysCmd::Create { name, settings } => {
            let g = client
                .create_gateway(pb::CreateGatewayRequest {
                    name,
                    inbound_auth: inbound(&settings),
                    upstream_auth: upstream(&settings),
                    default_reservation_tokens: settings.default_reservation_tokens.unwrap_or(0),
                })
                .await
                .map_err(status_err)?;
            out.gateways(&[g.into_inner()]);
        }
        GatewaysCmd::List => {
            let list = client.list_gateways(pb::ListGatewaysRequest {}).await.map_err(status_err)?;
            out.gateways(&list.into_inner().gateways);
        }
        GatewaysCmd::Get { name } => {
            let g = client.get_gateway(pb::GetGatewayRequest { name }).await.map_err(status_err)?;
            out.gateways(&[g.into_inner()]);
        }
        GatewaysCmd::Update { name, settings, clear_upstream } => {
            let upstream_auth = if clear_upstream { Some(pb::UpstreamAuth::default()) } else { upstream(&settings) };
            let g = client
                .update_gateway(pb::UpdateGatewayRequest {
                    name,
                    inbound_auth: inbound(&settings),
                    upstream_auth,
                    default_reservation_tokens: settings.default_reservation_tokens,
                })
                .await
                .map_err(status_err)?;
            out.gateways(&[g.into_inner()]);
        }
        GatewaysCmd::Delete { name, force } => {
            let r = client
                .delete_gateway(pb::DeleteGatewayRequest { name: name.clone(), force })
                .await
                .map_err(status_err)?
                .into_inner();
            out.message(
                serde_json::json!({"deleted": name, "deleted_keys": r.deleted_keys}),
                &format!("Deleted gateway {name} and {} keys", r.deleted_keys),
            );
        }
    }
    Ok(())
}

async fn keys(conn: &Connection, cmd: KeysCmd) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: KeyServiceClient<Svc> = KeyServiceClient::with_interceptor(channel, auth);
    let out = output::Out { json: conn.json };
    let set_enabled =
        |id: String, enabled: bool| pb::UpdateKeyRequest { id, enabled: Some(enabled), ..Default::default() };
    match cmd {
        KeysCmd::Create { name, gateway, limits, expires_at } => {
            let expires_at = expires_at.as_deref().map(|s| timestamp("--expires-at", s)).transpose()?;
            let r = client
                .create_key(pb::CreateKeyRequest {
                    gateway,
                    name,
                    limits: limits.any().then(|| limits.to_pb()),
                    expires_at,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            out.created_key(&r);
        }
        KeysCmd::List { gateway, limit } => {
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = client
                    .list_keys(pb::ListKeysRequest { gateway: gateway.clone(), page_size: 1000, page_token })
                    .await
                    .map_err(status_err)?
                    .into_inner();
                all.extend(page.keys);
                if page.next_page_token.is_empty() || limit.is_some_and(|l| all.len() >= l) {
                    break;
                }
                page_token = page.next_page_token;
            }
            if let Some(l) = limit {
                all.truncate(l);
            }
            out.keys(&all);
        }
        KeysCmd::Get { id } => {
            let k = client.get_key(pb::GetKeyRequest { id }).await.map_err(status_err)?;
            out.keys(&[k.into_inner()]);
        }
        KeysCmd::Enable { id } => {
            let k = client.update_key(set_enabled(id, true)).await.map_err(status_err)?;
            out.keys(&[k.into_inner()]);
        }
        KeysCmd::Disable { id } => {
            let k = client.update_key(set_enabled(id, false)).await.map_err(status_err)?;
            out.keys(&[k.into_inner()]);
        }
        KeysCmd::Update { id, name, limits, expires_at, clear_expires_at } => {
            let expires_at = expires_at.as_deref().map(|s| timestamp("--expires-at", s)).transpose()?;
            let k = client
                .update_key(pb::UpdateKeyRequest {
                    id,
                    name,
                    enabled: None,
                    limits: limits.any().then(|| limits.to_pb()),
                    expires_at,
                    clear_expires_at,
                })
                .await
                .map_err(status_err)?;
            out.keys(&[k.into_inner()]);
        }
        KeysCmd::Delete { id } => {
            client.delete_key(pb::DeleteKeyRequest { id: id.clone() }).await.map_err(status_err)?;
            out.message(serde_json::json!({"deleted": id}), &format!("Deleted key {id}"));
        }
        KeysCmd::Usage { id } => {
            let u = client.get_key_usage(pb::GetKeyUsageRequest { id }).await.map_err(status_err)?;
            out.usage(&u.into_inner());
        }
        KeysCmd::Rotate { id, grace } => {
            let grace_period = grace.map(|g| prost_types::Duration {
                seconds: i64::try_from(g.as_secs()).unwrap_or(i64::MAX),
                nanos: g.subsec_nanos() as i32,
            });
            let r = client.rotate_key(pb::RotateKeyRequest { id, grace_period }).await.map_err(status_err)?;
            out.created_key(&r.into_inner());
        }
        KeysCmd::ImportLegacy { name, gateway, secret } => {
            let k = client
                .import_legacy_key(pb::ImportLegacyKeyRequest { gateway, name, secret, limits: None })
                .await
                .map_err(status_err)?;
            out.keys(&[k.into_inner()]);
        }
    }
    Ok(())
}

async fn tokens(conn: &Connection, cmd: TokensCmd) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: AccessServiceClient<Svc> = AccessServiceClient::with_interceptor(channel, auth);
    let out = output::Out { json: conn.json };
    match cmd {
        TokensCmd::Create { name, role, gateway, expires_at } => {
            let expires_at = expires_at.as_deref().map(|s| timestamp("--expires-at", s)).transpose()?;
            let role = match role {
                RoleArg::Owner => pb::Role::Owner,
                RoleArg::Admin => pb::Role::Admin,
                RoleArg::Developer => pb::Role::Developer,
            } as i32;
            let r = client
                .create_access_token(pb::CreateAccessTokenRequest { name, role, gateways: gateway, expires_at })
                .await
                .map_err(status_err)?;
            out.created_token(&r.into_inner());
        }
        TokensCmd::List => {
            let r = client.list_access_tokens(pb::ListAccessTokensRequest {}).await.map_err(status_err)?;
            out.tokens(&r.into_inner().tokens);
        }
        TokensCmd::Revoke { id } => {
            let t = client.revoke_access_token(pb::RevokeAccessTokenRequest { id }).await.map_err(status_err)?;
            out.tokens(&[t.into_inner()]);
        }
        TokensCmd::Whoami => {
            let t = client.who_am_i(pb::WhoAmIRequest {}).await.map_err(status_err)?;
            out.tokens(&[t.into_inner()]);
        }
    }
    Ok(())
}

async fn audit(conn: &Connection, gateway: Option<String>, limit: usize) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: AuditServiceClient<Svc> = AuditServiceClient::with_interceptor(channel, auth);
    let mut events = Vec::new();
    let mut page_token = String::new();
    while events.len() < limit {
        let page_size = (limit - events.len()).min(1000) as u32;
        let req = pb::ListAuditEventsRequest { gateway: gateway.clone().unwrap_or_default(), page_size, page_token };
        let page = client.list_audit_events(req).await.map_err(status_err)?.into_inner();
        events.extend(page.events);
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    output::Out { json: conn.json }.audit(&events);
    Ok(())
}

async fn prices(conn: &Connection, cmd: PricesCmd) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: PricingServiceClient<Svc> = PricingServiceClient::with_interceptor(channel, auth);
    let out = output::Out { json: conn.json };
    match cmd {
        PricesCmd::Set { model, input, output } => {
            let price = pb::ModelPrice { model, input_usd_per_million: input, output_usd_per_million: output };
            let p =
                client.set_model_price(pb::SetModelPriceRequest { price: Some(price) }).await.map_err(status_err)?;
            out.prices(&[p.into_inner()]);
        }
        PricesCmd::List => {
            let list = client.list_model_prices(pb::ListModelPricesRequest {}).await.map_err(status_err)?;
            out.prices(&list.into_inner().prices);
        }
        PricesCmd::Delete { model } => {
            client
                .delete_model_price(pb::DeleteModelPriceRequest { model: model.clone() })
                .await
                .map_err(status_err)?;
            out.message(serde_json::json!({"deleted": model}), &format!("Deleted the price of {model}"));
        }
    }
    Ok(())
}
