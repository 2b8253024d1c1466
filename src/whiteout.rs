//! Whiteout and opaque-directory formats, and the private names and xattrs that never appear in
//! the merged view.
//!
//! Read, in every layer: a whiteout is a character device 0/0 or an empty `.wh.NAME`; a directory
//! is opaque with `trusted.overlay.opaque=y`, `user.overlay.opaque=y`,
//! `user.fuseoverlayfs.opaque=y`, or a `.wh..wh..opq` entry inside it. In a lower layer, as
//! kernel overlayfs reads them since Linux 6.7, an empty regular file with
//! `trusted.overlay.whiteout` or `user.overlay.whiteout` is a whiteout too, in a directory whose
//! `overlay.opaque` is `x` ("xattr whiteouts", which composefs-style layers use).
//! Written, in the upper: see [`Format`].

use std::ffi::{CStr, OsStr};
use std::os::fd::BorrowedFd;
use std::os::unix::ffi::OsStrExt;

use crate::sys::{self, Result, Stat};

pub const WH_PREFIX: &[u8] = b".wh.";
pub const OPAQUE_MARKER: &CStr = c".wh..wh..opq";

pub const TRUSTED_OPAQUE: &CStr = c"trusted.overlay.opaque";
pub const USER_OPAQUE: &CStr = c"user.overlay.opaque";
pub const FUSEOVERLAYFS_OPAQUE: &CStr = c"user.fuseoverlayfs.opaque";

pub const TRUSTED_XWHITEOUT: &CStr = c"trusted.overlay.whiteout";
pub const USER_XWHITEOUT: &CStr = c"user.overlay.whiteout";

pub const TRUSTED_PROTATTR: &CStr = c"trusted.overlay.protattr";
pub const USER_PROTATTR: &CStr = c"user.overlay.protattr";

/// How the upper layer records whiteouts and opaque directories.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// Kernel overlayfs as root: char 0/0 whiteouts, `trusted.overlay.opaque=y`.
    Trusted,
    /// Kernel overlayfs `userxattr`: char 0/0 whiteouts, `user.overlay.opaque=y`.
    UserXattr,
    /// Where mknod of 0/0 is refused: `.wh.NAME` files, `user.overlay.opaque=y` plus a
    /// `.wh..wh..opq` file in opaque directories.
    Aufs,
}

impl Format {
    pub fn opaque_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => TRUSTED_OPAQUE,
            Format::UserXattr | Format::Aufs => USER_OPAQUE,
        }
    }

    /// The mark of a metadata-only copy (see `refuse_metacopy`): kernel overlayfs reads only
    /// the `trusted.` one as root, and a `user.overlay.` xattr is a layer's own there.
    pub fn metacopy_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => c"trusted.overlay.metacopy",
            Format::UserXattr | Format::Aufs => c"user.overlay.metacopy",
        }
    }

    /// Where kernel overlayfs records the path a renamed directory's lower directories have
    /// (`redirect_dir=on`); read in every layer (see `parse_redirect`).
    pub fn redirect_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => c"trusted.overlay.redirect",
            Format::UserXattr | Format::Aufs => c"user.overlay.redirect",
        }
    }

    /// Where kernel overlayfs records the lower object a copy was made from (its file
    /// handle, see `origin_value`).
    pub fn origin_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => c"trusted.overlay.origin",
            Format::UserXattr | Format::Aufs => c"user.overlay.origin",
        }
    }

    /// Kernel overlayfs's mark of an upper directory that may hold copies (`overlay.origin`)
    /// or moved objects, whose listing it then numbers as their `st_ino`.
    pub fn impure_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => c"trusted.overlay.impure",
            Format::UserXattr | Format::Aufs => c"user.overlay.impure",
        }
    }

    /// Where append-only and immutable flags set through the view are kept (`protect`).
    pub fn protattr_xattr(self) -> &'static CStr {
        match self {
            Format::Trusted => TRUSTED_PROTATTR,
            Format::UserXattr | Format::Aufs => USER_PROTATTR,
        }
    }
}

/// A character device 0/0 created through the mount cannot be stored as itself (that is a
/// whiteout); it is stored as this device number instead, which major 0 ("no device")
/// leaves unused, and shown as 0/0 again.
pub const DEVZERO_STANDIN: u64 = (0xfffff & 0xff) | ((0xfffff & !0xff) << 12);

