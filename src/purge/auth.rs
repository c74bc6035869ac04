//! Who may purge: the purge networks (`[purge] allow`) and the bearer token (`[purge] token`),
//! judged the same way for HTTP PURGE and the admin API. HTCP packets are judged by their own
//! networks (`[purge.htcp] allow`) in the receiver.

use std::net::IpAddr;

use ipnet::IpNet;
use pingora::http::RequestHeader;

use crate::cache::fields::RequestFields;
use crate::config::network::Network;

use std::sync::atomic::{AtomicBool, Ordering};

use super::http::bearer_matches;

/// The purge rules of one configuration.
#[derive(Debug, Clone)]
pub struct PurgeAuth {
    acl: Acl,
    token: Option<String>,
    /// `[server] trusted_proxies`: a purge relayed by one of them is judged by the address it
    /// forwarded, not by its own.
    proxies: Acl,
}

impl PurgeAuth {
    pub fn new(allow: Vec<IpNet>, token: Option<String>, trusted_proxies: Vec<IpNet>) -> PurgeAuth {
        PurgeAuth {
            acl: Acl::new(allow),
            token,
            proxies: Acl::new(trusted_proxies),
        }
    }

    /// Whether a purge from the peer `ip` carrying `req`'s headers is allowed: the purge
    /// networks (judging the forwarded client when the peer is a trusted proxy), and the
    /// bearer token when one is configured.
    pub fn allows(&self, ip: Option<IpAddr>, req: &RequestHeader) -> bool {
        if !self.client(ip, req).is_some_and(|ip| self.acl.allows(ip)) {
            return false;
        }
        let Some(token) = self.token.as_deref() else {
            return true;
        };
        if bearer_matches(req, token) {
            return true;
        }
        if sent_by_mediawiki(req) && !MEDIAWIKI_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "refused a PURGE from MediaWiki for want of [purge] token: MediaWiki cannot send \
                 Authorization, so with a token none of its purges apply; rely on [purge] allow \
                 for its servers instead"
            );
        }
        false
    }
}

/// Set once the token warning about MediaWiki has been logged (once per process).
static MEDIAWIKI_WARNED: AtomicBool = AtomicBool::new(false);

/// MediaWiki's purges carry `User-Agent: MediaWiki/<version> CdnCacheUpdate` (or the job
/// runner's `MediaWiki/<version>`).
fn sent_by_mediawiki(req: &RequestHeader) -> bool {
    req.headers
        .get(http::header::USER_AGENT)
        .is_some_and(|ua| ua.as_bytes().starts_with(b"MediaWiki/"))
}

impl PurgeAuth {
    /// Who sent a purge: [`client_behind`] the trusted proxies.
    fn client(&self, peer: Option<IpAddr>, req: &RequestHeader) -> Option<IpAddr> {
        client_behind(&self.proxies, peer, &req.headers)
    }
}

/// A connection's peer as every judge of a client reads it (rules, purge networks, rate
/// limits, `X-Forwarded-For`, the access log): an IPv4 client of a dual-stack listener
/// (`[::]:80`, which the kernel gives `::ffff:a.b.c.d`) as its IPv4 address. Regression: such
/// a client slipped past a rule's `client = ["203.0.113.0/24"]`, and the origin was told
/// `X-Forwarded-For: ::ffff:203.0.113.7`.
pub fn peer_ip(addr: &pingora::protocols::l4::socket::SocketAddr) -> Option<IpAddr> {
    addr.as_inet().map(|a| a.ip().to_canonical())
}

/// Who sent a request: the peer, or, when the peer is a trusted proxy (a TLS terminator or
/// load balancer on the same host makes every client 127.0.0.1), the nearest address in
/// `X-Forwarded-For` that is not itself a trusted proxy. Entries further left were written
/// by whoever the untrusted client is and prove nothing. `None` when that entry is not an
/// address: such a request cannot be judged by its address.
pub fn client_behind<F: RequestFields + ?Sized>(
    proxies: &Acl,
    peer: Option<IpAddr>,
    fields: &F,
) -> Option<IpAddr> {
    let peer = peer?;
    if proxies.nets.is_empty() || !proxies.allows(peer) {
        return Some(peer);
    }
    let forwarded: Vec<&str> = (fields.values("x-forwarded-for"))
        .filter_map(|v| std::str::from_utf8(v).ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|a| !a.is_empty())
        .collect();
    for entry in forwarded.iter().rev() {
        // A dual-stack proxy writes an IPv4 client as `::ffff:a.b.c.d`.
        let ip = forwarded_address(entry)?.to_canonical();
        if !proxies.allows(ip) {
            return Some(ip);
        }
    }
    Some(peer)
}

/// An `X-Forwarded-For` entry as proxies write it: an address, or an address and its port
/// (`a.b.c.d:port`, `[v6]:port`: Azure Application Gateway and some other load balancers),
/// quoted or not (RFC 7239 §6 quotes a port's form). Regression: with a port the entry was no
/// address, so every client behind such a balancer shared one rate-limit bucket.
fn forwarded_address(entry: &str) -> Option<IpAddr> {
    let entry = entry.trim_matches('"');
    if let Ok(ip) = entry.parse() {
        return Some(ip);
    }
    if let Some(rest) = entry.strip_prefix('[') {
        let (v6, port) = rest.split_once(']')?;
        if !(port.is_empty() || port.strip_prefix(':')?.parse::<u16>().is_ok()) {
            return None;
        }
        return v6.parse::<std::net::Ipv6Addr>().ok().map(IpAddr::V6);
    }
    let (v4, port) = entry.rsplit_once(':')?;
    port.parse::<u16>().ok()?;
    v4.parse::<std::net::Ipv4Addr>().ok().map(IpAddr::V4)
}

/// Networks allowed to purge.
#[derive(Debug, Clone)]
pub struct Acl {
    nets: Vec<Network>,
}

impl Acl {
    pub fn new(nets: Vec<IpNet>) -> Acl {
        Acl {
            nets: nets.iter().map(Network::of).collect(),
        }
    }

    pub fn allows(&self, ip: IpAddr) -> bool {
        self.nets.iter().any(|n| n.contains(ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_entry_with_a_port_is_its_address() {
        for (entry, want) in [
            ("198.51.100.7", Some("198.51.100.7")),
            ("198.51.100.7:40001", Some("198.51.100.7")),
            ("[2001:db8::1]:40001", Some("2001:db8::1")),
            ("[2001:db8::1]", Some("2001:db8::1")),
            ("2001:db8::1", Some("2001:db8::1")),
            ("\"[2001:db8::1]:80\"", Some("2001:db8::1")),
            ("198.51.100.7:port", None),
            ("[2001:db8::1]x", None),
            ("unknown", None),
        ] {
            let got = forwarded_address(entry).map(|ip| ip.to_string());
            assert_eq!(got.as_deref(), want, "{entry}");
        }
    }

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
