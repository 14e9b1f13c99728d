//! The gRPC listeners' front door: bounded connections, a handshake deadline, optional TLS.
//!
//! tonic and hyper wait forever for a client that connects and sends nothing (neither
//! has a handshake timeout, and tonic's own TLS accept has none either), so a few hundred
//! idle sockets could hold every file descriptor. Here a connection reaches tonic only
//! once it has completed its TLS handshake (when TLS is on) and sent the whole HTTP/2
//! connection preface (the magic string and a SETTINGS frame) within
//! `--handshake-timeout`; until then it is ours, and is closed at the deadline. A listener
//! that also speaks HTTP/1.1 (the admin one: gRPC-Web and the console) takes, instead of
//! the preface, a first request's complete head (request line and headers) in that time. Each
//! listener holds at most `--max-connections` connections, idle or not: at the cap it
//! stops accepting (the kernel queues the rest) until one closes.

use std::io;
use std::net::SocketAddr;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::PrivateKeyDer;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::transport::server::{Connected, TcpConnectInfo};

use crate::config::ServeArgs;

/// The first bytes of every HTTP/2 connection (RFC 9113 §3.4).
const H2_MAGIC: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// A client's first SETTINGS frame larger than this is not a real client.
const MAX_SETTINGS_PAYLOAD: usize = 16_384;
const FRAME_SETTINGS: u8 = 0x4;
/// The largest first HTTP/1.1 request head (request line and headers) a listener waits for.
const MAX_HTTP1_HEAD: usize = 64 * 1024;
/// Longer would let idle sockets pile up again.
const MAX_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connection and stream limits of one gRPC listener.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub handshake_timeout: Duration,
    pub max_concurrent_streams: u32,
    pub keepalive_interval: Duration,
    pub keepalive_timeout: Duration,
}

impl Limits {
    pub fn from_args(args: &ServeArgs) -> anyhow::Result<Limits> {
        if args.max_connections == 0 {
            bail!("--max-connections must be at least 1");
        }
        if args.handshake_timeout.is_zero() || args.handshake_timeout > MAX_HANDSHAKE_TIMEOUT {
            bail!("--handshake-timeout must be longer than 0s and at most 10s");
        }
        if args.max_concurrent_streams == 0 {
            bail!("--max-concurrent-streams must be at least 1");
        }
        if args.admin_request_timeout.is_zero() {
            bail!("--admin-request-timeout must be longer than 0s");
        }
        if args.http2_keepalive_interval.is_zero() || args.http2_keepalive_timeout.is_zero() {
            bail!("--http2-keepalive-interval and --http2-keepalive-timeout must be longer than 0s");
        }
        Ok(Limits {
            max_connections: args.max_connections,
            handshake_timeout: args.handshake_timeout,
            max_concurrent_streams: args.max_concurrent_streams,
            keepalive_interval: args.http2_keepalive_interval,
            keepalive_timeout: args.http2_keepalive_timeout,
        })
    }

    /// A tonic server with this listener's HTTP/2 limits.
    pub fn server(&self) -> tonic::transport::Server {
        tonic::transport::Server::builder()
            .max_concurrent_streams(self.max_concurrent_streams)
            .http2_keepalive_interval(Some(self.keepalive_interval))
            .http2_keepalive_timeout(Some(self.keepalive_timeout))
    }
}

/// TLS for the authz and admin listeners, from their flags.
pub fn tls_from_args(args: &ServeArgs) -> anyhow::Result<(Option<TlsAcceptor>, Option<TlsAcceptor>)> {
    let authz = match (&args.authz_tls_cert, &args.authz_tls_key) {
        (Some(cert), Some(key)) => Some(server_tls(
            "authz",
            cert,
            key,
            args.authz_tls_client_ca.as_deref().map(|ca| ("--authz-tls-client-ca", ca)),
            Protocols::Http2,
        )?),
        _ => None,
    };
    let admin = match (&args.admin_tls_cert, &args.admin_tls_key) {
        (Some(cert), Some(key)) => Some(server_tls("admin", cert, key, None, Protocols::Http2AndHttp1)?),
        _ => None,
    };
    Ok((authz, admin))
}

