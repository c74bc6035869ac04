//! Who may purge: the purge networks (`[purge] allow`) and the bearer token (`[purge] token`),
//! judged the same way for HTTP PURGE and the admin API. HTCP packets are judged by their own
//! networks (`[purge.htcp] allow`) in the receiver.

use std::net::IpAddr;

use ipnet::IpNet;
use pingora::http::RequestHeader;

use super::http::bearer_matches;

/// The purge rules of one configuration.
#[derive(Debug, Clone)]
pub struct PurgeAuth {
    acl: Acl,
    token: Option<String>,
}

impl PurgeAuth {
    pub fn new(allow: Vec<IpNet>, token: Option<String>) -> PurgeAuth {
        PurgeAuth {
            acl: Acl::new(allow),
            token,
        }
    }

    /// Whether a purge from `ip` carrying `req`'s headers is allowed: the purge networks, and
    /// the bearer token when one is configured.
    pub fn allows(&self, ip: Option<IpAddr>, req: &RequestHeader) -> bool {
        ip.is_some_and(|ip| self.acl.allows(ip))
            && self
                .token
                .as_deref()
                .is_none_or(|token| bearer_matches(req, token))
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
