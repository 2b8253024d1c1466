//! POSIX ACLs: which filesystems can be given one, inheritance for objects the daemon
//! builds outside their parent, and the mode an access ACL gives (for modes the daemon keeps
//! itself, `xattr_permissions`).
//!
//! An object created where a whiteout stands is made in the work directory and moved into
//! place, so the filesystem never sees its real parent and cannot apply the parent's default
//! ACL. This module does what the kernel's `posix_acl_create` would have done: the new object
//! gets the default ACL as its access ACL, masked by the requested mode (and a directory also
//! inherits the default ACL itself), with the umask not applied.

/// `system.posix_acl_access`.
pub const ACCESS: &std::ffi::CStr = c"system.posix_acl_access";
/// `system.posix_acl_default`.
pub const DEFAULT: &std::ffi::CStr = c"system.posix_acl_default";

/// Whether an xattr name is one of the two POSIX ACLs.
pub fn is_acl_name(name: &[u8]) -> bool {
    name == ACCESS.to_bytes() || name == DEFAULT.to_bytes()
}

/// Whether files of a filesystem of type `magic` (statfs `f_type`) can be given a POSIX ACL;
/// `fstype` tells its mount's type (as mountinfo names it) where the magic number does not.
/// Kernel overlayfs refuses an ACL change (EOPNOTSUPP) on a file not yet copied up when its
/// real inode has no `set_acl` operation, before copying it up. These are the filesystems
/// without one that lower layers come on: read-only image formats (erofs can hold ACLs but
/// not set them), filesystems without ACLs, and NFS version 4 (version 3 has the operation).
/// A filesystem merely mounted `noacl` has the operation: there the kernel copies the file up
/// and sets the ACL on the copy.
pub fn fs_takes_acls(magic: u64, fstype: impl FnOnce() -> Option<String>) -> bool {
    const NFS: u64 = 0x6969;
    const NO_SET_ACL: [u64; 12] = [
        0x7371_7368, // squashfs
        0xe0f5_e1e2, // erofs
        0x9660,      // iso9660
        0x28cd_3d45, // cramfs
        0x453d_cd28, // cramfs, other byte order
        0x7275,      // romfs
        0x4d44,      // vfat, msdos
        0x2011_bab0, // exfat
        0x1501_3346, // udf
        0x4244,      // hfs
        0x482b,      // hfsplus
        0x8584_58f6, // ramfs
    ];
    match magic {
        NFS => fstype().is_none_or(|t| t != "nfs4"),
        m => !NO_SET_ACL.contains(&m),
    }
}

const VERSION: u32 = 2;
const HEADER: usize = 4;
const ENTRY: usize = 8;

const USER_OBJ: u16 = 0x01;
const USER: u16 = 0x02;
const GROUP_OBJ: u16 = 0x04;
const GROUP: u16 = 0x08;
const MASK: u16 = 0x10;
const OTHER: u16 = 0x20;

/// What an object created with permission bits `mode` under a directory whose default ACL
/// is `default` (its xattr value) gets: its permission bits and, when the bits alone cannot
/// express it, an access ACL (an xattr value). `None` if `default` is malformed.
pub fn inherit(default: &[u8], mode: u32) -> Option<(u32, Option<Vec<u8>>)> {
    if default.len() < HEADER || (default.len() - HEADER) % ENTRY != 0 {
        return None;
    }
    if u32::from_le_bytes(default[..HEADER].try_into().ok()?) != VERSION {
        return None;
    }
    let mut acl = default.to_vec();
    let mut mode = mode & 0o777;
    let mut equivalent = true;
    let mut group_obj = None;
    let mut mask = None;
    for at in (HEADER..acl.len()).step_by(ENTRY) {
        let tag = u16::from_le_bytes([acl[at], acl[at + 1]]);
        let perm = u32::from(u16::from_le_bytes([acl[at + 2], acl[at + 3]]));
        match tag {
            USER_OBJ => {
                let p = perm & (mode >> 6);
                set_perm(&mut acl, at, p);
                mode &= (p << 6) | !0o700;
            }
            USER | GROUP => equivalent = false,
            GROUP_OBJ => group_obj = Some(at),
            OTHER => {
                let p = perm & mode;
                set_perm(&mut acl, at, p);
                mode &= p | !0o007;
            }
            MASK => {
                mask = Some(at);
                equivalent = false;
            }
            _ => return None,
        }
    }
    let at = mask.or(group_obj)?;
    let perm = u32::from(u16::from_le_bytes([acl[at + 2], acl[at + 3]]));
    let p = perm & (mode >> 3);
    set_perm(&mut acl, at, p);
    mode &= (p << 3) | !0o070;
    Some((mode & 0o777, (!equivalent).then_some(acl)))
}

