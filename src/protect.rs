//! Append-only and immutable flags (`chattr +a`, `chattr +i`), kept as kernel overlayfs keeps
//! them: set through the view, they go into the upper object's `overlay.protattr` xattr ("a",
//! "i" or "ai"), never onto the real object, which must stay changeable by the daemon (a copy-up
//! into an immutable directory, a whiteout in an append-only one). A copy-up moves them from the
//! lower object's real flags into the xattr in the same way.
//!
//! The kernel knows nothing of them on a FUSE inode, so the daemon refuses what they forbid,
//! as the kernel's VFS does on an overlayfs inode: an immutable object takes no change at all
//! (no new name in it, if a directory); an append-only one takes appends and new names in it,
//! and nothing else.

use std::ffi::CStr;
use std::os::fd::{AsFd, BorrowedFd};

use crate::inode::Node;
use crate::lookup::Loc;
use crate::sys::{self, Errno, Result};
use crate::union::Union;

/// Append-only, as a protection flag.
pub const APPEND: u8 = 1;
/// Immutable, as a protection flag.
pub const IMMUTABLE: u8 = 2;
/// Both.
pub const BOTH: u8 = APPEND | IMMUTABLE;

/// Where a format of flags keeps append-only and immutable.
pub struct Bits {
    append: u32,
    immutable: u32,
}

/// Inode flags (FS_IOC_GETFLAGS: FS_APPEND_FL, FS_IMMUTABLE_FL).
pub const INODE: Bits = Bits {
    append: 0x20,
    immutable: 0x10,
};
/// XFS-style flags (FS_IOC_FSGETXATTR: FS_XFLAG_APPEND, FS_XFLAG_IMMUTABLE).
pub const XFLAGS: Bits = Bits {
    append: 0x10,
    immutable: 0x08,
};
/// `statx` attributes (STATX_ATTR_APPEND, STATX_ATTR_IMMUTABLE; both in the low 32 bits).
pub const STATX: Bits = Bits {
    append: 0x20,
    immutable: 0x10,
};

impl Bits {
    /// The protection flags among `flags`.
    pub fn of(&self, flags: u32) -> u8 {
        u8::from(flags & self.append != 0) * APPEND
            + u8::from(flags & self.immutable != 0) * IMMUTABLE
    }

    /// Flags of this format for protection flags `p`.
    pub fn to(&self, p: u8) -> u32 {
        u32::from(p & APPEND != 0) * self.append + u32::from(p & IMMUTABLE != 0) * self.immutable
    }

    /// `flags` without the protection flags.
    pub fn strip(&self, flags: u32) -> u32 {
        flags & !(self.append | self.immutable)
    }
}

/// The flags an `overlay.protattr` value records. Kernel overlayfs refuses a value with other
/// letters; here they are skipped, so one bad byte takes no protection away.
pub fn parse(value: &[u8]) -> u8 {
    value.iter().fold(0, |p, c| match c {
        b'a' => p | APPEND,
        b'i' => p | IMMUTABLE,
        _ => p,
    })
}

/// The `overlay.protattr` value for `p` (empty: no xattr), as kernel overlayfs writes it.
pub fn format(p: u8) -> &'static [u8] {
    match p & BOTH {
        APPEND => b"a",
        IMMUTABLE => b"i",
        BOTH => b"ai",
        _ => b"",
    }
}

fn refuse(forbidden: bool) -> Result<()> {
    if forbidden { Err(Errno::EPERM) } else { Ok(()) }
}

/// A change of the object itself (owner, mode, explicit times, size, xattrs), or a new name
/// for it (link): only an object with neither flag takes it.
pub fn check_change(p: u8) -> Result<()> {
    refuse(p & BOTH != 0)
}

/// ftruncate(2) through a file open for writing: refused by an append-only file only (an
/// immutable one was made so after the open, which kernel overlayfs lets write on).
pub fn check_ftruncate(p: u8) -> Result<()> {
    refuse(p & APPEND != 0)
}

/// copy_file_range(2) into a file: refused by an immutable one, also through a descriptor
/// opened before the flag was set (the kernel checks the target's flag at every copy).
pub fn check_copy_into(p: u8) -> Result<()> {
    refuse(p & IMMUTABLE != 0)
}

/// Setting both times to now (`touch`): refused by an immutable object only.
pub fn check_touch(p: u8) -> Result<()> {
    refuse(p & IMMUTABLE != 0)
}

