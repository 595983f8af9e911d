//! `build-in-vm`: outputs, inputs, caching, failures and disks.

use std::fs;
use std::path::Path;

use crate::nonce;
use vm_tests::{store_entries_named, xtask, TIMEOUT};

fn build(name: &str, extra: &[&str], command: &[&str]) -> vm_tests::Run {
    let mut args = vec!["build-in-vm", "--explain", "--timeout", TIMEOUT, "--name", name];
    args.extend_from_slice(extra);
    args.push("--");
    args.extend_from_slice(command);
    xtask(&args)
}

#[test]
fn output_is_stored_and_second_run_boots_no_vm() {
    let n = nonce();
    let env = format!("NONCE={n}");
    let script = "echo hi > $out/greeting; echo $NONCE > $out/nonce; echo building-now";
    let first = build("hello", &["--env", &env], &["sh", "-c", script]);
    first.expect_code(0);
    assert!(first.stderr.contains("vm: booting"), "first build did not boot a VM: {first:#?}");
    assert!(first.stderr.contains("building-now"), "build output not shown on stderr: {first:#?}");
    let path = first.stdout.lines().last().unwrap().to_string();
    assert!(path.ends_with("-hello"), "last stdout line is not the item: {:?}", first.stdout);
    assert_eq!(fs::read_to_string(Path::new(&path).join("greeting")).unwrap(), "hi\n");
    assert_eq!(fs::read_to_string(Path::new(&path).join("nonce")).unwrap(), format!("{n}\n"));

    let second = build("hello", &["--env", &env], &["sh", "-c", script]);
    second.expect_code(0);
    assert_eq!(second.stdout, first.stdout, "the cache hit printed another path");
    assert!(!second.stderr.contains("vm: booting"), "the cache hit booted a VM: {second:#?}");
    assert!(second.stderr.contains(&format!("store: hit {}", Path::new(&path).file_name().unwrap().to_string_lossy())));
}

#[test]
fn stored_files_have_no_write_bits() {
    use std::os::unix::fs::PermissionsExt;
    let n = nonce();
    let run = build("modes", &["--env", &format!("N={n}")], &["sh", "-c", "echo $N > $out/f; chmod 4777 $out/f"]);
    run.expect_code(0);
    let path = run.stdout.trim_end();
    let mode = fs::metadata(Path::new(path).join("f")).unwrap().permissions().mode();
    assert_eq!(mode & 0o7777, 0o555, "setuid and write bits must be stripped");
}

#[test]
fn inputs_are_visible_read_only() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("data.txt");
    fs::write(&file, format!("payload {}\n", nonce())).unwrap();
    let tree = dir.path().join("tree");
    fs::create_dir(&tree).unwrap();
    fs::write(tree.join("inner"), "inner\n").unwrap();
    let script = "cat $DATA > $out/copy; cat $TREE/inner > $out/inner; \
                  if echo x >> $DATA; then echo writable; exit 1; fi; echo ro > $out/ro";
    let run = build(
        "inputs",
        &["--input", &format!("DATA={}", file.display()), "--input", &format!("TREE={}", tree.display())],
        &["sh", "-c", script],
    );
    run.expect_code(0);
    let out = Path::new(run.stdout.trim_end());
    assert_eq!(fs::read_to_string(out.join("copy")).unwrap(), fs::read_to_string(&file).unwrap());
    assert_eq!(fs::read_to_string(out.join("inner")).unwrap(), "inner\n");
    assert_eq!(fs::read_to_string(out.join("ro")).unwrap(), "ro\n");
}

#[test]
fn failing_command_stores_nothing() {
    let name = format!("fails-{}", nonce());
    let run = build(&name, &[], &["sh", "-c", "echo partial > $out/half; exit 3"]);
    run.expect_code(3);
    assert!(run.stderr.contains("exited with status 3"), "stderr: {:?}", run.stderr);
    assert!(run.stdout.is_empty(), "a failed build printed a path: {:?}", run.stdout);
    assert_eq!(store_entries_named(&name), Vec::<String>::new());
    let leftovers: Vec<_> = fs::read_dir(vm_tests::store_dir().join(".tmp"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().contains(&name))
        .collect();
    assert!(leftovers.is_empty(), "temporary build directories left behind: {leftovers:?}");
}

#[test]
fn fresh_disk_image_becomes_part_of_the_output() {
    let n = nonce();
    let script = "test -b /dev/vda || exit 10; \
                  echo disk-$N | dd of=/dev/vda bs=512 count=1 conv=sync 2>/dev/null || exit 11; \
                  cat /sys/block/vda/size > $out/sectors";
    for format in ["raw", "qcow2"] {
        let run = build(
            "disk",
            &["--env", &format!("N={n}"), "--disk-image", format, "--disk-size", "8MiB"],
            &["sh", "-c", script],
        );
        run.expect_code(0);
        let out = Path::new(run.stdout.trim_end());
        assert_eq!(fs::read_to_string(out.join("sectors")).unwrap(), format!("{}\n", 8 * 2048));
        let disk = out.join(format!("disk.{format}"));
        let bytes = fs::read(&disk).unwrap();
        if format == "raw" {
            assert_eq!(bytes.len(), 8 << 20);
            assert!(bytes.starts_with(format!("disk-{n}\n").as_bytes()));
        } else {
            assert!(bytes.starts_with(b"QFI\xfb"), "not a qcow2 image");
        }
    }
}

#[test]
fn bad_input_is_a_usage_error_and_builds_nothing() {
    let name = format!("bad-{}", nonce());
    for (args, needle) in [
        (vec!["--input", "X=/no/such/path"], "does not exist"),
        (vec!["--env", "NOEQUALS"], "NAME=VALUE"),
        (vec!["--memory", "0"], "too little"),
        (vec!["--disk-image", "vmdk"], "vmdk"),
        (vec!["--disk-image", "raw", "--disk-size", "12XB"], "unknown size unit"),
    ] {
        let run = build(&name, &args, &["true"]);
        run.expect_code(2);
        assert!(run.stderr.contains(needle), "for {args:?}, stderr lacks {needle:?}: {:?}", run.stderr);
    }
    assert!(store_entries_named(&name).is_empty());
}

/// `--net` gives the build a network that reaches the host (QEMU's user network maps
/// 10.0.2.2 to the host's loopback); without it the guest has none.
#[test]
fn a_build_has_a_network_only_when_asked() {
    use std::io::Write;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let marker = format!("from-the-host-{}", nonce());
    let answer = marker.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let _ = writeln!(stream, "{answer}");
        }
    });
    let script = format!("nc 10.0.2.2 {port} </dev/null > $out/got; ls /sys/class/net > $out/nets");
    let run = build("net", &["--net", "--env", &format!("M={marker}")], &["sh", "-c", &script]);
    run.expect_code(0);
    let out = Path::new(run.stdout.trim_end());
    assert_eq!(fs::read_to_string(out.join("got")).unwrap(), format!("{marker}\n"));
    assert_eq!(fs::read_to_string(out.join("nets")).unwrap(), "eth0\nlo\n");
    let run = build("no-net", &["--env", &format!("M={marker}")], &["sh", "-c", "ls /sys/class/net > $out/nets"]);
    run.expect_code(0);
    assert_eq!(fs::read_to_string(Path::new(run.stdout.trim_end()).join("nets")).unwrap(), "lo\n");
}
