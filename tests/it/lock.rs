//! The lock file `vm.lock`: it is complete (the test suite adds nothing to it), a package
//! it lacks is added from xtask's own Debian index (and said so) whatever the host's apt
//! lists hold, `lock --update` says what moved and what uses it, a locked version the
//! mirrors no longer have is a clear error with the ways out (a fixture repository plays
//! the mirror), and two checkouts in different directories, one whose host apt lists
//! offer another version than the locked one, compute the same item hashes and a
//! byte-identical raw image.

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

/// The version xtask's own Debian index (of the host's mirrors, in the shared store)
/// offers for `package` now (its candidate), asked of apt directly.
fn index_candidate(package: &str) -> String {
    let mut confs: Vec<(std::time::SystemTime, PathBuf)> = fs::read_dir(store_dir().join("debian-index"))
        .expect("xtask made no Debian index in the store")
        .flatten()
        .map(|e| e.path())
        .filter(|d| fs::read_to_string(d.join("sources.list")).is_ok_and(|s| !s.contains("file:")))
        .filter_map(|d| Some((fs::metadata(d.join("lists")).ok()?.modified().ok()?, d.join("apt.conf"))))
        .collect();
    confs.sort();
    let (_, conf) = confs.pop().expect("xtask's Debian index has no lists");
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .env("APT_CONFIG", &conf)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.lines().find_map(|l| l.strip_prefix("Version: "));
    version.unwrap_or_else(|| panic!("xtask's Debian index ({}) does not know `{package}`", conf.display())).to_string()
}

