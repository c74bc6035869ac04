//! The PROXY protocol, versions 1 and 2 as HAProxy specifies them
//! (<https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt>), on the listeners that
//! expect it (`[server] proxy_protocol_listen`, `[server.tls] proxy_protocol_listen`): a
//! balancer in front (HAProxy, an AWS Network Load Balancer, hitch, stunnel) opens each
//! connection with a header naming the client's address, before the first byte of HTTP or of
//! a TLS handshake. This file reads that header, checks it, and makes its source the
//! connection's peer address, which everything after it reads (`X-Forwarded-For` to the
//! origin, the purge ACL, rules, the access log). Who may send such a header (the gate checks
//! the socket's peer against `[server] trusted_proxies` first) and everything about HTTP are
//! elsewhere.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::protocols::l4::socket::SocketAddr as PeerAddr;
use pingora::protocols::l4::stream::Stream as TcpStream;
use pingora::protocols::tls::SslDigest;
use pingora::protocols::{GetSocketDigest, Peek, SocketDigest, Ssl, Stream, UniqueID};
use pingora::time::fast_timeout::fast_timeout;
use ppp::PartialResult;
use tokio::io::{AsyncReadExt, AsyncWrite};

/// The longest header taken. Version 1 is at most 107 bytes (spec §2.1); version 2 is 16 bytes
/// and the length they announce: the addresses (at most 216, for Unix sockets) and the TLVs a
/// balancer adds (AWS's VPC endpoint ID, HAProxy's TLS version, cipher and client
/// certificate name), a few hundred bytes. A longer one is refused rather than buffered.
pub const MAX_HEADER_BYTES: usize = 1536;

/// Version 2's first 12 bytes (spec §2.2).
const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";

/// Version 1's first 6 bytes (spec §2.1).
const V1_PREFIX: &[u8; 6] = b"PROXY ";

/// `PP2_TYPE_SSL` (spec §2.2.5): the client's connection to the balancer, over TLS or not.
const PP2_TYPE_SSL: u8 = 0x20;

/// `PP2_CLIENT_SSL`, a bit of `PP2_TYPE_SSL`'s first byte: "the client connected over SSL/TLS".
const PP2_CLIENT_SSL: u8 = 0x01;

/// A connection whose header was read: what follows it is the client's HTTP (or TLS) stream.
pub struct Proxied {
    pub stream: Stream,
    /// The balancer says the client reached it over TLS (version 2's `PP2_TYPE_SSL`): the
    /// balancer terminated TLS, and the request's scheme is https.
    pub client_tls: bool,
}

/// Why a connection was closed before its header was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The peer closed first (a balancer's TCP health check connects and closes).
    Closed,
    /// No complete header within `[server] header_timeout`.
    TimedOut,
    /// Not a PROXY header, a malformed one, or one longer than [`MAX_HEADER_BYTES`].
    Malformed,
}

/// What the bytes read so far hold.
#[derive(Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A header of `len` bytes; `source` is the client's address, `None` when the balancer
    /// speaks for itself (version 2's `LOCAL` command, its health checks) or names no TCP
    /// address (version 1's `UNKNOWN`, Unix sockets): the socket's peer stays the address.
    Header {
        len: usize,
        source: Option<SocketAddr>,
        client_tls: bool,
    },
    Incomplete,
    Malformed,
}

/// Reads the PROXY header that opens `stream` (a TCP connection as pingora accepted it),
/// within `deadline`, and returns the stream positioned at the first byte after it, with the
/// header's source as its peer address.
pub async fn accept(stream: Stream, deadline: Duration) -> Result<Proxied, Refusal> {
    // pingora's listeners hand every accepted connection over as its L4 stream; its
    // `rewind` gives back what was read past the header, whatever reads next (the head
    // reader, or the TLS handshake).
    let Ok(mut tcp) = stream.into_any().downcast::<TcpStream>() else {
        return Err(Refusal::Malformed);
    };
    let mut buf = [0u8; MAX_HEADER_BYTES];
    let mut filled = 0;
    let read = async {
        loop {
            let n = tcp
                .read(&mut buf[filled..])
                .await
                .map_err(|_| Refusal::Closed)?;
            if n == 0 {
                return Err(Refusal::Closed);
            }
            filled += n;
            match parse(&buf[..filled]) {
                Parsed::Incomplete if filled < buf.len() => continue,
                Parsed::Incomplete | Parsed::Malformed => return Err(Refusal::Malformed),
                Parsed::Header {
                    len,
                    source,
                    client_tls,
                } => return Ok((len, source, client_tls)),
            }
        }
    };
    let (len, source, client_tls) = fast_timeout(deadline, read)
        .await
        .map_err(|_| Refusal::TimedOut)??;
    tcp.rewind(&buf[len..filled]);
    if let Some(source) = source {
        let digest = SocketDigest::from_raw_fd(tcp.id());
        let _ = digest.peer_addr.set(Some(PeerAddr::Inet(source)));
        tcp.set_socket_digest(digest);
    }
    let stream: Stream = if client_tls {
        Box::new(TlsAtBalancer {
            inner: tcp,
            digest: Arc::new(SslDigest::new("", "", None, None, vec![])),
        })
    } else {
        tcp
    };
    Ok(Proxied { stream, client_tls })
}

