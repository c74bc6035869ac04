//! The cache key canonicaliser reads Host headers and request targets from the network: it
//! never panics, and a canonical key is a fixed point (canonicalising it again changes nothing).
//! So is MediaWiki's spelling of its path (`normalize_path = "mediawiki"`), which is a target
//! Skua's own normal form leaves as it is.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skua::cache::key::{CacheUrl, Scheme};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (authority, path) = text.split_once('\n').unwrap_or((text, "/"));
    for scheme in [Scheme::Http, Scheme::Https] {
        if let Ok(url) = CacheUrl::new(scheme, authority, path) {
            let again = CacheUrl::parse_absolute(&url.primary()).expect("a canonical URL parses");
            assert_eq!(again, url);
            assert_eq!(again.primary_hash(), url.primary_hash());
            let spelled = skua::rules::path::mediawiki(&url.path_and_query);
            let respelled = CacheUrl::new(scheme, &url.host, &spelled)
                .expect("MediaWiki's spelling is a request target");
            assert_eq!(respelled.path_and_query, spelled);
            assert_eq!(skua::rules::path::mediawiki(&spelled), spelled);
        }
    }
    let _ = CacheUrl::parse_absolute(text);
});
