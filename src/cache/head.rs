//! A stored object's head (status line and header fields as a hit sends them) split in two: the
//! lines most objects share, kept once for all of them, and the lines that are this object's
//! own. It owns that split and the table of shared parts; it does not decide which fields are
//! stored (that is `meta::encode_head`) nor write a hit's head (that is `proxy::hit`).
//!
//! Why: the head was a stored object's largest cost besides its body (341 bytes for a 1 KiB
//! file from nginx, where the body is 1,024; benches/README.md §21), and nearly all of it is
//! the same from object to object: `Server`, `Content-Type`, `Cache-Control`, `Vary`,
//! `Content-Language`. Only `Date`, the validators and a few like them differ.
//!
//! Field order: every line of one field name goes to the same part, so lines of one name keep
//! their order; lines of different names may be reordered, which RFC 9110 §5.3 allows ("the
//! order in which field lines with differing field names are received is not significant").

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, LazyLock, Mutex};

/// The status line and header lines of a stored response, each ending in CRLF.
#[derive(Debug, Clone)]
pub struct Head {
    /// The status line and the lines most objects share, interned; `None` when the head is
    /// kept whole in `own` (a disk record's head, read for one hit).
    shared: Option<Arc<Shared>>,
    /// This object's own lines, or with `shared` `None` the whole head. An own line that is
    /// an IMF-fixdate field which formats back to the same bytes is kept as [`DATE_MARK`], the
    /// field's number in [`DATE_FIELDS`] and the time in seconds (six bytes for 37 to 46).
    own: Box<[u8]>,
}

/// Starts a compacted date line: no field line starts with a NUL (field names are tokens).
const DATE_MARK: u8 = 0;
const DATE_ENTRY: usize = 6;
/// The date fields compacted, spelled as `meta::wire_name` spells them.
const DATE_FIELDS: [&[u8]; 3] = [b"Date", b"last-modified", b"expires"];

/// Fields whose values are mostly one object's own: kept with the object, so that the rest of
/// its head can be shared. Lowercase, as `meta::wire_name` spells every name not in title case
/// (`Date` aside, compared without case).
const OWN_FIELDS: [&[u8]; 22] = [
    b"date",
    b"last-modified",
    b"etag",
    b"expires",
    b"location",
    b"content-location",
    b"content-disposition",
    b"content-range",
    b"content-md5",
    b"content-digest",
    b"repr-digest",
    b"digest",
    b"link",
    b"set-cookie",
    b"x-request-id",
    b"request-id",
    b"traceparent",
    b"tracestate",
    b"server-timing",
    // MediaWiki sends these with every response (Wikimedia's `backend-timing`, the request's
    // id in `x-request-id`).
    b"backend-timing",
    b"x-varnish",
    b"x-amz-request-id",
];

/// Whether lines named `name` (compared without case, as a head's lines spell names) are an
/// object's own.
fn is_own_field(name: &[u8]) -> bool {
    OWN_FIELDS.iter().any(|own| own.eq_ignore_ascii_case(name))
}

impl Head {
    /// A head kept whole, as it is written.
    pub fn whole(head: Box<[u8]>) -> Head {
        Head {
            shared: None,
            own: head,
        }
    }

    /// `head` (a status line, then header lines, each ending in CRLF) split into its shared
    /// and own lines, the shared part interned.
    pub fn split(head: &[u8]) -> Head {
        let mut lines = head.split_inclusive(|b| *b == b'\n');
        let mut writer = HeadWriter::new(&[lines.next().unwrap_or_default()], head.len());
        for line in lines {
            let colon = memchr::memchr(b':', line);
            let name = colon.map_or(line, |colon| &line[..colon]);
            if !is_own_field(name) {
                writer.shared.extend_from_slice(line);
                continue;
            }
            let value =
                colon.and_then(|colon| line[colon..].strip_prefix(b": ")?.strip_suffix(b"\r\n"));
            match value.and_then(|value| compact_date(name, value)) {
                Some(entry) => writer.own.extend_from_slice(&entry),
                None => writer.own.extend_from_slice(line),
            }
        }
        writer.finish()
    }

    /// This head with its shared lines interned (a copy kept for long: promoted from disk).
    pub fn to_split(&self) -> Head {
        match self.shared {
            Some(_) => self.clone(),
            None => Head::split(&self.own),
        }
    }

    /// The status line and the lines that follow it in the first part; every line in it is
    /// preceded by a CRLF, so a field is found by searching for `\r\n<Name>: `.
    pub fn leading(&self) -> &[u8] {
        match &self.shared {
            Some(shared) => &shared.lines,
            None => &self.own,
        }
    }

