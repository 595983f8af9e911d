//! The vocabulary for describing a virtual machine's system as plain Rust values, and
//! the named systems that `cargo xtask --system NAME` can boot.

use std::path::PathBuf;

/// A whole system: what kernel boots, what the guest needs loaded, and what userland it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct System {
    /// Name used on the command line (`--system NAME`) and in store item names.
    pub name: String,
    /// One line saying what the system is for.
    pub description: String,
    /// The kernel that boots the system.
    pub kernel: Kernel,
    /// Extra arguments appended to the kernel command line.
    pub kernel_args: Vec<String>,
    /// Kernel modules loaded by the guest helper before anything else, besides the ones
    /// the VM's devices need (virtio transport, 9p, console, block).
    pub initrd_modules: Vec<String>,
    /// Packages whose `bin/` directories make up the guest's `PATH` (`/bin`).
    pub packages: Vec<Package>,
}

/// Where the kernel image and its modules come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kernel {
    /// A Debian kernel package (for example `linux-image-amd64`), fetched with
    /// `apt-get download` and pinned by the `.deb`'s sha256 on first use.
    Debian { package: String },
    /// A kernel on the host: a bzImage (`vmlinuz`) and its modules tree
    /// (the directory that holds `kernel/` and `modules.builtin`, usually
    /// `/lib/modules/RELEASE`).
    Path { image: PathBuf, modules: PathBuf },
}

/// Software installed into the guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Package {
    /// Debian's `busybox-static`: one static binary providing `sh`, `ls`, `uname`, ...
    Busybox,
    /// Any Debian package, fetched with `apt-get download` and pinned by sha256.
    Debian { package: String },
}

impl Kernel {
    /// Debian's default kernel for amd64.
    pub fn debian_default() -> Kernel {
        Kernel::Debian { package: "linux-image-amd64".to_string() }
    }
}

/// The system used when no `--system` is given.
pub const DEFAULT_SYSTEM: &str = "minimal";

/// The smallest useful system: Debian's kernel and a busybox userland.
pub fn minimal() -> System {
    System {
        name: "minimal".to_string(),
        description: "Debian's kernel with a busybox userland (sh, ls, uname, ...)".to_string(),
        kernel: Kernel::debian_default(),
        kernel_args: Vec::new(),
        initrd_modules: Vec::new(),
        packages: vec![Package::Busybox],
    }
}

/// `minimal`, which, booted from a disk image, counts the boot on its root file system,
/// prints a marker line (`vm-image boot-check: ok ...`) and powers off: for tests of
/// `cargo xtask vm-image`.
pub fn boot_check() -> System {
    System {
        name: "boot-check".to_string(),
        description: "minimal; from a disk image: print a boot marker and power off (for tests)".to_string(),
        kernel_args: vec!["vm.boot-check".to_string()],
        ..minimal()
    }
}

/// Every named system, in the order `cargo xtask systems` lists them.
pub fn all() -> Vec<System> {
    vec![minimal(), boot_check()]
}

/// Looks a named system up.
pub fn by_name(name: &str) -> Option<System> {
    all().into_iter().find(|s| s.name == name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_default_exists() {
        let systems = all();
        let mut names: Vec<_> = systems.iter().map(|s| s.name.as_str()).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), systems.len());
        assert!(by_name(DEFAULT_SYSTEM).is_some());
        assert!(by_name("no-such-system").is_none());
    }
}
