//! Cache-Control, CDN-Cache-Control, Expires, Age and Vary come from origins: deciding whether
//! and how long to store never panics, and nothing is fresh for longer than the TTL cap.
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
        if let Ok(value) = ::http::HeaderValue::from_bytes(value) {
            let _ = resp.append_header(NAMES[i % NAMES.len()], value);
        }
    }
    static POLICY: OnceLock<(StoragePolicy, Duration)> = OnceLock::new();
    let (policy, ttl_cap) = POLICY.get_or_init(|| {
        let config = skua::config::Config::defaults();
        (StoragePolicy::from(&config.cache), config.cache.ttl_cap)
    });
    let now = SystemTime::now();
    if let Ok(fresh) = policy.decide(&mut resp, first & 8 != 0, now) {
        let cap = *ttl_cap + Duration::from_secs(1);
        assert!(fresh.fresh_until <= now + cap, "fresher than the TTL cap");
    }
});
