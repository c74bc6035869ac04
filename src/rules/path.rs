//! `normalize_path = "mediawiki"`: a path spelled as MediaWiki spells it in its links and in
//! every purge it sends, so that what a browser, a bot or another site's link asks for is the
//! object the wiki's purge names. Only the path: the query is `normalize_query`'s.
//!
//! MediaWiki builds a page's URL with `wfUrlencode` (GlobalFunctions.php): PHP's `urlencode`,
//! then `; @ $ ! * ( ) , / ~ :` put back. Its own link to `Rock 'n' roll (music)` is
//! `Rock_%27n%27_roll_(music)`; a title typed into a browser arrives as
//! `Rock_'n'_roll_(music)` (WHATWG URL leaves `'` and `()` in a path as they are), and
//! Python's `quote` writes `Rock_%27n%27_roll_%28music%29`. MediaWiki decodes all three to one
//! title, so they are one page; without this rule they were three objects, and an edit purged
//! only the first. (Wikimedia's caches normalise the same way before a purge, by the same
//! table.) Not for any other application: `%2F` becomes `/` here, which to most servers is a
//! different resource (RFC 3986 §2.2).

use std::borrow::Cow;
use std::fmt::Write as _;

use crate::cache::target::escaped_byte;

/// Whether `wfUrlencode` writes a byte as it is, by byte: `urlencode` keeps ASCII letters,
/// digits, `-`, `_` and `.`; then `;@$!*(),/~:` are put back (`~` by name, although PHP 7's
/// `urlencode` already keeps it). A table: every request whose rule set has such a rule
/// reads each byte of its path here (a `matches!` over the set cost several times more,
/// `benches/README.md` §32).
static KEPT_BY_MEDIAWIKI: [bool; 256] = {
    let mut kept = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        kept[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'_'
                    | b'.'
                    | b';'
                    | b'@'
                    | b'$'
                    | b'!'
                    | b'*'
                    | b'('
                    | b')'
                    | b','
                    | b'/'
                    | b'~'
                    | b':'
            );
        b += 1;
    }
    kept
};

fn kept_by_mediawiki(b: u8) -> bool {
    KEPT_BY_MEDIAWIKI[usize::from(b)]
}

/// Whether [`mediawiki`] may spell `target` otherwise: its path holds an escape or a byte
/// `wfUrlencode` escapes. Most paths hold neither, so their rule need not even be read.
pub fn may_respell(target: &str) -> bool {
    for &b in target.as_bytes() {
        if !kept_by_mediawiki(b) {
            return b != b'?';
        }
    }
    false
}

/// `target` (an origin-form target, already in `cache::target`'s normal form) with its path
/// in MediaWiki's spelling: every byte `wfUrlencode` keeps written as itself, every other one
/// as an escape with upper-case hex digits, then dot segments removed again (a decoded `%2F`
/// can make one). The query is left as it is. Borrowed when the path is MediaWiki's spelling
/// already, and when a `%` starts no escape: that is no URI (RFC 3986 §2.1), as
/// `cache::target` leaves it.
pub fn mediawiki(target: &str) -> Cow<'_, str> {
    let path_end = target.find('?').unwrap_or(target.len());
    let (path, query) = target.split_at(path_end);
    let bytes = path.as_bytes();
    let mut spelled_as_mediawiki = true;
    let mut at = 0;
    while at < bytes.len() {
        let b = bytes[at];
        if b == b'%' {
            let Some(decoded) = escaped_byte(bytes, at) else {
                return Cow::Borrowed(target);
            };
            let upper = bytes[at + 1..at + 3]
                .iter()
                .all(|h| !h.is_ascii_lowercase());
            spelled_as_mediawiki &= !kept_by_mediawiki(decoded) && upper;
            at += 3;
        } else {
            spelled_as_mediawiki &= kept_by_mediawiki(b);
            at += 1;
        }
    }
    if spelled_as_mediawiki {
        return Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len() + 8);
    let mut at = 0;
    while at < bytes.len() {
        let (b, width) = match bytes[at] {
            b'%' => (escaped_byte(bytes, at).unwrap_or(b'%'), 3),
            b => (b, 1),
        };
        if kept_by_mediawiki(b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
        at += width;
    }
    out.push_str(query);
    Cow::Owned(crate::cache::target::normalize(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_of_a_title_is_mediawikis() {
        let wiki = "/wiki/Rock_%27n%27_roll_(music)";
        for spelling in [
            "/wiki/Rock_'n'_roll_(music)",
            "/wiki/Rock_%27n%27_roll_%28music%29",
            "/wiki/Rock_%27n%27_roll_%28music)",
            "/wiki/Rock_%27n%27_roll_%28music%29",
        ] {
            assert_eq!(mediawiki(spelling), wiki, "{spelling}");
        }
        assert!(matches!(mediawiki(wiki), Cow::Borrowed(_)));
        assert_eq!(mediawiki("/wiki/C++"), "/wiki/C%2B%2B");
        assert_eq!(mediawiki("/wiki/A&B=C"), "/wiki/A%26B%3DC");
        assert_eq!(mediawiki("/wiki/%5Bx%5d"), "/wiki/%5Bx%5D");
        assert_eq!(mediawiki("/wiki/Caf\u{e9}"), "/wiki/Caf%C3%A9");
        assert_eq!(mediawiki("/wiki/Caf%c3%a9"), "/wiki/Caf%C3%A9");
        assert_eq!(mediawiki("/wiki/Talk%3AA%2FB"), "/wiki/Talk:A/B");
        assert_eq!(mediawiki("/wiki/A%20B"), "/wiki/A%20B");
    }

    #[test]
    fn only_a_path_with_an_escape_or_a_byte_to_escape_may_be_respelled() {
        for target in [
            "/wiki/Main_Page",
            "/wiki/A_(b):c?x='%28",
            "/",
            "/w/index.php?title=A%28",
        ] {
            assert!(!may_respell(target), "{target}");
            assert!(matches!(mediawiki(target), Cow::Borrowed(_)), "{target}");
        }
        for target in ["/wiki/A%28b", "/wiki/A'", "/wiki/A%2Cb", "/wiki/A+B?x"] {
            assert!(may_respell(target), "{target}");
        }
    }

    #[test]
    fn the_query_is_left_as_it_is() {
        assert_eq!(
            mediawiki("/index.php/A%28b%29?title=A%28b%29&x='"),
            "/index.php/A(b)?title=A%28b%29&x='"
        );
        assert!(matches!(
            mediawiki("/w/index.php?title=A%28b%29"),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn a_decoded_slash_makes_no_dot_segment_of_its_own() {
        assert_eq!(mediawiki("/wiki/A%2F..%2FB"), "/wiki/B");
    }

    #[test]
    fn a_percent_that_starts_no_escape_leaves_the_target_alone() {
        assert_eq!(mediawiki("/wiki/100%_(x)"), "/wiki/100%_(x)");
        assert_eq!(mediawiki("/wiki/%2"), "/wiki/%2");
    }

    #[test]
    fn the_result_is_its_own_normal_form() {
        for target in [
            "/wiki/Rock_'n'_roll_(music)",
            "/wiki/%7e%2a%3a%25%41",
            "/wiki/A%2F.%2F.%2FB",
            "/wiki/\u{1F600}?q",
        ] {
            let once = mediawiki(target).into_owned();
            assert_eq!(mediawiki(&once), once, "{target}");
            assert_eq!(crate::cache::target::normalize(&once), once, "{target}");
        }
    }
}
