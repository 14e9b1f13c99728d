//! `portcullis audit`: the audit trail, newest first, filtered, paged up to `--limit`.

use super::args::{AuditArgs, Connection};
use super::connect::{Svc, connect, status_err};
use super::output;
use super::time::time_or_ago;
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;

pub(super) async fn run(conn: &Connection, args: AuditArgs) -> anyhow::Result<()> {
    let from = args.since.as_deref().map(|s| time_or_ago("--since", s)).transpose()?;
    let to = args.until.as_deref().map(|s| time_or_ago("--until", s)).transpose()?;
    let (channel, auth) = connect(conn).await?;
    let mut client: AuditServiceClient<Svc> = AuditServiceClient::with_interceptor(channel, auth);
    let mut events = Vec::new();
    let mut page_token = String::new();
    let limit = args.limit;
    while events.len() < limit {
        let page_size = (limit - events.len()).min(1000) as u32;
        let req = pb::ListAuditEventsRequest {
            gateway: args.gateway.clone().unwrap_or_default(),
            page_size,
            page_token,
            actor: args.actor.clone().unwrap_or_default(),
            action: args.action.clone().unwrap_or_default(),
            target: args.target.clone().unwrap_or_default(),
            from,
            to,
        };
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
