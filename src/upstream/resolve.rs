//! DNS names among `[[origin]] addresses` (`mediawiki:80`: a container's name in a compose
//! file, a Kubernetes service, a cloud load balancer whose addresses change). Each name is
//! looked up with the system's resolver (`/etc/hosts`, then DNS, as `getent ahosts` does) at
//! start, on every reload and every pool's `resolve_interval`, and every address it has is
//! an origin of the pool. A name that does not resolve keeps the addresses it had, as nginx
//! keeps an upstream's when its resolver fails; one that never has resolved gives the pool no
//! origin from it (its requests are answered 502 until it does). This module turns targets
//! into addresses; the pools built from them belong to [`super::Pools`].

use std::net::{SocketAddr, ToSocketAddrs};

use crate::config::{OriginPool, OriginTarget, Resolved};

/// `pools` with every target looked up now: `previous` (the same pools as last resolved)
/// gives a name that fails its last addresses.
pub fn resolve(pools: &[OriginPool], previous: Option<&[OriginPool]>) -> Vec<OriginPool> {
    resolve_with(pools, previous, system_lookup)
}

/// Whether `pool` names an origin by DNS name.
pub fn names_origins(pool: &OriginPool) -> bool {
    (pool.targets.iter()).any(|t| matches!(t, OriginTarget::Name { .. }))
}

/// Whether some pool names an origin by DNS name.
pub fn any_names(pools: &[OriginPool]) -> bool {
    pools.iter().any(names_origins)
}

/// Whether two resolutions of the same pools give each the same origins.
pub fn same_addresses(a: &[OriginPool], b: &[OriginPool]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(a, b)| a.addresses == b.addresses)
}

/// The DNS names among `pools`' targets that do not resolve now, each as `pool: name:port:
/// why`, for `skua check` to warn of (a warning: a compose file may start the origin later).
pub fn unresolved(pools: &[OriginPool]) -> Vec<String> {
    let mut out = Vec::new();
    for pool in pools {
        for target in &pool.targets {
            if let OriginTarget::Name { host, port } = target {
                let why = match system_lookup(host, *port) {
                    Ok(found) if !found.is_empty() => continue,
                    Ok(_) => "no address".to_string(),
                    Err(e) => e.to_string(),
                };
                out.push(format!("[[origin]] {:?}: {host}:{port}: {why}", pool.name));
            }
        }
    }
    out
}

fn system_lookup(host: &str, port: u16) -> std::io::Result<Vec<SocketAddr>> {
    // Only names come here: the configuration took every literal address as one already.
    (host, port).to_socket_addrs().map(Iterator::collect)
}

