//! HTCP CLR (RFC 2756) as it is really sent: by MediaWiki for `$wgHTCPRouting` and by
//! Squid. The two disagree, so both are read (see `../shared/notes/purge-and-features.md`):
//!
//! | field | MediaWiki | Squid 5.7 |
//! |---|---|---|
//! | MINOR | 0 | 1 |
//! | byte 6 | `0x04`: CLR in the low nibble | `0x40`: CLR in the high nibble, as the RFC draws it |
//! | method | `HEAD` | `PURGE` |
//! | version | `HTTP/1.0` | `1/1` |
//!
//! Layout, all integers big-endian: total length (2), MAJOR (1), MINOR (1), data length (2),
//! opcode/response (1), flags (1), transaction id (4), CLR reserved/reason (2), then four
//! COUNTSTRs (2-byte length not counting itself, then bytes): method, URI, version, request
//! headers; then the AUTH length (2; 2 means no auth). This module only reads and writes
//! packets; the receiver applies them.

use thiserror::Error;

/// RFC 2756 §3.1: opcode 4 is CLR.
const OP_CLR: u8 = 4;
/// Receiver limits (vhtcpd, purged): anything shorter or longer is not a CLR we send or accept.
pub const MIN_PACKET: usize = 20;
pub const MAX_PACKET: usize = 4096;
/// Fixed part before the method COUNTSTR.
const HEADER_LEN: usize = 14;

/// Which sender's dialect to write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// `0x04`, MINOR 0, `HEAD`, `HTTP/1.0`: what MediaWiki sends.
    MediaWiki,
    /// `0x40`, MINOR 1, `PURGE`, `1/1`: what Squid 5.7 sends.
    Squid,
}

/// A decoded CLR request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Clr {
    pub minor: u8,
    pub trans_id: u32,
    pub reason: u8,
    pub method: String,
    pub uri: String,
    pub version: String,
    pub headers: String,
}

/// Why a datagram is not a CLR Skua applies. A closed vocabulary, for logs and counters.
#[derive(Debug, Error, Clone, Copy, PartialEq, Eq)]
pub enum HtcpError {
    #[error("packet shorter than {MIN_PACKET} bytes")]
    TooShort,
    #[error("packet longer than {MAX_PACKET} bytes")]
    TooLong,
    #[error("length fields disagree with the packet")]
    BadLength,
    #[error("not HTCP major version 0")]
    BadVersion,
    #[error("opcode is not CLR")]
    NotClr,
    #[error("a field runs past the end of the packet")]
    Overrun,
    #[error("empty or non-UTF-8 URI")]
    BadUri,
}

impl HtcpError {
    pub fn as_str(self) -> &'static str {
        match self {
            HtcpError::TooShort => "too-short",
            HtcpError::TooLong => "too-long",
            HtcpError::BadLength => "bad-length",
            HtcpError::BadVersion => "bad-version",
            HtcpError::NotClr => "not-clr",
            HtcpError::Overrun => "overrun",
            HtcpError::BadUri => "bad-uri",
        }
    }
}

fn u16_at(b: &[u8], at: usize) -> Option<usize> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]) as usize)
}

/// Reads one COUNTSTR at `at`; returns it and the offset after it.
fn countstr(b: &[u8], at: usize) -> Result<(&[u8], usize), HtcpError> {
    let len = u16_at(b, at).ok_or(HtcpError::Overrun)?;
    let start = at + 2;
    let end = start.checked_add(len).ok_or(HtcpError::Overrun)?;
    let s = b.get(start..end).ok_or(HtcpError::Overrun)?;
    Ok((s, end))
}

/// Parses a datagram. Never panics, whatever the bytes.
pub fn parse(packet: &[u8]) -> Result<Clr, HtcpError> {
    if packet.len() < MIN_PACKET {
        return Err(HtcpError::TooShort);
    }
    if packet.len() > MAX_PACKET {
        return Err(HtcpError::TooLong);
    }
    let total = u16_at(packet, 0).ok_or(HtcpError::TooShort)?;
    // Trailing bytes beyond the stated length are tolerated; a length past the end is not.
    if total > packet.len() || total < MIN_PACKET {
        return Err(HtcpError::BadLength);
    }
    let packet = &packet[..total];
    if packet[2] != 0 {
        return Err(HtcpError::BadVersion);
    }
    let minor = packet[3];
    let data_len = u16_at(packet, 4).ok_or(HtcpError::BadLength)?;
    // The DATA section starts at offset 4 and its length counts itself.
    if data_len < HEADER_LEN - 4 || 4 + data_len > total {
        return Err(HtcpError::BadLength);
    }
    let data = &packet[..4 + data_len];
    let op = data[6];
    if op != OP_CLR && op != OP_CLR << 4 {
        return Err(HtcpError::NotClr);
    }
    let trans_id = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
    let reason = data[13] & 0x0f;
    let (method, at) = countstr(data, HEADER_LEN)?;
    let (uri, at) = countstr(data, at)?;
    let (version, at) = countstr(data, at)?;
    let (headers, _) = countstr(data, at)?;
    let uri = std::str::from_utf8(uri).map_err(|_| HtcpError::BadUri)?;
    if uri.is_empty() {
        return Err(HtcpError::BadUri);
    }
    let lossy = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    Ok(Clr {
        minor,
        trans_id,
        reason,
        method: lossy(method),
        uri: uri.to_string(),
        version: lossy(version),
        headers: lossy(headers),
    })
}

