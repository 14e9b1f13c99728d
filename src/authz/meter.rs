//! Envoy-facing: ext_proc metering. Envoy streams each response (headers, then body
//! chunks) with the ext_authz metadata (`key_id`, `reservation`) forwarded; we read the
//! usage the provider reported (or estimate it from the content when it reports none),
//! price it, record it and settle the reservation.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use envoy_types::pb::envoy::service::ext_proc::v3::processing_response::Response as Reply;
use envoy_types::pb::envoy::service::ext_proc::v3::{
    BodyResponse, CommonResponse, HeadersResponse, ProcessingResponse, TrailersResponse,
};
use prost::Message;
use prost::bytes::Bytes;
use tonic::codegen::Body as RequestBody;
use tonic::codegen::{StdError, http};
use uuid::Uuid;

use super::grpc::{self, Messages, Replies, ReplyBody};
use super::wire::{HeaderLines, MetadataInput, Part, ProcessingInput};

use crate::domain::budget::Ticket;
use crate::domain::counters::now_or_never;
use crate::domain::estimate::ContentEstimate;
use crate::domain::metering::{self, Observed, Settled};
use crate::domain::usage::UsageParser;
use crate::state::{MeteringGuard, Shared};

/// An attach to shared counters, awaited before the stream reads on.
type Attaching = Pin<Box<dyn Future<Output = ()> + Send>>;

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
    reservation: Option<Ticket>,
    /// The reservation was attached to this stream (the sweep leaves it alone).
    attached: bool,
    /// Any message arrived at all.
    seen: bool,
    parser: Option<UsageParser>,
    /// Content bytes, for a successful response that reports no usage.
    estimate: Option<ContentEstimate>,
    content_encoding: Option<String>,
    /// The response's HTTP status; 0 while unknown (no response headers came through).
    status: u16,
    done: bool,
}

/// How often, at most, a stream without ext_authz metadata is logged (the metric counts
/// every one).
const WITHOUT_METADATA_LOG_EVERY_MICROS: i64 = 60_000_000;
static WITHOUT_METADATA_UNLOGGED: AtomicU64 = AtomicU64::new(0);
static WITHOUT_METADATA_LOGGED_AT: AtomicI64 = AtomicI64::new(i64::MIN);

/// HTTP statuses Check denies with (and Envoy's `status_on_error`): Envoy runs the local
/// reply of a denied request through ext_proc too, without metadata, as it should.
const DENIAL_STATUSES: [u16; 4] = [401, 403, 429, 503];

/// A metered response without the ext_authz metadata (or with a `key_id` that is not a
/// key id) that is not one of our denials: Envoy does not forward the namespace, or the
/// route skips ext_authz. It cannot be charged to any key, so it is a misconfiguration:
/// counted always, logged the first time and then at most once a minute.
fn without_metadata(shared: &Shared) {
    let total = shared.metrics.metering_without_metadata();
    WITHOUT_METADATA_UNLOGGED.fetch_add(1, Ordering::Relaxed);
    let now = shared.clock.monotonic().micros();
    let last = WITHOUT_METADATA_LOGGED_AT.load(Ordering::Relaxed);
    let due = last == i64::MIN || now.saturating_sub(last) >= WITHOUT_METADATA_LOG_EVERY_MICROS;
    if due && WITHOUT_METADATA_LOGGED_AT.compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed).is_ok() {
        let since_last_log = WITHOUT_METADATA_UNLOGGED.swap(0, Ordering::Relaxed);
        tracing::warn!(
            streams = since_last_log,
            total,
            "responses metered without ext_authz metadata (key_id) cannot be charged to a key: forward the \
             envoy.filters.http.ext_authz namespace to ext_proc (metadata_options.forwarding_namespaces) \
             and run ext_authz before ext_proc"
        );
    }
}

fn header<'a>(headers: &'a Option<HeaderLines>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    headers.as_ref()?.get(name)
}

fn continue_() -> Option<CommonResponse> {
    Some(CommonResponse::default())
}

