//! Envoy-facing: ext_proc metering. Envoy streams each response (headers, then body
//! chunks) with the ext_authz metadata (`key_id`, `reservation`) forwarded; we read the
//! usage the provider reported, price it, record it and settle the reservation.

use std::sync::Arc;

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessor;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeadersResponse, ProcessingRequest, ProcessingResponse, TrailersResponse,
};
use envoy_types::pb::google::protobuf::value::Kind;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use uuid::Uuid;

use crate::domain::budget::Metered;
use crate::domain::pricing::cost_micros;
use crate::domain::usage::{BufferBudget, UsageParser};
use crate::state::Shared;

pub use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_server::ExternalProcessorServer;

const AUTHZ_NAMESPACE: &str = "envoy.filters.http.ext_authz";

pub struct MeterService {
    shared: Arc<Shared>,
}

impl MeterService {
    pub fn new(shared: Arc<Shared>) -> Self {
        MeterService { shared }
    }
}

/// One response being metered.
#[derive(Default)]
struct Exchange {
    key_id: Option<Uuid>,
    reservation: Option<u64>,
    parser: Option<UsageParser>,
    /// The process's metering buffer budget the parser takes from (none in unit tests).
    buffers: Option<Arc<BufferBudget>>,
    content_encoding: Option<String>,
    /// The response's HTTP status.
    status: u16,
    done: bool,
}

fn header<'a>(headers: &'a Option<HeaderMap>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let hv = headers.as_ref()?.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name))?;
    Some(if hv.raw_value.is_empty() {
        std::borrow::Cow::Borrowed(hv.value.as_str())
    } else {
        String::from_utf8_lossy(&hv.raw_value)
    })
}

fn continue_() -> Option<CommonResponse> {
    Some(CommonResponse::default())
}

impl Exchange {
    /// Takes one message; returns the reply Envoy waits for (blocking mode).
    fn on_message(&mut self, m: ProcessingRequest) -> Reply {
        if self.key_id.is_none()
            && let Some(md) = m.metadata_context.as_ref().and_then(|c| c.filter_metadata.get(AUTHZ_NAMESPACE))
        {
            let text = |k: &str| match md.fields.get(k).and_then(|v| v.kind.as_ref()) {
                Some(Kind::StringValue(s)) => Some(s.clone()),
                _ => None,
            };
            self.key_id = text("key_id").and_then(|s| Uuid::parse_str(&s).ok());
            self.reservation = text("reservation").and_then(|s| s.parse().ok());
        }
        match m.request {
            Some(Msg::ResponseHeaders(h)) => {
                let content_type = header(&h.headers, "content-type").unwrap_or_default();
                self.status = header(&h.headers, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
                self.parser = Some(match &self.buffers {
                    Some(budget) => UsageParser::with_budget(&content_type, Arc::clone(budget)),
                    None => UsageParser::new(&content_type),
                });
                self.content_encoding = header(&h.headers, "content-encoding")
                    .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
                    .map(|e| e.into_owned());
                self.done |= h.end_of_stream;
                Reply::ResponseHeaders(HeadersResponse { response: continue_() })
            }
            Some(Msg::ResponseBody(b)) => {
                if self.content_encoding.is_none()
                    && let Some(p) = self.parser.as_mut()
                {
                    let starved = p.starved();
                    p.feed(&b.body);
                    if !starved && p.starved() {
                        tracing::warn!(
                            key_id = ?self.key_id,
                            "metering buffers of the process are full: this response's usage is not read"
                        );
                    }
                }
                self.done |= b.end_of_stream;
                Reply::ResponseBody(BodyResponse { response: continue_() })
            }
            Some(Msg::RequestHeaders(_)) => Reply::RequestHeaders(HeadersResponse { response: continue_() }),
            Some(Msg::RequestBody(_)) => Reply::RequestBody(BodyResponse { response: continue_() }),
            Some(Msg::RequestTrailers(_)) => Reply::RequestTrailers(TrailersResponse::default()),
            Some(Msg::ResponseTrailers(_)) | None => {
                self.done = true;
                Reply::ResponseTrailers(TrailersResponse::default())
            }
        }
    }

    /// Records the response (once), whatever it reported; a cut stream still counts.
    fn finish(self, shared: &Shared) {
        let Some(key_id) = self.key_id else { return };
        let reported = self.parser.map(UsageParser::finish).unwrap_or_default();
        if let Some(encoding) = &self.content_encoding {
            tracing::warn!(key_id = %key_id, encoding, "response body is compressed: its usage cannot be read");
        }
        let now = shared.clock.now();
        let reset_period = match shared.view() {
            Ok(view) => view.key_by_id(key_id).map(|k| k.limits.reset_period),
            Err(_) => None,
        };
        let limiters = &shared.limiters;
        let mut cost = 0;
        if reported.found {
            let model = reported.model.as_deref().unwrap_or("");
            match limiters.prices.read().ok().as_ref().and_then(|book| book.lookup(model).copied()) {
                Some(price) => cost = cost_micros(&price, reported.prompt_tokens, reported.completion_tokens),
                None => {
                    if shared.metrics.unpriced(model) {
                        tracing::warn!(
                            model,
                            "unpriced model: tokens are counted at cost 0 (set a price with SetModelPrice)"
                        );
                    }
                }
            }
        }
        let mut metered = Metered {
            prompt_tokens: reported.prompt_tokens,
            completion_tokens: reported.completion_tokens,
            cost_micros: cost,
        };
        let mut reservation = self.reservation;
        // A successful response that reports no usage (a stream without
        // `stream_options.include_usage`, a body we could not read) is charged what its
        // reservation held, so leaving usage out never escapes a budget.
        if !reported.found
            && (200..300).contains(&self.status)
            && let Some(r) = reservation.take()
            && let Some((tokens, micros)) = limiters.meters.release(key_id, r)
        {
            metered.completion_tokens = tokens;
            metered.cost_micros = micros;
            tracing::warn!(key_id = %key_id, tokens, "no usage in a successful response: charged its reservation");
        }
        shared.metrics.metered(metered.prompt_tokens, metered.completion_tokens, reported.found);
        match reset_period {
            Some(period) => limiters.meters.record(key_id, period, reservation, metered, now),
            // The key was deleted meanwhile: only give the reservation back.
            None => {
                if let Some(r) = reservation {
                    limiters.meters.release(key_id, r);
                }
            }
        }
        tracing::debug!(key_id = %key_id, prompt = metered.prompt_tokens, completion = metered.completion_tokens, cost_micros = cost, "metered");
    }
}

#[tonic::async_trait]
impl ExternalProcessor for MeterService {
    type ProcessStream = ReceiverStream<Result<ProcessingResponse, Status>>;

