//! Purges across a zero-downtime upgrade. From SIGQUIT, pingora's old process hands its
//! listeners to the new one and keeps accepting on them beside it for five seconds, then
//! drains the connections it holds: two processes with caches of their own serve the same
//! addresses, and a purge reaches only the one that accepted it. So each relays what it takes
//! to the other, over Unix datagram sockets beside `[server] upgrade_sock`: the old process
//! sends every purge it takes after SIGQUIT to the new one, which binds `<upgrade_sock>.purges`
//! before it asks for the listeners (regression test
//! `a_purge_taken_by_the_old_process_during_an_upgrade_reaches_the_new_one`: before, the new
//! process served the pre-edit page until its TTL); the new process sends what it takes,
//! the bus's purges included, to the old one at `<upgrade_sock>.purges.old`, bound at SIGQUIT,
//! for as long as the old one may still take requests (regression test
//! `a_purge_taken_by_the_new_process_during_an_upgrade_reaches_the_old_one`). A relayed purge
//! is never relayed again.
//!
//! A purge is answered once the other process has applied it too: the receiver acknowledges
//! each relayed purge it applied to the sender's socket, and the sender waits for that (up to
//! [`ACK_WAIT`]; only for HTTP and admin purges, which have someone to answer). Before, the
//! purge was answered as soon as its datagram was sent, and for a few milliseconds the other
//! process still served the page from before the edit (found by
//! `tests/purge-checker/run.sh upgrades`: eight stale answers in a minute). A process that
//! does not acknowledge (an older Skua on the other side of the upgrade) is waited for once.
//!
//! The old process also says over the same socket whether an operator was draining it
//! (`POST /drain`): the new one then drains too, rather than come up ready and be put back
//! into a load balancer's rotation by the upgrade (regression test
//! `a_drain_outlives_a_zero_downtime_upgrade`).
//!
//! A second upgrade within seconds of the first leaves three processes serving, and the
//! newest relays to the one before it alone, at the path the first read on: at its own SIGQUIT
//! the second tells the first that it is cut off, and the first then serves nothing from its
//! cache without the origin's word until it exits (regression test
//! `a_process_two_upgrades_back_serves_nothing_purged_after_the_second`: it served pages from
//! before their edit to the connections it held). A third process started for that second
//! upgrade binds the relay socket of the process taking over anew, so what the first relays
//! from then on misses the second: on a purge bus the second applies it from there, as it
//! does every purge another process of its node published (regression test
//! `a_purge_the_process_handing_over_took_reaches_the_next_by_the_bus`).
//!
//! It owns the sockets and the datagram's format; applying a purge is [`Purger`]'s.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use async_trait::async_trait;
use pingora::server::ShutdownWatch;
use pingora::services::background::BackgroundService;
use serde::{Deserialize, Serialize};

use super::bus::unix_micros;
use super::{Purge, PurgeResult, Purger, Readiness, Scope, Source};
use crate::cache::key::CacheUrl;
use crate::cache::PurgeMode;

/// The socket the new process of an upgrade reads relayed purges on: `upgrade_sock` with
/// `.purges` appended, so that it lives where the operator put the upgrade socket.
pub fn socket_path(upgrade_sock: &Path) -> PathBuf {
    let mut name = upgrade_sock.as_os_str().to_owned();
    name.push(".purges");
    PathBuf::from(name)
}

/// The socket the old process of an upgrade reads the new one's purges on, from SIGQUIT.
pub fn old_socket_path(upgrade_sock: &Path) -> PathBuf {
    let mut name = socket_path(upgrade_sock).into_os_string();
    name.push(".old");
    PathBuf::from(name)
}

/// How long pingora's old process keeps accepting beside the new one after SIGQUIT
/// (`CLOSE_TIMEOUT` in pingora-core 0.9.1's `server/mod.rs`), before it drains.
pub const OLD_PROCESS_ACCEPTS_FOR: Duration = Duration::from_secs(5);

/// The `kind` of the datagram that says the old process was draining.
const DRAINING: &str = "draining";

/// The `kind` of the datagram a process sends the one before it when a second upgrade comes
/// while that one still serves: the socket it reads purges on becomes the sender's own.
const SUPERSEDED: &str = "superseded";