/// The permission bits an access ACL (its xattr value) gives its object, as the kernel's
/// `posix_acl_equiv_mode` computes them (owner, mask or else owning group, others), and
/// whether the bits say all it says (no named entry, no mask): a filesystem stores no such
/// ACL, only the bits. `None` for a value the kernel would refuse (EINVAL): entries out of
/// order, an entry missing or repeated, named entries without a mask.
pub fn access_mode(acl: &[u8]) -> Option<(u32, bool)> {
    if acl.len() < HEADER || (acl.len() - HEADER) % ENTRY != 0 {
        return None;
    }
    if u32::from_le_bytes(acl[..HEADER].try_into().ok()?) != VERSION {
        return None;
    }
    let (mut user, mut group, mut mask, mut other) = (None, None, None, None);
    let mut named = false;
    let mut last = 0;
    for at in (HEADER..acl.len()).step_by(ENTRY) {
        let tag = u16::from_le_bytes([acl[at], acl[at + 1]]);
        let perm = u32::from(u16::from_le_bytes([acl[at + 2], acl[at + 3]]));
        if tag < last || perm & !7 != 0 {
            return None;
        }
        last = tag;
        let once = |slot: &mut Option<u32>| slot.replace(perm).is_none();
        let ok = match tag {
            USER_OBJ => once(&mut user),
            GROUP_OBJ => once(&mut group),
            MASK => once(&mut mask),
            OTHER => once(&mut other),
            USER | GROUP => {
                named = true;
                true
            }
            _ => false,
        };
        if !ok {
            return None;
        }
    }
    if named && mask.is_none() {
        return None;
    }
    let bits = user? << 6 | mask.or(group)? << 3 | other?;
    Some((bits, mask.is_none()))
}

/// Gives an access ACL (its xattr value) the permission bits `mode`, as the kernel's
/// `posix_acl_chmod` does on a chmod: the owner's, the mask's (or else the owning group's)
/// and the others' entries.
pub fn set_mode(acl: &mut [u8], mode: u32) {
    if acl.len() < HEADER || (acl.len() - HEADER) % ENTRY != 0 {
        return;
    }
    let mut group_obj = None;
    let mut mask = None;
    for at in (HEADER..acl.len()).step_by(ENTRY) {
        match u16::from_le_bytes([acl[at], acl[at + 1]]) {
            USER_OBJ => set_perm(acl, at, mode >> 6),
            GROUP_OBJ => group_obj = Some(at),
            MASK => mask = Some(at),
            OTHER => set_perm(acl, at, mode),
            _ => {}
        }
    }
    if let Some(at) = mask.or(group_obj) {
        set_perm(acl, at, mode >> 3);
    }
}

/// Translates the ids of an ACL's (its xattr value's) named-user and named-group entries
/// with `user` and `group`. False if the value is malformed or an id has no translation;
/// the value may then be partly translated.
pub fn map_ids(
    acl: &mut [u8],
    user: impl Fn(u32) -> Option<u32>,
    group: impl Fn(u32) -> Option<u32>,
) -> bool {
    if acl.len() < HEADER || (acl.len() - HEADER) % ENTRY != 0 {
        return false;
    }
    for at in (HEADER..acl.len()).step_by(ENTRY) {
        let map = match u16::from_le_bytes([acl[at], acl[at + 1]]) {
            USER => &user as &dyn Fn(u32) -> Option<u32>,
            GROUP => &group,
            _ => continue,
        };
        let id = u32::from_le_bytes([acl[at + 4], acl[at + 5], acl[at + 6], acl[at + 7]]);
        let Some(id) = map(id) else {
            return false;
        };
        acl[at + 4..at + 8].copy_from_slice(&id.to_le_bytes());
    }
    true
}

