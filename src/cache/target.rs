//! One spelling per request target (RFC 3986 §6.2.2), so that every spelling of a URL finds,
//! and every purge removes, the same object: `/wiki/%50age1`, `/wiki/./Page1` and
//! `/wiki/Page1?` are `/wiki/Page1`, and `/wiki/Café` (UTF-8 sent as it is) is
//! `/wiki/Caf%C3%A9`, as MediaWiki names the page in its purges. Only rewrites that cannot
//! change the resource are made;
//! `//` and encoded reserved characters (`%2F`, `%3F`) stay, since an origin may treat them
//! as different resources. What the key uses is also what the origin is sent.

use std::borrow::Cow;

/// The normal form of an origin-form target (path and optional query, no fragment):
/// - percent-encoded unreserved characters decoded, and other escapes' hex digits in upper
///   case (RFC 3986 §6.2.2.1, §6.2.2.2);
/// - bytes no URI may hold as they are ([`needs_escape`]) percent-encoded, their one URI
///   spelling (RFC 3987 §3.1 maps an IRI's UTF-8 octets so);
/// - dot segments removed from the path (§6.2.2.3, the algorithm of §5.2.4);
/// - an empty query dropped (`/a?` is `/a`; §6.2.3 lets a scheme-based normaliser do so for
///   http, whose URIs compare equal with and without an empty query only by that rule).
///
/// Borrows when the target is already normal, which the common one is, and leaves a target
/// with a `%` that starts no escape as it is: it is no URI (RFC 3986 §2.1), and decoding around
/// it could make a new escape of it (found by the `cache_key` fuzz target: `%%62` became
/// `%b`, then `%B`).
pub fn normalize(target: &str) -> Cow<'_, str> {
    if is_normal(target) || has_stray_percent(target) {
        return Cow::Borrowed(target);
    }
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut out = remove_dot_segments(&percent_normal(path));
    if let Some(q) = query.filter(|q| !q.is_empty()) {
        out.push('?');
        out.push_str(&percent_normal(q));
    }
    Cow::Owned(out)
}

/// Whether `normalize` would leave `target` as it is: no escapes, no dot segment, no empty
/// query. A byte scan, for the hit path.
fn is_normal(target: &str) -> bool {
    let bytes = target.as_bytes();
    if bytes.last() == Some(&b'?') {
        return false;
    }
    // One pass: a request target is short, and this runs for every request (three `memchr`
    // scans cost more than the bytes they skip). Most bytes are none of those looked at:
    // one table lookup passes them.
    let mut in_path = true;
    for (i, b) in bytes.iter().enumerate() {
        if !LOOKED_AT[usize::from(*b)] {
            continue;
        }
        match b {
            b'%' => return false,
            b'?' => in_path = false,
            // A dot segment starts right after a slash: "/." followed by "/", "./", ".", or
            // the end.
            b'.' if in_path
                && i > 0
                && bytes[i - 1] == b'/'
                && matches!(
                    &bytes[i + 1..],
                    [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..] | [b'?', ..] | [b'.', b'?', ..]
                ) =>
            {
                return false
            }
            b'.' => {}
            _ => return false,
        }
    }
    true
}

/// The bytes [`is_normal`] looks at: `%`, `?`, `.` and those that [`needs_escape`].
static LOOKED_AT: [bool; 256] = {
    let mut looked = [false; 256];
    let mut b = 0;
    while b < 256 {
        looked[b] = matches!(b as u8, b'%' | b'?' | b'.') || needs_escape(b as u8);
        b += 1;
    }
    looked
};

fn has_stray_percent(target: &str) -> bool {
    let bytes = target.as_bytes();
    memchr::memchr_iter(b'%', bytes).any(|i| {
        !(bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
            && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit))
    })
}

fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// A byte a request target may arrive with but no URI holds as it is (RFC 3986 §2: neither
/// reserved, unreserved nor `%`): non-ASCII (UTF-8 a client did not encode) and the ASCII
/// characters left out of URIs. Browsers send some of them as they are (WHATWG URL's path
/// set leaves `^` and `|` alone), while MediaWiki's purges encode them (`wfUrlencode`).
/// Regression: `/wiki/Café` sent as UTF-8 was an object of its own, which MediaWiki's purge
/// of `/wiki/Caf%C3%A9` never reached. Spaces and control characters are refused earlier.
const fn needs_escape(b: u8) -> bool {
    b >= 0x80
        || matches!(
            b,
            b'"' | b'<' | b'>' | b'\\' | b'^' | b'`' | b'{' | b'|' | b'}'
        )
}

/// The byte an escape at `at` (`%` and two hex digits) stands for; `None` when none starts
/// there.
pub fn escaped_byte(bytes: &[u8], at: usize) -> Option<u8> {
    if bytes.get(at) != Some(&b'%') {
        return None;
    }
    let hex = |at: usize| bytes.get(at).and_then(|b| char::from(*b).to_digit(16));
    Some((hex(at + 1)? * 16 + hex(at + 2)?) as u8)
}

