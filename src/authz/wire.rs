//! The ext_authz `Check` on the wire: the parts of Envoy's `CheckRequest` Check reads,
//! decoded straight from the gRPC frame, and the tonic service that answers it.
//!
//! Envoy's `CheckRequest` also carries the peers' addresses and certificates, the
//! request's id, time, host, scheme and protocol, and metadata: decoding all of that into
//! owned strings and maps is about half of what a Check allocates, and Check reads none of
//! it. The messages here keep the field numbers of `envoy.service.auth.v3` for what Check
//! reads; protobuf skips every other field on decoding.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::pb::envoy::config::core::v3::HeaderMap;
use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::body::Body;
use tonic::codegen::Body as RequestBody;
use tonic::codegen::{BoxFuture, Service, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};

use super::AuthzService;
use crate::domain::check::Admitted;

/// `envoy.service.auth.v3.CheckRequest`, as far as Check reads it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct CheckInput {
    #[prost(message, optional, tag = "1")]
    pub attributes: Option<Attributes>,
}

/// `envoy.service.auth.v3.AttributeContext`: the request and the route's
/// `context_extensions` (which name the gateway).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Attributes {
    #[prost(message, optional, tag = "4")]
    pub request: Option<RequestAttributes>,
    #[prost(map = "string, string", tag = "10")]
    pub context_extensions: HashMap<String, String>,
}

/// `AttributeContext.Request`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct RequestAttributes {
    #[prost(message, optional, tag = "2")]
    pub http: Option<HttpAttributes>,
}

/// `AttributeContext.HttpRequest`: headers (or, with `encode_raw_headers`, the header
/// map), path and body.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HttpAttributes {
    #[prost(map = "string, string", tag = "3")]
    pub headers: HashMap<String, String>,
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderMap>,
    #[prost(string, tag = "4")]
    pub path: String,
    /// A `string` on the wire, read as bytes: Check reads the body as bytes anyway, so
    /// it is neither checked for UTF-8 nor copied out of the frame.
    #[prost(bytes = "bytes", tag = "11")]
    pub body: prost::bytes::Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: prost::bytes::Bytes,
}

impl CheckInput {
    /// What Check reads of a full `CheckRequest` (tests and benches build those).
    pub fn of(request: &envoy_types::pb::envoy::service::auth::v3::CheckRequest) -> CheckInput {
        use prost::Message;
        CheckInput::decode(request.encode_to_vec().as_slice()).unwrap_or_default()
    }
}

/// `envoy.service.ext_proc.v3.ProcessingRequest`, as far as metering reads it.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ProcessingInput {
    #[prost(oneof = "Part", tags = "2, 3, 4, 5, 6, 7")]
    pub part: Option<Part>,
    /// `metadata_context` (an `envoy.config.core.v3.Metadata`), left encoded: metering
    /// reads it once per stream, not with every body chunk.
    #[prost(bytes = "bytes", tag = "8")]
    pub metadata_context: prost::bytes::Bytes,
    #[prost(bool, tag = "10")]
    pub observability_mode: bool,
}

/// Which part of the HTTP exchange a message carries.
#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Part {
    #[prost(message, tag = "2")]
    RequestHeaders(Headers),
    #[prost(message, tag = "3")]
    ResponseHeaders(Headers),
    #[prost(message, tag = "4")]
    RequestBody(BodyChunk),
    #[prost(message, tag = "5")]
    ResponseBody(BodyChunk),
    #[prost(message, tag = "6")]
    RequestTrailers(Trailers),
    #[prost(message, tag = "7")]
    ResponseTrailers(Trailers),
}

/// `HttpHeaders`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Headers {
    #[prost(message, optional, tag = "1")]
    pub headers: Option<HeaderMap>,
    #[prost(bool, tag = "3")]
    pub end_of_stream: bool,
}

/// `HttpBody`: a chunk, shared with the frame it came in (not copied).
#[derive(Clone, PartialEq, prost::Message)]
pub struct BodyChunk {
    #[prost(bytes = "bytes", tag = "1")]
    pub body: prost::bytes::Bytes,
    #[prost(bool, tag = "2")]
    pub end_of_stream: bool,
}

/// `HttpTrailers`: metering reads only that they came.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Trailers {}

impl ProcessingInput {
    /// What metering reads of a full `ProcessingRequest` (tests build those).
    #[cfg(test)]
    pub fn of(request: &envoy_types::pb::envoy::service::ext_proc::v3::ProcessingRequest) -> ProcessingInput {
        use prost::Message;
        ProcessingInput::decode(request.encode_to_vec().as_slice()).unwrap_or_default()
    }
}

/// A protobuf writer that either counts bytes or writes them, so a message is sized and
/// written by the same code (a nested message's length comes before its fields).
pub(super) trait Out {
    fn put(&mut self, bytes: &[u8]);

