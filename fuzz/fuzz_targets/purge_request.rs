//! PURGE requests come from the network (within the purge ACL): reading their target, tags
//! and mode never panics, and a target that parses names a canonical URL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pingora::http::RequestHeader;
use skua::cache::key::{CacheUrl, Scheme};
use skua::purge::http;

fuzz_target!(|data: &[u8]| {
    let mut parts = data.split(|b| *b == b'\n');
    let target = parts.next().unwrap_or(b"/");
    let Ok(mut req) = RequestHeader::build("PURGE", target, None) else {
        return;
    };
    for line in parts {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (
            ::http::HeaderName::from_bytes(name),
            ::http::HeaderValue::from_bytes(value),
        ) else {
            continue;
        };
        let _ = req.append_header(name, value);
    }
    if let Ok(url) = http::target(&req, Scheme::Http) {
        assert_eq!(CacheUrl::parse_absolute(&url.primary()).ok(), Some(url));
    }
    let _ = http::tags(&req);
    let _ = http::mode(&req);
    let _ = http::is_prefix_ban(&req);
});
