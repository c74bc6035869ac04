//! `Via` on the requests Skua forwards, and the forwarding loops it reveals. RFC 9110 §7.6.3:
//! "An HTTP-to-HTTP gateway MUST send an appropriate Via header field in each inbound request
//! message", each intermediary adding its own entry, so that "the Via header field is used
//! for ... avoiding request loops". A node whose origin is, by mistake, itself (or a balancer
//! in front of it, or a backend tier pointed back at the frontend) would otherwise pass one
//! request round until every connection is taken: one `POST` took all 200 connections of a
//! test node in 64 ms. Here a node names itself in `Via` with a pseudonym of its own, random
//! per process, and answers a request that already carries that pseudonym with 508 (Loop
//! Detected, RFC 5842 §7.2). Whether a request is forwarded at all, and how, is the request
//! path's; responses get no `Via` (the RFC's "MAY"; a hit stays the bytes stored).

use std::hash::{BuildHasher, Hasher};

/// This node's entry in `Via`.
#[derive(Debug, Clone)]
pub struct Via {
    /// `received-by`: `[server] name` and six random hex digits, unlike any other node's (a
    /// frontend and a backend tier usually share a name).
    pseudonym: String,
}

/// `received-protocol` (RFC 9110 §7.6.3: "the protocol version of the message received by the
/// server or client along each segment"; the name is omitted for HTTP).
fn received_protocol(version: http::Version) -> &'static str {
    match version {
        http::Version::HTTP_09 => "0.9",
        http::Version::HTTP_10 => "1.0",
        http::Version::HTTP_2 => "2",
        http::Version::HTTP_3 => "3",
        _ => "1.1",
    }
}

impl Via {
    pub fn new(name: &str) -> Via {
        // std's hasher keys are drawn from the operating system's random source per process.
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        Via {
            pseudonym: format!("{name}-{:06x}", random & 0xff_ffff),
        }
    }

    /// The `Via` value to forward: the request's own lines (one list, RFC 9110 §5.3), then this
    /// node's entry, naming the version the request arrived in.
    pub fn after<'a>(
        &self,
        lines: impl Iterator<Item = &'a [u8]>,
        received: http::Version,
    ) -> Vec<u8> {
        let mut value = Vec::with_capacity(64);
        for line in lines {
            value.extend_from_slice(line);
            value.extend_from_slice(b", ");
        }
        value.extend_from_slice(received_protocol(received).as_bytes());
        value.push(b' ');
        value.extend_from_slice(self.pseudonym.as_bytes());
        value
    }

    /// Whether `values` (a request's `Via` field lines) hold this node's entry: the request
    /// went through here already. `Via = #( received-protocol RWS received-by [ RWS comment ] )`.
    pub fn names_this_node<'a>(&self, values: impl Iterator<Item = &'a [u8]>) -> bool {
        values
            .flat_map(|line| line.split(|b| *b == b','))
            .any(|member| {
                let mut words = member
                    .split(|b| b.is_ascii_whitespace())
                    .filter(|w| !w.is_empty());
                words.next().is_some() && words.next() == Some(self.pseudonym.as_bytes())
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `via` appends to a request that arrived over HTTP/1.1 with no `Via` of its own.
    fn entry_of(via: &Via) -> String {
        String::from_utf8(via.after(std::iter::empty(), http::Version::HTTP_11)).unwrap()
    }

    #[test]
    fn a_request_that_passed_here_is_known_by_the_pseudonym_alone() {
        let via = Via::new("skua");
        let entry = entry_of(&via);
        fn lines<'a>(v: &[&'a str]) -> Vec<&'a [u8]> {
            v.iter().map(|s| s.as_bytes()).collect()
        }
        assert!(via.names_this_node(lines(&[&entry]).into_iter()));
        let chained = format!("1.0 fred, 1.1 p.example.net (Apache/1.1) ,{entry} (skua)");
        assert!(via.names_this_node([chained.as_bytes()].into_iter()));
        let second_line = [&b"1.1 balancer"[..], entry.as_bytes()];
        assert!(via.names_this_node(second_line.into_iter()));
        // Another node of the same name (a frontend tier), or the name alone.
        let other = Via::new("skua");
        assert_ne!(entry_of(&other), entry);
        assert!(!via.names_this_node([entry_of(&other).as_bytes()].into_iter()));
        for not_here in ["1.1 skua", "skua", "", "1.1", "1.1 x (skua-000000)"] {
            assert!(
                !via.names_this_node(lines(&[not_here]).into_iter()),
                "{not_here}"
            );
        }
    }

    #[test]
    fn the_entry_names_the_version_the_request_arrived_in() {
        let via = Via::new("edge");
        let h2 = via.after([&b"1.0 fred"[..]].into_iter(), http::Version::HTTP_2);
        let h2 = String::from_utf8(h2).unwrap();
        assert_eq!(h2, format!("1.0 fred, 2 {}", via.pseudonym));
        assert_eq!(entry_of(&via), format!("1.1 {}", via.pseudonym));
        assert!(via.names_this_node([h2.as_bytes()].into_iter()));
    }
}
