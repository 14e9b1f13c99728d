//! gRPC's framing on the authz listener, without tonic's codec: the length-prefixed
//! messages of a request body read where h2 received them (a message that came whole in
//! one DATA frame is shared with it, not copied), and answers written as one frame each,
//! then `grpc-status: 0`.
//!
//! tonic's codec would give every call a buffer each way, copy each message into it and
//! box the body; Check and Process are the two methods Envoy calls on every request.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use hyper::body::Frame;
use prost::bytes::{Buf, Bytes, BytesMut};
use tonic::Status;
use tonic::codegen::Body as RequestBody;
use tonic::codegen::{StdError, http};

/// A message frame's header: the compressed flag and the length.
const HEADER: usize = 5;

/// The messages of a request body, in order.
pub struct Messages<B> {
    body: B,
    /// The last DATA frame, less the messages taken from it.
    chunk: Bytes,
    /// The start of a message that did not come whole in one DATA frame.
    partial: BytesMut,
    ended: bool,
    /// The largest message accepted.
    limit: usize,
}

impl<B> Messages<B>
where
    B: RequestBody<Data = Bytes> + Unpin,
    B::Error: Into<StdError>,
{
    pub fn new(body: B, limit: usize) -> Self {
        Messages { body, chunk: Bytes::new(), partial: BytesMut::new(), ended: false, limit }
    }

    /// The next message; `None` once the body has ended between messages. A compressed
    /// message, one over the limit, a body cut inside a message or a body that fails
    /// is an error (and the stream should end).
    pub fn poll_message(&mut self, cx: &mut Context<'_>) -> Poll<Option<Result<Bytes, Status>>> {
        loop {
            if self.partial.is_empty() {
                if let Some(message) = split(&mut self.chunk, self.limit).transpose() {
                    return Poll::Ready(Some(message));
                }
                // What is left is the start of a message: keep it until the rest comes.
                self.partial.extend_from_slice(&self.chunk);
            } else {
                self.partial.extend_from_slice(&std::mem::take(&mut self.chunk));
                if let Some(message) = split(&mut self.partial, self.limit).transpose() {
                    return Poll::Ready(Some(message.map(BytesMut::freeze)));
                }
            }
            self.chunk = Bytes::new();
            if self.ended {
                if self.partial.is_empty() {
                    return Poll::Ready(None);
                }
                self.partial.clear();
                return Poll::Ready(Some(Err(Status::internal("the request ends inside a gRPC message"))));
            }
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.chunk = data;
                    }
                }
                Some(Err(e)) => {
                    self.ended = true;
                    self.partial.clear();
                    return Poll::Ready(Some(Err(Status::internal(format!("reading the request: {}", e.into())))));
                }
                None => self.ended = true,
            }
        }
    }
}

/// Takes the first message of `buf` when it holds all of it; refuses what can be refused
/// from the header alone.
fn split<T: Buf + SplitTo>(buf: &mut T, limit: usize) -> Result<Option<T>, Status> {
    let head = buf.chunk();
    if head.len() < HEADER {
        return Ok(None);
    }
    if head[0] != 0 {
        return Err(Status::unimplemented("compressed messages are not accepted"));
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > limit {
        return Err(Status::resource_exhausted(format!("the message is larger than {limit} bytes")));
    }
    if buf.remaining() < HEADER + len {
        return Ok(None);
    }
    buf.advance(HEADER);
    Ok(Some(buf.split_to(len)))
}

/// `split_to` of `Bytes` and `BytesMut`: the first `at` bytes, shared, not copied.
trait SplitTo: Sized {
    fn split_to(&mut self, at: usize) -> Self;
}

impl SplitTo for Bytes {
    fn split_to(&mut self, at: usize) -> Self {
        Bytes::split_to(self, at)
    }
}

impl SplitTo for BytesMut {
    fn split_to(&mut self, at: usize) -> Self {
        BytesMut::split_to(self, at)
    }
}

/// The one message of a unary gRPC request, read whole.
pub async fn unary_message<B>(body: B, limit: usize) -> Result<Bytes, Status>
where
    B: RequestBody<Data = Bytes> + Unpin,
    B::Error: Into<StdError>,
{
    let mut messages = Messages::new(body, limit);
    let message = std::future::poll_fn(|cx| messages.poll_message(cx)).await;
    let message = message.unwrap_or_else(|| Err(Status::internal("the request holds no gRPC message")))?;
    match std::future::poll_fn(|cx| messages.poll_message(cx)).await {
        None => Ok(message),
        Some(_) => Err(Status::internal("the request is not exactly one gRPC message")),
    }
}

/// One message framed for the wire: `write` appends its encoding after the frame's
/// header, whose length is filled in after.
pub fn frame(capacity: usize, write: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut frame = Vec::with_capacity(HEADER + capacity);
    frame.extend_from_slice(&[0; HEADER]);
    write(&mut frame);
    let len = u32::try_from(frame.len() - HEADER).unwrap_or(u32::MAX);
    frame[1..HEADER].copy_from_slice(&len.to_be_bytes());
    Bytes::from(frame)
}

/// A gRPC response's headers, its body to come.
pub fn response<T>(body: T) -> http::Response<T> {
    let mut response = http::Response::new(body);
    response.headers_mut().insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("application/grpc"));
    response
}

