//! Accepting and serving connections for every port kubetoken serves: plain TCP or TLS, TCP_NODELAY, TLS
//! handshakes off the accept loop (a client that never finishes its handshake holds only its own task, for at most
//! [`HANDSHAKE_TIMEOUT`]), the peer address for the handlers that need it, and the limits that keep slow clients
//! from holding the server ([`ConnectionLimits`]: a connection cap, a header deadline, an idle timeout).

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::ConnectInfo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Limits on what one client can hold.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; past it, new ones wait in the kernel's accept queue.
    pub max_connections: usize,
    /// A request's headers must have arrived this long after its first byte.
    pub header_read_timeout: Duration,
    /// A connection with no bytes read or written for this long is closed (idle keep-alive, or a stalled client).
    pub idle_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
        }
    }
}

/// One accepted connection.
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// An accepted connection, holding its slot under the connection limit, closed once idle for too long.
pub struct Connection {
    stream: Stream,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Connection {
    fn new(stream: Stream, idle_timeout: Duration, slot: OwnedSemaphorePermit) -> Self {
        Self { stream, idle_timeout, idle: Box::pin(tokio::time::sleep(idle_timeout)), _slot: slot }
    }

    fn active(&mut self) {
        self.idle.as_mut().reset(tokio::time::Instant::now() + self.idle_timeout);
    }

    /// Pending I/O past the idle deadline fails the connection.
    fn check_idle<T>(&mut self, cx: &mut Context<'_>, poll: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        match poll {
            Poll::Pending => match self.idle.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "idle connection"))),
                Poll::Pending => Poll::Pending,
            },
            Poll::Ready(Ok(v)) => {
                self.active();
                Poll::Ready(Ok(v))
            }
            ready => ready,
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_read(cx, buf);
        this.check_idle(cx, poll)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write(cx, buf);
        this.check_idle(cx, poll)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_flush(cx);
        this.check_idle(cx, poll)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        let poll = Pin::new(&mut this.stream).poll_write_vectored(cx, bufs);
        this.check_idle(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The address a request came from (the TCP peer, not what any header claims).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A bound port: plain TCP, or TLS when given a configuration.
pub struct ServeListener {
    local: SocketAddr,
    tls: Option<TlsAcceptor>,
    tcp: TcpListener,
}

impl ServeListener {
    pub async fn bind(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Self, String> {
        let tcp = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = tcp.local_addr().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        Ok(Self { local, tls: tls.map(TlsAcceptor::from), tcp })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.local)
    }
}

/// Accepts while a connection slot is free; TLS handshakes run on their own tasks. Ends when `tx` is closed.
async fn accept_loop(
    listener: ServeListener,
    slots: Arc<Semaphore>,
    limits: ConnectionLimits,
    tx: mpsc::Sender<(Connection, SocketAddr)>,
) {
    loop {
        // At the limit, stop accepting: new clients wait in the kernel's accept queue, not in memory here.
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => return,
            },
            () = tx.closed() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.tcp.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning (as axum's own listener does).
                    tracing::error!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            () = tx.closed() => return,
        };
        // Token responses are small: without TCP_NODELAY, Nagle plus delayed ACKs add 40 ms to keep-alive requests.
        let _ = stream.set_nodelay(true);
        match &listener.tls {
            None => {
                if tx.send((Connection::new(Stream::Plain(stream), limits.idle_timeout, slot), peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let conn = Connection::new(Stream::Tls(Box::new(tls)), limits.idle_timeout, slot);
                            let _ = tx.send((conn, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Serves `router` on `listener` until `shutdown` completes; then stops accepting, lets open requests finish
/// and closes idle connections.
pub async fn serve(
    listener: ServeListener,
    router: axum::Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let max = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max));
    let (tx, mut accepted) = mpsc::channel(64);
    let acceptor = tokio::spawn(accept_loop(listener, slots.clone(), limits, tx));
    let (closing_tx, closing) = watch::channel(false);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (conn, peer) = tokio::select! {
            () = &mut shutdown => break,
            next = accepted.recv() => match next {
                Some(next) => next,
                None => break,
            },
        };
        let router = router.clone();
        let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
            request.extensions_mut().insert(ConnectInfo(Peer(peer)));
            tower::ServiceExt::oneshot(router.clone(), request.map(axum::body::Body::new))
        });
        let mut closing = closing.clone();
        tokio::spawn(async move {
            let mut builder = hyper::server::conn::http1::Builder::new();
            builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout).keep_alive(true);
            let connection = builder.serve_connection(TokioIo::new(conn), service);
            let mut connection = std::pin::pin!(connection);
            tokio::select! {
                result = connection.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                () = async { drop(closing.wait_for(|c| *c).await) } => {
                    // Finish the request in flight, then close.
                    connection.as_mut().graceful_shutdown();
                    let _ = connection.await;
                }
            }
        });
    }
    acceptor.abort();
    // Connections accepted but not yet served, and handshakes still running, close and give their slots back.
    drop(accepted);
    let _ = closing_tx.send(true);
    // Every connection holds a slot until it ends: all slots back means every connection is done.
    let all = u32::try_from(max).unwrap_or(u32::MAX);
    let _ = slots.acquire_many(all).await;
    Ok(())
}

/// The TLS configuration for `files`, reloaded from them as they change; none without files.
pub fn tls_config(files: Option<&super::tls::TlsFiles>) -> Result<Option<Arc<rustls::ServerConfig>>, String> {
    let Some(files) = files else { return Ok(None) };
    let cert = super::tls::ReloadingCert::load(files.clone())?;
    cert.watch(super::tls::RELOAD_CHECK_INTERVAL);
    super::tls::server_config(cert).map(Some)
}

/// Where and how the token endpoint (standalone or sidecar) is served.
#[derive(Debug, Clone)]
pub struct Endpoint {
    pub listen: SocketAddr,
    pub tls: Option<super::tls::TlsFiles>,
    pub plaintext: super::exposure::Plaintext,
    /// `--issuer`; by default the scheme served and the bound address.
    pub issuer: Option<String>,
    pub limits: ConnectionLimits,
    /// How long a request body may take to arrive.
    pub body_read_timeout: Duration,
}

impl Endpoint {
    /// Plain HTTP on `listen`, which must be a loopback address (tests, benchmarks).
    pub fn loopback(listen: SocketAddr) -> Self {
        Self {
            listen,
            tls: None,
            plaintext: super::exposure::Plaintext::LoopbackOnly,
            issuer: None,
            limits: ConnectionLimits::default(),
            body_read_timeout: super::DEFAULT_BODY_READ_TIMEOUT,
        }
    }

    /// Checks the exposure rules, loads the certificate and binds.
    pub async fn bind(&self) -> Result<(ServeListener, super::exposure::IssuerPolicy), String> {
        super::exposure::check_listen(self.listen, self.tls.is_some(), &self.plaintext)?;
        let listener = ServeListener::bind(self.listen, tls_config(self.tls.as_ref())?).await?;
        let issuer = super::exposure::IssuerPolicy::new(
            self.issuer.clone(),
            listener.scheme(),
            listener.local_addr(),
            &self.plaintext,
        );
        Ok((listener, issuer))
    }
}
