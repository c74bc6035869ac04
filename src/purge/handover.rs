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
//! The old process also says over the same socket whether an operator was draining it
//! (`POST /drain`): the new one then drains too, rather than come up ready and be put back
//! into a load balancer's rotation by the upgrade (regression test
//! `a_drain_outlives_a_zero_downtime_upgrade`).
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

/// One relayed purge (JSON): what it names, how, and when the old process accepted it, so that
/// the new one keeps what it fetched after that; or, of kind [`DRAINING`], the old process's
/// drain.
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
        let at = purge.at.duration_since(SystemTime::UNIX_EPOCH);
        Relayed {
            kind: kind.into(),
            targets,
            soft: purge.mode == PurgeMode::Expire,
            at_us: at.map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX)),
        }
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
            at: SystemTime::UNIX_EPOCH + Duration::from_micros(self.at_us),
        })
    }
}

/// Sends the purges this process takes to the other process of an upgrade: to the new one
/// once SIGQUIT has handed the listeners over, and, in a process started with `--upgrade`, to
/// the old one while it may still take requests.
pub struct Relay {
    to_new: PathBuf,
    to_old: PathBuf,
    handing_over: AtomicBool,
    /// Set in a process that took its listeners over: until when the old process accepts.
    old_serves_until: OnceLock<Instant>,
    socket: Mutex<Option<UnixDatagram>>,
    /// A relay to the new process has failed (logged once).
    failed: AtomicBool,
}

impl Relay {
    pub fn new(upgrade_sock: &Path) -> Relay {
        Relay {
            to_new: socket_path(upgrade_sock),
            to_old: old_socket_path(upgrade_sock),
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

    /// Sends `purge` to the other process of an upgrade, if one is running. A purge another
    /// process relayed here is not sent on; nor, to the new process, one the bus brought (the
    /// new process reads the bus itself, the old one stops reading it).
    pub fn relay(&self, purge: &Purge) {
        if purge.source == Source::Handover {
            return;
        }
        let to_new = self.handing_over.load(Ordering::Acquire) && purge.source != Source::Bus;
        let to_old = self
            .old_serves_until
            .get()
            .is_some_and(|until| Instant::now() < *until);
        if !to_new && !to_old {
            return;
        }
        let Ok(datagram) = serde_json::to_vec(&Relayed::of(purge)) else {
            return;
        };
        let mut socket = self.socket.lock().unwrap_or_else(|p| p.into_inner());
        if socket.is_none() {
            *socket = UnixDatagram::unbound().ok();
        }
        let Some(socket) = socket.as_ref() else {
            return;
        };
        if to_new {
            if let Err(e) = socket.send_to(&datagram, &self.to_new) {
                // Once: with no process taking over (SIGQUIT sent without one), every purge
                // fails.
                if !self.failed.swap(true, Ordering::AcqRel) {
                    tracing::warn!(error = %e, socket = %self.to_new.display(), purge = %purge.scope.describe(), "could not relay a purge to the process taking over");
                }
            }
        }
        if to_old {
            // The old process may have finished early, or been stopped: nothing is owed to it.
            if let Err(e) = socket.send_to(&datagram, &self.to_old) {
                tracing::debug!(error = %e, socket = %self.to_old.display(), "no old process to relay a purge to");
            }
        }
    }

    /// Tells the process taking over that this one is being drained.
    fn relay_draining(&self) {
        let said = Relayed {
            kind: DRAINING.into(),
            targets: Vec::new(),
            soft: false,
            at_us: 0,
        };
        let sent = (serde_json::to_vec(&said).ok())
            .zip(UnixDatagram::unbound().ok())
            .map(|(datagram, socket)| socket.send_to(&datagram, &self.to_new));
        if !matches!(sent, Some(Ok(_))) {
            tracing::warn!(socket = %self.to_new.display(), "could not tell the process taking over that this one is draining: it starts ready");
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
        // Bound first: the new process may take a purge as soon as it has the listeners.
        let inbox = Inbox::bind_at(self.relay.to_old.clone());
        self.relay.handing_over.store(true, Ordering::Release);
        if self.readiness.draining() {
            self.relay.relay_draining();
        }
        self.purger.store.hand_over();
        tracing::info!(socket = %self.relay.to_new.display(), "handing over: purges taken here are relayed to the new process");
        match inbox {
            // Read until the process exits: requests accepted before the drain began are still
            // answered after pingora's shutdown signal.
            Ok(inbox) => apply_relayed(inbox, &self.purger, None, std::future::pending()).await,
            Err(e) => {
                tracing::warn!(error = %e, socket = %self.relay.to_old.display(), "cannot listen for the new process's purges: it serves them alone");
            }
        }
    }
}

/// The new process's side: the socket, bound before the listeners are asked for.
pub struct Inbox {
    socket: UnixDatagram,
    path: PathBuf,
}

impl Inbox {
    /// Binds the socket beside `upgrade_sock` (replacing a leftover, which an earlier upgrade's
    /// process may still hold: it is the sender now), readable and writable by this user only.
    pub fn bind(upgrade_sock: &Path) -> io::Result<Inbox> {
        Inbox::bind_at(socket_path(upgrade_sock))
    }

    fn bind_at(path: PathBuf) -> io::Result<Inbox> {
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        let socket = UnixDatagram::bind(&path)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
        socket.set_read_timeout(Some(Duration::from_millis(200)))?;
        Ok(Inbox { socket, path })
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
    let reader = std::thread::Builder::new()
        .name("skua-handover".into())
        .spawn({
            let stop = stop.clone();
            move || {
                // Above any purge a request head can carry (`max_header_bytes`, 32 KiB by
                // default), escaped as JSON.
                let mut buf = vec![0u8; 256 * 1024];
                while !stop.load(Ordering::Relaxed) {
                    match inbox.socket.recv(&mut buf) {
                        Ok(n) => {
                            if tx.send(buf[..n].to_vec()).is_err() {
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
                let _ = std::fs::remove_file(&inbox.path);
            }
        });
    if let Err(e) = reader {
        tracing::error!(error = %e, "cannot start the thread reading relayed purges");
        return;
    }
    tokio::pin!(until);
    loop {
        tokio::select! {
            Some(datagram) = rx.recv() => {
                let metrics = &purger.metrics;
                let relayed = serde_json::from_slice::<Relayed>(&datagram).ok();
                if let (Some(readiness), Some(DRAINING)) =
                    (readiness, relayed.as_ref().map(|r| r.kind.as_str()))
                {
                    readiness.set_draining(true);
                    tracing::warn!("the process handing over was draining: this one drains too (DELETE /drain on the admin port ends it)");
                    continue;
                }
                match relayed.and_then(|r| r.to_purge()) {
                    Some(purge) => {
                        let affected = purger.apply(&purge).await;
                        super::count(metrics, Source::Handover, PurgeResult::applied(affected));
                    }
                    None => super::count(metrics, Source::Handover, PurgeResult::Invalid),
                }
            }
            () = &mut until => break,
        }
    }
    stop.store(true, Ordering::Relaxed);
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
