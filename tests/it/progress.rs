//! Progress goes to stderr, one line per step where stderr is not a terminal (as here,
//! a pipe), nothing with `--quiet`; stdout holds the result alone either way.

use std::path::Path;

use vm_tests::{store_dir, xtask};

/// Sizes that no other test (nor an earlier run of this one) builds, so the image is
/// made and there are steps to show.
fn fresh_size(offset: u64) -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{}MiB", 700 + (t.as_nanos() as u64 / 1000 + offset) % 500 * 2 + offset)
}

/// Removes an image item (read-only in the store) and its record.
fn remove_item(image: &Path) {
    let item = image.parent().unwrap();
    let status = std::process::Command::new("chmod").arg("-R").arg("u+w").arg(item).status().unwrap();
    assert!(status.success());
    std::fs::remove_dir_all(item).unwrap();
    let meta = format!("{}.meta", item.file_name().unwrap().to_string_lossy());
    std::fs::remove_file(store_dir().join("meta").join(meta)).unwrap();
}

/// The one line of stdout, which must be an existing file.
fn only_line(stdout: &str) -> &Path {
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "stdout holds more than the result: {stdout:?}");
    let path = Path::new(lines[0]);
    assert!(path.is_file(), "{stdout:?}");
    path
}

#[test]
fn progress_is_one_line_per_step_on_a_pipe_and_nothing_with_quiet() {
    let size = fresh_size(0);
    let run = xtask(&["vm-image", "--format", "raw", "--size", &size]);
    run.expect_code(0);
    let image = only_line(&run.stdout).to_path_buf();
    for step in ["vm-image: staging the closure of `minimal`", "vm-image: making the ext4 file system"] {
        assert!(run.stderr.lines().any(|l| l.starts_with(step)), "no `{step}` line: {run:#?}");
    }
    // Lines, not a terminal's bars: no carriage returns, no escape sequences.
    assert!(!run.stderr.contains('\r') && !run.stderr.contains('\u{1b}'), "{:?}", run.stderr);
    remove_item(&image);

    let size = fresh_size(1);
    let quiet = xtask(&["vm-image", "--quiet", "--format", "raw", "--size", &size]);
    quiet.expect_code(0);
    let image = only_line(&quiet.stdout).to_path_buf();
    assert_eq!(quiet.stderr, "", "--quiet printed more than results and errors");
    remove_item(&image);
}
