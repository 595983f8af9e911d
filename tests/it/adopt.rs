//! Adopting the toolkit in another workspace: `examples/monorepo`, copied outside this
//! repository with its path dependency pointed at this checkout, runs `cargo xtask` as a
//! user's workspace would (its own systems, `run-vm`, `test`, `vm-image`, a scenario),
//! each checked for its output and exit status, with its own store under its own target
//! directory; and the README's steps for adopting the toolkit are the example's files.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use vm_tests::{output_within, store_dir, workspace_root, Run, TIMEOUT};

/// The example workspace, in this repository.
fn example() -> PathBuf {
    workspace_root().join("examples/monorepo")
}

/// The path dependency on the engine in the example's `xtask/Cargo.toml`.
const ENGINE_DEPENDENCY: &str = "vm-xtask = { path = \"../../../vm-xtask\" }";

/// The copies' target directory: kept between test runs, so the engine compiles once and
/// the store (`vmstore` in it, the copies' own) fetches Debian's packages once.
fn target_dir() -> PathBuf {
    store_dir().parent().unwrap().join("adopt-monorepo")
}

/// The example copied to `dest` without its build outputs, its engine dependency made
/// the absolute path of this checkout's `vm-xtask`.
fn copy_example(dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for entry in fs::read_dir(example()).unwrap().flatten() {
        if entry.file_name() == "target" {
            continue;
        }
        let status = Command::new("cp").arg("-a").arg(entry.path()).arg(dest).status().unwrap();
        assert!(status.success(), "cp -a {}", entry.path().display());
    }
    // New times: the target directory is kept between runs, and cargo would take an
    // earlier copy's builds (which name that copy as their workspace) for fresh.
    let status = Command::new("find").arg(dest).args(["-type", "f", "-exec", "touch", "{}", "+"]).status().unwrap();
    assert!(status.success());
    let manifest = dest.join("xtask/Cargo.toml");
    let text = fs::read_to_string(&manifest).unwrap();
    assert!(text.contains(ENGINE_DEPENDENCY), "{}: {text}", manifest.display());
    let engine = format!("vm-xtask = {{ path = {:?} }}", workspace_root().join("vm-xtask"));
    fs::write(&manifest, text.replace(ENGINE_DEPENDENCY, &engine)).unwrap();
}

/// `cargo xtask ARGS` in `dir`, as a user runs it there (no variable of this repository's
/// tests naming a store, workspace or lock), with the kept target directory; killed and
/// failed after `secs`.
fn cargo_xtask_in(dir: &Path, args: &[&str], secs: u64) -> Run {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string()));
    cmd.arg("xtask").args(args).current_dir(dir).env("CARGO_TARGET_DIR", target_dir());
    for var in ["XTASK_VMSTORE", "XTASK_WORKSPACE", "XTASK_LOCK"] {
        cmd.env_remove(var);
    }
    let started = std::time::Instant::now();
    let run = output_within(cmd, secs);
    eprintln!("cargo xtask {}: exit {} in {:.1}s", args.join(" "), run.code, started.elapsed().as_secs_f64());
    run
}

/// Names of the items in the store at `store`.
fn item_names(store: &Path) -> Vec<String> {
    let entries = fs::read_dir(store.join("items")).map(|d| d.flatten().collect::<Vec<_>>()).unwrap_or_default();
    entries.iter().map(|e| e.file_name().to_string_lossy().into_owned()).collect()
}

