//! The guest is hostile: what it leaves in `$out` and the exchange directory cannot make
//! the host touch anything outside, it cannot make special files on the host, and it
//! sees store items and nothing else.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::nonce;
use vm_tests::{store_dir, store_entries_named, xtask, TIMEOUT};

fn build(name: &str, extra: &[&str], script: &str) -> vm_tests::Run {
    let mut args = vec!["build-in-vm", "--timeout", TIMEOUT, "--name", name];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", script]);
    xtask(&args)
}

/// The modes of the store's own directories, which a hostile `$out` once made read-only.
fn bookkeeping_modes() -> Vec<(String, u32)> {
    [".tmp", ".locks", ".cache", "items", "meta"]
        .iter()
        .map(|d| (d.to_string(), fs::metadata(store_dir().join(d)).unwrap().permissions().mode()))
        .collect()
}

#[test]
fn an_out_replaced_by_a_link_is_refused_and_nothing_outside_changes() {
    let name = format!("link-out-{}", nonce());
    let before = bookkeeping_modes();
    for script in ["rmdir $out; ln -s .tmp $out", "rmdir $out; ln -s / $out", "rmdir $out; echo x > $out"] {
        let run = build(&name, &["--env", &format!("S={script}")], script);
        run.expect_code(1);
        assert!(run.stderr.contains("`$out` is no longer a directory"), "{script}: {run:#?}");
        assert!(run.stdout.is_empty(), "{run:#?}");
    }
    assert_eq!(bookkeeping_modes(), before, "the store's directories changed");
    assert!(store_entries_named(&name).is_empty(), "something was stored");
}

#[test]
fn links_that_resolve_outside_out_are_refused_naming_the_entry() {
    let n = nonce();
    // Each link's text stays inside $out lexically or not at all; each really leads out.
    for (entry, script) in [
        ("$out/a/esc", "mkdir $out/a; ln -s .. $out/a/up; ln -s up/../../status $out/a/esc"),
        ("$out/abs", "ln -s /etc/passwd $out/abs"),
        ("$out/b", "ln -s c $out/b; ln -s ../.. $out/c"),
        ("$out/loop", "ln -s loop $out/loop"),
    ] {
        let name = format!("esc-{n}");
        let run = build(&name, &[], script);
        run.expect_code(1);
        assert!(run.stderr.contains(&format!("`{entry}` is a symbolic link")), "{script}: {run:#?}");
        assert!(store_entries_named(&name).is_empty());
    }
    // A chain that stays inside is kept, as a link.
    let run = build(
        &format!("chain-{n}"),
        &[],
        "mkdir -p $out/a/b; echo hi > $out/f; ln -s ../.. $out/a/b/top; ln -s b/top/f $out/a/l",
    );
    run.expect_code(0);
    let item = Path::new(run.stdout.trim_end());
    assert_eq!(fs::read_to_string(item.join("a/l")).unwrap(), "hi\n");
    assert!(fs::symlink_metadata(item.join("a/l")).unwrap().file_type().is_symlink());
}

/// QEMU cannot make device nodes, FIFOs or sockets for the guest, anywhere in the
/// exchange directory: the guest's mknod fails (here as root; the unprivileged user is
/// covered by the filter's own test in xtask).
#[test]
fn the_guest_cannot_make_special_files_on_the_host() {
    let script = "for p in /xchg/dev $out/dev; do mknod $p c 1 3 && echo dev:$p >> /tmp/made; done; \
                  for p in /xchg/fifo $out/fifo; do mkfifo $p && echo fifo:$p >> /tmp/made; done; \
                  if [ -f /tmp/made ]; then cp /tmp/made $out/made; fi; ls /xchg $out > /tmp/listing; \
                  grep -E 'dev|fifo' /tmp/listing > $out/seen; echo checked > $out/ok";
    let run = build(&format!("mknod-{}", nonce()), &[], script);
    run.expect_code(0);
    let item = Path::new(run.stdout.trim_end());
    assert_eq!(fs::read_to_string(item.join("ok")).unwrap(), "checked\n");
    assert!(!item.join("made").exists(), "the guest made: {}", fs::read_to_string(item.join("made")).unwrap());
    assert_eq!(fs::read_to_string(item.join("seen")).unwrap(), "", "special files appeared in the exchange directory");
}