/// The `kind` of the datagram that tells the old process to revalidate everything it cached
/// before `at_us`: the purge bus told the new one so ([`super::bus::Target::Distrust`], or a
/// gap past the stream's retention), and the old one no longer reads the bus.
const DISTRUST: &str = "distrust";

/// Longest a purge waits for the other process of an upgrade to acknowledge it: well above
/// what applying one takes (a tag purge of many objects included), short enough that a
/// process that never acknowledges costs one purge a second, once.
pub const ACK_WAIT: Duration = Duration::from_secs(1);

/// Which process an acknowledgement comes from, as its datagram says (and the log names it).
const NEW: &str = "new";
const OLD: &str = "old";

/// One relayed purge (JSON): what it names, how, and when the old process accepted it, so that
/// the new one keeps what it fetched after that; or, of kind [`DRAINING`], the old process's
/// drain; or, of kind [`SUPERSEDED`], that the receiver is cut off from purges; or, of kind
/// [`DISTRUST`], that everything cached before `at_us` is to be revalidated.
#[derive(Debug, Serialize, Deserialize)]
struct Relayed {
    kind: String,
    targets: Vec<String>,
    soft: bool,
    at_us: u64,
}

impl Relayed {
    fn of(purge: &Purge) -> Relayed {
        let (kind, targets) = match &purge.scope {
            Scope::Url(url) => ("url", vec![url.primary()]),
            Scope::Tags(tags) => ("tags", tags.clone()),
            Scope::Prefix(url) => ("prefix", vec![url.primary()]),
        };
        Relayed {
            kind: kind.into(),
            targets,
            soft: purge.mode == PurgeMode::Expire,
            at_us: unix_micros(purge.at),
        }
    }

    fn at(&self) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_micros(self.at_us)
    }

    /// The purge this asks for; `None` when it does not parse.
    fn to_purge(&self) -> Option<Purge> {
        let url = || CacheUrl::parse_absolute(self.targets.first()?).ok();
        let scope = match self.kind.as_str() {
            "url" => Scope::Url(url()?),
            "prefix" => Scope::Prefix(url()?),
            "tags" => Scope::Tags(self.targets.clone()),
            _ => return None,
        };
        let mode = if self.soft {
            PurgeMode::Expire
        } else {
            PurgeMode::Delete
        };
        Some(Purge {
            scope,
            mode,
            source: Source::Handover,
            at: self.at(),
        })
    }
}

/// Sends the purges this process takes to the other process of an upgrade: to the new one
/// once SIGQUIT has handed the listeners over, and, in a process started with `--upgrade`, to
/// the old one while it may still take requests.
pub struct Relay {
    new: Peer,
    old: Peer,
    handing_over: AtomicBool,
    /// Set in a process that took its listeners over: until when the old process accepts.
    old_serves_until: OnceLock<Instant>,
    socket: Mutex<Option<UnixDatagram>>,
    /// A relay to the new process has failed (logged once).
    failed: AtomicBool,
}

/// The other process of an upgrade, as this one relays to it.
struct Peer {
    /// Its socket.
    path: PathBuf,
    /// [`NEW`] or [`OLD`]: what its acknowledgements say.
    name: &'static str,
    /// It let a purge go unacknowledged for [`ACK_WAIT`]: it is not waited for again.
    unacknowledging: AtomicBool,
}

impl Peer {
    fn new(path: PathBuf, name: &'static str) -> Peer {
        Peer {
            path,
            name,
            unacknowledging: AtomicBool::new(false),
        }
    }
}

impl Relay {
    pub fn new(upgrade_sock: &Path) -> Relay {
        Relay {
            new: Peer::new(socket_path(upgrade_sock), NEW),
            old: Peer::new(old_socket_path(upgrade_sock), OLD),
            handing_over: AtomicBool::new(false),
            old_serves_until: OnceLock::new(),
            socket: Mutex::new(None),
            failed: AtomicBool::new(false),
        }
    }

    /// This process has just taken the listeners over: the old one accepts beside it for
    /// [`OLD_PROCESS_ACCEPTS_FOR`], and answers what it accepted for up to `grace` more.
    pub fn took_over(&self, grace: Duration) {
        let until = Instant::now() + OLD_PROCESS_ACCEPTS_FOR + grace;
        let _ = self.old_serves_until.set(until);
    }