/// An open with `flags`: an immutable file opens for reading only, an append-only one for
/// writing only with O_APPEND, and neither with O_TRUNC.
pub fn check_open(p: u8, flags: i32) -> Result<()> {
    let writes = flags & libc::O_ACCMODE != libc::O_RDONLY;
    let trunc = flags & libc::O_TRUNC != 0;
    let append = flags & libc::O_APPEND != 0;
    refuse(
        (p & IMMUTABLE != 0 && (writes || trunc))
            || (p & APPEND != 0 && ((writes && !append) || trunc)),
    )
}

/// fallocate(2) with `mode`: an append-only file takes allocation only (no flag but
/// FALLOC_FL_KEEP_SIZE: no hole punched, no range collapsed or zeroed).
pub fn check_fallocate(p: u8, mode: i32) -> Result<()> {
    refuse(p & IMMUTABLE != 0 || (p & APPEND != 0 && mode & !libc::FALLOC_FL_KEEP_SIZE != 0))
}

/// A new name in a directory (create, link or rename into it).
pub fn check_add_entry(dir: u8) -> Result<()> {
    refuse(dir & IMMUTABLE != 0)
}

/// A name taken from a directory (unlink, rmdir, rename out of it or over a name in it), and
/// the object that loses it.
pub fn check_remove_entry(dir: u8, victim: u8) -> Result<()> {
    refuse(dir & BOTH != 0 || victim & BOTH != 0)
}

impl Union {
    /// The protection flags of the object the view shows for `node`: those its upper object's
    /// `overlay.protattr` records, or the real flags of its lower object (as kernel overlayfs
    /// takes them from a lower inode). Read once per node: the daemon is the only writer of the
    /// upper while it is mounted, and a copy-up carries the flags over unchanged.
    pub fn prot(&self, node: &Node) -> Result<u8> {
        if !matches!(node.kind(), libc::S_IFREG | libc::S_IFDIR) || self.layers.read_only() {
            return Ok(0);
        }
        let name = self.layers.format.protattr_xattr();
        if node.is_split() {
            // Its name moved to a new node (`file::split_node`) with the copy, whose flags
            // these are: read from the copy every time (rare), never cached apart.
            return match node.moved_to() {
                Some(copy) => read_protattr(copy.as_fd(), c"", name),
                None => Ok(0),
            };
        }
        let seen = match node.cached_prot() {
            Ok(p) => return Ok(p),
            Err(seen) => seen,
        };
        let read = match self.top_loc(node) {
            Loc::Upper => self.with_object_or_fd(node, Loc::Upper, None, false, |d, p| {
                read_protattr(d, p, name)
            }),
            // statx answers without an open, but some filesystems report every file
            // immutable there (erofs, being read-only); the inode flags decide.
            loc => match self.with_object(node, loc, sys::statx_attributes_at) {
                Ok(attrs) if STATX.of(attrs as u32) == 0 => Ok(0),
                Ok(_) => match self
                    .open_for_ioctl(node, loc)
                    .and_then(|f| sys::get_inode_flags(f.as_fd()))
                {
                    Ok(flags) => Ok(INODE.of(flags)),
                    Err(e)
                        if matches!(e.code(), libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP) =>
                    {
                        Ok(0)
                    }
                    Err(e) => Err(e),
                },
                Err(e) => Err(e),
            },
        };
        match read {
            Ok(p) => {
                node.cache_prot(seen, p);
                Ok(p)
            }
            // No name left to read them through (deleted while open, or moved meanwhile),
            // or none the daemon may read: the request goes on to meet the real answer.
            Err(e)
                if matches!(
                    e.code(),
                    libc::ENOENT | libc::ESTALE | libc::EACCES | libc::EPERM
                ) =>
            {
                log::debug!("protection flags of node {} unread: {e:?}", node.ino);
                Ok(0)
            }
            Err(e) => Err(e),
        }
    }

    /// Refuses a change of `node` itself (xattrs, a new name) that its protection flags forbid.
    pub fn check_change_prot(&self, node: &Node) -> Result<()> {
        check_change(self.prot(node)?)
    }