/// The store share holds items only: no records (with the environment of earlier builds),
/// no scratch, no other runs' exchange directories.
#[test]
fn the_guest_sees_only_items_in_the_store() {
    let secret = format!("secret-{}", nonce());
    build(&format!("env-{}", nonce()), &["--env", &format!("SECRET={secret}")], "echo made > $out/f").expect_code(0);
    let script = format!(
        "ls -a /store; cat /store/*.meta /store/../*.meta /store/../meta/* /store/.tmp/* 2>/dev/null | grep -c {secret}"
    );
    let run = vm_tests::run_vm(&["sh", "-c", &script]);
    let listed: Vec<&str> = run.stdout.lines().collect();
    assert_eq!(listed.last(), Some(&"0"), "the secret was found: {run:#?}");
    for entry in &listed[..listed.len() - 1] {
        let is_item =
            entry.split_once('-').is_some_and(|(h, n)| h.len() == 32 && !n.is_empty() && !n.ends_with(".meta"));
        assert!(is_item || *entry == "." || *entry == "..", "the guest sees `{entry}` in the store: {run:#?}");
    }
    assert!(listed.iter().any(|e| e.contains("-busybox-")), "no item listed: {run:#?}");
}

/// An input given through a link is stored as what it pointed to when it was copied: a
/// changed target gives a new item, never the stale one.
#[test]
fn an_input_through_a_link_is_hashed_as_copied() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(&data, &link).unwrap();
    let name = format!("via-link-{}", nonce());
    let input = format!("IN={}", link.display());
    for content in ["first\n", "second\n"] {
        fs::write(&data, content).unwrap();
        let run = build(&name, &["--input", &input], "cat $IN > $out/copy");
        run.expect_code(0);
        let item = Path::new(run.stdout.trim_end());
        assert_eq!(fs::read_to_string(item.join("copy")).unwrap(), content, "a stale input was used");
    }
}

/// A sparse file far over the output limit fails at once, naming the file.
#[test]
fn a_huge_sparse_output_fails_naming_the_file() {
    let name = format!("huge-{}", nonce());
    let run = build(&name, &[], "truncate -s 16492674416640 $out/huge && echo made-huge");
    run.expect_code(1);
    assert!(run.stderr.contains("made-huge"), "the guest could not make the file: {run:#?}");
    assert!(run.stderr.contains("`$out/huge`") && run.stderr.contains("--max-output"), "{run:#?}");
    assert!(store_entries_named(&name).is_empty());
}

/// A command that plants a link (or a directory) where the status goes does not stop
/// the guest helper from reporting the command's real status: it writes a new file.
#[test]
fn a_planted_status_name_does_not_hide_the_real_status() {
    for plant in ["ln -s /proc/self/environ /xchg/status", "mkdir -p /xchg/status/x"] {
        let run = vm_tests::run_vm(&["sh", "-c", &format!("{plant}; exit 3")]);
        run.expect_code(3);
    }
}

/// Removes a file when dropped.
struct Removed(std::path::PathBuf);

impl Drop for Removed {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

#[test]
fn a_test_vm_sees_the_sources_and_items_only_whatever_it_unmounts_and_mounts() {
    let n = nonce();
    // An earlier build's `--env` value, and an ignored file in the workspace root.
    let secret = format!("SECRET=XTASK-SENTINEL-{n}-env");
    build("boundary-sentinel", &["--env", &secret], "true").expect_code(0);
    let ignored = Removed(vm_tests::workspace_root().join(format!(".xtask-sentinel-{n}")));
    fs::write(&ignored.0, format!("XTASK-SENTINEL-{n}-ignored\n")).unwrap();
    let args = ["test", "--system", "hello", "--timeout", TIMEOUT, "-p", "vm-checks", "--test", "boundary"];
    let run = xtask(&[&args[..], &["--", "--ignored", "--nocapture"]].concat());
    drop(ignored);
    run.expect_code(0);
    let out = &run.stdout;
    let leaks: Vec<&str> = out.lines().filter(|l| l.contains(&n)).collect();
    assert!(leaks.is_empty(), "the guest reached what it must not: {leaks:#?}");
    assert!(out.contains("TAG workspace mounted=true"), "{run:#?}");
    assert!(out.contains("FILE workspace examples/vm-checks/tests/fixture.txt\n"), "no sources: {run:#?}");
    assert!(out.contains("FILE workspace Cargo.toml\n"), "no sources: {run:#?}");
    for line in out.lines().filter(|l| l.starts_with("FILE ") || l.starts_with("DIR ")) {
        let path = line.splitn(3, ' ').nth(2).unwrap_or_default();
        assert!(!path.starts_with(".git/") && path != ".git", "`.git` is shared: {line}");
        let build_output = path.starts_with("target/") && !path.starts_with("target/tmp");
        assert!(!build_output && !path.ends_with(".meta"), "more than sources are shared: {line}");
    }
    let entries: Vec<&str> = out.lines().filter_map(|l| l.strip_prefix("STORE-ENTRY ")).collect();
    assert!(!entries.is_empty(), "the store share was not found: {run:#?}");
    for entry in entries {
        let hash = entry.split('-').next().unwrap_or_default();
        assert!(hash.len() == 32 && hash.chars().all(|c| c.is_ascii_hexdigit()), "not an item: {entry}");
    }
}
