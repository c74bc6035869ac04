//! Purges: who may send them, how their targets are read, and how they reach the fleet.
//! Sources: HTTP PURGE (`http.rs`), HTCP CLR (`htcp.rs` for the packets, `receiver.rs` for the
//! listener, `queue.rs` for bursts), the admin API and the purge bus (`bus.rs`). Each builds
//! one typed [`Purge`] and applies it through [`Purger::apply`] (`dispatch.rs`), which also
//! publishes it on the bus when it did not come from there. It does not store anything itself.

pub mod bus;
mod dispatch;
pub mod htcp;
pub mod http;
pub mod queue;
pub mod receiver;

use std::net::IpAddr;

use ipnet::IpNet;

pub use dispatch::{Purge, PurgeResult, Purger, Scope, Source};

use crate::metrics::Metrics;

/// Counts one purge request in `skua_purges_total`.
pub fn count(metrics: &Metrics, source: Source, result: PurgeResult) {
    metrics
        .purges
        .with_label_values(&[source.as_str(), result.as_str()])
        .inc();
}

/// Makes every series of the closed source × result vocabulary exist from the start, so
/// dashboards (and tests) see zeros rather than a missing series.
pub fn register_series(metrics: &Metrics) {
    for source in Source::ALL {
        for result in PurgeResult::ALL {
            metrics
                .purges
                .with_label_values(&[source.as_str(), result.as_str()]);
        }
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
