//! Vary (RFC 9111 §4.1): which request headers select among stored variants of one URL.
//!
//! Two headers get wiki-specific treatment. `Accept-Encoding` is reduced to the copies the
//! cache keeps, both in the variant key and in the request sent to the origin: one for clients
//! that take brotli, one (gzip where the type compresses) for everyone else, decompressed on
//! the way out for the rare client that takes neither. Browsers with a hundred different
//! Accept-Encoding strings share those two copies, and where the origin answers brotli clients
//! in gzip (it does not compress to brotli) they are one copy ([`copy_for`]).
//! `Cookie`: requests carrying a session cookie never reach the cache (see the proxy's bypass).
//! On the others, only the cookies `[cache] vary_cookies` names are kept ([`kept_cookies`]):
//! those are what the origin receives and what a `Vary: Cookie` variant is keyed on, so
//! anonymous readers share one copy, as on Wikimedia's edge, and the key and the request the
//! origin answered always agree.

use http::HeaderValue;
use pingora::cache::key::HashBinary;
use pingora::cache::VarianceBuilder;
use pingora::http::ResponseHeader;

use super::fields::RequestFields;
use super::policy::vary_names;

/// The copies of a varying response the cache keeps, by what the client accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    /// Clients that take brotli (`br`).
    Brotli,
    /// Everyone else: gzip where the origin or Skua compressed it, decompressed for a client
    /// that does not take gzip either.
    Gzip,
}

impl Encoding {
    pub fn as_str(self) -> &'static str {
        match self {
            Encoding::Brotli => "br",
            Encoding::Gzip => "gzip",
        }
    }
}

/// Whether a request accepts `coding` (RFC 9110 §12.5.3: acceptable unless its qvalue is 0;
/// `x-gzip` is gzip).
pub fn accepts<F: RequestFields + ?Sized>(req: &F, coding: &str) -> bool {
    for value in req.values("accept-encoding") {
        let Ok(value) = std::str::from_utf8(value) else {
            continue;
        };
        for item in value.split(',') {
            let mut parts = item.split(';');
            let name = parts.next().unwrap_or("").trim();
            let same = name.eq_ignore_ascii_case(coding)
                || (coding == "gzip" && name.eq_ignore_ascii_case("x-gzip"));
            if !same {
                continue;
            }
            let q_zero = parts.any(|p| {
                let p = p.trim();
                (p.starts_with("q=") || p.starts_with("Q="))
                    && p[2..].trim().parse::<f32>().is_ok_and(|q| q <= 0.0)
            });
            if !q_zero {
                return true;
            }
        }
    }
    false
}

/// The copy a request is served from.
pub fn normalize_accept_encoding<F: RequestFields + ?Sized>(req: &F) -> Encoding {
    if accepts(req, "br") {
        Encoding::Brotli
    } else {
        Encoding::Gzip
    }
}

/// Marks pingora's metadata of a copy whose origin, offered brotli, answered in another
/// coding (the fact [`declines_brotli`] finds; see [`copy_for`]). Skua's tiers put it back on
/// the metadata they rebuild.
#[derive(Debug, Clone, Copy)]
pub struct BrotliDeclined;

/// Whether `meta` is marked [`BrotliDeclined`].
pub fn brotli_declined(meta: &pingora::cache::CacheMeta) -> bool {
    meta.extensions().get::<BrotliDeclined>().is_some()
}

/// Whether a response that varies on `Accept-Encoding`, fetched for `req` and stored with the
/// head `stored` (after Skua's own compression), is a copy the origin made for brotli clients
/// in another coding: gzip from an origin that does not compress to brotli (Apache's
/// mod_deflate and nginx's gzip, as shipped), or no coding at all where nothing compresses.
pub fn declines_brotli<F: RequestFields + ?Sized>(stored: &ResponseHeader, req: &F) -> bool {
    // The request's `Accept-Encoding` last: reading it is the dearest of the three (about
    // 1,400 instructions through the front door's view of the forwarded request), and most
    // responses do not vary on it.
    vary_names(stored).any(|n| n == "accept-encoding")
        && !is_brotli(stored)
        && normalize_accept_encoding(req) == Encoding::Brotli
}

