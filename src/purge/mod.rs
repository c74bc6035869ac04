//! Purges: who may send them, how their targets are read, and how they reach the fleet.
//! Sources: HTTP PURGE (`http.rs`), HTCP CLR (`htcp.rs` for the packets, `receiver.rs` for the
//! listener) and the admin API; each applies through one [`Purger`], which also publishes it
//! on the purge bus (`bus.rs`) when there is one. It does not store anything itself.

pub mod bus;
pub mod htcp;
pub mod http;
pub mod queue;
pub mod receiver;

use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::cache::key::CacheUrl;
use crate::cache::{PurgeMode, Store};
use bus::{Bus, Target};

/// Applies purges to this node's store and publishes them to the fleet. `source` ("http",
/// "htcp", "admin") decides whether a purge is published (see `publish_htcp`).
#[derive(Clone)]
pub struct Purger {
    pub store: &'static Store,
    pub bus: Option<Arc<Bus>>,
}

impl Purger {
    pub fn new(store: &'static Store, bus: Option<Arc<Bus>>) -> Purger {
        Purger { store, bus }
    }

    fn publish(&self, source: &str, target: impl FnOnce() -> Target, mode: PurgeMode) {
        if let Some(bus) = self.bus.as_ref().filter(|b| b.publishes(source)) {
            bus.publish(target(), mode);
        }
    }

    /// Purges every variant of `url`; returns how many objects were affected here.
    pub async fn url(&self, source: &str, url: &CacheUrl, mode: PurgeMode) -> usize {
        let affected = self.store.invalidate(url, mode).await;
        self.publish(source, || Target::Url { url: url.primary() }, mode);
        affected
    }

    /// Purges every object carrying any of `tags`.
    pub async fn tags(&self, source: &str, tags: &[&str], mode: PurgeMode) -> usize {
        let affected = self.store.invalidate_tags(tags, mode).await;
        let target = || Target::Tags {
            tags: tags.iter().map(|t| t.to_string()).collect(),
        };
        self.publish(source, target, mode);
        affected
    }

    /// Bans everything under `url`'s host and path; returns what was banned.
    pub fn prefix(&self, source: &str, url: &CacheUrl) -> String {
        let banned = self.store.invalidations.ban_url(url);
        self.publish(
            source,
            || Target::Prefix { url: url.primary() },
            PurgeMode::Delete,
        );
        banned
    }
}

/// Networks allowed to purge.
#[derive(Debug, Clone)]
pub struct Acl {
    nets: Vec<IpNet>,
}

impl Acl {
    pub fn new(nets: Vec<IpNet>) -> Acl {
        Acl { nets }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        self.nets.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_default() {
        let acl = Acl::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        assert!(acl.allows("127.0.0.1".parse().unwrap()));
        assert!(acl.allows("::ffff:127.0.0.2".parse().unwrap()));
        assert!(acl.allows("::1".parse().unwrap()));
        assert!(!acl.allows("10.0.0.1".parse().unwrap()));
    }
}
