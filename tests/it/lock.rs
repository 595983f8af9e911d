//! The lock file `vm.lock`: it is complete (the test suite adds nothing to it), it wins
//! over apt's lists, a package it lacks is added (and said so), `lock --update` says
//! what moved, a locked version nobody offers is a clear error, and two checkouts in
//! different directories, one whose apt lists offer another version than the locked
//! one, compute the same item hashes and a byte-identical raw image.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vm_tests::{locked_field, store_dir, workspace_root, xtask, xtask_env, Run, TIMEOUT};

/// A copy of the workspace's vm.lock in `dir`, changed by `edit`; returns its path.
fn lock_copy(dir: &Path, edit: impl FnOnce(String) -> String) -> PathBuf {
    let path = dir.join("vm.lock");
    let text = fs::read_to_string(workspace_root().join("vm.lock")).expect("reading the workspace's vm.lock");
    fs::write(&path, edit(text)).unwrap();
    path
}

/// `text` without the table of the package locked as `name`.
fn without(text: &str, name: &str) -> String {
    let header = format!("\n[\"{name}\"]\n");
    let start = text.find(&header).unwrap_or_else(|| panic!("vm.lock has no `{name}`"));
    let end = text[start + 1..].find("\n[").map_or(text.len(), |i| start + 1 + i);
    format!("{}{}", &text[..start], &text[end..])
}

#[test]
fn the_committed_lock_has_every_package_the_workspace_uses() {
    let dir = tempfile::tempdir().unwrap();
    let copy = lock_copy(dir.path(), |t| t);
    let run = xtask_env(&["lock"], &[("XTASK_LOCK", copy.as_os_str())]);
    run.expect_code(0);
    assert!(run.stderr.contains("every package the systems and image tools use is locked"), "{run:#?}");
    assert_eq!(fs::read(&copy).unwrap(), fs::read(workspace_root().join("vm.lock")).unwrap());
}

/// The version apt's lists offer for `package` now (its candidate).
fn apt_candidate(package: &str) -> String {
    let out = Command::new("apt-cache").args(["show", "--no-all-versions", package]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().find_map(|l| l.strip_prefix("Version: "));
    version.unwrap_or_else(|| panic!("apt's lists do not know `{package}`; run `apt-get update`")).to_string()
}

#[test]
fn a_package_missing_from_the_lock_is_resolved_added_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let copy = lock_copy(dir.path(), |t| without(&t, "busybox-static"));
    let others = fs::read_to_string(&copy).unwrap();
    assert!(!others.contains("busybox-static"));
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &[("XTASK_LOCK", copy.as_os_str())]);
    run.expect_code(0);
    let candidate = apt_candidate("busybox-static");
    assert!(
        run.stderr.contains(&format!("`busybox-static` was not locked; added busybox-static {candidate} ")),
        "{run:#?}"
    );
    // Added in its place, with apt's candidate; nothing else changed.
    let after = fs::read_to_string(&copy).unwrap();
    assert!(
        after.contains(&format!("\n[\"busybox-static\"]\npackage = \"busybox-static\"\nversion = \"{candidate}\"\n"))
    );
    assert_eq!(without(&after, "busybox-static"), others);
}

#[test]
fn lock_update_moves_a_pin_forward_and_says_what_changed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, version) = locked_field("busybox-static", "version");
    let copy = lock_copy(dir.path(), |t| t.replacen(&format!("version = \"{version}\""), "version = \"1:0.1-1\"", 1));
    let run = xtask_env(&["lock", "--update", "busybox-static"], &[("XTASK_LOCK", copy.as_os_str())]);
    run.expect_code(0);
    let candidate = apt_candidate("busybox-static");
    assert_eq!(run.stdout, format!("busybox-static: 1:0.1-1 -> {candidate}\n"), "{run:#?}");
    assert_eq!(locked_in(&copy, "busybox-static", "version"), candidate);
    // Everything at apt's candidates now: nothing more moves.
    let all = xtask_env(&["lock", "--update"], &[("XTASK_LOCK", copy.as_os_str())]);
    all.expect_code(0);
    let again = xtask_env(&["lock", "--update"], &[("XTASK_LOCK", copy.as_os_str())]);
    again.expect_code(0);
    assert_eq!(again.stdout, "", "{again:#?}");
    assert!(again.stderr.contains("no changes"), "{again:#?}");
}