/// Marks `meta`, the metadata of an answer about to be stored for `req`, as
/// [`BrotliDeclined`] when it is: the origin, offered brotli, answered in another coding
/// ([`declines_brotli`]); or the stale copy it replaces (`stale`) was so marked and the origin,
/// not offered brotli this time (a client that does not take it revalidated or fetched it
/// again), still did not send brotli. Only brotli clients' fetches decide it anew. Returns the
/// mark.
pub fn mark_brotli_declined<F: RequestFields + ?Sized>(
    meta: &mut pingora::cache::CacheMeta,
    req: &F,
    stale: Option<&pingora::cache::CacheMeta>,
) -> bool {
    let answer = meta.response_header();
    let declined = declines_brotli(answer, req)
        || stale.is_some_and(|stale| brotli_declined(stale) && !is_brotli(answer));
    if declined {
        meta.extensions_mut().insert(BrotliDeclined);
    }
    declined
}

/// Whether a response's content is coded in brotli.
fn is_brotli(resp: &ResponseHeader) -> bool {
    (resp.headers.get_all(http::header::CONTENT_ENCODING).iter())
        .any(|v| v.as_bytes().trim_ascii().eq_ignore_ascii_case(b"br"))
}

/// The copy a request is served from, given what the URL's stored copy says of its origin:
/// once the origin answered brotli clients in another coding, the other clients' copy is the
/// same bytes, so both kinds of client share one copy (one origin fetch and one object where
/// there were two). A client that takes neither coding has it decoded on the way out.
pub fn copy_for<F: RequestFields + ?Sized>(req: &F, brotli_declined: bool) -> Encoding {
    if brotli_declined {
        Encoding::Gzip
    } else {
        normalize_accept_encoding(req)
    }
}

/// The `Accept-Encoding` sent to the origin for a copy: what that copy may be in. With brotli
/// among the encodings Skua compresses to, its clients' copy asks for brotli first (the origin
/// may still answer gzip, which those clients take too).
pub fn upstream_accept_encoding(copy: Encoding, brotli_kept: bool) -> &'static str {
    match copy {
        Encoding::Brotli if brotli_kept => "br, gzip",
        _ => "gzip",
    }
}

/// The variant key of `req` against a stored response's `Vary`, or `None` if it has none;
/// `brotli_declined` as the response's metadata says ([`copy_for`]).
pub fn variance<F: RequestFields + ?Sized>(
    stored: &ResponseHeader,
    brotli_declined: bool,
    req: &F,
) -> Option<HashBinary> {
    let mut names: Vec<String> = vary_names(stored).collect();
    names.sort();
    names.dedup();
    variance_for(&names, brotli_declined, req)
}

/// As [`variance`], from the response's `Vary` names already lowercased, sorted and
/// deduplicated (what a stored object keeps).
pub fn variance_for<F: RequestFields + ?Sized>(
    names: &[String],
    brotli_declined: bool,
    req: &F,
) -> Option<HashBinary> {
    if names.is_empty() {
        return None;
    }
    let mut builder = VarianceBuilder::new();
    for name in names {
        match name.as_str() {
            "accept-encoding" => builder.add_value(name, copy_for(req, brotli_declined).as_str()),
            // Cookie is already reduced to the kept cookies, sorted (`kept_cookies`).
            other => match already_normal(req, other) {
                // The common case, on every hit of a varying page: no copy.
                Some(value) => builder.add_value(name, value),
                None => builder.add_owned_value(name, normalized_value(req, other)),
            },
        }
    }
    builder.finalize()
}

/// A field's value when [`normalized_value`] would return it unchanged: absent, or one line
/// that is one list member without surrounding whitespace.
fn already_normal<'a, F: RequestFields + ?Sized>(req: &'a F, name: &'a str) -> Option<&'a [u8]> {
    let mut lines = req.values(name);
    let Some(value) = lines.next() else {
        return Some(b"");
    };
    let single = lines.next().is_none()
        && memchr::memchr(b',', value).is_none()
        && value.trim_ascii().len() == value.len();
    single.then_some(value)
}

