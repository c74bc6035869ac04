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
fn shipped_example_configs_are_valid() {
    for file in [
        "skua.toml",
        "bench.toml",
        "bench-disk.toml",
        "fleet/frontend.toml",
        "fleet/backend1.toml",
        "fleet/backend2.toml",
    ] {
        let path = format!("{}/config/{file}", env!("CARGO_MANIFEST_DIR"));
        let out = Command::new(skua_bin())
            .args(["check", "--config", &path])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{file}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

#[test]
fn bad_bus_and_balance_values_name_their_keys() {
    let text = "[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\nbalance = \"random\"\n\n[purge.bus]\nservers = [\"nats://127.0.0.1:4222\"]\nnode = \"\"\ncatch_up = \"later\"\n";
    let (code, stderr) = run_on("check", "fleet.toml", text);
    assert_eq!(code, Some(78), "{stderr}");
    for line in [
        "fleet.toml:4: origin[0].balance: must be \"round_robin\" or \"consistent\"",
        "fleet.toml:8: purge.bus.node: must be a non-empty id",
        "fleet.toml:9: purge.bus.catch_up: must be \"wait\" or \"revalidate\"",
    ] {
        assert!(stderr.contains(line), "missing {line:?} in:\n{stderr}");
    }
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