    /// The count, when this only counts: a nested message then adds its length without
    /// going through its fields again.
    fn count(&mut self) -> Option<&mut usize> {
        None
    }
}

/// Counts what would be written.
struct Len(usize);

impl Out for Len {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }

    fn count(&mut self) -> Option<&mut usize> {
        Some(&mut self.0)
    }
}

impl<B: prost::bytes::BufMut> Out for B {
    fn put(&mut self, bytes: &[u8]) {
        self.put_slice(bytes);
    }
}

const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

fn varint(out: &mut dyn Out, mut value: u64) {
    let (mut bytes, mut n) = ([0u8; 10], 0);
    while value >= 0x80 {
        bytes[n] = (value as u8) | 0x80;
        value >>= 7;
        n += 1;
    }
    bytes[n] = value as u8;
    out.put(&bytes[..=n]);
}

fn key(out: &mut dyn Out, tag: u32, wire_type: u32) {
    varint(out, u64::from(tag << 3 | wire_type));
}

/// A `string` (or `bytes`) field.
pub(super) fn string(out: &mut dyn Out, tag: u32, value: &str) {
    key(out, tag, LENGTH_DELIMITED);
    varint(out, value.len() as u64);
    out.put(value.as_bytes());
}

/// An integer or enum field (proto3: zero is not written).
pub(super) fn int(out: &mut dyn Out, tag: u32, value: u64) {
    if value != 0 {
        key(out, tag, VARINT);
        varint(out, value);
    }
}

/// A message field whose fields `body` writes.
pub(super) fn message(out: &mut dyn Out, tag: u32, body: &dyn Fn(&mut dyn Out)) {
    let mut len = Len(0);
    body(&mut len);
    key(out, tag, LENGTH_DELIMITED);
    varint(out, len.0 as u64);
    match out.count() {
        Some(count) => *count += len.0,
        None => body(out),
    }
}

/// Text formatted on the stack (numbers, ids), for fields of an answer.
pub(super) struct Text<const N: usize> {
    bytes: [u8; N],
    len: usize,
}

impl<const N: usize> Text<N> {
    pub(super) fn of(value: impl std::fmt::Display) -> Self {
        use std::fmt::Write;
        let mut text = Text { bytes: [0; N], len: 0 };
        // Every caller's N holds its longest value; a longer one would be cut, never panic.
        let _ = write!(text, "{value}");
        text
    }

    pub(super) fn as_str(&self) -> &str {
        std::str::from_utf8(&self.bytes[..self.len]).unwrap_or("")
    }
}

impl<const N: usize> std::fmt::Write for Text<N> {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        let end = self.len + s.len();
        if end > N {
            return Err(std::fmt::Error);
        }
        self.bytes[self.len..end].copy_from_slice(s.as_bytes());
        self.len = end;
        Ok(())
    }
}

/// A `CheckResponse` as sent: an allowed request's is written straight from the decision
/// by [`super::response`] (no intermediate message, no allocation); denials are built as
/// messages.
pub enum Answer {
    Allow(Admitted),
    Other(CheckResponse),
}

impl Answer {
    /// The answer as Envoy reads it (tests, benches).
    pub fn to_response(&self) -> CheckResponse {
        use prost::Message;
        match self {
            Answer::Other(r) => r.clone(),
            Answer::Allow(_) => CheckResponse::decode(self.encode_to_vec().as_slice()).unwrap_or_default(),
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Answer::Allow(_))
    }
}

impl prost::Message for Answer {
    fn encode_raw(&self, buf: &mut impl prost::bytes::BufMut) {
        match self {
            Answer::Allow(a) => super::response::write_allow(a, buf),
            Answer::Other(r) => r.encode_raw(buf),
        }
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl prost::bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Answers are only sent; one read back merges as a plain CheckResponse.
        if let Answer::Allow(_) = self {
            *self = Answer::Other(CheckResponse::default());
        }
        match self {
            Answer::Other(r) => r.merge_field(tag, wire_type, buf, ctx),
            Answer::Allow(_) => Ok(()),
        }
    }

    fn encoded_len(&self) -> usize {
        match self {
            Answer::Allow(a) => {
                let mut len = Len(0);
                super::response::write_allow(a, &mut len);
                len.0
            }
            Answer::Other(r) => r.encoded_len(),
        }
    }

    fn clear(&mut self) {
        *self = Answer::Other(CheckResponse::default());
    }
}

/// A gRPC method Envoy calls, decoded with the messages of this module.
pub trait Method: Send + Sync + 'static {
    /// The service's full name.
    const SERVICE: &'static str;
    /// The method's path (`/service/method`).
    const PATH: &'static str;

    /// Answers one call (the path is checked).
    fn call<B>(self: Arc<Self>, request: http::Request<B>) -> BoxFuture<http::Response<Body>, Infallible>
    where
        B: RequestBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static;
}

