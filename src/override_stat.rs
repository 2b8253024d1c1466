//! Stat overrides (`xattr_permissions`): owner, mode and type that cannot be set for real —
//! rootless, a file cannot be given to another user or made a device — are kept in an xattr
//! of the real object instead, in containers-storage's and fuse-overlayfs's format
//! `uid:gid:mode[:type]`: mode in octal (permission bits), type one of `file`, `dir`,
//! `symlink`, `pipe`, `socket`, `char-MAJ-MIN`, `block-MAJ-MIN` (containers-storage's form;
//! `charMAJ:MIN`, as fuse-overlayfs 2.0 and earlier versions of unionmount write it, and
//! `charMAJ-MIN` are read too). The ids are on-disk ids, so uid/gid mapping applies on top as
//! for real owners.

use std::ffi::CStr;

use crate::sys::{self, Stat};

/// `xattr_permissions=2`, and what containers-storage writes into layers.
pub const USER_XATTR: &CStr = c"user.containers.override_stat";
/// `xattr_permissions=1`.
pub const PRIVILEGED_XATTR: &CStr = c"security.fuseoverlayfs.override_stat";

/// With `xattr_permissions=2` the view's `security.*` xattrs are kept apart from the real
/// ones, as fuse-overlayfs (1.14 and later) keeps them: `security.NAME` is stored as
/// `user.containers.override_security.NAME`, and the layers' real `security.*` xattrs are not
/// shown. Mappings of owners and modes already make the view's security policy its own, and
/// a user namespace may not set real ones (a file capability, an SELinux label) on every
/// filesystem, NFS for one.
const ISOLATED_PREFIX: &[u8] = b"user.containers.override_";
const SECURITY: &[u8] = b"security.";

/// Whether `name` is in the `security.` namespace.
pub fn is_security(name: &[u8]) -> bool {
    name.starts_with(SECURITY)
}

/// The name the view's xattr `view` is stored under when `security.*` is kept apart (see
/// `ISOLATED_PREFIX`); None for a name stored as it is.
pub fn isolated_name(view: &[u8]) -> Option<Vec<u8>> {
    is_security(view).then(|| [ISOLATED_PREFIX, view].concat())
}

