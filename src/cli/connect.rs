//! Reaching the admin API: the authenticated channel (`connect`, with TLS against `--ca` or
//! the system roots), the bearer-token interceptor, and one-line errors for the two ways a
//! call fails (unreachable, or a gRPC status).

use anyhow::{Context, anyhow, bail};
use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};
use tonic::{Request, Status};

use super::args::Connection;

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

/// A service client channel that sends the management token.
pub(super) type Svc = InterceptedService<Channel, BearerAuth>;

/// An authenticated channel to the admin API.
pub(super) async fn connect(conn: &Connection) -> anyhow::Result<(Channel, BearerAuth)> {
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
pub(super) fn status_err(s: Status) -> anyhow::Error {
    anyhow!("{} ({})", s.message(), crate::pb::code_name(s.code()))
}
