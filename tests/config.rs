//! The CLI's configuration checks, as an operator runs them.

use std::process::Command;

use crate::support::skua_bin;

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

#[test]
fn bad_config_exits_78_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[server]\nthreads = 2\n\n[cache]\nmemory_size = 1048576\nttl_cap = \"forever\"\n\n[purge]\nallow = [\"127.0.0.0/33\"]\n",
    )
    .unwrap();
    let out = Command::new(skua_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:6: cache.ttl_cap: not a duration"),
        "{stderr}"
    );
    assert!(
        stderr.contains("bad.toml:9: purge.allow[0]: not a CIDR"),
        "{stderr}"
    );

    // `serve` refuses the same file the same way.
    let out = Command::new(skua_bin())
        .args(["serve", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
}

#[test]
fn unknown_key_exits_78_naming_key_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("typo.toml");
    std::fs::write(
        &path,
        "[cache]\nmemory_size = 1048576\nmax_objet_size = 5\n",
    )
    .unwrap();
    let out = Command::new(skua_bin())
        .args(["check", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("typo.toml:3:"), "{stderr}");
    assert!(stderr.contains("max_objet_size"), "{stderr}");
}