/// The value of `field` of the package locked as `name` in the lock file at `path`.
fn locked_in(path: &Path, name: &str, field: &str) -> String {
    let text = fs::read_to_string(path).unwrap();
    let table = text.split(&format!("[\"{name}\"]\n")).nth(1).unwrap().split("\n\n").next().unwrap();
    table.lines().find_map(|l| l.strip_prefix(&format!("{field} = "))).unwrap().trim_matches('"').to_string()
}

/// An apt configuration (for `APT_CONFIG`) whose package lists are this machine's, but
/// for `package`, which they offer at `version` only: as on a machine whose apt lists
/// moved on (or lag behind) since the lock was written. The sources, and so the
/// mirrors, stay the machine's.
fn apt_lists_offering(dir: &Path, package: &str, version: &str) -> PathBuf {
    let lists = dir.join("lists");
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let mut changed = 0;
    for entry in fs::read_dir("/var/lib/apt/lists").expect("reading apt's lists").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with("_InRelease") || name.ends_with("_Release") {
            fs::copy(entry.path(), lists.join(&name)).unwrap();
            continue;
        }
        let Some(at) = name.find("_Packages") else { continue };
        // apt's own reader, whatever the compression.
        let out = Command::new("/usr/lib/apt/apt-helper").arg("cat-file").arg(entry.path()).output().unwrap();
        assert!(out.status.success(), "apt-helper cat-file {name}: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let stanzas: Vec<String> = text
            .split("\n\n")
            .map(|stanza| {
                if !stanza.starts_with(&format!("Package: {package}\n")) {
                    return stanza.to_string();
                }
                changed += 1;
                let lines = stanza.lines().map(|l| {
                    if l.starts_with("Version: ") {
                        format!("Version: {version}")
                    } else {
                        l.to_string()
                    }
                });
                lines.collect::<Vec<_>>().join("\n")
            })
            .collect();
        fs::write(lists.join(&name[..at + "_Packages".len()]), stanzas.join("\n\n")).unwrap();
    }
    assert!(changed > 0, "apt's lists on this machine do not have `{package}`; run `apt-get update`");
    let conf = dir.join("apt.conf");
    let text = format!("Dir::State::lists \"{}/\";\nDir::Cache \"{}/cache/\";\n", lists.display(), dir.display());
    fs::write(&conf, text).unwrap();
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .env("APT_CONFIG", &conf)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("\nVersion: {version}\n")), "apt's candidate is not {version}: {shown}");
    conf
}

#[test]
fn a_locked_version_nobody_offers_is_an_error_naming_it_and_the_fix() {
    let dir = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let (_, version) = locked_field("busybox-static", "version");
    let (_, filename) = locked_field("busybox-static", "filename");
    let gone = "1:1.35.0-4+never1";
    let copy = lock_copy(dir.path(), |t| {
        t.replacen(&format!("version = \"{version}\""), &format!("version = \"{gone}\""), 1).replacen(
            &filename,
            "pool/main/b/busybox/busybox-static_1.35.0-4+never1_amd64.deb",
            1,
        )
    });
    let store = store_of_debian_packages_but(&dir.path().join("store"), "-busybox-static-");
    let env = [("XTASK_LOCK", copy.as_os_str()), ("XTASK_VMSTORE", store.as_os_str())];
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    run.expect_code(1);
    assert!(
        run.stderr.contains(&format!("cannot fetch Debian package busybox-static {gone}")),
        "the package and version are not named: {run:#?}"
    );
    assert!(run.stderr.contains("busybox-static_1.35.0-4+never1_amd64.deb"), "no pool path: {run:#?}");
    assert!(run.stderr.contains("cargo xtask lock --update busybox-static"), "no fix: {run:#?}");
    assert!(!run.stderr.contains("was not locked"), "the lock was changed: {run:#?}");
}

/// A new store at `store` with hard links to the shared store's Debian packages (the
/// kernel is 70 MB), but those whose name contains `except`.
fn store_of_debian_packages_but(store: &Path, except: &str) -> PathBuf {
    // The image tools' packages, at least, are there then.
    xtask(&["image-tools"]).expect_code(0);
    fs::create_dir_all(store).unwrap();
    let mut linked = 0;
    vm_tests::copy_items(store, true, |item| {
        let meta = fs::read_to_string(store_dir().join("meta").join(format!("{item}.meta"))).unwrap_or_default();
        let take = meta.contains("\"kind\": \"debian-package\"") && !item.contains(except);
        linked += take as usize;
        take
    });
    assert!(linked > 10, "the shared store has only {linked} Debian packages");
    store.to_path_buf()
}

