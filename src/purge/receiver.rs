//! The HTCP CLR receiver: a UDP socket (optionally in multicast groups) whose datagrams are
//! checked (source, layout, host) and applied to the store. Runs as a pingora background
//! service. Every datagram is counted by result; none can purge unless it passes every check.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::net::UdpSocket;

use super::htcp;
use super::queue::PurgeQueue;
use super::{Acl, PurgeResult, Purger, Source};
use crate::cache::key::{CacheUrl, HostAliases};
use crate::config::HtcpConfig;
use crate::metrics::Metrics;

impl HtcpConfig {
    /// Where multicast groups are joined: the configured interface, else the listen address
    /// when it names one (a unicast IPv4 address), else the kernel's choice (`0.0.0.0`).
    fn join_interface(&self) -> Ipv4Addr {
        match (self.multicast_interface, self.listen.ip()) {
            (Some(interface), _) => interface,
            (None, IpAddr::V4(v4)) if !v4.is_multicast() => v4,
            _ => Ipv4Addr::UNSPECIFIED,
        }
    }
}

/// The receiver and the narrow handles it works through: the purge dispatch, the metrics and
/// the current host aliases (a reload may change them).
pub struct HtcpReceiver {
    config: HtcpConfig,
    acl: Acl,
    purger: Purger,
    aliases: Arc<ArcSwap<HostAliases>>,
    metrics: Arc<Metrics>,
}

/// Asked for, as vhtcpd does: a purge storm must not overflow the socket. Halved down to
/// 64 KiB until the kernel accepts it.
const RECEIVE_BUFFER: usize = 16 << 20;

impl HtcpReceiver {
    pub fn new(
        config: HtcpConfig,
        purger: Purger,
        aliases: Arc<ArcSwap<HostAliases>>,
        metrics: Arc<Metrics>,
    ) -> HtcpReceiver {
        HtcpReceiver {
            acl: Acl::new(config.allow.clone()),
            config,
            purger,
            aliases,
            metrics,
        }
    }

    fn bind(&self) -> std::io::Result<UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let addr = self.config.listen;
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        // Only a group address is shared: on a unicast address, SO_REUSEADDR would let a second
        // process bind the same port and take every CLR meant for this one.
        if addr.ip().is_multicast() {
            socket.set_reuse_address(true)?;
        }
        let mut size = RECEIVE_BUFFER;
        while size >= 64 << 10 {
            if socket.set_recv_buffer_size(size).is_ok() {
                break;
            }
            size /= 2;
        }
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let interface = self.config.join_interface();
        for group in &self.config.multicast_groups {
            socket.join_multicast_v4(group, &interface)?;
        }
        UdpSocket::from_std(socket.into())
    }

    fn count(&self, result: PurgeResult) {
        super::count(&self.metrics, Source::Htcp, result);
    }

    /// Checks and applies one datagram from `from`.
    pub async fn handle(&self, packet: &[u8], from: SocketAddr, queue: &PurgeQueue) {
        if !self.acl.allows(from.ip()) {
            self.count(PurgeResult::Denied);
            return;
        }
        let clr = match htcp::parse(packet) {
            Ok(clr) => clr,
            Err(e) => {
                tracing::debug!(%from, reason = e.as_str(), "rejected an HTCP packet");
                self.count(PurgeResult::Invalid);
                return;
            }
        };
        let Ok(url) = CacheUrl::parse_absolute(&clr.uri).map(|u| self.aliases.load().canonical(u))
        else {
            self.count(PurgeResult::Invalid);
            return;
        };
        if let Some(re) = &self.config.host_regex {
            if !re.is_match(&url.host) {
                self.count(PurgeResult::Denied);
                return;
            }
        }
        // The method is ignored: MediaWiki says HEAD, Squid says PURGE, and both mean every
        // stored variant of the URL (GET and HEAD share one entry).
        queue.push(url).await;
    }
}

#[async_trait]
impl BackgroundService for HtcpReceiver {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        // At start-up a taken address stops Skua (`server::check_addresses_free`); here it can
        // only be a zero-downtime upgrade, whose old process frees the address when it exits.
        let mut logged = false;
        let socket = loop {
            match self.bind() {
                Ok(s) => break s,
                Err(e) => {
                    if !logged {
                        tracing::error!(error = %e, listen = %self.config.listen, "cannot listen for HTCP; retrying (/readyz answers 503 until it can)");
                        logged = true;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(std::time::Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        self.metrics.htcp_listening.set(1);
        let queue = PurgeQueue::start(self.purger.clone(), self.metrics.clone(), Source::Htcp);
        // Room for the largest packet we accept plus one byte, to tell "too long" apart.
        let mut buf = vec![0u8; htcp::MAX_PACKET + 1];
        loop {
            tokio::select! {
                received = socket.recv_from(&mut buf) => match received {
                    Ok((n, from)) => self.handle(&buf[..n], from, &queue).await,
                    Err(e) => tracing::warn!(error = %e, "HTCP receive failed"),
                },
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Sends one CLR per URL to `to`, as MediaWiki does (`skua purge --htcp`).
pub async fn send(to: SocketAddr, urls: &[String], dialect: htcp::Dialect) -> std::io::Result<()> {
    let bind: SocketAddr = if to.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind).await?;
    for (i, url) in urls.iter().enumerate() {
        let packet = htcp::build(url, i as u32 + 1, dialect);
        socket.send_to(&packet, to).await?;
    }
    Ok(())
}
