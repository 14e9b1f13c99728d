//! `PricingService`: model prices in USD per million tokens.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use super::error::store_err;
use super::{Admin, AdminError, AdminResult, detached, principal};
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

#[tonic::async_trait]
impl PricingService for PricingApi {
    #[tracing::instrument(skip_all, fields(model))]
    async fn set_model_price(
        &self,
        request: Request<pb::SetModelPriceRequest>,
    ) -> Result<Response<pb::ModelPrice>, Status> {
        let who = principal(&request)?;
        let p = request.into_inner().price.unwrap_or_default();
        tracing::Span::current().record("model", p.model.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            validate_model("price.model", &p.model)?;
            let price = Price {
                input_micros_per_million: money::parse_usd("price.input_usd_per_million", &p.input_usd_per_million)?,
                output_micros_per_million: money::parse_usd("price.output_usd_per_million", &p.output_usd_per_million)?,
            };
            let _w = admin.writes.lock().await;
            admin.store.set_price(&p.model, &price, admin.shared.clock.now()).await?;
            admin
                .shared
                .limiters
                .prices
                .write()
                .map_err(|_| AdminError::Internal("price book lock poisoned".into()))?
                .set(p.model.clone(), price);
            tracing::info!(token = %who.name, "model price set");
            AdminResult::Ok(price_to_pb(&p.model, &price))
        };
        Ok(Response::new(detached(run).await?))
    }

    async fn list_model_prices(
        &self,
        request: Request<pb::ListModelPricesRequest>,
    ) -> Result<Response<pb::ListModelPricesResponse>, Status> {
        principal(&request)?;
        let prices = self.0.store.list_prices().await.map_err(AdminError::from)?;
        Ok(Response::new(pb::ListModelPricesResponse {
            prices: prices.iter().map(|(m, p)| price_to_pb(m, p)).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(model))]
    async fn delete_model_price(
        &self,
        request: Request<pb::DeleteModelPriceRequest>,
    ) -> Result<Response<pb::DeleteModelPriceResponse>, Status> {
        let who = principal(&request)?;
        let model = request.into_inner().model;
        tracing::Span::current().record("model", model.as_str());
        let admin = Arc::clone(&self.0);
        let run = async move {
            validate_model("model", &model)?;
            let _w = admin.writes.lock().await;
            admin.store.delete_price(&model).await.map_err(store_err("model price"))?;
            admin
                .shared
                .limiters
                .prices
                .write()
                .map_err(|_| AdminError::Internal("price book lock poisoned".into()))?
                .remove(&model);
            tracing::info!(token = %who.name, "model price deleted");
            AdminResult::Ok(pb::DeleteModelPriceResponse {})
        };
        Ok(Response::new(detached(run).await?))
    }
}
