//! Checks that a system can work before anything of it is built: every problem found is
//! reported at once, each naming the system, the field and the fix.
//!
//! The checks that need the outside world (the workspace's crates, apt, the kernel's
//! modules, the programs a package provides) ask a [`Facts`]; the real one looks
//! ([`HostFacts`], which may fetch a kernel or a Debian package, as building would), and
//! tests give a system as data together with made-up facts.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use anyhow::Result;
use os_configs::{Arch, Device, Package, System};

use crate::debian::closure::Refusal;
use crate::error::{Failure, EXIT_USAGE};
use crate::store::{self, Store};
use crate::{debian, lower::kernel, lower::packages, lower::system, Workspace};

/// One thing wrong with a system.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub system: String,
    /// The field, as a Rust place: `file_systems[1].mount_point`.
    pub field: String,
    pub message: String,
    pub fix: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "system `{}`, field `{}`: {}; fix: {}", self.system, self.field, self.message, self.fix)
    }
}

/// What validation needs to know about the world.
pub trait Facts {
    /// The workspace's packages and their binary targets.
    fn workspace_bins(&mut self) -> Result<BTreeMap<String, Vec<String>>>;
    /// The same, asked afresh: [`Facts::workspace_bins`] may answer from a memo, which
    /// is trusted where it knows the binary and asked again where it does not.
    fn fresh_workspace_bins(&mut self) -> Result<BTreeMap<String, Vec<String>>> {
        self.workspace_bins()
    }
    /// The dependency closure of the system's Debian packages (package names), or why
    /// apt cannot install them together.
    fn debian_closure(&mut self, roots: &[String]) -> Result<std::result::Result<Vec<String>, Refusal>>;
    /// The program names a (known to exist) package provides.
    fn programs(&mut self, package: &Package) -> Result<BTreeSet<String>>;
    /// Whether the system's kernel has this module, as a module or built in.
    fn kernel_has_module(&mut self, system: &System, module: &str) -> Result<bool>;
}