/// The stand-in on an upper whose device numbers are narrower (xfs takes minors below 2^18
/// only), where `DEVZERO_STANDIN` cannot be made.
pub const DEVZERO_STANDIN_NARROW: u64 = (0x3ffff & 0xff) | ((0x3ffff & !0xff) << 12);

/// Whether `rdev` is one of the stand-ins of 0/0 (which are read as 0/0 in every layer).
pub fn is_devzero_standin(rdev: u64) -> bool {
    rdev == DEVZERO_STANDIN || rdev == DEVZERO_STANDIN_NARROW
}

/// mknodat(2), making a stand-in of 0/0 as the narrow one where the filesystem refuses the
/// other (EINVAL).
pub fn mknod_at(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    match sys::mknodat(dir, name, mode, rdev) {
        Err(e)
            if e.code() == libc::EINVAL
                && sys::file_type(mode) == libc::S_IFCHR
                && is_devzero_standin(rdev) =>
        {
            sys::mknodat(dir, name, mode, DEVZERO_STANDIN_NARROW)
        }
        r => r,
    }
}

/// The device number the merged view shows for a real object's `st_rdev`.
pub fn view_rdev(st: &Stat) -> u64 {
    if sys::file_type(st.st_mode) == libc::S_IFCHR && is_devzero_standin(st.st_rdev) {
        0
    } else {
        st.st_rdev
    }
}

/// A character device 0/0.
pub fn is_whiteout(st: &Stat) -> bool {
    sys::file_type(st.st_mode) == libc::S_IFCHR && st.st_rdev == 0
}

/// `.wh.NAME` -> `NAME` (and `None` for the opaque marker or an ordinary name).
pub fn whited_out_name(name: &[u8]) -> Option<&[u8]> {
    let rest = name.strip_prefix(WH_PREFIX)?;
    if rest.is_empty() || rest.starts_with(WH_PREFIX) {
        None
    } else {
        Some(rest)
    }
}

/// Names that belong to the layer format and never appear in the merged view.
pub fn is_private_name(name: &[u8]) -> bool {
    name.starts_with(WH_PREFIX)
}

/// The markers read in every layer whatever the mount's format (opaque directories and xattr
/// whiteouts, in both of kernel overlayfs's namespaces): never shown, never copied up.
const MARKER_XATTRS: [&[u8]; 4] = [
    b"trusted.overlay.opaque",
    b"user.overlay.opaque",
    b"trusted.overlay.whiteout",
    b"user.overlay.whiteout",
];

/// What an escaped overlay xattr name adds after the prefix (see `escape_xattr`).
const ESCAPE: &[u8] = b"overlay.";

impl Format {
    /// The prefix of overlayfs's own xattrs in this format, as kernel overlayfs takes it:
    /// `trusted.overlay.` as root, `user.overlay.` with `userxattr`. The other namespace's
    /// `overlay.` names are ordinary xattrs there.
    fn own_prefix(self) -> &'static [u8] {
        match self {
            Format::Trusted => b"trusted.overlay.",
            Format::UserXattr | Format::Aufs => b"user.overlay.",
        }
    }
}

/// Xattrs private to the overlay format: hidden from listings, refused on set, not copied up.
/// Those are the format's own `overlay.` names (not escaped ones, `trusted.overlay.overlay.*`,
/// which hold the view's own `trusted.overlay.*`), the markers read in every layer, and
/// fuse-overlayfs's.
pub fn is_private_xattr(name: &[u8], format: Format) -> bool {
    name.strip_prefix(format.own_prefix())
        .is_some_and(|rest| !rest.starts_with(ESCAPE))
        || MARKER_XATTRS.contains(&name)
        || name.starts_with(b"user.fuseoverlayfs.")
}

/// The name a view's xattr in overlayfs's namespace is stored under, as kernel overlayfs
/// (Linux 6.7 and later) stores it so that an overlay can be nested in another:
/// `trusted.overlay.NAME` as `trusted.overlay.overlay.NAME` as root, `user.overlay.NAME` as
/// `user.overlay.overlay.NAME` with `userxattr`. None for any other name.
pub fn escape_xattr(view: &[u8], format: Format) -> Option<Vec<u8>> {
    let prefix = format.own_prefix();
    let rest = view.strip_prefix(prefix)?;
    let mut real = prefix.to_vec();
    real.extend_from_slice(ESCAPE);
    real.extend_from_slice(rest);
    Some(real)
}

