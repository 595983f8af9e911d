//! Ingest: copying a tree nobody vouches for (what a guest left in `$out`, a `--input`
//! directory) into a new store temporary, through directory descriptors only.
//!
//! The source is walked with `openat(O_NOFOLLOW)`, never by joined paths, and never
//! written to: files are copied into new files made with `O_CREAT|O_EXCL|O_NOFOLLOW`
//! (which breaks hard links without touching a name the source chose), directories are
//! made anew, and a symbolic link is recreated only if it resolves inside the tree when
//! every link on the way is followed as the kernel would. Special files, links that leave
//! the tree or lead nowhere, and trees over the size, entry or depth limits are refused
//! with an error naming the entry.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::io::{self, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::fd::{guest_kind, DirFd, Kind};

/// The longest link text kept (the kernel's `PATH_MAX`, its terminating NUL included).
const MAX_LINK_TEXT: u64 = 4096;

/// What a tree may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Sum of the regular files' apparent sizes (a sparse file counts in full).
    pub max_bytes: u64,
    /// Entries of every kind, the top not counted.
    pub max_entries: u64,
    /// Directories below the top.
    pub max_depth: usize,
    /// The tree was written by a guest through a 9p share with
    /// `security_model=mapped-xattr`: a regular file's guest mode (its executable bit,
    /// and whether the guest made it a symbolic link) is in its `user.virtfs.mode`
    /// attribute (`store::fd::GUEST_MODE_XATTR`), not in its host mode.
    pub mapped: bool,
}

impl Limits {
    /// The limits for a guest's `$out` holding at most `max_bytes`.
    pub fn output(max_bytes: u64) -> Limits {
        Limits { max_bytes, max_entries: 1_000_000, max_depth: 256, mapped: false }
    }

    /// [`Limits::output`] for a tree a guest wrote through a mapped share ([`Limits::mapped`]).
    pub fn guest_output(max_bytes: u64) -> Limits {
        Limits { mapped: true, ..Limits::output(max_bytes) }
    }

    /// The limits for a tree of the host user's (an input): only the depth is bounded.
    pub fn host() -> Limits {
        Limits { max_bytes: u64::MAX, max_entries: u64::MAX, max_depth: 1024, mapped: false }
    }
}

/// An entry of the copied tree, as far as link resolution needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Dir,
    File,
    Link(OsString),
}

/// Why a link is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unresolved {
    Absolute,
    Outside,
    Missing,
    NotADirectory,
    TooManyLinks,
}

impl Unresolved {
    fn says(self) -> &'static str {
        match self {
            Unresolved::Absolute => "is absolute",
            Unresolved::Outside => "leads outside",
            Unresolved::Missing => "leads to nothing",
            Unresolved::NotADirectory => "goes through a file as if it were a directory",
            Unresolved::TooManyLinks => "goes through more than 40 links (a loop?)",
        }
    }
}

/// A tree in memory: every entry by its path components below the top (the top is
/// `[]`). Ingest itself keeps no such map (its memory would grow with the entries and
/// their depth); it resolves links on the copy on disk ([`copy_dir`]).
#[cfg(test)]
pub type Tree = std::collections::BTreeMap<Vec<OsString>, Node>;

/// Where a link's resolution stands: the directory it is in, and the entries there.
trait Cursor {
    /// What `name` is in the current directory (a link with its text), if anything.
    fn look(&mut self, name: &OsStr) -> Option<Node>;
    /// Goes into the directory `name`, just looked at.
    fn enter(&mut self, name: &OsStr) -> bool;
    /// Goes up; false at the top (there is nothing above the tree).
    fn up(&mut self) -> bool;
}

