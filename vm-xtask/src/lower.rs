//! Lowering: a [`os_configs::System`] value becomes the store items a VM boots from.
//! Validation first ([`validate`]: every problem at once, before anything is built),
//! then the kernel ([`kernel`]: a Debian package or a host tree, its modules), the guest
//! helper ([`helper`]), the initrd ([`initrd`], written by [`cpio`]), the packages
//! ([`packages`]: workspace crates, host programs with their libraries; [`debian`]:
//! Debian packages with their dependency closure and profile), and the system item
//! that ties them together ([`system`]).

pub mod cpio;
pub mod helper;
pub mod initrd;
pub mod kernel;
pub mod packages;
pub mod system;
pub mod validate;