/// What a listener speaks: gRPC clients use HTTP/2; browsers (gRPC-Web, the console) may
/// use HTTP/1.1 too.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocols {
    Http2,
    Http2AndHttp1,
}

/// TLS for a listener from PEM files; with `client_ca`, only clients holding a certificate
/// that CA signed get through the handshake. ALPN offers what the listener speaks.
pub fn server_tls(
    flag: &str,
    cert: &Path,
    key: &Path,
    client_ca: Option<(&str, &Path)>,
    protocols: Protocols,
) -> anyhow::Result<TlsAcceptor> {
    let chain = crate::pem::read_certs(&format!("--{flag}-tls-cert"), cert)?;
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| anyhow::anyhow!("--{flag}-tls-key: cannot read a PEM private key from {}: {e}", key.display()))?;
    let builder = rustls::ServerConfig::builder();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some((ca_flag, ca)) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in crate::pem::read_certs(ca_flag, ca)? {
                roots.add(c).with_context(|| format!("{ca_flag}: {} holds an unusable certificate", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder(Arc::new(roots))
                .build()
                .with_context(|| format!("{ca_flag}: {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(chain, key)
        .with_context(|| format!("--{flag}-tls-cert and --{flag}-tls-key do not make a usable certificate"))?;
    config.alpn_protocols = match protocols {
        Protocols::Http2 => vec![b"h2".to_vec()],
        Protocols::Http2AndHttp1 => vec![b"h2".to_vec(), b"http/1.1".to_vec()],
    };
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Raises this process's soft limit on open files to its hard limit (a server holds a
/// descriptor per connection; the usual soft default of 1024 is low), and warns when even
/// that is below what the listeners may hold.
pub fn raise_open_files_limit(limits: &Limits) {
    let Some(open_files) = raise_nofile_to_hard() else { return };
    let needed = (limits.max_connections as u64).saturating_mul(2).saturating_add(128);
    if open_files < needed {
        tracing::warn!(
            open_files,
            max_connections = limits.max_connections,
            "the open files limit is below what the listeners may hold; lower --max-connections or raise the limit"
        );
    }
}

/// The soft limit on open files after raising it to the hard limit, when known.
fn raise_nofile_to_hard() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(cur), max) = (lim.current, lim.maximum) else { return None };
    // An unlimited hard limit cannot be a soft one for open files: keep the soft one then.
    let Some(max) = max.filter(|&max| max > cur) else { return Some(cur) };
    match setrlimit(Resource::Nofile, Rlimit { current: Some(max), maximum: Some(max) }) {
        Ok(()) => Some(max),
        Err(_) => Some(cur),
    }
}

/// Something connections come from; a trait so the retry loop can be tested with failures.
pub trait Acceptor {
    type Conn;
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send;
}

impl Acceptor for TcpListener {
    type Conn = (TcpStream, SocketAddr);
    fn accept(&mut self) -> impl Future<Output = io::Result<Self::Conn>> + Send {
        TcpListener::accept(self)
    }
}

/// The next accepted connection. An accept error (out of file descriptors, a connection
/// reset before it was accepted) never stops a listener: it is logged, and accepting
/// resumes after a short pause that grows while the errors go on (up to 1 s).
pub async fn accept_next<A: Acceptor>(acceptor: &mut A, listener: &'static str) -> A::Conn {
    let mut pause = Duration::from_millis(5);
    loop {
        match acceptor.accept().await {
            Ok(conn) => return conn,
            Err(e) => {
                tracing::warn!(listener, error = %e, retry_in = ?pause, "accepting a connection failed");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(1));
            }
        }
    }
}

/// Where a listener's connections go through before tonic sees them.
#[derive(Clone)]
pub struct FrontDoor {
    name: &'static str,
    protocols: Protocols,
    tls: Option<TlsAcceptor>,
    permits: Arc<Semaphore>,
    handshake_timeout: Duration,
}

impl FrontDoor {
    pub fn new(name: &'static str, limits: &Limits, tls: Option<TlsAcceptor>, protocols: Protocols) -> FrontDoor {
        FrontDoor {
            name,
            protocols,
            tls,
            permits: Arc::new(Semaphore::new(limits.max_connections)),
            handshake_timeout: limits.handshake_timeout,
        }
    }

    /// Connections from `listener` that completed their handshake in time, for
    /// `serve_with_incoming_shutdown`. Accepting runs on the current runtime and stops when
    /// tonic drops the stream. Clones share the connection cap (several runtimes, one listener).
    pub fn incoming(&self, listener: TcpListener) -> UnboundedReceiverStream<io::Result<Conn>> {
        // Unbounded in type only: every connection in it holds one of `max_connections` permits.
        let (tx, rx) = mpsc::unbounded_channel();
        let door = self.clone();
        tokio::spawn(async move {
            let mut listener = listener;
            loop {
                let permit = tokio::select! {
                    _ = tx.closed() => return,
                    permit = Arc::clone(&door.permits).acquire_owned() => match permit {
                        Ok(p) => p,
                        Err(_) => return,
                    },
                };
                let (stream, peer) = tokio::select! {
                    _ = tx.closed() => return,
                    conn = accept_next(&mut listener, door.name) => conn,
                };
                let (tx, door) = (tx.clone(), door.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(door.handshake_timeout, door.handshake(stream, peer, permit)).await {
                        Ok(Ok(conn)) => {
                            let _ = tx.send(Ok(conn));
                        }
                        Ok(Err(e)) => tracing::debug!(listener = door.name, %peer, error = %e, "handshake failed"),
                        Err(_) => tracing::debug!(
                            listener = door.name,
                            %peer,
                            "closed a connection that did not complete its handshake in time"
                        ),
                    }
                });
            }
        });
        UnboundedReceiverStream::new(rx)
    }

    async fn handshake(&self, stream: TcpStream, peer: SocketAddr, permit: OwnedSemaphorePermit) -> io::Result<Conn> {
        stream.set_nodelay(true)?;
        let info = TcpConnectInfo { local_addr: stream.local_addr().ok(), remote_addr: Some(peer) };
        let io = match &self.tls {
            None => Io::Plain(stream),
            Some(tls) => Io::Tls(Box::new(tls.accept(stream).await?)),
        };
        let mut conn = Conn { io, replay: Vec::new(), replayed: 0, info, _permit: permit };
        conn.replay = read_preface(&mut conn.io, self.protocols).await?;
        Ok(conn)
    }
}

/// Reads the client's first bytes until they make a whole HTTP/2 connection preface (the
/// magic string, then a SETTINGS frame) or, where HTTP/1.1 is spoken, a whole request head;
/// returns every byte read, for tonic to read again.
async fn read_preface(io: &mut Io, protocols: Protocols) -> io::Result<Vec<u8>> {
    let mut read = Vec::with_capacity(256);
    loop {
        match preface_state(&read, protocols) {
            Preface::Complete => return Ok(read),
            Preface::Invalid(what) => {
                return Err(io::Error::new(io::ErrorKind::InvalidData, format!("not an HTTP client: {what}")));
            }
            Preface::Incomplete => {
                read.reserve(1024);
                if io.read_buf(&mut read).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Preface {
    Complete,
    Incomplete,
    Invalid(&'static str),
}

/// Whether `read` holds a whole preface (or HTTP/1.1 request head), may still become one,
/// or cannot.
fn preface_state(read: &[u8], protocols: Protocols) -> Preface {
    let seen = read.len().min(H2_MAGIC.len());
    if read[..seen] == H2_MAGIC[..seen] {
        let Some(frame) = read.get(H2_MAGIC.len()..H2_MAGIC.len() + 9) else { return Preface::Incomplete };
        let len = usize::from(frame[0]) << 16 | usize::from(frame[1]) << 8 | usize::from(frame[2]);
        if frame[3] != FRAME_SETTINGS || len > MAX_SETTINGS_PAYLOAD {
            return Preface::Invalid("the HTTP/2 preface is not followed by SETTINGS");
        }
        return if read.len() >= H2_MAGIC.len() + 9 + len { Preface::Complete } else { Preface::Incomplete };
    }
    match protocols {
        Protocols::Http2 => Preface::Invalid("no HTTP/2 connection preface"),
        // The head ends with an empty line; hyper parses it (and refuses what is not HTTP).
        Protocols::Http2AndHttp1 if memchr::memmem::find(read, b"\r\n\r\n").is_some() => Preface::Complete,
        Protocols::Http2AndHttp1 if read.len() > MAX_HTTP1_HEAD => Preface::Invalid("request head too large"),
        Protocols::Http2AndHttp1 => Preface::Incomplete,
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

/// A connection handed to tonic: it first replays the preface the front door read, then
/// reads from the socket. Closing it frees its place under `--max-connections`.
pub struct Conn {
    io: Io,
    replay: Vec<u8>,
    replayed: usize,
    info: TcpConnectInfo,
    _permit: OwnedSemaphorePermit,
}

impl Connected for Conn {
    type ConnectInfo = TcpConnectInfo;
    fn connect_info(&self) -> TcpConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.replayed < this.replay.len() {
            let rest = &this.replay[this.replayed..];
            let n = rest.len().min(buf.remaining());
            buf.put_slice(&rest[..n]);
            this.replayed += n;
            if this.replayed == this.replay.len() {
                this.replay = Vec::new();
                this.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    /// Not vectored, so h2 copies any frame under 1 KiB into its write buffer (with
    /// vectored writes it keeps a DATA frame of 256 bytes or more aside and must write it
    /// out before it can take the next frame). A Check's answer with limits is about 290
    /// bytes: with vectored writes every answer cost a `writev` of its own, here the
    /// answers to all the Checks a read brought in leave in one write.
    fn is_write_vectored(&self) -> bool {
        false
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Fails `failures` times (as accept does when the process is out of descriptors), then
    /// yields a connection.
    struct Flaky {
        failures: usize,
        calls: usize,
    }

    impl Acceptor for Flaky {
        type Conn = usize;
        fn accept(&mut self) -> impl Future<Output = io::Result<usize>> + Send {
            self.calls += 1;
            let result = if self.calls <= self.failures {
                Err(io::Error::from_raw_os_error(24)) // EMFILE
            } else {
                Ok(self.calls)
            };
            std::future::ready(result)
        }
    }

    #[test]
    fn a_connection_reaches_tonic_after_a_whole_preface_or_http1_head() {
        use Protocols::*;
        let mut h2 = H2_MAGIC.to_vec();
        assert_eq!(preface_state(&h2[..10], Http2), Preface::Incomplete);
        assert_eq!(preface_state(&h2, Http2AndHttp1), Preface::Incomplete);
        h2.extend_from_slice(&[0, 0, 6, FRAME_SETTINGS, 0, 0, 0, 0, 0]);
        assert_eq!(preface_state(&h2, Http2), Preface::Incomplete, "SETTINGS payload still to come");
        h2.extend_from_slice(&[0, 3, 0, 0, 0, 100]);
        assert_eq!(preface_state(&h2, Http2), Preface::Complete);
        let mut bad = H2_MAGIC.to_vec();
        bad.extend_from_slice(&[0, 0, 0, 0x1, 0, 0, 0, 0, 0]);
        assert!(matches!(preface_state(&bad, Http2AndHttp1), Preface::Invalid(_)));

        let get = b"GET / HTTP/1.1\r\nhost: x\r\n\r\n";
        assert!(matches!(preface_state(get, Http2), Preface::Invalid(_)), "HTTP/1.1 only where spoken");
        assert_eq!(preface_state(&get[..20], Http2AndHttp1), Preface::Incomplete);
        assert_eq!(preface_state(get, Http2AndHttp1), Preface::Complete);
        let huge = vec![b'a'; MAX_HTTP1_HEAD + 1];
        assert!(matches!(preface_state(&huge, Http2AndHttp1), Preface::Invalid(_)));
    }

    #[tokio::test]
    async fn accept_errors_never_end_the_accept_loop() {
        let mut flaky = Flaky { failures: 3, calls: 0 };
        assert_eq!(accept_next(&mut flaky, "test").await, 4);
        // And it keeps serving after a success.
        assert_eq!(accept_next(&mut flaky, "test").await, 5);
    }

    #[test]
    fn the_open_files_limit_is_raised_to_the_hard_limit() {
        let Some(now) = raise_nofile_to_hard() else { return };
        // What the kernel says, not what we think we did.
        let limits = std::fs::read_to_string("/proc/self/limits").unwrap();
        let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
        let values: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
        assert_eq!(values[0], values[1], "soft limit raised to the hard limit: {line}");
        assert_eq!(values[0], now.to_string());
    }
}