/// The view's name of a stored escaped xattr (the reverse of `escape_xattr`); None for any
/// other name.
pub fn unescape_xattr(real: &[u8], format: Format) -> Option<Vec<u8>> {
    let prefix = format.own_prefix();
    let rest = real.strip_prefix(prefix)?.strip_prefix(ESCAPE)?;
    let mut view = prefix.to_vec();
    view.extend_from_slice(rest);
    Some(view)
}

/// Length of kernel overlayfs's `struct ovl_fb` header: version, magic, length, flags,
/// handle type, filesystem UUID.
const OVL_FB_HEADER: usize = 21;
const OVL_FB_MAGIC: u8 = 0xfb;

/// The `overlay.origin` value kernel overlayfs writes for a lower object whose file handle is
/// (`kind`, `fid`) on a filesystem of UUID `uuid`: an `ovl_fb` header and the handle. None
/// for a handle it cannot hold.
pub fn origin_value(kind: i32, fid: &[u8], uuid: &[u8; 16]) -> Option<Vec<u8>> {
    let kind = u8::try_from(kind).ok()?;
    let len = u8::try_from(OVL_FB_HEADER + fid.len()).ok()?;
    // Byte order of the handle: OVL_FH_FLAG_BIG_ENDIAN on a big-endian machine.
    let flags = u8::from(cfg!(target_endian = "big"));
    let mut v = vec![0, OVL_FB_MAGIC, len, flags, kind];
    v.extend_from_slice(uuid);
    v.extend_from_slice(fid);
    Some(v)
}

/// The file handle (type, bytes) an `overlay.origin` value names; None if it is not one.
pub fn parse_origin(v: &[u8]) -> Option<(i32, &[u8])> {
    let ok = v.len() > OVL_FB_HEADER
        && v[0] == 0
        && v[1] == OVL_FB_MAGIC
        && usize::from(v[2]) == v.len();
    ok.then(|| (i32::from(v[4]), &v[OVL_FB_HEADER..]))
}

/// `.wh.` + name.
pub fn aufs_name(name: &OsStr) -> Vec<u8> {
    let mut v = WH_PREFIX.to_vec();
    v.extend_from_slice(name.as_bytes());
    v
}

/// Whether the directory open as `dir` (any fd, `O_PATH` included) is opaque in its layer.
pub fn is_opaque_dir(dir: BorrowedFd<'_>) -> Result<bool> {
    for name in [TRUSTED_OPAQUE, USER_OPAQUE, FUSEOVERLAYFS_OPAQUE] {
        let mut buf = [0u8; 2];
        match sys::getxattr(dir, name, &mut buf) {
            Ok(1) if buf[0] == b'y' => return Ok(true),
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.code(),
                    libc::ENODATA | libc::ENOTSUP | libc::ERANGE | libc::EPERM | libc::EACCES
                ) => {}
            Err(e) => return Err(e),
        }
    }
    match sys::fstatat(dir, OPAQUE_MARKER, 0) {
        Ok(_) => Ok(true),
        Err(e) if e.code() == libc::ENOENT => Ok(false),
        Err(e) => Err(e),
    }
}

/// Whether a lower directory may hold xattr whiteouts: its `overlay.opaque` is `x` (such a
/// directory is not opaque).
pub fn has_xwhiteouts(dir: BorrowedFd<'_>) -> bool {
    [TRUSTED_OPAQUE, USER_OPAQUE].iter().any(|name| {
        let mut buf = [0u8; 2];
        matches!(sys::getxattr(dir, name, &mut buf), Ok(1) if buf[0] == b'x')
    })
}

/// Whether the entry `name` of a directory that may hold xattr whiteouts (`has_xwhiteouts`),
/// of stat `st`, is one: an empty regular file with `overlay.whiteout`. The xattrs are read
/// only for an empty regular file.
pub fn is_xwhiteout(dir: BorrowedFd<'_>, name: &CStr, st: &Stat) -> bool {
    may_be_xwhiteout(st)
        && [TRUSTED_XWHITEOUT, USER_XWHITEOUT]
            .iter()
            .any(|x| sys::getxattr_at(dir, name, x, &mut []).is_ok())
}