impl Exchange {
    /// Takes one message; returns the reply Envoy waits for (blocking mode).
    fn on_message(&mut self, m: ProcessingInput) -> Reply {
        self.seen = true;
        if self.key_id.is_none()
            && !m.metadata_context.is_empty()
            && let Ok(metadata) = MetadataInput::decode(m.metadata_context)
        {
            self.key_id = metadata.string(AUTHZ_NAMESPACE, "key_id").and_then(|s| Uuid::parse_str(s).ok());
            self.reservation = metadata.string(AUTHZ_NAMESPACE, "reservation").and_then(Ticket::decode);
        }
        match m.part {
            Some(Part::ResponseHeaders(h)) => {
                let content_type = header(&h.headers, "content-type").unwrap_or_default();
                self.status = header(&h.headers, ":status").and_then(|s| s.parse().ok()).unwrap_or(0);
                self.parser = Some(UsageParser::new(&content_type));
                self.estimate = Some(ContentEstimate::new(&content_type));
                self.content_encoding = header(&h.headers, "content-encoding")
                    .filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("identity"))
                    .map(|e| e.into_owned());
                self.done |= h.end_of_stream;
                Reply::ResponseHeaders(HeadersResponse { response: continue_() })
            }
            Some(Part::ResponseBody(b)) => {
                // Without the headers (Envoy not sending them), the body tells its kind.
                if self.content_encoding.is_none() {
                    self.parser.get_or_insert_with(|| UsageParser::new("")).feed(&b.body);
                    self.estimate.get_or_insert_with(|| ContentEstimate::new("")).feed(&b.body);
                }
                self.done |= b.end_of_stream;
                Reply::ResponseBody(BodyResponse { response: continue_() })
            }
            Some(Part::RequestHeaders(_)) => Reply::RequestHeaders(HeadersResponse { response: continue_() }),
            Some(Part::RequestBody(_)) => Reply::RequestBody(BodyResponse { response: continue_() }),
            Some(Part::RequestTrailers(_)) => Reply::RequestTrailers(TrailersResponse::default()),
            Some(Part::ResponseTrailers(_)) | None => {
                self.done = true;
                Reply::ResponseTrailers(TrailersResponse::default())
            }
        }
    }

    /// Once the metadata names a reservation: from now on the end of this stream settles
    /// it, however long the response takes (the sweep leaves it alone). In-process
    /// counters attach at once; shared ones return what to wait for before the stream
    /// reads on (so a settle never overtakes its attach).
    fn attach(&mut self, shared: &Arc<Shared>) -> Option<Attaching> {
        if self.attached {
            return None;
        }
        let key_id = self.key_id?;
        self.attached = true;
        let ticket = self.reservation?;
        let now = shared.clock.read();
        // A lazy future does nothing until polled: dropping the one that is not ready
        // and asking again from a future that owns `shared` attaches once.
        shared.limiters.counters.attach(key_id, ticket, now).into_ready().err()?;
        let shared = Arc::clone(shared);
        Some(Box::pin(async move { shared.limiters.counters.attach(key_id, ticket, now).await }))
    }

    /// Records the response (once), whatever it reported; a cut stream still counts.
    #[tracing::instrument(level = "debug", name = "metering", skip_all, fields(key_id = ?self.key_id, status = self.status))]
    async fn finish(self, shared: &Shared) {
        let Some(key_id) = self.key_id else {
            if self.seen && !DENIAL_STATUSES.contains(&self.status) {
                without_metadata(shared);
            }
            return;
        };
        let reported = self.parser.map(UsageParser::finish).unwrap_or_default();
        if let Some(encoding) = &self.content_encoding {
            tracing::warn!(key_id = %key_id, encoding, "response body is compressed: its usage cannot be read");
        }
        let now = shared.clock.read();
        let limits = shared.view_for_metering().key_by_id(key_id).map(|k| k.limits);
        // A compressed body was not read: its reservation is the floor.
        let content_tokens = match (&self.content_encoding, &self.estimate) {
            (None, Some(e)) => e.tokens(),
            _ => 0,
        };
        let seen = Observed { status: self.status, reported, content_tokens, complete: self.done };
        let Settled { metered, unpriced } =
            metering::settle(&shared.limiters, key_id, limits, self.reservation, &seen, now).await;
        let reported = &seen.reported;
        let model = reported.model.as_deref().unwrap_or("");
        if unpriced && shared.metrics.unpriced(model) {
            tracing::warn!(
                model,
                "unpriced model: tokens are counted at cost 0, or at the highest prices for keys with a USD limit \
                 (set a price with SetModelPrice)"
            );
        }
        shared.metrics.metered(metered.prompt_tokens, metered.completion_tokens, reported.found);
        if !reported.found && seen.succeeded() {
            tracing::debug!(key_id = %key_id, content_tokens, charged = metered.completion_tokens, "no usage in a successful response: charged its estimate or reservation");
        }
        tracing::debug!(key_id = %key_id, prompt = metered.prompt_tokens, completion = metered.completion_tokens, cost_micros = metered.cost_micros, "metered");
    }
}

/// Records the exchange now when the counters answer at once (in process), else from a
/// task on this runtime (shared counters), counted until it has recorded.
fn record(exchange: Exchange, shared: &Arc<Shared>) {
    let owned = Arc::clone(shared);
    let mut settling = Box::pin(async move { exchange.finish(&owned).await });
    if now_or_never(settling.as_mut()).is_none()
        && let Ok(runtime) = tokio::runtime::Handle::try_current()
    {
        let guard = shared.metering_started();
        runtime.spawn(async move {
            settling.await;
            drop(guard);
        });
    }
}