/// Follows `target` from the cursor's directory the way the kernel would (every link
/// on the way followed, at most 40): `Ok(Some(name))` when it ends at the file `name` of
/// the cursor's directory, `Ok(None)` when it ends at the cursor's directory.
fn follow(cursor: &mut impl Cursor, target: &OsStr) -> Result<Option<OsString>, Unresolved> {
    // Split at every `/` by hand: `Path::components` drops a `.` or an empty name after
    // the first, which the kernel does not (`file/.` and `file/` are not `file`: the
    // name before them must be a directory).
    fn parts(text: &OsStr) -> Result<Vec<OsString>, Unresolved> {
        use std::os::unix::ffi::OsStrExt;
        if text.as_bytes().first() == Some(&b'/') {
            return Err(Unresolved::Absolute);
        }
        if text.is_empty() {
            return Err(Unresolved::Missing);
        }
        Ok(text.as_bytes().split(|b| *b == b'/').map(|p| OsStr::from_bytes(p).into()).collect())
    }
    let mut pending: VecDeque<OsString> = parts(target)?.into();
    let mut hops = 0;
    while let Some(part) = pending.pop_front() {
        match part.as_encoded_bytes() {
            // The cursor is always at a directory: a `.` after a file was caught below.
            b"" | b"." => {}
            b".." => {
                if !cursor.up() {
                    return Err(Unresolved::Outside);
                }
            }
            _ => match cursor.look(&part) {
                None => return Err(Unresolved::Missing),
                Some(Node::Dir) => {
                    if !cursor.enter(&part) {
                        return Err(Unresolved::Missing);
                    }
                }
                Some(Node::File) if pending.is_empty() => return Ok(Some(part)),
                Some(Node::File) => return Err(Unresolved::NotADirectory),
                Some(Node::Link(text)) => {
                    hops += 1;
                    if hops > 40 {
                        return Err(Unresolved::TooManyLinks);
                    }
                    for p in parts(&text)?.into_iter().rev() {
                        pending.push_front(p);
                    }
                }
            },
        }
    }
    Ok(None)
}

/// A cursor over a [`Tree`] in memory.
#[cfg(test)]
struct TreeCursor<'a> {
    tree: &'a Tree,
    cur: Vec<OsString>,
}

#[cfg(test)]
impl Cursor for TreeCursor<'_> {
    fn look(&mut self, name: &OsStr) -> Option<Node> {
        let mut path = self.cur.clone();
        path.push(name.to_os_string());
        self.tree.get(&path).cloned()
    }
    fn enter(&mut self, name: &OsStr) -> bool {
        self.cur.push(name.to_os_string());
        true
    }
    fn up(&mut self) -> bool {
        self.cur.pop().is_some()
    }
}

/// A cursor over a tree on disk: the open directories from the top to where it is.
struct DiskCursor {
    stack: Vec<std::rc::Rc<DirFd>>,
}

impl Cursor for DiskCursor {
    fn look(&mut self, name: &OsStr) -> Option<Node> {
        let dir = self.stack.last()?;
        let st = dir.stat(name).ok()?;
        match Kind::of(&st) {
            Kind::Dir => Some(Node::Dir),
            Kind::Symlink => dir.read_link(name).ok().map(Node::Link),
            Kind::File | Kind::Special => Some(Node::File),
        }
    }
    fn enter(&mut self, name: &OsStr) -> bool {
        match self.stack.last().map(|d| d.open_dir(name)) {
            Some(Ok(dir)) => {
                self.stack.push(std::rc::Rc::new(dir));
                true
            }
            _ => false,
        }
    }
    fn up(&mut self) -> bool {
        self.stack.len() > 1 && self.stack.pop().is_some()
    }
}

/// Follows `target`, a link's text, from the directory `dir` inside `tree`, the way the
/// kernel would (every link on the way followed, at most 40), and returns the entry it
/// reaches. The top's `..` is outside: there is nothing above the tree.
#[cfg(test)]
pub fn resolve(tree: &Tree, dir: &[OsString], target: &OsStr) -> Result<Vec<OsString>, Unresolved> {
    let mut cursor = TreeCursor { tree, cur: dir.to_vec() };
    let file = follow(&mut cursor, target)?;
    let mut at = cursor.cur;
    at.extend(file);
    Ok(at)
}

/// How an entry is named in messages: `shown` (e.g. `$out`) and the path below it,
/// escaped, so a name with a newline or a terminal escape prints as text.
pub fn display(shown: &str, rel: &[OsString]) -> String {
    let mut s = shown.to_string();
    for c in rel {
        s.push('/');
        s.extend(c.to_string_lossy().escape_debug());
    }
    s
}

/// Copies the directory `src` into `to` (which must not exist), as the module doc says.
/// `shown` names the source in errors. On error `to` may hold part of the copy: it is
/// always a store temporary, removed by the caller.
pub fn copy_dir(src: &DirFd, shown: &str, to: &Path, limits: &Limits) -> Result<()> {
    copy_dir_with(src, shown, to, limits, Links::Inside)
}

