//! The authz listener (ext_authz `Check`, ext_proc `Process`, gRPC health) served by
//! hyper's HTTP/2 server directly.
//!
//! tonic's server would put every call through its layers before it reached us: a boxed
//! request body, a boxed service and future, the connection's address in the request's
//! extensions, a timer for Envoy's `grpc-timeout`, and axum's router, which matches the
//! path and boxes again. A Check is decided in memory in a few microseconds (a shared
//! counter call has its own timeout), so here the path is matched once and the call goes
//! straight to its method, with hyper's own request body. The connection settings and
//! the graceful shutdown are tonic's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prost::bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_stream::{Stream, StreamExt};
use tonic::body::Body;
use tonic::codegen::{BoxFuture, Service, http};

use super::grpc::ReplyBody;
use super::meter::MeterStream;
use super::{AuthzService, MeterService};
use crate::listen::Limits;

/// The services of the authz listener.
pub struct Services<H> {
    pub authz: Arc<AuthzService>,
    pub meter: Arc<MeterService>,
    pub health: H,
}

impl<H: Clone> Clone for Services<H> {
    fn clone(&self) -> Self {
        Services { authz: Arc::clone(&self.authz), meter: Arc::clone(&self.meter), health: self.health.clone() }
    }
}

/// The gRPC health service's path prefix.
const HEALTH: &str = "/grpc.health.v1.Health/";

impl<H> hyper::service::Service<http::Request<Incoming>> for Services<H>
where
    H: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible> + Clone + Send + 'static,
    H::Future: Send + 'static,
{
    type Response = http::Response<Reply>;
    type Error = Infallible;
    type Future = Call;

    fn call(&self, request: http::Request<Incoming>) -> Self::Future {
        let path = request.uri().path();
        if path == AuthzService::PATH {
            return Call::Later(Arc::clone(&self.authz).call(request));
        }
        if path == MeterService::PATH {
            return Call::now(self.meter.call(request).map(|stream| Reply::Meter(Box::new(stream))));
        }
        if path.starts_with(HEALTH) {
            // tonic's generated services are always ready.
            let health = self.health.clone().call(request);
            return Call::Later(Box::pin(async move { Ok(tonic_reply(health.await)) }));
        }
        Call::now(Reply::refused(tonic::Status::unimplemented("")))
    }
}

/// A call's response: there at once (a metering stream's, whose body does the work; a
/// refusal), or to come (a Check's, a health check's).
pub enum Call {
    Now(std::future::Ready<Result<http::Response<Reply>, Infallible>>),
    Later(BoxFuture<http::Response<Reply>, Infallible>),
}

impl Call {
    fn now(response: http::Response<Reply>) -> Self {
        Call::Now(std::future::ready(Ok(response)))
    }
}

impl Future for Call {
    type Output = Result<http::Response<Reply>, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Call::Now(ready) => Pin::new(ready).poll(cx),
            Call::Later(later) => later.as_mut().poll(cx),
        }
    }
}

/// Another method's tonic response.
fn tonic_reply(response: Result<http::Response<Body>, Infallible>) -> http::Response<Reply> {
    match response {
        Ok(response) => response.map(Reply::Other),
        Err(never) => match never {},
    }
}

/// A response body: a Check's answer (one frame, then `grpc-status`), a metering
/// stream, or the health service's tonic body.
pub enum Reply {
    Unary(ReplyBody<Option<Bytes>>),
    /// Boxed: a stream's state is ~600 bytes, an answer's 40.
    Meter(Box<ReplyBody<MeterStream<Incoming>>>),
    Other(Body),
}

impl Reply {
    /// A call refused with `status` (no message, the status in the trailers).
    pub fn refused(status: tonic::Status) -> http::Response<Reply> {
        status.into_http().map(Reply::Other)
    }
}

impl hyper::body::Body for Reply {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        match self.get_mut() {
            Reply::Unary(b) => hyper::body::Body::poll_frame(Pin::new(b), cx).map_err(|never| match never {}),
            Reply::Meter(b) => hyper::body::Body::poll_frame(Pin::new(b.as_mut()), cx).map_err(|never| match never {}),
            Reply::Other(b) => hyper::body::Body::poll_frame(Pin::new(b), cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Reply::Unary(b) => b.is_end_stream(),
            Reply::Meter(b) => b.is_end_stream(),
            Reply::Other(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            Reply::Unary(b) => b.size_hint(),
            Reply::Meter(b) => b.size_hint(),
            Reply::Other(b) => b.size_hint(),
        }
    }
}

/// Serves every connection `incoming` yields until `stop`; then asks each to finish its
/// calls (HTTP/2 GOAWAY) and returns once all have closed.
pub async fn serve<C, H>(
    incoming: impl Stream<Item = std::io::Result<C>>,
    limits: Limits,
    services: Services<H>,
    stop: impl Future<Output = ()>,
) where
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Service<http::Request<Incoming>, Response = http::Response<Body>, Error = Infallible>
        + Clone
        + Send
        + Sync
        + 'static,
    H::Future: Send + 'static,
{
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_concurrent_streams)
        .keep_alive_interval(Some(limits.keepalive_interval))
        .keep_alive_timeout(limits.keepalive_timeout);
    // Every connection holds a receiver; the sender closes once all of them are gone.
    let (closing, watch) = tokio::sync::watch::channel(false);
    let mut incoming = pin!(incoming);
    let mut stop = pin!(stop);
    loop {
        let conn = tokio::select! {
            _ = &mut stop => break,
            conn = incoming.next() => conn,
        };
        let conn = match conn {
            Some(Ok(conn)) => conn,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "authz connection not accepted");
                continue;
            }
            None => break,
        };
        let (builder, services, mut watch) = (builder.clone(), services.clone(), watch.clone());
        tokio::spawn(async move {
            let mut served = pin!(builder.serve_connection(TokioIo::new(conn), services));
            // (The watch's guard is not held across an await: it is not `Send`.)
            let ended = tokio::select! {
                ended = served.as_mut() => Some(ended),
                _ = watch.wait_for(|closing| *closing) => None,
            };
            let ended = match ended {
                Some(ended) => ended,
                None => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            };
            if let Err(e) = ended {
                tracing::debug!(error = %e, "authz connection ended");
            }
            drop(watch);
        });
    }
    let _ = closing.send(true);
    drop(watch);
    closing.closed().await;
}
