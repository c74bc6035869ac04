//! The id a request that goes to an origin carries there in `X-Request-Id` (`[server]
//! request_id`), as Wikimedia's edge gives each request one: MediaWiki takes it for its own
//! request id (`$wgAllowExternalReqID`) and prints it in its logs and error pages, Skua's
//! JSON access log and error page carry the same id, so a reader's report of an error leads
//! to both. A trusted proxy's id is kept (a balancer in front already gave one); a client's
//! is never believed. What it does not do: answer clients with the id, or give one to a hit,
//! which no origin sees.

use std::hash::{BuildHasher, RandomState};

use http::HeaderName;

/// As text, for a request's fields as parsers left them (the front door's fill).
pub const X_REQUEST_ID_NAME: &str = "x-request-id";
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static(X_REQUEST_ID_NAME);

/// The longest id kept from a trusted proxy; a longer one is replaced.
const LONGEST_KEPT: usize = 200;

/// 64 random bits without a system call: std's `RandomState` keys SipHash from the operating
/// system's randomness once per thread and changes the keys for each new state. An id names
/// a request; it guards nothing, so it needs no cryptographic generator (and no dependency:
/// a new crate in the lock file would outdate the release build's hot-code list).
fn random_u64() -> u64 {
    RandomState::new().hash_one(0u8)
}

/// A new id: a random UUID (RFC 9562 §5.4, version 4), the form Wikimedia's edge and most
/// log tooling expect. Each random byte gives two digits from a table: every miss makes an
/// id, and of a miss's 80,000 instructions two `format!`s cost about 2,500, cutting each digit
/// from a 128-bit number about 900 (`benches/instructions.py`).
pub fn new_id() -> String {
    let mut bits = [0u8; 16];
    bits[..8].copy_from_slice(&random_u64().to_le_bytes());
    bits[8..].copy_from_slice(&random_u64().to_le_bytes());
    // Version 4, variant 10 (RFC 9562 §4.1, §4.2).
    bits[6] = (bits[6] & 0x0f) | 0x40;
    bits[8] = (bits[8] & 0x3f) | 0x80;
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut id = [b'-'; 36];
    let mut at = 0;
    for (i, byte) in bits.iter().enumerate() {
        // 8-4-4-4-12 hex digits: a dash before bytes 4, 6, 8 and 10.
        if matches!(i, 4 | 6 | 8 | 10) {
            at += 1;
        }
        id[at] = HEX[usize::from(byte >> 4)];
        id[at + 1] = HEX[usize::from(byte & 0xf)];
        at += 2;
    }
    String::from_utf8(id.to_vec()).unwrap_or_default()
}

/// A trusted proxy's id, when it is one to pass on: visible ASCII, not too long.
pub fn kept(value: &[u8]) -> Option<&str> {
    let fits =
        (1..=LONGEST_KEPT).contains(&value.len()) && value.iter().all(|b| b.is_ascii_graphic());
    fits.then(|| std::str::from_utf8(value).ok()).flatten()
}

/// The id a request goes to the origin with: the one a trusted proxy gave (`from_proxy`),
/// else a new one.
pub fn for_request<'a>(mut given: impl Iterator<Item = &'a [u8]>, from_proxy: bool) -> String {
    match given.next().filter(|_| from_proxy).and_then(kept) {
        Some(id) => id.to_string(),
        None => new_id(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_id_is_a_version_4_uuid_and_differs_each_time() {
        // Many, so that a version or variant written in the wrong place cannot pass by chance.
        for _ in 0..100 {
            let id = new_id();
            assert_eq!(id.len(), 36);
            let groups: Vec<&str> = id.split('-').collect();
            assert_eq!(
                groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
                [8, 4, 4, 4, 12]
            );
            assert!(groups[2].starts_with('4'), "{id}");
            assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{id}");
            assert!(
                id.bytes()
                    .all(|b| b == b'-' || b.is_ascii_hexdigit() && !b.is_ascii_uppercase()),
                "{id}"
            );
        }
        assert_ne!(new_id(), new_id());
    }

    #[test]
    fn only_a_trusted_proxys_sane_id_is_kept() {
        let given: &[&[u8]] = &[b"lb-42"];
        assert_eq!(for_request(given.iter().copied(), true), "lb-42");
        assert_ne!(for_request(given.iter().copied(), false), "lb-42");
        let bad: &[&[u8]] = &[b"two words"];
        assert_ne!(for_request(bad.iter().copied(), true), "two words");
        let long = vec![b'a'; 201];
        assert!(kept(&long).is_none());
    }
}