#[test]
fn the_example_workspace_runs_its_systems_tests_image_and_scenario_with_its_own_store() {
    let tmp = tempfile::tempdir().unwrap();
    assert!(!tmp.path().starts_with(workspace_root()), "{} is in the repository", tmp.path().display());
    // A user's path may have a space in it.
    let ws = tmp.path().join("my monorepo");
    copy_example(&ws);
    let store = target_dir().join("vmstore");

    // Its own systems, and none of this repository's (this compiles its xtask first).
    let systems = cargo_xtask_in(&ws, &["systems"], 3600);
    systems.expect_code(0);
    let names: Vec<&str> = systems.stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["greeter"], "{systems:#?}");
    assert!(systems.stdout.ends_with(" with Debian's jq (default)\n"), "{systems:#?}");
    // From a subdirectory too.
    let below = cargo_xtask_in(&ws.join("greeter-checks/tests"), &["systems"], 600);
    below.expect_code(0);
    assert_eq!(below.stdout, systems.stdout, "{below:#?}");
    // Its own scenario, and none of this repository's.
    let scenarios = cargo_xtask_in(&ws, &["scenario", "--list"], 600);
    scenarios.expect_code(0);
    let names: Vec<&str> = scenarios.stdout.lines().filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(names, ["greeter-pair"], "{scenarios:#?}");

    // Its lock file has every package it uses: `lock` changes nothing.
    let lock = cargo_xtask_in(&ws, &["lock"], 1200);
    lock.expect_code(0);
    assert!(lock.stderr.contains("every package the systems and image tools use is locked"), "{lock:#?}");
    assert_eq!(fs::read_to_string(ws.join("vm.lock")).unwrap(), fs::read_to_string(example().join("vm.lock")).unwrap());

    // A command in a VM of its system: the service's answer, then jq's; and the status.
    let ask = "nc 127.0.0.1 7070 </dev/null; echo '{\"a\": [1, 2]}' | jq -c '.a | add'";
    let run =
        cargo_xtask_in(&ws, &["run-vm", "--system", "greeter", "--timeout", TIMEOUT, "--", "sh", "-c", ask], 1800);
    run.expect_code(0);
    assert_eq!(run.stdout, "hello from greeter\n3\n", "{run:#?}");
    let failed = cargo_xtask_in(&ws, &["run-vm", "--system", "greeter", "--timeout", TIMEOUT, "--", "false"], 900);
    failed.expect_code(1);
    assert_eq!(failed.stdout, "", "{failed:#?}");
    // Built into its own store, not this repository's.
    let items = item_names(&store);
    for name in ["-greeter-greeter", "-system-greeter"] {
        assert!(items.iter().any(|i| i.ends_with(name)), "no `{name}` item in {}: {items:?}", store.display());
        let shared = item_names(&store_dir());
        assert!(!shared.iter().any(|i| i.ends_with(name)), "a `{name}` item in the shared store");
    }

    // Without CARGO_TARGET_DIR, as in a workspace with the default target directory: the
    // xtask binary finds its target directory, and so the store, from where it was built.
    let mut direct = Command::new(target_dir().join("debug/xtask"));
    direct.args(["run-vm", "--system", "greeter", "--script"]).current_dir(ws.join("greeter"));
    for var in ["CARGO_TARGET_DIR", "XTASK_VMSTORE", "XTASK_WORKSPACE", "XTASK_LOCK"] {
        direct.env_remove(var);
    }
    let script = output_within(direct, 600);
    script.expect_code(0);
    let script_path = PathBuf::from(script.stdout.trim_end());
    assert!(script_path.starts_with(&store) && script.stdout.ends_with("-run-vm-greeter.sh\n"), "{script:#?}");

    // Its tests in a VM: they pass; a broken one fails with cargo's status and message.
    let test_args = ["test", "--system", "greeter", "--timeout", TIMEOUT, "-p", "greeter-checks", "--", "--ignored"];
    let test = cargo_xtask_in(&ws, &test_args, 1800);
    test.expect_code(0);
    assert!(test.stdout.contains("test result: ok. 2 passed; 0 failed"), "{test:#?}");
    let in_vm = ws.join("greeter-checks/tests/in_vm.rs");
    let source = fs::read_to_string(&in_vm).unwrap();
    let expected = "assert_eq!(ask_greeter().unwrap(), \"hello from greeter\\n\");";
    assert!(source.contains(expected), "{source}");
    fs::write(&in_vm, source.replace(expected, "assert_eq!(ask_greeter().unwrap(), \"hello from elsewhere\\n\");"))
        .unwrap();
    let broken = cargo_xtask_in(&ws, &test_args, 1800);
    broken.expect_code(101);
    assert!(broken.stdout.contains("test result: FAILED. 1 passed; 1 failed"), "{broken:#?}");
    assert!(broken.stderr.contains("---- the_greeter_answers stdout ----"), "{broken:#?}");
    assert!(broken.stderr.contains("\"hello from elsewhere\\n\""), "{broken:#?}");

    // A bootable disk image of its system, in its own store.
    let image = cargo_xtask_in(&ws, &["vm-image", "--system", "greeter", "--format", "qcow2"], 1800);
    image.expect_code(0);
    let path = PathBuf::from(image.stdout.lines().last().unwrap_or_default());
    assert!(path.is_file() && path.starts_with(&store), "{image:#?}");
    assert!(path.to_string_lossy().ends_with(".qcow2"), "{image:#?}");

    // Its two-node scenario.
    let scenario = cargo_xtask_in(&ws, &["scenario", "greeter-pair"], 1800);
    scenario.expect_code(0);
    assert!(scenario.stderr.contains("scenario `greeter-pair`: passed"), "{scenario:#?}");
}