    /// The entries of this object's own lines (none for a head kept whole).
    fn own_entries(&self) -> OwnEntries<'_> {
        OwnEntries(match self.shared {
            Some(_) => &self.own,
            None => &[],
        })
    }

    /// Appends the lines after [`Self::leading`]: this object's own.
    pub fn write_trailing(&self, out: &mut Vec<u8>) {
        for entry in self.own_entries() {
            match entry {
                Own::Line(line) => out.extend_from_slice(line),
                Own::Date(field, secs) => write_date_line(out, field, secs),
            }
        }
    }

    pub fn len(&self) -> usize {
        let own: usize = self
            .own_entries()
            .map(|entry| match entry {
                Own::Line(line) => line.len(),
                Own::Date(field, _) => DATE_FIELDS[field].len() + DATE_LINE_REST,
            })
            .sum();
        self.leading().len() + own
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Appends the whole head to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self.leading());
        self.write_trailing(out);
    }

    /// The whole head in one buffer.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.len());
        self.write_to(&mut out);
        out
    }

    /// Whether some header line's name is `name` (compared without case).
    pub fn has_field(&self, name: &[u8]) -> bool {
        let named = |line: &[u8]| {
            line.get(..name.len())
                .is_some_and(|n| n.eq_ignore_ascii_case(name))
                && line.get(name.len()) == Some(&b':')
        };
        // A split head keeps every line of an own field among its own entries: the shared
        // lines need no search for one (`ETag` and `Last-Modified`, asked whenever the memory
        // tier weighs an object's life).
        let own_field = self.shared.is_some() && is_own_field(name);
        let mut leading = self.leading().split_inclusive(|b| *b == b'\n');
        leading.next();
        (!own_field && leading.any(named))
            || self.own_entries().any(|entry| match entry {
                Own::Line(line) => named(line),
                Own::Date(field, _) => DATE_FIELDS[field].eq_ignore_ascii_case(name),
            })
    }

    /// Whether the shared part is the same allocation as `other`'s.
    pub fn shares_with(&self, other: &Head) -> bool {
        match (&self.shared, &other.shared) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// One of an object's own lines as kept.
enum Own<'a> {
    Line(&'a [u8]),
    /// A [`DATE_FIELDS`] field and its time in seconds since the Unix epoch.
    Date(usize, u32),
}

struct OwnEntries<'a>(&'a [u8]);

impl<'a> Iterator for OwnEntries<'a> {
    type Item = Own<'a>;

    fn next(&mut self) -> Option<Own<'a>> {
        let rest = self.0;
        match rest.first()? {
            &DATE_MARK => {
                let entry = rest.get(..DATE_ENTRY)?;
                self.0 = &rest[DATE_ENTRY..];
                let mut secs = [0u8; 4];
                secs.copy_from_slice(&entry[2..]);
                Some(Own::Date(
                    usize::from(entry[1]).min(DATE_FIELDS.len() - 1),
                    u32::from_le_bytes(secs),
                ))
            }
            _ => {
                let end = memchr::memchr(b'\n', rest).map_or(rest.len(), |lf| lf + 1);
                self.0 = &rest[end..];
                Some(Own::Line(&rest[..end]))
            }
        }
    }
}

/// A head written field by field, each line put in its part as it comes: what [`Head::split`]
/// makes of the same lines, without writing the whole head first and reading it again (part of
/// every miss's storing; benches/README.md §50).
pub struct HeadWriter {
    shared: Vec<u8>,
    own: Vec<u8>,
}

impl HeadWriter {
    /// A head that starts with the status line `status_line` joins (ending in CRLF);
    /// `capacity`: about how long the whole head will be.
    pub fn new(status_line: &[&[u8]], capacity: usize) -> HeadWriter {
        let mut shared = Vec::with_capacity(capacity);
        for part in status_line {
            shared.extend_from_slice(part);
        }
        HeadWriter {
            shared,
            own: Vec::new(),
        }
    }

    /// Appends the line `<wire_name>: <value>`; `name` is the field's name, which `wire_name`
    /// spells.
    pub fn field(&mut self, name: &http::HeaderName, wire_name: &[u8], value: &[u8]) {
        // `HeaderName` is lower case, as `OWN_FIELDS` is: compared exactly, which costs a miss
        // about 700 instructions less than [`is_own_field`]'s comparison without case.
        let part = if OWN_FIELDS.contains(&name.as_str().as_bytes()) {
            if let Some(entry) = compact_date(wire_name, value) {
                self.own.extend_from_slice(&entry);
                return;
            }
            &mut self.own
        } else {
            &mut self.shared
        };
        part.extend_from_slice(wire_name);
        part.extend_from_slice(b": ");
        part.extend_from_slice(value);
        part.extend_from_slice(b"\r\n");
    }

    /// The head, its shared part interned.
    pub fn finish(self) -> Head {
        Head {
            shared: Some(SHARED.intern(&self.shared)),
            own: super::meta::exact_size(self.own),
        }
    }
}

