//! TLS termination on the HTTPS listeners (`[server.tls]`): the handshake, within a deadline,
//! with the certificate the client's name (SNI) selects; TLS 1.2 and 1.3 only, with rustls's
//! suites (all AEAD with forward secrecy); sessions resumed by tickets whose keys rotate every
//! 6 hours and are shared by every worker thread; HTTP/2 or HTTP/1.1 by ALPN. After the
//! handshake a connection is a pingora `Stream` like any other, so the front door and pingora's
//! HTTP/1.1 and HTTP/2 sessions serve it with the code they serve plain HTTP with; that the
//! request came over TLS (an https resource) they learn from the stream's TLS digest.
//!
//! It owns the certificates in use (swapped whole on reload; open connections keep theirs) and
//! the handshake; it does not read HTTP. Certificates are read and checked by
//! `config::certificate`.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use pingora::time::fast_timeout::fast_timeout;
use rustls::server::{ClientHello, ProducesTickets, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{HandshakeKind, ProtocolVersion, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::config::certificate::Certificate;
use crate::config::TlsConfig;
use crate::metrics::{HandshakeResult, TlsMetrics, TlsVersion};

/// ALPN protocol names (RFC 7301 §6, the IANA registry).
const ALPN_H2: &[u8] = b"h2";
const ALPN_HTTP11: &[u8] = b"http/1.1";

/// What one terminator serves with now; replaced whole on reload.
struct Current {
    acceptor: tokio_rustls::TlsAcceptor,
    handshake_timeout: Duration,
}

/// A reload's certificates and settings, built and not yet in use.
pub struct Prepared(Current);

pub struct TlsTerminator {
    current: ArcSwap<Current>,
    /// Kept across reloads, so a client resumes its session after one.
    ticketer: Arc<dyn ProducesTickets>,
    metrics: Arc<TlsMetrics>,
}

impl TlsTerminator {
    pub fn new(config: &TlsConfig, metrics: Arc<TlsMetrics>) -> anyhow::Result<TlsTerminator> {
        let ticketer = rustls::crypto::ring::Ticketer::new()
            .map_err(|e| anyhow::anyhow!("TLS session tickets: {e}"))?;
        let current = build(config, &ticketer)?;
        Ok(TlsTerminator {
            current: ArcSwap::from_pointee(current),
            ticketer,
            metrics,
        })
    }

    /// What serves with `config`'s certificates and settings, ready for [`TlsTerminator::apply`]
    /// (a reload builds everything before it swaps anything in).
    pub fn prepare(&self, config: &TlsConfig) -> anyhow::Result<Prepared> {
        Ok(Prepared(build(config, &self.ticketer)?))
    }

    /// New handshakes use `prepared`; open connections keep what they had.
    pub fn apply(&self, prepared: Prepared) {
        self.current.store(Arc::new(prepared.0));
    }

    /// The TLS connection over `stream`, or `None` when the handshake failed or took longer
    /// than the deadline (counted either way).
    pub async fn accept(&self, stream: Stream) -> Option<Stream> {
        let current = self.current.load_full();
        // The socket of a failed or late handshake is closed only after it is counted (the
        // fallible form hands it back; a late one is held here, not in the timeout): a client
        // that sees the close and then reads the metrics finds it counted.
        let mut handshake = std::pin::pin!(current.acceptor.accept(stream).into_fallible());
        let tls = match fast_timeout(current.handshake_timeout, handshake.as_mut()).await {
            Ok(Ok(tls)) => tls,
            Ok(Err((e, _socket))) => {
                self.metrics.handshake(match e.kind() {
                    std::io::ErrorKind::UnexpectedEof => HandshakeResult::Closed,
                    _ => HandshakeResult::Failed,
                });
                return None;
            }
            Err(_) => {
                self.metrics.handshake(HandshakeResult::Timeout);
                return None;
            }
        };
        let (_, session) = tls.get_ref();
        let resumed = session.handshake_kind() == Some(HandshakeKind::Resumed);
        self.metrics.handshake(if resumed {
            HandshakeResult::Resumed
        } else {
            HandshakeResult::Full
        });
        let version = match session.protocol_version() {
            Some(ProtocolVersion::TLSv1_3) => TlsVersion::Tls13,
            _ => TlsVersion::Tls12,
        };
        let alpn = match session.alpn_protocol() {
            Some(ALPN_H2) => Some(ALPN::H2),
            Some(ALPN_HTTP11) => Some(ALPN::H1),
            _ => None,
        };
        self.metrics.established(version, alpn == Some(ALPN::H2));
        let cipher = session
            .negotiated_cipher_suite()
            .and_then(|s| s.suite().as_str())
            .unwrap_or("");
        let digest = SslDigest::new(cipher, version.as_str(), None, None, vec![]);
        Some(Box::new(TlsConnection {
            inner: tls,
            digest: Arc::new(digest),
            alpn,
        }))
    }
}

fn build(config: &TlsConfig, ticketer: &Arc<dyn ProducesTickets>) -> anyhow::Result<Current> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut server = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow::anyhow!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(Certificates::new(&config.certificates)?));
    server.ticketer = ticketer.clone();
    server.alpn_protocols = if config.http2 {
        vec![ALPN_H2.to_vec(), ALPN_HTTP11.to_vec()]
    } else {
        vec![ALPN_HTTP11.to_vec()]
    };
    Ok(Current {
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
        handshake_timeout: config.handshake_timeout,
    })
}