/// EPERM for a metadata-only copy made by kernel overlayfs with `metacopy=on` (`name` in
/// `dir`, as for the `*at` calls; `c""` for `dir` itself): it holds no data, which is in a
/// lower file the kernel finds through an origin this daemon does not follow. It
/// is refused, as kernel overlayfs refuses it without that option, rather than read as zeros.
/// One getxattr of the mark in the mount's format; the first one met is logged.
pub fn refuse_metacopy(dir: BorrowedFd<'_>, name: &CStr, format: Format) -> Result<()> {
    if sys::getxattr_at(dir, name, format.metacopy_xattr(), &mut []).is_err() {
        return Ok(());
    }
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !WARNED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        log::warn!(
            "a file made by kernel overlayfs with metacopy=on (data in another layer) was \
             met; such files are refused (EPERM), as kernel overlayfs refuses them without \
             that option"
        );
    }
    Err(crate::sys::Errno::EPERM)
}

/// A directory's redirect, as kernel overlayfs reads it: `/a/b` is a path from the root of
/// each layer below, `name` a name in the parent's directories below. The value ends at its
/// first NUL. EINVAL for what the kernel takes as invalid (empty, an empty component, a `/`
/// in a relative one), EACCES for a `.` or `..` component or an empty name (a value that
/// starts with NUL: the kernel's lookup refuses them), so that a redirect never leaves the
/// layer.
pub fn parse_redirect(value: &[u8]) -> Result<(bool, Vec<&[u8]>)> {
    if value.first() == Some(&0) {
        return Err(crate::sys::Errno::EACCES);
    }
    let value = value.split(|&b| b == 0).next().unwrap_or_default();
    let (absolute, parts): (bool, Vec<&[u8]>) = match value.strip_prefix(b"/") {
        Some(rest) => (true, rest.split(|&b| b == b'/').collect()),
        None if value.contains(&b'/') => return Err(crate::sys::Errno::EINVAL),
        None => (false, vec![value]),
    };
    if parts.iter().any(|p| p.is_empty()) {
        return Err(crate::sys::Errno::EINVAL);
    }
    if parts.iter().any(|p| *p == b"." || *p == b"..") {
        return Err(crate::sys::Errno::EACCES);
    }
    Ok((absolute, parts))
}