fn resolve_with(
    pools: &[OriginPool],
    previous: Option<&[OriginPool]>,
    lookup: impl Fn(&str, u16) -> std::io::Result<Vec<SocketAddr>>,
) -> Vec<OriginPool> {
    let mut out = Vec::with_capacity(pools.len());
    for pool in pools {
        let before = previous
            .into_iter()
            .flatten()
            .find(|p| p.name == pool.name && p.targets == pool.targets);
        let mut resolved = Vec::with_capacity(pool.targets.len());
        for (i, target) in pool.targets.iter().enumerate() {
            let had = before.and_then(|p| p.resolved.get(i));
            resolved.push(match target {
                OriginTarget::Address(addr) => Resolved {
                    addresses: vec![*addr],
                    failing: false,
                },
                OriginTarget::Name { host, port } => match lookup(host, *port) {
                    Ok(mut found) if !found.is_empty() => {
                        found.sort();
                        found.dedup();
                        if had.is_some_and(|had| had.addresses != found) {
                            tracing::warn!(pool = %pool.name, name = %host, addresses = ?found, "an origin's name resolves to other addresses now");
                        } else if had.is_some_and(|had| had.failing) {
                            tracing::warn!(pool = %pool.name, name = %host, "an origin's name resolves again");
                        }
                        Resolved {
                            addresses: found,
                            failing: false,
                        }
                    }
                    failed => {
                        let kept = had.map(|had| had.addresses.clone()).unwrap_or_default();
                        if !had.is_some_and(|had| had.failing) {
                            let why = match failed {
                                Ok(_) => "no address".to_string(),
                                Err(e) => e.to_string(),
                            };
                            tracing::warn!(pool = %pool.name, name = %host, error = %why, kept = ?kept, "an origin's name did not resolve; its addresses from before are kept until it does");
                        }
                        Resolved {
                            addresses: kept,
                            failing: true,
                        }
                    }
                },
            });
        }
        let mut addresses: Vec<SocketAddr> = Vec::new();
        for addr in resolved.iter().flat_map(|r| &r.addresses) {
            if !addresses.contains(addr) {
                addresses.push(*addr);
            }
        }
        out.push(OriginPool {
            addresses,
            resolved,
            ..pool.clone()
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Balance;
    use std::time::Duration;

    fn pool(targets: Vec<OriginTarget>) -> OriginPool {
        OriginPool {
            name: "wiki".into(),
            targets,
            addresses: Vec::new(),
            resolved: Vec::new(),
            resolve_interval: Duration::from_secs(10),
            hosts: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            read_timeout: Duration::from_secs(1),
            health_check: None,
            balance: Balance::RoundRobin,
            upgrade: Vec::new(),
            tls: None,
            max_connections: 0,
            fail_timeout: Duration::ZERO,
            retry_statuses: Vec::new(),
        }
    }

    fn name(host: &str) -> OriginTarget {
        OriginTarget::Name {
            host: host.into(),
            port: 80,
        }
    }

    fn addr(text: &str) -> SocketAddr {
        text.parse().unwrap()
    }

    #[test]
    fn every_address_of_a_name_is_an_origin_once_and_addresses_stay_as_written() {
        let pools = [pool(vec![
            OriginTarget::Address(addr("10.0.0.9:8080")),
            name("app"),
            name("app-too"),
        ])];
        let lookup = |host: &str, port| {
            Ok(match host {
                "app" => vec![
                    addr("10.0.0.2:80"),
                    addr("10.0.0.1:80"),
                    addr("10.0.0.2:80"),
                ],
                _ => vec![SocketAddr::new("10.0.0.1".parse().unwrap(), port)],
            })
        };
        let resolved = resolve_with(&pools, None, lookup);
        assert_eq!(
            resolved[0].addresses,
            [
                addr("10.0.0.9:8080"),
                addr("10.0.0.1:80"),
                addr("10.0.0.2:80")
            ]
        );
    }

    #[test]
    fn a_name_that_fails_keeps_what_it_had_and_one_that_never_resolved_gives_nothing() {
        let pools = [pool(vec![name("app"), name("gone")])];
        let first = resolve_with(&pools, None, |host, _| match host {
            "app" => Ok(vec![addr("10.0.0.1:80")]),
            _ => Err(std::io::Error::other("no such name")),
        });
        assert_eq!(first[0].addresses, [addr("10.0.0.1:80")]);
        let down = resolve_with(&pools, Some(&first), |_, _| {
            Err(std::io::Error::other("resolver down"))
        });
        assert_eq!(down[0].addresses, [addr("10.0.0.1:80")], "kept");
        assert!(same_addresses(&first, &down));
        let failing = |pools: &[OriginPool]| -> Vec<bool> {
            pools[0].resolved.iter().map(|r| r.failing).collect()
        };
        assert_eq!(failing(&first), [false, true]);
        assert_eq!(failing(&down), [true, true]);
        let moved = resolve_with(&pools, Some(&down), |host, _| match host {
            "app" => Ok(vec![addr("10.0.0.7:80")]),
            _ => Ok(vec![addr("10.0.0.8:80")]),
        });
        assert_eq!(
            moved[0].addresses,
            [addr("10.0.0.7:80"), addr("10.0.0.8:80")]
        );
        assert!(!same_addresses(&down, &moved));
        // A pool whose targets changed (a reload) does not inherit the old ones' addresses.
        let other = [pool(vec![name("app")])];
        let fresh = resolve_with(&other, Some(&moved), |_, _| Ok(Vec::new()));
        assert!(fresh[0].addresses.is_empty());
    }

    #[test]
    fn localhost_resolves_with_the_systems_resolver() {
        let found = system_lookup("localhost", 8080).unwrap();
        assert!(
            found
                .iter()
                .any(|a| a.ip().is_loopback() && a.port() == 8080),
            "{found:?}"
        );
    }
}