    /// Records protection flags `p` on the upper object `fd` (or removes the record), and on
    /// `node`. As kernel overlayfs, EPERM where the upper cannot keep the xattr.
    pub fn write_prot(&self, node: &Node, fd: BorrowedFd<'_>, p: u8) -> Result<()> {
        let name = self.layers.format.protattr_xattr();
        let res = match format(p) {
            b"" => match sys::removexattr(fd, name) {
                Err(e) if matches!(e.code(), libc::ENODATA | libc::EOPNOTSUPP) => Ok(()),
                r => r,
            },
            value => match sys::setxattr(fd, name, value, 0) {
                Err(e) if e.code() == libc::EOPNOTSUPP => Err(Errno::EPERM),
                r => r,
            },
        };
        node.set_prot(res.is_ok().then_some(p));
        // A split node's copy is another node's object: that one reads them again.
        if let Some(n) = self
            .split_copy_ino(node)
            .and_then(|ino| self.table.get(ino))
        {
            n.set_prot(None);
        }
        res
    }
}

/// The protection flags an `overlay.protattr` xattr of `path` in `dir` records.
fn read_protattr(dir: BorrowedFd<'_>, path: &CStr, name: &CStr) -> Result<u8> {
    let mut buf = [0u8; 8];
    match sys::getxattr_at(dir, path, name, &mut buf) {
        Ok(n) => Ok(parse(&buf[..n])),
        Err(e) if e.code() == libc::ERANGE => {
            Ok(sys::getxattr_vec_at(dir, path, name)?.map_or(0, |v| parse(&v)))
        }
        Err(e) if matches!(e.code(), libc::ENODATA | libc::EOPNOTSUPP) => Ok(0),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xattr_values_round_trip_as_the_kernel_writes_them() {
        for p in [0, APPEND, IMMUTABLE, BOTH] {
            assert_eq!(parse(format(p)), p);
        }
        assert_eq!(format(BOTH), b"ai");
        assert_eq!(parse(b"ia"), BOTH);
        assert_eq!(parse(b"x"), 0);
        assert_eq!(parse(b"xi"), IMMUTABLE);
    }

    #[test]
    fn flags_convert_both_ways() {
        for p in [0, APPEND, IMMUTABLE, BOTH] {
            assert_eq!(INODE.of(INODE.to(p) | 0x80), p);
            assert_eq!(XFLAGS.of(XFLAGS.to(p) | 0x40), p);
        }
        assert_eq!(INODE.strip(0x80 | 0x20 | 0x10), 0x80);
        assert_eq!(XFLAGS.strip(0x40 | 0x10 | 0x08), 0x40);
        assert_eq!(STATX.of(0x30 | 0x04), BOTH);
    }

    #[test]
    fn opens_follow_the_kernels_rules() {
        let w = libc::O_WRONLY;
        assert!(check_open(0, w | libc::O_TRUNC).is_ok());
        assert!(check_open(IMMUTABLE, libc::O_RDONLY).is_ok());
        assert!(check_open(IMMUTABLE, w | libc::O_APPEND).is_err());
        assert!(check_open(IMMUTABLE, libc::O_RDONLY | libc::O_TRUNC).is_err());
        assert!(check_open(APPEND, libc::O_RDONLY).is_ok());
        assert!(check_open(APPEND, libc::O_RDWR | libc::O_APPEND).is_ok());
        assert!(check_open(APPEND, w).is_err());
        assert!(check_open(APPEND, w | libc::O_APPEND | libc::O_TRUNC).is_err());
    }

    #[test]
    fn directories_and_changes() {
        assert!(check_add_entry(APPEND).is_ok());
        assert!(check_add_entry(IMMUTABLE).is_err());
        assert!(check_remove_entry(APPEND, 0).is_err());
        assert!(check_remove_entry(0, IMMUTABLE).is_err());
        assert!(check_remove_entry(0, 0).is_ok());
        assert!(check_touch(APPEND).is_ok());
        assert!(check_ftruncate(IMMUTABLE).is_ok());
        assert!(check_ftruncate(APPEND).is_err());
        assert!(check_change(APPEND).is_err());
        assert!(check_fallocate(APPEND, libc::FALLOC_FL_KEEP_SIZE).is_ok());
        assert!(check_fallocate(APPEND, 0).is_ok());
        let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        assert!(check_fallocate(APPEND, punch).is_err());
        assert!(check_fallocate(IMMUTABLE, libc::FALLOC_FL_KEEP_SIZE).is_err());
    }
}
