//! `build/hot-code.txt` names the functions a release build lays out first (`build.rs`,
//! benches/README.md §3), by symbol. The linker skips a name it cannot find without a word, so
//! the layout can stop working unseen. A symbol's name is its function's path plus a compiler
//! hash; the hash follows from the toolchain and the dependency graph (`Cargo.lock`), and the
//! path from the code. CI builds no release binary (its fat-LTO link would take most of CI's
//! time), so this checks what the names follow from, on the debug build the tests run:
//! - the toolchain, lock file and dependency features are those the list was recorded with
//!   (`build/hot-code.recorded`, written by `benches/hot-code.sh`), so the hashes still hold
//!   (another toolchain is a failure on CI and a note elsewhere: a user's build works with
//!   any, only without the layout's saving);
//! - at least 90 % of the list's Skua functions still exist by path in this build, so the
//!   code has not moved away from it.
//!
//! `benches/hot-code-check.sh` checks a release binary itself before every harness run.

use std::collections::HashSet;
use std::path::Path;
use std::process::Command;

use crate::support::prerequisite_missing;

const MIN_PERCENT: usize = 90;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The SHA-256 of `text` in hex, as `sha256sum` prints it.
fn sha256(text: &str) -> String {
    use std::io::Write;
    let mut child = Command::new("sha256sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("sha256sum");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(text.as_bytes()).expect("sha256sum's input");
    }
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("")
        .to_string()
}

fn output(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(out.status.success(), "{cmd} {args:?} failed");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A legacy-mangled symbol without its hash (`17h` + 16 hex digits + `E`), i.e. its path.
fn path_of(symbol: &str) -> &str {
    match symbol.len().checked_sub(20) {
        Some(at) if symbol[at..].starts_with("17h") && symbol.ends_with('E') => &symbol[..at],
        _ => symbol,
    }
}

#[test]
fn the_hot_code_list_still_names_this_build() {
    let recorded = std::fs::read_to_string(root().join("build/hot-code.recorded"))
        .expect("build/hot-code.recorded: run benches/hot-code.sh");
    let field = |name: &str| {
        recorded
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("build/hot-code.recorded has no {name:?} line"))
            .trim()
            .to_string()
    };
    let lock = output("sha256sum", &["Cargo.lock"]);
    assert_eq!(
        field("Cargo.lock "),
        lock.split_whitespace().next().unwrap_or(""),
        "Cargo.lock changed since build/hot-code.txt was recorded, so its symbol hashes no \
         longer match a release build: rerun benches/hot-code.sh"
    );
    // Regression: enabling a feature of a dependency (rustix's `fs`) left the lock file as it
    // was but changed every Skua symbol's hash; a release build then laid out 63 % of the
    // list, and only benches/hot-code-check.sh said so.
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let tree = output(
        &cargo,
        &[
            "tree",
            "--offline",
            "--locked",
            "--edges",
            "normal,build",
            "--prefix",
            "none",
            "--format",
            "{p} {f}",
        ],
    );
    // A path package is named with its directory (`skua v0.1.0 (/work/skua)`), which says
    // nothing about its symbols: left out, as benches/hot-code.sh leaves it out.
    let mut lines: Vec<String> = tree
        .lines()
        .map(|line| match line.find(" (/") {
            Some(start) => match line[start..].find(')') {
                Some(end) => format!("{}{}", &line[..start], &line[start + end + 1..]),
                None => line.to_string(),
            },
            None => line.to_string(),
        })
        .collect();
    lines.sort_unstable();
    lines.dedup();
    let mut sorted = lines.join("\n");
    sorted.push('\n');
    assert_eq!(
        field("features "),
        sha256(&sorted),
        "a dependency's features changed since build/hot-code.txt was recorded, so its symbol \
         hashes no longer match a release build: rerun benches/hot-code.sh"
    );
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let toolchain = output(&rustc, &["-V"]);
    if field("toolchain ") != toolchain.trim() {
        // Another toolchain than the project's builds and runs the same, only without the
        // layout's saving; that is a failure where the project is built for release (CI),
        // and said here everywhere else.
        prerequisite_missing(&format!(
            "{} to match build/hot-code.txt's symbol hashes (this is {})",
            field("toolchain "),
            toolchain.trim()
        ));
        return;
    }

    let list = std::fs::read_to_string(root().join("build/hot-code.txt")).unwrap();
    let ours: Vec<&str> = list
        .lines()
        .filter(|s| s.starts_with("_ZN4skua"))
        .map(path_of)
        .collect();
    assert!(
        ours.len() >= 20,
        "the list names {} Skua functions",
        ours.len()
    );
    let binary = env!("CARGO_BIN_EXE_skua");
    let symbols = output("nm", &["--defined-only", binary]);
    let present: HashSet<&str> = symbols
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .map(path_of)
        .collect();
    let found = ours.iter().filter(|p| present.contains(*p)).count();
    let missing: Vec<&&str> = ours.iter().filter(|p| !present.contains(*p)).collect();
    assert!(
        found * 100 >= ours.len() * MIN_PERCENT,
        "only {found} of the {} Skua functions build/hot-code.txt lays out still exist: rerun \
         benches/hot-code.sh. Gone: {missing:?}",
        ours.len()
    );
}
