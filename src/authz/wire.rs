//! The ext_authz `Check` on the wire: the parts of Envoy's `CheckRequest` Check reads,
//! decoded straight from the gRPC frame, and the tonic service that answers it.
//!
//! Envoy's `CheckRequest` also carries the peers' addresses and certificates, the
//! request's id, time, host, scheme and protocol, and metadata: decoding all of that into
//! owned strings and maps is about half of what a Check allocates, and Check reads none of
//! it. The messages here keep the field numbers of `envoy.service.auth.v3` for what Check
//! reads; protobuf skips every other field on decoding.

use std::borrow::Cow;
use std::convert::Infallible;
use std::sync::Arc;

use envoy_types::pb::envoy::service::auth::v3::CheckResponse;
use tonic::codegen::Body as RequestBody;
use tonic::codegen::{BoxFuture, StdError, http};

use super::AuthzService;
use super::grpc::{self, ReplyBody};
use super::serve::Reply;
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
    #[prost(message, repeated, tag = "10")]
    pub context_extensions: Vec<Entry>,
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
    #[prost(message, repeated, tag = "3")]
    pub headers: Vec<Entry>,
    #[prost(message, optional, tag = "13")]
    pub header_map: Option<HeaderLines>,
    /// Read as bytes, like the headers: borrowed as text, not copied.
    #[prost(bytes = "bytes", tag = "4")]
    pub path: prost::bytes::Bytes,
    /// A `string` on the wire, read as bytes: Check reads the body as bytes anyway, so
    /// it is neither checked for UTF-8 nor copied out of the frame.
    #[prost(bytes = "bytes", tag = "11")]
    pub body: prost::bytes::Bytes,
    #[prost(bytes = "bytes", tag = "12")]
    pub raw_body: prost::bytes::Bytes,
}

/// One entry of a `map<string, string>` (the headers, the context extensions), as it is
/// on the wire: a message of a name and a value. Read as a list of entries sharing the
/// frame, not a hash map of owned strings: a Check's dozen headers cost one allocation,
/// not two dozen and a hash of each name.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Entry {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: prost::bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: prost::bytes::Bytes,
}

/// `envoy.config.core.v3.HeaderMap`: one entry per header line, sharing the frame.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderLines {
    #[prost(message, repeated, tag = "1")]
    pub headers: Vec<HeaderLine>,
}

/// `envoy.config.core.v3.HeaderValue`: the value as text, or (as Envoy sends it since
/// `raw_value` came) as bytes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct HeaderLine {
    #[prost(bytes = "bytes", tag = "1")]
    pub key: prost::bytes::Bytes,
    #[prost(bytes = "bytes", tag = "2")]
    pub value: prost::bytes::Bytes,
    #[prost(bytes = "bytes", tag = "3")]
    pub raw_value: prost::bytes::Bytes,
}

impl HeaderLine {
    pub fn value(&self) -> Cow<'_, str> {
        text(if self.raw_value.is_empty() { &self.value } else { &self.raw_value })
    }
}

impl HeaderLines {
    /// The first line named `name` (any case).
    pub fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        self.headers.iter().find(|h| h.key.eq_ignore_ascii_case(name.as_bytes())).map(HeaderLine::value)
    }
}

/// `envoy.config.core.v3.Metadata`, as far as metering reads it: the string fields of
/// each namespace in `filter_metadata` (a map, read as its entries).
#[derive(Clone, PartialEq, prost::Message)]
pub struct MetadataInput {
    #[prost(message, repeated, tag = "1")]
    pub filter_metadata: Vec<Namespace>,
}

/// One `filter_metadata` entry: a namespace and its `google.protobuf.Struct`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Namespace {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: prost::bytes::Bytes,
    #[prost(message, optional, tag = "2")]
    pub fields: Option<StructInput>,
}

/// `google.protobuf.Struct`: its fields, as entries.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StructInput {
    #[prost(message, repeated, tag = "1")]
    pub fields: Vec<Field>,
}

