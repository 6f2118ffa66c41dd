//! Accepting connections for every port kubetoken serves: plain TCP or TLS, TCP_NODELAY, TLS handshakes off the
//! accept loop (a client that never finishes its handshake holds only its own task, for at most
//! [`HANDSHAKE_TIMEOUT`]), and the peer address for the handlers that need it.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::connect_info::Connected;
use axum::serve::{IncomingStream, Listener};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// One accepted connection.
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Connection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_flush(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Connection::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Connection::Plain(s) => s.is_write_vectored(),
            Connection::Tls(s) => s.is_write_vectored(),
        }
    }
}

/// The address a request came from (the TCP peer, not what any header claims).
#[derive(Debug, Clone, Copy)]
pub struct Peer(pub SocketAddr);

/// A bound port: plain TCP, or TLS when given a configuration.
pub struct ServeListener {
    local: SocketAddr,
    tls: bool,
    accepted: mpsc::Receiver<(Connection, SocketAddr)>,
}

impl ServeListener {
    /// Binds `addr`. Must run inside the Tokio runtime: the accept loop is a task of its own.
    pub async fn bind(addr: SocketAddr, tls: Option<Arc<rustls::ServerConfig>>) -> Result<Self, String> {
        let tcp = TcpListener::bind(addr).await.map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let local = tcp.local_addr().map_err(|e| format!("cannot listen on {addr}: {e}"))?;
        let (tx, accepted) = mpsc::channel(64);
        let is_tls = tls.is_some();
        tokio::spawn(accept_loop(tcp, tls.map(TlsAcceptor::from), tx));
        Ok(Self { local, tls: is_tls, accepted })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    pub fn scheme(&self) -> &'static str {
        if self.tls { "https" } else { "http" }
    }

    /// `http://addr` or `https://addr`.
    pub fn url(&self) -> String {
        format!("{}://{}", self.scheme(), self.local)
    }
}

async fn accept_loop(tcp: TcpListener, tls: Option<TlsAcceptor>, tx: mpsc::Sender<(Connection, SocketAddr)>) {
    loop {
        let (stream, peer) = match tcp.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning (as axum's own listener does).
                tracing::error!(error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Token responses are small: without TCP_NODELAY, Nagle plus delayed ACKs add 40 ms to keep-alive requests.
        let _ = stream.set_nodelay(true);
        match &tls {
            None => {
                if tx.send((Connection::Plain(stream), peer)).await.is_err() {
                    return;
                }
            }
            Some(acceptor) => {
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((Connection::Tls(Box::new(tls)), peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        }
        if tx.is_closed() {
            return;
        }
    }
}

impl Listener for ServeListener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this receiver is gone, so this cannot happen while `self` lives.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        Ok(self.local)
    }
}

impl Connected<IncomingStream<'_, ServeListener>> for Peer {
    fn connect_info(stream: IncomingStream<'_, ServeListener>) -> Self {
        Peer(*stream.remote_addr())
    }
}

/// Serves `router` on `listener` until `shutdown` completes; open requests finish first.
pub async fn serve(
    listener: ServeListener,
    router: axum::Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), String> {
    axum::serve(listener, router.into_make_service_with_connect_info::<Peer>())
        .with_graceful_shutdown(shutdown)
        .await
        .map_err(|e| format!("server error: {e}"))
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
}

impl Endpoint {
    /// Plain HTTP on `listen`, which must be a loopback address (tests, benchmarks).
    pub fn loopback(listen: SocketAddr) -> Self {
        Self { listen, tls: None, plaintext: super::exposure::Plaintext::LoopbackOnly, issuer: None }
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