/// Every problem with `system`; empty when it can work. Errors are failures to find
/// out (apt not working, say), not problems of the system.
pub fn problems(system: &System, facts: &mut dyn Facts) -> Result<Vec<Problem>> {
    let mut found = Vec::new();
    let mut problem = |field: String, message: String, fix: String| {
        found.push(Problem { system: system.name.clone(), field, message, fix })
    };

    if system.root_file_system().is_none() {
        problem(
            "file_systems".into(),
            "no file system is mounted on `/`".into(),
            "add one whose mount_point is \"/\", e.g. FileSystem::block(\"/\", \
                Device::Label(\"vmroot\".into()), \"ext4\")"
                .into(),
        );
    }
    let mut mount_points: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, fs) in system.file_systems.iter().enumerate() {
        if !fs.mount_point.starts_with('/') {
            problem(
                format!("file_systems[{i}].mount_point"),
                format!("`{}` is not an absolute path", fs.mount_point),
                format!("write it as `/{}`", fs.mount_point),
            );
        }
        if fs.check && !fs.device.is_block() {
            problem(
                format!("file_systems[{i}].check"),
                format!("`{}` is not on a block device: there is nothing for e2fsck to check", fs.mount_point),
                "set `check: false` (only disks, by path, label or UUID, are checked)".into(),
            );
        } else if fs.check && !matches!(fs.fs_type.as_str(), "ext2" | "ext3" | "ext4") {
            problem(
                format!("file_systems[{i}].check"),
                format!(
                    "`{}` is of type `{}`; the check runs e2fsck, which knows ext2, ext3 and ext4",
                    fs.mount_point, fs.fs_type
                ),
                "set `check: false`, or use an ext2/3/4 file system".into(),
            );
        }
        if let Device::Share(tag) = &fs.device {
            if tag != guest::STORE_TAG || fs.mount_point != guest::STORE_MOUNT {
                problem(
                    format!("file_systems[{i}].device"),
                    format!(
                        "9p share `{tag}` on `{}`: the VM is given only the store's share (`{}` on `{}`)",
                        fs.mount_point,
                        guest::STORE_TAG,
                        guest::STORE_MOUNT
                    ),
                    "remove it; to share a host directory with a build, use `build-in-vm --input`".into(),
                );
            }
        }
        if let Some(first) = mount_points.insert(&fs.mount_point, i) {
            problem(
                format!("file_systems[{i}].mount_point"),
                format!("`{}` is also the mount point of file_systems[{first}]", fs.mount_point),
                "give each file system its own mount point, or remove one of them".into(),
            );
        }
    }
    let groups: BTreeSet<&str> = std::iter::once("root").chain(system.groups.iter().map(|g| g.name.as_str())).collect();
    let users: BTreeSet<&str> = std::iter::once("root").chain(system.users.iter().map(|u| u.name.as_str())).collect();
    for (i, user) in system.users.iter().enumerate() {
        for (field, group) in std::iter::once(("group".to_string(), &user.group))
            .chain(user.supplementary_groups.iter().enumerate().map(|(j, g)| (format!("supplementary_groups[{j}]"), g)))
        {
            if !groups.contains(group.as_str()) {
                problem(
                    format!("users[{i}].{field}"),
                    format!("group `{group}` is not declared"),
                    format!("add Group {{ name: \"{group}\", .. }} to `groups`, or name a declared group"),
                );
            }
        }
        if !user.home.starts_with('/') {
            problem(
                format!("users[{i}].home"),
                format!("`{}` is not an absolute path", user.home),
                format!("write it as `/{}`", user.home),
            );
        }
    }
    for (i, file) in system.etc_files.iter().enumerate() {
        if file.path.is_empty() || file.path.starts_with('/') || file.path.split('/').any(|c| c == ".." || c.is_empty())
        {
            problem(
                format!("etc_files[{i}].path"),
                format!("`{}` is not a relative path inside /etc", file.path),
                "give the path relative to /etc, e.g. `motd` or `hello/config`".into(),
            );
        }
    }
    for (i, service) in system.services.iter().enumerate() {
        if !users.contains(service.user.as_str()) {
            problem(
                format!("services[{i}].user"),
                format!("user `{}` is not declared", service.user),
                "add the user to `users`, or run the service as `root`".into(),
            );
        }
    }

    // Packages: each must exist before its programs can be looked at.
    let mut known = Vec::new();
    for (i, package) in system.packages.iter().enumerate() {
        let missing = match package {
            Package::Busybox => None,
            // Checked together, below.
            Package::Debian { .. } => None,
            Package::Crate { package: name, bin } => {
                let mut bins = facts.workspace_bins()?;
                if !bins.get(name).is_some_and(|names| names.contains(bin)) {
                    bins = facts.fresh_workspace_bins()?;
                }
                match bins.get(name) {
                    None => Some((
                        format!(
                            "no package `{name}` in this workspace (its packages: {})",
                            bins.keys().cloned().collect::<Vec<_>>().join(", ")
                        ),
                        "add the crate to `members` in the workspace's Cargo.toml, or correct the name".to_string(),
                    )),
                    Some(names) if !names.contains(bin) => Some((
                        format!("package `{name}` has no binary `{bin}` (its binaries: {})", names.join(", ")),
                        "name one of its binaries, or add `src/bin/{bin}.rs`".to_string(),
                    )),
                    Some(_) => None,
                }
            }
            Package::Host { path } if system.arch != Arch::X86_64 => Some((
                format!(
                    "host program `{}` is a program for this host (x86_64), not for the system's architecture {}",
                    path.display(),
                    system.arch
                ),
                "declare the Debian package that has the program instead of Package::Host".to_string(),
            )),
            Package::Host { path } => (!path.is_absolute() || !path.is_file()).then(|| {
                (
                    format!("host program `{}` does not exist (an absolute path to a file is needed)", path.display()),
                    "give the program's absolute path on the host (`command -v NAME`)".to_string(),
                )
            }),
        };
        match missing {
            Some((message, fix)) => problem(format!("packages[{i}]"), message, fix),
            None => known.push(package),
        }
    }
    let roots = system::debian_packages(system);
    if !roots.is_empty() {
        if let Err(refusal) = facts.debian_closure(&roots)? {
            let at = system
                .packages
                .iter()
                .position(|p| matches!(p, Package::Debian { package } if Some(package) == refusal.root.as_ref()));
            known.retain(|p| !matches!(p, Package::Debian { .. }));
            problem(at.map(|i| format!("packages[{i}]")).unwrap_or("packages".into()), refusal.message, refusal.fix);
        }
        if let Some(i) = system.packages.iter().position(|p| matches!(p, Package::Host { .. })) {
            problem(
                format!("packages[{i}]"),
                "a system with Debian packages cannot also take programs from the host: the host's libraries \
                 and loader would shadow the packages' own"
                    .into(),
                "declare the Debian package that has the program instead of Package::Host".into(),
            );
        }
    }
    let all_known = known.len() == system.packages.len();
    if all_known && system.services.iter().any(|s| !s.program.starts_with('/')) {
        let mut programs = BTreeSet::new();
        for package in &known {
            programs.extend(facts.programs(package)?);
        }
        for (i, service) in system.services.iter().enumerate() {
            if !service.program.starts_with('/') && !programs.contains(&service.program) {
                problem(
                    format!("services[{i}].program"),
                    format!("`{}` is in none of the system's packages", service.program),
                    "add the package that provides it to `packages` (for a crate of this workspace: \
                     Package::Crate { package, bin }), or give an absolute path"
                        .into(),
                );
            }
        }
    }
    for (i, module) in system.initrd_modules.iter().enumerate() {
        if !facts.kernel_has_module(system, module)? {
            problem(
                format!("initrd_modules[{i}]"),
                format!("kernel module `{module}` is neither a module of the system's kernel nor built into it"),
                "remove it, or choose a `kernel` that has it".into(),
            );
        }
    }
    Ok(found)
}

