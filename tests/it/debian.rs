//! Debian packages with their dependency closure: dynamically linked programs from
//! Debian run in the guest (jq, python3, ip, mke2fs, strace), laid out where Debian puts
//! them; a library two packages share is one item; what apt cannot install (an unknown
//! package, a dependency nothing provides, two packages that conflict) is refused before
//! anything is built, naming the package and the chain that needs it.

use std::fs;
use std::path::Path;

use vm_tests::{run_vm_on, store_dir, xtask, xtask_env};

#[test]
fn jq_evaluates_an_expression() {
    let run = run_vm_on("debian-jq", &["jq", "-c", "-n", "[range(1;5)] | {sum: add, max: max}"]);
    run.expect_code(0);
    assert_eq!(run.stdout.trim(), r#"{"sum":10,"max":4}"#, "{run:#?}");
}

#[test]
fn python3_computes_and_imports_the_standard_library() {
    let script = "import hashlib, json, sys; print(json.dumps({'n': sum(i * i for i in range(10)), \
                  'sha': hashlib.sha256(b'vm').hexdigest()[:12], 'v': sys.version_info[:2]}))";
    let run = run_vm_on("debian-python3", &["python3", "-c", script]);
    run.expect_code(0);
    assert_eq!(run.stdout.trim(), r#"{"n": 285, "sha": "5bce98f73f3e", "v": [3, 11]}"#, "{run:#?}");
}

#[test]
fn ip_link_lists_the_loopback_device() {
    let run = run_vm_on("debian-iproute2", &["ip", "-o", "link"]);
    run.expect_code(0);
    assert!(run.stdout.lines().any(|l| l.starts_with("1: lo: <LOOPBACK")), "{run:#?}");
    // iproute2's own `ip`, not busybox's applet.
    let run = run_vm_on("debian-iproute2", &["ip", "-V"]);
    assert!(run.stdout.contains("iproute2-6.1.0"), "{run:#?}");
}

#[test]
fn mke2fs_from_e2fsprogs_formats_a_file() {
    let script = "mke2fs -V 2>&1 | head -1; /usr/sbin/mke2fs -q -t ext4 -L guestfs -F /tmp/fs.img 8M && \
                  /sbin/e2fsck -fn /tmp/fs.img >/dev/null && /sbin/dumpe2fs -h /tmp/fs.img 2>/dev/null | grep name";
    let run = run_vm_on("debian-e2fsprogs", &["sh", "-c", script]);
    run.expect_code(0);
    assert!(run.stdout.contains("Filesystem volume name:   guestfs"), "{run:#?}");
    // With no shell in between, PATH finds e2fsprogs' mke2fs.
    let run = run_vm_on("debian-e2fsprogs", &["mke2fs", "-V"]);
    assert!(run.stderr.contains("mke2fs 1.47.0") && run.stderr.contains("EXT2FS Library"), "{run:#?}");
}

#[test]
fn strace_traces_a_child() {
    // `-f` follows the shell's child, which runs strace's own binary again.
    let script = "/usr/bin/strace -V > /dev/null; exit 3";
    let run = run_vm_on("debian-strace", &["strace", "-f", "-e", "trace=execve", "sh", "-c", script]);
    run.expect_code(3);
    assert!(run.stderr.contains("execve(\"/usr/bin/sh\", [\"sh\", \"-c\""), "{run:#?}");
    let child = run.stderr.lines().find(|l| l.starts_with("[pid ") && l.contains("execve(\"/usr/bin/strace\""));
    assert!(child.is_some(), "{run:#?}");
    assert!(run.stderr.contains("+++ exited with 3 +++"), "{run:#?}");
}

#[test]
fn update_alternatives_links_are_made() {
    // mawk's postinst links awk and nawk to it; Debian's awk wins over busybox's applet.
    let run = run_vm_on("debian-mawk", &["awk", "-W", "version"]);
    run.expect_code(0);
    assert!(run.stdout.starts_with("mawk 1.3.4"), "{run:#?}");
    let run = run_vm_on("debian-mawk", &["nawk", "BEGIN { printf \"%d\\n\", 6 * 7 }"]);
    run.expect_code(0);
    assert_eq!(run.stdout, "42\n", "{run:#?}");
}

#[test]
fn the_layout_is_debian_s_with_the_loader_at_its_standard_path() {
    let script = "/lib64/ld-linux-x86-64.so.2 --version | head -1; ls /usr/lib/x86_64-linux-gnu/libjq.so.1 \
                  /lib/x86_64-linux-gnu/libc.so.6 /bin/jq; echo PATH=$PATH";
    let run = run_vm_on("debian-jq", &["sh", "-c", script]);
    run.expect_code(0);
    assert!(run.stdout.contains("ld.so (Debian GLIBC 2.36"), "{run:#?}");
    assert!(run.stdout.contains("/bin/jq") && run.stdout.contains("/lib/x86_64-linux-gnu/libc.so.6"), "{run:#?}");
    assert!(run.stdout.contains("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"), "{run:#?}");
}

/// The items a system's item refers to, from the newest record of it.
fn system_refs(system: &str) -> Vec<String> {
    let suffix = format!("-system-{system}.meta");
    let mut metas: Vec<_> = fs::read_dir(store_dir().join("meta"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(&suffix))
        .map(|e| (e.metadata().unwrap().modified().unwrap(), e.path()))
        .collect();
    metas.sort();
    let (_, newest) = metas.last().unwrap_or_else(|| panic!("no system item of `{system}` in the store"));
    let meta: serde_json::Value = serde_json::from_slice(&fs::read(newest).unwrap()).unwrap();
    let inputs = meta["inputs"].as_array().unwrap();
    inputs
        .iter()
        .filter(|i| i[0] == "ref")
        .map(|i| i[1].as_str().unwrap().trim_start_matches("item:").to_string())
        .collect()
}

#[test]
fn two_packages_sharing_a_library_store_it_once() {
    let run = run_vm_on("debian-jq-strace", &["sh", "-c", "jq -n 1 && strace -o /dev/null true && echo both"]);
    run.expect_code(0);
    assert_eq!(run.stdout.lines().last(), Some("both"), "{run:#?}");
    run_vm_on("debian-jq", &["true"]).expect_code(0);
    let pair = system_refs("debian-jq-strace");
    let libc: Vec<&String> = pair.iter().filter(|r| r.contains("-libc6-")).collect();
    assert_eq!(libc.len(), 1, "{pair:#?}");
    // The same item as the jq system's: shared between systems, not copied.
    assert!(system_refs("debian-jq").contains(libc[0]));
    assert!(Path::new(&store_dir().join("items").join(libc[0])).is_dir());
    let jq_and_strace = pair.iter().filter(|r| r.contains("-jq-") || r.contains("-strace-")).count();
    assert_eq!(jq_and_strace, 2, "{pair:#?}");
}

#[test]
fn an_unknown_package_is_refused_naming_it() {
    let run = xtask(&["vm-image", "--system", "invalid-debian-unknown"]);
    run.expect_code(2);
    assert!(run.stderr.contains("field `packages[2]`"), "{run:#?}");
    assert!(
        run.stderr.contains("Debian package `no-such-package-xtask` does not exist in xtask's Debian index"),
        "{run:#?}"
    );
    assert!(run.stderr.contains("nothing was built"), "{run:#?}");
}

#[test]
fn conflicting_packages_are_refused() {
    let run = xtask(&["run-vm", "--system", "invalid-debian-conflict", "--", "true"]);
    run.expect_code(2);
    assert!(run.stderr.contains("conflicts with another package of the system"), "{run:#?}");
    assert!(run.stderr.contains("busybox-static"), "{run:#?}");
}

/// A copy of the workspace's lock file in `dir` whose sources (`vm.sources` beside it)
/// are only a repository of three made-up packages: `xtask-fixture-app` needs
/// `xtask-fixture-lib`, which needs `xtask-fixture-gone`, which no package is.
fn fixture_lock(dir: &Path) -> std::path::PathBuf {
    let stanza = |name: &str, depends: &str| {
        format!(
            "Package: {name}\nVersion: 1.0\nArchitecture: all\n{depends}Filename: ./{name}.deb\nSize: 10\n\
             SHA256: {}\nDescription: fixture\n\n",
            "0".repeat(64)
        )
    };
    fs::create_dir_all(dir.join("repo")).unwrap();
    let packages = [
        stanza("xtask-fixture-app", "Depends: xtask-fixture-lib (>= 1)\n"),
        stanza("xtask-fixture-lib", "Depends: xtask-fixture-gone\n"),
        stanza("libc6", ""),
    ];
    fs::write(dir.join("repo/Packages"), packages.concat()).unwrap();
    fs::write(dir.join("vm.sources"), format!("deb [trusted=yes] file:{} ./\n", dir.join("repo").display())).unwrap();
    let lock = dir.join("vm.lock");
    fs::copy(vm_tests::workspace_root().join("vm.lock"), &lock).unwrap();
    lock
}

#[test]
fn a_dependency_nothing_provides_is_refused_with_the_chain() {
    let dir = tempfile::tempdir().unwrap();
    let lock = fixture_lock(dir.path());
    let run = xtask_env(
        &["run-vm", "--system", "invalid-debian-unresolvable", "--", "true"],
        &[("XTASK_LOCK", lock.as_os_str())],
    );
    run.expect_code(2);
    assert!(run.stderr.contains("field `packages[1]`"), "{run:#?}");
    assert!(
        run.stderr.contains(
            "a dependency of Debian package `xtask-fixture-lib` cannot be resolved: Depends: xtask-fixture-gone"
        ),
        "{run:#?}"
    );
    assert!(run.stderr.contains("declared package xtask-fixture-app -> xtask-fixture-lib"), "{run:#?}");
}
