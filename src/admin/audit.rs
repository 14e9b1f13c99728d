//! `AuditService`: who changed what, and which calls were refused.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::convert::{from_timestamp, timestamp};
use super::keys::parse_id;
use super::{Admin, AdminResult, Kind, page_size};
use crate::domain::FieldError;
use crate::domain::access::{Action, AuditEvent, Refusal, validate_audit_action, validate_audit_filter};
use crate::pb;
use crate::pb::audit_service_server::AuditService;
use crate::store::AuditQuery;

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

/// The filters of a ListAuditEvents request (the page size is the caller's to fill in).
fn audit_query(req: &pb::ListAuditEventsRequest) -> Result<AuditQuery, FieldError> {
    let text = |field: &'static str, v: &str| -> Result<Option<String>, FieldError> {
        if v.is_empty() {
            return Ok(None);
        }
        validate_audit_filter(field, v)?;
        Ok(Some(v.to_string()))
    };
    if !req.action.is_empty() {
        validate_audit_action(&req.action)?;
    }
    let from = req.from.as_ref().map(|t| from_timestamp("from", t)).transpose()?;
    let to = req.to.as_ref().map(|t| from_timestamp("to", t)).transpose()?;
    if let (Some(from), Some(to)) = (from, to)
        && to <= from
    {
        return Err(FieldError::new("to", "must be after from"));
    }
    let before = match req.page_token.as_str() {
        "" => None,
        t => Some(parse_id("page_token", t)?),
    };
    Ok(AuditQuery {
        gateway: (!req.gateway.is_empty()).then(|| req.gateway.clone()),
        actor: text("actor", &req.actor)?,
        action: (!req.action.is_empty()).then(|| req.action.clone()),
        target: text("target", &req.target)?,
        from,
        to,
        before,
        limit: 0,
    })
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
                    let mut q = audit_query(&req)?;
                    q.limit = size + 1;
                    let mut events = admin.store.search_audit(&q).await?;
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