/// The view's name of a stored xattr when `security.*` is kept apart (the reverse of
/// `isolated_name`); None for any other name.
pub fn isolated_view_name(real: &[u8]) -> Option<&[u8]> {
    real.strip_prefix(ISOLATED_PREFIX)
        .filter(|rest| is_security(rest))
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Override {
    pub uid: u32,
    pub gid: u32,
    /// Permission bits (07777).
    pub perm: u32,
    /// `S_IF*` type and device number, when the real object's type is not the one shown.
    pub kind: Option<(u32, u64)>,
}

impl Override {
    /// What a stat shows now, as an override to start from.
    pub fn of(st: &Stat) -> Override {
        Override {
            uid: st.st_uid,
            gid: st.st_gid,
            perm: st.st_mode & 0o7777,
            kind: None,
        }
    }

    pub fn parse(v: &[u8]) -> Option<Override> {
        let s = std::str::from_utf8(v).ok()?.trim_end_matches('\0');
        let mut parts = s.splitn(4, ':');
        let uid = parts.next()?.parse().ok()?;
        let gid = parts.next()?.parse().ok()?;
        let perm = u32::from_str_radix(parts.next()?, 8).ok()? & 0o7777;
        let kind = match parts.next() {
            None => None,
            Some(t) => Some(parse_type(t)?),
        };
        Some(Override {
            uid,
            gid,
            perm,
            kind,
        })
    }

    pub fn format(&self) -> String {
        let mut s = format!("{}:{}:{:o}", self.uid, self.gid, self.perm);
        if let Some((kind, rdev)) = self.kind {
            let (ma, mi) = (sys::major(rdev), sys::minor(rdev));
            let t = match kind {
                libc::S_IFDIR => "dir".to_string(),
                libc::S_IFLNK => "symlink".to_string(),
                libc::S_IFIFO => "pipe".to_string(),
                libc::S_IFSOCK => "socket".to_string(),
                libc::S_IFCHR => format!("char-{ma}-{mi}"),
                libc::S_IFBLK => format!("block-{ma}-{mi}"),
                _ => "file".to_string(),
            };
            s.push(':');
            s.push_str(&t);
        }
        s
    }

    /// The type (and device number) shown for a real object of type `real`, when not its
    /// own: only a regular file stands in for another type, a device, FIFO or socket its
    /// writer could not make. Layers are untrusted: a directory recorded as a socket, or a
    /// file recorded as a directory or a symlink, shows as what it is.
    pub fn shown_kind(&self, real: u32) -> Option<(u32, u64)> {
        self.kind.filter(|(kind, _)| {
            real == libc::S_IFREG
                && matches!(
                    *kind,
                    libc::S_IFCHR | libc::S_IFBLK | libc::S_IFIFO | libc::S_IFSOCK
                )
        })
    }

    /// Shows the override in a stat of the real object.
    pub fn apply(&self, st: &mut Stat) {
        st.st_uid = self.uid;
        st.st_gid = self.gid;
        let real = st.st_mode & libc::S_IFMT;
        let kind = match self.shown_kind(real) {
            Some((kind, rdev)) => {
                st.st_rdev = rdev;
                kind
            }
            None => real,
        };
        st.st_mode = kind | self.perm;
    }
}

/// The owner's bits the real object of an override keeps, whatever mode is shown: read and
/// write (and search, for a directory), so that a daemon without CAP_DAC_OVERRIDE can still
/// read and write it, its override included.
pub fn owner_bits(real_kind: u32) -> u32 {
    if real_kind == libc::S_IFDIR {
        0o700
    } else {
        0o600
    }
}

/// Sets the real mode of an object whose shown mode is in its override: the permission bits
/// of `mode` with `owner_bits` added.
pub fn chmod_real(f: std::os::fd::BorrowedFd<'_>, real_kind: u32, mode: u32) -> sys::Result<()> {
    sys::fchmod_path(f, (mode & 0o777) | owner_bits(real_kind))
}

/// The real mode an object made or copied with mode `mode` gets under an override: `mode`
/// itself when it has `owner_bits`, else what `chmod_real` sets.
pub fn real_mode(real_kind: u32, mode: u32) -> u32 {
    let owner = owner_bits(real_kind);
    if mode & owner == owner {
        mode & 0o7777
    } else {
        (mode & 0o777) | owner
    }
}

/// Gives the real object `f`, of mode `mode`, the mode `real_mode` says (made read-only by
/// the mode asked for, the umask or a default ACL, the daemon keeps its own access: without
/// CAP_DAC_OVERRIDE it could not even write the override).
pub fn keep_owner_bits(
    f: std::os::fd::BorrowedFd<'_>,
    real_kind: u32,
    mode: u32,
) -> sys::Result<()> {
    match real_mode(real_kind, mode) {
        m if m == mode & 0o7777 => Ok(()),
        m => sys::fchmod_path(f, m),
    }
}

fn parse_type(t: &str) -> Option<(u32, u64)> {
    // `-MAJ-MIN`, `MAJ:MIN` or `MAJ-MIN`.
    let dev = |rest: &str| -> Option<u64> {
        let rest = rest.strip_prefix('-').unwrap_or(rest);
        let (ma, mi) = rest.split_once([':', '-'])?;
        let (ma, mi): (u32, u32) = (ma.parse().ok()?, mi.parse().ok()?);
        // What FUSE's 32-bit device number carries (12 bits of major, 20 of minor); a larger
        // one would show as another device.
        (ma < 1 << 12 && mi < 1 << 20).then(|| libc::makedev(ma, mi))
    };
    Some(if t.starts_with("dir") {
        (libc::S_IFDIR, 0)
    } else if t.starts_with("file") {
        (libc::S_IFREG, 0)
    } else if t.starts_with("symlink") {
        (libc::S_IFLNK, 0)
    } else if t.starts_with("pipe") {
        (libc::S_IFIFO, 0)
    } else if t.starts_with("socket") {
        (libc::S_IFSOCK, 0)
    } else if let Some(rest) = t.strip_prefix("char") {
        (libc::S_IFCHR, dev(rest)?)
    } else if let Some(rest) = t.strip_prefix("block") {
        (libc::S_IFBLK, dev(rest)?)
    } else {
        return None;
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_modes_keep_the_owners_access() {
        assert_eq!(real_mode(libc::S_IFREG, 0o644), 0o644);
        assert_eq!(real_mode(libc::S_IFREG, 0o4755), 0o4755);
        assert_eq!(real_mode(libc::S_IFREG, 0o444), 0o644);
        // Added bits drop the set-ID ones, as `chmod_real` does.
        assert_eq!(real_mode(libc::S_IFREG, 0o4511), 0o711);
        assert_eq!(real_mode(libc::S_IFDIR, 0o555), 0o755);
        assert_eq!(real_mode(libc::S_IFDIR, 0o1733), 0o1733);
    }

    fn stat(mode: u32) -> Stat {
        // SAFETY: an all-zero stat is a valid value of the plain C struct.
        let mut st: Stat = unsafe { std::mem::zeroed() };
        st.st_mode = mode;
        st
    }

    #[test]
    fn three_fields_keep_the_type() {
        let o = Override::parse(b"1000:1000:755").unwrap();
        let mut st = stat(libc::S_IFREG | 0o600);
        o.apply(&mut st);
        assert_eq!(
            (st.st_uid, st.st_gid, st.st_mode),
            (1000, 1000, libc::S_IFREG | 0o755)
        );
        assert_eq!(o.format(), "1000:1000:755");
    }

    /// containers-storage writes `char-MAJ-MIN` (and `%04o` modes); fuse-overlayfs 2.0
    /// `charMAJ:MIN`; fuse-overlayfs 1.x reads `charMAJ-MIN` too.
    #[test]
    fn every_device_form_is_read() {
        for v in [
            &b"0:6:0660:char-1-3"[..],
            b"0:6:660:char1:3",
            b"0:6:660:char1-3",
        ] {
            let o = Override::parse(v).unwrap();
            assert_eq!((o.uid, o.gid, o.perm), (0, 6, 0o660), "{v:?}");
            assert_eq!(o.kind, Some((libc::S_IFCHR, libc::makedev(1, 3))), "{v:?}");
        }
        let o = Override::parse(b"0:6:0660:block-8-16").unwrap();
        assert_eq!(o.kind, Some((libc::S_IFBLK, libc::makedev(8, 16))));
        assert_eq!(o.format(), "0:6:660:block-8-16");
        assert_eq!(Override::parse(b"0:0:660:char-1"), None);
        // Beyond what FUSE carries: refused rather than shown as another device.
        assert!(Override::parse(b"0:0:660:char-4095-1048575").is_some());
        assert_eq!(Override::parse(b"0:0:660:char-5000-1"), None);
        assert_eq!(Override::parse(b"0:0:660:block-1-1048576"), None);
    }

    #[test]
    fn devices_and_types() {
        let o = Override::parse(b"0:6:660:block8:0").unwrap();
        let mut st = stat(libc::S_IFREG | 0o600);
        o.apply(&mut st);
        assert_eq!(st.st_mode, libc::S_IFBLK | 0o660);
        assert_eq!((sys::major(st.st_rdev), sys::minor(st.st_rdev)), (8, 0));
        assert_eq!(o.format(), "0:6:660:block-8-0");
        assert_eq!(
            Override::parse(b"0:0:755:dir").unwrap().kind,
            Some((libc::S_IFDIR, 0))
        );
        assert_eq!(
            Override::parse(b"0:0:666:char0:0").unwrap().format(),
            "0:0:666:char-0-0"
        );
        // containers-storage writes the whole mode, type bits included.
        assert_eq!(Override::parse(b"0:0:0100755").unwrap().perm, 0o755);
    }

    /// Only a regular file shows another type, and only one it can stand in for.
    #[test]
    fn a_recorded_type_changes_only_a_regular_file() {
        let shown = |v: &[u8], real: u32| {
            let mut st = stat(real | 0o700);
            Override::parse(v).unwrap().apply(&mut st);
            st.st_mode & libc::S_IFMT
        };
        assert_eq!(shown(b"0:0:755:socket", libc::S_IFDIR), libc::S_IFDIR);
        assert_eq!(shown(b"0:0:755:char-1-3", libc::S_IFDIR), libc::S_IFDIR);
        assert_eq!(shown(b"0:0:755:dir", libc::S_IFREG), libc::S_IFREG);
        assert_eq!(shown(b"0:0:755:symlink", libc::S_IFREG), libc::S_IFREG);
        assert_eq!(shown(b"0:0:755:char-1-3", libc::S_IFLNK), libc::S_IFLNK);
        for (v, kind) in [
            (&b"0:0:644:pipe"[..], libc::S_IFIFO),
            (b"0:0:644:socket", libc::S_IFSOCK),
            (b"0:0:644:char-1-3", libc::S_IFCHR),
            (b"0:0:644:block-8-0", libc::S_IFBLK),
        ] {
            assert_eq!(shown(v, libc::S_IFREG), kind, "{v:?}");
        }
    }

    #[test]
    fn malformed_values_are_ignored() {
        for v in [&b""[..], b"1:2", b"x:0:755", b"0:0:9", b"0:0:755:tape"] {
            assert_eq!(Override::parse(v), None, "{v:?}");
        }
    }
}
