//! The PROXY header opens a connection from a balancer, but its bytes are whatever arrived:
//! parsing never panics; a header found is no longer than what was read nor than the most
//! taken, and does not depend on what follows it; every shorter piece of it is "incomplete",
//! so a header that arrives in pieces is waited for, never refused.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skua::proxy::proxy_protocol::{parse, Parsed, MAX_HEADER_BYTES};

fuzz_target!(|data: &[u8]| {
    match parse(data) {
        Parsed::Header { len, .. } => {
            assert!(len <= data.len() && len <= MAX_HEADER_BYTES, "{len}");
            let alone = parse(&data[..len]);
            assert_eq!(alone, parse(data), "the header changed with what follows it");
            for cut in 0..len {
                assert_eq!(parse(&data[..cut]), Parsed::Incomplete, "cut at {cut}");
            }
        }
        Parsed::Incomplete => assert!(data.len() < MAX_HEADER_BYTES),
        Parsed::Malformed => {}
    }
});
