//! "Why was this a miss?": the `Skua-Debug` response field. A request carrying
//! `Skua-Debug: 1` from a client the purge rules allow (`[purge] allow`, and the token when
//! one is set: the same judgement as a PURGE) gets a field that explains what the cache did:
//! the canonical key and variant, which tier answered, the freshness arithmetic (age,
//! lifetime, what set it, whether `ttl_cap` cut it), why a response was not stored, the rules
//! that decided the request, and the purges and bans on record for the URL. Any other client's
//! `Skua-Debug` is ignored and the field never sent. Gathering the facts along the request
//! path belongs to `super` (`RequestCtx::debug`); this writes them.
//!
//! The field is one line of `name=value` pairs separated by `; ` (values with spaces or `;`
//! quoted), e.g. `key="http://en.wiki.test/wiki/Main_Page"; variant=none; answer=miss;
//! stored=yes; lifetime=300s; from=s-maxage; rules=none; purged=none`.

use std::fmt::Write;
use std::time::{Duration, SystemTime};

use http::HeaderName;

/// The field's name, as text: a `HeaderName` constant of a custom name is built and dropped
/// wherever it is used.
pub const NAME: &str = "skua-debug";
pub const SKUA_DEBUG: HeaderName = HeaderName::from_static(NAME);

/// Whether the request asks for an explanation (`Skua-Debug: 1`); whether it may have one is
/// the purge rules' to say.
pub fn asked(headers: &http::HeaderMap) -> bool {
    headers
        .get(SKUA_DEBUG)
        .is_some_and(|v| v.as_bytes() == b"1")
}

/// What the request path learned for the explanation.
#[derive(Debug, Default, Clone)]
pub struct Facts {
    /// The rules that decided something, `kind:name`.
    pub rules: Vec<String>,
    /// Why the response was not stored (`skua_uncacheable_total`'s reason).
    pub not_stored: Option<&'static str>,
    /// A stored response's lifetime and what set it.
    pub stored: Option<Stored>,
}

/// A stored response's lifetime, what set it, the cap that cut it (`ttl_cap`, `ttl_cap_404`)
/// and what `ttl_jitter` took off it.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub lifetime: Duration,
    pub from: &'static str,
    pub capped: Option<&'static str>,
    pub jitter: Duration,
}

/// A copy served from the cache: when it was made (Age's reference), when its freshness ends,
/// and what set its lifetime (and the cap that cut it) when that can be said.
#[derive(Debug, Clone, Copy)]
pub struct Copy {
    pub made: SystemTime,
    pub fresh_until: SystemTime,
    pub from: Option<(&'static str, Option<&'static str>)>,
}

/// What the response side knows when it writes the field.
pub struct Answer<'a> {
    pub key: Option<String>,
    pub variant: Option<String>,
    /// `X-Cache-Status` (hit-front, hit-local, miss, revalidated, pass, int-front).
    pub disposition: &'static str,
    /// pingora's cache phase (`CachePhase::as_str`).
    pub phase: &'static str,
    /// Why the request went past the cache, if it did.
    pub pass: Option<&'static str>,
    /// For a copy served from the cache.
    pub copy: Option<Copy>,
    pub purged_at: Option<SystemTime>,
    pub banned: bool,
    pub now: SystemTime,
    pub facts: &'a Facts,
}

fn seconds(d: Duration) -> String {
    format!("{}s", d.as_secs())
}

fn quoted(value: &str) -> String {
    if value.contains([' ', ';', '"', ',']) {
        format!("\"{}\"", value.replace(['"', '\\'], "_"))
    } else {
        value.to_string()
    }
}

/// The field's value.
pub fn explain(a: &Answer<'_>) -> String {
    let mut out = String::new();
    let mut pair = |name: &str, value: String| {
        if !out.is_empty() {
            out.push_str("; ");
        }
        let _ = write!(out, "{name}={value}");
    };
    pair("key", quoted(a.key.as_deref().unwrap_or("none")));
    pair(
        "variant",
        a.variant.clone().unwrap_or_else(|| "none".into()),
    );
    pair("answer", a.disposition.to_string());
    pair("phase", a.phase.to_string());
    if let Some(why) = a.pass {
        pair("pass", why.to_string());
    }
    if let Some(Copy {
        made: created,
        fresh_until,
        from,
    }) = a.copy
    {
        let age = a.now.duration_since(created).unwrap_or_default();
        let lifetime = fresh_until.duration_since(created).unwrap_or_default();
        pair("age", seconds(age));
        pair("lifetime", seconds(lifetime));
        match fresh_until.duration_since(a.now) {
            Ok(left) => pair("fresh_for", seconds(left)),
            Err(past) => pair("stale_by", seconds(past.duration())),
        }
        if let Some((from, capped)) = from {
            pair("from", from.to_string());
            if let Some(cap) = capped {
                pair("capped", cap.into());
            }
        }
    }
    match (a.facts.stored, a.facts.not_stored) {
        (Some(stored), _) => {
            pair("stored", "yes".into());
            pair("lifetime", seconds(stored.lifetime));
            pair("from", stored.from.to_string());
            if let Some(cap) = stored.capped {
                pair("capped", cap.into());
            }
            if !stored.jitter.is_zero() {
                pair("ttl_jitter", format!("-{}", seconds(stored.jitter)));
            }
        }
        (None, Some(why)) => pair("stored", format!("no ({why})")),
        (None, None) => {}
    }
    let rules = if a.facts.rules.is_empty() {
        "none".to_string()
    } else {
        quoted(&a.facts.rules.join(","))
    };
    pair("rules", rules);
    let purged = a.purged_at.map_or("none".to_string(), |at| {
        let ago = a.now.duration_since(at).unwrap_or_default();
        format!("{}_ago", seconds(ago))
    });
    pair("purged", purged);
    if a.banned {
        pair("ban", "applies".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stale_hit_says_its_age_lifetime_and_how_stale() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000);
        let facts = Facts {
            rules: vec!["cache:numbered diffs".into()],
            ..Facts::default()
        };
        let text = explain(&Answer {
            key: Some("http://wiki.test/wiki/A".into()),
            variant: None,
            disposition: "hit-front",
            phase: "stale",
            pass: None,
            copy: Some(Copy {
                made: now - Duration::from_secs(70),
                fresh_until: now - Duration::from_secs(10),
                from: Some(("max-age", None)),
            }),
            purged_at: None,
            banned: false,
            now,
            facts: &facts,
        });
        assert_eq!(
            text,
            "key=http://wiki.test/wiki/A; variant=none; answer=hit-front; phase=stale; age=70s; \
             lifetime=60s; stale_by=10s; from=max-age; rules=\"cache:numbered diffs\"; purged=none"
        );
    }
}
