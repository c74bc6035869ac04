//! The HTCP CLR receiver: a UDP socket (optionally in multicast groups) whose datagrams are
//! checked (source, layout, host) on a reader thread of its own and queued for the store.
//! Runs as a pingora background service. Every datagram is counted by result, and so are
//! those the kernel dropped; none can purge unless it passes every check.

use std::cell::Cell;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use tokio::net::UdpSocket;

use super::htcp;
use super::queue::PurgeQueue;
use super::{Acl, PurgeResult, Purger, Source};
use crate::cache::key::CacheUrl;
use crate::config::HtcpConfig;
use crate::metrics::Metrics;
use crate::rules::canonical::Canonical;

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
/// the canonical key function (host aliases and query normalisation, which a reload may
/// change).
#[derive(Clone)]
pub struct HtcpReceiver {
    config: HtcpConfig,
    acl: Acl,
    purger: Purger,
    canonical: Arc<ArcSwap<Canonical>>,
    metrics: Arc<Metrics>,
}

/// Asked for, as vhtcpd does: a purge storm must not overflow the socket. Halved down to
/// 64 KiB until the kernel accepts it; the kernel may still cap it at `net.core.rmem_max`.
const RECEIVE_BUFFER: usize = 16 << 20;

/// How long the reader waits for a datagram before it looks at the shutdown flag and the
/// kernel's drop count.
const READER_TICK: Duration = Duration::from_millis(250);

/// How often the kernel's drop count is read into `skua_htcp_dropped_total`.
const DROPS_READ_EVERY: Duration = Duration::from_secs(1);

impl HtcpReceiver {
    pub fn new(
        config: HtcpConfig,
        purger: Purger,
        canonical: Arc<ArcSwap<Canonical>>,
        metrics: Arc<Metrics>,
    ) -> HtcpReceiver {
        HtcpReceiver {
            acl: Acl::new(config.allow.clone()),
            config,
            purger,
            canonical,
            metrics,
        }
    }

    fn bind(&self) -> std::io::Result<std::net::UdpSocket> {
        use socket2::{Domain, Protocol, Socket, Type};
        let addr = self.config.listen;
        let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
        // Only a group address is shared: on a unicast address, SO_REUSEADDR would let a second
        // process bind the same port and take every CLR meant for this one.
        if addr.ip().is_multicast() {
            socket.set_reuse_address(true)?;
        }
        // SO_REUSEPORT shares the port only with sockets of the same user that set it too: the
        // new process of a zero-downtime upgrade binds beside the old one at once, where it
        // waited for the old one to let go (CLRs sent meanwhile reached no socket), and the
        // old one relays what it reads (`purge::handover`). Another Skua is still refused:
        // `server::check_addresses_free` binds without it.
        socket.set_reuse_port(true)?;
        let mut size = RECEIVE_BUFFER;
        while size >= 64 << 10 {
            if socket.set_recv_buffer_size(size).is_ok() {
                break;
            }
            size /= 2;
        }
        // Linux reports twice what it grants (the doubling covers its bookkeeping).
        if let Ok(granted) = socket.recv_buffer_size() {
            if granted < RECEIVE_BUFFER {
                tracing::warn!(
                    asked = RECEIVE_BUFFER,
                    granted,
                    "the kernel capped the HTCP receive buffer; a purge storm may overflow it \
                     (raise net.core.rmem_max; skua_htcp_dropped_total counts what is lost)"
                );
            }
        }
        socket.set_read_timeout(Some(READER_TICK))?;
        socket.bind(&addr.into())?;
        let interface = self.config.join_interface();
        for group in &self.config.multicast_groups {
            socket.join_multicast_v4(group, &interface)?;
        }
        Ok(socket.into())
    }

    fn count(&self, result: PurgeResult) {
        super::count(&self.metrics, Source::Htcp, result);
    }

