//! `portcullis keys …`: create, list, get, enable, disable, update, delete, usage, history,
//! rotate, import-legacy.

use super::args::{Connection, KeysCmd, OrderArg, StatusArg};
use super::connect::{Svc, connect, status_err};
use super::history;
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
        KeysCmd::List { gateway, name, status, order_by, desc, limit } => {
            let status = match status {
                None => pb::KeyStatus::Unspecified,
                Some(StatusArg::Active) => pb::KeyStatus::Active,
                Some(StatusArg::Disabled) => pb::KeyStatus::Disabled,
                Some(StatusArg::Expired) => pb::KeyStatus::Expired,
            } as i32;
            let order_by = match order_by {
                None => pb::KeyOrder::Unspecified,
                Some(OrderArg::Name) => pb::KeyOrder::Name,
                Some(OrderArg::CreatedAt) => pb::KeyOrder::CreatedAt,
                Some(OrderArg::LastUsedAt) => pb::KeyOrder::LastUsedAt,
                Some(OrderArg::ExpiresAt) => pb::KeyOrder::ExpiresAt,
                Some(OrderArg::Spend) => pb::KeyOrder::Spend,
            } as i32;
            let mut all = Vec::new();
            let mut page_token = String::new();
            loop {
                let page_size = limit.map_or(1000, |l| l.saturating_sub(all.len()).clamp(1, 1000)) as u32;
                let page = client
                    .list_keys(pb::ListKeysRequest {
                        gateway: gateway.clone(),
                        page_size,
                        page_token,
                        name_contains: name.clone().unwrap_or_default(),
                        status,
                        order_by,
                        descending: desc,
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
        KeysCmd::History { id, range } => history::run(conn, history::Of::Key(id), range).await?,
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