/// Which symbolic links a copy keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Links {
    /// Only those that resolve inside the tree (what a guest or an input may hold).
    Inside,
    /// Every link, as it is: for content whose hash a trusted key signed (a pulled
    /// substitute, made by a store like this one, whose Debian packages hold absolute
    /// links). Links are never followed while copying, whichever is chosen.
    Any,
}

/// [`copy_dir`], keeping the `links` chosen. Memory grows with the depth of the tree,
/// not with its entries: links are made in the copy as they are met and, to keep only
/// those inside, resolved afterwards on the copy itself, through descriptors.
pub fn copy_dir_with(src: &DirFd, shown: &str, to: &Path, limits: &Limits, keep: Links) -> Result<()> {
    std::fs::create_dir(to).with_context(|| format!("creating `{}`", to.display()))?;
    let dst = DirFd::open(to).with_context(|| format!("opening `{}`", to.display()))?;
    let mut walk = Walk { shown, limits, bytes: 0, entries: 0, links: 0 };
    walk.dir(src, &dst, &mut Vec::new())?;
    if keep == Links::Inside && walk.links > 0 {
        let top = std::rc::Rc::new(DirFd::open(to).with_context(|| format!("opening `{}`", to.display()))?);
        check_links(shown, &mut vec![top], &mut Vec::new())?;
    }
    Ok(())
}

/// Every link below the last directory of `stack` (open from the top of the copy) must
/// resolve inside the copy.
fn check_links(shown: &str, stack: &mut Vec<std::rc::Rc<DirFd>>, rel: &mut Vec<OsString>) -> Result<()> {
    let dir = stack.last().expect("the top at least").clone();
    for name in dir.names().with_context(|| format!("listing the copy of `{}`", display(shown, rel)))? {
        rel.push(name.clone());
        let st = dir.stat(&name).with_context(|| format!("reading the copy of `{}`", display(shown, rel)))?;
        match Kind::of(&st) {
            Kind::Dir => {
                stack.push(std::rc::Rc::new(dir.open_dir(&name)?));
                check_links(shown, stack, rel)?;
                stack.pop();
            }
            Kind::Symlink => {
                let target = dir.read_link(&name)?;
                let mut cursor = DiskCursor { stack: stack.clone() };
                if let Err(why) = follow(&mut cursor, &target) {
                    bail!(
                        "`{}` is a symbolic link to `{}`, which {}; links must resolve inside {shown}",
                        display(shown, rel),
                        target.to_string_lossy().escape_debug(),
                        why.says()
                    );
                }
            }
            _ => {}
        }
        rel.pop();
    }
    Ok(())
}

struct Walk<'a> {
    shown: &'a str,
    limits: &'a Limits,
    bytes: u64,
    entries: u64,
    links: u64,
}

