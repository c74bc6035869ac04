//! The layering README's Layout section states: a module may use the modules in the layers
//! below its own, never one above it nor a sibling in its own layer. This reads every
//! `crate::<module>` path in `src/` and fails naming the file and line that breaks it.

use std::path::Path;

/// Lowest first.
const LAYERS: &[&[&str]] = &[
    &["config", "test_hooks"],
    &["cache"],
    &["rules"],
    &["metrics"],
    &["upstream", "purge"],
    // The admin port reaches the node through its own narrow handle, never the request path.
    &["proxy", "admin"],
    &["server"],
    &["demo"],
];

fn layer_of(module: &str) -> Option<usize> {
    LAYERS.iter().position(|l| l.contains(&module))
}

/// Every `.rs` file under `dir`.
fn sources(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn no_module_uses_one_above_it_or_a_sibling() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &mut files);
    let mut violations = Vec::new();
    let mut checked = 0;
    for file in &files {
        let relative = file.strip_prefix(&src).unwrap();
        let top = relative.components().next().unwrap().as_os_str();
        let module = top.to_string_lossy().trim_end_matches(".rs").to_string();
        if module == "lib" || module == "main" {
            continue;
        }
        let own = layer_of(&module)
            .unwrap_or_else(|| panic!("src/{module} is in no layer: add it to LAYERS and README"));
        let text = std::fs::read_to_string(file).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.trim_start();
            if code.starts_with("//") {
                continue;
            }
            for (at, _) in code.match_indices("crate::") {
                let used: String = code[at + "crate::".len()..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if used == module {
                    continue;
                }
                checked += 1;
                match layer_of(&used) {
                    Some(layer) if layer < own => {}
                    _ => violations.push(format!(
                        "src/{}:{}: {module} uses {used}",
                        relative.display(),
                        n + 1
                    )),
                }
            }
        }
    }
    assert!(checked > 20, "only {checked} crate paths found");
    assert!(violations.is_empty(), "{}", violations.join("\n"));
}