/// A connection whose client reached the balancer over TLS, as its PROXY header said:
/// pingora's sessions find a TLS digest on it, so that a request's scheme is https there as on
/// Skua's own HTTPS listeners (its cipher and version are the balancer's to know).
#[derive(Debug)]
struct TlsAtBalancer {
    inner: Box<TcpStream>,
    digest: Arc<SslDigest>,
}

super::delegate::delegate_to_inner!(TlsAtBalancer);

impl AsyncWrite for TlsAtBalancer {
    super::delegate::writes_to_inner!();
    super::delegate::flush_and_shutdown_to_inner!();
}

impl Ssl for TlsAtBalancer {
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        Some(self.digest.clone())
    }
}

#[async_trait]
impl Peek for TlsAtBalancer {}

/// Parses the start of a connection. Each version is told by its first bytes, so a
/// connection that opens with anything else is refused as soon as its first bytes arrive.
pub fn parse(buf: &[u8]) -> Parsed {
    let v2 = buf.len().min(V2_SIGNATURE.len());
    if buf[..v2] == V2_SIGNATURE[..v2] {
        return parse_v2(buf);
    }
    let v1 = buf.len().min(V1_PREFIX.len());
    if buf[..v1] == V1_PREFIX[..v1] {
        return parse_v1(buf);
    }
    Parsed::Malformed
}

