//! Directory-descriptor file access: every open, create, read-link and removal is
//! relative to an open directory and never follows a symbolic link, so a tree that
//! someone else wrote (a guest's `$out`, a dead run's scratch) cannot steer a walk
//! outside itself, whatever links or renames it holds.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{self, AtFlags, OFlag};
use nix::sys::stat::{self, FileStat, Mode, SFlag};
use nix::unistd::{self, UnlinkatFlags};

/// The kind of a directory entry, as `lstat` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Dir,
    File,
    Symlink,
    /// A device node, FIFO or socket.
    Special,
}

impl Kind {
    pub fn of(st: &FileStat) -> Kind {
        match SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT {
            SFlag::S_IFDIR => Kind::Dir,
            SFlag::S_IFREG => Kind::File,
            SFlag::S_IFLNK => Kind::Symlink,
            _ => Kind::Special,
        }
    }
}

/// The extended attribute in which QEMU's 9p server (`security_model=mapped-xattr`) keeps
/// the mode a guest gave a file: type and permission bits, a little-endian 32-bit word.
/// The host file itself keeps QEMU's own private mode (0600, or 0700 for a directory),
/// and what the guest made a symbolic link is a regular file holding the link's text.
pub const GUEST_MODE_XATTR: &str = "user.virtfs.mode";

/// The mode a guest gave `file` through a mapped 9p share, if it gave one
/// ([`GUEST_MODE_XATTR`]); `None` for a file the host made, or on a file system without
/// extended attributes.
pub fn guest_mode(file: &File) -> io::Result<Option<u32>> {
    let mut word = [0u8; 4];
    let name = c"user.virtfs.mode";
    // SAFETY: a plain system call on an open descriptor, into a buffer of the size given.
    let n = unsafe { nix::libc::fgetxattr(file.as_raw_fd(), name.as_ptr(), word.as_mut_ptr().cast(), word.len()) };
    if n < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(nix::libc::ENODATA) | Some(nix::libc::ENOTSUP) => Ok(None),
            _ => Err(e),
        };
    }
    if n != 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, format!("{GUEST_MODE_XATTR} holds {n} bytes, not 4")));
    }
    Ok(Some(u32::from_le_bytes(word)))
}

/// What a guest made of a regular host file written through a mapped 9p share: `Kind::File`
/// with its permission bits, `Kind::Symlink` (the file holds the link's text), or
/// `Kind::Special`; a file without the attribute is a plain file with its host mode.
pub fn guest_kind(file: &File, host_mode: u32) -> io::Result<(Kind, u32)> {
    let Some(mode) = guest_mode(file)? else { return Ok((Kind::File, host_mode & 0o7777)) };
    let kind = match mode & nix::libc::S_IFMT {
        // QEMU records the type; a mode without one is a file's.
        0 | nix::libc::S_IFREG => Kind::File,
        nix::libc::S_IFLNK => Kind::Symlink,
        _ => Kind::Special,
    };
    Ok((kind, mode & 0o7777))
}

const DIR_FLAGS: OFlag = OFlag::O_RDONLY.union(OFlag::O_DIRECTORY).union(OFlag::O_NOFOLLOW).union(OFlag::O_CLOEXEC);

fn owned(fd: RawFd) -> OwnedFd {
    // SAFETY: `fd` was just returned by a successful open and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn err(e: Errno) -> io::Error {
    io::Error::from_raw_os_error(e as i32)
}

/// An open directory.
#[derive(Debug)]
pub struct DirFd(OwnedFd);

impl DirFd {
    /// Opens the directory at `path`; its last component must not be a link.
    pub fn open(path: &Path) -> io::Result<DirFd> {
        fcntl::open(path, DIR_FLAGS, Mode::empty()).map(|fd| DirFd(owned(fd))).map_err(err)
    }

    fn raw(&self) -> Option<RawFd> {
        Some(self.0.as_raw_fd())
    }

    /// Opens the subdirectory `name`; a link there is an error (`ELOOP` or `ENOTDIR`).
    pub fn open_dir(&self, name: &OsStr) -> io::Result<DirFd> {
        fcntl::openat(self.raw(), name, DIR_FLAGS, Mode::empty()).map(|fd| DirFd(owned(fd))).map_err(err)
    }

    /// The entry's status, not following a link.
    pub fn stat(&self, name: &OsStr) -> io::Result<FileStat> {
        stat::fstatat(self.raw(), name, AtFlags::AT_SYMLINK_NOFOLLOW).map_err(err)
    }