/// The indented code blocks of `text` (Markdown list items' blocks: seven spaces), each
/// without its indentation.
fn code_blocks(text: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    for line in text.lines() {
        if let Some(code) = line.strip_prefix("       ") {
            current.push(code);
        } else if line.is_empty() && !current.is_empty() {
            current.push("");
        } else if !current.is_empty() {
            while current.last() == Some(&"") {
                current.pop();
            }
            blocks.push(current.join("\n") + "\n");
            current.clear();
        }
    }
    blocks
}

/// The README's steps for adopting the toolkit are what the example does: its
/// dependencies, its `main.rs`, its alias; and the example is a workspace of its own
/// whose lock pins only what this repository's lock pins.
#[test]
fn the_readme_adoption_steps_are_the_examples_files() {
    let readme = fs::read_to_string(workspace_root().join("README.md")).unwrap();
    let steps = readme.split("<!-- adopt:begin -->").nth(1).unwrap().split("<!-- adopt:end -->").next().unwrap();
    let blocks = code_blocks(steps);
    assert_eq!(blocks.len(), 2, "the steps' code blocks: {blocks:#?}");

    let manifest = fs::read_to_string(example().join("xtask/Cargo.toml")).unwrap();
    assert!(manifest.contains(&blocks[0]), "README step 1:\n{}\nis not in the example's:\n{manifest}", blocks[0]);
    assert!(manifest.contains(ENGINE_DEPENDENCY), "{manifest}");

    let main_rs = fs::read_to_string(example().join("xtask/src/main.rs")).unwrap();
    let (docs, code) = main_rs.split_at(main_rs.find("\n\n").unwrap() + 2);
    assert!(docs.trim_end().lines().all(|l| l.starts_with("//!")), "{main_rs}");
    assert_eq!(code, blocks[1], "README step 2 is not the example's xtask/src/main.rs (after its `//!` paragraph)");

    let alias = steps.split("`[alias] ").nth(1).and_then(|s| s.split('`').next()).expect("no `[alias] ...` in step 3");
    let config = fs::read_to_string(example().join(".cargo/config.toml")).unwrap();
    assert_eq!(config, format!("[alias]\n{alias}\n"), "README step 3");
    let ours = fs::read_to_string(workspace_root().join(".cargo/config.toml")).unwrap();
    assert!(ours.contains(alias), "this repository's alias is another: {ours}");

    // A workspace of its own, not a member of this one.
    let root = fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    assert!(root.contains("exclude = [\"examples/monorepo\"]"), "{root}");
    let own = fs::read_to_string(example().join("Cargo.toml")).unwrap();
    assert!(own.lines().any(|l| l == "[workspace]"), "{own}");
    assert_eq!(fs::read_to_string(example().join(".gitignore")).unwrap(), "target/\n");

    // Its lock: this repository's pins, a subset (the same packages, fetched once).
    let main_lock = fs::read_to_string(workspace_root().join("vm.lock")).unwrap();
    let lock = fs::read_to_string(example().join("vm.lock")).unwrap();
    let tables: Vec<&str> = lock.split("\n\n").filter(|t| t.starts_with("[\"")).collect();
    assert!(tables.iter().any(|t| t.starts_with("[\"jq\"]\n")), "jq is not locked: {lock}");
    for table in tables {
        assert!(main_lock.contains(table), "the example's pin is not this repository's:\n{table}");
    }
}
