//! Bootable disk images: layout, staging, the file system, GRUB, the shared-store image
//! and comparison ([`build`], whose items are re-exported here, with the host builder),
//! the same steps in a VM ([`vm_builder`]), and the tools both run, from Debian's
//! packages in the store ([`tools`]).

pub mod build;
pub mod vm_builder;

pub use build::*;
