//! The response directives of `Cache-Control` and `CDN-Cache-Control` (RFC 9111 §5.2.2,
//! RFC 9213) that the storage policy reads, parsed in one pass over the field lines without
//! allocating (but for the rare field list of a qualified `private` or `no-cache`). It reads
//! the grammar as pingora's `CacheControl` parser does (leniently), which a test checks on
//! thousands of values; that parser runs a regular expression and fills a map per response,
//! about 6 µs of every miss. Where a directive appears more than once it differs from
//! pingora's "last occurrence wins", which let a second line undo the first: an unqualified
//! `private` or `no-cache` holds whatever else is said, qualified ones name every field any
//! of them lists, and conflicting lifetimes leave the response stale (RFC 9111 §4.2.1).
//! What the directives mean is decided in `policy.rs`.

use http::header::{GetAll, HeaderName, HeaderValue};
use pingora::http::ResponseHeader;

/// RFC 9111 §1.2.2: "If a cache receives a delta-seconds value greater than the greatest
/// integer it can represent, or if any of its subsequent calculations overflows, the cache
/// MUST consider the value to be 2147483648 (2^31) or the greatest positive integer it can
/// conveniently represent." (pingora's choice, kept: `i32::MAX`.)
const DELTA_SECONDS_OVERFLOW: u32 = i32::MAX as u32;

/// What a request's `Cache-Control` asks that Skua honours (RFC 9111 §5.2.1). `no-cache`,
/// `max-age`, `max-stale` and `min-fresh` are not honoured: a shared cache may serve what it
/// holds (§5.2.1.4 says the client "prefers" validation), and a browser's reload would
/// otherwise send every reader's page back to the origin, as Varnish, Traffic Server and
/// nginx also decline by default.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RequestAsks {
    /// §5.2.1.5: "a cache MUST NOT store any part of either this request or any response to
    /// it"; a stored response may still answer it.
    pub no_store: bool,
    /// §5.2.1.7: a stored response, or 504 without asking the origin.
    pub only_if_cached: bool,
}

impl RequestAsks {
    pub fn of<F: crate::cache::fields::RequestFields + ?Sized>(fields: &F) -> RequestAsks {
        let mut asks = RequestAsks::default();
        for line in fields.values("cache-control") {
            for (name, _) in Scan::new(line) {
                if name.eq_ignore_ascii_case(b"no-store") {
                    asks.no_store = true;
                } else if name.eq_ignore_ascii_case(b"only-if-cached") {
                    asks.only_if_cached = true;
                }
            }
        }
        asks
    }

    /// Whether it asks anything of a miss.
    pub fn any(self) -> bool {
        self.no_store || self.only_if_cached
    }
}

/// Whether a directive without a meaningful value was seen.
type Seen = bool;

/// A delta-seconds directive (`max-age`, `s-maxage`, `stale-while-revalidate`,
/// `stale-if-error`) over all its occurrences.
#[derive(Debug, Default, Clone, Copy)]
struct Delta {
    seen: bool,
    /// The first occurrence's value (`None`: it had no valid one).
    first: Option<u32>,
    /// The least valid value of all occurrences.
    least: Option<u32>,
    /// Some occurrence's value differs from the first's.
    conflicting: bool,
}

impl Delta {
    fn add(&mut self, value: Option<&[u8]>) {
        let value = value.and_then(delta_seconds);
        if !self.seen {
            *self = Delta {
                seen: true,
                first: value,
                least: value,
                conflicting: false,
            };
            return;
        }
        self.conflicting |= value != self.first;
        self.least = match (self.least, value) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }

    /// A lifetime (`max-age`, `s-maxage`). RFC 9111 §4.2.1: "When there is more than one
    /// value present for a given directive (e.g., two Expires header field lines or multiple
    /// Cache-Control: max-age directives), either the first occurrence should be used or the
    /// response should be considered stale." Conflicting values: stale.
    fn lifetime(self) -> Option<u32> {
        if self.conflicting {
            return Some(0);
        }
        self.first
    }

    /// A window past freshness (`stale-while-revalidate`, `stale-if-error`): of conflicting
    /// values, the shortest.
    fn window(self) -> Option<u32> {
        if self.conflicting {
            return self.least;
        }
        self.first
    }
}