    /// Sends `purge` to the other process of an upgrade, if one is running, and, for a purge
    /// whose sender awaits an answer (HTTP and admin), waits until the other has applied it (up
    /// to [`ACK_WAIT`]). One the bus or HTCP brought is not waited for: nobody is answered,
    /// and both apply their purges one after another, so a wait would hold back the next. A
    /// purge another process relayed here is not sent on; nor, to the new process, one the bus
    /// brought (the new process reads the bus itself, the old one stops reading it).
    pub async fn relay(&self, purge: &Purge) {
        if purge.source == Source::Handover {
            return;
        }
        let handing_over = self.handing_over.load(Ordering::Acquire);
        let to_new = handing_over && purge.source != Source::Bus;
        // Once this process hands over in its turn (a second upgrade soon after the first),
        // the old process's socket path is this one's own inbox.
        let to_old = !handing_over && self.old_serves();
        if !to_new && !to_old {
            return;
        }
        let Ok(datagram) = serde_json::to_vec(&Relayed::of(purge)) else {
            return;
        };
        let answered = matches!(purge.source, Source::Http | Source::Admin);
        let acks = if answered { AckSocket::bind() } else { None };
        let mut awaited: Vec<&Peer> = Vec::new();
        for (peer, wanted) in [(&self.new, to_new), (&self.old, to_old)] {
            if !wanted {
                continue;
            }
            match self.send(acks.as_ref(), &datagram, &peer.path).await {
                Ok(()) if !peer.unacknowledging.load(Ordering::Relaxed) => awaited.push(peer),
                Ok(()) => {}
                // Once: with no process taking over (SIGQUIT sent without one), every purge
                // fails.
                Err(e) if peer.name == NEW => {
                    if !self.failed.swap(true, Ordering::AcqRel) {
                        tracing::warn!(error = %e, socket = %peer.path.display(), purge = %purge.scope.describe(), "could not relay a purge to the process taking over");
                    }
                }
                // The old process may have finished early, or been stopped: nothing is owed
                // to it.
                Err(e) => {
                    tracing::debug!(error = %e, socket = %peer.path.display(), "no old process to relay a purge to");
                }
            }
        }
        let Some(acks) = acks else {
            return;
        };
        let waited = tokio::time::timeout(ACK_WAIT, acks.wait_for(&mut awaited)).await;
        if waited.is_err() {
            for peer in awaited {
                if !peer.unacknowledging.swap(true, Ordering::AcqRel) {
                    tracing::warn!(process = peer.name, wait = ?ACK_WAIT, purge = %purge.scope.describe(), "the other process of the upgrade did not acknowledge a relayed purge in time (an older Skua, or one stopping): purges are relayed to it without waiting from now on");
                }
            }
        }
    }