/// A tonic service for one [`Method`].
pub struct Server<M> {
    method: Arc<M>,
}

impl<M> Server<M> {
    pub fn new(method: M) -> Self {
        Server { method: Arc::new(method) }
    }
}

impl<M> Clone for Server<M> {
    fn clone(&self) -> Self {
        Server { method: Arc::clone(&self.method) }
    }
}

impl<M: Method> NamedService for Server<M> {
    const NAME: &'static str = M::SERVICE;
}

impl<M: Method, B> Service<http::Request<B>> for Server<M>
where
    B: RequestBody + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        if request.uri().path() != M::PATH {
            return Box::pin(async { Ok(tonic::Status::unimplemented("").into_http()) });
        }
        Arc::clone(&self.method).call(request)
    }
}

/// `envoy.service.auth.v3.Authorization`.
pub type AuthorizationServer = Server<AuthzService>;

struct Unary(Arc<AuthzService>);

impl UnaryService<CheckInput> for Unary {
    type Response = Answer;
    type Future = BoxFuture<tonic::Response<Answer>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<CheckInput>) -> Self::Future {
        let service = Arc::clone(&self.0);
        // A denial is a CheckResponse with an HTTP status, never a gRPC error: Envoy
        // would map a gRPC error to `status_on_error` and lose our body.
        Box::pin(async move { Ok(tonic::Response::new(service.decide(request.get_ref()).await)) })
    }
}

impl Method for AuthzService {
    const SERVICE: &'static str = "envoy.service.auth.v3.Authorization";
    const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";

    fn call<B>(self: Arc<Self>, request: http::Request<B>) -> BoxFuture<http::Response<Body>, Infallible>
    where
        B: RequestBody + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        Box::pin(async move {
            let mut grpc = Grpc::new(tonic_prost::ProstCodec::<Answer, CheckInput>::default());
            Ok(grpc.unary(Unary(self), request).await)
        })
    }
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{Address, HeaderValue, Metadata, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    use super::*;

    /// Everything Envoy sends decodes to what Check reads, and the rest is skipped.
    #[test]
    fn the_parts_check_reads_decode_as_envoy_sent_them() {
        let peer = |port| Peer {
            address: Some(Address {
                address: Some(address::Address::SocketAddress(SocketAddress {
                    address: "127.0.0.1".into(),
                    port_specifier: Some(
                        envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier::PortValue(port),
                    ),
                    ..Default::default()
                })),
            }),
            principal: "spiffe://peer".into(),
            ..Default::default()
        };
        let headers = HashMap::from([
            (":path".to_string(), "/v1/chat/completions?x=1".to_string()),
            ("x-api-key".to_string(), "pcs_secret".to_string()),
        ]);
        let header_map = HeaderMap {
            headers: vec![HeaderValue { key: "x-api-key".into(), raw_value: b"raw".to_vec(), ..Default::default() }],
        };
        let full = CheckRequest {
            attributes: Some(AttributeContext {
                source: Some(peer(50000)),
                destination: Some(peer(10000)),
                request: Some(Request {
                    time: Some(Default::default()),
                    http: Some(HttpRequest {
                        id: "12345".into(),
                        method: "POST".into(),
                        headers: headers.clone(),
                        header_map: Some(header_map.clone()),
                        path: "/v1/chat/completions?x=1".into(),
                        host: "demo.gateway.local".into(),
                        scheme: "http".into(),
                        size: 42,
                        protocol: "HTTP/1.1".into(),
                        body: "{\"max_tokens\":5}".into(),
                        raw_body: b"\x00raw".to_vec(),
                        ..Default::default()
                    }),
                }),
                context_extensions: HashMap::from([("gateway".to_string(), "demo".to_string())]),
                metadata_context: Some(Metadata::default()),
                ..Default::default()
            }),
        };
        let input = CheckInput::of(&full);
        let attributes = input.attributes.expect("attributes");
        assert_eq!(attributes.context_extensions.get("gateway").map(String::as_str), Some("demo"));
        let http = attributes.request.and_then(|r| r.http).expect("http");
        assert_eq!(http.headers, headers);
        assert_eq!(http.header_map, Some(header_map));
        assert_eq!(http.path, "/v1/chat/completions?x=1");
        assert_eq!(http.body, "{\"max_tokens\":5}".as_bytes());
        assert_eq!(http.raw_body, b"\x00raw".as_slice());
        // An empty request decodes to empty parts (Check answers it with a denial).
        assert_eq!(CheckInput::of(&CheckRequest::default()), CheckInput::default());
    }
}