    /// The directory's own status.
    #[cfg(test)]
    pub fn stat_self(&self) -> io::Result<FileStat> {
        stat::fstat(self.0.as_raw_fd()).map_err(err)
    }

    /// The names in the directory, sorted, without `.` and `..`.
    pub fn names(&self) -> io::Result<Vec<OsString>> {
        let mut dir = nix::dir::Dir::openat(self.raw(), ".", DIR_FLAGS, Mode::empty()).map_err(err)?;
        let mut names = Vec::new();
        for entry in dir.iter() {
            let entry = entry.map_err(err)?;
            let name = entry.file_name().to_bytes();
            if name != b"." && name != b".." {
                names.push(OsStr::from_bytes(name).to_os_string());
            }
        }
        names.sort();
        Ok(names)
    }

    /// Opens the regular file `name` for reading: never through a link, never blocking
    /// on a FIFO, and refused unless it is a regular file.
    pub fn open_file(&self, name: &OsStr) -> io::Result<File> {
        let flags = OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC | OFlag::O_NOCTTY;
        let fd = owned(fcntl::openat(self.raw(), name, flags, Mode::empty()).map_err(err)?);
        let st = stat::fstat(fd.as_raw_fd()).map_err(err)?;
        if Kind::of(&st) != Kind::File {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "not a regular file"));
        }
        // Back to blocking reads: a regular file never blocks anyway.
        fcntl::fcntl(fd.as_raw_fd(), fcntl::FcntlArg::F_SETFL(OFlag::empty())).map_err(err)?;
        Ok(File::from(fd))
    }

    /// Creates the file `name`, which must not exist (`O_CREAT|O_EXCL|O_NOFOLLOW`).
    pub fn create_file(&self, name: &OsStr, mode: u32) -> io::Result<File> {
        let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
        let fd = fcntl::openat(self.raw(), name, flags, Mode::from_bits_truncate(mode)).map_err(err)?;
        Ok(File::from(owned(fd)))
    }

    /// Makes the directory `name` with `mode` (less the umask).
    pub fn mkdir(&self, name: &OsStr, mode: u32) -> io::Result<()> {
        stat::mkdirat(self.raw(), name, Mode::from_bits_truncate(mode)).map_err(err)
    }

    /// The text of the symbolic link `name`.
    pub fn read_link(&self, name: &OsStr) -> io::Result<OsString> {
        fcntl::readlinkat(self.raw(), name).map_err(err)
    }

    /// Makes `name` a symbolic link to `target`.
    pub fn symlink(&self, target: &OsStr, name: &OsStr) -> io::Result<()> {
        unistd::symlinkat(target, self.raw(), name).map_err(err)
    }

    /// Sets the directory's own mode.
    pub fn chmod_self(&self, mode: u32) -> io::Result<()> {
        stat::fchmod(self.0.as_raw_fd(), Mode::from_bits_truncate(mode)).map_err(err)
    }

    /// Flushes the directory's entries to disk.
    pub fn sync(&self) -> io::Result<()> {
        unistd::fsync(self.0.as_raw_fd()).map_err(err)
    }

    /// Removes the entry `name`, whatever it is: a directory with everything in it
    /// (made writable on the way, through its descriptor), or anything else unlinked.
    /// What is already gone counts as removed.
    pub fn remove_all(&self, name: &OsStr) -> io::Result<()> {
        let gone = |r: io::Result<()>| match r {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            r => r,
        };
        let st = match self.stat(name) {
            Ok(st) => st,
            Err(e) => return gone(Err(e)),
        };
        if Kind::of(&st) == Kind::Dir {
            // A directory replaced by a link meanwhile fails to open here (O_NOFOLLOW).
            let sub = match self.open_dir(name) {
                Ok(sub) => sub,
                Err(e) => return gone(Err(e)),
            };
            gone(sub.chmod_self(0o700))?;
            let names = match sub.names() {
                Ok(names) => names,
                Err(e) => return gone(Err(e)),
            };
            for child in names {
                sub.remove_all(&child)?;
            }
            gone(unistd::unlinkat(self.raw(), name, UnlinkatFlags::RemoveDir).map_err(err))
        } else {
            gone(unistd::unlinkat(self.raw(), name, UnlinkatFlags::NoRemoveDir).map_err(err))
        }
    }
}