/// An apt configuration whose lists are empty: a host that never ran `apt-get update`.
fn empty_host_apt(dir: &Path) -> PathBuf {
    for sub in ["lists/partial", "cache/archives/partial"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let conf = dir.join("apt.conf");
    let d = dir.display();
    fs::write(&conf, format!("Dir::State::lists \"{d}/lists/\";\nDir::Cache \"{d}/cache/\";\n")).unwrap();
    conf
}

#[test]
fn a_package_missing_from_the_lock_is_resolved_added_and_said() {
    let dir = tempfile::tempdir().unwrap();
    let copy = lock_copy(dir.path(), |t| without(&t, "busybox-static"));
    let others = fs::read_to_string(&copy).unwrap();
    assert!(!others.contains("[\"busybox-static\"]"));
    // The host's apt lists are empty: xtask's own index resolves it.
    let apt = empty_host_apt(&dir.path().join("apt"));
    let env = [("XTASK_LOCK", copy.as_os_str()), ("APT_CONFIG", apt.as_os_str())];
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    run.expect_code(0);
    let candidate = index_candidate("busybox-static");
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
    let apt = empty_host_apt(&dir.path().join("apt"));
    let env = [("XTASK_LOCK", copy.as_os_str()), ("APT_CONFIG", apt.as_os_str())];
    let run = xtask_env(&["lock", "--update", "busybox-static"], &env);
    run.expect_code(0);
    assert!(
        run.stderr.contains("xtask's Debian index: `lock --update` asks for what the mirrors offer now"),
        "{run:#?}"
    );
    let candidate = index_candidate("busybox-static");
    let line = run.stdout.lines().next().unwrap_or_default();
    assert!(line.starts_with(&format!("busybox-static: 1:0.1-1 -> {candidate} (used by system minimal, ")), "{run:#?}");
    assert_eq!(run.stdout.lines().count(), 1, "{run:#?}");
    assert_eq!(locked_in(&copy, "busybox-static", "version"), candidate);
    // Everything at apt's candidates now: nothing more moves.
    let all = xtask_env(&["lock", "--update"], &env);
    all.expect_code(0);
    let again = xtask_env(&["lock", "--update"], &env);
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

/// A host apt configuration (for `APT_CONFIG`) whose lists offer `package` at `version`
/// only (from a flat repository of one made-up stanza): as on a machine whose apt lists
/// moved on (or lag behind) since the lock was written.
fn apt_lists_offering(dir: &Path, package: &str, version: &str) -> PathBuf {
    for sub in ["repo", "lists/partial", "cache/archives/partial", "parts"] {
        fs::create_dir_all(dir.join(sub)).unwrap();
    }
    let stanza = format!(
        "Package: {package}\nVersion: {version}\nArchitecture: amd64\nFilename: ./{package}.deb\nSize: 10\n\
         SHA256: {}\nDescription: fixture\n\n",
        "0".repeat(64)
    );
    fs::write(dir.join("repo/Packages"), stanza).unwrap();
    fs::write(dir.join("sources.list"), format!("deb [trusted=yes] file:{} ./\n", dir.join("repo").display())).unwrap();
    let conf = dir.join("apt.conf");
    let d = dir.display();
    let text = format!(
        "Dir::Etc::SourceList \"{d}/sources.list\";\nDir::Etc::SourceParts \"{d}/parts\";\n\
         Dir::State::Lists \"{d}/lists/\";\nDir::Cache \"{d}/cache/\";\n"
    );
    fs::write(&conf, text).unwrap();
    let update = Command::new("apt-get")
        .args(["update", "-q", "-o", "APT::Sandbox::User=root"])
        .env("APT_CONFIG", &conf)
        .output()
        .expect("running apt-get update for the fixture repository");
    assert!(update.status.success(), "apt-get update of the fixture: {}", String::from_utf8_lossy(&update.stderr));
    let out = Command::new("apt-cache")
        .args(["show", "--no-all-versions", package])
        .env("APT_CONFIG", &conf)
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains(&format!("\nVersion: {version}\n")), "apt's candidate is not {version}: {shown}");
    conf
}

/// A flat apt repository in `dir` (`repo/`) offering `package` at `version` only, as a
/// `.deb` made here, and a `vm.sources` beside the lock copy in `dir` naming it as the
/// workspace's mirror.
fn fixture_mirror(dir: &Path, package: &str, version: &str) {
    let root = dir.join("deb");
    fs::create_dir_all(root.join("DEBIAN")).unwrap();
    fs::create_dir_all(root.join("usr/share/doc").join(package)).unwrap();
    fs::write(root.join("usr/share/doc").join(package).join("fixture"), "a fixture\n").unwrap();
    let control = format!(
        "Package: {package}\nVersion: {version}\nArchitecture: amd64\nMaintainer: fixture <f@example.org>\n\
         Description: fixture\n"
    );
    fs::write(root.join("DEBIAN/control"), control).unwrap();
    let repo = dir.join("repo");
    fs::create_dir_all(&repo).unwrap();
    let deb = repo.join(format!("{package}_fixture_amd64.deb"));
    let out = Command::new("dpkg-deb").args(["--root-owner-group", "--build"]).arg(&root).arg(&deb).output().unwrap();
    assert!(out.status.success(), "dpkg-deb --build: {}", String::from_utf8_lossy(&out.stderr));
    let bytes = fs::read(&deb).unwrap();
    let sha = Command::new("sha256sum").arg(&deb).output().unwrap();
    let sha = String::from_utf8_lossy(&sha.stdout).split_whitespace().next().unwrap().to_string();
    let stanza = format!(
        "Package: {package}\nVersion: {version}\nArchitecture: amd64\nFilename: ./{}\nSize: {}\nSHA256: {sha}\n\
         Description: fixture\n\n",
        deb.file_name().unwrap().to_string_lossy(),
        bytes.len()
    );
    fs::write(repo.join("Packages"), stanza).unwrap();
    fs::write(dir.join("vm.sources"), format!("deb [trusted=yes] file:{} ./\n", repo.display())).unwrap();
}

#[test]
fn a_locked_version_gone_from_the_mirrors_is_an_error_naming_it_and_the_ways_out() {
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
    // The workspace's mirror: a repository that has moved on to another version.
    fixture_mirror(dir.path(), "busybox-static", "1:9.9-1");
    let store = store_of_debian_packages_but(&dir.path().join("store"), "-busybox-static-");
    let env = [("XTASK_LOCK", copy.as_os_str()), ("XTASK_VMSTORE", store.as_os_str())];
    let run = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    run.expect_code(1);
    assert!(
        run.stderr.contains(&format!("cannot fetch Debian package busybox-static {gone}")),
        "the package and version are not named: {run:#?}"
    );
    assert!(run.stderr.contains("busybox-static_1.35.0-4+never1_amd64.deb"), "no pool path: {run:#?}");
    assert!(run.stderr.contains("the mirrors no longer have it"), "not said why: {run:#?}");
    assert!(run.stderr.contains("cargo xtask lock --update busybox-static"), "no fix: {run:#?}");
    assert!(run.stderr.contains("a registry substitute that has its store item `"), "no substitute: {run:#?}");
    assert!(run.stderr.contains("-busybox-static-1_1.35.0-4+never1`"), "the item is not named: {run:#?}");
    assert!(!run.stderr.contains("was not locked"), "the lock was changed: {run:#?}");

    // The second way out, without root: the pin moves to what the mirror offers.
    let update = xtask_env(&["lock", "--update", "busybox-static"], &env);
    update.expect_code(0);
    assert!(
        update.stdout.starts_with(&format!("busybox-static: {gone} -> 1:9.9-1 (used by system minimal")),
        "{update:#?}"
    );
    assert_eq!(locked_in(&copy, "busybox-static", "version"), "1:9.9-1");
    assert_eq!(locked_in(&copy, "busybox-static", "filename"), "./busybox-static_fixture_amd64.deb");
    // And it is fetched from there (it is no busybox: only the fetch is checked).
    let fetched = xtask_env(&["run-vm", "--timeout", TIMEOUT, "--", "true"], &env);
    assert!(fetched.stderr.contains("unpacking Debian package busybox-static 1:9.9-1"), "{fetched:#?}");
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
    let args = ["vm-image", "--explain", "--system", "minimal", "--format", "raw", "--size", "616MiB"];
    let here = xtask(&args);
    here.expect_code(0);
    let image = PathBuf::from(here.stdout.lines().last().unwrap());

    // Another checkout of the same commit, elsewhere, with a store of its own holding
    // only Debian's packages (hard links: the kernel is 70 MB) but busybox-static's, and
    // with the host's apt lists offering another busybox-static than the locked one:
    // the lock's is fetched all the same (the host's lists play no part).
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

/// The workspace is found when xtask runs, not compiled into it: this checkout's xtask
/// binary, run in another checkout (as when two checkouts share a target directory),
/// acts on that checkout's lock file and leaves this one's alone.
#[test]
fn an_xtask_binary_acts_on_the_workspace_it_runs_in() {
    let tmp = tempfile::tempdir_in(store_dir().parent().unwrap()).unwrap();
    let checkout = tmp.path().join("another checkout");
    copy_workspace(&checkout);
    let lock = checkout.join("vm.lock");
    let text = fs::read_to_string(&lock).unwrap();
    fs::write(&lock, without(&text, "busybox-static")).unwrap();
    let ours = fs::read(workspace_root().join("vm.lock")).unwrap();
    let out = Command::new(vm_tests::xtask_bin())
        .arg("lock")
        .current_dir(&checkout)
        .env_remove("XTASK_LOCK")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let run = Run::from(out);
    run.expect_code(0);
    assert!(run.stderr.contains(&format!("{}: `busybox-static` was not locked", lock.display())), "{run:#?}");
    assert!(fs::read_to_string(&lock).unwrap().contains("[\"busybox-static\"]"), "the other checkout's lock");
    assert_eq!(fs::read(workspace_root().join("vm.lock")).unwrap(), ours, "this checkout's lock changed");
}
