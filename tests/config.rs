//! The CLI's configuration checks, as an operator runs them.

use std::process::Command;

use crate::support::skua_bin;

/// Writes `text` to a temporary `name` and runs `skua <command> --config` on it: the exit
/// code and what it printed on stderr.
fn run_on(command: &str, name: &str, text: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    let out = Command::new(skua_bin())
        .args([command, "--config"])
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn shipped_example_config_is_valid() {
    let out = Command::new(skua_bin())
        .args([
            "check",
            "--config",
            concat!(env!("CARGO_MANIFEST_DIR"), "/config/skua.toml"),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const BAD: &str = "[server]\nthreads = 2\n\n[cache]\nmemory_size = 1048576\nttl_cap = \"forever\"\n\n[purge]\nallow = [\"127.0.0.0/33\"]\n";

#[test]
fn bad_config_exits_78_naming_key_and_line() {
    let (code, stderr) = run_on("check", "bad.toml", BAD);
    assert_eq!(code, Some(78));
    assert!(
        stderr.contains("bad.toml:6: cache.ttl_cap: not a duration"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.toml:9: purge.allow[0]: not a CIDR"),
        "{stderr}"
    );
    // `serve` refuses the same file the same way.
    assert_eq!(run_on("serve", "bad.toml", BAD).0, Some(78));
}

#[test]
fn unknown_key_exits_78_naming_key_and_line() {
    let (code, stderr) = run_on(
        "check",
        "typo.toml",
        "[cache]\nmemory_size = 1048576\nmax_objet_size = 5\n",
    );
    assert_eq!(code, Some(78));
    assert!(stderr.contains("typo.toml:3:"), "{stderr}");
    assert!(stderr.contains("max_objet_size"), "{stderr}");
}
