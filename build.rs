//! Release builds of the `skua` binary are linked with the code that runs laid out together.
//!
//! The kernel maps a binary's code in 64 KiB blocks around each page it first runs
//! (fault-around). Laid out as the compiler left it, the few thousand functions a running
//! Skua executes are spread over most of its 12 MB of text, and most blocks end up resident:
//! about 10 MiB of RSS after a 10,000-page fill. `build/hot-code.txt` lists those functions
//! (recorded by `benches/hot-code.sh`); the linker places them first and the resident code
//! drops to about 8 MiB (benches/README.md section 3).
//!
//! The list names symbols; `rust-lld` (shipped with the Rust toolchain) is the linker that
//! takes such a list. Without it, or when a symbol no longer exists, the build is unchanged
//! apart from the layout; `tests/hot_code.rs` and `benches/hot-code-check.sh` fail when the list
//! has gone stale.
//!
//! Whether to lay out is decided by `SKUA_HOT_CODE_LAYOUT`: `on`, `off`, or unset for the
//! default, on for optimised builds (cargo's `PROFILE` is `release` for the release profile and
//! every profile that inherits from it, `bench` among them, so `cargo bench` measures the
//! binary as shipped) and off for the others. Only the `skua` binary is linked this way.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build/hot-code.txt");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SKUA_HOT_CODE_LAYOUT");
    let optimised = std::env::var("PROFILE").as_deref() == Ok("release");
    let layout = match std::env::var("SKUA_HOT_CODE_LAYOUT").as_deref() {
        Ok("on") => true,
        // benches/hot-code.sh profiles the compiler's own layout.
        Ok("off") => false,
        Err(_) => optimised,
        Ok(other) => {
            eprintln!("SKUA_HOT_CODE_LAYOUT={other:?}: write on or off, or unset it");
            std::process::exit(1);
        }
    };
    if !layout {
        return;
    }
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("-linux-gnu") {
        return;
    }
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default());
    let order = manifest.join("build").join("hot-code.txt");
    let Some(lld_dir) = rust_lld_dir(&target) else {
        println!("cargo:warning=rust-lld not found: linking without the hot-code layout");
        return;
    };
    if !order.is_file() {
        return;
    }
    // The linker reads a copy in OUT_DIR: cargo keeps a build script's output for a target
    // directory shared by two checkouts, and a path into the other checkout (gone, or holding
    // another list) would be linked against.
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").unwrap_or_default());
    let copy = out_dir.join("hot-code.txt");
    if let Err(e) = std::fs::copy(&order, &copy) {
        println!(
            "cargo:warning=cannot copy {}: {e}; linking without the hot-code layout",
            order.display()
        );
        return;
    }
    let order = copy;
    println!("cargo:rustc-link-arg-bins=-fuse-ld=lld");
    println!("cargo:rustc-link-arg-bins=-B{}", lld_dir.display());
    println!(
        "cargo:rustc-link-arg-bins=-Wl,--symbol-ordering-file={}",
        order.display()
    );
    // Symbols of an older layout that no longer exist are expected, not an error.
    println!("cargo:rustc-link-arg-bins=-Wl,--no-warn-symbol-ordering");
}

/// The `gcc-ld` directory of the toolchain's sysroot: an `ld.lld` that a C compiler driver
/// picks up with `-B` and `-fuse-ld=lld`.
fn rust_lld_dir(target: &str) -> Option<PathBuf> {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let out = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()?;
    let sysroot = String::from_utf8(out.stdout).ok()?;
    let dir = PathBuf::from(sysroot.trim())
        .join("lib/rustlib")
        .join(target)
        .join("bin/gcc-ld");
    dir.join("ld.lld").is_file().then_some(dir)
}
