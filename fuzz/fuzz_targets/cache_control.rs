//! Cache-Control, CDN-Cache-Control, Expires, Age and Vary come from origins: deciding whether
//! and how long to store never panics, nothing is fresh for longer than the TTL cap, and a
//! rule's lifetime never stores what the response forbids storing.
#![no_main]

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use libfuzzer_sys::fuzz_target;
use pingora::http::ResponseHeader;
use skua::cache::policy::StoragePolicy;

const NAMES: [&str; 8] = [
    "cache-control",
    "cdn-cache-control",
    "expires",
    "age",
    "vary",
    "last-modified",
    "date",
    "set-cookie",
];

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    let status = [200u16, 203, 301, 302, 404, 410, 500, 206][(first & 7) as usize];
    let Ok(mut resp) = ResponseHeader::build(status, None) else {
        return;
    };
    for (i, value) in rest.split(|b| *b == b'\n').enumerate() {
        // As a field value arrives: without leading or trailing whitespace (RFC 9110 §5.5;
        // httparse strips it, RFC 9113 §8.2.1 makes HTTP/2's malformed). Regression: a value
        // opening with tabs, which no parser delivers, made this target's own reading and the
        // policy's (pingora's grammar: a directive at the start of the line) disagree.
        let value = value.trim_ascii();
        if let Ok(value) = ::http::HeaderValue::from_bytes(value) {
            let _ = resp.append_header(NAMES[i % NAMES.len()], value);
        }
    }
    static POLICY: OnceLock<(StoragePolicy, Duration)> = OnceLock::new();
    let (policy, ttl_cap) = POLICY.get_or_init(|| {
        let config = skua::config::Config::defaults();
        (StoragePolicy::from(&config.cache), config.cache.ttl_cap)
    });
    let forbidden = forbids_storing(&resp);
    let now = SystemTime::now();
    // A rule's lifetime replaces the origin's, never what forbids storing.
    let ttl_rule = (first & 16 != 0).then_some((Duration::from_secs(60), None));
    if let Ok(fresh) = policy.decide(&mut resp, first & 8 != 0, now, ttl_rule) {
        let cap = *ttl_cap + Duration::from_secs(1);
        assert!(fresh.fresh_until <= now + cap, "fresher than the TTL cap");
        assert!(!forbidden, "stored a response marked private or no-store: {resp:?}");
    }
});

/// Whether the response's Cache-Control says plainly (a bare `no-store` or `private` among
/// unquoted directives) that a shared cache must not store it (RFC 9111 §5.2.2.3, §5.2.2.7),
/// read here independently of the parser the policy uses. A CDN-Cache-Control field replaces
/// Cache-Control for a CDN (RFC 9213 §2.1), so responses that carry one are not judged here.
fn forbids_storing(resp: &ResponseHeader) -> bool {
    if resp.headers.contains_key("cdn-cache-control") {
        return false;
    }
    resp.headers.get_all("cache-control").iter().any(|value| {
        let Ok(value) = value.to_str() else {
            return false;
        };
        !value.contains('"')
            && value.split(',').any(|directive| {
                let name = directive.trim();
                name.eq_ignore_ascii_case("no-store") || name.eq_ignore_ascii_case("private")
            })
    })
}
