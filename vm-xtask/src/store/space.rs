//! A full disk said plainly: an error that comes from a file system with no room left
//! (`ENOSPC`, `EDQUOT`, or a tool saying "No space left on device") gets a first line
//! that says so, names the directory, how many bytes are free and, where known, how many
//! were needed.

use std::path::Path;

/// Bytes available to this user in the file system holding `dir` (or its nearest
/// existing parent).
pub fn free_bytes(dir: &Path) -> Option<u64> {
    let existing = dir.ancestors().find(|p| p.exists())?;
    let stat = nix::sys::statvfs::statvfs(existing).ok()?;
    Some(stat.blocks_available() as u64 * stat.fragment_size() as u64)
}

/// Whether `err` (any cause in its chain) says the file system is full.
pub fn is_full(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        let io = cause.downcast_ref::<std::io::Error>();
        let code = io.and_then(std::io::Error::raw_os_error);
        matches!(code, Some(nix::libc::ENOSPC) | Some(nix::libc::EDQUOT))
            || io.is_some_and(|e| e.kind() == std::io::ErrorKind::StorageFull)
            || said_full(&cause.to_string())
    })
}

/// Whether a tool's message says the file system is full.
pub fn said_full(text: &str) -> bool {
    text.contains("No space left on device") || text.contains("Disk quota exceeded")
}

/// "no space left on device in `DIR` (N free, M needed)" when `dir`'s file system has
/// fewer than `needed` bytes free (with `needed` unknown, fewer than 64 KiB).
pub fn explain_dir(dir: &Path, needed: Option<u64>) -> Option<String> {
    let free = free_bytes(dir)?;
    (free < needed.unwrap_or(64 << 10)).then(|| message(dir, free, needed))
}

fn message(dir: &Path, free: u64, needed: Option<u64>) -> String {
    let needed = needed.map(|n| format!(", {} needed", size(n))).unwrap_or_default();
    format!(
        "no space left on device in `{}` ({} free{needed}); free some space there, or move it",
        dir.display(),
        size(free)
    )
}

fn size(bytes: u64) -> String {
    if bytes >= 1 << 20 {
        format!("{:.1} MiB", bytes as f64 / (1 << 20) as f64)
    } else {
        format!("{bytes} bytes")
    }
}

/// `err`, with a first line saying that `dir`'s file system is full when the error or
/// the free space says so (`needed`: the bytes the step needed, where known).
pub fn annotate(err: impl Into<anyhow::Error>, dir: &Path, needed: Option<u64>) -> anyhow::Error {
    let err = err.into();
    if err.chain().any(|c| c.to_string().starts_with("no space left on device in ")) {
        return err;
    }
    let free = free_bytes(dir);
    let full = is_full(&err) || matches!((free, needed), (Some(f), Some(n)) if f < n);
    match (full, free) {
        (true, Some(free)) => err.context(message(dir, free, needed)),
        (true, None) => err.context(format!("no space left on device in `{}`", dir.display())),
        (false, _) => err,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_is_named() {
        let full = anyhow::Error::from(std::io::Error::from_raw_os_error(nix::libc::ENOSPC)).context("writing x");
        let said = format!("{:#}", annotate(full, Path::new("/"), Some(10)));
        assert!(said.starts_with("no space left on device in `/` ("), "{said}");
        assert!(said.contains("10 bytes needed"), "{said}");
        let tool = anyhow::anyhow!("dpkg-deb: error: cannot copy: No space left on device");
        assert!(is_full(&tool));
        let other = anyhow::anyhow!("permission denied");
        assert_eq!(format!("{:#}", annotate(other, Path::new("/"), None)), "permission denied");
        // Said once, however often annotated.
        let twice = annotate(annotate(tool, Path::new("/"), None), Path::new("/"), None);
        assert_eq!(format!("{twice:#}").matches("no space left").count(), 1, "{twice:#}");
    }
}