/// Removes the file or tree at `path` without following any link inside it (the last
/// component itself is removed, not followed, when it is a link). What is already gone
/// counts as removed: two processes may clean up the same leftovers at once.
pub fn remove_path(path: &Path) -> io::Result<()> {
    let (parent, name) = split(path)?;
    match DirFd::open(parent) {
        Ok(dir) => dir.remove_all(name),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// `path`'s parent directory and last component.
pub fn split(path: &Path) -> io::Result<(&Path, &OsStr)> {
    let name = path.file_name().ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no file name"))?;
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    Ok((parent, name))
}

/// Flushes a file or a whole tree to disk: every file's data and every directory's
/// entries, without following links.
pub fn sync_tree(path: &Path) -> io::Result<()> {
    walk_tree(path, &|file| file.sync_all(), true)
}

/// Starts writing back every regular file of the tree at `path` without waiting for it
/// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`): work the disk does while the caller does
/// something else (hashing the same files), before a [`sync_tree`] that then waits for
/// less.
pub fn start_writeback(path: &Path) -> io::Result<()> {
    walk_tree(path, &start_file_writeback, false)
}

/// [`start_writeback`] for one open file.
pub fn start_file_writeback(file: &File) -> io::Result<()> {
    // SAFETY: a plain system call on an open descriptor.
    let done = unsafe { nix::libc::sync_file_range(file.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE) };
    if done != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Calls `on_file` on every regular file of the tree at `path` (never following a link),
/// and with `dirs`, flushes each directory after its entries.
fn walk_tree(path: &Path, on_file: &dyn Fn(&File) -> io::Result<()>, dirs: bool) -> io::Result<()> {
    let (parent, name) = split(path)?;
    let parent = DirFd::open(parent)?;
    walk_entry(&parent, name, on_file, dirs)
}

fn walk_entry(dir: &DirFd, name: &OsStr, on_file: &dyn Fn(&File) -> io::Result<()>, dirs: bool) -> io::Result<()> {
    match Kind::of(&dir.stat(name)?) {
        Kind::Dir => {
            let sub = dir.open_dir(name)?;
            for child in sub.names()? {
                walk_entry(&sub, &child, on_file, dirs)?;
            }
            if dirs {
                sub.sync()?;
            }
            Ok(())
        }
        Kind::File => on_file(&dir.open_file(name)?),
        Kind::Symlink | Kind::Special => Ok(()),
    }
}

/// Flushes the directory at `path` (its entries: names just created or renamed).
pub fn sync_dir(path: &Path) -> io::Result<()> {
    DirFd::open(path)?.sync()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn removal_never_follows_links_and_unlocks_read_only_directories() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("keep"), "keep").unwrap();
        fs::set_permissions(&outside, fs::Permissions::from_mode(0o555)).unwrap();
        let tree = dir.path().join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/link")).unwrap();
        std::os::unix::fs::symlink(&outside, tree.join("a/b/link2")).unwrap();
        fs::set_permissions(tree.join("a/b"), fs::Permissions::from_mode(0o500)).unwrap();
        fs::set_permissions(tree.join("a"), fs::Permissions::from_mode(0o500)).unwrap();
        remove_path(&tree).unwrap();
        assert!(!tree.exists());
        assert_eq!(fs::read_to_string(outside.join("keep")).unwrap(), "keep");
        assert_eq!(fs::metadata(&outside).unwrap().permissions().mode() & 0o777, 0o555, "followed a link");
        // A link as the top is removed, not followed.
        let top = dir.path().join("top");
        std::os::unix::fs::symlink(&outside, &top).unwrap();
        remove_path(&top).unwrap();
        assert!(outside.join("keep").exists() && fs::symlink_metadata(&top).is_err());
        remove_path(&dir.path().join("never-there")).unwrap();
    }

    #[test]
    fn reads_refuse_links_and_fifos() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink("f", dir.path().join("l")).unwrap();
        nix::unistd::mkfifo(&dir.path().join("p"), Mode::from_bits_truncate(0o600)).unwrap();
        let d = DirFd::open(dir.path()).unwrap();
        assert!(d.open_file(OsStr::new("f")).is_ok());
        assert!(d.open_file(OsStr::new("l")).is_err());
        assert!(d.open_file(OsStr::new("p")).is_err(), "a FIFO must be refused without blocking");
        assert!(d.open_dir(OsStr::new("l")).is_err());
        assert!(d.create_file(OsStr::new("l"), 0o600).is_err(), "created through a link");
    }
}
