//! Hit-for-miss: the URLs whose last answer could not be stored, remembered so that the next
//! miss on one goes to the origin at once instead of queueing on the cache lock behind another
//! reader's fetch (what Varnish's built-in VCL makes a "hit-for-miss" object for, 120 s). It
//! owns that memory only: whether a response may be stored is `policy`'s to say, and the lock
//! is pingora's.
//!
//! Why: the cache lock collapses concurrent misses for one object into one origin fetch. For
//! an answer that is never stored it only serialises them: every reader waits for the first
//! one's answer head, is told the fill gave up, and then goes to the origin itself. Measured
//! before this module: ten concurrent readers of a `private` page behind an origin taking
//! 300 ms were answered in 610 ms, wave after wave.
//!
//! What a mark does not do is skip the lookup (pingora's own predictor does, so one reader's
//! `private` answer would make the next reader of the URL miss a stored variant and replace
//! it). A copy found is served or revalidated under the lock as ever, and a miss whose answer
//! can be stored is stored and clears the mark. So a mark costs, at worst, one wave of misses
//! that are not collapsed; it never costs a hit. Marks are not timed out for that reason: the
//! next storable answer ends one, and the least recently marked go first when the table is
//! full.

use pingora::cache::hashtable::ConcurrentLruCache;
use pingora::cache::key::HashBinary;

use super::policy::Uncacheable;

const SHARDS: usize = 16;

/// URLs remembered per shard: 65,536 in all, about 3 MiB at most.
const PER_SHARD: usize = 4096;

pub struct HitForMiss {
    urls: ConcurrentLruCache<(), SHARDS>,
}

impl Default for HitForMiss {
    fn default() -> Self {
        HitForMiss {
            urls: ConcurrentLruCache::new(PER_SHARD),
        }
    }
}

/// What became of an answer, as far as its URL's mark goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Storability {
    /// Stored, or storable.
    Storable,
    /// Refused by the storage policy, with the answer's status.
    Refused(Uncacheable, u16),
    /// Storable but larger than the largest object (`[cache] max_object_size`).
    TooLarge,
}

impl HitForMiss {
    /// Whether the last answer for the URL of `primary` could not be stored.
    pub fn remembered(&self, primary: &HashBinary) -> bool {
        let key = u128::from_be_bytes(*primary);
        self.urls.read(key).peek(&key).is_some()
    }

    /// Notes what became of an answer for the URL of `primary`.
    pub fn answered(&self, primary: &HashBinary, answer: Storability) {
        let key = u128::from_be_bytes(*primary);
        let mark = match answer {
            Storability::Refused(reason, status) => says_the_url_is_uncacheable(reason, status),
            Storability::TooLarge => true,
            Storability::Storable => false,
        };
        if mark {
            self.urls.write(key).put(key, ());
        } else if matches!(answer, Storability::Storable) && self.urls.read(key).contains(&key) {
            // Read first: a stored answer is the common case, and rarely has a mark to end.
            self.urls.write(key).pop(&key);
        }
    }
}

/// Whether a refusal speaks for the URL rather than for this one request or moment. An
/// origin's 5xx is its trouble now, and readers already go to it one by one once the filling
/// reader gives up; a mark would only stop the misses after its recovery from collapsing.
/// `Authorization` speaks for the request alone (RFC 9111 §3.5).
fn says_the_url_is_uncacheable(reason: Uncacheable, status: u16) -> bool {
    match reason {
        Uncacheable::Status => status < 500,
        Uncacheable::Authorization | Uncacheable::RequestNoStore | Uncacheable::FillMemory => false,
        Uncacheable::NoStore
        | Uncacheable::Private
        | Uncacheable::SetCookie
        | Uncacheable::VaryStar
        | Uncacheable::NoFreshness => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_marks_the_url_and_a_stored_answer_ends_the_mark() {
        let marks = HitForMiss::default();
        let page = [7u8; 16];
        let other = [8u8; 16];
        assert!(!marks.remembered(&page));
        marks.answered(&page, Storability::Refused(Uncacheable::Private, 200));
        assert!(marks.remembered(&page));
        assert!(!marks.remembered(&other));
        marks.answered(&page, Storability::Storable);
        assert!(!marks.remembered(&page));
    }

    #[test]
    fn an_origin_error_or_credentials_mark_nothing() {
        let marks = HitForMiss::default();
        let page = [7u8; 16];
        marks.answered(&page, Storability::Refused(Uncacheable::Status, 503));
        marks.answered(&page, Storability::Refused(Uncacheable::Authorization, 200));
        assert!(!marks.remembered(&page));
        marks.answered(&page, Storability::Refused(Uncacheable::NoFreshness, 403));
        assert!(marks.remembered(&page));
    }

    #[test]
    fn the_table_is_bounded_and_keeps_the_latest_marks() {
        let marks = HitForMiss::default();
        let url = |i: u32| {
            let mut primary = [0u8; 16];
            primary[..4].copy_from_slice(&i.to_be_bytes());
            primary[12..].copy_from_slice(&i.to_be_bytes());
            primary
        };
        let total = (SHARDS * PER_SHARD) as u32 * 2;
        for i in 0..total {
            marks.answered(&url(i), Storability::TooLarge);
        }
        let kept = (0..total).filter(|&i| marks.remembered(&url(i))).count();
        assert!(kept <= SHARDS * PER_SHARD, "{kept}");
        assert!(marks.remembered(&url(total - 1)));
    }
}
