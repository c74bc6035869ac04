//! Host syntax, shared by the configuration (host aliases, health-check hosts) and the
//! cache key: one normalisation, so a host the configuration names is the host a request's key
//! holds.

/// A host that is not `host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadHost;

/// RFC 9110 §4.2.3: the host is case-insensitive and an explicit default port is the same as
/// none; a trailing dot names the same DNS host (RFC 1034 §3.1).
/// `default_port` is the scheme's (80 or 443): it is dropped.
pub fn normalize_host(authority: &str, default_port: u16) -> Result<String, BadHost> {
    // Every request's key is built from this (twice for a miss): one pass over the bytes, one
    // allocation sized for a port.
    // No separate look for userinfo (`user@host`): `@` is none of the bytes a DNS name, an
    // IP literal or a port may hold, so the checks below refuse it.
    if authority.is_empty() {
        return Err(BadHost);
    }
    let (host, port) = split_port(authority).ok_or(BadHost)?;
    let host = host.strip_suffix('.').unwrap_or(host);
    let valid = if host.starts_with('[') {
        host.ends_with(']')
            && host.len() > 2
            && host[1..host.len() - 1]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
    } else {
        dns_name(host.as_bytes())
    };
    if !valid {
        return Err(BadHost);
    }
    let mut out = String::with_capacity(host.len() + 6);
    out.push_str(host);
    out.make_ascii_lowercase();
    if let Some(number) = port {
        if number != default_port {
            // The port as digits without leading zeros ("08080" names port 8080).
            out.push(':');
            out.push_str(itoa::Buffer::new().format(number));
        }
    }
    Ok(out)
}

/// `host[:port]` without its port; an IPv6 literal keeps its brackets (`[::1]:80` → `[::1]`).
pub fn without_port(authority: &str) -> &str {
    // Asked several times per request (the rules, the pool, the redirect): one byte search.
    let bytes = authority.as_bytes();
    if bytes.first() == Some(&b'[') {
        return memchr::memchr(b']', bytes).map_or(authority, |end| &authority[..=end]);
    }
    // A plain loop: a host is a few dozen bytes, shorter than a vectorised search pays off at.
    (bytes.iter().position(|b| *b == b':')).map_or(authority, |colon| &authority[..colon])
}

/// Letters, digits, `-` and `_` in non-empty labels separated by dots. Every DNS label is
/// non-empty (RFC 1034 §3.1): "a..b", ".a" or a second trailing dot would otherwise
/// canonicalise to a different host each time.
fn dns_name(host: &[u8]) -> bool {
    let mut label = 0;
    for &b in host {
        if b == b'.' {
            if label == 0 {
                return false;
            }
            label = 0;
        } else if LABEL_BYTES[usize::from(b)] {
            label += 1;
        } else {
            return false;
        }
    }
    label > 0
}

/// The bytes a DNS label may hold here: letters, digits, `-` and `_`. A table: every request's
/// host is checked byte by byte, and one load per byte is a third of the range tests' cost.
const LABEL_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let byte = b as u8;
        table[b] = byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_';
        b += 1;
    }
    table
};

/// Splits `host[:port]` (IPv6 literals in brackets) and reads the port. `None` if the port is
/// not a number from 1 to 65535; an empty one (`host:`) is none.
fn split_port(authority: &str) -> Option<(&str, Option<u16>)> {
    let bytes = authority.as_bytes();
    let (host, port) = if authority.starts_with('[') {
        let end = memchr::memchr(b']', bytes)?;
        let rest = &authority[end + 1..];
        if rest.is_empty() {
            (authority, None)
        } else {
            (&authority[..=end], Some(rest.strip_prefix(':')?))
        }
    } else {
        // A plain loop: a host is a few dozen bytes, shorter than a vectorised search pays
        // off at.
        match bytes.iter().rposition(|b| *b == b':') {
            Some(colon) => (&authority[..colon], Some(&authority[colon + 1..])),
            None => (authority, None),
        }
    };
    let port = match port {
        None | Some("") => return Some((host, None)),
        Some(p) if p.len() <= 5 => p,
        Some(_) => return None,
    };
    let mut number: u32 = 0;
    for b in port.bytes() {
        if !b.is_ascii_digit() {
            return None;
        }
        number = number * 10 + u32::from(b - b'0');
    }
    let number = u16::try_from(number).ok().filter(|n| *n != 0)?;
    Some((host, Some(number)))
}