impl Walk<'_> {
    fn dir(&mut self, src: &DirFd, dst: &DirFd, rel: &mut Vec<OsString>) -> Result<()> {
        let names = src.names().with_context(|| format!("listing `{}`", display(self.shown, rel)))?;
        for name in names {
            rel.push(name.clone());
            self.entry(src, dst, &name, rel)?;
            rel.pop();
        }
        Ok(())
    }

    fn entry(&mut self, src: &DirFd, dst: &DirFd, name: &OsStr, rel: &mut Vec<OsString>) -> Result<()> {
        let shown = || display(self.shown, rel);
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            bail!("`{}`: {} holds more than {} entries", shown(), self.shown, self.limits.max_entries);
        }
        let st = src.stat(name).with_context(|| format!("reading `{}`", shown()))?;
        match Kind::of(&st) {
            Kind::Dir => {
                if rel.len() > self.limits.max_depth {
                    bail!("`{}` is nested more than {} directories deep", shown(), self.limits.max_depth);
                }
                dst.mkdir(name, 0o700).with_context(|| format!("copying `{}`", shown()))?;
                let from = src.open_dir(name).with_context(|| format!("opening `{}`", shown()))?;
                let to = dst.open_dir(name).with_context(|| format!("opening the copy of `{}`", shown()))?;
                self.dir(&from, &to, rel)?;
            }
            Kind::File => {
                let size = st.st_size as u64;
                let mut from = src.open_file(name).with_context(|| format!("opening `{}`", shown()))?;
                // Through a mapped share, the guest's mode is in an attribute: a link
                // it made is a file holding the link's text.
                let (kind, guest_mode) = match self.limits.mapped {
                    true => guest_kind(&from, st.st_mode).with_context(|| format!("reading `{}`", shown()))?,
                    false => (Kind::File, st.st_mode),
                };
                match kind {
                    Kind::File => {}
                    Kind::Symlink => {
                        if size >= MAX_LINK_TEXT {
                            bail!("`{}` is a symbolic link of {size} bytes; the store takes none that long", shown());
                        }
                        let mut text = Vec::new();
                        (&mut from).take(MAX_LINK_TEXT).read_to_end(&mut text)?;
                        use std::os::unix::ffi::OsStringExt;
                        let target = OsString::from_vec(text);
                        // Made now, checked with the others once the copy is whole.
                        dst.symlink(&target, name).with_context(|| format!("recreating the link `{}`", shown()))?;
                        self.links += 1;
                        return Ok(());
                    }
                    _ => bail!("`{}` is a special file (device, FIFO or socket); the store takes none", shown()),
                }
                self.bytes = self.bytes.saturating_add(size);
                if self.bytes > self.limits.max_bytes {
                    bail!(
                        "`{}` ({size} bytes) brings {} over its limit of {} bytes (raise it with --max-output)",
                        shown(),
                        self.shown,
                        self.limits.max_bytes
                    );
                }
                let mode = if guest_mode & 0o111 != 0 { 0o700 } else { 0o600 };
                let mut to = dst.create_file(name, mode).with_context(|| format!("copying `{}`", shown()))?;
                let copied =
                    io::copy(&mut from.take(size), &mut to).with_context(|| format!("copying `{}`", shown()))?;
                if copied != size {
                    bail!("`{}` changed size while it was copied", shown());
                }
            }
            Kind::Symlink => {
                let target = src.read_link(name).with_context(|| format!("reading the link `{}`", shown()))?;
                // Made now (a link is never followed here), checked once the copy is whole.
                dst.symlink(&target, name).with_context(|| format!("recreating the link `{}`", shown()))?;
                self.links += 1;
            }
            Kind::Special => {
                bail!("`{}` is a special file (device, FIFO or socket); the store takes none", shown())
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    fn p(s: &str) -> Vec<OsString> {
        s.split('/').filter(|c| !c.is_empty()).map(OsString::from).collect()
    }

    fn tree(entries: &[(&str, Node)]) -> Tree {
        let mut t = Tree::new();
        t.insert(Vec::new(), Node::Dir);
        for (path, node) in entries {
            t.insert(p(path), node.clone());
        }
        t
    }

    fn link(s: &str) -> Node {
        Node::Link(s.into())
    }

    #[test]
    fn links_resolve_as_the_kernel_would() {
        let t = tree(&[
            ("a", Node::Dir),
            ("a/b", Node::Dir),
            ("f", Node::File),
            ("a/up", link("..")),
            ("a/b/deep", link("../../f")),
            ("a/b/toa", link("..")),
            ("a/b/x", link("toa/../../f")),
            ("a/b/esc", link("toa/../..")),
            ("loop1", link("loop2")),
            ("loop2", link("loop1")),
            ("abs", link("/etc/passwd")),
            ("via", link("f/x")),
            ("ghost", link("nothing")),
        ]);
        let r = |dir: &str, target: &str| resolve(&t, &p(dir), OsStr::new(target));
        assert_eq!(r("a/b", "../../f"), Ok(p("f")));
        assert_eq!(r("a/b", "../../.."), Err(Unresolved::Outside));
        assert_eq!(r("", "a/up/f"), Ok(p("f")));
        // toa is a/b/.. = a; a/.. is the top; ../f from there is f: inside.
        assert_eq!(r("a/b", "toa/../f"), Ok(p("f")));
        // Lexically inside (a/b/toa/../.. would be `a`), really outside: toa is `a`, so
        // `..` twice climbs past the top.
        assert_eq!(r("a/b", "toa/.."), Ok(Vec::new()));
        assert_eq!(r("a/b", "toa/../.."), Err(Unresolved::Outside));
        assert_eq!(r("", "loop1"), Err(Unresolved::TooManyLinks));
        assert_eq!(r("", "abs"), Err(Unresolved::Absolute));
        assert_eq!(r("", "via"), Err(Unresolved::NotADirectory));
        assert_eq!(r("", "ghost"), Err(Unresolved::Missing));
        assert_eq!(r("", ""), Err(Unresolved::Missing));
        assert_eq!(r("", "."), Ok(Vec::new()));
    }

    /// One hostile tree: entries made as described, the top possibly a link itself.
    #[derive(Debug, Clone)]
    enum Make {
        Dir(String),
        File(String),
        Link(String, String),
        HardLinkOutside(String),
        Fifo(String),
        Socket(String),
        Device(String),
    }

    fn sentinels(root: &Path) -> Vec<(std::path::PathBuf, Vec<u8>, u32)> {
        let mut out = Vec::new();
        for rel in ["outside/secret", "xchg/.tmp", "xchg/status", "outside/dir/inner"] {
            let path = root.join(rel);
            let meta = fs::metadata(&path).unwrap();
            let bytes = if meta.is_file() { fs::read(&path).unwrap() } else { Vec::new() };
            out.push((path, bytes, meta.mode()));
        }
        out
    }

    /// Builds `root/{outside,xchg/out}` from `makes`, ingests `xchg/out`, and checks the
    /// properties: refused naming an entry, or stored with every link inside; sentinel
    /// files outside unchanged. Returns whether it was stored.
    fn try_tree(top_link: Option<&str>, makes: &[Make]) -> bool {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("outside/dir")).unwrap();
        fs::write(root.join("outside/secret"), "secret").unwrap();
        fs::write(root.join("outside/dir/inner"), "inner").unwrap();
        fs::set_permissions(root.join("outside/dir"), fs::Permissions::from_mode(0o555)).unwrap();
        fs::create_dir_all(root.join("xchg/.tmp")).unwrap();
        fs::write(root.join("xchg/status"), "exit 0\n").unwrap();
        fs::set_permissions(root.join("outside/secret"), fs::Permissions::from_mode(0o600)).unwrap();
        let out = root.join("xchg/out");
        match top_link {
            Some(target) => drop(std::os::unix::fs::symlink(target, &out)),
            None => fs::create_dir(&out).unwrap(),
        }
        for m in makes {
            let at = |rel: &str| out.join(rel);
            let _ = match m {
                Make::Dir(r) => fs::create_dir_all(at(r)),
                // create_new: never opens an existing FIFO (which would block).
                Make::File(r) => {
                    fs::File::create_new(at(r)).and_then(|mut f| io::Write::write_all(&mut f, r.as_bytes()))
                }
                Make::Link(r, t) => std::os::unix::fs::symlink(t, at(r)),
                Make::HardLinkOutside(r) => fs::hard_link(root.join("outside/secret"), at(r)),
                Make::Fifo(r) => nix::unistd::mkfifo(&at(r), nix::sys::stat::Mode::from_bits_truncate(0o644))
                    .map_err(io::Error::from),
                Make::Socket(r) => std::os::unix::net::UnixListener::bind(at(r)).map(drop),
                Make::Device(r) => nix::sys::stat::mknod(
                    &at(r),
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::from_bits_truncate(0o666),
                    nix::sys::stat::makedev(1, 3),
                )
                .map_err(io::Error::from),
            };
        }
        let before = sentinels(root);
        let item = root.join("store/item");
        fs::create_dir(root.join("store")).unwrap();
        let xchg = DirFd::open(&root.join("xchg")).unwrap();
        let result = xchg
            .open_dir(OsStr::new("out"))
            .context("`$out` is not a directory")
            .and_then(|src| copy_dir(&src, "$out", &item, &Limits::output(1 << 20)));
        assert_eq!(sentinels(root), before, "something outside changed for {top_link:?} {makes:?}");
        match result {
            Err(e) => {
                let msg = format!("{e:#}");
                assert!(msg.contains("`$out"), "an error that names no entry: {msg}");
                false
            }
            Ok(_) => {
                // Every link in the copy resolves, with the real kernel, inside the item.
                let item_real = item.canonicalize().unwrap();
                let mut stack = vec![item.clone()];
                while let Some(d) = stack.pop() {
                    for e in fs::read_dir(&d).unwrap().flatten() {
                        let ft = e.file_type().unwrap();
                        if ft.is_symlink() {
                            let real = e.path().canonicalize().unwrap_or_else(|err| {
                                panic!("{} does not resolve ({err}) for {makes:?}", e.path().display())
                            });
                            assert!(
                                real.starts_with(&item_real),
                                "{} -> {}: {makes:?}",
                                e.path().display(),
                                real.display()
                            );
                        } else if ft.is_dir() {
                            stack.push(e.path());
                        } else {
                            assert!(ft.is_file(), "a special file was stored: {makes:?}");
                            assert_eq!(e.metadata().unwrap().nlink(), 1, "a hard link was stored");
                        }
                    }
                }
                true
            }
        }
    }

    #[test]
    fn known_hostile_trees() {
        use Make::*;
        let s = |x: &str| x.to_string();
        assert!(!try_tree(Some(".tmp"), &[]), "a link at $out must be refused");
        assert!(!try_tree(Some("../outside"), &[]));
        assert!(try_tree(None, &[Dir(s("a/b")), File(s("f")), Link(s("a/b/l"), s("../../f"))]));
        assert!(!try_tree(None, &[Dir(s("a/b")), Link(s("a/b/x"), s("../../.."))]));
        assert!(!try_tree(None, &[Dir(s("a/b")), Link(s("a/up"), s("..")), Link(s("a/b/x"), s("../up/../../x"))]));
        // A name after which `.` or `/` comes must be a directory (the case proptest found).
        assert!(!try_tree(None, &[File(s("b")), Link(s("x"), s("b/."))]));
        assert!(!try_tree(None, &[File(s("b")), Link(s("x"), s("b/"))]));
        assert!(!try_tree(None, &[Link(s("abs"), s("/etc/shadow"))]));
        assert!(!try_tree(None, &[Link(s("l1"), s("l2")), Link(s("l2"), s("l1"))]));
        assert!(!try_tree(None, &[Fifo(s("p"))]));
        assert!(!try_tree(None, &[Socket(s("sock"))]));
        assert!(!try_tree(None, &[Device(s("null"))]));
        assert!(try_tree(None, &[HardLinkOutside(s("hard"))]), "a hard link is copied");
        assert!(try_tree(None, &[File(s("new\nline")), Link(s("to\nit"), s("new\nline"))]));
        let deep: String = (0..300).map(|i| format!("d{i}/")).collect();
        assert!(!try_tree(None, &[Dir(deep)]), "nesting past the limit");
    }

    #[test]
    fn a_sparse_file_over_the_limit_fails_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let f = fs::File::create(out.join("huge")).unwrap();
        f.set_len(15 << 40).unwrap();
        let started = std::time::Instant::now();
        let err = copy_dir(&DirFd::open(&out).unwrap(), "$out", &dir.path().join("copy"), &Limits::output(8 << 30))
            .unwrap_err();
        assert!(format!("{err}").contains("`$out/huge`"), "{err}");
        assert!(format!("{err}").contains("--max-output"), "{err}");
        assert!(started.elapsed().as_secs() < 5);
    }

    mod random {
        use super::*;
        use proptest::prelude::*;
        use proptest::test_runner::{Config, TestRunner};
        use std::sync::atomic::{AtomicUsize, Ordering};

        fn name() -> impl Strategy<Value = String> {
            prop::sample::select(vec!["a", "b", "out", ".tmp", "status", "x\ny", "..a", "m.meta", "-"])
                .prop_map(String::from)
        }

        fn rel() -> impl Strategy<Value = String> {
            prop::collection::vec(name(), 1..4).prop_map(|v| v.join("/"))
        }

        fn target() -> impl Strategy<Value = String> {
            prop_oneof![
                prop::sample::select(vec![
                    "..",
                    "../..",
                    ".",
                    "/",
                    "/etc/passwd",
                    "../outside/secret",
                    "../../outside",
                    "a",
                    "a/../..",
                    "a/b/../../..",
                    "out",
                    "../out",
                    ".tmp",
                    "../.tmp",
                    "status",
                    "../status",
                    "x\ny",
                    "",
                ])
                .prop_map(String::from),
                rel(),
                prop::collection::vec(prop::sample::select(vec!["..", "a", "b", "."]), 1..6).prop_map(|v| v.join("/")),
            ]
        }

        fn make() -> impl Strategy<Value = Make> {
            prop_oneof![
                3 => rel().prop_map(Make::Dir),
                3 => rel().prop_map(Make::File),
                5 => (rel(), target()).prop_map(|(r, t)| Make::Link(r, t)),
                1 => rel().prop_map(Make::HardLinkOutside),
                1 => rel().prop_map(Make::Fifo),
                1 => rel().prop_map(Make::Socket),
                1 => rel().prop_map(Make::Device),
            ]
        }

        /// Random hostile trees (link chains, `..` targets, links to links, a link at
        /// `$out`, the host's own scratch names, hard links, FIFOs, sockets, devices,
        /// names with newlines): each refused naming an entry, or stored with every link
        /// inside, and nothing outside changed. Prints how many trees were tried.
        #[test]
        fn hostile_trees_are_refused_or_stored_inside() {
            let tried = AtomicUsize::new(0);
            let stored = AtomicUsize::new(0);
            let cases = 512;
            let mut runner = TestRunner::new(Config { cases, failure_persistence: None, ..Config::default() });
            let strategy = (prop::option::weighted(0.1, target()), prop::collection::vec(make(), 0..12));
            runner
                .run(&strategy, |(top, makes)| {
                    tried.fetch_add(1, Ordering::SeqCst);
                    if try_tree(top.as_deref(), &makes) {
                        stored.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(())
                })
                .unwrap();
            let (tried, stored) = (tried.into_inner(), stored.into_inner());
            eprintln!("hostile trees tried: {tried} ({stored} stored, {} refused)", tried - stored);
            assert!(tried >= cases as usize && stored > 0 && stored < tried, "{tried} tried, {stored} stored");
        }
    }

    /// Gives `path` the guest mode QEMU's mapped-xattr model records.
    fn set_guest_mode(path: &Path, mode: u32) {
        let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        let word = mode.to_le_bytes();
        // SAFETY: plain system call with valid, NUL-terminated strings and a 4-byte buffer.
        let r = unsafe {
            nix::libc::setxattr(c.as_ptr(), c"user.virtfs.mode".as_ptr(), word.as_ptr().cast(), word.len(), 0)
        };
        assert_eq!(r, 0, "setxattr {}: {}", path.display(), io::Error::last_os_error());
    }

    /// Through a mapped share a guest's files are the host's 0600 files, its links are
    /// files holding their text and its modes are attributes: ingest takes the guest's
    /// executable bit and links (checked like any other) from there, never its setuid
    /// bits, and refuses what the guest says is a special file.
    #[test]
    fn a_mapped_share_gives_the_guests_links_and_executable_bits_and_nothing_else() {
        use nix::libc::{S_IFIFO, S_IFLNK, S_IFREG};
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        fs::create_dir(&out).unwrap();
        let file = |name: &str, text: &str, guest: Option<u32>| {
            let path = out.join(name);
            fs::write(&path, text).unwrap();
            fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
            if let Some(mode) = guest {
                set_guest_mode(&path, mode);
            }
        };
        file("prog", "#!/bin/sh\n", Some(S_IFREG | 0o4755));
        file("data", "data", Some(S_IFREG | 0o2666));
        file("link", "prog", Some(S_IFLNK | 0o777));
        file("host", "host", None);
        let copy = |limits: Limits, to: &str| {
            copy_dir(&DirFd::open(&out).unwrap(), "$out", &dir.path().join(to), &limits).map(|_| dir.path().join(to))
        };
        let item = copy(Limits::guest_output(1 << 20), "item").unwrap();
        let mode = |name: &str| fs::symlink_metadata(item.join(name)).unwrap().mode() & 0o7777;
        assert_eq!((mode("prog"), mode("data"), mode("host")), (0o700, 0o600, 0o600));
        assert_eq!(fs::read_link(item.join("link")).unwrap(), Path::new("prog"));
        // Not through a mapped share, the same tree is plain files.
        let plain = copy(Limits::output(1 << 20), "plain").unwrap();
        assert_eq!(fs::read_to_string(plain.join("link")).unwrap(), "prog");
        // A guest's link is checked as any other, and its special files are refused.
        file("escape", "../../outside", Some(S_IFLNK | 0o777));
        let err = format!("{:#}", copy(Limits::guest_output(1 << 20), "escape").unwrap_err());
        assert!(err.contains("`$out/escape` is a symbolic link to `../../outside`, which leads outside"), "{err}");
        fs::remove_file(out.join("escape")).unwrap();
        file("fifo", "", Some(S_IFIFO | 0o644));
        let err = format!("{:#}", copy(Limits::guest_output(1 << 20), "fifo").unwrap_err());
        assert!(err.contains("`$out/fifo` is a special file"), "{err}");
    }
}