/// The certificates by the names they are chosen for: exact names, then wildcards by the
/// name's parent domain, then the default.
#[derive(Debug)]
struct Certificates {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// `*.wiki.example` kept as `wiki.example`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    default: Arc<CertifiedKey>,
}

impl Certificates {
    fn new(loaded: &[Certificate]) -> anyhow::Result<Certificates> {
        let default = loaded
            .iter()
            .find(|c| c.default)
            .or(loaded.first())
            .ok_or_else(|| anyhow::anyhow!("[server.tls] has no certificate"))?
            .key
            .clone();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        // The first certificate that names a name is chosen for it.
        for cert in loaded {
            for name in &cert.names {
                let table = match name.strip_prefix("*.") {
                    Some(parent) => wildcard.entry(parent.to_string()),
                    None => exact.entry(name.clone()),
                };
                table.or_insert_with(|| cert.key.clone());
            }
        }
        Ok(Certificates {
            exact,
            wildcard,
            default,
        })
    }

    fn for_name(&self, name: &str) -> &Arc<CertifiedKey> {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if let Some(key) = self.exact.get(&name) {
            return key;
        }
        // A wildcard stands for exactly one leftmost label (RFC 6125 §6.4.3).
        match name.split_once('.') {
            Some((label, parent)) if !label.is_empty() => {
                self.wildcard.get(parent).unwrap_or(&self.default)
            }
            _ => &self.default,
        }
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(match hello.server_name() {
            Some(name) => self.for_name(name).clone(),
            None => self.default.clone(),
        })
    }
}

/// A TLS connection as pingora's sessions take it.
#[derive(Debug)]
struct TlsConnection {
    inner: tokio_rustls::server::TlsStream<Stream>,
    digest: Arc<SslDigest>,
    alpn: Option<ALPN>,
}

impl TlsConnection {
    fn tcp(&self) -> &Stream {
        self.inner.get_ref().0
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for TlsConnection {
    async fn shutdown(&mut self) {
        // close_notify, then the TCP shutdown (RFC 8446 §6.1).
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut self.inner).await;
    }
}

impl UniqueID for TlsConnection {
    fn id(&self) -> UniqueIDType {
        self.tcp().id()
    }
}

impl Ssl for TlsConnection {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }

    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.alpn.clone()
    }
}

impl GetTimingDigest for TlsConnection {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.tcp().get_timing_digest()
    }
}

impl GetProxyDigest for TlsConnection {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.tcp().get_proxy_digest()
    }
}

impl GetSocketDigest for TlsConnection {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.tcp().get_socket_digest()
    }
}

#[async_trait]
impl Peek for TlsConnection {}
