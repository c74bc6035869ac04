//! A network named in the configuration (`[purge] allow`, `[server] trusted_proxies`, a
//! rule's `client`), in the form a request's address is checked against: the address bits
//! and mask, worked out once when the configuration is read. Which addresses are let in,
//! and for what, is decided where the networks are used.

use std::net::IpAddr;

/// A configured network as a mask over the address's bits: ipnet's `contains` works out the
/// network and broadcast addresses on every call.
#[derive(Debug, Clone, Copy)]
pub enum Network {
    V4 { bits: u32, mask: u32 },
    V6 { bits: u128, mask: u128 },
}

impl Network {
    pub fn of(net: &ipnet::IpNet) -> Network {
        match net {
            ipnet::IpNet::V4(n) => Network::V4 {
                bits: u32::from(n.network()),
                mask: u32::from(n.netmask()),
            },
            ipnet::IpNet::V6(n) => Network::V6 {
                bits: u128::from(n.network()),
                mask: u128::from(n.netmask()),
            },
        }
    }

    /// As `IpNet::contains`, an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`, how a dual-stack
    /// socket gives an IPv4 peer) read as its IPv4 address; otherwise an IPv4 address is not
    /// in an IPv6 network, nor the reverse.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self, ip.to_canonical()) {
            (Network::V4 { bits, mask }, IpAddr::V4(ip)) => u32::from(ip) & mask == *bits,
            (Network::V6 { bits, mask }, IpAddr::V6(ip)) => u128::from(ip) & mask == *bits,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_network_holds_what_ipnet_holds(
            net in any::<u32>(),
            prefix in 0u8..=32,
            ip in any::<u32>(),
            net6 in any::<u128>(),
            prefix6 in 0u8..=128,
            ip6 in any::<u128>(),
        ) {
            let v4 = ipnet::IpNet::V4(ipnet::Ipv4Net::new(net.into(), prefix).unwrap());
            let v6 = ipnet::IpNet::V6(ipnet::Ipv6Net::new(net6.into(), prefix6).unwrap());
            // Addresses inside and (mostly) outside each network, of both families.
            for addr in [
                IpAddr::V4(ip.into()),
                IpAddr::V4(net.into()),
                IpAddr::V6(ip6.into()),
                IpAddr::V6(net6.into()),
            ] {
                for n in [&v4, &v6] {
                    prop_assert_eq!(Network::of(n).contains(addr), n.contains(&addr.to_canonical()));
                }
            }
        }
    }

    #[test]
    fn an_ipv4_client_of_a_dual_stack_socket_is_in_its_ipv4_network() {
        let net = Network::of(&"203.0.113.0/24".parse().unwrap());
        assert!(net.contains("::ffff:203.0.113.7".parse().unwrap()));
        assert!(!net.contains("::ffff:198.51.100.7".parse().unwrap()));
        assert!(!net.contains("64:ff9b::203.0.113.7".parse().unwrap()));
    }
}