    /// Sends `datagram` to `to`: from `acks`, where the receiver answers, when there is one;
    /// else from an unbound socket of this relay's, which no acknowledgement can reach.
    async fn send(&self, acks: Option<&AckSocket>, datagram: &[u8], to: &Path) -> io::Result<()> {
        if let Some(acks) = acks {
            return acks.0.send_to(datagram, to).await.map(|_| ());
        }
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        if socket.is_none() {
            *socket = Some(UnixDatagram::unbound()?);
        }
        match socket.as_ref() {
            Some(socket) => socket.send_to(datagram, to).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Tells the process before this one, while it may still serve, to revalidate everything
    /// it cached before `at`, as this one does. Regression: only the process reading the bus
    /// (the new one) did; the old one served what it held, unchecked, to its connections until
    /// it exited.
    pub fn relay_distrust(&self, at: SystemTime) {
        if self.handing_over.load(Ordering::Acquire) || !self.old_serves() {
            return;
        }
        if let Err(e) = say_at(DISTRUST, unix_micros(at), &self.old.path) {
            tracing::debug!(error = %e, "no old process to tell to revalidate what it cached");
        }
    }

    /// Tells the process taking over that this one is being drained.
    fn relay_draining(&self) {
        if say(DRAINING, &self.new.path).is_err() {
            tracing::warn!(socket = %self.new.path.display(), "could not tell the process taking over that this one is draining: it starts ready");
        }
    }

    /// Whether the process this one took over from may still take requests.
    fn old_serves(&self) -> bool {
        (self.old_serves_until.get()).is_some_and(|until| Instant::now() < *until)
    }
}

/// Sends a datagram of kind `kind`, naming nothing, to the socket at `to`.
fn say(kind: &str, to: &Path) -> io::Result<()> {
    say_at(kind, 0, to)
}

/// [`say`], with a time.
fn say_at(kind: &str, at_us: u64, to: &Path) -> io::Result<()> {
    let said = Relayed {
        kind: kind.into(),
        targets: Vec::new(),
        soft: false,
        at_us,
    };
    let datagram = serde_json::to_vec(&said).map_err(io::Error::other)?;
    UnixDatagram::unbound()?.send_to(&datagram, to).map(|_| ())
}

/// A socket one relayed purge is sent from, named so that the receivers can acknowledge it:
/// Linux's abstract namespace, which leaves no file behind. Elsewhere there is none, and a
/// purge is relayed without waiting, as before acknowledgements.
struct AckSocket(tokio::net::UnixDatagram);

impl AckSocket {
    #[cfg(target_os = "linux")]
    fn bind() -> Option<AckSocket> {
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::SocketAddr;
        use std::sync::atomic::AtomicU64;
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let name = format!(
            "skua-relay-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let bound = SocketAddr::from_abstract_name(name.as_bytes())
            .and_then(|addr| UnixDatagram::bind_addr(&addr))
            .and_then(|socket| {
                socket.set_nonblocking(true)?;
                tokio::net::UnixDatagram::from_std(socket)
            });
        match bound {
            Ok(socket) => Some(AckSocket(socket)),
            Err(e) => {
                tracing::debug!(error = %e, "no socket to receive acknowledgements on: the purge is relayed without waiting");
                None
            }
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn bind() -> Option<AckSocket> {
        None
    }

    /// Returns once an acknowledgement has come from each process in `awaited`, removing each
    /// as it comes.
    async fn wait_for(&self, awaited: &mut Vec<&Peer>) {
        let mut buf = [0u8; 16];
        while !awaited.is_empty() {
            let Ok(n) = self.0.recv(&mut buf).await else {
                return std::future::pending().await;
            };
            awaited.retain(|peer| peer.name.as_bytes() != &buf[..n]);
        }
    }
}

/// Watches for SIGQUIT (pingora's signal to hand the listeners over), then relays purges,
/// leaves the disk tier's files to the new process and applies the purges it relays back.
pub struct HandoverWatch {
    pub relay: Arc<Relay>,
    pub purger: Purger,
    pub readiness: Readiness,
}

#[async_trait]
impl BackgroundService for HandoverWatch {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut quit) = signal(SignalKind::quit()) else {
            return;
        };
        tokio::select! {
            Some(()) = quit.recv() => {}
            _ = shutdown.changed() => return,
        }
        // A second upgrade while the process before this one still serves: the socket it reads
        // purges on is about to be this one's, and no purge reaches it from then on. Told so,
        // it serves nothing from its cache without the origin's word until it exits
        // (regression: it served pages from before their edit to the connections it held,
        // `tests/purge-checker/run.sh fleet` with `UPGRADES=1 NATS_CHAOS=1`).
        if self.relay.old_serves() {
            if let Err(e) = say(SUPERSEDED, &self.relay.old.path) {
                tracing::debug!(error = %e, "no process before this one to tell it is cut off from purges");
            }
        }
        // Bound first: the new process may take a purge as soon as it has the listeners.
        let inbox = Inbox::bind_at(self.relay.old.path.clone(), OLD);
        self.relay.handing_over.store(true, Ordering::Release);
        if self.readiness.draining() {
            self.relay.relay_draining();
        }
        self.purger.store.hand_over();
        tracing::info!(socket = %self.relay.new.path.display(), "handing over: purges taken here are relayed to the new process");
        match inbox {
            // Read until the process exits: requests accepted before the drain began are still
            // answered after pingora's shutdown signal.
            Ok(inbox) => apply_relayed(inbox, &self.purger, None, std::future::pending()).await,
            Err(e) => {
                tracing::warn!(error = %e, socket = %self.relay.old.path.display(), "cannot listen for the new process's purges: it serves them alone");
            }
        }
    }
}

/// Where one process of an upgrade reads what the other relays: the new process's socket,
/// bound before the listeners are asked for, or the old one's, bound at SIGQUIT.
pub struct Inbox {
    socket: Arc<UnixDatagram>,
    path: PathBuf,
    /// The file this process bound at `path` (device, inode): a later process of a later
    /// upgrade binds the same path anew.
    bound: (u64, u64),
    /// What an acknowledgement from here says: [`NEW`] or [`OLD`].
    ack: &'static str,
}

impl Inbox {
    /// Binds the socket beside `upgrade_sock` (replacing a leftover, which an earlier upgrade's
    /// process may still hold: it is the sender now), readable and writable by this user only.
    pub fn bind(upgrade_sock: &Path) -> io::Result<Inbox> {
        Inbox::bind_at(socket_path(upgrade_sock), NEW)
    }

    fn bind_at(path: PathBuf, ack: &'static str) -> io::Result<Inbox> {
        use std::os::unix::fs::MetadataExt;
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        // An acknowledgement is sent from the loop that applies relayed purges.
        socket.set_write_timeout(Some(Duration::from_millis(200)))?;
        let file = std::fs::metadata(&path)?;
        Ok(Inbox {
            socket: Arc::new(socket),
            path,
            bound: (file.dev(), file.ino()),
            ack,
        })
    }

    /// Removes the socket's file if it is still the one this process bound. Regression: a
    /// process upgraded twice removed it when it stopped reading, five seconds after its own
    /// SIGQUIT: by then the file was the next process's, and every purge this one relayed to
    /// it while it drained failed (`tests/purge-checker/run.sh upgrades` logged
    /// `could not relay a purge to the process taking over`).
    fn remove_if_own(&self) {
        use std::os::unix::fs::MetadataExt;
        let still_own = std::fs::symlink_metadata(&self.path)
            .is_ok_and(|file| (file.dev(), file.ino()) == self.bound);
        if still_own {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Applies what the old process relays, until this process shuts down.
pub struct InboxService {
    pub inbox: Mutex<Option<Inbox>>,
    pub purger: Purger,
    pub readiness: Readiness,
}

#[async_trait]
impl BackgroundService for InboxService {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Some(inbox) = self.inbox.lock().unwrap_or_else(|p| p.into_inner()).take() else {
            return;
        };
        apply_relayed(inbox, &self.purger, Some(&self.readiness), async move {
            let _ = shutdown.changed().await;
        })
        .await;
    }
}

/// Applies the purges relayed to `inbox` until `until` completes; with `readiness` (the new
/// process), drains this process when the old one says it was draining.
async fn apply_relayed(
    inbox: Inbox,
    purger: &Purger,
    readiness: Option<&Readiness>,
    until: impl std::future::Future<Output = ()>,
) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stop = Arc::new(AtomicBool::new(false));
    let acks = inbox.socket.clone();
    let ack = inbox.ack;
    // However this ends (`until`, or the runtime dropping it as the process stops), the socket
    // stops taking datagrams at once: a sender then fails at once rather than wait
    // [`ACK_WAIT`] for an acknowledgement nobody will send.
    let _stop_reading = StopReading {
        stop: stop.clone(),
        socket: inbox.socket.clone(),
    };
    let reader = std::thread::Builder::new()
        .name("skua-handover".into())
        .spawn({
            let stop = stop.clone();
            move || {
                // Above any purge a request head can carry (`max_header_bytes`, 32 KiB by
                // default), escaped as JSON.
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match inbox.socket.recv_from(&mut buf) {
                        Ok((n, from)) => {
                            if tx.send((buf[..n].to_vec(), from)).is_err() {
                                break;
                            }
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                            ) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "reading relayed purges failed");
                            break;
                        }
                    }
                }
                inbox.remove_if_own();
            }
        });
    if let Err(e) = reader {
        tracing::error!(error = %e, "cannot start the thread reading relayed purges");
        return;
    }
    // Test hook (`SKUA_TEST_RELAY_APPLY_DELAY_MS`): each relayed purge waits this long before
    // it is applied, as in a process busy with a storm of them, so that a test sees whether
    // the sender waited for it.
    let apply_delay = crate::test_hooks::delay("SKUA_TEST_RELAY_APPLY_DELAY_MS");
    tokio::pin!(until);
    loop {
        tokio::select! {
            Some((datagram, from)) = rx.recv() => {
                if let Some(delay) = apply_delay {
                    tokio::time::sleep(delay).await;
                }
                let metrics = &purger.metrics;
                let relayed = serde_json::from_slice::<Relayed>(&datagram).ok();
                if let (Some(readiness), Some(DRAINING)) =
                    (readiness, relayed.as_ref().map(|r| r.kind.as_str()))
                {
                    readiness.set_draining(true);
                    tracing::warn!("the process handing over was draining: this one drains too (DELETE /drain on the admin port ends it)");
                    continue;
                }
                if let Some(at) = relayed.as_ref().filter(|r| r.kind == DISTRUST).map(|r| r.at()) {
                    purger.store.invalidations.revalidate_all_before(at);
                    tracing::warn!("the new process was told to revalidate every object cached before now: so does this one");
                    continue;
                }
                if relayed.as_ref().is_some_and(|r| r.kind == SUPERSEDED) {
                    purger.store.invalidations.revalidate_everything();
                    tracing::warn!("a later upgrade took the socket purges reach this process on: until it exits, it serves cached objects only once the origin confirms them");
                    continue;
                }
                match relayed.and_then(|r| r.to_purge()) {
                    Some(purge) => {
                        let affected = purger.apply(&purge).await;
                        super::count(metrics, Source::Handover, PurgeResult::applied(affected));
                    }
                    None => super::count(metrics, Source::Handover, PurgeResult::Invalid),
                }
                // The sender answers its purge once this arrives (an older Skua sends from an
                // unnamed socket and waits for nothing). A datagram socket does not block on a
                // sender gone.
                if !from.is_unnamed() {
                    let _ = acks.send_to_addr(ack.as_bytes(), &from);
                }
            }
            () = &mut until => break,
        }
    }
}

/// Ends the reading of relayed purges when dropped.
struct StopReading {
    stop: Arc<AtomicBool>,
    socket: Arc<UnixDatagram>,
}

impl Drop for StopReading {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        // A datagram sent to a socket shut for reading fails with EPIPE, and the reader
        // blocked in `recv` wakes.
        let _ = self.socket.shutdown(std::net::Shutdown::Read);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_relayed_purge_is_the_purge_sent() {
        let url = CacheUrl::parse_absolute("http://wiki.test/wiki/A").unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_micros(1_700_000_000_123_456);
        for scope in [
            Scope::Url(url.clone()),
            Scope::Prefix(url),
            Scope::Tags(vec!["a".into(), "b".into()]),
        ] {
            for mode in [PurgeMode::Delete, PurgeMode::Expire] {
                let sent = Purge {
                    scope: scope.clone(),
                    mode,
                    source: Source::Http,
                    at,
                };
                let wire = serde_json::to_vec(&Relayed::of(&sent)).unwrap();
                let got: Relayed = serde_json::from_slice(&wire).unwrap();
                let got = got.to_purge().unwrap();
                assert_eq!((got.scope, got.mode, got.at), (scope.clone(), mode, at));
                assert_eq!(got.source, Source::Handover);
            }
        }
        let bad = Relayed {
            kind: "url".into(),
            targets: vec![],
            soft: false,
            at_us: 0,
        };
        assert!(bad.to_purge().is_none());
    }

