//! `GatewayService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{gateway_to_pb, inbound_from_pb, upstream_from_pb};
use super::error::store_err;
use super::{Admin, AdminError, AdminResult, detached, principal};
use crate::domain::FieldError;
use crate::domain::gateway::{Gateway, UpstreamAuth, validate_gateway_name};
use crate::pb;
use crate::pb::gateway_service_server::GatewayService;

pub use crate::pb::gateway_service_server::GatewayServiceServer;

#[derive(Clone)]
pub struct GatewayApi(pub Arc<Admin>);

fn check_reservation(tokens: u64) -> Result<u64, FieldError> {
    if tokens > i64::MAX as u64 {
        return Err(FieldError::new("default_reservation_tokens", "is too large"));
    }
    Ok(tokens)
}

impl Admin {
    pub(crate) async fn gateway_by_name(&self, field: &'static str, name: &str) -> AdminResult<Gateway> {
        validate_gateway_name(field, name)?;
        self.store.get_gateway(name).await?.ok_or(AdminError::NotFound("gateway"))
    }
}

#[tonic::async_trait]
impl GatewayService for GatewayApi {
    #[tracing::instrument(skip_all, fields(gateway))]
    async fn create_gateway(
        &self,
        request: Request<pb::CreateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("gateway", req.name.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            validate_gateway_name("name", &req.name)?;
            let gateway = Gateway {
                id: Uuid::now_v7(),
                name: req.name.clone(),
                inbound: inbound_from_pb(req.inbound_auth.as_ref())?,
                upstream: upstream_from_pb(req.upstream_auth.as_ref())?,
                default_reservation_tokens: check_reservation(req.default_reservation_tokens)?,
                created_at: admin.shared.clock.now(),
            };
            let _w = admin.writes.lock().await;
            admin.store.insert_gateway(&gateway).await?;
            admin.shared.view_mut()?.upsert_gateway(gateway.clone());
            tracing::info!(token = %who.name, gateway_id = %gateway.id, "gateway created");
            AdminResult::Ok(gateway_to_pb(&gateway))
        };
        Ok(Response::new(detached(run).await?))
    }

    async fn get_gateway(&self, request: Request<pb::GetGatewayRequest>) -> Result<Response<pb::Gateway>, Status> {
        principal(&request)?;
        let g = self.0.gateway_by_name("name", &request.get_ref().name).await?;
        Ok(Response::new(gateway_to_pb(&g)))
    }

    async fn list_gateways(
        &self,
        request: Request<pb::ListGatewaysRequest>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        principal(&request)?;
        let all = self.0.store.list_gateways().await.map_err(AdminError::from)?;
        Ok(Response::new(pb::ListGatewaysResponse { gateways: all.iter().map(gateway_to_pb).collect() }))
    }

    #[tracing::instrument(skip_all, fields(gateway))]
    async fn update_gateway(
        &self,
        request: Request<pb::UpdateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("gateway", req.name.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let _w = admin.writes.lock().await;
            let mut g = admin.gateway_by_name("name", &req.name).await?;
            if let Some(a) = req.inbound_auth.as_ref() {
                g.inbound = inbound_from_pb(Some(a))?;
            }
            if let Some(a) = req.upstream_auth.as_ref() {
                // The value is write-only: a header name with no value keeps the stored one
                // (so a read-modify-write round trip or a header rename needs no secret).
                g.upstream = match (&g.upstream, a.header_name.trim().is_empty(), a.value.is_empty()) {
                    (Some(old), false, true) => Some(UpstreamAuth::new(&a.header_name, &old.value)?),
                    _ => upstream_from_pb(Some(a))?,
                };
            }
            if let Some(t) = req.default_reservation_tokens {
                g.default_reservation_tokens = check_reservation(t)?;
            }
            admin.store.update_gateway(&g).await.map_err(store_err("gateway"))?;
            admin.shared.view_mut()?.upsert_gateway(g.clone());
            tracing::info!(token = %who.name, gateway_id = %g.id, "gateway updated");
            AdminResult::Ok(gateway_to_pb(&g))
        };
        Ok(Response::new(detached(run).await?))
    }

    #[tracing::instrument(skip_all, fields(gateway))]
    async fn delete_gateway(
        &self,
        request: Request<pb::DeleteGatewayRequest>,
    ) -> Result<Response<pb::DeleteGatewayResponse>, Status> {
        let who = principal(&request)?;
        let req = request.into_inner();
        tracing::Span::current().record("gateway", req.name.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            let _w = admin.writes.lock().await;
            let g = admin.gateway_by_name("name", &req.name).await?;
            let now = admin.shared.clock.now();
            let deleted = admin.store.delete_gateway(g.id, req.force, now).await.map_err(store_err("gateway"))?;
            admin.shared.view_mut()?.remove_gateway(&g.name);
            tracing::info!(token = %who.name, gateway_id = %g.id, deleted_keys = deleted.len(), "gateway deleted");
            AdminResult::Ok(pb::DeleteGatewayResponse { deleted_keys: deleted.len() as u64 })
        };
        Ok(Response::new(detached(run).await?))
    }
}
