//! Whether this node is ready to serve: whether it can tell a purged copy from a current one.
//! Not while its disk index is still loading (a purge would find nothing to remove), while its
//! HTCP receiver is not listening (purges sent to it are lost), or while the purge bus is
//! still catching up on what was sent while it was away; nor while an operator drains it
//! (`POST /drain` on the admin port) to take it out of a load balancer's rotation. Read by
//! `/readyz` on the admin port and by the health path on the proxy port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

use crate::cache::Store;

#[derive(Clone)]
pub struct Readiness {
    store: &'static Store,
    /// The HTCP receiver's address and its `skua_htcp_listening` gauge, when there is one.
    htcp: Option<(SocketAddr, IntGauge)>,
    /// An operator is draining this node: it answers every request, and asks each client to
    /// close its connection, while its health says no.
    draining: Arc<AtomicBool>,
}

impl Readiness {
    pub fn new(store: &'static Store, htcp: Option<(SocketAddr, IntGauge)>) -> Readiness {
        Readiness {
            store,
            htcp,
            draining: Arc::new(AtomicBool::new(false)),
        }
    }

    /// Whether an operator is draining this node.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Starts (`true`) or ends draining this node.
    pub fn set_draining(&self, on: bool) {
        self.draining.store(on, Ordering::Relaxed);
    }

    /// `Ok`, or why not.
    pub fn check(&self) -> Result<(), &'static str> {
        if self.draining() {
            return Err("draining");
        }
        if self.store.disk.is_some_and(|d| !d.loaded()) {
            return Err("loading the disk index");
        }
        if self
            .htcp
            .as_ref()
            .is_some_and(|(_, listening)| listening.get() != 1)
        {
            return Err("the HTCP receiver is not listening");
        }
        if !self.store.invalidations.is_caught_up() {
            return Err("catching up on the purge bus");
        }
        Ok(())
    }

    /// Where the HTCP receiver listens, when there is one.
    pub fn htcp(&self) -> Option<SocketAddr> {
        self.htcp.as_ref().map(|(addr, _)| *addr)
    }
}