    async fn process(
        &self,
        request: Request<Streaming<ProcessingRequest>>,
    ) -> Result<Response<Self::ProcessStream>, Status> {
        let mut inbound = request.into_inner();
        let (tx, rx) = mpsc::channel(8);
        let shared = Arc::clone(&self.shared);
        let guard = shared.metering_started();
        tokio::spawn(async move {
            let _guard = guard;
            let mut exchange = Exchange { buffers: Some(Arc::clone(&shared.meter_buffers)), ..Default::default() };
            // Envoy closing the stream early (a cut response) ends the loop too.
            while let Ok(Some(m)) = inbound.message().await {
                // In observability mode Envoy ignores replies; otherwise it waits for each.
                let observe_only = m.observability_mode;
                let reply = exchange.on_message(m);
                if !observe_only {
                    let resp = ProcessingResponse { response: Some(reply), ..Default::default() };
                    if tx.send(Ok(resp)).await.is_err() {
                        break;
                    }
                }
                if exchange.done {
                    break;
                }
            }
            exchange.finish(&shared);
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders};
    use envoy_types::pb::google::protobuf::{Struct, Value};

    use super::*;

    fn metadata(key_id: &str, reservation: Option<&str>) -> Option<Metadata> {
        let mut fields = HashMap::new();
        let s = |v: &str| Value { kind: Some(Kind::StringValue(v.into())) };
        fields.insert("key_id".to_string(), s(key_id));
        if let Some(r) = reservation {
            fields.insert("reservation".to_string(), s(r));
        }
        Some(Metadata {
            filter_metadata: HashMap::from([(AUTHZ_NAMESPACE.to_string(), Struct { fields })]),
            ..Default::default()
        })
    }

    fn headers(pairs: &[(&str, &str)], end_of_stream: bool) -> Msg {
        let headers = pairs
            .iter()
            .map(|(k, v)| HeaderValue { key: k.to_string(), raw_value: v.as_bytes().to_vec(), ..Default::default() })
            .collect();
        Msg::ResponseHeaders(HttpHeaders { headers: Some(HeaderMap { headers }), end_of_stream, ..Default::default() })
    }

    fn body(b: &str, end_of_stream: bool) -> Msg {
        Msg::ResponseBody(HttpBody { body: b.as_bytes().to_vec(), end_of_stream, ..Default::default() })
    }

    fn msg(request: Msg, md: Option<Metadata>) -> ProcessingRequest {
        ProcessingRequest { request: Some(request), metadata_context: md, ..Default::default() }
    }

    #[test]
    fn reads_metadata_status_and_usage_across_messages() {
        let id = Uuid::now_v7();
        let mut x = Exchange::default();
        let reply = x.on_message(msg(
            headers(&[(":status", "200"), ("content-type", "application/json")], false),
            metadata(&id.to_string(), Some("42")),
        ));
        assert!(matches!(reply, Reply::ResponseHeaders(HeadersResponse { response: Some(_) })));
        assert_eq!((x.key_id, x.reservation, x.status, x.done), (Some(id), Some(42), 200, false));
        x.on_message(msg(body(r#"{"model":"m","usage":{"prompt_"#, false), None));
        let reply = x.on_message(msg(body(r#"tokens":3,"completion_tokens":4}}"#, true), None));
        assert!(matches!(reply, Reply::ResponseBody(BodyResponse { response: Some(_) })));
        assert!(x.done);
        let r = x.parser.take().unwrap().finish();
        assert_eq!((r.prompt_tokens, r.completion_tokens), (3, 4));
    }

    #[test]
    fn headers_only_responses_end_the_exchange() {
        let mut x = Exchange::default();
        x.on_message(msg(headers(&[(":status", "204")], true), metadata(&Uuid::now_v7().to_string(), None)));
        assert!(x.done);
        assert_eq!(x.reservation, None);
    }

    #[test]
    fn compressed_bodies_are_not_parsed() {
        let mut x = Exchange::default();
        x.on_message(msg(headers(&[(":status", "200"), ("content-encoding", "gzip")], false), None));
        x.on_message(msg(body(r#"{"usage":{"prompt_tokens":1,"completion_tokens":1}}"#, true), None));
        assert_eq!(x.content_encoding.as_deref(), Some("gzip"));
        assert!(!x.parser.take().unwrap().finish().found);
        let mut x = Exchange::default();
        x.on_message(msg(headers(&[("content-encoding", "identity")], false), None));
        assert_eq!(x.content_encoding, None);
    }

    #[test]
    fn no_metadata_means_nothing_to_record() {
        let mut x = Exchange::default();
        x.on_message(msg(headers(&[(":status", "401")], true), None));
        assert_eq!(x.key_id, None, "a denied request carries no key id");
    }
}