/// [`check`] against the world as it is ([`HostFacts`]): what every command runs on the
/// system it is given, before it builds anything.
pub fn check_here(system: &System, store: &Store, ws: &Workspace) -> Result<()> {
    check(system, &mut HostFacts { arch: system.arch, ..HostFacts::new(store, ws) })
}

/// Fails, with every problem listed, unless `system` can work.
pub fn check(system: &System, facts: &mut dyn Facts) -> Result<()> {
    let problems = problems(system, facts)?;
    if problems.is_empty() {
        return Ok(());
    }
    let lines: Vec<String> = problems.iter().map(|p| format!("  {p}")).collect();
    Err(Failure {
        code: EXIT_USAGE,
        message: format!("system `{}` cannot work; nothing was built:\n{}", system.name, lines.join("\n")),
    }
    .into())
}

/// The facts of this host and workspace.
pub struct HostFacts<'a> {
    pub store: &'a Store,
    pub ws: &'a Workspace,
    /// The workspace's binaries, and whether `cargo metadata` told them in this run.
    bins: Option<(BTreeMap<String, Vec<String>>, bool)>,
    modules: Option<kernel::ModuleIndex>,
    /// The architecture of the system asked about: its Debian packages are that
    /// architecture's.
    pub arch: Arch,
}

impl<'a> HostFacts<'a> {
    pub fn new(store: &'a Store, ws: &'a Workspace) -> HostFacts<'a> {
        HostFacts { store, ws, bins: None, modules: None, arch: Arch::X86_64 }
    }

    /// Where the last answer of `cargo metadata` for this workspace is kept.
    fn bins_memo(&self) -> std::path::PathBuf {
        let key = store::sha256_bytes(self.ws.root.as_os_str().as_encoded_bytes());
        self.store.cache_dir().join(format!("workspace-bins-{}.json", &key[..32]))
    }
}

