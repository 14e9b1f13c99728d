//! `portcullis prices …`: model prices (USD per million tokens): set, list, delete.

use super::args::{Connection, PricesCmd};
use super::connect::{Svc, connect, status_err};
use super::output;
use crate::pb;
use crate::pb::pricing_service_client::PricingServiceClient;

pub(super) async fn run(conn: &Connection, cmd: PricesCmd) -> anyhow::Result<()> {
    let (channel, auth) = connect(conn).await?;
    let mut client: PricingServiceClient<Svc> = PricingServiceClient::with_interceptor(channel, auth);
    let out = output::Out { json: conn.json };
    match cmd {
        PricesCmd::Set { model, input, output } => {
            let price = pb::ModelPrice { model, input_usd_per_million: input, output_usd_per_million: output };
            let p =
                client.set_model_price(pb::SetModelPriceRequest { price: Some(price) }).await.map_err(status_err)?;
            out.prices(&[p.into_inner()]);
        }
        PricesCmd::List => {
            let list = client.list_model_prices(pb::ListModelPricesRequest {}).await.map_err(status_err)?;
            out.prices(&list.into_inner().prices);
        }
        PricesCmd::Delete { model } => {
            client
                .delete_model_price(pb::DeleteModelPriceRequest { model: model.clone() })
                .await
                .map_err(status_err)?;
            out.message(serde_json::json!({"deleted": model}), &format!("Deleted the price of {model}"));
        }
    }
    Ok(())
}