/// The `Cookie` header a cacheable request keeps: the pairs whose names `[cache]
/// vary_cookies` lists, in name order so that one set of values is one
/// variant, or `None` when none is left. Every `Cookie` line counts (RFC 6265 §5.4 sends one;
/// HTTP/2 may split it).
pub fn kept_cookies<F: RequestFields + ?Sized>(req: &F, allowed: &[String]) -> Option<HeaderValue> {
    if allowed.is_empty() {
        return None;
    }
    let mut kept: Vec<(&[u8], &[u8])> = req
        .values("cookie")
        .flat_map(|v| v.split(|b| *b == b';'))
        .filter_map(|pair| {
            let pair = pair.trim_ascii();
            let name = pair.split(|b| *b == b'=').next()?.trim_ascii();
            allowed
                .iter()
                .any(|a| a.as_bytes() == name)
                .then_some((name, pair))
        })
        .collect();
    if kept.is_empty() {
        return None;
    }
    kept.sort_by(|a, b| a.0.cmp(b.0));
    let mut value = Vec::new();
    for (i, (_, pair)) in kept.iter().enumerate() {
        if i > 0 {
            value.extend_from_slice(b"; ");
        }
        value.extend_from_slice(pair);
    }
    HeaderValue::from_bytes(&value).ok()
}

