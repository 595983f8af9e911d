//! House rules for the workspace's Rust sources, checked as rust-analyzer's xtask checks
//! its own: every file opens with a `//!` paragraph saying what it is, no line (comments
//! included) is wider than 120 columns, and no function takes so many arguments that
//! clippy's `too_many_arguments` has to be silenced (give it a job struct).

use std::fs;
use std::path::{Path, PathBuf};

use vm_tests::workspace_root;

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        let name = entry.file_name();
        if name == "target" || name.to_string_lossy().starts_with('.') {
            continue;
        }
        if path.is_dir() {
            rust_sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn sources_have_module_docs_narrow_lines_and_no_silenced_argument_lists() {
    let root = workspace_root();
    let mut files = Vec::new();
    for dir in ["xtask", "vm-xtask", "vms", "guest", "os-configs", "tests", "examples"] {
        rust_sources(&root.join(dir), &mut files);
    }
    assert!(files.len() > 50, "found only {} Rust files under {}", files.len(), root.display());
    let mut problems = Vec::new();
    let silenced = ["allow(clippy::", "too_many_arguments)"].concat();
    for file in &files {
        let text = fs::read_to_string(file).unwrap();
        let shown = file.strip_prefix(&root).unwrap_or(file).display().to_string();
        if !text.starts_with("//!") {
            problems.push(format!("{shown}: does not open with a `//!` paragraph"));
        }
        for (n, line) in text.lines().enumerate() {
            if line.chars().count() > 120 {
                problems.push(format!("{shown}:{}: {} columns (at most 120)", n + 1, line.chars().count()));
            }
            if line.contains(&silenced) {
                problems.push(format!("{shown}:{}: clippy's too_many_arguments silenced", n + 1));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

/// The engine's layers, bottom first: a module may import its own layer's and lower
/// layers' modules only (ARCHITECTURE.md, "Layers"). The longest matching prefix names a
/// module's layer.
const LAYERS: &[(&str, usize)] = &[
    ("error", 0),
    ("parse", 0),
    ("process", 0),
    ("progress", 0),
    ("workspace", 0),
    ("store", 1),
    ("host", 2),
    ("report", 2),
    ("sources", 2),
    ("substitute", 3),
    ("debian", 4),
    ("lower", 5),
    ("vm", 6),
    ("image", 7),
    ("machine", 8),
    ("vm::scenario", 9),
    ("suite", 9),
    ("catalog", 10),
    ("cmd", 11),
    ("cli", 12),
    ("", 13),
];

/// What the crate root re-exports, by the module that defines it.
/// (`systems` is the vocabulary crate's, outside the engine.)
const ROOT_ITEMS: &[(&str, &str)] = &[
    ("Workspace", "workspace"),
    ("Catalog", "catalog"),
    ("Driver", "vm::scenario"),
    ("Scenario", "vm::scenario"),
    ("systems", ""),
];

fn layer_of(module: &str) -> Option<(&'static str, usize)> {
    LAYERS
        .iter()
        .filter(|(prefix, _)| module == *prefix || prefix.is_empty() || module.starts_with(&format!("{prefix}::")))
        .max_by_key(|(prefix, _)| prefix.len())
        .copied()
}

/// The module paths `text` (a file of module `module`) imports from its own crate:
/// `crate::a::b` and `super::a`, outside comments and test modules.
fn imports(module: &str, text: &str) -> Vec<String> {
    let code = text.split("\n#[cfg(test)]\nmod tests").next().unwrap_or(text);
    let mut found = Vec::new();
    for line in code.lines() {
        let line = line.split("//").next().unwrap_or("");
        for (prefix, base) in [("crate::", String::new()), ("super::", parent(module))] {
            let mut rest = line;
            while let Some(at) = rest.find(prefix) {
                let before = rest[..at].chars().last();
                rest = &rest[at + prefix.len()..];
                if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                    continue;
                }
                let path: String =
                    rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_' || *c == ':').collect();
                let mut parts: Vec<&str> = path.split("::").filter(|p| !p.is_empty()).collect();
                if let Some(first) = parts.first() {
                    if let Some((_, defined)) = ROOT_ITEMS.iter().find(|(item, _)| item == first) {
                        if !defined.is_empty() {
                            found.push(defined.to_string());
                        }
                        continue;
                    }
                }
                parts.retain(|p| p.chars().next().is_some_and(|c| c.is_ascii_lowercase()));
                if parts.is_empty() {
                    continue;
                }
                let joined = parts.join("::");
                found.push(if base.is_empty() { joined } else { format!("{base}::{joined}") });
            }
        }
    }
    found
}

fn parent(module: &str) -> String {
    module.rsplit_once("::").map(|(p, _)| p.to_string()).unwrap_or_default()
}

/// The import graph between the engine's layers' modules: (from, to) -> count.
fn engine_imports() -> std::collections::BTreeMap<(&'static str, &'static str), usize> {
    let src = workspace_root().join("vm-xtask/src");
    let mut files = Vec::new();
    rust_sources(&src, &mut files);
    let mut edges = std::collections::BTreeMap::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap().with_extension("");
        let mut parts: Vec<String> = rel.iter().map(|p| p.to_string_lossy().into_owned()).collect();
        if parts == ["lib"] {
            parts.clear();
        }
        let module = parts.join("::");
        let (from, _) = layer_of(&module).unwrap();
        for import in imports(&module, &fs::read_to_string(&file).unwrap()) {
            // The longest prefix of the import that is a module of some layer.
            let (to, _) = layer_of(&import).unwrap();
            if to != from {
                *edges.entry((from, to)).or_insert(0) += 1;
            }
        }
    }
    edges
}

/// The layering rules of ARCHITECTURE.md hold: nothing imports a module of a higher
/// layer (so nothing outside `cmd/` imports `cmd`, the store does not reach the
/// registries, `vm/` does not reach the machine layer), and there is no import circle.
#[test]
fn the_engine_imports_only_downwards_and_has_no_import_circle() {
    let edges = engine_imports();
    assert!(edges.len() > 20, "found only {} imports between modules: is the scan broken?", edges.len());
    let level = |m: &str| layer_of(m).unwrap().1;
    let upward: Vec<String> = edges
        .iter()
        .filter(|((from, to), _)| level(to) > level(from))
        .map(|((from, to), n)| format!("{from} (layer {}) imports {to} (layer {}) {n} times", level(from), level(to)))
        .collect();
    assert!(upward.is_empty(), "imports that run up the layers:\n{}", upward.join("\n"));
    // Within one layer, modules must not import each other in a circle.
    for (from, to) in edges.keys() {
        if level(from) == level(to) {
            assert!(!edges.contains_key(&(*to, *from)), "{from} and {to} import each other");
        }
    }
    // The scan sees what it should: the machine layer imports the VM runner, not the reverse.
    assert!(edges.contains_key(&("machine", "vm")) && edges.contains_key(&("cmd", "machine")), "{edges:?}");
}

#[test]
fn the_import_scan_reads_paths_comments_and_tests_as_it_should() {
    let text = "use crate::store::{Item, Store};\nuse super::qemu;\n// crate::cmd is not here\n\
                fn f() { crate::Workspace::current(); xcrate::no(); }\n\
                #[cfg(test)]\nmod tests {\n    use crate::cmd;\n}\n";
    assert_eq!(imports("vm::run", text), ["store", "vm::qemu", "workspace"]);
    assert_eq!(layer_of("vm::scenario::hub"), Some(("vm::scenario", 9)));
    assert_eq!(layer_of("vm::qemu"), Some(("vm", 6)));
}