/// Whether an object of stat `st` can be an xattr whiteout at all: an empty regular file.
pub fn may_be_xwhiteout(st: &Stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFREG && st.st_size == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aufs_names() {
        assert_eq!(whited_out_name(b".wh.foo"), Some(&b"foo"[..]));
        assert_eq!(whited_out_name(b".wh..wh..opq"), None);
        assert_eq!(whited_out_name(b".wh."), None);
        assert_eq!(whited_out_name(b"foo"), None);
        assert!(is_private_name(b".wh..wh..opq"));
        assert!(!is_private_name(b".whx"));
    }

    #[test]
    fn origin_as_kernel_overlayfs_writes_it() {
        // What kernel overlayfs (6.x, no `index`) wrote at a copy-up from ext4 (an
        // ino32+generation handle).
        let fid = [0x26, 0x40, 0x9a, 0x00, 0xfe, 0x71, 0xa4, 0xfb];
        let mut kernel = vec![0x00, 0xfb, 0x1d, 0x00, 0x01];
        kernel.extend_from_slice(&[0; 16]);
        kernel.extend_from_slice(&fid);
        if cfg!(target_endian = "little") {
            assert_eq!(
                origin_value(1, &fid, &[0; 16]).as_deref(),
                Some(&kernel[..])
            );
        }
        assert_eq!(parse_origin(&kernel), Some((1, &fid[..])));
        assert_eq!(parse_origin(&kernel[..kernel.len() - 1]), None);
        assert_eq!(parse_origin(&kernel[..OVL_FB_HEADER]), None);
        assert_eq!(origin_value(256, &fid, &[0; 16]), None);
        assert_eq!(origin_value(1, &[0; 235], &[0; 16]), None);
    }

    #[test]
    fn devzero_standin_is_major_zero() {
        assert_eq!(libc::major(DEVZERO_STANDIN), 0);
        assert_eq!(libc::minor(DEVZERO_STANDIN), 0xfffff);
        // xfs takes minors below 2^18.
        assert_eq!(libc::major(DEVZERO_STANDIN_NARROW), 0);
        assert_eq!(libc::minor(DEVZERO_STANDIN_NARROW), (1 << 18) - 1);
        assert!(is_devzero_standin(DEVZERO_STANDIN) && is_devzero_standin(DEVZERO_STANDIN_NARROW));
        assert!(!is_devzero_standin(0) && !is_devzero_standin(libc::makedev(1, 3)));
        assert_eq!(
            sys::decode_dev_u32(sys::encode_dev_u32(DEVZERO_STANDIN)),
            DEVZERO_STANDIN
        );
    }

    #[test]
    fn redirects() {
        fn ok(v: &[u8]) -> std::result::Result<(bool, Vec<&[u8]>), i32> {
            parse_redirect(v).map_err(|e| e.code())
        }
        assert_eq!(ok(b"/a/b"), Ok((true, vec![&b"a"[..], b"b"])));
        assert_eq!(ok(b"x"), Ok((false, vec![&b"x"[..]])));
        assert_eq!(ok(b"x\0junk"), Ok((false, vec![&b"x"[..]])));
        for bad in [&b""[..], b"/", b"//a", b"/a/", b"/a//b", b"a/b", b"/\0"] {
            assert_eq!(ok(bad), Err(libc::EINVAL), "{bad:?}");
        }
        // As kernel overlayfs answers (checked on 6.18): a value that starts with NUL is an
        // empty name, which its lookup refuses.
        for up in [&b".."[..], b".", b"/a/../b", b"/..", b"\0", b"\0/a"] {
            assert_eq!(ok(up), Err(libc::EACCES), "{up:?}");
        }
    }

    #[test]
    fn private_xattrs() {
        let t = Format::Trusted;
        let u = Format::UserXattr;
        assert!(is_private_xattr(b"trusted.overlay.origin", t));
        assert!(is_private_xattr(b"user.overlay.origin", u));
        // As root, kernel overlayfs takes `user.overlay.` names as ordinary xattrs (but for
        // the markers read in every layer), and the reverse with `userxattr`.
        assert!(!is_private_xattr(b"user.overlay.origin", t));
        assert!(!is_private_xattr(b"user.overlay.note", t));
        assert!(!is_private_xattr(b"trusted.overlay.note", u));
        for f in [t, u, Format::Aufs] {
            assert!(is_private_xattr(b"trusted.overlay.opaque", f));
            assert!(is_private_xattr(b"user.overlay.opaque", f));
            assert!(is_private_xattr(b"user.overlay.whiteout", f));
            assert!(is_private_xattr(b"user.fuseoverlayfs.opaque", f));
            assert!(!is_private_xattr(b"user.overlayfoo", f));
            assert!(!is_private_xattr(b"security.capability", f));
        }
        assert!(!is_private_xattr(b"trusted.overlay.overlay.opaque", t));
        assert!(!is_private_xattr(b"user.overlay.overlay.x", u));
    }

    #[test]
    fn escaped_xattrs() {
        let (t, u) = (Format::Trusted, Format::UserXattr);
        let esc = |n: &[u8], f| escape_xattr(n, f).map(|v| String::from_utf8(v).unwrap());
        let unesc = |n: &[u8], f| unescape_xattr(n, f).map(|v| String::from_utf8(v).unwrap());
        assert_eq!(
            esc(b"trusted.overlay.opaque", t).as_deref(),
            Some("trusted.overlay.overlay.opaque")
        );
        assert_eq!(
            esc(b"user.overlay.overlay.x", u).as_deref(),
            Some("user.overlay.overlay.overlay.x")
        );
        assert_eq!(esc(b"user.overlay.x", t), None);
        assert_eq!(esc(b"trusted.overlay.x", u), None);
        assert_eq!(esc(b"user.overlayx", u), None);
        assert_eq!(esc(b"user.fuseoverlayfs.opaque", u), None);
        assert_eq!(
            unesc(b"trusted.overlay.overlay.opaque", t).as_deref(),
            Some("trusted.overlay.opaque")
        );
        assert_eq!(unesc(b"user.overlay.overlay.x", t), None);
        assert_eq!(unesc(b"trusted.overlay.opaque", t), None);
        assert_eq!(unesc(b"user.other", u), None);
        for (n, f) in [
            (&b"trusted.overlay.a"[..], t),
            (b"user.overlay.overlay.b", u),
        ] {
            assert_eq!(unescape_xattr(&escape_xattr(n, f).unwrap(), f).unwrap(), n);
        }
    }
}
