//! `portcullis gateways …`: create, list, get, update, delete, history.

use super::args::{Connection, GatewaySettings, GatewaysCmd, Location};
use super::connect::{Svc, connect, status_err};
use super::history;
use super::output;
use crate::pb;
use crate::pb::gateway_service_client::GatewayServiceClient;

pub(super) async fn run(conn: &Connection, cmd: GatewaysCmd) -> anyhow::Result<()> {
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
        GatewaysCmd::History { name, range } => history::run(conn, history::Of::Gateway(name), range).await?,
    }
    Ok(())
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
