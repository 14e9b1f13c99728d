//! `portcullis tokens …`: management tokens: create, list, revoke, whoami.

use super::args::{Connection, RoleArg, TokensCmd};
use super::connect::{Svc, connect, status_err};
use super::output;
use super::time::timestamp;
use crate::pb;
use crate::pb::access_service_client::AccessServiceClient;

pub(super) async fn run(conn: &Connection, cmd: TokensCmd) -> anyhow::Result<()> {
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