/// The messages a call answers with, each framed, in order: `None` once there are no
/// more (the call succeeded).
pub trait Replies: Unpin {
    fn poll_reply(&mut self, cx: &mut Context<'_>) -> Poll<Option<Bytes>>;
}

/// A unary call's one message.
impl Replies for Option<Bytes> {
    fn poll_reply(&mut self, _cx: &mut Context<'_>) -> Poll<Option<Bytes>> {
        Poll::Ready(self.take())
    }
}

/// A gRPC response body: the replies as DATA frames, then `grpc-status: 0`.
pub struct ReplyBody<R> {
    replies: R,
    ended: bool,
}

impl<R> ReplyBody<R> {
    pub fn new(replies: R) -> Self {
        ReplyBody { replies, ended: false }
    }
}

impl<R: Replies> RequestBody for ReplyBody<R> {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        if this.ended {
            return Poll::Ready(None);
        }
        Poll::Ready(Some(Ok(match ready!(this.replies.poll_reply(cx)) {
            Some(reply) => Frame::data(reply),
            None => {
                this.ended = true;
                let mut trailers = http::HeaderMap::with_capacity(1);
                trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                Frame::trailers(trailers)
            }
        })))
    }

    fn is_end_stream(&self) -> bool {
        self.ended
    }
}

#[cfg(test)]
pub mod tests {
    use super::*;

    /// A request body as h2 hands it over, in these pieces.
    pub fn body(pieces: &[&[u8]]) -> impl RequestBody<Data = Bytes, Error = Infallible> + Send + Unpin + 'static {
        let frames: Vec<Result<Frame<Bytes>, Infallible>> =
            pieces.iter().map(|p| Ok(Frame::data(Bytes::copy_from_slice(p)))).collect();
        http_body_util::StreamBody::new(tokio_stream::iter(frames))
    }

    pub fn framed(message: &[u8]) -> Vec<u8> {
        frame(message.len(), |out| out.extend_from_slice(message)).to_vec()
    }

    fn run<T>(f: impl Future<Output = T>) -> T {
        tokio::runtime::Builder::new_current_thread().build().expect("runtime").block_on(f)
    }

    fn read(pieces: &[&[u8]], limit: usize) -> Result<Vec<u8>, tonic::Code> {
        run(unary_message(body(pieces), limit)).map(|m| m.to_vec()).map_err(|s| s.code())
    }

    /// Every message of a stream, and how it ended.
    fn read_all(pieces: &[&[u8]], limit: usize) -> (Vec<Vec<u8>>, Option<tonic::Code>) {
        let mut messages = Messages::new(body(pieces), limit);
        let mut out = Vec::new();
        loop {
            match run(std::future::poll_fn(|cx| messages.poll_message(cx))) {
                None => return (out, None),
                Some(Ok(m)) => out.push(m.to_vec()),
                Some(Err(e)) => return (out, Some(e.code())),
            }
        }
    }

    /// A Check's one message is read whole however h2 split it, and anything that is not
    /// exactly one uncompressed message within the limit is refused (Envoy then denies).
    #[test]
    fn a_unary_request_is_exactly_one_message() {
        let whole = framed(b"hello");
        assert_eq!(read(&[&whole], 64), Ok(b"hello".to_vec()));
        assert_eq!(read(&[&whole[..2], &whole[2..6], &whole[6..]], 64), Ok(b"hello".to_vec()), "split");
        assert_eq!(read(&[&framed(b"")], 64), Ok(vec![]), "an empty message");
        assert_eq!(read(&[], 64), Err(tonic::Code::Internal), "no message");
        assert_eq!(read(&[&whole[..7]], 64), Err(tonic::Code::Internal), "cut short");
        let two = [framed(b"a"), framed(b"b")].concat();
        assert_eq!(read(&[&two], 64), Err(tonic::Code::Internal), "two messages");
        let mut compressed = whole.clone();
        compressed[0] = 1;
        assert_eq!(read(&[&compressed], 64), Err(tonic::Code::Unimplemented));
        assert_eq!(read(&[&whole[..3], &whole[3..]], 4), Err(tonic::Code::ResourceExhausted), "over the limit");
    }

    /// A stream's messages come out in order however they were split across DATA frames:
    /// several in one frame, one across several, and an empty frame between them.
    #[test]
    fn stream_messages_come_out_whole_and_in_order() {
        let (a, b, c) = (framed(b"first"), framed(b""), framed(b"third message"));
        let all = [a.clone(), b.clone(), c.clone()].concat();
        let want = vec![b"first".to_vec(), vec![], b"third message".to_vec()];
        assert_eq!(read_all(&[&all], 64), (want.clone(), None), "all in one frame");
        let cut = a.len() + b.len() + 3;
        assert_eq!(read_all(&[&all[..2], &all[2..cut], &[], &all[cut..]], 64), (want.clone(), None), "split");
        let bytes: Vec<&[u8]> = all.iter().map(std::slice::from_ref).collect();
        assert_eq!(read_all(&bytes, 64), (want, None), "a byte at a time");
        assert_eq!(read_all(&[], 64), (vec![], None), "no message at all");
    }

    /// A stream ends with an error at what cannot be read on: a body cut inside a
    /// message, a compressed one, one over the limit (refused from its header, before
    /// the rest is held); the messages before it were read.
    #[test]
    fn stream_errors_end_it_after_the_messages_before() {
        let (a, b) = (framed(b"ok"), framed(b"0123456789"));
        assert_eq!(read_all(&[&a, &b[..8]], 64), (vec![b"ok".to_vec()], Some(tonic::Code::Internal)));
        let mut compressed = b.clone();
        compressed[0] = 1;
        assert_eq!(read_all(&[&a, &compressed], 64), (vec![b"ok".to_vec()], Some(tonic::Code::Unimplemented)));
        assert_eq!(read_all(&[&a, &b[..5]], 4), (vec![b"ok".to_vec()], Some(tonic::Code::ResourceExhausted)));
    }
}