/// One `Struct.fields` entry; only a `string_value` is read (any other kind reads as
/// empty).
#[derive(Clone, PartialEq, prost::Message)]
pub struct Field {
    #[prost(bytes = "bytes", tag = "1")]
    pub name: prost::bytes::Bytes,
    #[prost(message, optional, tag = "2")]
    pub value: Option<StringValue>,
}

/// `google.protobuf.Value`, as far as a string goes.
#[derive(Clone, PartialEq, prost::Message)]
pub struct StringValue {
    #[prost(bytes = "bytes", tag = "3")]
    pub string_value: prost::bytes::Bytes,
}

impl MetadataInput {
    /// The string field `field` of `namespace` (the last entry of each wins, as in a map);
    /// `None` when absent, empty, not a string or not UTF-8.
    pub fn string(&self, namespace: &str, field: &str) -> Option<&str> {
        let ns = self.filter_metadata.iter().rev().find(|n| n.name == namespace.as_bytes())?;
        let f = ns.fields.as_ref()?.fields.iter().rev().find(|f| f.name == field.as_bytes())?;
        std::str::from_utf8(&f.value.as_ref()?.string_value).ok().filter(|s| !s.is_empty())
    }
}

/// Text that is valid UTF-8 (as Envoy writes it) is borrowed; any other byte reads as the
/// replacement character, so a key among other bytes is still seen.
pub fn text(bytes: &[u8]) -> Cow<'_, str> {
    // The strict check first: it is the common case, and much faster than the lossy one.
    match std::str::from_utf8(bytes) {
        Ok(text) => Cow::Borrowed(text),
        Err(_) => String::from_utf8_lossy(bytes),
    }
}

impl crate::domain::request::Headers for Vec<Entry> {
    fn get(&self, name: &str) -> Option<Cow<'_, str>> {
        // In a map on the wire, the last entry of a name wins.
        self.iter().rev().find(|e| e.name == name.as_bytes()).map(|e| text(&e.value))
    }

    fn any(&self, f: &mut dyn FnMut(&[u8], &[u8]) -> bool) -> bool {
        self.iter().any(|e| f(&e.name, &e.value))
    }
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
    pub headers: Option<HeaderLines>,
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

/// The protobuf writer of the answers: one pass into a `Vec`. A nested message's length
/// comes before its fields, so its fields are written first and its length is put in
/// front of them once known (a few hundred bytes moved, instead of sizing every nested
/// message before writing it).
pub(super) type Out = Vec<u8>;

const VARINT: u32 = 0;
const LENGTH_DELIMITED: u32 = 2;

