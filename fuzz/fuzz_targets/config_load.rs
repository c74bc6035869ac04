//! The config loader reads operator files: any text gives a Config or a list of errors that
//! each name a key and a line inside the text, never a panic; and a Config that loads also
//! builds (`skua check` and `skua serve` agree on it: the bug where a health-check path with
//! a space passed validation and failed in `serve` would fail here).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match skua::config::Config::parse(text, "fuzz.toml") {
        Ok(config) => {
            if let Err(e) = skua::server::preflight(&config) {
                panic!("validated but does not build: {e:#}");
            }
        }
        Err(errors) => {
            let lines = text.lines().count().max(1);
            for e in &errors.errors {
                if let Some(line) = e.line {
                    assert!(line >= 1 && line <= lines + 1, "line {line} of {lines}: {e:?}");
                }
            }
        }
    }
});