/// `: `, the 29 bytes of an IMF-fixdate and CRLF.
const DATE_LINE_REST: usize = 2 + 29 + 2;

/// A [`DATE_FIELDS`] field (`name` spelled as there) as a compacted date entry, if its
/// `value` is an IMF-fixdate that formats back to exactly its bytes (so the hit sends what the
/// origin sent).
fn compact_date(name: &[u8], value: &[u8]) -> Option<[u8; DATE_ENTRY]> {
    let field = DATE_FIELDS.iter().position(|f| *f == name)?;
    // Only an IMF-fixdate formats back to itself, so it is the only form read.
    let secs = super::date::parse_imf_fixdate(value)?
        .duration_since(std::time::UNIX_EPOCH)
        .ok()?
        .as_secs();
    let secs = u32::try_from(secs).ok()?;
    if super::date::imf_fixdate_text(u64::from(secs)) != value {
        return None;
    }
    let mut entry = [DATE_MARK, field as u8, 0, 0, 0, 0];
    entry[2..].copy_from_slice(&secs.to_le_bytes());
    Some(entry)
}

fn write_date_line(out: &mut Vec<u8>, field: usize, secs: u32) {
    out.extend_from_slice(DATE_FIELDS[field]);
    out.extend_from_slice(b": ");
    super::date::write_imf_fixdate(out, u64::from(secs));
    out.extend_from_slice(b"\r\n");
}

/// One shared part: the lines, behind a thin pointer so that a head costs 24 bytes.
#[derive(Debug)]
struct Shared {
    lines: Box<[u8]>,
}

/// The table of shared parts. A part lives while a head holds it: the table's own reference is
/// dropped by a sweep whenever the table has doubled since the last one, so it holds at most
/// about twice the parts in use.
struct Interner {
    table: Mutex<Table>,
}

struct Table {
    parts: HashSet<Key>,
    swept_at: usize,
    #[cfg(test)]
    sweeps: u64,
}

/// Looked up by its lines.
struct Key(Arc<Shared>);

impl PartialEq for Key {
    fn eq(&self, other: &Key) -> bool {
        self.0.lines == other.0.lines
    }
}

impl Eq for Key {}

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // As `[u8]` hashes, for `Borrow<[u8]>`.
        self.0.lines[..].hash(state);
    }
}

impl std::borrow::Borrow<[u8]> for Key {
    fn borrow(&self) -> &[u8] {
        &self.0.lines
    }
}

/// The fewest parts a sweep waits for.
const SWEEP_FLOOR: usize = 1024;

static SHARED: LazyLock<Interner> = LazyLock::new(|| Interner {
    table: Mutex::new(Table {
        parts: HashSet::new(),
        swept_at: 0,
        #[cfg(test)]
        sweeps: 0,
    }),
});

impl Interner {
    fn intern(&self, lines: &[u8]) -> Arc<Shared> {
        // A poisoned lock only means another thread panicked while holding it: the table is
        // still a valid set.
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(found) = table.parts.get(lines) {
            return found.0.clone();
        }
        if table.parts.len() >= (2 * table.swept_at).max(SWEEP_FLOOR) {
            table.parts.retain(|k| Arc::strong_count(&k.0) > 1);
            table.swept_at = table.parts.len();
            #[cfg(test)]
            {
                table.sweeps += 1;
            }
        }
        let part = Arc::new(Shared {
            lines: Box::from(lines),
        });
        table.parts.insert(Key(part.clone()));
        part
    }

    #[cfg(test)]
    fn holds(&self, lines: &[u8]) -> bool {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table.parts.contains(lines)
    }

    #[cfg(test)]
    fn sweeps(&self) -> u64 {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).sweeps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &[u8] = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Wed, 02 Dec 2026 16:26:07 GMT\r\n\
        Content-Type: text/html\r\netag: \"a\"\r\nset-cookie: x=1\r\nCache-Control: max-age=60\r\n\
        set-cookie: y=2\r\n";

    fn trailing(head: &Head) -> Vec<u8> {
        let mut out = Vec::new();
        head.write_trailing(&mut out);
        out
    }

    #[test]
    fn own_lines_are_kept_apart_and_the_rest_is_shared() {
        let a = Head::split(A);
        assert_eq!(
            a.leading(),
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Type: text/html\r\n\
              Cache-Control: max-age=60\r\n"
        );
        assert_eq!(
            trailing(&a),
            b"Date: Wed, 02 Dec 2026 16:26:07 GMT\r\netag: \"a\"\r\nset-cookie: x=1\r\n\
              set-cookie: y=2\r\n"
        );
        assert_eq!(a.len(), A.len());
        assert_eq!(a.to_vec().len(), A.len());
        // Another object from the same origin: its own lines differ, the rest is one copy.
        let b = Head::split(
            b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Thu, 03 Dec 2026 00:00:00 GMT\r\n\
              Content-Type: text/html\r\netag: \"b\"\r\nCache-Control: max-age=60\r\n",
        );
        assert!(a.shares_with(&b));
        assert!(!a.shares_with(&Head::split(b"HTTP/1.1 404 Not Found\r\nServer: nginx\r\n")));
        for name in ["server", "Content-Type", "date", "ETag", "cache-control"] {
            assert!(b.has_field(name.as_bytes()), "{name}");
        }
        assert!(!b.has_field(b"set-cookie"));
        assert!(!b.has_field(b"serv"));
    }

