//! The HTCP parser takes datagrams from the network: no input may panic it, and whatever it
//! accepts must survive a round trip through the builder.
#![no_main]

use libfuzzer_sys::fuzz_target;
use skua::purge::htcp;

fuzz_target!(|data: &[u8]| {
    if let Ok(clr) = htcp::parse(data) {
        let op = data[6];
        let again = htcp::parse(&htcp::build_raw(&clr, op)).expect("a rebuilt CLR parses");
        assert_eq!(again.uri, clr.uri);
        assert_eq!(again.trans_id, clr.trans_id);
    }
});