/// `private` or `no-cache` over all occurrences: unqualified anywhere, or the field names
/// qualified ones list (RFC 9111 §5.2.2.4, §5.2.2.7).
#[derive(Debug, Default)]
struct Listed<'a> {
    whole: bool,
    /// Each qualified occurrence's value, with its quotes.
    lists: Vec<&'a [u8]>,
}

impl<'a> Listed<'a> {
    fn add(&mut self, value: Option<&'a [u8]>) {
        match value {
            None => self.whole = true,
            Some(list) => self.lists.push(list),
        }
    }
}

/// The directives of one field (all its lines), as far as the storage policy asks.
#[derive(Debug, Default)]
pub struct Directives<'a> {
    max_age: Delta,
    s_maxage: Delta,
    stale_while_revalidate: Delta,
    stale_if_error: Delta,
    no_cache: Listed<'a>,
    private: Listed<'a>,
    no_store: Seen,
    public: Seen,
    must_revalidate: Seen,
    proxy_revalidate: Seen,
    no_transform: Seen,
}

/// Where a directive of [`Directives`] is kept.
enum Slot<'s, 'a> {
    Delta(&'s mut Delta),
    Listed(&'s mut Listed<'a>),
    Seen(&'s mut Seen),
}

impl<'a> Directives<'a> {
    /// The directives of field `name` in `resp`, or `None` when the response has no such
    /// field.
    pub fn of(resp: &'a ResponseHeader, name: &HeaderName) -> Option<Directives<'a>> {
        let lines = resp.headers.get_all(name);
        lines.iter().next()?;
        Some(Directives::parse(lines))
    }

    fn parse(lines: GetAll<'a, HeaderValue>) -> Directives<'a> {
        let mut found = Directives::default();
        for line in lines {
            for (key, value) in Scan::new(line.as_bytes()) {
                match found.slot(key) {
                    Some(Slot::Delta(delta)) => delta.add(value),
                    Some(Slot::Listed(listed)) => listed.add(value),
                    Some(Slot::Seen(seen)) => *seen = true,
                    None => {}
                }
            }
        }
        found
    }

    fn slot(&mut self, key: &[u8]) -> Option<Slot<'_, 'a>> {
        let named = |name: &str| key.eq_ignore_ascii_case(name.as_bytes());
        Some(match key.len() {
            7 if named("max-age") => Slot::Delta(&mut self.max_age),
            8 if named("s-maxage") => Slot::Delta(&mut self.s_maxage),
            22 if named("stale-while-revalidate") => Slot::Delta(&mut self.stale_while_revalidate),
            14 if named("stale-if-error") => Slot::Delta(&mut self.stale_if_error),
            8 if named("no-cache") => Slot::Listed(&mut self.no_cache),
            8 if named("no-store") => Slot::Seen(&mut self.no_store),
            7 if named("private") => Slot::Listed(&mut self.private),
            6 if named("public") => Slot::Seen(&mut self.public),
            15 if named("must-revalidate") => Slot::Seen(&mut self.must_revalidate),
            16 if named("proxy-revalidate") => Slot::Seen(&mut self.proxy_revalidate),
            12 if named("no-transform") => Slot::Seen(&mut self.no_transform),
            _ => return None,
        })
    }

    pub fn no_store(&self) -> bool {
        self.no_store
    }

    /// `private` without field names, on any line: the whole response is private (RFC 9111
    /// §5.2.2.7), whatever a qualified `private` elsewhere lists. Regression: `private` and,
    /// on a second line, `private="Set-Cookie"` read as the second alone, and one reader's
    /// private page was stored for everyone.
    pub fn private(&self) -> bool {
        self.private.whole
    }

    /// `no-cache` without field names, on any line (RFC 9111 §5.2.2.4).
    pub fn no_cache(&self) -> bool {
        self.no_cache.whole
    }

    pub fn public(&self) -> bool {
        self.public
    }

    pub fn must_revalidate(&self) -> bool {
        self.must_revalidate
    }

    pub fn proxy_revalidate(&self) -> bool {
        self.proxy_revalidate
    }

    pub fn no_transform(&self) -> bool {
        self.no_transform
    }

    /// The `s-maxage` lifetime, when it has a valid value.
    pub fn s_maxage(&self) -> Option<u32> {
        self.s_maxage.lifetime()
    }

    pub fn max_age(&self) -> Option<u32> {
        self.max_age.lifetime()
    }

    pub fn stale_while_revalidate(&self) -> Option<u32> {
        self.stale_while_revalidate.window()
    }

    pub fn stale_if_error(&self) -> Option<u32> {
        self.stale_if_error.window()
    }

    /// The fields that `private="…"` and `no-cache="…"` name, every occurrence's, which a
    /// shared cache "MUST NOT store" (RFC 9111 §5.2.2.7); `no-cache`'s are treated alike
    /// (§5.2.2.4 only forbids reusing them unvalidated). Empty, and not allocated, for almost
    /// every response.
    pub fn listed_fields(&self) -> Vec<HeaderName> {
        let mut names = Vec::new();
        for value in self.private.lists.iter().chain(&self.no_cache.lists) {
            for name in unquoted(value).split(|b| *b == b',') {
                if let Ok(name) = HeaderName::from_bytes(name.trim_ascii()) {
                    names.push(name);
                }
            }
        }
        names
    }
}

/// A directive value without its surrounding quotes (a quoted-string is not unescaped).
fn unquoted(value: &[u8]) -> &[u8] {
    value
        .strip_prefix(b"\"")
        .and_then(|v| v.strip_suffix(b"\""))
        .unwrap_or(value)
}

/// RFC 9111 §1.2.2 delta-seconds; quotes are tolerated, an invalid value is no value.
fn delta_seconds(value: &[u8]) -> Option<u32> {
    let text = std::str::from_utf8(unquoted(value)).ok()?;
    match text.parse::<u32>() {
        Ok(seconds) => Some(seconds),
        Err(e) if *e.kind() == std::num::IntErrorKind::PosOverflow => Some(DELTA_SECONDS_OVERFLOW),
        Err(_) => None,
    }
}

/// RFC 9110 §5.6.2 `tchar`, as leniently as pingora reads it: anything but controls, space,
/// DEL and the delimiters; bytes from 0x80 on are allowed. A table: this is asked of every
/// byte of every `Cache-Control` a miss stores.
const TOKEN_BYTES: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0x21;
    while b < 256 {
        table[b] = b != 0x7f;
        b += 1;
    }
    let delimiters = b"()<>@,;:\\\"/[]?={}";
    let mut i = 0;
    while i < delimiters.len() {
        table[delimiters[i] as usize] = false;
        i += 1;
    }
    table
};

pub(crate) fn is_token_byte(b: u8) -> bool {
    TOKEN_BYTES[b as usize]
}

/// The `(name, value)` pairs of one field line, as `1#cache-directive` read leniently:
/// `;` also separates directives, and text between them that is no directive is skipped. A
/// directive is a token at the start of the line or after a separator (with whitespace
/// around it), followed by `=` and a token or a quoted-string, or by nothing.
struct Scan<'a> {
    line: &'a [u8],
    at: usize,
}

impl<'a> Scan<'a> {
    fn new(line: &'a [u8]) -> Scan<'a> {
        Scan { line, at: 0 }
    }

    fn token_at(&self, from: usize) -> usize {
        self.line[from..]
            .iter()
            .take_while(|b| is_token_byte(**b))
            .count()
    }

    /// The length of the quoted-string starting at `from` (RFC 9110 §5.6.4), if it is one.
    fn quoted_at(&self, from: usize) -> Option<usize> {
        let rest = &self.line[from..];
        if rest.first() != Some(&b'"') {
            return None;
        }
        let mut i = 1;
        while i < rest.len() {
            match rest[i] {
                b'"' => return Some(i + 1),
                // A quoted-pair escapes any byte but a line feed.
                b'\\' if rest.get(i + 1).is_some_and(|b| *b != b'\n') => i += 2,
                b'\\' => return None,
                _ => i += 1,
            }
        }
        None
    }

    /// Where the next directive's name starts, at or after `self.at`, and its length.
    fn next_name(&self) -> Option<(usize, usize)> {
        if self.at == 0 {
            let len = self.token_at(0);
            if len > 0 {
                return Some((0, len));
            }
        }
        let mut from = self.at;
        loop {
            let separator = from
                + self.line[from..]
                    .iter()
                    .position(|b| matches!(b, b',' | b';'))?;
            let name = separator
                + 1
                + self.line[separator + 1..]
                    .iter()
                    .take_while(|b| matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r'))
                    .count();
            let len = if name < self.line.len() {
                self.token_at(name)
            } else {
                0
            };
            if len > 0 {
                return Some((name, len));
            }
            from = separator + 1;
        }
    }
}

impl<'a> Iterator for Scan<'a> {
    type Item = (&'a [u8], Option<&'a [u8]>);

    fn next(&mut self) -> Option<Self::Item> {
        let (start, len) = self.next_name()?;
        let name_end = start + len;
        let name = &self.line[start..name_end];
        self.at = name_end;
        if self.line.get(name_end) != Some(&b'=') {
            return Some((name, None));
        }
        let value_start = name_end + 1;
        let value_len = match self.token_at(value_start) {
            0 => self.quoted_at(value_start),
            n => Some(n),
        };
        let Some(len) = value_len else {
            return Some((name, None));
        };
        self.at = value_start + len;
        Some((name, Some(&self.line[value_start..self.at])))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pingora::cache::cache_control::{CacheControl, InterpretCacheControl};

    #[test]
    fn a_request_asks_no_store_and_only_if_cached_in_any_line_and_case() {
        let asks = |lines: &[&'static str]| {
            let mut fields = http::HeaderMap::new();
            for line in lines {
                fields.append(http::header::CACHE_CONTROL, HeaderValue::from_static(line));
            }
            RequestAsks::of(&fields)
        };
        assert_eq!(asks(&[]), RequestAsks::default());
        assert_eq!(asks(&["max-age=0", "no-cache"]), RequestAsks::default());
        let both = asks(&["max-age=0", "No-Store, only-if-cached"]);
        assert!(both.no_store && both.only_if_cached);
        assert!(!asks(&["no-storex, x-only-if-cached"]).any());
    }

    fn response(lines: &[&[u8]]) -> ResponseHeader {
        let mut resp = ResponseHeader::build(200, None).unwrap();
        for line in lines {
            if let Ok(value) = HeaderValue::from_bytes(line) {
                resp.append_header(http::header::CACHE_CONTROL, value)
                    .unwrap();
            }
        }
        for name in ["a", "b", "set-cookie", "x-y"] {
            resp.append_header(name, "v").unwrap();
        }
        resp
    }

    /// Everything the storage policy reads, from pingora's parser and from this one.
    fn both(lines: &[&[u8]]) -> (String, String) {
        let resp = response(lines);
        let theirs = CacheControl::from_resp_headers(&resp).map(|cc| {
            let mut stripped = resp.clone();
            cc.strip_private_headers(&mut stripped);
            format!(
                "store={} private={} no_cache={} public={} mr={} pr={} s={:?} m={:?} swr={:?} sie={:?} left={:?}",
                cc.no_store(),
                cc.private(),
                cc.no_cache(),
                cc.public(),
                cc.must_revalidate(),
                cc.proxy_revalidate(),
                cc.s_maxage().ok().flatten(),
                cc.max_age().ok().flatten(),
                cc.stale_while_revalidate().ok().flatten(),
                cc.stale_if_error().ok().flatten(),
                stripped.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            )
        });
        let ours = Directives::of(&resp, &http::header::CACHE_CONTROL).map(|d| {
            let mut stripped = resp.clone();
            for name in d.listed_fields() {
                stripped.remove_header(&name);
            }
            format!(
                "store={} private={} no_cache={} public={} mr={} pr={} s={:?} m={:?} swr={:?} sie={:?} left={:?}",
                d.no_store(),
                d.private(),
                d.no_cache(),
                d.public(),
                d.must_revalidate(),
                d.proxy_revalidate(),
                d.s_maxage(),
                d.max_age(),
                d.stale_while_revalidate(),
                d.stale_if_error(),
                stripped.headers.keys().map(|k| k.as_str()).collect::<Vec<_>>(),
            )
        });
        (format!("{theirs:?}"), format!("{ours:?}"))
    }

    #[test]
    fn reads_what_pingoras_parser_reads_on_written_cases() {
        let cases: &[&[&[u8]]] = &[
            &[b"max-age=60"],
            &[b"public, max-age=60, s-maxage=30"],
            &[b"no-store"],
            &[b"private"],
            &[b"private=\"set-cookie, a\""],
            &[b"no-cache=\"b\", max-age=5"],
            &[b"no-cache", b"max-age=5"],
            &[b"MAX-AGE=7; Public"],
            &[b"max-age=\"30\""],
            &[b"max-age=-1"],
            &[b"max-age=1.5"],
            &[b"max-age=+5"],
            &[b"max-age=99999999999999"],
            &[b"max-age = 10"],
            &[b"max-age=10 garbage, public"],
            &[b",, ;; max-age=3 ,"],
            &[b"private=\"unterminated, max-age=4"],
            &[b"s-maxage=0, must-revalidate, proxy-revalidate"],
            &[b"stale-while-revalidate=30, stale-if-error=600"],
            &[b"max-age=5\"x\", public"],
            &[b"no-cache=\"a\\\"b\", max-age=1"],
            &[b"private=\"x\\\", b\", max-age=1"],
            &[b"=5, max-age=2"],
            &[b"  max-age=9"],
            &[b"max-age=\xc3\xa9, public"],
            &[b""],
        ];
        for lines in cases {
            let (theirs, ours) = both(lines);
            assert_eq!(ours, theirs, "for {lines:?}");
        }
    }

    /// Where pingora's parser lets the last occurrence of a directive win, a second line could
    /// undo the first. Regression: `private` with, on a second line, `private="Set-Cookie"`
    /// was read as the second alone and the private page stored for every reader.
    #[test]
    fn a_directive_given_twice_is_read_as_rfc_9111_asks_not_as_its_last_occurrence() {
        let read = |lines: &[&[u8]]| {
            let resp = response(lines);
            let d = Directives::of(&resp, &http::header::CACHE_CONTROL).unwrap();
            let listed: Vec<String> = d.listed_fields().iter().map(|n| n.to_string()).collect();
            (
                d.private(),
                d.no_cache(),
                d.max_age(),
                d.s_maxage(),
                d.stale_while_revalidate(),
                listed,
            )
        };
        let none: Vec<String> = Vec::new();
        // §5.2.2.7, §5.2.2.4: unqualified anywhere is unqualified.
        assert!(read(&[b"private, max-age=300", b"private=\"Set-Cookie\""]).0);
        assert!(read(&[b"private=\"a\", private"]).0);
        assert!(read(&[b"no-cache", b"no-cache=\"a\", max-age=60"]).1);
        // Every qualified occurrence's fields are withheld.
        let both = read(&[
            b"private=\"set-cookie\"",
            b"private=\"x-session\", max-age=5",
        ]);
        assert!(!both.0);
        assert_eq!(both.5, ["set-cookie", "x-session"]);
        // §4.2.1: conflicting lifetimes leave the response stale; agreeing ones stand.
        assert_eq!(read(&[b"max-age=0, max-age=60"]).2, Some(0));
        assert_eq!(read(&[b"max-age=60", b"max-age=0"]).2, Some(0));
        assert_eq!(read(&[b"s-maxage=600", b"s-maxage=60"]).3, Some(0));
        assert_eq!(read(&[b"max-age=60, max-age=60"]).2, Some(60));
        assert_eq!(read(&[b"max-age=60"]).5, none);
        // A window past freshness: the shortest of those given.
        assert_eq!(
            read(&[b"stale-while-revalidate=30, stale-while-revalidate=5"]).4,
            Some(5)
        );
    }

    #[test]
    fn reads_what_pingoras_parser_reads_on_generated_values() {
        // Values built from the pieces the grammar turns on, by a fixed-seed generator.
        const PIECES: &[&[u8]] = &[
            b"max-age",
            b"s-maxage",
            b"no-cache",
            b"no-store",
            b"private",
            b"public",
            b"must-revalidate",
            b"proxy-revalidate",
            b"stale-while-revalidate",
            b"stale-if-error",
            b"Max-Age",
            b"x",
            b"=",
            b"==",
            b"\"",
            b"\\",
            b",",
            b";",
            b" ",
            b"\t",
            b"0",
            b"17",
            b"4294967296",
            b"-",
            b".",
            b"a",
            b"set-cookie",
            b"\"a, b\"",
            b"(",
            b"\xc3\xa9",
            b"/",
        ];
        let mut state: u64 = 0x5eed;
        let mut next = |n: usize| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 33) as usize) % n
        };
        for _ in 0..20_000 {
            let mut line = Vec::new();
            for _ in 0..1 + next(8) {
                line.extend_from_slice(PIECES[next(PIECES.len())]);
            }
            let (theirs, ours) = both(&[&line]);
            assert_eq!(ours, theirs, "for {:?}", String::from_utf8_lossy(&line));
        }
    }
}
