//! `AuditService`: who changed what, and which calls were refused.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::timestamp;
use super::{Admin, AdminResult, Kind, page_after, page_size};
use crate::domain::access::{Action, AuditEvent, Refusal};
use crate::pb;
use crate::pb::audit_service_server::AuditService;

pub use crate::pb::audit_service_server::AuditServiceServer;

#[derive(Clone)]
pub struct AuditApi(pub Arc<Admin>);

fn event_to_pb(e: &AuditEvent) -> pb::AuditEvent {
    pb::AuditEvent {
        id: e.id.to_string(),
        time: Some(timestamp(e.at)),
        token_id: e.token_id.map(|t| t.to_string()).unwrap_or_default(),
        token_name: e.token_name.clone(),
        action: e.action.clone(),
        gateway: e.gateway.clone().unwrap_or_default(),
        target: e.target.clone(),
        result: e.result.clone(),
    }
}

#[tonic::async_trait]
impl AuditService for AuditApi {
    async fn list_audit_events(
        &self,
        request: Request<pb::ListAuditEventsRequest>,
    ) -> Result<Response<pb::ListAuditEventsResponse>, Status> {
        self.0
            .serve(request, "AuditService/ListAuditEvents", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    let gateway = (!req.gateway.is_empty()).then_some(req.gateway.as_str());
                    c.check(Action::ReadAudit, gateway)?;
                    // Events of every gateway need an unscoped token.
                    if gateway.is_none() && c.who.is_scoped() {
                        return Err(Refusal::Gateway.into());
                    }
                    let size = page_size(req.page_size)?;
                    let before = page_after(&req.page_token)?;
                    let mut events = admin.store.list_audit(gateway, before.as_deref(), size + 1).await?;
                    let next_page_token = if events.len() > size as usize {
                        events.truncate(size as usize);
                        events.last().map(|e| e.id.to_string()).unwrap_or_default()
                    } else {
                        String::new()
                    };
                    AdminResult::Ok(pb::ListAuditEventsResponse {
                        events: events.iter().map(event_to_pb).collect(),
                        next_page_token,
                    })
                }
                .await;
                (c, result)
            })
            .await
    }
}