    /// Regression: a process upgraded twice removed `<upgrade_sock>.purges` when it stopped
    /// reading it, five seconds after its own SIGQUIT, although the next process had bound the
    /// path anew by then: what it relayed to that one while it drained was lost.
    #[test]
    fn a_process_upgraded_twice_leaves_the_next_ones_socket_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let upgrade_sock = dir.path().join("upgrade.sock");
        let first = Inbox::bind(&upgrade_sock).unwrap();
        let next = Inbox::bind(&upgrade_sock).unwrap();
        first.remove_if_own();
        let sender = UnixDatagram::unbound().unwrap();
        sender
            .send_to(b"relayed", socket_path(&upgrade_sock))
            .expect("the next process's socket is still there");
        let mut buf = [0u8; 16];
        assert_eq!(next.socket.recv(&mut buf).unwrap(), 7);
        next.remove_if_own();
        assert!(!socket_path(&upgrade_sock).exists(), "its own file goes");
    }

    #[test]
    fn the_sockets_sit_beside_the_upgrade_socket() {
        assert_eq!(
            socket_path(Path::new("/run/skua/upgrade.sock")),
            Path::new("/run/skua/upgrade.sock.purges")
        );
        assert_eq!(
            old_socket_path(Path::new("/run/skua/upgrade.sock")),
            Path::new("/run/skua/upgrade.sock.purges.old")
        );
    }
}