/// The ACL `acl` without its named entries whose id has no mapping in the daemon's user
/// namespace (the kernel shows such an id as -1), if it has any: FUSE takes no ACL naming -1
/// (every request that reads it would fail with EINVAL), and a daemon in a user namespace
/// can set none. Such an entry matches no process that can reach the view, so no permission
/// check changes; the mask entry stays.
pub fn without_unmapped(acl: &[u8]) -> Option<Vec<u8>> {
    if acl.len() < HEADER || (acl.len() - HEADER) % ENTRY != 0 {
        return None;
    }
    let unmapped = |at: usize| {
        matches!(u16::from_le_bytes([acl[at], acl[at + 1]]), USER | GROUP)
            && acl[at + 4..at + 8] == u32::MAX.to_le_bytes()
    };
    if !(HEADER..acl.len()).step_by(ENTRY).any(unmapped) {
        return None;
    }
    let mut out = acl[..HEADER].to_vec();
    for at in (HEADER..acl.len()).step_by(ENTRY) {
        if !unmapped(at) {
            out.extend_from_slice(&acl[at..at + ENTRY]);
        }
    }
    Some(out)
}

fn set_perm(acl: &mut [u8], at: usize, perm: u32) {
    acl[at + 2..at + 4].copy_from_slice(&(perm as u16 & 7).to_le_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unmapped_named_entries_are_dropped() {
        let entry = |tag: u16, perm: u16, id: u32| {
            let mut e = tag.to_le_bytes().to_vec();
            e.extend_from_slice(&perm.to_le_bytes());
            e.extend_from_slice(&id.to_le_bytes());
            e
        };
        let acl = |entries: &[Vec<u8>]| {
            let mut v = 2u32.to_le_bytes().to_vec();
            for e in entries {
                v.extend_from_slice(e);
            }
            v
        };
        let (uo, go, mask, other) = (
            entry(1, 7, u32::MAX),
            entry(4, 5, u32::MAX),
            entry(0x10, 7, u32::MAX),
            entry(0x20, 5, u32::MAX),
        );
        let named = entry(2, 7, 1000);
        let lost_user = entry(2, 7, u32::MAX);
        let lost_group = entry(8, 5, u32::MAX);
        let full = acl(&[
            uo.clone(),
            named.clone(),
            lost_user,
            go.clone(),
            lost_group,
            mask.clone(),
            other.clone(),
        ]);
        assert_eq!(
            without_unmapped(&full),
            Some(acl(&[
                uo.clone(),
                named.clone(),
                go.clone(),
                mask.clone(),
                other.clone()
            ]))
        );
        // The owner, group and other entries carry -1 as their id: they stay.
        assert_eq!(without_unmapped(&acl(&[uo, named, go, mask, other])), None);
        assert_eq!(without_unmapped(b"short"), None);
    }

    #[test]
    fn acls_are_taken_where_the_filesystem_can_set_them() {
        let none = || None::<String>;
        assert!(fs_takes_acls(0xef53, none), "ext4");
        assert!(fs_takes_acls(0x0102_1994, none), "tmpfs");
        assert!(!fs_takes_acls(0xe0f5_e1e2, none), "erofs");
        assert!(!fs_takes_acls(0x7371_7368, none), "squashfs");
        assert!(!fs_takes_acls(0x482b, none), "hfsplus");
        assert!(fs_takes_acls(0x6969, || Some("nfs".into())), "NFS 3");
        assert!(!fs_takes_acls(0x6969, || Some("nfs4".into())), "NFS 4");
        assert!(fs_takes_acls(0x6969, none), "NFS, version unknown");
    }

    fn acl(entries: &[(u16, u16, u32)]) -> Vec<u8> {
        let mut v = VERSION.to_le_bytes().to_vec();
        for &(tag, perm, id) in entries {
            v.extend_from_slice(&tag.to_le_bytes());
            v.extend_from_slice(&perm.to_le_bytes());
            v.extend_from_slice(&id.to_le_bytes());
        }
        v
    }

    #[test]
    fn minimal_default_acl_only_masks_the_mode() {
        let d = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 0, 0)]);
        assert_eq!(inherit(&d, 0o666), Some((0o640, None)));
        assert_eq!(inherit(&d, 0o777), Some((0o750, None)));
    }

    #[test]
    fn named_entries_give_an_access_acl_masked_by_the_mode() {
        let d = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        let (mode, access) = inherit(&d, 0o644).unwrap();
        assert_eq!(mode, 0o644);
        let want = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 4, 0),
            (OTHER, 4, 0),
        ]);
        assert_eq!(access, Some(want));
    }

    #[test]
    fn an_access_acl_gives_its_mode() {
        let minimal = acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)]);
        assert_eq!(access_mode(&minimal), Some((0o644, true)));
        let named = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 3, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(access_mode(&named), Some((0o730, false)));
        // A mask alone makes an ACL the bits cannot express.
        let masked = acl(&[
            (USER_OBJ, 7, 0),
            (GROUP_OBJ, 7, 0),
            (MASK, 5, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(access_mode(&masked), Some((0o750, false)));
    }

    #[test]
    fn access_acls_the_kernel_refuses_are_refused() {
        let bad: [&[(u16, u16, u32)]; 6] = [
            &[(USER_OBJ, 6, 0), (OTHER, 4, 0)],
            &[(GROUP_OBJ, 4, 0), (USER_OBJ, 6, 0), (OTHER, 4, 0)],
            &[
                (USER_OBJ, 6, 0),
                (USER_OBJ, 6, 0),
                (GROUP_OBJ, 4, 0),
                (OTHER, 4, 0),
            ],
            &[
                (USER_OBJ, 6, 0),
                (USER, 6, 7),
                (GROUP_OBJ, 4, 0),
                (OTHER, 4, 0),
            ],
            &[(USER_OBJ, 8, 0), (GROUP_OBJ, 4, 0), (OTHER, 4, 0)],
            &[
                (USER_OBJ, 6, 0),
                (GROUP_OBJ, 4, 0),
                (OTHER, 4, 0),
                (0x40, 4, 0),
            ],
        ];
        for entries in bad {
            assert_eq!(access_mode(&acl(entries)), None, "{entries:?}");
        }
        assert_eq!(access_mode(&[2, 0, 0, 0, 1]), None);
        assert_eq!(access_mode(&[]), None);
    }

    #[test]
    fn a_mode_goes_into_the_owner_mask_and_other_entries() {
        let mut a = acl(&[
            (USER_OBJ, 7, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 7, 0),
            (OTHER, 5, 0),
        ]);
        set_mode(&mut a, 0o640);
        let want = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 7, 1000),
            (GROUP_OBJ, 5, 0),
            (MASK, 4, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(a, want);
        let mut m = acl(&[(USER_OBJ, 7, 0), (GROUP_OBJ, 5, 0), (OTHER, 5, 0)]);
        set_mode(&mut m, 0o604);
        assert_eq!(
            m,
            acl(&[(USER_OBJ, 6, 0), (GROUP_OBJ, 0, 0), (OTHER, 4, 0)])
        );
    }

    #[test]
    fn named_entries_ids_are_translated() {
        let mut a = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 4, 1000),
            (GROUP_OBJ, 4, 0),
            (GROUP, 5, 50),
            (MASK, 5, 0),
            (OTHER, 0, 0),
        ]);
        let plus = |d: u32| move |id: u32| Some(id + d);
        assert!(map_ids(&mut a, plus(1), plus(2)));
        let want = acl(&[
            (USER_OBJ, 6, 0),
            (USER, 4, 1001),
            (GROUP_OBJ, 4, 0),
            (GROUP, 5, 52),
            (MASK, 5, 0),
            (OTHER, 0, 0),
        ]);
        assert_eq!(a, want);
        assert!(!map_ids(&mut a, |_| None, plus(0)), "an unmapped user");
        assert!(
            !map_ids(&mut [2, 0, 0, 0, 1], plus(0), plus(0)),
            "malformed"
        );
    }

    #[test]
    fn malformed_values_are_refused() {
        assert_eq!(inherit(&[2, 0, 0, 0, 1], 0o644), None);
        assert_eq!(inherit(&acl(&[(0x40, 7, 0)]), 0o644), None);
        assert_eq!(
            inherit(&acl(&[(USER_OBJ, 7, 0), (OTHER, 7, 0)]), 0o644),
            None
        );
    }
}