/// A request field's value as a variant key compares it (RFC 9111 §4.1: "normalizing both
/// header field values in a way that is known to have identical semantics"): every line and
/// list member in order, without the whitespace around members, so `de, fr`, `de,fr` and two
/// lines `de` and `fr` select one variant. The members' order is kept: it can carry meaning
/// (a language preference).
fn normalized_value<F: RequestFields + ?Sized>(req: &F, name: &str) -> Vec<u8> {
    let mut joined = Vec::new();
    let members = req
        .values(name)
        .flat_map(|v| v.split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|m| !m.is_empty());
    for (i, member) in members.enumerate() {
        if i > 0 {
            joined.push(b',');
        }
        joined.extend_from_slice(member);
    }
    joined
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{header, HeaderMap};
    use pingora::http::RequestHeader;

    fn req(headers: &[(&str, &str)]) -> HeaderMap {
        let mut r = RequestHeader::build("GET", b"/", None).unwrap();
        for (k, v) in headers {
            r.append_header(k.to_string(), *v).unwrap();
        }
        r.headers.clone()
    }

    fn stored(vary: &str) -> ResponseHeader {
        let mut r = ResponseHeader::build(200, None).unwrap();
        r.append_header("vary", vary).unwrap();
        r
    }

    #[test]
    fn accept_encoding_is_normalised() {
        assert_eq!(
            normalize_accept_encoding(&req(&[("accept-encoding", "gzip, deflate, br")])),
            Encoding::Brotli
        );
        assert_eq!(
            normalize_accept_encoding(&req(&[("accept-encoding", "br;q=0, gzip")])),
            Encoding::Gzip
        );
        assert_eq!(normalize_accept_encoding(&req(&[])), Encoding::Gzip);
        assert!(accepts(&req(&[("accept-encoding", "x-gzip")]), "gzip"));
        assert!(!accepts(&req(&[("accept-encoding", "gzip;q=0")]), "gzip"));
        let s = stored("Accept-Encoding");
        assert_eq!(
            variance(
                &s,
                false,
                &req(&[("accept-encoding", "gzip, deflate, br, zstd")])
            ),
            variance(&s, false, &req(&[("accept-encoding", "br")]))
        );
        // A client that takes neither shares the gzip copy (decompressed for it).
        assert_eq!(
            variance(&s, false, &req(&[("accept-encoding", "gzip")])),
            variance(&s, false, &req(&[]))
        );
        assert_ne!(
            variance(&s, false, &req(&[("accept-encoding", "gzip")])),
            variance(&s, false, &req(&[("accept-encoding", "br")]))
        );
        // Once the origin answered brotli clients in another coding, they share the others' copy.
        assert_eq!(
            variance(&s, true, &req(&[("accept-encoding", "gzip, deflate, br")])),
            variance(&s, false, &req(&[("accept-encoding", "gzip")]))
        );
    }

    #[test]
    fn a_copy_for_brotli_clients_in_another_coding_declines_brotli() {
        let br = req(&[("accept-encoding", "gzip, deflate, br")]);
        let gzip = req(&[("accept-encoding", "gzip")]);
        let mut answer = stored("Accept-Encoding");
        assert!(declines_brotli(&answer, &br));
        assert!(!declines_brotli(&answer, &gzip), "never offered brotli");
        answer.insert_header("content-encoding", "gzip").unwrap();
        assert!(declines_brotli(&answer, &br));
        answer.insert_header("content-encoding", "br").unwrap();
        assert!(!declines_brotli(&answer, &br));
        let mut not_varying = ResponseHeader::build(200, None).unwrap();
        not_varying
            .insert_header("content-encoding", "gzip")
            .unwrap();
        assert!(!declines_brotli(&not_varying, &br), "one copy anyway");
    }

    /// The request as forwarded: its `Cookie` reduced to the kept cookies.
    fn forwarded(cookies: &[&str], allowed: &[&str]) -> HeaderMap {
        let allowed: Vec<String> = allowed.iter().map(|a| a.to_string()).collect();
        let lines: Vec<(&str, &str)> = cookies.iter().map(|c| ("cookie", *c)).collect();
        let mut headers = req(&lines);
        let kept = kept_cookies(&headers, &allowed);
        headers.remove(header::COOKIE);
        if let Some(kept) = kept {
            headers.insert(header::COOKIE, kept);
        }
        headers
    }

    #[test]
    fn anonymous_cookies_share_a_variant() {
        let s = stored("Accept-Encoding, Cookie");
        assert_eq!(
            variance(&s, false, &forwarded(&["centralnotice=1"], &[])),
            variance(&s, false, &req(&[]))
        );
    }

    #[test]
    fn kept_cookies_are_the_variant_whatever_their_order() {
        let allowed = ["skin", "lang"];
        let s = stored("Cookie");
        let one = forwarded(&["a=1; lang=de; skin=dark; b=2"], &allowed);
        assert_eq!(
            one.get(header::COOKIE).unwrap(),
            "lang=de; skin=dark",
            "only the kept cookies, by name"
        );
        let other_order = forwarded(&["skin=dark", "tracking=9;lang=de"], &allowed);
        assert_eq!(variance(&s, false, &one), variance(&s, false, &other_order));
        let other_value = forwarded(&["lang=fr; skin=dark"], &allowed);
        assert_ne!(variance(&s, false, &one), variance(&s, false, &other_value));
        assert!(forwarded(&["Lang=de; langx=1"], &allowed)
            .get(header::COOKIE)
            .is_none());
    }

    #[test]
    fn whitespace_and_line_breaks_do_not_make_a_variant() {
        let s = stored("accept-language, ACCEPT-LANGUAGE");
        let one = variance(&s, false, &req(&[("accept-language", "de, fr")]));
        assert_eq!(
            one,
            variance(&s, false, &req(&[("accept-language", "de,fr")]))
        );
        assert_eq!(
            one,
            variance(&s, false, &req(&[("accept-language", " de ,  fr ")]))
        );
        assert_eq!(
            one,
            variance(
                &s,
                false,
                &req(&[("accept-language", "de"), ("accept-language", "fr")])
            )
        );
        assert_eq!(
            one,
            variance(
                &stored("Accept-Language"),
                false,
                &req(&[("accept-language", "de,fr")])
            )
        );
        assert_ne!(
            one,
            variance(&s, false, &req(&[("accept-language", "fr, de")]))
        );
        // A value taken as it is (one member, no whitespace) keys like one normalised to it.
        let de = variance(&s, false, &req(&[("accept-language", "de")]));
        assert_eq!(
            de,
            variance(&s, false, &req(&[("accept-language", " de ")]))
        );
        assert_eq!(de, variance(&s, false, &req(&[("accept-language", "de,")])));
        assert_ne!(de, one);
        let absent = variance(&s, false, &req(&[]));
        assert_eq!(
            absent,
            variance(&s, false, &req(&[("accept-language", " ")]))
        );
        assert_ne!(absent, de);
    }

    #[test]
    fn other_headers_vary_by_value() {
        let s = stored("Accept-Language");
        assert_ne!(
            variance(&s, false, &req(&[("accept-language", "de")])),
            variance(&s, false, &req(&[("accept-language", "fr")]))
        );
        assert_eq!(variance(&stored(""), false, &req(&[])), None);
    }
}
