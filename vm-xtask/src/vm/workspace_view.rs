//! What a test VM sees of a workspace: its sources and nothing else. The files `git
//! ls-files --cached --others --exclude-standard` lists (tracked, and untracked but not
//! ignored; without git, every file but `target/` and `.git`) are staged in a private
//! scratch directory as hard links (copies where a link cannot be made), which is
//! shared read-only in the workspace's place. The store, the target directory, `.git`
//! and ignored files (keys live there) are not in the share at all: no mount the guest
//! could undo hides them.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use fs_err as fs;

/// The staged view of the workspace at `root` (without anything under `excluded`), with
/// the empty directories `mount_points` (relative to `root`) made for mounts over it.
pub fn stage(
    store: &crate::store::Store,
    root: &Path,
    excluded: &[&Path],
    mount_points: &[PathBuf],
) -> Result<crate::store::Exchange> {
    let files = sources(root).with_context(|| format!("listing the sources of the workspace `{}`", root.display()))?;
    // A directory of its own: the scratch around it holds its lock, which is no source.
    let view = store.private_subdir("workspace-view", "view")?;
    let _step = crate::progress::step(&format!("sharing {} source files of the workspace", files.len()));
    for relative in &files {
        let from = root.join(relative);
        if excluded.iter().any(|e| from.starts_with(e)) || relative.components().any(|c| c.as_os_str() == ".git") {
            continue;
        }
        place(&from, &view.path().join(relative))
            .with_context(|| format!("staging `{}` for the VM", from.display()))
            .map_err(|e| crate::store::space::annotate(e, view.path(), None))?;
    }
    for dir in mount_points {
        make_dirs(&view.path().join(dir))?;
    }
    Ok(view)
}

/// The workspace's source files, relative to `root`.
pub fn sources(root: &Path) -> Result<Vec<PathBuf>> {
    let git = crate::process::command("git")
        .args(["ls-files", "-z", "--cached", "--others", "--exclude-standard"])
        .current_dir(root)
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .output();
    match git {
        // Git lists nothing (not even the manifest) where the workspace lies in a
        // directory an enclosing repository ignores (a crate unpacked under `target/`):
        // that is not git's to list, so it is walked as a directory without git.
        Ok(out) if out.status.success() && out.stdout.iter().any(|b| *b != 0) => {
            let listed = out.stdout.split(|b| *b == 0).filter(|p| !p.is_empty());
            let mut files: Vec<PathBuf> = listed.map(|p| PathBuf::from(std::ffi::OsStr::from_bytes(p))).collect();
            // A path is listed once per stage while a merge is unresolved.
            files.sort();
            files.dedup();
            Ok(files)
        }
        // Not a git work tree (or no git, or ignored): everything but the build outputs and `.git`.
        _ => {
            let mut found = Vec::new();
            walk(root, Path::new(""), &mut found)?;
            Ok(found)
        }
    }
}

fn walk(root: &Path, relative: &Path, found: &mut Vec<PathBuf>) -> Result<()> {
    for entry in fs::read_dir(root.join(relative))? {
        let entry = entry?;
        let name = entry.file_name();
        if name == ".git" || relative.as_os_str().is_empty() && name == "target" {
            continue;
        }
        let path = relative.join(&name);
        if entry.file_type()?.is_dir() {
            walk(root, &path, found)?;
        } else {
            found.push(path);
        }
    }
    Ok(())
}

/// `from` at `to`: a link kept as a link, a regular file hard-linked (or copied into a
/// new file where no link can be made), a directory (a git submodule) walked; anything
/// else left out. Nothing is ever written through an existing `to`: it may be a link to
/// the workspace's own file.
fn place(from: &Path, to: &Path) -> Result<()> {
    let Ok(meta) = fs::symlink_metadata(from) else {
        // Listed by git but deleted since.
        return Ok(());
    };
    if let Some(parent) = to.parent() {
        make_dirs(parent)?;
    }
    if meta.file_type().is_symlink() {
        std::os::unix::fs::symlink(fs::read_link(from)?, to)?;
    } else if meta.is_file() {
        match std::fs::hard_link(from, to) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            // Another file system, or a file the user may not link: a copy, made anew.
            Err(_) => {
                let mut source = fs::File::open(from)?;
                let mut copy = fs::OpenOptions::new().write(true).create_new(true).open(to)?;
                std::io::copy(&mut source, &mut copy)?;
            }
        }
    } else if meta.is_dir() {
        let mut inner = Vec::new();
        walk(from, Path::new(""), &mut inner)?;
        for relative in inner {
            place(&from.join(&relative), &to.join(&relative))?;
        }
    }
    Ok(())
}

fn make_dirs(dir: &Path) -> Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o755)
        .create(dir)
        .with_context(|| format!("creating `{}`", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_placed_twice_is_left_whole() {
        let dir = tempfile::tempdir().unwrap();
        let from = dir.path().join("source.rs");
        fs::write(&from, "fn main() {}\n").unwrap();
        let to = dir.path().join("view/source.rs");
        place(&from, &to).unwrap();
        place(&from, &to).unwrap();
        assert_eq!(fs::read_to_string(&from).unwrap(), "fn main() {}\n");
        assert_eq!(fs::read_to_string(&to).unwrap(), "fn main() {}\n");
    }

    #[test]
    fn without_git_everything_but_the_build_outputs_and_git() {
        let dir = tempfile::tempdir().unwrap();
        for file in ["src/lib.rs", "target/debug/x", ".git/config", "sub/.git/HEAD", "sub/f", "key.pem"] {
            let path = dir.path().join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, "x").unwrap();
        }
        let mut found = Vec::new();
        walk(dir.path(), Path::new(""), &mut found).unwrap();
        found.sort();
        let found: Vec<String> = found.iter().map(|p| p.display().to_string()).collect();
        assert_eq!(found, ["key.pem", "src/lib.rs", "sub/f"]);
    }

    #[test]
    fn a_workspace_in_a_directory_git_ignores_is_walked() {
        let dir = tempfile::tempdir().unwrap();
        let git = |args: &[&str]| {
            let status = std::process::Command::new("git").args(args).current_dir(dir.path()).status().unwrap();
            assert!(status.success(), "git {args:?}");
        };
        git(&["init", "-q"]);
        for (file, text) in [(".gitignore", "/target\n"), ("Cargo.toml", ""), ("target/crate/Cargo.toml", "")] {
            let path = dir.path().join(file);
            fs::create_dir_all(path.parent().unwrap()).unwrap();
            fs::write(&path, text).unwrap();
        }
        fs::create_dir_all(dir.path().join("target/crate/target/debug")).unwrap();
        fs::write(dir.path().join("target/crate/target/debug/x"), "").unwrap();
        let found = sources(&dir.path().join("target/crate")).unwrap();
        assert_eq!(found, [PathBuf::from("Cargo.toml")]);
        let mut outer = sources(dir.path()).unwrap();
        outer.sort();
        assert_eq!(outer, [PathBuf::from(".gitignore"), PathBuf::from("Cargo.toml")]);
    }
}
