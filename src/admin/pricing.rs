//! `PricingService`: model prices in USD per million tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::store_err;
use super::{Admin, AdminError, AdminResult, Kind};
use crate::domain::access::Action;
use crate::domain::money;
use crate::domain::pricing::{Price, validate_model};
use crate::pb;
use crate::pb::pricing_service_server::PricingService;

pub use crate::pb::pricing_service_server::PricingServiceServer;

#[derive(Clone)]
pub struct PricingApi(pub Arc<Admin>);

fn price_to_pb(model: &str, p: &Price) -> pb::ModelPrice {
    pb::ModelPrice {
        model: model.to_string(),
        input_usd_per_million: money::format_usd(p.input_micros_per_million),
        output_usd_per_million: money::format_usd(p.output_micros_per_million),
    }
}

impl Admin {
    fn price_book(&self) -> AdminResult<std::sync::RwLockWriteGuard<'_, crate::domain::pricing::PriceBook>> {
        self.shared.limiters.prices.write().map_err(|_| AdminError::Internal("price book lock poisoned".into()))
    }
}

#[tonic::async_trait]
impl PricingService for PricingApi {
    async fn set_model_price(
        &self,
        request: Request<pb::SetModelPriceRequest>,
    ) -> Result<Response<pb::ModelPrice>, Status> {
        self.0
            .serve(request, "PricingService/SetModelPrice", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let p = req.price.unwrap_or_default();
                    let valid = validate_model("price.model", &p.model);
                    if valid.is_ok() {
                        c.target(p.model.clone());
                    }
                    // Prices apply to every gateway: a gateway-scoped token cannot set them.
                    c.check_global(Action::WritePrices)?;
                    valid?;
                    let price = Price {
                        input_micros_per_million: money::parse_usd(
                            "price.input_usd_per_million",
                            &p.input_usd_per_million,
                        )?,
                        output_micros_per_million: money::parse_usd(
                            "price.output_usd_per_million",
                            &p.output_usd_per_million,
                        )?,
                    };
                    let _w = admin.shared.writes.lock().await;
                    admin.store.set_price(&p.model, &price, admin.shared.clock.now()).await?;
                    admin.price_book()?.set(p.model.clone(), price);
                    AdminResult::Ok(price_to_pb(&p.model, &price))
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn list_model_prices(
        &self,
        request: Request<pb::ListModelPricesRequest>,
    ) -> Result<Response<pb::ListModelPricesResponse>, Status> {
        self.0
            .serve(request, "PricingService/ListModelPrices", Kind::Read, |admin, mut c, _req| async move {
                let result = async {
                    c.check(Action::ReadPrices, None)?;
                    let prices = admin.store.list_prices().await?;
                    AdminResult::Ok(pb::ListModelPricesResponse {
                        prices: prices.iter().map(|(m, p)| price_to_pb(m, p)).collect(),
                    })
                }
                .await;
                (c, result)
            })
            .await
    }

    async fn delete_model_price(
        &self,
        request: Request<pb::DeleteModelPriceRequest>,
    ) -> Result<Response<pb::DeleteModelPriceResponse>, Status> {
        self.0
            .serve(request, "PricingService/DeleteModelPrice", Kind::Mutation, |admin, mut c, req| async move {
                let result = async {
                    let model = req.model;
                    let valid = validate_model("model", &model);
                    if valid.is_ok() {
                        c.target(model.clone());
                    }
                    c.check_global(Action::WritePrices)?;
                    valid?;
                    let _w = admin.shared.writes.lock().await;
                    admin.store.delete_price(&model).await.map_err(store_err("model price"))?;
                    admin.price_book()?.remove(&model);
                    AdminResult::Ok(pb::DeleteModelPriceResponse {})
                }
                .await;
                (c, result)
            })
            .await
    }
}