/// One response's metering stream, the replies of the call's response body: reads Envoy's
/// messages as they come (answering each in blocking mode, nothing in observability
/// mode) and records the exchange when the stream ends, or when it is dropped (Envoy
/// resetting it, the runtime shutting down).
pub struct MeterStream<B> {
    inbound: Messages<B>,
    exchange: Option<Exchange>,
    shared: Arc<Shared>,
    /// An attach to the shared counters that must finish before reading on.
    attaching: Option<Attaching>,
    /// A reply held while attaching.
    reply: Option<Bytes>,
    /// Counts the stream as in flight until it has recorded (graceful shutdown waits).
    _guard: MeteringGuard,
}

impl<B> MeterStream<B> {
    fn record(&mut self) {
        if let Some(exchange) = self.exchange.take() {
            record(exchange, &self.shared);
        }
    }
}

impl<B> Drop for MeterStream<B> {
    fn drop(&mut self) {
        self.record();
    }
}

impl<B> Replies for MeterStream<B>
where
    B: RequestBody<Data = Bytes> + Unpin,
    B::Error: Into<StdError>,
{
    /// The next reply to send; `None` once the exchange is recorded.
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        loop {
            if let Some(attaching) = self.attaching.as_mut() {
                ready!(attaching.as_mut().poll(cx));
                self.attaching = None;
            }
            if let Some(reply) = self.reply.take() {
                return Poll::Ready(Some(reply));
            }
            let Some(exchange) = self.exchange.as_mut() else { return Poll::Ready(None) };
            if exchange.done {
                self.record();
                return Poll::Ready(None);
            }
            // Envoy closing the stream early (a cut response), or a message that cannot be
            // read, ends it too.
            let message = ready!(self.inbound.poll_message(cx));
            let Some(m) = message.and_then(|m| m.ok()).and_then(|m| ProcessingInput::decode(m).ok()) else {
                self.record();
                return Poll::Ready(None);
            };
            // In observability mode Envoy ignores replies; otherwise it waits for each.
            let observe_only = m.observability_mode;
            let reply = exchange.on_message(m);
            self.attaching = exchange.attach(&self.shared);
            if !observe_only {
                let reply = ProcessingResponse { response: Some(reply), ..Default::default() };
                self.reply = Some(grpc::frame(reply.encoded_len(), |out| reply.encode_raw(out)));
            }
        }
    }
}

/// The largest message read from Envoy (as tonic's default): a body chunk in
/// `STREAMED` mode is bounded by Envoy's buffer, a `BUFFERED` body by the route's.
const MAX_PROCESSING_REQUEST: usize = 4 * 1024 * 1024;

impl MeterService {
    /// The method's path.
    pub const PATH: &'static str = "/envoy.service.ext_proc.v3.ExternalProcessor/Process";

    /// One metering stream: the response is the stream itself (see [`MeterStream`]).
    pub(super) fn call<B>(&self, request: http::Request<B>) -> http::Response<ReplyBody<MeterStream<B>>>
    where
        B: RequestBody<Data = Bytes> + Unpin,
        B::Error: Into<StdError>,
    {
        grpc::response(ReplyBody::new(MeterStream {
            inbound: Messages::new(request.into_body(), MAX_PROCESSING_REQUEST),
            exchange: Some(Exchange::default()),
            shared: Arc::clone(&self.shared),
            attaching: None,
            reply: None,
            _guard: self.shared.metering_started(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use envoy_types::pb::envoy::config::core::v3::{HeaderMap, HeaderValue, Metadata};
    use envoy_types::pb::envoy::service::ext_proc::v3::processing_request::Request as Msg;
    use envoy_types::pb::envoy::service::ext_proc::v3::{HttpBody, HttpHeaders, ProcessingRequest};
    use envoy_types::pb::google::protobuf::value::Kind;
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

    fn msg(request: Msg, md: Option<Metadata>) -> ProcessingInput {
        ProcessingInput::of(&ProcessingRequest { request: Some(request), metadata_context: md, ..Default::default() })
    }

    #[test]
    fn reads_metadata_status_and_usage_across_messages() {
        let id = Uuid::now_v7();
        let mut x = Exchange::default();
        let reply = x.on_message(msg(
            headers(&[(":status", "200"), ("content-type", "application/json")], false),
            metadata(&id.to_string(), Some("42.100.7.3.1780272000000000")),
        ));
        assert!(matches!(reply, Reply::ResponseHeaders(HeadersResponse { response: Some(_) })));
        assert_eq!(
            (x.key_id, x.reservation, x.status, x.done),
            (Some(id), x.reservation.filter(|t| t.id == 42 && t.hold.tokens == 100), 200, false)
        );
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
