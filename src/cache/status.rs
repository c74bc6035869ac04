//! What the cache did for one request, as a closed vocabulary. One value is decided per
//! request and reused for the `X-Cache-Status` header (Wikimedia's words), the RFC 9211
//! `Cache-Status` header, access logs and metric labels.

use std::time::SystemTime;

use pingora::cache::CachePhase;

/// Wikimedia's `X-Cache-Status` vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Disposition {
    /// Served from the memory tier.
    HitFront,
    /// Served from the disk tier.
    HitLocal,
    /// Fetched from the origin for the cache.
    Miss,
    /// A stored copy the origin confirmed with 304 (RFC 9111 §4.3.4): served from the cache,
    /// though the origin was asked. Not a hit (the origin answered), not a miss (it sent no
    /// body).
    Revalidated,
    /// Fetched from the origin, not stored: the request or the response may not be cached.
    Pass,
    /// Answered by Skua itself (purges, refusals, origin errors).
    IntFront,
}

impl Disposition {
    pub const ALL: [Disposition; 6] = [
        Disposition::HitFront,
        Disposition::HitLocal,
        Disposition::Miss,
        Disposition::Revalidated,
        Disposition::Pass,
        Disposition::IntFront,
    ];

    /// Position in [`Disposition::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Disposition::HitFront => "hit-front",
            Disposition::HitLocal => "hit-local",
            Disposition::Miss => "miss",
            Disposition::Revalidated => "revalidated",
            Disposition::Pass => "pass",
            Disposition::IntFront => "int-front",
        }
    }
}

/// Why a request went past the cache without using it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassReason {
    /// Not GET or HEAD.
    Method,
    /// A session or token cookie.
    Cookie,
    /// `Authorization` present.
    Authorization,
    /// A `[[rule]]` with `pass`.
    Rule,
}

impl PassReason {
    pub fn as_str(self) -> &'static str {
        match self {
            PassReason::Method => "method",
            PassReason::Cookie => "cookie",
            PassReason::Authorization => "authorization",
            PassReason::Rule => "rule",
        }
    }
}

/// Everything needed to describe one request's cache outcome.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub phase: CachePhase,
    /// Served by the fast path (a fresh memory hit answered before pingora's cache runs).
    pub fast_hit: bool,
    /// The object came from the disk tier.
    pub local_hit: bool,
    pub pass: Option<PassReason>,
    pub internal: bool,
    /// The response was stored (or is being stored) by this request.
    pub stored: bool,
    /// Freshness deadline of the object served, for `ttl=`.
    pub fresh_until: Option<SystemTime>,
    /// The object's freshness was set by a `[[rule]]`'s `ttl`, not by the origin's fields.
    pub ttl_rule: bool,
    /// Status the origin answered a revalidation with.
    pub fwd_status: Option<u16>,
}

impl Outcome {
    /// A fresh memory hit answered before pingora's cache state machine ran.
    pub fn fast_hit(fresh_until: SystemTime) -> Outcome {
        Outcome {
            phase: CachePhase::Uninit,
            fast_hit: true,
            local_hit: false,
            pass: None,
            internal: false,
            stored: false,
            fresh_until: Some(fresh_until),
            ttl_rule: false,
            fwd_status: None,
        }
    }

    pub fn disposition(&self) -> Disposition {
        if self.internal {
            return Disposition::IntFront;
        }
        if self.fast_hit {
            return if self.local_hit {
                Disposition::HitLocal
            } else {
                Disposition::HitFront
            };
        }
        match self.phase {
            CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating if self.local_hit => {
                Disposition::HitLocal
            }
            CachePhase::Hit | CachePhase::Stale | CachePhase::StaleUpdating => {
                Disposition::HitFront
            }
            CachePhase::Revalidated => Disposition::Revalidated,
            CachePhase::Miss | CachePhase::Expired => Disposition::Miss,
            CachePhase::RevalidatedNoCache(_) => Disposition::Pass,
            _ if self.stored => Disposition::Miss,
            _ => Disposition::Pass,
        }
    }

    /// The RFC 9211 `Cache-Status` member for this cache, e.g. `skua; hit; ttl=42` or
    /// `skua; fwd=uri-miss; stored`.
    pub fn cache_status(&self, name: &str, now: SystemTime) -> String {
        let mut s = Vec::with_capacity(48);
        self.write_cache_status(name, now, &mut s);
        // Only `name` (a `str`) and ASCII are written.
        String::from_utf8(s).unwrap_or_default()
    }

    /// [`Outcome::cache_status`] written at the end of `out`: a hit's head is written in place,
    /// with no string of its own.
    pub fn write_cache_status(&self, name: &str, now: SystemTime, out: &mut Vec<u8>) {
        let mut push = |text: &str| out.extend_from_slice(text.as_bytes());
        let mut digits = itoa::Buffer::new();
        push(name);
        let ttl = self.fresh_until.map(|t| match t.duration_since(now) {
            Ok(d) => d.as_secs() as i64,
            // Past its deadline by any fraction: negative, as RFC 9211 §2.3 has stale ttls.
            Err(e) => -(e.duration().as_secs_f64().ceil() as i64),
        });
        match self.disposition() {
            Disposition::HitFront | Disposition::HitLocal => {
                push("; hit");
                if let Some(ttl) = ttl {
                    push("; ttl=");
                    push(digits.format(ttl));
                }
                match self.phase {
                    CachePhase::StaleUpdating => push("; detail=stale-while-revalidate"),
                    CachePhase::Stale => push("; detail=stale-if-error"),
                    // A deliberate deviation from the origin's freshness (RFC 9211 §2.8:
                    // "detail" carries implementation-specific information).
                    _ if self.ttl_rule => push("; detail=ttl-rule"),
                    _ => {}
                }
            }
            Disposition::IntFront => push("; detail=internal"),
            Disposition::Miss | Disposition::Pass | Disposition::Revalidated => {
                // RFC 9211 §2.2 "fwd" values.
                let fwd = match (self.pass, self.phase) {
                    (Some(PassReason::Method), _) => "method",
                    (Some(_), _) => "bypass",
                    (
                        None,
                        CachePhase::Expired
                        | CachePhase::Revalidated
                        | CachePhase::RevalidatedNoCache(_),
                    ) => "stale",
                    (None, _) => "uri-miss",
                };
                push("; fwd=");
                push(fwd);
                if let Some(code) = self.fwd_status {
                    push("; fwd-status=");
                    push(digits.format(code));
                }
                if self.stored {
                    push("; stored");
                    if let Some(ttl) = ttl {
                        push("; ttl=");
                        push(digits.format(ttl));
                    }
                }
                if let Some(p) = self.pass {
                    push("; detail=");
                    push(p.as_str());
                } else if self.stored && self.ttl_rule {
                    push("; detail=ttl-rule");
                }
            }
        }
    }
}