/// Builds a CLR packet for `uri`, byte for byte as the given sender does.
pub fn build(uri: &str, trans_id: u32, dialect: Dialect) -> Vec<u8> {
    let (minor, op, method, version) = match dialect {
        Dialect::MediaWiki => (0u8, OP_CLR, "HEAD", "HTTP/1.0"),
        Dialect::Squid => (1u8, OP_CLR << 4, "PURGE", "1/1"),
    };
    build_raw(
        &Clr {
            minor,
            trans_id,
            reason: 0,
            method: method.into(),
            uri: uri.into(),
            version: version.into(),
            headers: String::new(),
        },
        op,
    )
}

/// Builds a packet from its fields (`op` is byte 6). Strings longer than a COUNTSTR can hold
/// are truncated; a packet longer than [`MAX_PACKET`] is a caller's error the receiver rejects.
pub fn build_raw(clr: &Clr, op: u8) -> Vec<u8> {
    let mut data = Vec::with_capacity(64 + clr.uri.len());
    data.extend_from_slice(&[0, 0]); // data length, filled below
    data.push(op);
    data.push(0); // flags: a request, no response wanted
    data.extend_from_slice(&clr.trans_id.to_be_bytes());
    data.extend_from_slice(&[0, clr.reason & 0x0f]);
    for s in [&clr.method, &clr.uri, &clr.version, &clr.headers] {
        let bytes = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        data.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
        data.extend_from_slice(bytes);
    }
    let data_len = data.len() as u16;
    data[0..2].copy_from_slice(&data_len.to_be_bytes());
    let mut packet = Vec::with_capacity(4 + data.len() + 2);
    let total = (4 + data.len() + 2) as u16;
    packet.extend_from_slice(&total.to_be_bytes());
    packet.push(0); // MAJOR
    packet.push(clr.minor);
    packet.extend_from_slice(&data);
    packet.extend_from_slice(&2u16.to_be_bytes()); // AUTH length 2: no auth
    packet
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_of_build_is_identity(
            uri in "[a-z]{1,5}://[a-z0-9.:-]{1,40}/[ -~]{0,600}",
            trans_id in any::<u32>(),
            squid in any::<bool>(),
        ) {
            let dialect = if squid { Dialect::Squid } else { Dialect::MediaWiki };
            let clr = parse(&build(&uri, trans_id, dialect)).unwrap();
            prop_assert_eq!(clr.uri, uri);
            prop_assert_eq!(clr.trans_id, trans_id);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..5000)) {
            let _ = parse(&bytes);
        }
    }

    /// Captured from a real Squid 5.7 purging `http://127.0.0.1:38128/obj/1k.bin`.
    const SQUID_57: &str = "00410001003b4000000000010000000550555247450021687474703a2f2f3132372e302e302e313a33383132382f6f626a2f316b2e62696e0003312f3100000002";

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    #[test]
    fn squid_57_capture() {
        let packet = unhex(SQUID_57);
        let clr = parse(&packet).unwrap();
        assert_eq!(clr.uri, "http://127.0.0.1:38128/obj/1k.bin");
        assert_eq!(clr.method, "PURGE");
        assert_eq!((clr.minor, clr.version.as_str()), (1, "1/1"));
        assert_eq!(
            build(&clr.uri, clr.trans_id, Dialect::Squid),
            packet,
            "built byte for byte"
        );
    }

    #[test]
    fn mediawiki_layout() {
        // MediaWiki: pack('nxxnCxNxxa*n', 36 + len, 30 + len, 4, transId, specifier, 2)
        let url = "http://en.example.org/wiki/Foo";
        let packet = build(url, 7, Dialect::MediaWiki);
        assert_eq!(packet.len(), 36 + url.len());
        assert_eq!(&packet[0..2], &((36 + url.len()) as u16).to_be_bytes());
        assert_eq!(&packet[4..6], &((30 + url.len()) as u16).to_be_bytes());
        assert_eq!(
            (packet[2], packet[3], packet[6], packet[7]),
            (0, 0, 0x04, 0)
        );
        assert_eq!(&packet[14..20], b"\x00\x04HEAD");
        assert_eq!(&packet[packet.len() - 2..], &[0, 2]);
        let clr = parse(&packet).unwrap();
        assert_eq!(
            (clr.uri.as_str(), clr.trans_id, clr.method.as_str()),
            (url, 7, "HEAD")
        );
    }

    #[test]
    fn malformed_packets_are_rejected() {
        let good = build("http://h/x", 1, Dialect::MediaWiki);
        assert_eq!(parse(&good[..19]), Err(HtcpError::TooShort));
        assert_eq!(parse(&vec![0u8; 4097]), Err(HtcpError::TooLong));
        for op in [0x00, 0x01, 0x02, 0x03, 0x10, 0x20, 0x30, 0x05, 0x44] {
            let mut p = good.clone();
            p[6] = op;
            assert_eq!(parse(&p), Err(HtcpError::NotClr), "op {op:#x}");
        }
        let mut p = good.clone();
        p[2] = 1;
        assert_eq!(parse(&p), Err(HtcpError::BadVersion));
        let mut p = good.clone();
        p[1] = p[1].wrapping_add(10); // total length past the end
        assert_eq!(parse(&p), Err(HtcpError::BadLength));
        let mut p = good.clone();
        // The URI COUNTSTR (after the 2-byte length and "HEAD" at 14..20) claims 4000 bytes.
        p[20..22].copy_from_slice(&4000u16.to_be_bytes());
        assert_eq!(parse(&p), Err(HtcpError::Overrun));
        let empty = build("", 1, Dialect::MediaWiki);
        assert_eq!(parse(&empty), Err(HtcpError::BadUri));
    }
}
