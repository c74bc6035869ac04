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

/// Every shipped example and every file in `tests/configs/`; files named `bad-*` must be
/// refused, the rest accepted.
fn every_config() -> Vec<std::path::PathBuf> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut files = Vec::new();
    for dir in ["config", "config/fleet", "tests/configs"] {
        for entry in std::fs::read_dir(root.join(dir)).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                files.push(path);
            }
        }
    }
    files.sort();
    assert!(files.len() >= 10, "configs found: {files:?}");
    files
}

/// `text` with every loopback port replaced by a free one and every absolute file path moved
/// into `dir`, so that a config can run beside the other tests.
fn relocate(text: &str, dir: &std::path::Path) -> String {
    let ports = regex::Regex::new(r"(127\.0\.0\.1|0\.0\.0\.0):\d+").unwrap();
    let text = ports.replace_all(text, |_: &regex::Captures| {
        format!("127.0.0.1:{}", crate::support::free_port())
    });
    let paths = regex::Regex::new(r#""/(var|tmp)/([^"]*)""#).unwrap();
    paths
        .replace_all(&text, |c: &regex::Captures| {
            format!("\"{}\"", dir.join(c[2].replace('/', "_")).display())
        })
        .into_owned()
}

/// What `skua serve` does with a file: `Ok(())` once it listens, or the exit code it stopped with.
fn serve_outcome(path: &std::path::Path, listen: std::net::SocketAddr) -> Result<(), Option<i32>> {
    let mut child = Command::new(skua_bin())
        .args(["serve", "--config"])
        .arg(path)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let outcome = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break Err(status.code());
        }
        if std::net::TcpStream::connect(listen).is_ok() {
            break Ok(());
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{}: serve neither listened nor exited",
            path.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let _ = child.kill();
    let _ = child.wait();
    outcome
}

/// Regression: `check` passed files `serve` refused (a health-check path with a space) or
/// panicked on (a control character in its host), and `serve` exited 1 instead of 78.
#[test]
fn check_and_serve_agree_on_every_shipped_and_test_config() {
    for file in every_config() {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let dir = tempfile::tempdir().unwrap();
        let text = relocate(&std::fs::read_to_string(&file).unwrap(), dir.path());
        let path = dir.path().join(&name);
        std::fs::write(&path, &text).unwrap();
        let check = Command::new(skua_bin())
            .args(["check", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&check.stderr);
        let listen: std::net::SocketAddr = toml::from_str::<toml::Value>(&text).unwrap()["server"]
            ["listen"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        let serve = serve_outcome(&path, listen);
        if name.starts_with("bad-") {
            assert_eq!(check.status.code(), Some(78), "{name}: check accepted it");
            // Every problem names the file and its line (regression: a disk tier or access
            // log path the process could not use was named without its line).
            for problem in stderr.lines() {
                let line = problem
                    .split_once(&format!("{name}:"))
                    .map(|(_, rest)| rest);
                let number = line.and_then(|rest| rest.split_once(':')).map(|(n, _)| n);
                assert!(
                    number.is_some_and(|n| n.parse::<usize>().is_ok()),
                    "{name}: {problem}"
                );
            }
            assert_eq!(serve, Err(Some(78)), "{name}: serve and check disagree");
        } else {
            assert!(check.status.success(), "{name}: {stderr}");
            assert_eq!(
                serve,
                Ok(()),
                "{name}: check passed it, serve did not start"
            );
        }
    }
}

#[test]
fn bad_bus_and_balance_values_name_their_keys() {
    let text = "[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\nbalance = \"random\"\nretry_statuses = [503, 404]\n[purge.bus]\nservers = [\"nats://127.0.0.1:4222\"]\nnode = \"\"\ncatch_up = \"later\"\n[cache]\nttl_jitter = 2.0\n";
    let (code, stderr) = run_on("check", "fleet.toml", text);
    assert_eq!(code, Some(78), "{stderr}");
    for line in [
        "fleet.toml:4: origin[0].balance: must be \"round_robin\" or \"consistent\"",
        "fleet.toml:8: purge.bus.node: must be a non-empty id",
        "fleet.toml:9: purge.bus.catch_up: must be \"wait\" or \"revalidate\"",
        "fleet.toml:5: origin[0].retry_statuses[1]: must be a 5xx status, got 404",
        "fleet.toml:11: cache.ttl_jitter: must be between 0 and 0.5, got 2",
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

/// Regression: a wrong type or an unknown key stopped validation at the first problem, a type
/// error named no key (`multi.toml:4: "two": invalid type ...`), and a bad duration also
/// said "must be longer than zero". Every problem is reported once, with its key and line.
/// Regression: a wrong value in the second `[[origin]]` or inside a rule's inline table was
/// named `origin.addresses` or `rule.match`, not the key the other checks name
/// (`origin[1].addresses`, `rule[0].match.path`); the wrong value was reported again as what
/// it left behind ("missing field `addresses`", "has no action"); and a table given as a
/// number was "expected struct DenyFile", a name from the source code.
#[test]
fn a_wrong_value_is_named_by_its_full_key_once() {
    let text = "[[origin]]\nname = \"a\"\naddresses = [\"127.0.0.1:1\"]\n[[origin]]\nname = \"b\"\naddresses = \"127.0.0.1:2\"\n\n[[rule]]\nname = \"api\"\nmatch = { method = [\"GET\"], path = \"/w/api.php\" }\ndeny = 403\n";
    let (code, stderr) = run_on("check", "keys.toml", text);
    assert_eq!(code, Some(78), "{stderr}");
    let expected = [
        "keys.toml:6: origin[1].addresses: invalid type: string \"127.0.0.1:2\", expected a sequence",
        "keys.toml:10: rule[0].match.path: invalid type: string \"/w/api.php\", expected a sequence",
        "keys.toml:11: rule[0].deny: invalid type: integer `403`, expected a table, e.g. { status = 403, body = \"...\" }",
    ];
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    for (line, want) in lines.iter().zip(expected) {
        assert!(line.ends_with(want), "want {want:?} in:\n{stderr}");
    }
}

/// Regression: a tier smaller than its default largest object (`memory_size` under 8 MiB, a
/// disk `size` under 64 MiB) was refused for a key the file does not hold ("cache.disk.
/// max_object_size: must not exceed cache.disk.size"), and a memory_size under 1 MiB was
/// reported twice. The default is now the tier's size when that is smaller; a value the file
/// gives is still checked.
#[test]
fn a_small_tier_takes_its_size_as_the_default_largest_object() {
    let disk = tempfile::tempdir().unwrap();
    let tiers = format!(
        "[cache]\nmemory_size = 4194304\n[cache.disk]\npath = {:?}\nsize = 16777216\n",
        disk.path().join("cache")
    );
    let (code, stderr) = run_on("check", "small.toml", &tiers);
    assert_eq!(code, Some(0), "{stderr}");
    let given = "[cache]\nmemory_size = 4194304\nmax_object_size = 8388608\n";
    let (code, stderr) = run_on("check", "given.toml", given);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(
            "given.toml:3: cache.max_object_size: must not exceed cache.memory_size (4194304)"
        ),
        "{stderr}"
    );
    let (code, stderr) = run_on("check", "tiny.toml", "[cache]\nmemory_size = 1000\n");
    assert_eq!(code, Some(78), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("tiny.toml:2: cache.memory_size: must be at least"),
        "{stderr}"
    );
}

/// `[cache] fill_memory` must leave room for one fill of the largest object either tier
/// stores, or that object could never be stored; its default grows to that size.
#[test]
fn fill_memory_below_the_largest_object_is_refused_naming_it() {
    let disk = tempfile::tempdir().unwrap();
    let disk_table = format!(
        "[cache.disk]\npath = {:?}\nmax_object_size = 536870912\nsize = 1073741824\n",
        disk.path().join("cache")
    );
    let (code, stderr) = run_on("check", "default.toml", &format!("[cache]\n{disk_table}"));
    assert_eq!(code, Some(0), "{stderr}");
    let small = format!("[cache]\nfill_memory = 268435456\n{disk_table}");
    let (code, stderr) = run_on("check", "small.toml", &small);
    assert_eq!(code, Some(78), "{stderr}");
    assert!(
        stderr.contains(
            "small.toml:2: cache.fill_memory: must be at least the largest object stored \
             (536870912 bytes, from max_object_size), got 268435456"
        ),
        "{stderr}"
    );
}

#[test]
fn every_problem_is_reported_once_with_its_key_and_line() {
    let text = "[server]\nthreads = \"two\"\nnonsense = 1\n\n[cache]\nttl_cap = \"soon\"\nmemory_size = \"big\"\n\n[[origin]]\nname = \"o\"\naddresses = [\"127.0.0.1:1\"]\n[origin.health_check]\ninterval = \"often\"\n";
    let (code, stderr) = run_on("check", "multi.toml", text);
    assert_eq!(code, Some(78), "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    let expected = [
        "multi.toml:2: server.threads: invalid type",
        "multi.toml:3: server.nonsense: unknown field",
        "multi.toml:6: cache.ttl_cap: not a duration",
        "multi.toml:7: cache.memory_size: invalid type",
        "multi.toml:13: origin[0].health_check.interval: not a duration",
    ];
    for want in expected {
        assert!(
            lines.iter().filter(|l| l.contains(want)).count() == 1,
            "want {want:?} once in:\n{stderr}"
        );
    }
    assert_eq!(lines.len(), expected.len(), "{stderr}");
    assert!(!stderr.contains("longer than zero"), "{stderr}");
}