    /// Checks one datagram from `from`: the URL it may purge, or `None` (counted) if it may not.
    fn check(&self, packet: &[u8], from: SocketAddr) -> Option<CacheUrl> {
        if !self.acl.allows(from.ip()) {
            self.count(PurgeResult::Denied);
            return None;
        }
        let clr = match htcp::parse(packet) {
            Ok(clr) => clr,
            Err(e) => {
                tracing::debug!(%from, reason = e.as_str(), "rejected an HTCP packet");
                self.count(PurgeResult::Invalid);
                return None;
            }
        };
        let Ok(url) =
            CacheUrl::parse_absolute(&clr.uri).map(|u| self.canonical.load().canonical(u))
        else {
            self.count(PurgeResult::Invalid);
            return None;
        };
        if let Some(re) = &self.config.host_regex {
            if !re.is_match(&url.host) {
                self.count(PurgeResult::Denied);
                return None;
            }
        }
        // The method is ignored: MediaWiki says HEAD, Squid says PURGE, and both mean every
        // stored variant of the URL (GET and HEAD share one entry).
        Some(url)
    }

    /// The reader: a thread of its own, so that a storm is drained from the socket as fast as
    /// datagrams can be parsed, whatever the store and the runtimes are doing. A datagram the
    /// kernel drops because the buffer is full is lost to UDP; the kernel counts it, and so
    /// does `skua_htcp_dropped_total`.
    fn read(&self, socket: std::net::UdpSocket, queue: PurgeQueue, stop: &AtomicBool) {
        let drops = KernelDrops::of(&socket);
        let mut drops_read = Instant::now();
        // Room for the largest packet we accept plus one byte, to tell "too long" apart.
        let mut buf = vec![0u8; htcp::MAX_PACKET + 1];
        while !stop.load(Ordering::Relaxed) {
            match socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    if let Some(url) = self.check(&buf[..n], from) {
                        queue.push(url);
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => tracing::warn!(error = %e, "HTCP receive failed"),
            }
            if drops_read.elapsed() >= DROPS_READ_EVERY {
                drops_read = Instant::now();
                if let Some(new) = drops.as_ref().and_then(KernelDrops::read_new) {
                    self.metrics.htcp_dropped.inc_by(new);
                }
            }
        }
        // Closing a socket drops what the kernel queued on it, and during a zero-downtime
        // upgrade the new process's socket shares the port (SO_REUSEPORT). A connected UDP
        // socket takes datagrams from its peer alone, so once this one is connected to an
        // address no sender uses (its own port on loopback) every CLR goes to the new socket;
        // what was queued here before is read, then the socket closes.
        if let Ok(local) = socket.local_addr() {
            let own = match local.ip() {
                IpAddr::V4(_) => SocketAddr::from((Ipv4Addr::LOCALHOST, local.port())),
                IpAddr::V6(_) => SocketAddr::from((Ipv6Addr::LOCALHOST, local.port())),
            };
            // Where it cannot connect (a socket bound to a group's address may refuse), the
            // queue is still read.
            let _ = socket.connect(own);
        }
        if socket.set_nonblocking(true).is_ok() {
            while let Ok((n, from)) = socket.recv_from(&mut buf) {
                if let Some(url) = self.check(&buf[..n], from) {
                    queue.push(url);
                }
            }
        }
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
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                        _ = shutdown.changed() => return,
                    }
                }
            }
        };
        let queue = PurgeQueue::start(self.purger.clone(), self.metrics.clone(), Source::Htcp);
        let stop = Arc::new(AtomicBool::new(false));
        let reader = std::thread::Builder::new().name("skua-htcp".into()).spawn({
            let (receiver, stop) = (self.clone(), stop.clone());
            move || receiver.read(socket, queue, &stop)
        });
        if let Err(e) = reader {
            tracing::error!(error = %e, "cannot start the HTCP reader thread");
            return;
        }
        self.metrics.htcp_listening.set(1);
        let _ = shutdown.changed().await;
        if !self.purger.store.invalidations.handed_over() {
            // Stopping with no process to take over: pingora's shutdown signal comes a grace
            // period before the runtimes end, and until then this node still answers on the
            // connections it holds, so it reads until the process ends. Regression: it
            // stopped here and served pages a CLR had purged meanwhile.
            std::future::pending::<()>().await;
        }
        stop.store(true, Ordering::Relaxed);
    }
}

