//! The config loader reads operator files: any text gives a Config or a list of errors that
//! each name a key and a line inside the text, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(errors) = skua::config::Config::parse(text, "fuzz.toml") {
        let lines = text.lines().count().max(1);
        for e in &errors.errors {
            if let Some(line) = e.line {
                assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}: {e:?}");
            }
        }
    }
});