/// Version 1 is one line, read whole before it is judged: a piece of it can look like a
/// finished header with a bad field (`... 40001 ` before its last port arrives, found by the
/// `proxy_header` fuzz target), and a whole line with a field missing is malformed, not
/// waiting for more.
fn parse_v1(buf: &[u8]) -> Parsed {
    let Some(end) = memchr::memchr(b'\n', buf) else {
        // Spec §2.1: at most 107 bytes, CRLF included; a CR is only ever the line's end.
        let stray_cr = memchr::memchr(b'\r', buf).is_some_and(|at| at + 1 < buf.len());
        return if buf.len() >= 107 || stray_cr {
            Parsed::Malformed
        } else {
            Parsed::Incomplete
        };
    };
    match ppp::v1::Header::try_from(&buf[..=end]) {
        Ok(header) if header.header.len() == end + 1 => Parsed::Header {
            len: header.header.len(),
            source: match header.addresses {
                ppp::v1::Addresses::Tcp4(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Tcp6(a) => {
                    Some(SocketAddr::from((a.source_address, a.source_port)))
                }
                ppp::v1::Addresses::Unknown => None,
            },
            client_tls: false,
        },
        _ => Parsed::Malformed,
    }
}

fn parse_v2(buf: &[u8]) -> Parsed {
    use ppp::v2::{Addresses, Command, Header, ParseError};
    let header = match Header::try_from(buf) {
        // A whole header past the bound is refused as one that announces it: the reader never
        // holds more than `MAX_HEADER_BYTES`, so only a caller with a longer buffer sees one
        // (the `proxy_header` fuzz target did).
        Ok(header) if header.len() > MAX_HEADER_BYTES => return Parsed::Malformed,
        Ok(header) => header,
        Err(ParseError::Partial(_, announced)) if 16 + announced > MAX_HEADER_BYTES => {
            return Parsed::Malformed
        }
        Err(e) if e.is_incomplete() => return Parsed::Incomplete,
        Err(_) => return Parsed::Malformed,
    };
    let mut client_tls = false;
    for tlv in header.tlvs() {
        let Ok(tlv) = tlv else {
            return Parsed::Malformed;
        };
        if tlv.kind == PP2_TYPE_SSL {
            client_tls = tlv.value.first().is_some_and(|c| c & PP2_CLIENT_SSL != 0);
        }
    }
    let source = match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        (Command::Proxy, Addresses::IPv6(a)) => {
            Some(SocketAddr::from((a.source_address, a.source_port)))
        }
        _ => None,
    };
    Parsed::Header {
        len: header.len(),
        source,
        client_tls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(command: u8, family: u8, addresses: &[u8], tlvs: &[u8]) -> Vec<u8> {
        let mut h = V2_SIGNATURE.to_vec();
        h.push(0x20 | command);
        h.push(family);
        let len = (addresses.len() + tlvs.len()) as u16;
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(addresses);
        h.extend_from_slice(tlvs);
        h
    }

    const V4_ADDRESSES: [u8; 12] = [198, 51, 100, 7, 10, 0, 0, 5, 0x9c, 0x41, 0x1f, 0x90];

    #[test]
    fn version_1_names_the_client_and_leaves_what_follows() {
        let text = b"PROXY TCP4 198.51.100.7 10.0.0.5 40001 8080\r\nGET / HTTP/1.1\r\n";
        assert_eq!(
            parse(text),
            Parsed::Header {
                len: 45,
                source: Some("198.51.100.7:40001".parse().unwrap()),
                client_tls: false
            }
        );
        let v6 = b"PROXY TCP6 2001:db8::1 2001:db8::2 40001 443\r\n";
        let Parsed::Header { source, len, .. } = parse(v6) else {
            panic!("{:?}", parse(v6));
        };
        assert_eq!(source, Some("[2001:db8::1]:40001".parse().unwrap()));
        assert_eq!(len, v6.len());
        assert!(matches!(
            parse(b"PROXY UNKNOWN\r\n"),
            Parsed::Header { source: None, .. }
        ));
    }

    #[test]
    fn version_2_names_the_client_and_may_say_it_used_tls() {
        let plain = v2(1, 0x11, &V4_ADDRESSES, &[]);
        assert_eq!(
            parse(&plain),
            Parsed::Header {
                len: 28,
                source: Some("198.51.100.7:40001".parse().unwrap()),
                client_tls: false
            }
        );
        // PP2_TYPE_SSL with PP2_CLIENT_SSL, verify 0, and a PP2_SUBTYPE_SSL_VERSION inside.
        let ssl = [
            0x20, 0, 12, 0x01, 0, 0, 0, 0, 0x21, 0, 4, b'T', b'L', b'S', b'3',
        ];
        let tls = v2(1, 0x11, &V4_ADDRESSES, &ssl);
        assert!(matches!(
            parse(&tls),
            Parsed::Header {
                client_tls: true,
                ..
            }
        ));
        // LOCAL: the balancer's own connection (a health check); its addresses are ignored.
        let local = v2(0, 0x11, &V4_ADDRESSES, &[]);
        assert!(matches!(parse(&local), Parsed::Header { source: None, .. }));
    }

    /// Regression (the `proxy_header` fuzz target): a whole version 2 header longer than
    /// `MAX_HEADER_BYTES` was taken, where one announcing that length in a piece is refused.
    #[test]
    fn a_whole_version_2_header_past_the_bound_is_malformed() {
        let padding = vec![0u8; MAX_HEADER_BYTES];
        // PP2_TYPE_NOOP (0x04) carrying the padding.
        let mut noop = vec![0x04];
        noop.extend_from_slice(&(padding.len() as u16).to_be_bytes());
        noop.extend_from_slice(&padding);
        let long = v2(0, 0x00, &[], &noop);
        assert!(long.len() > MAX_HEADER_BYTES);
        assert_eq!(parse(&long), Parsed::Malformed);
    }

    #[test]
    fn a_header_in_pieces_is_waited_for() {
        let whole = v2(1, 0x11, &V4_ADDRESSES, &[]);
        for cut in [1, 11, 12, 15, 16, 27] {
            assert_eq!(parse(&whole[..cut]), Parsed::Incomplete, "{cut}");
        }
        let text = b"PROXY TCP4 198.51.100.7 10.0.0.5 40001 8080\r\n";
        // 39: `... 40001 `, which reads as a header with an empty last port (the fuzz
        // target's first find).
        for cut in [1, 5, 6, 20, 39, 43, 44] {
            assert_eq!(parse(&text[..cut]), Parsed::Incomplete, "{cut}");
        }
    }

    #[test]
    fn anything_else_is_refused_at_once() {
        for bad in [
            &b"GET / HTTP/1.1\r\n"[..],
            b"G",
            b"\x16\x03\x01",
            b"PROXY TCP4 198.51.100.7 10.0.0.5 40001\r\n",
            b"PROXY TCP4 nowhere 10.0.0.5 40001 8080\r\n",
            b"PROXY UDP4 198.51.100.7 10.0.0.5 40001 8080\r\n",
            b"PROXY TCP4\r\n",
            b"PROXY TCP4 198.51.100.7 10.0.0.5 40001 8080\n",
            b"PROXY UNKNOWN\rX",
        ] {
            assert_eq!(parse(bad), Parsed::Malformed, "{bad:?}");
        }
        // Version 1 is at most 107 bytes: a longer line without its end is not waited for.
        let endless = [&b"PROXY TCP4 "[..], &[b'1'; 120][..]].concat();
        assert_eq!(parse(&endless), Parsed::Malformed);
        // Version 2 announcing more than is taken: refused before it is read.
        let mut long = v2(1, 0x11, &V4_ADDRESSES, &[]);
        long[14..16].copy_from_slice(&2000u16.to_be_bytes());
        assert_eq!(parse(&long), Parsed::Malformed);
        // Version 2 with a TLV that runs past the header's end.
        let broken = v2(1, 0x11, &V4_ADDRESSES, &[0x20, 0, 9, 1]);
        assert_eq!(parse(&broken), Parsed::Malformed);
    }
}
