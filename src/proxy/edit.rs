//! Header edits a `[[rule]]` asks for (`request_headers`, `response_headers`), applied to a
//! head as pingora holds it, or to a hit's head as the front door writes it. Order: `remove`,
//! then `set` (which replaces), then `append`. Which rule's edits apply is decided in
//! `crate::rules`; which fields may be edited at all, in `crate::config::rules`.

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

use crate::cache::meta::FieldNames;
use crate::config::rules::HeaderEdits;
use crate::rules::WireEdits;

pub fn request(req: &mut RequestHeader, edits: &HeaderEdits) -> Result<()> {
    for name in &edits.remove {
        req.remove_header(name);
    }
    for (name, value) in &edits.set {
        req.insert_header(name.clone(), value.clone())?;
    }
    for (name, value) in &edits.append {
        req.append_header(name.clone(), value.clone())?;
    }
    Ok(())
}

pub fn response(resp: &mut ResponseHeader, edits: &HeaderEdits) -> Result<()> {
    for name in &edits.remove {
        resp.remove_header(name);
    }
    for (name, value) in &edits.set {
        resp.insert_header(name.clone(), value.clone())?;
    }
    for (name, value) in &edits.append {
        resp.append_header(name.clone(), value.clone())?;
    }
    Ok(())
}

/// Applies `edits` to the head at the end of `out` (a status line, fields, and the blank line
/// that ends them, from `start`), in place. Every field name in it must be spelled as
/// [`wire_name`](crate::cache::meta::wire_name) spells it, as a hit's head is
/// (`hit::write_head`): a field is then found by one search for its line, and only when
/// `names` (the stored header's) may have it, and the added lines are one copy. A hit pays a
/// few dozen instructions for the edits instead of a pass over every line.
pub fn wire(out: &mut Vec<u8>, start: usize, edits: &WireEdits, names: FieldNames) {
    for line_start in edits.lines.iter().filter(|l| names.may_have(l.bit)) {
        while let Some(at) = line_start.finder.find(&out[start..]) {
            let line = start + at + 2;
            let end = memchr::memchr(b'\n', &out[line..]).map_or(out.len(), |e| line + e + 1);
            out.drain(line..end);
        }
    }
    // The blank line goes back after the added fields (it ends `added`).
    if out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    out.extend_from_slice(&edits.added);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::{HeaderName, HeaderValue};

    #[test]
    fn a_written_head_is_edited_as_a_parsed_one_is() {
        let edits = HeaderEdits {
            set: vec![(
                HeaderName::from_static("x-frame-options"),
                HeaderValue::from_static("DENY"),
            )],
            append: vec![(
                HeaderName::from_static("vary"),
                HeaderValue::from_static("Cookie"),
            )],
            remove: vec![HeaderName::from_static("x-powered-by")],
        };
        // Spelled as a hit's head is (`wire_name`): lower case but for a dozen names.
        let head = b"HTTP/1.1 200 OK\r\nx-powered-by: PHP\r\nvary: Accept-Encoding\r\nx-frame-options: SAMEORIGIN\r\nx-powered-by: again\r\nContent-Length: 2\r\n\r\n";
        let wire_edits = WireEdits::new(Some(&edits));
        // Whether or not the stored names are known, the same edits.
        let stored = crate::cache::meta::decode_head(head);
        let mut edited = head.to_vec();
        wire(&mut edited, 0, &wire_edits, FieldNames::of(&stored.headers));
        let mut edited_not_knowing = head.to_vec();
        wire(&mut edited_not_knowing, 0, &wire_edits, FieldNames::ANY);
        assert_eq!(edited, edited_not_knowing);
        assert_eq!(
            String::from_utf8(edited.clone()).unwrap(),
            "HTTP/1.1 200 OK\r\nvary: Accept-Encoding\r\nContent-Length: 2\r\nx-frame-options: DENY\r\nvary: Cookie\r\n\r\n"
        );
        let mut parsed = crate::cache::meta::decode_head(head);
        response(&mut parsed, &edits).unwrap();
        let from_wire = crate::cache::meta::decode_head(&edited);
        let fields = |r: &ResponseHeader| {
            let mut all: Vec<(String, String)> = (r.headers.iter())
                .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
                .collect();
            all.sort();
            all
        };
        assert_eq!(fields(&parsed), fields(&from_wire));
    }
}
