//! Owner bits granted for a moment. A daemon without CAP_DAC_OVERRIDE (an ordinary user's
//! mount, no user namespace) works with its own permissions, and is refused changes the
//! caller may make, where ext4 and kernel overlayfs let them through: a name added to a
//! directory whose owner may not write (copy-up), a directory moved to another parent or
//! marked opaque when its owner may not write it. The daemon then grants itself the owner's
//! bits for the moment of the change and restores the mode, while the view keeps showing the
//! mode from before (`Node::shown_mode`).
//!
//! A change of a directory's mode through the view takes the directory's lock
//! (`attr::set_attributes`); callers hold the lock of a directory they grant bits on where
//! they can, so that the restore cannot undo such a change.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};

use crate::inode::Node;
use crate::sys::{self, Errno, Result};
use crate::union::Union;

/// Runs `op`; if the daemon is refused it (EACCES), runs it again with its owner's `bits`
/// granted on `obj` (see `again_with_owner_bits`).
pub(crate) fn with_owner_bits<T>(
    obj: BorrowedFd<'_>,
    bits: u32,
    op: impl Fn() -> Result<T>,
    shown: Option<(&Union, &Node)>,
) -> Result<T> {
    match op() {
        Err(e) if e.code() == libc::EACCES => again_with_owner_bits(obj, bits, op, shown),
        r => r,
    }
}

/// Runs `op`, which moves the directory `dir/name` to another parent: a daemon without
/// privileges needs write access to the directory for that.
pub(crate) fn moving_dir<T>(
    dir: BorrowedFd<'_>,
    name: &CStr,
    op: impl Fn() -> Result<T>,
    shown: Option<(&Union, &Node)>,
) -> Result<T> {
    match op() {
        Err(e) if e.code() == libc::EACCES => {
            let d = sys::openat(dir, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
            again_with_owner_bits(d.as_fd(), 0o200, op, shown)
        }
        r => r,
    }
}

/// Runs `op`, refused once for want of the owner's `bits` on `obj`, again with those bits
/// granted, then restores the mode. `shown`: the node of `obj`, if the view shows it: it
/// keeps showing the mode from before meanwhile, and the kernel's cached attributes of it
/// are dropped afterwards.
fn again_with_owner_bits<T>(
    obj: BorrowedFd<'_>,
    bits: u32,
    op: impl Fn() -> Result<T>,
    shown: Option<(&Union, &Node)>,
) -> Result<T> {
    let st = sys::fstat(obj)?;
    let mode = st.st_mode & 0o7777;
    // A chmod by a non-member drops the set-group-ID bit, and could not set it back.
    if mode & bits == bits || mode & libc::S_ISGID != 0 && !sys::in_group(st.st_gid) {
        return Err(Errno::EACCES);
    }
    if let Some((_, node)) = shown {
        node.set_shown_mode(Some(mode));
    }
    let r = match sys::fchmod_path(obj, mode | bits) {
        Ok(()) => {
            let r = op();
            if let Err(e) = sys::fchmod_path(obj, mode) {
                let kept = mode | bits;
                log::error!(
                    "cannot restore a mode granted for a moment (it stays {kept:o}): {e:?}"
                );
            }
            r
        }
        Err(_) => Err(Errno::EACCES),
    };
    if let Some((fs, node)) = shown {
        node.set_shown_mode(None);
        fs.invalidate_attrs(node.ino);
    }
    r
}