fn varint(out: &mut Out, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn key(out: &mut Out, tag: u32, wire_type: u32) {
    varint(out, u64::from(tag << 3 | wire_type));
}

/// A `string` (or `bytes`) field.
pub(super) fn string(out: &mut Out, tag: u32, value: &str) {
    key(out, tag, LENGTH_DELIMITED);
    varint(out, value.len() as u64);
    out.extend_from_slice(value.as_bytes());
}

/// An integer or enum field (proto3: zero is not written).
pub(super) fn int(out: &mut Out, tag: u32, value: u64) {
    if value != 0 {
        key(out, tag, VARINT);
        varint(out, value);
    }
}

/// A message field whose fields `body` writes.
pub(super) fn message(out: &mut Out, tag: u32, body: impl FnOnce(&mut Out)) {
    key(out, tag, LENGTH_DELIMITED);
    let start = out.len();
    body(out);
    let len = out.len() - start;
    varint(out, len as u64);
    // The length, written at the end, moves in front of the fields.
    let written = out.len() - start - len;
    out[start..].rotate_right(written);
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

/// Room for an allowed Check's answer (headers, key id, gateway, reservation).
const ANSWER_CAPACITY: usize = 512;

/// A `CheckResponse` as sent: an allowed request's is written straight from the decision
/// by [`super::response`] (no intermediate message, no allocation); denials are built as
/// messages.
pub enum Answer {
    Allow(Admitted),
    Other(CheckResponse),
}

impl Answer {
    /// Appends the answer's protobuf encoding to `out`.
    pub fn write(&self, out: &mut Vec<u8>) {
        match self {
            Answer::Allow(a) => super::response::write_allow(a, out),
            Answer::Other(r) => prost::Message::encode_raw(r, out),
        }
    }

    /// The answer's protobuf encoding (benches, tests).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(ANSWER_CAPACITY);
        self.write(&mut out);
        out
    }

    /// The answer as Envoy reads it (tests, benches).
    pub fn to_response(&self) -> CheckResponse {
        use prost::Message;
        match self {
            Answer::Other(r) => r.clone(),
            Answer::Allow(_) => CheckResponse::decode(self.encode().as_slice()).unwrap_or_default(),
        }
    }

    pub fn is_allow(&self) -> bool {
        matches!(self, Answer::Allow(_))
    }
}

/// The largest `CheckRequest` read, as tonic's default: Envoy sends at most its
/// `max_request_bytes` of body and the headers it allows.
const MAX_CHECK_REQUEST: usize = 4 * 1024 * 1024;

impl AuthzService {
    /// The method's path.
    pub const PATH: &'static str = "/envoy.service.auth.v3.Authorization/Check";

    /// Check is one message each way, so it is served without tonic's streaming codec:
    /// the request is decoded where h2 received it (no 8 KiB buffer to copy it into) and
    /// the answer is written once, at its size. A denial is a `CheckResponse` with an
    /// HTTP status, never a gRPC error: Envoy would map a gRPC error to `status_on_error`
    /// and lose our body.
    pub(super) fn call<B>(self: Arc<Self>, request: http::Request<B>) -> BoxFuture<http::Response<Reply>, Infallible>
    where
        B: RequestBody<Data = prost::bytes::Bytes> + Unpin + Send + 'static,
        B::Error: Into<StdError> + Send + 'static,
    {
        Box::pin(async move {
            let input = match grpc::unary_message(request.into_body(), MAX_CHECK_REQUEST).await {
                Ok(message) => <CheckInput as prost::Message>::decode(message),
                Err(status) => return Ok(Reply::refused(status)),
            };
            Ok(match input {
                Ok(input) => unary_response(&self.decide(&input).await),
                Err(e) => Reply::refused(tonic::Status::internal(format!("CheckRequest: {e}"))),
            })
        })
    }
}

/// A unary gRPC response: the answer in one frame, then `grpc-status: 0`.
fn unary_response(answer: &Answer) -> http::Response<Reply> {
    grpc::response(Reply::Unary(ReplyBody::new(Some(grpc::frame(ANSWER_CAPACITY, |out| answer.write(out))))))
}

#[cfg(test)]
mod tests {
    use envoy_types::pb::envoy::config::core::v3::{Address, HeaderValue, Metadata, SocketAddress, address};
    use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Peer, Request};
    use envoy_types::pb::envoy::service::auth::v3::{AttributeContext, CheckRequest};

    use std::collections::HashMap;

    use super::*;
    use crate::domain::request::Headers;

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
        let header_map = envoy_types::pb::envoy::config::core::v3::HeaderMap {
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
        assert_eq!(attributes.context_extensions.get("gateway").as_deref(), Some("demo"));
        assert_eq!(attributes.context_extensions.len(), 1);
        let http = attributes.request.and_then(|r| r.http).expect("http");
        for (name, value) in &headers {
            assert_eq!(http.headers.get(name).as_deref(), Some(value.as_str()), "{name}");
        }
        assert_eq!(http.headers.len(), headers.len());
        assert_eq!(http.headers.get("host"), None);
        let lines = http.header_map.expect("header_map");
        assert_eq!(lines.headers.len(), 1);
        assert_eq!(lines.get("X-Api-Key").as_deref(), Some("raw"));
        assert_eq!(http.path, "/v1/chat/completions?x=1");
        assert_eq!(http.body, "{\"max_tokens\":5}".as_bytes());
        assert_eq!(http.raw_body, b"\x00raw".as_slice());
        // An empty request decodes to empty parts (Check answers it with a denial).
        assert_eq!(CheckInput::of(&CheckRequest::default()), CheckInput::default());
    }

    /// The answer goes out as one gRPC frame of the message, then `grpc-status: 0`.
    #[test]
    fn a_unary_response_is_one_frame_and_an_ok_status() {
        use http_body_util::BodyExt;
        let answer = Answer::Other(CheckResponse { status: Some(Default::default()), ..Default::default() });
        let response = unary_response(&answer);
        assert_eq!(response.headers()[http::header::CONTENT_TYPE], "application/grpc");
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
        let collected = rt.block_on(response.into_body().collect()).expect("body");
        assert_eq!(collected.trailers().map(|t| t["grpc-status"].clone()), Some(http::HeaderValue::from_static("0")));
        let bytes = collected.to_bytes();
        assert_eq!(&bytes[..], &crate::authz::grpc::tests::framed(&answer.encode())[..]);
    }

    /// Metering reads string fields of the ext_authz namespace from Envoy's metadata, as
    /// Envoy encodes it; other namespaces and other kinds of value are not mistaken for them.
    #[test]
    fn metadata_strings_read_from_their_namespace_only() {
        use envoy_types::pb::google::protobuf::value::Kind;
        use envoy_types::pb::google::protobuf::{Struct, Value};
        use prost::Message;
        let value = |kind| Value { kind: Some(kind) };
        let authz = Struct {
            fields: HashMap::from([
                ("key_id".to_string(), value(Kind::StringValue("k-1".into()))),
                ("number".to_string(), value(Kind::NumberValue(7.0))),
                ("empty".to_string(), value(Kind::StringValue(String::new()))),
            ]),
        };
        let other =
            Struct { fields: HashMap::from([("reservation".to_string(), value(Kind::StringValue("r".into())))]) };
        let md = Metadata {
            filter_metadata: HashMap::from([
                ("envoy.filters.http.ext_authz".to_string(), authz),
                ("other".to_string(), other),
            ]),
            ..Default::default()
        };
        let read = MetadataInput::decode(md.encode_to_vec().as_slice()).expect("metadata");
        assert_eq!(read.string("envoy.filters.http.ext_authz", "key_id"), Some("k-1"));
        assert_eq!(read.string("envoy.filters.http.ext_authz", "reservation"), None, "another namespace's field");
        assert_eq!(read.string("envoy.filters.http.ext_authz", "number"), None, "not a string");
        assert_eq!(read.string("envoy.filters.http.ext_authz", "empty"), None);
        assert_eq!(read.string("other", "reservation"), Some("r"));
        assert_eq!(read.string("missing", "key_id"), None);
    }

    /// Nested messages get their lengths in front, one byte or several, as prost writes them.
    #[test]
    fn nested_messages_are_written_as_prost_writes_them() {
        #[derive(Clone, PartialEq, prost::Message)]
        struct Inner {
            #[prost(string, tag = "2")]
            text: String,
            #[prost(uint64, tag = "3")]
            number: u64,
        }
        #[derive(Clone, PartialEq, prost::Message)]
        struct Outer {
            #[prost(message, optional, tag = "1")]
            inner: Option<Inner>,
            #[prost(string, tag = "4")]
            after: String,
        }
        use prost::Message;
        for size in [1, 120, 127, 128, 300, 20_000] {
            let text = "x".repeat(size);
            let mut out = Out::new();
            message(&mut out, 1, |m| {
                string(m, 2, &text);
                int(m, 3, 300);
            });
            string(&mut out, 4, "end");
            let expected = Outer { inner: Some(Inner { text: text.clone(), number: 300 }), after: "end".into() };
            assert_eq!(out, expected.encode_to_vec(), "{size}");
        }
    }

    /// A header that is not UTF-8 (which prost's strings would refuse) reads with
    /// replacement characters, and its bytes are searched as they are: a key inside it is
    /// still found.
    #[test]
    fn headers_that_are_not_utf8_still_show_a_key() {
        let headers = vec![
            Entry { name: "x-api-key".into(), value: "pcs_a".into() },
            Entry { name: "x-other".into(), value: prost::bytes::Bytes::from_static(b"\xff pcs_a \xfe") },
        ];
        assert_eq!(headers.get("x-api-key").as_deref(), Some("pcs_a"));
        assert!(headers.any(&mut |name, value| name == b"x-other" && memchr::memmem::find(value, b"pcs_a").is_some()));
        assert!(!headers.any(&mut |name, _| name == b"x-missing"));
    }
}