impl Facts for HostFacts<'_> {
    /// From the memo of an earlier run if there is one (`cargo metadata` costs tens of
    /// milliseconds on every run); a binary the memo names but the workspace no longer
    /// has makes `cargo build` fail with cargo's own message.
    fn workspace_bins(&mut self) -> Result<BTreeMap<String, Vec<String>>> {
        if self.bins.is_none() {
            let memo = std::fs::read(self.bins_memo()).ok().and_then(|b| serde_json::from_slice(&b).ok());
            if let Some(memo) = memo {
                self.bins = Some((memo, false));
            } else {
                return self.fresh_workspace_bins();
            }
        }
        Ok(self.bins.as_ref().map(|(b, _)| b.clone()).unwrap_or_default())
    }

    fn fresh_workspace_bins(&mut self) -> Result<BTreeMap<String, Vec<String>>> {
        if !self.bins.as_ref().is_some_and(|(_, fresh)| *fresh) {
            let bins = packages::workspace_bins(self.ws)?;
            // Only a later run's speed depends on the memo being written.
            let _ = std::fs::write(self.bins_memo(), serde_json::to_vec(&bins)?);
            self.bins = Some((bins, true));
        }
        Ok(self.bins.as_ref().map(|(b, _)| b.clone()).unwrap_or_default())
    }

    fn debian_closure(&mut self, roots: &[String]) -> Result<std::result::Result<Vec<String>, Refusal>> {
        match debian::closure::closure(roots) {
            Ok(closure) => Ok(Ok(closure.into_iter().map(|(name, _)| name).collect())),
            Err(e) => match e.downcast_ref::<Refusal>() {
                Some(refusal) => Ok(Err(refusal.clone())),
                None => Err(e),
            },
        }
    }

    fn programs(&mut self, package: &Package) -> Result<BTreeSet<String>> {
        Ok(match package {
            Package::Busybox => packages::programs_in(&system::busybox(self.store, self.arch)?.path),
            // The programs of its whole closure (python3's `python3` is python3-minimal's).
            Package::Debian { package } => {
                let mut names = BTreeSet::new();
                for (_, pin) in debian::closure::closure(&[debian::qualified(package, self.arch)])? {
                    names.extend(packages::programs_in(&debian::unpacked(self.store, &pin)?.path));
                }
                names
            }
            Package::Crate { bin, .. } => BTreeSet::from([bin.clone()]),
            Package::Host { path } => path.file_name().map(|n| n.to_string_lossy().into_owned()).into_iter().collect(),
        })
    }

    fn kernel_has_module(&mut self, system: &System, module: &str) -> Result<bool> {
        if self.modules.is_none() {
            let tree = kernel::resolve(self.store, &system.kernel, system.arch)?;
            self.modules = Some(kernel::ModuleIndex::read(&tree)?);
        }
        Ok(self.modules.as_ref().is_some_and(|m| m.closure(&[module.to_string()]).is_ok()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use os_configs::{FileSystem, Service};

    /// Made-up facts: one workspace crate, one Debian package, a kernel with `ext4` only.
    struct Fake;

    impl Facts for Fake {
        fn workspace_bins(&mut self) -> Result<BTreeMap<String, Vec<String>>> {
            Ok(BTreeMap::from([("hello-service".to_string(), vec!["hello-service".to_string()])]))
        }
        fn debian_closure(&mut self, roots: &[String]) -> Result<std::result::Result<Vec<String>, Refusal>> {
            let refused = |r: &&String| ["no-such", "xtask-fixture", "busybox"].iter().any(|p| r.starts_with(p));
            match roots.iter().find(refused) {
                Some(other) => Ok(Err(Refusal {
                    root: Some(other.clone()),
                    message: format!("Debian package `{other}` does not exist in xtask's Debian index"),
                    fix: "check the name".into(),
                })),
                None => Ok(Ok(vec!["jq".into(), "libjq1".into(), "libc6".into()])),
            }
        }
        fn programs(&mut self, package: &Package) -> Result<BTreeSet<String>> {
            Ok(match package {
                Package::Busybox => BTreeSet::from(["sh".to_string(), "nc".to_string()]),
                Package::Debian { package } => BTreeSet::from([package.clone()]),
                Package::Crate { bin, .. } => BTreeSet::from([bin.clone()]),
                Package::Host { .. } => BTreeSet::new(),
            })
        }
        fn kernel_has_module(&mut self, _: &System, module: &str) -> Result<bool> {
            Ok(module == "ext4")
        }
    }

    fn only_problem(system: &System) -> Problem {
        let found = problems(system, &mut Fake).unwrap();
        assert_eq!(found.len(), 1, "{found:#?}");
        found.into_iter().next().unwrap()
    }

    /// `minimal` with users, groups and a service run as one of them.
    fn with_users() -> System {
        let mut service = os_configs::Service::new("hello", "sh");
        service.user = "hello".into();
        System {
            groups: vec![
                os_configs::Group { name: "users".into(), gid: 100 },
                os_configs::Group { name: "hello".into(), gid: 900 },
            ],
            users: vec![
                os_configs::User::new("hello", 900, "hello"),
                os_configs::User {
                    supplementary_groups: vec!["hello".into()],
                    ..os_configs::User::new("alice", 1000, "users")
                },
            ],
            services: vec![service],
            ..os_configs::minimal()
        }
    }

    #[test]
    fn the_vocabularys_systems_are_valid() {
        let debian = os_configs::with_debian("jq", "jq", &["jq"]);
        for system in [os_configs::minimal(), os_configs::debian_base(), debian, with_users()] {
            let found = problems(&system, &mut Fake).unwrap();
            assert!(found.is_empty(), "{}: {found:#?}", system.name);
            assert!(problems(&system.virtualized(), &mut Fake).unwrap().is_empty());
        }
    }

    #[test]
    fn no_root_file_system() {
        let mut s = os_configs::minimal();
        s.file_systems.clear();
        let p = only_problem(&s);
        assert_eq!((p.system.as_str(), p.field.as_str()), ("minimal", "file_systems"));
        assert!(p.to_string().contains("no file system is mounted on `/`") && p.fix.contains("mount_point"), "{p}");
    }

    #[test]
    fn two_file_systems_on_one_mount_point() {
        let mut s = os_configs::minimal();
        s.file_systems.push(FileSystem::tmpfs("/tmp"));
        s.file_systems.push(FileSystem::block("/tmp", Device::Path("/dev/vdb".into()), "ext4"));
        let p = only_problem(&s);
        assert_eq!(p.field, "file_systems[2].mount_point");
        assert!(p.message.contains("also the mount point of file_systems[1]"), "{p}");
    }

    #[test]
    fn mount_point_not_absolute() {
        let mut s = os_configs::minimal();
        s.file_systems.push(FileSystem::tmpfs("data"));
        let p = only_problem(&s);
        assert_eq!(p.field, "file_systems[1].mount_point");
        assert!(p.message.contains("`data` is not an absolute path") && p.fix.contains("`/data`"), "{p}");
    }

    #[test]
    fn checks_that_cannot_run_are_refused() {
        let mut s = os_configs::minimal();
        s.file_systems.push(FileSystem { check: true, ..FileSystem::tmpfs("/scratch") });
        let p = only_problem(&s);
        assert_eq!(p.field, "file_systems[1].check");
        assert!(p.message.contains("not on a block device") && p.fix.contains("check: false"), "{p}");
        s.file_systems[1] = FileSystem::block("/data", Device::Label("data".into()), "xfs");
        let p = only_problem(&s);
        assert_eq!(p.field, "file_systems[1].check");
        assert!(p.message.contains("type `xfs`"), "{p}");
        s.file_systems[1].check = false;
        assert!(problems(&s, &mut Fake).unwrap().is_empty());
    }

    #[test]
    fn shares_the_vm_is_not_given_are_refused() {
        let mut s = os_configs::minimal();
        s.file_systems.push(FileSystem {
            device: Device::Share("src".into()),
            fs_type: "9p".into(),
            check: false,
            ..FileSystem::tmpfs("/src")
        });
        let p = only_problem(&s);
        assert_eq!(p.field, "file_systems[1].device");
        assert!(p.message.contains("9p share `src`"), "{p}");
    }

    #[test]
    fn service_program_in_no_package() {
        let mut s = os_configs::minimal();
        s.services.push(Service::new("web", "nginx"));
        let p = only_problem(&s);
        assert_eq!(p.field, "services[0].program");
        assert!(p.message.contains("`nginx` is in none of the system's packages") && p.fix.contains("packages"));
        // An absolute path is taken as it is.
        s.services[0].program = "/store/x/bin/nginx".into();
        assert!(problems(&s, &mut Fake).unwrap().is_empty());
    }

    #[test]
    fn unknown_debian_package() {
        let mut s = os_configs::minimal();
        s.packages.push(Package::Debian { package: "no-such-deb".into() });
        let p = only_problem(&s);
        assert_eq!(p.field, "packages[1]");
        assert!(p.message.contains("Debian package `no-such-deb` does not exist"), "{p}");
        // A known one is fine; with a program from the host it is not.
        s.packages[1] = Package::Debian { package: "jq".into() };
        assert!(problems(&s, &mut Fake).unwrap().is_empty());
        s.packages.push(Package::Host { path: "/bin/sh".into() });
        let p = only_problem(&s);
        assert_eq!(p.field, "packages[2]");
        assert!(p.message.contains("cannot also take programs from the host"), "{p}");
    }

    #[test]
    fn unknown_crate_and_unknown_binary() {
        let mut s = os_configs::minimal();
        s.packages.push(Package::Crate { package: "no-such-crate".into(), bin: "x".into() });
        let p = only_problem(&s);
        assert_eq!(p.field, "packages[1]");
        assert!(p.message.contains("no package `no-such-crate` in this workspace (its packages: hello-service)"));
        s.packages[1] = Package::Crate { package: "hello-service".into(), bin: "other".into() };
        assert!(only_problem(&s).message.contains("has no binary `other`"));
    }

    #[test]
    fn unknown_host_program() {
        let mut s = os_configs::minimal();
        s.packages.push(Package::Host { path: "/no/such/program".into() });
        assert!(only_problem(&s).message.contains("host program `/no/such/program` does not exist"));
    }

    #[test]
    fn module_not_in_the_kernel() {
        let mut s = os_configs::minimal();
        s.initrd_modules = vec!["ext4".into(), "no_such_module".into()];
        let p = only_problem(&s);
        assert_eq!(p.field, "initrd_modules[1]");
        assert!(p.message.contains("`no_such_module` is neither a module") && p.fix.contains("kernel"), "{p}");
    }

    #[test]
    fn undeclared_users_and_groups() {
        let mut s = with_users();
        s.groups.retain(|g| g.name != "users");
        s.services[0].user = "nobody".into();
        let found = problems(&s, &mut Fake).unwrap();
        let fields: Vec<&str> = found.iter().map(|p| p.field.as_str()).collect();
        assert_eq!(fields, ["users[1].group", "services[0].user"]);
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let mut s = os_configs::minimal();
        s.file_systems = vec![FileSystem::tmpfs("a"), FileSystem::tmpfs("a")];
        let err = check(&s, &mut Fake).unwrap_err();
        let text = format!("{err:#}");
        assert!(text.contains("nothing was built"), "{text}");
        assert_eq!(text.matches("system `minimal`, field").count(), 4, "{text}");
        assert_eq!(err.downcast_ref::<Failure>().unwrap().code, EXIT_USAGE);
    }
}