/// Decodes escapes of unreserved characters, upper-cases the hex digits of the others, and
/// encodes the bytes that [`needs_escape`]. Every `%` starts an escape here (see
/// [`normalize`]).
fn percent_normal(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < bytes.len() {
        if let Some(decoded) = escaped_byte(bytes, i) {
            if is_unreserved(decoded) {
                out.push(decoded);
            } else {
                out.push(b'%');
                out.push(bytes[i + 1].to_ascii_uppercase());
                out.push(bytes[i + 2].to_ascii_uppercase());
            }
            i += 3;
        } else if needs_escape(bytes[i]) {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            let b = bytes[i];
            out.extend_from_slice(&[b'%', HEX[usize::from(b >> 4)], HEX[usize::from(b & 15)]]);
            i += 1;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    // Escapes were rewritten into ASCII and whole UTF-8 sequences encoded: the text stays
    // UTF-8, and the buffer becomes the string without a copy.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// RFC 3986 §5.2.4, on a path that starts with `/`.
fn remove_dot_segments(path: &str) -> String {
    let mut segments: Vec<&str> = Vec::new();
    // Every segment after the leading slash; the last one may be empty (a trailing slash).
    let mut rest = path.strip_prefix('/').unwrap_or(path).split('/').peekable();
    let mut trailing_slash = false;
    while let Some(segment) = rest.next() {
        let last = rest.peek().is_none();
        match segment {
            "." => trailing_slash = last,
            ".." => {
                segments.pop();
                trailing_slash = last;
            }
            s => {
                segments.push(s);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(path.len());
    for s in &segments {
        out.push('/');
        out.push_str(s);
    }
    if trailing_slash || out.is_empty() {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{is_normal, normalize};

    /// The one-pass `is_normal` says what the three-scan version before it said, on every
    /// short target over the bytes that matter.
    #[test]
    fn is_normal_agrees_with_its_three_scan_version() {
        fn three_scans(target: &str) -> bool {
            let bytes = target.as_bytes();
            if bytes.last() == Some(&b'?') || bytes.contains(&b'%') {
                return false;
            }
            let path_end = bytes.iter().position(|b| *b == b'?').unwrap_or(bytes.len());
            let path = &bytes[..path_end];
            !(0..path.len()).any(|dot| {
                path[dot] == b'.'
                    && dot > 0
                    && path[dot - 1] == b'/'
                    && matches!(
                        &path[dot + 1..],
                        [] | [b'/', ..] | [b'.'] | [b'.', b'/', ..]
                    )
            })
        }
        let alphabet = ["/", ".", "?", "%", "a"];
        let mut targets = vec![String::new()];
        for _ in 0..6 {
            targets = targets
                .iter()
                .flat_map(|t| alphabet.iter().map(move |c| format!("{t}{c}")))
                .collect();
            for t in &targets {
                let t = format!("/{t}");
                assert_eq!(is_normal(&t), three_scans(&t), "{t:?}");
            }
        }
    }

    #[test]
    fn spellings_of_one_resource_have_one_form() {
        for spelling in [
            "/wiki/Page1",
            "/wiki/%50age1",
            "/wiki/%50%61ge1",
            "/wiki/./Page1",
            "/wiki/x/../Page1",
            "/wiki/Page1?",
            "/./wiki/Page1",
            "/%77iki/Page1",
        ] {
            assert_eq!(normalize(spelling), "/wiki/Page1", "{spelling}");
        }
        assert_eq!(normalize("/a/%2e%2E/b"), "/b");
        assert_eq!(normalize("/a/b/."), "/a/b/");
        assert_eq!(normalize("/a/b/.."), "/a/");
        assert_eq!(normalize("/.."), "/");
        assert_eq!(normalize("/a?q=%7e%2f"), "/a?q=~%2F");
    }

    /// UTF-8 a client did not encode, and the ASCII characters URIs leave out, are the
    /// escapes MediaWiki's purges spell them with; reserved characters stay as sent.
    #[test]
    fn bytes_no_uri_holds_are_percent_encoded() {
        for spelling in ["/wiki/Café", "/wiki/Caf%c3%a9", "/wiki/Caf%C3%A9"] {
            assert_eq!(normalize(spelling), "/wiki/Caf%C3%A9", "{spelling}");
        }
        assert_eq!(normalize("/wiki/日本"), "/wiki/%E6%97%A5%E6%9C%AC");
        assert_eq!(
            normalize("/w/api.php?prop=info|revisions&t=a^b"),
            "/w/api.php?prop=info%7Crevisions&t=a%5Eb"
        );
        assert_eq!(normalize("/a\"<>`{}"), "/a%22%3C%3E%60%7B%7D");
        assert_eq!(normalize("/x/../Café?"), "/Caf%C3%A9");
        for kept in ["/wiki/A:B;C@D$E!F*(G),H/~", "/a?b=c&d=e+f", "/a[1]"] {
            assert_eq!(normalize(kept), kept, "{kept}");
        }
    }

    #[test]
    fn different_resources_stay_different() {
        for kept in [
            "/wiki/A%2FB",
            "/wiki/A%3FB",
            "/a//b",
            "/wiki/.htaccess",
            "/wiki/..x",
            "/a?x=/./y",
            "/a?b",
            "/wiki/100%",
            "/wiki/%zz",
            "/k%%620",
            "/a%/../%62",
            "/",
        ] {
            assert_eq!(normalize(kept), kept, "{kept}");
        }
        assert_eq!(normalize("/wiki/a%2fb"), "/wiki/a%2Fb");
    }

    #[test]
    fn a_normal_target_is_borrowed() {
        assert!(matches!(
            normalize("/wiki/Main_Page?action=history"),
            std::borrow::Cow::Borrowed(_)
        ));
    }
}
