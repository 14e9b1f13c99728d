//! `GatewayService`.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use super::convert::{gateway_to_pb, inbound_from_pb, upstream_from_pb};
use super::error::store_err;
use super::{Admin, AdminError, AdminResult, Kind};
use crate::domain::FieldError;
use crate::domain::access::Action;
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
    async fn create_gateway(
        &self,
        request: Request<pb::CreateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        self.0
            .serve(request, "GatewayService/CreateGateway", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::WriteGateways, Some(&req.name))?;
                    validate_gateway_name("name", &req.name)?;
                    c.target(req.name.clone());
                    let gateway = Gateway {
                        id: Uuid::now_v7(),
                        name: req.name.clone(),
                        inbound: inbound_from_pb(req.inbound_auth.as_ref())?,
                        upstream: upstream_from_pb(req.upstream_auth.as_ref())?,
                        default_reservation_tokens: check_reservation(req.default_reservation_tokens)?,
                        created_at: admin.shared.clock.now(),
                    };
                    let _w = admin.shared.writes.lock().await;
                    admin.store.insert_gateway(&gateway).await?;
                    admin.shared.view_mut()?.upsert_gateway(gateway.clone());
                    AdminResult::Ok(gateway_to_pb(&gateway))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn get_gateway(&self, request: Request<pb::GetGatewayRequest>) -> Result<Response<pb::Gateway>, Status> {
        self.0
            .serve(request, "GatewayService/GetGateway", Kind::Read, |admin, mut c, req| async move {
                let result = async {
                    let name = req.name;
                    c.check(Action::ReadGateways, Some(&name))?;
                    validate_gateway_name("name", &name)?;
                    c.target(name.clone());
                    Ok(gateway_to_pb(&admin.gateway_by_name("name", &name).await?))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn list_gateways(
        &self,
        request: Request<pb::ListGatewaysRequest>,
    ) -> Result<Response<pb::ListGatewaysResponse>, Status> {
        self.0
            .serve(request, "GatewayService/ListGateways", Kind::Read, |admin, mut c, _req| async move {
                let result = async {
                    c.check(Action::ReadGateways, None)?;
                    let all = admin.store.list_gateways().await?;
                    // A scoped token sees its own gateways.
                    let gateways = all.iter().filter(|g| c.who.reaches(&g.name)).map(gateway_to_pb).collect();
                    Ok(pb::ListGatewaysResponse { gateways })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn update_gateway(
        &self,
        request: Request<pb::UpdateGatewayRequest>,
    ) -> Result<Response<pb::Gateway>, Status> {
        self.0
            .serve(request, "GatewayService/UpdateGateway", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::WriteGateways, Some(&req.name))?;
                    validate_gateway_name("name", &req.name)?;
                    c.target(req.name.clone());
                    let _w = admin.shared.writes.lock().await;
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
                    AdminResult::Ok(gateway_to_pb(&g))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn delete_gateway(
        &self,
        request: Request<pb::DeleteGatewayRequest>,
    ) -> Result<Response<pb::DeleteGatewayResponse>, Status> {
        self.0
            .serve(request, "GatewayService/DeleteGateway", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    c.check(Action::WriteGateways, Some(&req.name))?;
                    validate_gateway_name("name", &req.name)?;
                    c.target(req.name.clone());
                    let _w = admin.shared.writes.lock().await;
                    let g = admin.gateway_by_name("name", &req.name).await?;
                    let now = admin.shared.clock.now();
                    let deleted =
                        admin.store.delete_gateway(g.id, req.force, now).await.map_err(store_err("gateway"))?;
                    admin.shared.gateway_deleted(&g.name, &deleted)?;
                    AdminResult::Ok(pb::DeleteGatewayResponse { deleted_keys: deleted.len() as u64 })
                }
                .await;
                (c, result)
            })
            .await
    }
}
