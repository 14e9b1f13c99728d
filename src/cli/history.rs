//! `portcullis keys history <id>` and `portcullis gateways history <name>`: usage per UTC hour
//! or day over the last days, optionally per model (`UsageService/GetUsageHistory`).

use super::args::{Connection, GranularityArg, HistoryArgs};
use super::connect::{Svc, connect, status_err};
use super::output;
use crate::pb;
use crate::pb::usage_service_client::UsageServiceClient;

/// Whose usage: one key's, or all the keys' of one gateway.
pub(super) enum Of {
    Key(String),
    Gateway(String),
}

pub(super) async fn run(conn: &Connection, of: Of, range: HistoryArgs) -> anyhow::Result<()> {
    let HistoryArgs { by, days, by_model } = range;
    let (channel, auth) = connect(conn).await?;
    let mut usage: UsageServiceClient<Svc> = UsageServiceClient::with_interceptor(channel, auth);
    let now = chrono::Utc::now();
    let from = now - chrono::Duration::days(i64::from(days));
    let stamp = |t: chrono::DateTime<chrono::Utc>| prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: t.timestamp_subsec_nanos() as i32,
    };
    let granularity = match by {
        GranularityArg::Hour => pb::Granularity::Hour,
        GranularityArg::Day => pb::Granularity::Day,
    } as i32;
    let (key_id, gateway) = match of {
        Of::Key(id) => (id, String::new()),
        Of::Gateway(name) => (String::new(), name),
    };
    let h = usage
        .get_usage_history(pb::GetUsageHistoryRequest {
            key_id,
            gateway,
            granularity,
            from: Some(stamp(from)),
            to: Some(stamp(now)),
            by_model,
        })
        .await
        .map_err(status_err)?;
    output::Out { json: conn.json }.history(&h.into_inner(), by_model);
    Ok(())
}
