//! Purges: who may send them and how their targets are read. Sources: HTTP PURGE (`http.rs`)
//! and HTCP CLR (`htcp.rs` for the packets, `receiver.rs` for the listener); all apply through
//! [`crate::cache::Store::invalidate`]. It does not store anything itself.

pub mod htcp;
pub mod http;
pub mod queue;
pub mod receiver;

use std::net::IpAddr;

use ipnet::IpNet;

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
