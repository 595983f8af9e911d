//! Progress of long work, on stderr only (stdout carries results alone): bars and
//! spinners ([`indicatif`]) on a terminal; on a pipe or in CI (`CI` set), one line per
//! step; with `--quiet`, nothing.
//!
//! Work done by a child process (apt-get, mke2fs, qemu-img) is followed by watching the
//! file it writes grow: [`Step::watch_file`].

use std::io::IsTerminal;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};

static QUIET: AtomicBool = AtomicBool::new(false);

/// `--quiet`: no progress at all.
pub fn set_quiet(quiet: bool) {
    QUIET.store(quiet, Ordering::Relaxed);
}

/// How progress is shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Nothing (`--quiet`).
    Quiet,
    /// One line per step on stderr (a pipe, a file, CI).
    Lines,
    /// Bars and spinners on stderr (a terminal).
    Bars,
}

/// The mode for this process: `--quiet`, else bars on a terminal outside CI, else lines.
pub fn mode() -> Mode {
    choose(QUIET.load(Ordering::Relaxed), std::io::stderr().is_terminal(), std::env::var_os("CI").is_some())
}

fn choose(quiet: bool, terminal: bool, ci: bool) -> Mode {
    match (quiet, terminal && !ci) {
        (true, _) => Mode::Quiet,
        (false, true) => Mode::Bars,
        (false, false) => Mode::Lines,
    }
}

/// Whether step lines (or bars) are shown at all.
pub fn shown() -> bool {
    mode() != Mode::Quiet
}

/// A step of long work: a line when it starts (lines mode), or a spinner that becomes a
/// bar once its size is known (bars mode). Ended when dropped.
pub struct Step {
    bar: Option<ProgressBar>,
    watcher: Option<(Arc<AtomicBool>, std::thread::JoinHandle<()>)>,
}

/// Starts a step called `what` (`fetching busybox-static`, `making the ext4 file
/// system`, ...).
pub fn step(what: &str) -> Step {
    match mode() {
        Mode::Quiet => Step { bar: None, watcher: None },
        Mode::Lines => {
            eprintln!("{what}");
            Step { bar: None, watcher: None }
        }
        Mode::Bars => {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg} {bytes} ({bytes_per_sec}) {elapsed}").unwrap());
            bar.set_message(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(100));
            Step { bar: Some(bar), watcher: None }
        }
    }
}

impl Step {
    /// Shows the growth of `file` (its allocated bytes: sparse images count what is
    /// written) as the step's progress, against `total` bytes when known (a bar), or as
    /// a growing size (a spinner), until the step ends.
    pub fn watch_file(mut self, file: &Path, total: Option<u64>) -> Step {
        let Some(bar) = self.bar.clone() else { return self };
        set_total(&bar, total);
        let stop = Arc::new(AtomicBool::new(false));
        let (done, file) = (stop.clone(), file.to_path_buf());
        let handle = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(written(&file));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        self.watcher = Some((stop, handle));
        self
    }

    /// The same for the largest file in `dir` (a download's partial file, whose name is
    /// not known beforehand).
    pub fn watch_dir(mut self, dir: &Path, total: Option<u64>) -> Step {
        let Some(bar) = self.bar.clone() else { return self };
        set_total(&bar, total);
        let dir = dir.to_path_buf();
        let stop = Arc::new(AtomicBool::new(false));
        let done = stop.clone();
        let handle = std::thread::spawn(move || {
            while !done.load(Ordering::Relaxed) {
                bar.set_position(largest_file(&dir));
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        self.watcher = Some((stop, handle));
        self
    }
}

/// A bar, and no line, for the work of a child process that writes `file`: the step's
/// line was said already ([`step`] or the caller's own); on a terminal only.
pub fn file_bar(what: &str, file: &Path, total: Option<u64>) -> Step {
    match mode() {
        Mode::Bars => step(what).watch_file(file, total),
        Mode::Quiet | Mode::Lines => Step { bar: None, watcher: None },
    }
}

/// Turns a spinner into a bar of `total` bytes.
fn set_total(bar: &ProgressBar, total: Option<u64>) {
    if let Some(total) = total.filter(|t| *t > 0) {
        bar.set_length(total);
        bar.set_style(
            ProgressStyle::with_template("{msg} [{bar:30}] {bytes}/{total_bytes} ({bytes_per_sec}, {eta})")
                .unwrap()
                .progress_chars("=> "),
        );
    }
}

impl Drop for Step {
    fn drop(&mut self) {
        if let Some((stop, handle)) = self.watcher.take() {
            stop.store(true, Ordering::Relaxed);
            let _ = handle.join();
        }
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

/// The bytes written to `file` so far: its allocated blocks (a sparse image's apparent
/// size is its whole size from the start), at most its length.
fn written(file: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(file).map(|m| (m.blocks() * 512).min(m.len())).unwrap_or(0)
}

fn largest_file(dir: &Path) -> u64 {
    let mut largest = 0;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match entry.metadata() {
                Ok(m) if m.is_dir() => stack.push(entry.path()),
                Ok(m) => largest = largest.max(m.len()),
                Err(_) => {}
            }
        }
    }
    largest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quiet_wins_and_pipes_or_ci_get_lines() {
        assert_eq!(choose(true, true, false), Mode::Quiet);
        assert_eq!(choose(true, false, true), Mode::Quiet);
        assert_eq!(choose(false, true, false), Mode::Bars);
        assert_eq!(choose(false, true, true), Mode::Lines);
        assert_eq!(choose(false, false, false), Mode::Lines);
    }

    #[test]
    fn written_counts_allocated_bytes_of_sparse_files() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("sparse");
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(64 << 20).unwrap();
        assert!(written(&file) < 1 << 20, "{}", written(&file));
        std::fs::write(&file, vec![1u8; 8192]).unwrap();
        assert_eq!(written(&file), 8192);
        assert_eq!(largest_file(dir.path()), 8192);
    }
}
