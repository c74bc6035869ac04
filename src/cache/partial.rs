//! Partial content (RFC 9111 §3.3, §3.4): the 206 pieces of a representation Skua holds no
//! complete copy of. A Range request for such a URL goes to the origin with its Range; a
//! single-part 206 that may be stored is kept here, apart from the complete objects of the
//! memory and disk tiers, so a piece can never stand in for a whole response. Later Ranges
//! inside the stored pieces are answered from them while they are fresh. Pieces that share a
//! strong `ETag` are combined, and once they cover the whole representation it becomes a
//! complete `200` in the memory tier (§3.4).
//!
//! What this does not do: multipart/byteranges, pieces of a response with `Vary` or with
//! surrogate keys (tag purges consult the tag index, which pieces are not in), revalidation of
//! stale pieces (a stale piece is fetched again), or asking the origin for the missing part
//! of a representation.

use std::sync::Arc;
use std::time::SystemTime;

use bytes::{Bytes, BytesMut};
use http::HeaderValue;
use pingora::cache::key::HashBinary;
use pingora::http::ResponseHeader;

use crate::cache::meta::AgeWhenHeard;

/// One byte range a request asks for (RFC 9110 §14.1.2), not yet resolved against a length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ByteRange {
    /// `first-last` or `first-`.
    From { first: u64, last: Option<u64> },
    /// `-n`: the last n bytes.
    Suffix(u64),
}

impl ByteRange {
    /// A `Range` value naming exactly one byte range; anything else (other units, several
    /// ranges, bad syntax) is `None` and is left to the complete-object path.
    pub fn parse(value: &[u8]) -> Option<ByteRange> {
        let value = std::str::from_utf8(value).ok()?.trim();
        let (unit, spec) = value.split_once('=')?;
        if !unit.trim().eq_ignore_ascii_case("bytes") || spec.contains(',') {
            return None;
        }
        let (first, last) = spec.trim().split_once('-')?;
        let number = |s: &str| -> Option<u64> {
            let s = s.trim();
            (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
                .then(|| s.parse().ok())
                .flatten()
        };
        if first.trim().is_empty() {
            return number(last).filter(|n| *n > 0).map(ByteRange::Suffix);
        }
        let first = number(first)?;
        let last = if last.trim().is_empty() {
            None
        } else {
            Some(number(last)?)
        };
        if last.is_some_and(|l| l < first) {
            return None;
        }
        Some(ByteRange::From { first, last })
    }

    /// A `bytes` range set with its zero-length suffixes (`-0`) left out, when it holds any:
    /// RFC 9110 §14.1.1, "a suffix-range is satisfiable if it has a non-zero suffix-length",
    /// so such a spec is skipped like any unsatisfiable one, and a set of nothing else is
    /// unsatisfiable (416). pingora's parser took `-0` for the empty range at the end and
    /// answered 206 with `Content-Range: bytes 187-186/187`, which no client can read.
    pub fn without_empty_suffixes(value: &[u8]) -> Option<String> {
        let value = std::str::from_utf8(value).ok()?;
        let (unit, set) = value.trim().split_once('=')?;
        let empty_suffix = |spec: &str| {
            spec.trim()
                .strip_prefix('-')
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b == b'0'))
        };
        if !unit.trim().eq_ignore_ascii_case("bytes") || !set.split(',').any(empty_suffix) {
            return None;
        }
        let kept: Vec<&str> = set.split(',').filter(|spec| !empty_suffix(spec)).collect();
        Some(format!("bytes={}", kept.join(",")))
    }

    /// The inclusive byte positions this range names in a representation of `length` bytes,
    /// if it is satisfiable.
    pub fn resolve(self, length: u64) -> Option<(u64, u64)> {
        if length == 0 {
            return None;
        }
        match self {
            ByteRange::From { first, last } if first < length => {
                Some((first, last.map_or(length - 1, |l| l.min(length - 1))))
            }
            ByteRange::From { .. } => None,
            ByteRange::Suffix(n) => Some((length.saturating_sub(n), length - 1)),
        }
    }
}

/// `Content-Range: bytes first-last/complete` of a single-part 206 (RFC 9110 §14.4). An
/// unknown complete length (`*`) is `None`: such a piece cannot be placed.
pub fn content_range(value: &[u8]) -> Option<(u64, u64, u64)> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let rest = value.strip_prefix("bytes ")?;
    let (range, complete) = rest.split_once('/')?;
    let (first, last) = range.split_once('-')?;
    let (first, last, complete): (u64, u64, u64) = (
        first.parse().ok()?,
        last.parse().ok()?,
        complete.parse().ok()?,
    );
    (first <= last && last < complete).then_some((first, last, complete))
}

