//! The VM is a normal Linux machine, as a freshly installed Debian one is to root:
//! terminals, shared memory, `/dev/fd`, temporary directories, the `nobody` account,
//! the loopback network and `localhost`.

use std::ffi::CStr;
use std::net::{ToSocketAddrs, UdpSocket};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

#[test]
#[ignore = "needs the hello VM"]
fn a_pseudo_terminal_opens() {
    vm_checks::require_hello_vm();
    // SAFETY: the calls of openpty(3) on a descriptor this test owns; ptsname's buffer
    // is copied before any other call.
    unsafe {
        let master = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY);
        assert!(master >= 0, "posix_openpt: {}", std::io::Error::last_os_error());
        assert_eq!(libc::grantpt(master), 0, "grantpt: {}", std::io::Error::last_os_error());
        assert_eq!(libc::unlockpt(master), 0, "unlockpt: {}", std::io::Error::last_os_error());
        let name = libc::ptsname(master);
        assert!(!name.is_null(), "ptsname: {}", std::io::Error::last_os_error());
        let name = CStr::from_ptr(name).to_string_lossy().into_owned();
        assert!(name.starts_with("/dev/pts/"), "{name}");
        let slave = std::fs::OpenOptions::new().read(true).write(true).open(&name);
        assert!(slave.is_ok(), "opening {name}: {slave:?}");
        libc::close(master);
    }
}

#[test]
#[ignore = "needs the hello VM"]
fn the_usual_directories_and_devices_are_there() {
    vm_checks::require_hello_vm();
    for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
        let meta = std::fs::metadata(dir).unwrap_or_else(|e| panic!("{dir}: {e}"));
        assert!(meta.is_dir(), "{dir} is not a directory");
        assert_eq!(meta.permissions().mode() & 0o7777, 0o1777, "{dir}: mode {:o}", meta.permissions().mode());
        let file = Path::new(dir).join(format!("vm-checks-{}", std::process::id()));
        std::fs::write(&file, "x").unwrap_or_else(|e| panic!("writing in {dir}: {e}"));
        std::fs::remove_file(&file).unwrap();
    }
    assert_eq!(std::fs::read_link("/dev/fd").unwrap(), Path::new("/proc/self/fd"));
    for (n, name) in ["stdin", "stdout", "stderr"].iter().enumerate() {
        let link = std::fs::read_link(format!("/dev/{name}")).unwrap_or_else(|e| panic!("/dev/{name}: {e}"));
        assert_eq!(link, Path::new(&format!("/proc/self/fd/{n}")));
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    for (target, fs) in [("/dev/pts", "devpts"), ("/dev/shm", "tmpfs")] {
        assert!(
            mounts.lines().any(|l| l.split(' ').nth(1) == Some(target) && l.split(' ').nth(2) == Some(fs)),
            "no {fs} on {target}: {mounts}"
        );
    }
}

#[test]
#[ignore = "needs the hello VM"]
fn nobody_and_nogroup_exist() {
    vm_checks::require_hello_vm();
    // SAFETY: the returned records are read before any other call.
    unsafe {
        let user = libc::getpwnam(c"nobody".as_ptr());
        assert!(!user.is_null(), "no user `nobody`");
        assert_eq!(((*user).pw_uid, (*user).pw_gid), (65534, 65534));
        let group = libc::getgrnam(c"nogroup".as_ptr());
        assert!(!group.is_null(), "no group `nogroup`");
        assert_eq!((*group).gr_gid, 65534);
        let root = libc::getpwuid(0);
        assert!(!root.is_null(), "no user 0");
        assert_eq!(CStr::from_ptr((*root).pw_name).to_str().unwrap(), "root");
    }
}

#[test]
#[ignore = "needs the hello VM"]
fn localhost_resolves_and_takes_udp() {
    vm_checks::require_hello_vm();
    let addrs: Vec<_> = ("localhost", 9).to_socket_addrs().expect("resolving localhost").collect();
    assert!(addrs.iter().any(|a| a.ip().is_loopback()), "{addrs:?}");
    let receiver = UdpSocket::bind("127.0.0.1:0").unwrap();
    let sender = UdpSocket::bind("0.0.0.0:0").unwrap();
    sender.send_to(b"ping", receiver.local_addr().unwrap()).expect("sending UDP to 127.0.0.1");
    receiver.set_read_timeout(Some(std::time::Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 16];
    let (n, _) = receiver.recv_from(&mut buf).expect("receiving UDP on 127.0.0.1");
    assert_eq!(&buf[..n], b"ping");
}
