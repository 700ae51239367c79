//! The house's layering, checked on the source: each top-level module of `src/` may use
//! only the modules listed for it here, all of them lower in the picture that
//! `docs/ARCHITECTURE.md` draws. A `use` that points up, a pair of modules that use each
//! other, or a new module nobody placed fails this test.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// Each module and the modules it may use, bottom layer first.
const LAYERS: &[(&str, &[&str])] = &[
    ("file_error", &[]),
    ("packet", &[]),
    ("identity", &[]),
    ("proto", &["identity"]),
    ("io", &[]),
    ("telemetry", &[]),
    ("policy", &["file_error", "identity"]),
    ("config", &["file_error", "identity", "policy"]),
    (
        "kubernetes",
        &["config", "file_error", "identity", "policy"],
    ),
    ("node", &["config", "identity", "packet", "policy", "proto"]),
    ("ops", &["identity", "node", "proto"]),
    (
        "daemon",
        &[
            "config",
            "file_error",
            "identity",
            "io",
            "kubernetes",
            "node",
            "ops",
            "packet",
            "policy",
            "proto",
            "telemetry",
        ],
    ),
    (
        "testbed",
        &[
            "config", "identity", "node", "ops", "packet", "policy", "proto",
        ],
    ),
    ("demo", &["testbed"]),
    (
        "cli",
        &[
            "config",
            "daemon",
            "demo",
            "file_error",
            "identity",
            "kubernetes",
            "ops",
            "policy",
            "telemetry",
        ],
    ),
];

fn rust_files(path: &Path, out: &mut Vec<PathBuf>) {
    if path.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        entries.sort();
        for entry in entries {
            rust_files(&entry, out);
        }
    } else if path.is_file() && path.extension().is_some_and(|e| e == "rs") {
        out.push(path.to_path_buf());
    }
}

/// The first path segment after each `crate::` in `code`, including every name of a
/// `crate::{a, b::c}` group.
fn crate_modules(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let ident = |s: &str| -> String {
        s.trim_start()
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect()
    };
    for (at, _) in code.match_indices("crate::") {
        let rest = &code[at + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let mut depth = 0;
            let mut item = String::new();
            let mut items = Vec::new();
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        items.push(std::mem::take(&mut item));
                        continue;
                    }
                    _ => {}
                }
                item.push(c);
            }
            items.push(item);
            found.extend(items.iter().map(|i| ident(i)).filter(|i| !i.is_empty()));
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

/// The code of a file without its comments (doc links name modules without using them).
fn code_of(path: &Path) -> String {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|line| !line.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

#[test]
fn modules_use_only_the_layers_below_them() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let allowed: BTreeMap<&str, &[&str]> = LAYERS.iter().copied().collect();
    let mut modules: Vec<String> = std::fs::read_dir(&src)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir() || p.extension().is_some_and(|e| e == "rs"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|name| name != "lib" && name != "main")
        .collect();
    modules.sort();
    let mut wrong = Vec::new();
    for module in &modules {
        let Some(may_use) = allowed.get(module.as_str()) else {
            wrong.push(format!("src/{module} has no place in LAYERS"));
            continue;
        };
        let mut files = Vec::new();
        rust_files(&src.join(module), &mut files);
        rust_files(&src.join(format!("{module}.rs")), &mut files);
        for file in files {
            for used in crate_modules(&code_of(&file)) {
                if used != *module && !may_use.contains(&used.as_str()) {
                    wrong.push(format!(
                        "{} uses crate::{used}, which {module} may not",
                        file.strip_prefix(&src).unwrap().display()
                    ));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "layering broken:\n{}", wrong.join("\n"));

    // The allowed uses themselves point only downwards: no module may use one listed
    // after it, so no two modules can use each other.
    for (position, (module, may_use)) in LAYERS.iter().enumerate() {
        for used in *may_use {
            let below = LAYERS[..position].iter().any(|(m, _)| m == used);
            assert!(below, "{module} may use {used}, which is not below it");
        }
    }
}

#[test]
fn the_scanner_sees_every_form_of_use() {
    let code = "use crate::a::B;\nuse crate::{b, c::{D, E}, d::F};\nlet x = crate::e::f();";
    let found: Vec<String> = crate_modules(code).into_iter().collect();
    assert_eq!(found, ["a", "b", "c", "d", "e"]);
}