/// The pieces of one representation.
#[derive(Debug, Clone)]
pub struct Partial {
    /// The header of the representation the pieces are of: the 206's, as a 200, without its
    /// framing and `Content-Range`.
    pub head: ResponseHeader,
    /// Its strong entity tag, the only validator pieces may be combined on (§3.4).
    etag: Option<HeaderValue>,
    pub complete_length: u64,
    /// Disjoint, sorted, and merged where they touch.
    pieces: Vec<(u64, Bytes)>,
    pub created: SystemTime,
    /// The `Age` the newest piece came with.
    pub age_when_heard: AgeWhenHeard,
    pub fresh_until: SystemTime,
}

impl Partial {
    /// The bytes `first..=last`, if one stored piece holds them all.
    fn slice(&self, first: u64, last: u64) -> Option<Bytes> {
        self.pieces.iter().find_map(|(start, bytes)| {
            let end = start + bytes.len() as u64;
            (*start <= first && last < end)
                .then(|| bytes.slice((first - start) as usize..=(last - start) as usize))
        })
    }

    fn bytes(&self) -> u64 {
        self.pieces.iter().map(|(_, b)| b.len() as u64).sum()
    }

    /// Adds a piece at `first`, merging it with the pieces it overlaps or touches.
    fn add(&mut self, first: u64, bytes: Bytes) {
        self.pieces.push((first, bytes));
        self.pieces.sort_by_key(|(start, _)| *start);
        let mut merged: Vec<(u64, Bytes)> = Vec::with_capacity(self.pieces.len());
        for (start, bytes) in self.pieces.drain(..) {
            match merged.last_mut() {
                Some((prev_start, prev)) if *prev_start + prev.len() as u64 >= start => {
                    let prev_end = *prev_start + prev.len() as u64;
                    let end = start + bytes.len() as u64;
                    if end > prev_end {
                        let mut joined = BytesMut::with_capacity((end - *prev_start) as usize);
                        joined.extend_from_slice(prev);
                        joined.extend_from_slice(&bytes[(prev_end - start) as usize..]);
                        *prev = joined.freeze();
                    }
                }
                _ => merged.push((start, bytes)),
            }
        }
        self.pieces = merged;
    }

    /// The whole representation, once the pieces cover it.
    fn complete(&self) -> Option<Bytes> {
        match self.pieces.as_slice() {
            [(0, all)] if all.len() as u64 == self.complete_length => Some(all.clone()),
            _ => None,
        }
    }
}

/// A 206 that may be stored: its header, its place, its body.
pub struct Piece {
    pub head: ResponseHeader,
    pub first: u64,
    pub complete_length: u64,
    pub body: Bytes,
    pub created: SystemTime,
    pub age_when_heard: AgeWhenHeard,
    pub fresh_until: SystemTime,
}

/// The pieces of every representation held partially, bounded in bytes.
pub struct PartialStore {
    entries: moka::sync::Cache<HashBinary, Arc<Partial>>,
}

impl PartialStore {
    pub fn new(capacity_bytes: u64) -> PartialStore {
        PartialStore {
            entries: moka::sync::Cache::builder()
                .max_capacity(capacity_bytes)
                .weigher(|_, p: &Arc<Partial>| u32::try_from(p.bytes() + 512).unwrap_or(u32::MAX))
                .build(),
        }
    }

    /// The stored bytes of `range` of a fresh representation, with its pieces' record.
    pub fn get(
        &self,
        primary: &HashBinary,
        range: ByteRange,
        now: SystemTime,
    ) -> Option<(Arc<Partial>, u64, u64, Bytes)> {
        let partial = self.entries.get(primary)?;
        if partial.fresh_until < now {
            return None;
        }
        let (first, last) = range.resolve(partial.complete_length)?;
        let bytes = partial.slice(first, last)?;
        Some((partial, first, last, bytes))
    }

    /// Stores a piece. Pieces of another representation (another strong `ETag`, another
    /// length, or no strong `ETag` to compare) replace what was held. Returns the whole
    /// representation when the pieces now cover it; the pieces are then dropped, since the
    /// complete copy takes their place.
    pub fn add(&self, primary: HashBinary, piece: Piece) -> Option<(Arc<Partial>, Bytes)> {
        let etag = piece
            .head
            .headers
            .get(http::header::ETAG)
            .filter(|e| !e.as_bytes().starts_with(b"W/"))
            .cloned();
        let mut partial = match self.entries.get(&primary) {
            Some(held)
                if etag.is_some()
                    && held.etag == etag
                    && held.complete_length == piece.complete_length =>
            {
                let mut combined = (*held).clone();
                // The newest piece's header and lifetime speak for the whole (§3.4: "use the
                // header fields provided in the new response").
                combined.head = piece.head;
                combined.created = piece.created;
                combined.age_when_heard = piece.age_when_heard;
                combined.fresh_until = piece.fresh_until;
                combined
            }
            _ => Partial {
                head: piece.head,
                etag,
                complete_length: piece.complete_length,
                pieces: Vec::new(),
                created: piece.created,
                age_when_heard: piece.age_when_heard,
                fresh_until: piece.fresh_until,
            },
        };
        partial.add(piece.first, piece.body);
        if let Some(whole) = partial.complete() {
            self.entries.invalidate(&primary);
            return Some((Arc::new(partial), whole));
        }
        self.entries.insert(primary, Arc::new(partial));
        None
    }

