//! `portcullis audit`: the audit trail, newest first, paged up to `--limit`.

use super::args::Connection;
use super::connect::{Svc, connect, status_err};
use super::output;
use crate::pb;
use crate::pb::audit_service_client::AuditServiceClient;

pub(super) async fn run(conn: &Connection, gateway: Option<String>, limit: usize) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: AuditServiceClient<Svc> = AuditServiceClient::with_interceptor(channel, auth);
    let mut events = Vec::new();
    let mut page_token = String::new();
    while events.len() < limit {
        let page_size = (limit - events.len()).min(1000) as u32;
        let req = pb::ListAuditEventsRequest {
            gateway: gateway.clone().unwrap_or_default(),
            page_size,
            page_token,
            ..Default::default()
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
