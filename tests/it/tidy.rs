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