    /// Drops the pieces of a URL. Returns how many representations were dropped.
    pub fn purge(&self, primary: &HashBinary) -> usize {
        usize::from(self.entries.remove(primary).is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_byte_range_is_read_and_resolved() {
        let r = |s: &str| ByteRange::parse(s.as_bytes());
        assert_eq!(r("bytes=-5").and_then(|r| r.resolve(10)), Some((5, 9)));
        assert_eq!(r("bytes=6-8").and_then(|r| r.resolve(10)), Some((6, 8)));
        assert_eq!(r("bytes=6-").and_then(|r| r.resolve(10)), Some((6, 9)));
        assert_eq!(r("bytes=6-99").and_then(|r| r.resolve(10)), Some((6, 9)));
        assert_eq!(r("bytes=-99").and_then(|r| r.resolve(10)), Some((0, 9)));
        assert_eq!(r("bytes=10-").and_then(|r| r.resolve(10)), None);
        for refused in [
            "bytes=1-2,4-5",
            "items=1-2",
            "bytes=5-1",
            "bytes=-0",
            "bytes=a-",
        ] {
            assert_eq!(r(refused), None, "{refused}");
        }
    }

    #[test]
    fn zero_length_suffixes_are_left_out_of_a_range_set() {
        let w = |s: &str| ByteRange::without_empty_suffixes(s.as_bytes());
        assert_eq!(w("bytes=-0").as_deref(), Some("bytes="));
        assert_eq!(w("Bytes = -000").as_deref(), Some("bytes="));
        assert_eq!(w("bytes=0-1, -0,5-").as_deref(), Some("bytes=0-1,5-"));
        for untouched in [
            "bytes=-5",
            "bytes=0-0",
            "bytes=10-",
            "items=-0",
            "bytes=-",
            "-0",
        ] {
            assert_eq!(w(untouched), None, "{untouched}");
        }
    }

    #[test]
    fn a_content_range_places_a_piece() {
        assert_eq!(content_range(b"bytes 4-9/10"), Some((4, 9, 10)));
        for refused in [
            &b"bytes 4-9/*"[..],
            b"bytes 9-4/10",
            b"bytes 4-10/10",
            b"4-9/10",
        ] {
            assert_eq!(content_range(refused), None);
        }
    }

    fn piece(first: u64, body: &'static str, etag: Option<&str>) -> Piece {
        let mut head = ResponseHeader::build(206, None).unwrap();
        if let Some(etag) = etag {
            head.insert_header("etag", etag).unwrap();
        }
        let now = SystemTime::now();
        Piece {
            head,
            first,
            complete_length: 10,
            body: Bytes::from_static(body.as_bytes()),
            created: now,
            age_when_heard: AgeWhenHeard::NONE,
            fresh_until: now + std::time::Duration::from_secs(60),
        }
    }

    #[test]
    fn pieces_with_one_strong_etag_combine_into_the_whole() {
        let store = PartialStore::new(1 << 20);
        let key = [7u8; 16];
        let now = SystemTime::now();
        assert!(store.add(key, piece(4, "456789", Some("\"v1\""))).is_none());
        let (_, first, last, bytes) = store.get(&key, ByteRange::Suffix(3), now).unwrap();
        assert_eq!((first, last, &bytes[..]), (7, 9, &b"789"[..]));
        assert!(store
            .get(
                &key,
                ByteRange::From {
                    first: 0,
                    last: Some(1)
                },
                now
            )
            .is_none());
        let (_, whole) = store.add(key, piece(0, "012345", Some("\"v1\""))).unwrap();
        assert_eq!(&whole[..], b"0123456789");
        assert!(
            store.get(&key, ByteRange::Suffix(3), now).is_none(),
            "dropped once whole"
        );
    }

    #[test]
    fn pieces_of_another_representation_replace_what_was_held() {
        let store = PartialStore::new(1 << 20);
        let key = [8u8; 16];
        let now = SystemTime::now();
        store.add(key, piece(4, "456789", Some("\"v1\"")));
        assert!(store.add(key, piece(0, "012345", Some("\"v2\""))).is_none());
        assert!(store.get(&key, ByteRange::Suffix(3), now).is_none());
        assert!(store
            .get(
                &key,
                ByteRange::From {
                    first: 0,
                    last: Some(2)
                },
                now
            )
            .is_some());
        // No strong validator: nothing to combine on.
        assert!(store.add(key, piece(6, "6789", None)).is_none());
        assert!(store.add(key, piece(0, "012345", None)).is_none());
    }
}