    /// Dates are the largest own lines; kept as six bytes, they are sent as they came, and a
    /// date that would not format back to its bytes is kept as it is.
    #[test]
    fn own_dates_are_kept_compact_and_sent_as_they_came() {
        let lines = b"HTTP/1.1 200 OK\r\nDate: Wed, 02 Dec 2026 16:26:07 GMT\r\n\
            last-modified: Sun, 06 Nov 1994 08:49:37 GMT\r\nexpires: Thu, 01 Jan 1970 00:00:00 GMT\r\n\
            etag: \"x\"\r\n";
        let head = Head::split(lines);
        assert_eq!(head.own.len(), 3 * DATE_ENTRY + b"etag: \"x\"\r\n".len());
        assert_eq!(head.to_vec(), lines);
        assert_eq!(head.len(), lines.len());
        assert!(head.has_field(b"last-modified"));
        assert!(head.has_field(b"Expires"));
        // RFC 850, asctime, a lower-case month, an odd spacing: all kept byte for byte.
        for odd in [
            &b"Date: Sunday, 06-Nov-94 08:49:37 GMT\r\n"[..],
            b"Date: Sun Nov  6 08:49:37 1994\r\n",
            b"Date: Sun, 06 nov 1994 08:49:37 GMT\r\n",
            b"Date: Fri, 06 Nov 1994 08:49:37 GMT\r\n",
            b"Date:  Sun, 06 Nov 1994 08:49:37 GMT\r\n",
            b"expires: 0\r\n",
            b"Date: Sun, 06 Nov 2200 08:49:37 GMT\r\n",
        ] {
            let whole = [&b"HTTP/1.1 200 OK\r\n"[..], odd].concat();
            let head = Head::split(&whole);
            assert_eq!(head.own.len(), odd.len());
            assert_eq!(head.to_vec(), whole);
        }
    }

    /// The writer a miss stores with and the split of a head read back from disk must agree,
    /// or a promoted copy would send other bytes and keep a shared part of its own.
    #[test]
    fn a_head_written_field_by_field_is_the_head_split_from_its_lines() {
        let odd_date = "Date: Fri, 06 Nov 1994 08:49:37 GMT\r\n";
        for lines in [A, &[A, odd_date.as_bytes()].concat()] {
            let text = std::str::from_utf8(lines).unwrap();
            let mut fields = text.split("\r\n");
            let status = format!("{}\r\n", fields.next().unwrap());
            let mut writer = HeadWriter::new(&[status.as_bytes()], 0);
            for line in fields.filter(|l| !l.is_empty()) {
                let (wire, value) = line.split_once(": ").unwrap();
                let name = http::HeaderName::from_bytes(wire.as_bytes()).unwrap();
                writer.field(&name, wire.as_bytes(), value.as_bytes());
            }
            let (written, split) = (writer.finish(), Head::split(lines));
            assert!(written.shares_with(&split));
            assert_eq!(written.own, split.own);
            assert_eq!(written.to_vec(), split.to_vec());
        }
    }

    #[test]
    fn a_whole_head_reads_the_same_and_splits_on_request() {
        let whole = Head::whole(A.into());
        assert_eq!(whole.leading(), A);
        assert!(trailing(&whole).is_empty());
        assert!(whole.has_field(b"etag"));
        let split = whole.to_split();
        assert!(split.shares_with(&Head::split(A)));
        assert_eq!(split.to_vec().len(), A.len());
    }

    #[test]
    fn a_part_no_head_holds_is_dropped_by_a_later_sweep() {
        let lonely = b"HTTP/1.1 200 OK\r\nx-only-in-this-test: 1\r\n";
        drop(Head::split(lonely));
        // New parts until the table sweeps (other tests share it, so how many is not known).
        let sweeps = SHARED.sweeps();
        let mut kept = Vec::new();
        while SHARED.sweeps() == sweeps {
            let lines = format!("HTTP/1.1 200 OK\r\nx-sweep: {}\r\n", kept.len());
            kept.push(Head::split(lines.as_bytes()));
            assert!(kept.len() < 1 << 20, "the table never swept");
        }
        assert!(!SHARED.holds(lonely));
        assert!(kept.iter().all(|h| SHARED.holds(h.leading())));
    }
}