/// Item file names (`HASH-NAME`) `--explain` reports as found or built.
fn items(run: &Run) -> BTreeSet<String> {
    run.stderr
        .lines()
        .filter_map(|l| l.strip_prefix("store: hit ").or_else(|| l.strip_prefix("store: built ")))
        .map(|l| l.split_whitespace().next().unwrap().to_string())
        .collect()
}

#[test]
fn two_checkouts_with_different_apt_lists_give_the_same_items_and_image() {
    // The size is one no other test uses.
    let args = ["vm-image", "--explain", "--system", "boot-check", "--format", "raw", "--size", "616MiB"];
    let here = xtask(&args);
    here.expect_code(0);
    let image = PathBuf::from(here.stdout.lines().last().unwrap());

    // Another checkout of the same commit, elsewhere, with a store of its own holding
    // only Debian's packages (hard links: the kernel is 70 MB) but busybox-static's, and
    // with apt's lists offering another busybox-static than the locked one: the lock's
    // is fetched (by its pool path, as apt's lists do not have it).
    let tmp = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let checkout = tmp.path().join("somewhere/else/checkout");
    copy_workspace(&checkout);
    let store = store_of_debian_packages_but(&tmp.path().join("store"), "-busybox-static-");
    let (_, locked) = locked_field("busybox-static", "version");
    let apt_conf = apt_lists_offering(&tmp.path().join("apt"), "busybox-static", "1:9.9-1");
    let env = [("XTASK_VMSTORE", store.as_os_str()), ("APT_CONFIG", apt_conf.as_os_str())];
    let there = cargo_xtask_in(&checkout, &args, &env);
    there.expect_code(0);
    assert!(there.stderr.contains(&format!("fetching Debian package busybox-static {locked} ")), "{there:#?}");
    assert!(there.stderr.contains("fetching it by its pool path"), "busybox-static was not fetched: {there:#?}");
    assert!(!there.stderr.contains("was not locked"), "the checkout's lock changed: {there:#?}");
    assert_eq!(fs::read(checkout.join("vm.lock")).unwrap(), fs::read(workspace_root().join("vm.lock")).unwrap());
    assert!(there.stderr.contains("store: built "), "nothing was built in the other store: {there:#?}");

    // Every item the other checkout found or built has the same name (hash) here; some
    // are found here without `--explain` naming them (the kernel's vmlinux, the helper).
    let (mine, theirs) = (items(&here), items(&there));
    assert!(mine.is_subset(&theirs), "the checkouts computed different items:\nhere {here:#?}\nthere {there:#?}");
    for item in &theirs {
        assert!(vm_tests::items_dir().join(item).exists(), "`{item}` of the other checkout is not here: {there:#?}");
    }
    let again = PathBuf::from(there.stdout.lines().last().unwrap());
    assert!(again.starts_with(&store), "{there:#?}");
    assert_eq!(again.parent().unwrap().file_name(), image.parent().unwrap().file_name());
    assert!(fs::read(&again).unwrap() == fs::read(&image).unwrap(), "the two raw images differ");
}

/// A copy of the workspace without its build outputs or git data, as another checkout.
fn copy_workspace(dest: &Path) {
    fs::create_dir_all(dest).unwrap();
    for entry in fs::read_dir(workspace_root()).unwrap().flatten() {
        let name = entry.file_name();
        if name == "target" || name == ".git" {
            continue;
        }
        let status = Command::new("cp").arg("-a").arg(entry.path()).arg(dest).status().unwrap();
        assert!(status.success(), "cp -a {}", entry.path().display());
    }
    // New times: the copy's target directory is kept between runs, and cargo would take
    // an earlier copy's builds (which name that copy as their workspace) for fresh.
    let status = Command::new("find").arg(dest).args(["-type", "f", "-exec", "touch", "{}", "+"]).status().unwrap();
    assert!(status.success());
}

/// `cargo xtask ARGS` in `dir` with its own target directory (kept between test runs, so
/// the dependencies compile once) and `envs`.
fn cargo_xtask_in(dir: &Path, args: &[&str], envs: &[(&str, &std::ffi::OsStr)]) -> Run {
    let target = store_dir().parent().unwrap().join("lock-checkout");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.arg("xtask").args(args).current_dir(dir).env("CARGO_TARGET_DIR", &target).stdin(Stdio::null());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    vm_tests::Run::from(out)
}