/// The kernel's own count of datagrams dropped on one socket (the `drops` column of
/// `/proc/net/udp` and `/proc/net/udp6`, found by the socket's inode), read as increments.
struct KernelDrops {
    inode: String,
    seen: Cell<u64>,
}

impl KernelDrops {
    #[cfg(target_os = "linux")]
    fn of(socket: &std::net::UdpSocket) -> Option<KernelDrops> {
        use std::os::fd::AsRawFd;
        let link = std::fs::read_link(format!("/proc/self/fd/{}", socket.as_raw_fd())).ok()?;
        let inode = link
            .to_str()?
            .strip_prefix("socket:[")?
            .strip_suffix(']')?
            .to_owned();
        let drops = KernelDrops {
            inode,
            seen: Cell::new(0),
        };
        drops.read_new();
        Some(drops)
    }

    #[cfg(not(target_os = "linux"))]
    fn of(_: &std::net::UdpSocket) -> Option<KernelDrops> {
        None
    }

    /// Drops since the last read, if the socket is still listed.
    fn read_new(&self) -> Option<u64> {
        let total = ["/proc/net/udp", "/proc/net/udp6"]
            .iter()
            .find_map(|table| {
                let text = std::fs::read_to_string(table).ok()?;
                drops_of_inode(&text, &self.inode)
            })?;
        let new = total.saturating_sub(self.seen.replace(total));
        Some(new)
    }
}

/// The `drops` column of the row whose `inode` column is `inode`, in a `/proc/net/udp` table:
/// `sl local rem st tx:rx tr:when retrnsmt uid timeout inode ref pointer drops`.
fn drops_of_inode(table: &str, inode: &str) -> Option<u64> {
    table.lines().skip(1).find_map(|row| {
        let columns: Vec<&str> = row.split_whitespace().collect();
        match columns.as_slice() {
            [_, _, _, _, _, _, _, _, _, row_inode, _, _, drops, ..] if *row_inode == inode => {
                drops.parse().ok()
            }
            _ => None,
        }
    })
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

#[cfg(test)]
mod tests {
    use super::{drops_of_inode, KernelDrops};

    /// Rows as Linux 6.1 prints them.
    const TABLE: &str = "   sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode ref pointer drops
  812: 0100007F:3A98 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 4801311 2 0000000000000000 0
 1203: 0100007F:B51D 00000000:0000 07 00000000:00033A00 00:00000000 00000000     0        0 4810044 2 0000000000000000 118
";

    #[test]
    fn the_drops_column_of_the_sockets_row_is_read() {
        assert_eq!(drops_of_inode(TABLE, "4810044"), Some(118));
        assert_eq!(drops_of_inode(TABLE, "4801311"), Some(0));
        assert_eq!(drops_of_inode(TABLE, "48"), None);
        assert_eq!(drops_of_inode("garbage\nrow without columns", "1"), None);
    }

    /// A socket nobody reads overflows; the kernel's count of what it dropped is what the
    /// metric reports, read as increments.
    #[cfg(target_os = "linux")]
    #[test]
    fn datagrams_the_kernel_drops_are_counted() {
        let unread = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        socket2::SockRef::from(&unread)
            .set_recv_buffer_size(64 << 10)
            .unwrap();
        let drops = KernelDrops::of(&unread).expect("the socket is in /proc/net/udp");
        assert_eq!(drops.read_new(), Some(0));
        let sender = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let to = unread.local_addr().unwrap();
        // Ten times what the buffer was allowed to hold.
        for _ in 0..2_000 {
            sender.send_to(&[0u8; 512], to).unwrap();
        }
        let dropped = drops.read_new().unwrap();
        assert!(dropped > 0, "the kernel dropped what did not fit");
        assert_eq!(drops.read_new(), Some(0), "read as increments");
    }
}
