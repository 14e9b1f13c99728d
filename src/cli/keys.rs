//! `portcullis keys …`: create, list, get, enable, disable, update, delete, usage, rotate,
//! import-legacy.

use super::args::{Connection, KeysCmd};
use super::connect::{Svc, connect, status_err};
use super::output;
use super::time::timestamp;
use crate::pb;
use crate::pb::key_service_client::KeyServiceClient;

pub(super) async fn run(conn: &Connection, cmd: KeysCmd) -> anyhow::Result<()> {
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
                    .list_keys(pb::ListKeysRequest {
                        gateway: gateway.clone(),
                        page_size: 1000,
                        page_token,
                        ..Default::default()
                    })
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
