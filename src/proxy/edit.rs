//! Header edits a `[[rule]]` asks for (`request_headers`, `response_headers`), applied to a
//! head as pingora holds it, or to a hit's head as the front door writes it. Order: `remove`,
//! then `set` (which replaces), then `append`. Which rule's edits apply is decided in
//! `crate::rules`; which fields may be edited at all, in `crate::config::rules`.

use pingora::http::{RequestHeader, ResponseHeader};
use pingora::Result;

use crate::cache::meta::wire_name;
use crate::config::rules::HeaderEdits;

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
/// [`wire_name`] spells it, as a hit's head is (`hit::write_head`): a field is then found by
/// one search for its line (`lines`: a finder for `\r\n<name>:` of each field `edits` remove,
/// then of each they set, built once per rule set), and a hit pays a few hundred
/// instructions for the edits instead of a pass over every line.
pub fn wire(
    out: &mut Vec<u8>,
    start: usize,
    edits: &HeaderEdits,
    lines: &[memchr::memmem::Finder<'_>],
) {
    for line_start in lines {
        while let Some(at) = line_start.find(&out[start..]) {
            let line = start + at + 2;
            let end = memchr::memchr(b'\n', &out[line..]).map_or(out.len(), |e| line + e + 1);
            out.drain(line..end);
        }
    }
    // The blank line goes back after the added fields.
    if out.ends_with(b"\r\n\r\n") {
        out.truncate(out.len() - 2);
    }
    for (name, value) in edits.set.iter().chain(&edits.append) {
        out.extend_from_slice(wire_name(name).as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// What [`wire`] adds to a head at most, to reserve before writing it.
pub fn added_bytes(edits: &HeaderEdits) -> usize {
    (edits.set.iter().chain(&edits.append))
        .map(|(n, v)| n.as_str().len() + v.len() + 4)
        .sum()
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
        let lines: Vec<_> = (edits.remove.iter().chain(edits.set.iter().map(|(n, _)| n)))
            .map(|n| format!("\r\n{}:", wire_name(n)))
            .collect();
        let finders: Vec<_> = lines.iter().map(memchr::memmem::Finder::new).collect();
        let mut edited = head.to_vec();
        wire(&mut edited, 0, &edits, &finders);
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
