//! Differential test against kernel overlayfs.
//!
//! For each seed, 2-3 lower layers are generated (shadowed files, merged and opaque directories,
//! whiteouts, hard links, symlinks, FIFOs, devices, `user.*` xattrs, POSIX ACLs (access and
//! default, with named entries for the callers' ids), explicit times, assorted modes and
//! owners). Kernel overlayfs and unionmount are mounted over the same lowers, each with
//! its own upper and work directory, and one random sequence of operations (paths drawn from a
//! small name pool so that they collide) is applied to both; a quarter of the operations are
//! made by an unprivileged caller (uid and gid 1000 or 1001, the generated objects' other
//! owners, sometimes with the other group as a supplementary one) instead of root, and about
//! one in seven is an operation on a file kept open across the others (pwrite, ftruncate,
//! fallocate, fchmod, fstat; one of the slots opens `O_APPEND`) or on an object held by an `O_PATH` descriptor (fstat, getxattr
//! through `/proc`), kept across renames and deletions of its names. After every step the results (value or errno) and the whole
//! merged trees are compared; after the sequence both are unmounted, the two uppers are
//! compared on disk, and both are mounted again and compared once more. A divergence is shrunk (delta debugging
//! on the operation list, replayed on fresh layers and mounts) and reported with the seed, the
//! step and the reduced operation list.
//!
//! `differential_rootless_against_kernel_overlayfs` runs the same seeds again with both sides
//! mounted by the root of a user namespace made by an unprivileged user (ids 0-65535 mapped),
//! as a rootless container engine mounts them: unionmount on the page-cached path writing the
//! `userxattr` format, kernel overlayfs with `-o userxattr`. There the lowers' opaque
//! directories carry `user.overlay.opaque`, and FIFOs stand where the root run makes device
//! nodes (which need CAP_MKNOD in the initial namespace; a generated mknod of a device fails
//! with EPERM on both sides).
//!
//! What is compared per entry: type, mode, owner, size and link count of non-directories,
//! content, symlink target, device number, the sorted `user.*` xattrs and ACLs, which paths
//! share an inode, mtime of entries whose times are known to be the same on both sides (they
//! come from the shared lowers or from an explicit `utimensat`, and nothing has changed them
//! since), and atime of such entries except directories (contents are read with `O_NOATIME`).
//! On unionmount, `d_ino`/`d_type` from readdir must match `lstat`. Not compared: inode
//! numbers, ctime, the size and link count of directories. In the uppers, of the private xattrs only the opaque one is
//! compared (the kernel's origin/impure/... are not), and whiteouts' link counts are not (the
//! kernel links all its whiteouts to one inode).
//!
//! Rules by name, where the two are known to differ and the test checks around it:
//! - "char 0/0" (deliberate): unionmount lets a character device 0/0 be created (stored as
//!   0:1048575), the kernel refuses it; the generator only makes devices with a non-zero major
//!   number, and `deliberate_differences` checks unionmount's side.
//! - "private names" (deliberate): `.wh.*` names are refused by unionmount, the kernel allows
//!   them; the name pool holds none, and `deliberate_differences` checks unionmount's side.
//! - "same file" (deliberate): the names of a lower hard link are one inode in unionmount, so
//!   a rename or exchange between two of them does nothing, as rename(2) says; the kernel
//!   gives each name an inode of its own, copies both up and renames (a plain rename removes
//!   the old name). The generator never renames between two names of one file, and
//!   `deliberate_differences` checks unionmount's side.
//! - "directory nlink" (deliberate): merged directories report their real link count.
//! - "deleted file not held" (deliberate): an upper file or symlink removed with its last
//!   link (unlink, or replaced by a rename) is not kept by unionmount, only its attributes
//!   (README); what holds it (an `O_PATH` descriptor) gets ENOENT for its xattrs, where the
//!   kernel's side shows a regular file or symlink with no links.
//! - "whiteout in an unmerged directory" (kernel): the kernel lists a lower whiteout in readdir
//!   when its directory comes from one layer only; lowers get whiteouts only in merged
//!   directories.
//! - "opaque without effect" (kernel): the kernel marks a directory opaque before renaming it
//!   into a merged directory, also where nothing lies below and when the rename then fails;
//!   the opaque xattr is compared only where a lower has a directory.
//! - "failed rename" (kernel): a rename that fails late may have changed the directories'
//!   mtimes in the kernel's upper; their times are no longer compared.
//! - "unstable st_ino" (kernel, `userxattr`, or lowers on other filesystems, as in the
//!   squashfs and erofs runs): two names of one copied-up file can show two inode numbers
//!   on the kernel's side, so in those runs the kernel's hard-link groups are read from the
//!   layers' files instead (`regroup_by_real_files`).
//! - "protection checked late" (FUSE): where the kernel's side shows an append-only or
//!   immutable flag on a path a request names, its parent or the open file it uses, a
//!   request the kernel refuses with EPERM for it may get EACCES, ENOTDIR or EISDIR from
//!   unionmount instead: the FUSE kernel checks permissions and types on its own inode, which
//!   carries no flags, before unionmount sees the request, while the VFS checks the flags of an
//!   overlayfs inode first (README, known limitations). For the same reason removing a
//!   default ACL from a non-directory succeeds without asking unionmount (the VFS's answer
//!   for a non-directory, which has none).
//! - "split size" (passthrough): the file open in the read-only slot keeps the size of the
//!   lower file it reads once a copy-up moved its name (README); where the `O_PATH` slot holds
//!   that file, its fstat may differ from the kernel's in the size alone.
//! - "split names" (passthrough): a file opened read-only from a lower layer before a copy-up
//!   is served from the lower file by a node of its own, and its names move to a new node
//!   (a new inode number, README) when the file is next opened; a snapshot taken meanwhile
//!   may see one name of a hard link made since before the move and another after. The
//!   generator makes no hard link to the file open in the read-only slot (a create instead).
//! - "split inode" (kernel, `userxattr`, or lowers on other filesystems): with no file handle
//!   in the origin xattr, a name of a copied-up file that is looked up afresh gets an inode of
//!   its own, apart from the one the copy-up made, and each keeps its own cached mode; the
//!   kernel then decides set-ID drops and permissions on a stale mode (a root's chown of a
//!   mode-2755 file kept its set-group-ID bit through a second name, after a chmod through
//!   the first; an open for writing through one name passed after a chmod to 0444 through
//!   the other). Those runs make no hard links through the mount (they create a file
//!   instead); the lowers still hold hard links.
//!
//! CI runs a fixed set of seeds. The long form is one command:
//!
//! ```text
//! UNIONMOUNT_DIFF_SEEDS=1-100 UNIONMOUNT_DIFF_STEPS=100 cargo test --release --test differential -- --nocapture
//! ```
//!
//! `UNIONMOUNT_DIFF_SEEDS` takes ranges and lists (`1-100`, `7,9,20-30`; default `1-10`),
//! `UNIONMOUNT_DIFF_STEPS` the operations per seed (default 150). `UNIONMOUNT_TEST_ARGS`
//! (e.g. `--passthrough off`) adds daemon options, as for every integration test.
//! Two more runs put every lower layer on a squashfs (needs `mksquashfs`) and on an erofs
//! (needs `mkfs.erofs`) of its own.

mod common;

use common::{FS_APPEND_FL, FS_IMMUTABLE_FL, Layers, Mount, Rng, kind_of, parse_seeds};
use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirEntryExt, FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};

// ---------------------------------------------------------------------------------------------
// Root or rootless

/// Set in the process that runs the comparison inside a user namespace: both sides are then
/// mounted as that namespace's root, kernel overlayfs with `userxattr`.
static ROOTLESS: AtomicBool = AtomicBool::new(false);

/// Tells the test binary, run again inside the user namespace, that it is there.
const IN_USERNS: &str = "UNIONMOUNT_DIFF_IN_USERNS";

/// Set in the process that runs the comparison with unionmount keeping owners and modes in
/// an xattr (`xattr_permissions=2`).
static OVERRIDE: AtomicBool = AtomicBool::new(false);

/// Tells the test binary, run again for the comparison with `xattr_permissions=2`, to run it.
const IN_OVERRIDE: &str = "UNIONMOUNT_DIFF_WITH_OVERRIDE";

/// unionmount's options for this process's comparison.
fn union_options() -> &'static [&'static str] {
    if OVERRIDE.load(Ordering::Relaxed) {
        &["-o", "xattr_permissions=2"]
    } else {
        &[]
    }
}

/// Set in the process that runs the comparison with every lower layer in an image of its own
/// (see `pack_lowers`): the image's filesystem.
static PACKED: std::sync::OnceLock<Image> = std::sync::OnceLock::new();

/// Tells the test binary, run again for the comparison with packed lowers, to run it (with
/// the filesystem's name as its value).
const IN_IMAGES: &str = "UNIONMOUNT_DIFF_IN_IMAGES";

/// A read-only image filesystem the lowers can be packed into.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Image {
    /// No POSIX ACLs, no fsync.
    Squashfs,
    /// ACLs held but not settable, no fsync.
    Erofs,
}

impl Image {
    fn name(self) -> &'static str {
        match self {
            Image::Squashfs => "squashfs",
            Image::Erofs => "erofs",
        }
    }
}

/// What marks a directory opaque in the layers: the `trusted` xattr as root, the `user` one
/// (overlayfs's `userxattr` format) in a user namespace, where `trusted.*` is out of reach.
fn opaque_xattr() -> &'static str {
    if ROOTLESS.load(Ordering::Relaxed) {
        "user.overlay.opaque"
    } else {
        "trusted.overlay.opaque"
    }
}

/// Kernel overlayfs's options besides the layers.
fn kernel_options() -> &'static [&'static str] {
    if ROOTLESS.load(Ordering::Relaxed) {
        &["userxattr"]
    } else {
        &[]
    }
}

// ---------------------------------------------------------------------------------------------
// Randomness

/// The generator for a seed (offset so that seed 0 is not the all-zero state).
fn seeded(seed: u64) -> Rng {
    Rng(seed ^ 0x005e_ed0f_d1ff)
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];
const XATTRS: [&str; 3] = ["user.x", "user.y", "user.z"];
const ACL_PREFIX: &str = "system.posix_acl_";
const ACLS: [&str; 2] = ["system.posix_acl_access", "system.posix_acl_default"];
const ACL_DEFAULT: &str = "system.posix_acl_default";
const OWNERS: [u32; 3] = [0, 1000, 1001];
const FILE_MODES: [u32; 9] = [
    0o644, 0o600, 0o755, 0o700, 0o444, 0o4755, 0o2755, 0o1777, 0o000,
];
const DIR_MODES: [u32; 6] = [0o755, 0o700, 0o777, 0o1777, 0o2755, 0o2777];
/// Devices the generator may make: never 0/0 (rule "char 0/0"). They are never opened.
const DEVICES: [(char, u32, u32); 3] = [('c', 1, 3), ('c', 1, 5), ('c', 4, 64)];

/// A path of depth 1-3 from the name pool.
fn pool_path(rng: &mut Rng) -> String {
    let depth = match rng.below(10) {
        0..=3 => 1,
        4..=7 => 2,
        _ => 3,
    };
    (0..depth)
        .map(|_| *rng.pick(&NAMES))
        .collect::<Vec<_>>()
        .join("/")
}

fn parent(p: &str) -> &str {
    p.rfind('/').map_or("", |i| &p[..i])
}

// ---------------------------------------------------------------------------------------------
// Lower layers

/// Builds the lower layers for `seed` (the same seed always gives the same layers).
fn build_lowers(seed: u64) -> Layers {
    let mut rng = seeded(seed.wrapping_mul(31).wrapping_add(7));
    let n = 2 + rng.below(2) as usize;
    let layers = Layers::new(n);
    // Bottom-up, so that a layer knows the one below it.
    let mut below: BTreeMap<String, char> = BTreeMap::new();
    for i in (0..n).rev() {
        let l = layers.lower(i);
        let bottom = i == n - 1;
        // What this layer holds: path -> kind ('o' for an opaque directory).
        let mut have: BTreeMap<String, char> = BTreeMap::new();
        let count = 6 + rng.below(8);
        for _ in 0..count {
            let p = pool_path(&mut rng);
            if have.contains_key(&p) {
                continue;
            }
            // Parents must be (or become) directories of this layer.
            let mut ok = true;
            let mut anc = String::new();
            for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !anc.is_empty() {
                    anc.push('/');
                }
                anc.push_str(comp);
                match have.get(&anc) {
                    Some('d' | 'o') | None => {}
                    Some(_) => ok = false,
                }
            }
            if !ok {
                continue;
            }
            let mut a = String::new();
            for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                if !a.is_empty() {
                    a.push('/');
                }
                a.push_str(comp);
                have.entry(a.clone()).or_insert('d');
            }
            let files: Vec<String> = have
                .iter()
                .filter(|(_, k)| **k == 'f')
                .map(|(p, _)| p.clone())
                .collect();
            if !parent(&p).is_empty() {
                l.dir(parent(&p));
            }
            // Rule "whiteout in an unmerged directory": the kernel lists such a whiteout in
            // readdir (it does not filter directories that come from one layer) while lookup
            // hides it. Whiteouts only go where every ancestor merges with the layer below.
            let merged_parent = !bottom && {
                let mut a = String::new();
                let mut ok = true;
                for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
                    if !a.is_empty() {
                        a.push('/');
                    }
                    a.push_str(comp);
                    ok &= have.get(&a) == Some(&'d') && matches!(below.get(&a), Some('d' | 'o'));
                }
                ok
            };
            let kind = match rng.below(100) {
                78..=89 if !merged_parent => 'f',
                0..=29 => 'f',
                30..=49 => 'd',
                50..=59 => 'l',
                60..=69 if !files.is_empty() => 'h',
                70..=74 => 'p',
                75..=77 => 'c',
                78..=89 => 'w',
                _ => 'f',
            };
            match kind {
                'f' => {
                    let len = if rng.percent(10) {
                        5000 + rng.below(3000)
                    } else {
                        rng.below(40)
                    };
                    let byte = b'a' + rng.below(26) as u8;
                    l.file_bytes(&p, &vec![byte; len as usize]);
                }
                'd' => {
                    if !bottom && rng.percent(35) {
                        l.opaque_xattr(&p, opaque_xattr());
                        have.insert(p.clone(), 'o');
                    } else {
                        l.dir(&p);
                    }
                }
                'l' => {
                    l.symlink(&p, &pool_path(&mut rng));
                }
                'h' => {
                    let src: &String = rng.pick(&files);
                    l.hardlink(src, &p);
                }
                'p' => {
                    l.fifo(&p);
                }
                'c' if ROOTLESS.load(Ordering::Relaxed) => {
                    // A device node needs CAP_MKNOD in the initial user namespace.
                    rng.pick(&DEVICES);
                    l.fifo(&p);
                }
                'c' => {
                    let (k, ma, mi) = *rng.pick(&DEVICES);
                    let t = if k == 'c' {
                        libc::S_IFCHR
                    } else {
                        libc::S_IFBLK
                    };
                    common::mknod(&l.path(&p), t | 0o640, libc::makedev(ma, mi));
                }
                _ => {
                    l.whiteout(&p);
                }
            }
            let kind = if kind == 'h' { 'f' } else { kind };
            have.entry(p.clone()).or_insert(kind);
            if kind == 'w' {
                continue;
            }
            if kind != 'l' && rng.percent(40) {
                let modes: &[u32] = if kind == 'd' { &DIR_MODES } else { &FILE_MODES };
                l.chmod(&p, *rng.pick(modes));
            }
            if rng.percent(30) {
                l.chown(&p, *rng.pick(&OWNERS), *rng.pick(&OWNERS));
            }
            if matches!(kind, 'f' | 'd') && rng.percent(30) {
                let name = *rng.pick(&XATTRS);
                l.xattr(&p, name, format!("v{}", rng.below(100)).as_bytes());
            }
            if matches!(kind, 'f' | 'd') && rng.percent(15) {
                l.xattr(&p, ACLS[0], &gen_acl(&mut rng));
            }
            if kind == 'd' && rng.percent(20) {
                l.xattr(&p, ACLS[1], &gen_acl(&mut rng));
            }
            if rng.percent(50) {
                let t = 1_000_000_000 + rng.below(100_000_000) as i64;
                l.times(&p, t, t + rng.below(1000) as i64);
            }
        }
        // One seed in eight gives a bottom file many names (more than a node keeps in a plain
        // list), spread over the layer's directories, without drawing from `rng`.
        if bottom && seed % 8 == 5 {
            let src = have
                .iter()
                .find(|(_, k)| **k == 'f')
                .map(|(p, _)| p.clone());
            let dirs: Vec<String> = std::iter::once(String::new())
                .chain(
                    have.iter()
                        .filter(|(_, k)| matches!(**k, 'd' | 'o'))
                        .map(|(p, _)| p.clone()),
                )
                .collect();
            for i in 0..40 {
                let Some(src) = &src else { break };
                let p = match &dirs[i % dirs.len()] {
                    d if d.is_empty() => format!("many{i}"),
                    d => format!("{d}/many{i}"),
                };
                l.hardlink(src, &p);
                have.insert(p, 'f');
            }
        }
        below = have.clone();
        // Directory times last: filling a directory changed them.
        for (p, k) in have.iter().rev() {
            if matches!(*k, 'd' | 'o') && rng.percent(50) {
                let t = 1_100_000_000 + rng.below(100_000_000) as i64;
                l.times(p, t, t);
            }
        }
    }
    layers
}

// ---------------------------------------------------------------------------------------------
// Operations

#[derive(Clone, Debug, PartialEq)]
enum Op {
    Create(String, u32),
    /// path, offset, length, byte, open with O_TRUNC
    Write(String, u64, u64, u8, bool),
    Truncate(String, u64),
    Chmod(String, u32),
    /// path, uid, gid, follow the last symlink
    Chown(String, u32, u32, bool),
    /// path, atime (s, ns), mtime (s, ns) (both `UTIME_NOW` or neither); never follows the
    /// last symlink
    Utimens(String, (i64, i64), (i64, i64)),
    Link(String, String),
    Symlink(String, String),
    Mkdir(String, u32),
    Rmdir(String),
    Unlink(String),
    Rename(String, String, u32),
    SetXattr(String, String, Vec<u8>),
    RemoveXattr(String, String),
    /// path, 'p' / 'c' / 'b', mode bits, major, minor
    Mknod(String, char, u32, u32, u32),
    /// Sets a regular file's or directory's append-only and immutable flags to exactly
    /// these (FS_APPEND_FL, FS_IMMUTABLE_FL), keeping its other inode flags; answers the two
    /// it had.
    Chattr(String, u32),
    /// An operation made by an unprivileged caller instead of root.
    As(Caller, Box<Op>),
    /// Opens a regular file read-write into one of the `SLOTS` (closing what it held) and
    /// keeps it open across the operations that follow.
    Open(usize, String),
    /// slot, offset, length, byte
    FdWrite(usize, u64, u64, u8),
    FdTruncate(usize, u64),
    /// slot, mode (0, `FALLOC_FL_KEEP_SIZE` or a hole punched), offset, length
    FdFallocate(usize, i32, u64, u64),
    FdChmod(usize, u32),
    /// slot, name, value
    FdSetXattr(usize, String, Vec<u8>),
    /// fstat of the slot's file: its size and link count.
    FdStat(usize),
    /// The first 64 KiB of the slot's file, read through it: the length and a hash.
    FdRead(usize),
    Close(usize),
    /// Opens a path `O_PATH | O_NOFOLLOW` into `PATH_SLOT` (closing what it held): anything
    /// but a file the daemon opens, held across the operations that follow, as a working
    /// directory or a container runtime's descriptor is.
    Hold(String),
    /// fstat of the held object: type, mode, owner, group and (but for directories) size.
    HeldStat,
    /// getxattr of the held object, through `/proc/self/fd`: the length and a hash.
    HeldGetXattr(String),
}

/// How many files an operation sequence can keep open at once.
const SLOTS: usize = 3;

/// The slot `Op::Hold` fills, beside the `SLOTS` of open files.
const PATH_SLOT: usize = SLOTS;

/// The slot whose files are opened read-only (`O_NOATIME`, so reads leave the times alone):
/// a reader from before a copy-up, rename or unlink of its file.
const RO_SLOT: usize = 2;

/// The slot whose files are opened `O_APPEND` (every write lands at the end, whatever its
/// offset), as logs and shell `>>` redirections are.
const APPEND_SLOT: usize = 1;

/// Whether the mount under test serves open files by passthrough: root, and not turned off.
fn passthrough() -> bool {
    let args = std::env::var("UNIONMOUNT_TEST_ARGS").unwrap_or_default();
    !ROOTLESS.load(Ordering::Relaxed)
        && !args.contains("--passthrough off")
        && !args.contains("--passthrough=off")
}

/// The files one side keeps open, closed when dropped (before its mount is unmounted).
#[derive(Default)]
struct Fds([Option<OwnedFd>; SLOTS + 1]);

impl Fds {
    fn raw(&self, slot: usize) -> Result<i32, i32> {
        self.0[slot]
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or(libc::EBADF)
    }
}

/// An unprivileged caller: its user, group and one supplementary group, if any. Its thread
/// takes these ids, and so loses every capability, for the one operation.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Caller {
    uid: u32,
    gid: u32,
    also: Option<u32>,
}

impl Op {
    /// The operation itself, whoever makes it.
    fn inner(&self) -> &Op {
        match self {
            Op::As(_, op) => op.inner(),
            op => op,
        }
    }
}

/// The paths an operation names (none for those on open files).
fn op_paths(op: &Op) -> Vec<&String> {
    match op.inner() {
        Op::Link(a, b) | Op::Rename(a, b, _) => vec![a, b],
        Op::Symlink(_, p)
        | Op::Create(p, _)
        | Op::Write(p, ..)
        | Op::Truncate(p, _)
        | Op::Chmod(p, _)
        | Op::Chown(p, ..)
        | Op::Utimens(p, ..)
        | Op::Mkdir(p, _)
        | Op::Rmdir(p)
        | Op::Unlink(p)
        | Op::SetXattr(p, ..)
        | Op::RemoveXattr(p, _)
        | Op::Mknod(p, ..)
        | Op::Chattr(p, _)
        | Op::Open(_, p)
        | Op::Hold(p) => vec![p],
        _ => Vec::new(),
    }
}

/// Whether `rel` below `root` is the file open in the read-only slot of `fds`.
fn is_open_file(root: &Path, rel: &str, fds: &Fds) -> bool {
    let Ok(fd) = fds.raw(RO_SLOT) else {
        return false;
    };
    let path = CString::new(root.join(rel).as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscalls on an open fd, a NUL-terminated path and valid out-pointers.
    unsafe {
        let (mut a, mut b): (libc::stat, libc::stat) = (std::mem::zeroed(), std::mem::zeroed());
        libc::fstat(fd, &mut a) == 0
            && libc::stat(path.as_ptr(), &mut b) == 0
            && (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)
    }
}

/// Whether two slots of `fds` hold one file.
fn slots_hold_one_file(fds: &Fds, a: usize, b: usize) -> bool {
    let id = |slot| {
        let fd = fds.raw(slot).ok()?;
        // SAFETY: plain syscall on an open fd and a valid out-pointer.
        unsafe {
            let mut st: libc::stat = std::mem::zeroed();
            (libc::fstat(fd, &mut st) == 0).then_some((st.st_dev, st.st_ino))
        }
    };
    id(a).is_some_and(|x| id(b) == Some(x))
}

/// Whether `fd` is a regular file or symlink with no name left.
fn is_deleted_file(fd: i32) -> bool {
    // SAFETY: plain syscall on an open fd and a valid out-pointer.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        libc::fstat(fd, &mut st) == 0
            && matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFLNK)
            && st.st_nlink == 0
    }
}

/// The slot of the open file an operation works on.
fn op_slot(op: &Op) -> Option<usize> {
    match op.inner() {
        Op::FdWrite(i, ..)
        | Op::FdTruncate(i, _)
        | Op::FdFallocate(i, ..)
        | Op::FdChmod(i, _)
        | Op::FdSetXattr(i, ..)
        | Op::FdStat(i)
        | Op::FdRead(i) => Some(*i),
        _ => None,
    }
}

/// Whether `rel` below `root` (the root itself for an empty path), or what a symlink there
/// leads to, is a regular file or directory with an append-only or immutable flag.
fn protected_path(root: &Path, rel: &str) -> bool {
    let path = CString::new(root.join(rel).as_os_str().as_bytes()).unwrap();
    // SAFETY: plain syscalls on a NUL-terminated path and a valid out-pointer; the fd opened
    // is owned by the OwnedFd.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        if libc::stat(path.as_ptr(), &mut st) != 0
            || !matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR)
        {
            return false;
        }
        let fd = libc::open(
            path.as_ptr(),
            libc::O_RDONLY | libc::O_NONBLOCK | libc::O_CLOEXEC,
        );
        fd >= 0 && protected_fd(OwnedFd::from_raw_fd(fd).as_raw_fd())
    }
}

/// Whether the file open as `fd` has an append-only or immutable flag.
fn protected_fd(fd: i32) -> bool {
    let mut flags: libc::c_int = 0;
    // SAFETY: an open fd and the int the ioctl writes.
    let rc = unsafe { libc::ioctl(fd, libc::FS_IOC_GETFLAGS, &mut flags) };
    rc == 0 && flags as u32 & (FS_APPEND_FL | FS_IMMUTABLE_FL) != 0
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Create(p, m) => write!(f, "open({p:?}, O_CREAT|O_EXCL|O_WRONLY, {m:#o})"),
            Op::Write(p, o, l, b, trunc) => {
                let how = if *trunc {
                    "O_WRONLY|O_TRUNC"
                } else {
                    "O_WRONLY"
                };
                write!(
                    f,
                    "open({p:?}, {how}) and pwrite({l} x {:?}, offset {o})",
                    *b as char
                )
            }
            Op::Truncate(p, l) => write!(f, "truncate({p:?}, {l})"),
            Op::Chmod(p, m) => write!(f, "chmod({p:?}, {m:#o})"),
            Op::Chown(p, u, g, follow) => write!(
                f,
                "{}chown({p:?}, {}, {})",
                if *follow { "" } else { "l" },
                *u as i32,
                *g as i32
            ),
            Op::Utimens(p, (_, libc::UTIME_NOW), _) => {
                write!(f, "utimensat({p:?}, now, now, AT_SYMLINK_NOFOLLOW)")
            }
            Op::Utimens(p, a, m) => write!(
                f,
                "utimensat({p:?}, atime {}.{:09}, mtime {}.{:09}, AT_SYMLINK_NOFOLLOW)",
                a.0, a.1, m.0, m.1
            ),
            Op::Link(a, b) => write!(f, "link({a:?}, {b:?})"),
            Op::Symlink(t, p) => write!(f, "symlink({t:?}, {p:?})"),
            Op::Mkdir(p, m) => write!(f, "mkdir({p:?}, {m:#o})"),
            Op::Rmdir(p) => write!(f, "rmdir({p:?})"),
            Op::Unlink(p) => write!(f, "unlink({p:?})"),
            Op::Rename(a, b, fl) => {
                let name = match *fl {
                    0 => "0",
                    libc::RENAME_NOREPLACE => "RENAME_NOREPLACE",
                    libc::RENAME_EXCHANGE => "RENAME_EXCHANGE",
                    _ => "?",
                };
                write!(f, "renameat2({a:?}, {b:?}, {name})")
            }
            Op::SetXattr(p, n, v) if n.starts_with(ACL_PREFIX) => {
                write!(f, "lsetxattr({p:?}, {n:?}, {})", acl_text(v))
            }
            Op::SetXattr(p, n, v) => {
                write!(
                    f,
                    "lsetxattr({p:?}, {n:?}, {:?})",
                    String::from_utf8_lossy(v)
                )
            }
            Op::RemoveXattr(p, n) => write!(f, "lremovexattr({p:?}, {n:?})"),
            Op::Mknod(p, k, m, ma, mi) => write!(f, "mknod({p:?}, S_IF{k} | {m:#o}, {ma}:{mi})"),
            Op::Chattr(p, fl) => {
                let a = if fl & FS_APPEND_FL != 0 { "a" } else { "" };
                let i = if fl & FS_IMMUTABLE_FL != 0 { "i" } else { "" };
                write!(f, "chattr ={a}{i} {p:?} (answers the flags it had)")
            }
            Op::Open(i, p) if *i == RO_SLOT => {
                write!(f, "fd{i} = open({p:?}, O_RDONLY | O_NOATIME)")
            }
            Op::Open(i, p) if *i == APPEND_SLOT => {
                write!(f, "fd{i} = open({p:?}, O_RDWR | O_APPEND)")
            }
            Op::Open(i, p) => write!(f, "fd{i} = open({p:?}, O_RDWR)"),
            Op::FdWrite(i, o, l, b) => {
                write!(f, "pwrite(fd{i}, {l} x {:?}, offset {o})", *b as char)
            }
            Op::FdTruncate(i, l) => write!(f, "ftruncate(fd{i}, {l})"),
            Op::FdFallocate(i, m, o, l) => {
                let mode = match *m {
                    0 => "0",
                    libc::FALLOC_FL_KEEP_SIZE => "FALLOC_FL_KEEP_SIZE",
                    _ => "FALLOC_FL_PUNCH_HOLE|FALLOC_FL_KEEP_SIZE",
                };
                write!(f, "fallocate(fd{i}, {mode}, {o}, {l})")
            }
            Op::FdChmod(i, m) => write!(f, "fchmod(fd{i}, {m:#o})"),
            Op::FdSetXattr(i, n, v) => {
                write!(
                    f,
                    "fsetxattr(fd{i}, {n:?}, {:?})",
                    String::from_utf8_lossy(v)
                )
            }
            Op::FdStat(i) => write!(f, "fstat(fd{i}) (size << 8 | nlink)"),
            Op::FdRead(i) => write!(f, "pread(fd{i}, 64 KiB, 0) (length << 24 | hash)"),
            Op::Close(i) => write!(f, "close(fd{i})"),
            Op::Hold(p) => write!(f, "fd{PATH_SLOT} = open({p:?}, O_PATH | O_NOFOLLOW)"),
            Op::HeldStat => write!(
                f,
                "fstat(fd{PATH_SLOT}) (mode << 46 | uid << 35 | gid << 24 | size)"
            ),
            Op::HeldGetXattr(n) => write!(
                f,
                "getxattr(/proc/self/fd/{{fd{PATH_SLOT}}}, {n:?}) (length << 24 | hash)"
            ),
            Op::As(c, op) => {
                write!(f, "as {}:{}", c.uid, c.gid)?;
                if let Some(g) = c.also {
                    write!(f, " (also group {g})")?;
                }
                write!(f, ": {op}")
            }
        }
    }
}

fn cpath(root: &Path, rel: &str) -> CString {
    CString::new(root.join(rel).as_os_str().as_bytes()).unwrap()
}

type Res = Result<i64, i32>;

/// What a write reports, without trying, for an object that is not a regular file.
const NOT_REGULAR: i64 = -1;

fn check(r: i64) -> Res {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    } else {
        Ok(r)
    }
}

/// Opens `path` with `flags` if it is a regular file (None for another kind): a FIFO would
/// block, and device nodes are not written to (the FUSE mount is also `nodev`, the kernel one
/// is not).
fn open_regular(path: &CString, flags: i32) -> Result<Option<OwnedFd>, i32> {
    // SAFETY: plain syscalls on a NUL-terminated path and a valid stat buffer; the fd returned
    // by open is owned by nothing else.
    unsafe {
        let mut st: libc::stat = std::mem::zeroed();
        check(libc::stat(path.as_ptr(), &mut st) as i64)?;
        if st.st_mode & libc::S_IFMT != libc::S_IFREG {
            return Ok(None);
        }
        let fd =
            check(libc::open(path.as_ptr(), flags | libc::O_NONBLOCK | libc::O_CLOEXEC) as i64)?;
        Ok(Some(OwnedFd::from_raw_fd(fd as i32)))
    }
}

/// Applies `op` below `root`, returning the value or the errno (for an operation that needs
/// no open files).
fn apply(op: &Op, root: &Path) -> Res {
    apply_with(op, root, &mut Fds::default())
}

/// Applies `op` below `root` with the side's open files `fds`.
fn apply_with(op: &Op, root: &Path, fds: &mut Fds) -> Res {
    if let Op::As(caller, op) = op {
        return std::thread::scope(|s| {
            s.spawn(|| apply_as(*caller, op, root, fds)).join().unwrap()
        });
    }
    let c = |p: &str| cpath(root, p);
    // SAFETY (all blocks below): plain syscalls on NUL-terminated paths and valid buffers.
    unsafe {
        match op {
            Op::Create(p, m) => {
                let fd = check(libc::open(
                    c(p).as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    *m,
                ) as i64)?;
                check(libc::close(fd as i32) as i64)
            }
            Op::Write(p, off, len, b, trunc) => {
                let flags = libc::O_WRONLY | if *trunc { libc::O_TRUNC } else { 0 };
                let Some(fd) = open_regular(&c(p), flags)? else {
                    return Ok(NOT_REGULAR);
                };
                let buf = vec![*b; *len as usize];
                check(
                    libc::pwrite(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), *off as i64)
                        as i64,
                )
            }
            Op::Truncate(p, l) => check(libc::truncate(c(p).as_ptr(), *l as i64) as i64),
            Op::Chmod(p, m) => check(libc::chmod(c(p).as_ptr(), *m) as i64),
            Op::Chown(p, u, g, follow) => {
                let r = if *follow {
                    libc::chown(c(p).as_ptr(), *u, *g)
                } else {
                    libc::lchown(c(p).as_ptr(), *u, *g)
                };
                check(r as i64)
            }
            Op::Utimens(p, a, m) => {
                let ts = [
                    libc::timespec {
                        tv_sec: a.0,
                        tv_nsec: a.1,
                    },
                    libc::timespec {
                        tv_sec: m.0,
                        tv_nsec: m.1,
                    },
                ];
                check(libc::utimensat(
                    libc::AT_FDCWD,
                    c(p).as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                ) as i64)
            }
            Op::Link(a, b) => check(libc::link(c(a).as_ptr(), c(b).as_ptr()) as i64),
            Op::Symlink(t, p) => {
                let t = CString::new(t.as_str()).unwrap();
                check(libc::symlink(t.as_ptr(), c(p).as_ptr()) as i64)
            }
            Op::Mkdir(p, m) => check(libc::mkdir(c(p).as_ptr(), *m) as i64),
            Op::Rmdir(p) => check(libc::rmdir(c(p).as_ptr()) as i64),
            Op::Unlink(p) => check(libc::unlink(c(p).as_ptr()) as i64),
            Op::Rename(a, b, fl) => check(libc::renameat2(
                libc::AT_FDCWD,
                c(a).as_ptr(),
                libc::AT_FDCWD,
                c(b).as_ptr(),
                *fl,
            ) as i64),
            Op::SetXattr(p, n, v) => {
                let n = CString::new(n.as_str()).unwrap();
                check(
                    libc::lsetxattr(c(p).as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0)
                        as i64,
                )
            }
            Op::RemoveXattr(p, n) => {
                let n = CString::new(n.as_str()).unwrap();
                check(libc::lremovexattr(c(p).as_ptr(), n.as_ptr()) as i64)
            }
            Op::Mknod(p, k, m, ma, mi) => {
                let t = match k {
                    'p' => libc::S_IFIFO,
                    'c' => libc::S_IFCHR,
                    _ => libc::S_IFBLK,
                };
                check(libc::mknod(c(p).as_ptr(), t | *m, libc::makedev(*ma, *mi)) as i64)
            }
            Op::Chattr(p, flags) => {
                let path = c(p);
                let mut st: libc::stat = std::mem::zeroed();
                check(libc::lstat(path.as_ptr(), &mut st) as i64)?;
                if !matches!(st.st_mode & libc::S_IFMT, libc::S_IFREG | libc::S_IFDIR) {
                    return Ok(NOT_REGULAR);
                }
                let fd = check(libc::open(
                    path.as_ptr(),
                    libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                ) as i64)?;
                let fd = OwnedFd::from_raw_fd(fd as i32);
                let mut old: libc::c_int = 0;
                check(libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_GETFLAGS, &mut old) as i64)?;
                let protection = (FS_APPEND_FL | FS_IMMUTABLE_FL) as libc::c_int;
                let new = (old & !protection) | *flags as libc::c_int;
                check(libc::ioctl(fd.as_raw_fd(), libc::FS_IOC_SETFLAGS, &new) as i64)?;
                Ok(i64::from(old & protection))
            }
            Op::Open(i, p) => {
                fds.0[*i] = None;
                let flags = match *i {
                    RO_SLOT => libc::O_RDONLY | libc::O_NOATIME,
                    APPEND_SLOT => libc::O_RDWR | libc::O_APPEND,
                    _ => libc::O_RDWR,
                };
                let Some(fd) = open_regular(&c(p), flags)? else {
                    return Ok(NOT_REGULAR);
                };
                fds.0[*i] = Some(fd);
                Ok(0)
            }
            Op::FdWrite(i, off, len, b) => {
                let buf = vec![*b; *len as usize];
                check(
                    libc::pwrite(fds.raw(*i)?, buf.as_ptr().cast(), buf.len(), *off as i64) as i64,
                )
            }
            Op::FdTruncate(i, l) => check(libc::ftruncate(fds.raw(*i)?, *l as i64) as i64),
            Op::FdFallocate(i, m, o, l) => {
                check(libc::fallocate(fds.raw(*i)?, *m, *o as i64, *l as i64) as i64)
            }
            Op::FdChmod(i, m) => check(libc::fchmod(fds.raw(*i)?, *m) as i64),
            Op::FdSetXattr(i, n, v) => {
                let n = CString::new(n.as_str()).unwrap();
                check(
                    libc::fsetxattr(fds.raw(*i)?, n.as_ptr(), v.as_ptr().cast(), v.len(), 0) as i64,
                )
            }
            Op::FdStat(i) => {
                let mut st: libc::stat = std::mem::zeroed();
                check(libc::fstat(fds.raw(*i)?, &mut st) as i64)?;
                Ok(st.st_size << 8 | st.st_nlink.min(255) as i64)
            }
            Op::FdRead(i) => {
                let mut buf = vec![0u8; 64 << 10];
                let n =
                    check(libc::pread(fds.raw(*i)?, buf.as_mut_ptr().cast(), buf.len(), 0) as i64)?;
                Ok(n << 24 | (fnv(&buf[..n as usize]) & 0xff_ffff) as i64)
            }
            Op::Close(i) => {
                fds.raw(*i)?;
                fds.0[*i] = None;
                Ok(0)
            }
            Op::Hold(p) => {
                fds.0[PATH_SLOT] = None;
                let fd = check(libc::open(
                    c(p).as_ptr(),
                    libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                ) as i64)?;
                fds.0[PATH_SLOT] = Some(OwnedFd::from_raw_fd(fd as i32));
                Ok(0)
            }
            Op::HeldStat => {
                let mut st: libc::stat = std::mem::zeroed();
                check(libc::fstat(fds.raw(PATH_SLOT)?, &mut st) as i64)?;
                let size = if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    0
                } else {
                    st.st_size.min(0xff_ffff)
                };
                let id = |i: u32| i64::from(i.min(0x7ff));
                Ok(i64::from(st.st_mode) << 46 | id(st.st_uid) << 35 | id(st.st_gid) << 24 | size)
            }
            Op::HeldGetXattr(n) => {
                let path = CString::new(format!("/proc/self/fd/{}", fds.raw(PATH_SLOT)?)).unwrap();
                let n = CString::new(n.as_str()).unwrap();
                let mut buf = vec![0u8; 4096];
                let len = check(libc::getxattr(
                    path.as_ptr(),
                    n.as_ptr(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                ) as i64)?;
                Ok(len << 24 | (fnv(&buf[..len as usize]) & 0xff_ffff) as i64)
            }
            Op::As(..) => unreachable!("applied on a thread of the caller's above"),
        }
    }
}

/// Applies `op` as `caller` on a thread of its own, which drops root for good.
fn apply_as(caller: Caller, op: &Op, root: &Path, fds: &mut Fds) -> Res {
    let groups: Vec<libc::gid_t> = caller.also.into_iter().collect();
    // SAFETY: raw syscalls change the credentials of this thread only (the libc wrappers would
    // change every thread's); the buffer outlives the call.
    let ok = unsafe {
        libc::syscall(libc::SYS_setgroups, groups.len(), groups.as_ptr()) == 0
            && libc::syscall(libc::SYS_setresgid, caller.gid, caller.gid, caller.gid) == 0
            && libc::syscall(libc::SYS_setresuid, caller.uid, caller.uid, caller.uid) == 0
    };
    assert!(
        ok,
        "taking the ids of {caller:?}: {}",
        std::io::Error::last_os_error()
    );
    apply_with(op, root, fds)
}

/// An operation on the files kept open, in place of a generated one for about one in seven
/// (drawn from a generator of its own, like the callers).
fn gen_fd_op(rng: &mut Rng, snap: &Snap, op: Op) -> Op {
    if !rng.percent(15) {
        return op;
    }
    // Mostly the first slot, so that what was opened is mostly what the next operations use.
    let i = if rng.percent(75) {
        0
    } else {
        rng.below(SLOTS as u64) as usize
    };
    let op = match rng.below(17) {
        0..=3 => {
            let files: Vec<&String> = snap
                .entries
                .iter()
                .filter(|(_, e)| e.kind == 'f')
                .map(|(p, _)| p)
                .collect();
            if files.is_empty() || rng.percent(20) {
                Op::Open(i, some_path(rng, snap))
            } else {
                Op::Open(i, (*rng.pick(&files)).clone())
            }
        }
        4..=5 => {
            let off = if rng.percent(50) {
                rng.below(64)
            } else {
                rng.below(12_000)
            };
            Op::FdWrite(i, off, 1 + rng.below(3000), b'a' + rng.below(26) as u8)
        }
        6 => Op::FdTruncate(i, rng.below(9000)),
        7 if rng.percent(50) => Op::FdSetXattr(
            i,
            (*rng.pick(&XATTRS)).to_string(),
            format!("f{}", rng.below(1000)).into_bytes(),
        ),
        7 => Op::FdChmod(i, *rng.pick(&FILE_MODES)),
        8..=9 => Op::FdStat(i),
        13 => Op::FdRead(i),
        14 => Op::Hold(some_path(rng, snap)),
        15 => Op::HeldStat,
        16 => Op::HeldGetXattr((*rng.pick(&XATTRS)).to_string()),
        10 => {
            let mode = *rng.pick(&[
                0,
                libc::FALLOC_FL_KEEP_SIZE,
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            ]);
            Op::FdFallocate(i, mode, rng.below(12_000), 1 + rng.below(9000))
        }
        _ => Op::Close(i),
    };
    let op = match op {
        // Writes through the read-only slot would only fail alike: a read instead. Reads
        // only through it, whose `O_NOATIME` keeps the atime out of them: on the page-cached
        // path a read the kernel serves from its cache updates none (README).
        Op::FdWrite(RO_SLOT, ..)
        | Op::FdTruncate(RO_SLOT, _)
        | Op::FdFallocate(RO_SLOT, ..)
        | Op::FdRead(_) => Op::FdRead(RO_SLOT),
        // Rule "shared inode": names of a lower hard link share one inode in the view
        // (README, "Known limitations"), so a reader opened on one of them follows a copy-up
        // made through another. No reader is opened on a file with more than one name.
        Op::Open(RO_SLOT, p) if snap.entries.get(&p).is_some_and(|e| e.nlink > 1) => {
            Op::FdRead(RO_SLOT)
        }
        // The same for a held object: its stat would follow a copy-up through another name.
        Op::Hold(p)
            if snap
                .entries
                .get(&p)
                .is_some_and(|e| e.kind != 'd' && e.nlink > 1) =>
        {
            Op::HeldStat
        }
        op => op,
    };
    match op {
        // With passthrough, a reader from before a copy-up made by another open keeps the
        // lower file's data and size (README, "Open files and passthrough"): a change
        // through it instead, which reaches the copy as on kernel overlayfs.
        Op::FdRead(RO_SLOT) | Op::FdStat(RO_SLOT) if passthrough() => {
            Op::FdChmod(RO_SLOT, *rng.pick(&FILE_MODES))
        }
        op => op,
    }
}

/// The caller of a generated operation: root for most, an owner of the generated objects for
/// a quarter of them (drawn from a generator of its own, so that callers do not change which
/// operations a seed generates).
fn gen_caller(rng: &mut Rng, op: Op) -> Op {
    if !rng.percent(25) {
        return op;
    }
    let uid = *rng.pick(&OWNERS[1..]);
    let gid = *rng.pick(&OWNERS[1..]);
    let also = rng.percent(50).then(|| *rng.pick(&OWNERS[1..]));
    Op::As(Caller { uid, gid, also }, Box::new(op))
}

/// A path for an operation: usually one that exists (so that operations act on something),
/// sometimes any path of the pool.
fn some_path(rng: &mut Rng, snap: &Snap) -> String {
    if rng.percent(65) && snap.entries.len() > 1 {
        let keys: Vec<&String> = snap.entries.keys().filter(|k| !k.is_empty()).collect();
        (*rng.pick(&keys)).clone()
    } else {
        pool_path(rng)
    }
}

/// Whether `a` and `b` are two names of one non-directory.
fn same_file(snap: &Snap, a: &str, b: &str) -> bool {
    a != b
        && snap
            .group_of
            .get(a)
            .is_some_and(|g| g.iter().any(|p| p == b))
}

/// A path for a new name: usually a pool name inside an existing directory.
fn new_path(rng: &mut Rng, snap: &Snap) -> String {
    let dirs: Vec<&String> = snap
        .entries
        .iter()
        .filter(|(p, e)| e.kind == 'd' && p.matches('/').count() < 2)
        .map(|(p, _)| p)
        .collect();
    if rng.percent(60) && !dirs.is_empty() {
        let d = *rng.pick(&dirs);
        let name = *rng.pick(&NAMES);
        if d.is_empty() {
            name.to_string()
        } else {
            format!("{d}/{name}")
        }
    } else {
        some_path(rng, snap)
    }
}

/// A POSIX ACL as its xattr value (version 2, then tag, permissions and id per entry, in the
/// order the kernel requires): the owner, group and other entries, sometimes named entries for
/// the callers' ids with the mask they then need.
fn gen_acl(rng: &mut Rng) -> Vec<u8> {
    const ANY: u32 = u32::MAX;
    let mut entries: Vec<(u16, u16, u32)> = vec![(0x01, rng.below(8) as u16, ANY)];
    let named = |rng: &mut Rng, entries: &mut Vec<(u16, u16, u32)>, tag: u16| {
        for id in [1000, 1001] {
            if rng.percent(35) {
                entries.push((tag, rng.below(8) as u16, id));
            }
        }
    };
    named(rng, &mut entries, 0x02);
    entries.push((0x04, rng.below(8) as u16, ANY));
    named(rng, &mut entries, 0x08);
    if entries.len() > 2 {
        entries.push((0x10, rng.below(8) as u16, ANY));
    }
    entries.push((0x20, rng.below(8) as u16, ANY));
    let mut v = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        v.extend_from_slice(&tag.to_le_bytes());
        v.extend_from_slice(&perm.to_le_bytes());
        v.extend_from_slice(&id.to_le_bytes());
    }
    v
}

/// An ACL's xattr value in `getfacl`'s short form (`u::rw-,u:1000:r--,g::r--,m::r--,o::---`).
fn acl_text(v: &[u8]) -> String {
    let mut out = Vec::new();
    for e in v.get(4..).unwrap_or_default().chunks(8) {
        if e.len() < 8 {
            out.push("?".to_string());
            break;
        }
        let tag = u16::from_le_bytes([e[0], e[1]]);
        let perm = u16::from_le_bytes([e[2], e[3]]);
        let id = u32::from_le_bytes([e[4], e[5], e[6], e[7]]);
        let who = match tag {
            0x01 => "u:".to_string(),
            0x02 => format!("u:{id}"),
            0x04 => "g:".to_string(),
            0x08 => format!("g:{id}"),
            0x10 => "m:".to_string(),
            0x20 => "o:".to_string(),
            _ => format!("{tag:#x}:{id}"),
        };
        let bit = |b: u16, c: char| if perm & b != 0 { c } else { '-' };
        out.push(format!(
            "{who}:{}{}{}",
            bit(4, 'r'),
            bit(2, 'w'),
            bit(1, 'x')
        ));
    }
    out.join(",")
}

fn gen_op(rng: &mut Rng, snap: &Snap) -> Op {
    let which = rng.below(100);
    let creates = matches!(which, 0..=9 | 45..=63 | 96..=99);
    let p = if creates {
        new_path(rng, snap)
    } else {
        some_path(rng, snap)
    };
    match which {
        0..=9 => Op::Create(p, *rng.pick(&FILE_MODES)),
        10..=21 => {
            let off = match rng.below(4) {
                0 => 0,
                1 => rng.below(64),
                2 => 4096 + rng.below(8192),
                _ => rng.below(20_000),
            };
            let len = if rng.percent(20) {
                3000 + rng.below(6000)
            } else {
                1 + rng.below(50)
            };
            let byte = b'A' + rng.below(26) as u8;
            Op::Write(p, off, len, byte, rng.percent(15))
        }
        22..=26 => {
            let len = match rng.below(3) {
                0 => 0,
                1 => rng.below(100),
                _ => rng.below(12_000),
            };
            Op::Truncate(p, len)
        }
        27..=32 => {
            let m = if rng.percent(50) {
                *rng.pick(&FILE_MODES)
            } else {
                *rng.pick(&DIR_MODES)
            };
            Op::Chmod(p, m)
        }
        33..=37 => {
            // -1 leaves an id as it is (chown(f, -1, -1) still drops set-ID bits).
            let mut id = || {
                if rng.percent(15) {
                    u32::MAX
                } else {
                    *rng.pick(&OWNERS)
                }
            };
            let (uid, gid) = (id(), id());
            Op::Chown(p, uid, gid, rng.percent(50))
        }
        38..=44 => {
            if rng.percent(20) {
                // Set to the current time: allowed to whoever may write the file.
                let now = (0, libc::UTIME_NOW);
                return Op::Utimens(p, now, now);
            }
            let a = 1_200_000_000 + rng.below(100_000_000) as i64;
            let m = 1_200_000_000 + rng.below(100_000_000) as i64;
            Op::Utimens(
                p,
                (a, rng.below(1_000_000_000) as i64),
                (m, rng.below(1_000_000_000) as i64),
            )
        }
        // Rule "split inode" (kernel, `userxattr` or lowers on other filesystems): no hard
        // links made through the mount.
        45..=50 if ROOTLESS.load(Ordering::Relaxed) || packed() => {
            Op::Create(p, *rng.pick(&FILE_MODES))
        }
        45..=50 => Op::Link(some_path(rng, snap), p),
        51..=55 => Op::Symlink(pool_path(rng), p),
        56..=63 => Op::Mkdir(p, *rng.pick(&DIR_MODES)),
        64..=68 => Op::Rmdir(p),
        69..=74 => Op::Unlink(p),
        75..=84 => {
            let flags = match rng.below(4) {
                0 | 1 => 0,
                2 => libc::RENAME_NOREPLACE,
                _ => libc::RENAME_EXCHANGE,
            };
            let mut to = if flags == libc::RENAME_EXCHANGE {
                some_path(rng, snap)
            } else {
                new_path(rng, snap)
            };
            // Rule "same file".
            if same_file(snap, &p, &to) {
                to = pool_path(rng);
                if same_file(snap, &p, &to) {
                    to = p.clone();
                }
            }
            Op::Rename(p, to, flags)
        }
        85..=91 if rng.percent(50) => Op::SetXattr(p, (*rng.pick(&ACLS)).to_string(), gen_acl(rng)),
        85..=91 => Op::SetXattr(
            p,
            (*rng.pick(&XATTRS)).to_string(),
            format!("w{}", rng.below(1000)).into_bytes(),
        ),
        92..=95 if rng.percent(50) => {
            let flags = [
                0,
                0,
                FS_APPEND_FL,
                FS_IMMUTABLE_FL,
                FS_APPEND_FL | FS_IMMUTABLE_FL,
            ];
            Op::Chattr(p, *rng.pick(&flags))
        }
        92..=95 if rng.percent(30) => Op::RemoveXattr(p, (*rng.pick(&ACLS)).to_string()),
        92..=95 => Op::RemoveXattr(p, (*rng.pick(&XATTRS)).to_string()),
        _ => {
            if rng.percent(60) {
                Op::Mknod(p, 'p', *rng.pick(&FILE_MODES) & 0o777, 0, 0)
            } else {
                let (k, ma, mi) = *rng.pick(&DEVICES);
                Op::Mknod(p, k, 0o640, ma, mi)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Snapshots of a tree

/// (seconds, nanoseconds)
type Stamp = (i64, i64);
/// mtime, and atime where it is compared.
type Times = (Stamp, Option<Stamp>);

/// Permission bits, shown in octal.
#[derive(Clone, Copy, PartialEq)]
struct Mode(u32);

impl fmt::Debug for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#o}", self.0)
    }
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    kind: char,
    mode: Mode,
    uid: u32,
    gid: u32,
    /// Non-directories only.
    size: u64,
    /// Non-directories only.
    nlink: u64,
    /// FNV-1a of the content of regular files.
    hash: u64,
    target: Option<String>,
    rdev: (u32, u32),
    xattrs: Vec<(String, Vec<u8>)>,
    /// When the times are known to agree; atime only for objects that are never read.
    times: Option<Times>,
}

#[derive(Default)]
struct Snap {
    entries: BTreeMap<String, Entry>,
    /// Groups of non-directory paths sharing one inode (only groups of two or more).
    links: BTreeSet<Vec<String>>,
    /// path -> group index helper: the paths sharing an inode with each path.
    group_of: BTreeMap<String, Vec<String>>,
}

fn fnv(data: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

/// Reads a regular file without following symlinks and without updating its atime.
fn read_noatime(p: &Path) -> Result<Vec<u8>, String> {
    use std::io::Read;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NOATIME)
        .open(p)
        .map_err(|e| format!("open {}: {e}", p.display()))?;
    let mut v = Vec::new();
    f.read_to_end(&mut v)
        .map_err(|e| format!("read {}: {e}", p.display()))?;
    Ok(v)
}

/// The xattrs compared: `user.*`, and in a layer on disk the opaque marker but none of the
/// kernel's other private xattrs (in the `userxattr` format these are `user.overlay.*`).
/// Through the mount, a private xattr that shows is compared, so that it is a difference.
fn xattrs_of(p: &Path, raw: bool) -> Vec<(String, Vec<u8>)> {
    common::list_xattrs(p)
        .into_iter()
        .filter(|n| {
            n.starts_with(ACL_PREFIX)
                || if raw {
                    n == opaque_xattr()
                        || (n.starts_with("user.") && !n.starts_with("user.overlay."))
                } else {
                    n.starts_with("user.")
                }
        })
        .map(|n| {
            let v = common::get_xattr(p, &n).unwrap_or_default();
            (n, v)
        })
        .collect()
}

/// Every object under `root`. `raw` is for an upper layer on disk (private opaque xattr
/// included); `check_dirents` checks readdir's d_ino/d_type against lstat.
fn snapshot(
    root: &Path,
    pins: &BTreeSet<String>,
    raw: bool,
    check_dirents: bool,
) -> Result<Snap, String> {
    let mut snap = Snap::default();
    // By device and number: kernel overlayfs shows the files of lowers on other filesystems
    // under a device of each such filesystem.
    let mut inos: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    let mut stack = vec![String::new()];
    while let Some(rel) = stack.pop() {
        let p = if rel.is_empty() {
            root.to_path_buf()
        } else {
            root.join(&rel)
        };
        let m = fs::symlink_metadata(&p).map_err(|e| format!("lstat {rel:?}: {e}"))?;
        let ft = m.file_type();
        let kind = kind_of(&ft);
        let hash = if kind == 'f' {
            fnv(&read_noatime(&p)?)
        } else {
            0
        };
        let target = if kind == 'l' {
            Some(
                fs::read_link(&p)
                    .map_err(|e| format!("readlink {rel:?}: {e}"))?
                    .to_string_lossy()
                    .into_owned(),
            )
        } else {
            None
        };
        let times = pins.contains(&rel).then(|| {
            // Contents are read with O_NOATIME, so regular files keep their atime too.
            let atime = matches!(kind, 'f' | 'p' | 'c' | 'b').then(|| (m.atime(), m.atime_nsec()));
            ((m.mtime(), m.mtime_nsec()), atime)
        });
        let dir = kind == 'd';
        // The kernel links its whiteouts to one shared inode: their link count and grouping
        // say nothing about the view.
        let whiteout = raw && kind == 'c' && m.rdev() == 0;
        snap.entries.insert(
            rel.clone(),
            Entry {
                kind,
                mode: Mode(m.mode() & 0o7777),
                uid: m.uid(),
                gid: m.gid(),
                size: if dir { 0 } else { m.size() },
                nlink: if dir || whiteout { 0 } else { m.nlink() },
                hash,
                target,
                rdev: (libc::major(m.rdev()), libc::minor(m.rdev())),
                xattrs: xattrs_of(&p, raw),
                times,
            },
        );
        if whiteout {
            continue;
        }
        if !dir {
            inos.entry((m.dev(), m.ino()))
                .or_default()
                .push(rel.clone());
            continue;
        }
        for e in fs::read_dir(&p).map_err(|e| format!("readdir {rel:?}: {e}"))? {
            let e = e.map_err(|e| format!("readdir {rel:?}: {e}"))?;
            let name = e.file_name().to_string_lossy().into_owned();
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            if check_dirents {
                let cm = fs::symlink_metadata(e.path())
                    .map_err(|err| format!("lstat {child:?} (listed by readdir): {err}"))?;
                if e.ino() != cm.ino() {
                    return Err(format!(
                        "{child:?}: readdir d_ino {} but lstat st_ino {}",
                        e.ino(),
                        cm.ino()
                    ));
                }
                let dt = e.file_type().map_err(|err| format!("{child:?}: {err}"))?;
                if dt != cm.file_type() {
                    return Err(format!(
                        "{child:?}: readdir d_type {dt:?} but lstat type {:?}",
                        cm.file_type()
                    ));
                }
            }
            stack.push(child);
        }
    }
    for (_, mut v) in inos {
        if v.len() > 1 {
            v.sort();
            for p in &v {
                snap.group_of.insert(p.clone(), v.clone());
            }
            snap.links.insert(v);
        }
    }
    Ok(snap)
}

/// Names the first difference between the kernel's snapshot and unionmount's.
fn diff(k: &Snap, u: &Snap, what: &str) -> Result<(), String> {
    let kk: Vec<&String> = k.entries.keys().collect();
    let uk: Vec<&String> = u.entries.keys().collect();
    if kk != uk {
        let only_k: Vec<_> = kk.iter().filter(|p| !u.entries.contains_key(**p)).collect();
        let only_u: Vec<_> = uk.iter().filter(|p| !k.entries.contains_key(**p)).collect();
        return Err(format!(
            "{what}: different names: only in kernel {only_k:?}, only in unionmount {only_u:?}"
        ));
    }
    for (p, ke) in &k.entries {
        let ue = &u.entries[p];
        if ke != ue {
            return Err(format!(
                "{what}: {p:?} differs:\n  kernel:     {ke:?}\n  unionmount: {ue:?}"
            ));
        }
    }
    if k.links != u.links {
        return Err(format!(
            "{what}: hard-link groups differ:\n  kernel:     {:?}\n  unionmount: {:?}",
            k.links, u.links
        ));
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Which entries' times are known to agree

/// Paths whose atime/mtime are the same on both sides (from the lowers or an explicit
/// utimensat, unchanged since).
struct Pins(BTreeSet<String>);

fn in_subtree(p: &str, top: &str) -> bool {
    p == top || (p.starts_with(top) && p.as_bytes().get(top.len()) == Some(&b'/'))
}

impl Pins {
    fn drop_subtree(&mut self, top: &str) {
        self.0.retain(|p| !in_subtree(p, top));
    }

    fn drop_parent(&mut self, p: &str) {
        self.0.remove(parent(p));
    }

    /// Whether any component of `p` before the last is a symlink (then the model cannot tell
    /// which object the operation reached).
    fn through_symlink(p: &str, snap: &Snap) -> bool {
        let mut a = String::new();
        for comp in p.split('/').collect::<Vec<_>>().split_last().unwrap().1 {
            if !a.is_empty() {
                a.push('/');
            }
            a.push_str(comp);
            if snap.entries.get(&a).is_some_and(|e| e.kind == 'l') {
                return true;
            }
        }
        false
    }

    fn is_symlink(p: &str, snap: &Snap) -> bool {
        snap.entries.get(p).is_some_and(|e| e.kind == 'l')
    }

    /// Updates the pins after `op` succeeded; `before` is the tree before it.
    fn update(&mut self, op: &Op, before: &Snap) {
        let op = op.inner();
        match op {
            Op::FdWrite(..) | Op::FdTruncate(..) | Op::FdFallocate(..) => {
                // The model does not follow which name an open file has now.
                self.0
                    .retain(|p| before.entries.get(p).is_none_or(|e| e.kind != 'f'));
                return;
            }
            Op::Open(..)
            | Op::FdChmod(..)
            | Op::FdSetXattr(..)
            | Op::FdStat(..)
            | Op::FdRead(..)
            | Op::Close(..)
            | Op::Hold(_)
            | Op::HeldStat
            | Op::HeldGetXattr(_) => {
                return;
            }
            _ => {}
        }
        // Callers and open files are handled above.
        let paths = op_paths(op);
        let follows_last = matches!(
            op,
            Op::Write(..) | Op::Truncate(..) | Op::Chmod(..) | Op::Chown(_, _, _, true)
        );
        if paths.iter().any(|p| Pins::through_symlink(p, before))
            || (follows_last && Pins::is_symlink(paths[0], before))
        {
            self.0.clear();
            return;
        }
        match op {
            Op::Utimens(p, (_, nsec), _) if *nsec != libc::UTIME_NOW => {
                self.0.insert(p.clone());
            }
            // A change of data, or UTIME_NOW (each side took its own clock's time), changes
            // the times of every name of the file.
            Op::Utimens(p, ..) | Op::Write(p, ..) | Op::Truncate(p, _) => {
                self.0.remove(p);
                if let Some(g) = before.group_of.get(p) {
                    for q in g {
                        self.0.remove(q);
                    }
                }
            }
            Op::Chmod(..)
            | Op::Chown(..)
            | Op::SetXattr(..)
            | Op::RemoveXattr(..)
            | Op::Chattr(..) => {}
            Op::Create(p, _)
            | Op::Mkdir(p, _)
            | Op::Mknod(p, ..)
            | Op::Symlink(_, p)
            | Op::Link(_, p)
            | Op::Rmdir(p)
            | Op::Unlink(p) => {
                self.drop_subtree(p);
                self.drop_parent(p);
            }
            Op::Rename(a, b, flags) => {
                self.drop_parent(a);
                self.drop_parent(b);
                if a == b || in_subtree(a, b) || in_subtree(b, a) {
                    self.drop_subtree(a);
                    self.drop_subtree(b);
                    return;
                }
                let move_under = |set: &BTreeSet<String>, from: &str, to: &str| {
                    set.iter()
                        .filter(|p| in_subtree(p, from))
                        .map(|p| format!("{to}{}", &p[from.len()..]))
                        .collect::<Vec<_>>()
                };
                let a_moved = move_under(&self.0, a, b);
                let b_moved = if *flags == libc::RENAME_EXCHANGE {
                    move_under(&self.0, b, a)
                } else {
                    Vec::new()
                };
                self.drop_subtree(a);
                self.drop_subtree(b);
                self.0.extend(a_moved);
                self.0.extend(b_moved);
                // A directory moved to another parent gets a new ".." entry.
                if parent(a) != parent(b) {
                    self.0.remove(a);
                    self.0.remove(b);
                }
            }
            _ => unreachable!("callers and open files are handled above"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Running a sequence

struct Failure {
    /// Index of the operation after which the divergence showed, or `ops.len()` for the
    /// checks after the sequence (uppers on disk, remount).
    step: usize,
    msg: String,
}

struct Outcome {
    ops: Vec<Op>,
    /// How many operations succeeded (on both sides).
    succeeded: usize,
    /// How many of the operations of unprivileged callers succeeded, and how many were made.
    as_callers: (usize, usize),
    /// The same for the operations on files kept open.
    on_open_files: (usize, usize),
    /// Of the ACL changes (set or removed), how many succeeded, and how many there were.
    acl_changes: (usize, usize),
    /// The same for the changes of append-only and immutable flags.
    flag_changes: (usize, usize),
    failure: Option<Failure>,
}

enum Plan<'a> {
    Generate(usize),
    Replay(&'a [Op]),
}

fn compare_mounts(
    layers: &Layers,
    k: &Mount,
    u: &Mount,
    pins: &BTreeSet<String>,
    what: &str,
) -> Result<Snap, String> {
    let mut ks =
        snapshot(&k.merged, pins, false, false).map_err(|e| format!("{what}: kernel: {e}"))?;
    // Lowers in images: other filesystems than the upper's, the same rule applies.
    if ROOTLESS.load(Ordering::Relaxed) || packed() {
        let upper = k.upper.as_deref().expect("kernel mounts have an upper");
        regroup_by_real_files(&mut ks, upper, &layers.lower_paths())
            .map_err(|e| format!("{what}: kernel: {e}"))?;
    }
    let us =
        snapshot(&u.merged, pins, false, true).map_err(|e| format!("{what}: unionmount: {e}"))?;
    diff(&ks, &us, what)?;
    Ok(ks)
}

/// Rule "unstable st_ino" (kernel, `userxattr` or lowers on other filesystems): without file
/// handles in its origin xattr, kernel overlayfs shows a copied-up file under its lower inode
/// number through names looked up before the copy-up and under its upper one through names
/// looked up after (and after a remount), so two names of one file can show two numbers. Which names share a file is taken
/// instead from the files themselves: the upper's where the upper has the name, else the
/// first lower's (the view holds no redirects: a lower directory cannot be renamed).
fn regroup_by_real_files(snap: &mut Snap, upper: &Path, lowers: &[&Path]) -> Result<(), String> {
    let mut files: BTreeMap<(u64, u64), Vec<String>> = BTreeMap::new();
    for (p, e) in &snap.entries {
        if e.kind == 'd' {
            continue;
        }
        let real = std::iter::once(upper)
            .chain(lowers.iter().copied())
            .find_map(|layer| {
                fs::symlink_metadata(layer.join(p))
                    .ok()
                    .filter(|m| !(m.file_type().is_char_device() && m.rdev() == 0))
            })
            .ok_or_else(|| format!("{p:?} is in no layer"))?;
        files
            .entry((real.dev(), real.ino()))
            .or_default()
            .push(p.clone());
    }
    snap.links.clear();
    snap.group_of.clear();
    for (_, v) in files {
        if v.len() > 1 {
            for p in &v {
                snap.group_of.insert(p.clone(), v.clone());
            }
            snap.links.insert(v);
        }
    }
    Ok(())
}

/// The generated lowers, one line per object, for a reproduction.
fn describe_lowers(seed: u64) -> String {
    let layers = build_lowers(seed);
    let mut out = String::new();
    for (i, l) in layers.lowers.iter().enumerate() {
        out.push_str(&format!(
            "  lower {i}{}:\n",
            if i == 0 { " (top)" } else { "" }
        ));
        let snap = match snapshot(l, &BTreeSet::new(), true, false) {
            Ok(s) => s,
            Err(e) => return format!("{out}  ({e})"),
        };
        for (p, e) in snap.entries.iter().filter(|(p, _)| !p.is_empty()) {
            let extra = match e.kind {
                'f' => format!(" size {} nlink {}", e.size, e.nlink),
                'l' => format!(" -> {:?}", e.target.as_deref().unwrap_or("")),
                'c' | 'b' => format!(" {}:{}", e.rdev.0, e.rdev.1),
                _ => String::new(),
            };
            let xattrs: Vec<String> = e
                .xattrs
                .iter()
                .map(|(n, v)| {
                    if n.starts_with(ACL_PREFIX) {
                        format!("{n}={}", acl_text(v))
                    } else {
                        format!("{n}={:?}", String::from_utf8_lossy(v))
                    }
                })
                .collect();
            out.push_str(&format!(
                "    {p} {} {:#o} {}:{}{extra} [{}]\n",
                e.kind,
                e.mode.0,
                e.uid,
                e.gid,
                xattrs.join(", ")
            ));
        }
    }
    out
}

/// In the comparisons with packed lowers, each lower layer is packed into an image (squashfs
/// or erofs) and mounted (read-only) in its place: layers on a read-only filesystem of their
/// own, as image layers often are. The guards unmount them.
fn packed() -> bool {
    PACKED.get().is_some()
}

fn pack_lowers(layers: &Layers) -> Vec<common::ScratchMount> {
    let Some(&image) = PACKED.get() else {
        return Vec::new();
    };
    let mut guards = Vec::new();
    for (i, dir) in layers.lowers.iter().enumerate() {
        let img = layers.root().join(format!("lower{i}.{}", image.name()));
        let st = match image {
            Image::Squashfs => std::process::Command::new("mksquashfs")
                .arg(dir)
                .arg(&img)
                .args(["-quiet", "-noappend", "-no-progress"])
                .status()
                .expect("mksquashfs (Debian/Ubuntu: apt-get install squashfs-tools)"),
            Image::Erofs => std::process::Command::new("mkfs.erofs")
                .arg("--quiet")
                .arg(&img)
                .arg(dir)
                .status()
                .expect("mkfs.erofs (Debian/Ubuntu: apt-get install erofs-utils)"),
        };
        assert!(
            st.success(),
            "pack {} into {}",
            dir.display(),
            img.display()
        );
        guards.push(common::scratch_mount(
            &["-t", image.name(), "-o", "loop,ro"],
            &img,
            dir,
        ));
    }
    guards
}

fn run(seed: u64, plan: Plan<'_>) -> Outcome {
    let layers = build_lowers(seed);
    let _packed = pack_lowers(&layers);
    let mut k = layers.mount_kernel_with("kernel", kernel_options());
    let mut u = layers.mount_with("union", union_options());
    // Declared after the mounts, so that they are closed first also on an early return.
    let mut k_fds = Fds::default();
    let mut u_fds = Fds::default();
    let mut ops: Vec<Op> = Vec::new();
    let mut rng = seeded(seed);
    let mut callers = seeded(seed ^ 0xca11_e125);
    let mut fd_ops = seeded(seed ^ 0xf11e_0be2);
    let fail = |ops: Vec<Op>, step: usize, msg: String| Outcome {
        ops,
        succeeded: 0,
        as_callers: (0, 0),
        on_open_files: (0, 0),
        acl_changes: (0, 0),
        flag_changes: (0, 0),
        failure: Some(Failure { step, msg }),
    };

    // Everything starts with the lowers' times, which both sides share; the root is the
    // upper directory itself, made separately for each.
    let initial = match snapshot(&k.merged, &BTreeSet::new(), false, false) {
        Ok(s) => s,
        Err(e) => return fail(ops, 0, format!("initial kernel snapshot: {e}")),
    };
    let mut succeeded = 0;
    let mut as_callers = (0, 0);
    let mut on_open_files = (0, 0);
    let mut acl_changes = (0, 0);
    let mut flag_changes = (0, 0);
    let mut pins = Pins(
        initial
            .entries
            .keys()
            .filter(|p| !p.is_empty())
            .cloned()
            .collect(),
    );
    let mut snap = match compare_mounts(&layers, &k, &u, &pins.0, "initial view") {
        Ok(s) => s,
        Err(e) => return fail(ops, 0, e),
    };

    let total = match plan {
        Plan::Generate(n) => n,
        Plan::Replay(v) => v.len(),
    };
    for step in 0..total {
        let op = match plan {
            Plan::Generate(_) => {
                let op = gen_fd_op(&mut fd_ops, &snap, gen_op(&mut rng, &snap));
                let op = gen_caller(&mut callers, op);
                // Rule "split names" (passthrough): no link to the file open in the
                // read-only slot; a create at the new name instead.
                match op.inner() {
                    Op::Link(a, b) if passthrough() && is_open_file(&k.merged, a, &k_fds) => {
                        let create = Op::Create(b.clone(), 0o644);
                        match op {
                            Op::As(c, _) => Op::As(c, Box::new(create)),
                            _ => create,
                        }
                    }
                    _ => op,
                }
            }
            Plan::Replay(v) => v[step].clone(),
        };
        let kr = apply_with(&op, &k.merged, &mut k_fds);
        let ur = apply_with(&op, &u.merged, &mut u_fds);
        ops.push(op.clone());
        // Rule "protection checked late" (FUSE): see the module's notes. Only where the
        // kernel's side shows a protection flag on a path the operation names or its parent.
        let late = kr == Err(libc::EPERM)
            && (op_paths(&op).iter().any(|p| {
                let parent = Path::new(p.as_str())
                    .parent()
                    .map(|q| q.to_string_lossy().into_owned());
                protected_path(&k.merged, p)
                    || parent.is_some_and(|q| protected_path(&k.merged, &q))
            }) || op_slot(&op).is_some_and(|i| k_fds.raw(i).is_ok_and(protected_fd)))
            && (matches!(ur, Err(libc::EACCES | libc::ENOTDIR | libc::EISDIR))
                || (ur == Ok(0)
                    && matches!(op.inner(), Op::RemoveXattr(_, n) if n == ACL_DEFAULT)));
        // Rule "deleted file not held" (deliberate): an upper file or symlink removed with its
        // last link answers only its attributes to what holds it (README), ENOENT to getxattr.
        let unheld = matches!(op.inner(), Op::HeldGetXattr(_))
            && ur == Err(libc::ENOENT)
            && k_fds.raw(PATH_SLOT).is_ok_and(is_deleted_file);
        // Rule "split size" (passthrough): held, the file open in the read-only slot shows
        // the size of the lower file it reads once a copy-up split it (README).
        let split_size = passthrough()
            && matches!(op.inner(), Op::HeldStat)
            && matches!((kr, ur), (Ok(a), Ok(b)) if a >> 24 == b >> 24)
            && slots_hold_one_file(&k_fds, RO_SLOT, PATH_SLOT);
        if kr != ur && !late && !unheld && !split_size {
            let show = |r: Res| match r {
                Ok(v) => format!("Ok({v})"),
                Err(e) => format!("Err({})", std::io::Error::from_raw_os_error(e)),
            };
            return fail(
                ops,
                step,
                format!("{op}: kernel {} but unionmount {}", show(kr), show(ur)),
            );
        }
        if let (Err(_), Op::Rename(a, b, _)) = (kr, op.inner()) {
            // Rule "failed rename" (kernel): a rename that fails late (ENOTEMPTY from the
            // upper) may already have changed the directories' mtimes in the kernel's upper.
            pins.drop_parent(a);
            pins.drop_parent(b);
        }
        if let Op::As(..) = op {
            as_callers.1 += 1;
            as_callers.0 += usize::from(kr.is_ok());
        }
        if let Op::FdWrite(..)
        | Op::FdTruncate(..)
        | Op::FdFallocate(..)
        | Op::FdChmod(..)
        | Op::FdSetXattr(..)
        | Op::FdStat(..)
        | Op::FdRead(..)
        | Op::HeldStat
        | Op::HeldGetXattr(_) = op.inner()
        {
            on_open_files.1 += 1;
            on_open_files.0 += usize::from(kr.is_ok());
        }
        if let Op::SetXattr(_, n, _) | Op::RemoveXattr(_, n) = op.inner()
            && n.starts_with(ACL_PREFIX)
        {
            acl_changes.1 += 1;
            acl_changes.0 += usize::from(kr.is_ok());
        }
        if let Op::Chattr(..) = op.inner() {
            flag_changes.1 += 1;
            flag_changes.0 += usize::from(kr.is_ok());
        }
        if kr.is_ok() {
            succeeded += 1;
            pins.update(&op, &snap);
        }
        snap = match compare_mounts(&layers, &k, &u, &pins.0, &format!("after {op}")) {
            Ok(s) => s,
            Err(e) => return fail(ops, step, e),
        };
    }

    // The uppers on disk, then a fresh mount of each.
    let n = ops.len();
    drop(k_fds);
    drop(u_fds);
    k.unmount();
    u.unmount();
    let ku = k.upper.clone().unwrap();
    let uu = u.upper.clone().unwrap();
    // Rule "opaque without effect": the kernel marks a directory opaque when it is about to be
    // renamed into a merged directory, even where no lower layer has that name and even when
    // the rename then fails. The marker is compared only where it hides something: where a
    // lower directory would show through.
    let lower_dirs = lower_dirs_showing(&layers);
    let meaningful = |mut s: Snap| {
        for (p, e) in s.entries.iter_mut() {
            if e.kind == 'd' && !lower_dirs.contains(p) {
                e.xattrs.retain(|(n, _)| n != opaque_xattr());
            }
        }
        s
    };
    // With xattr_permissions the upper keeps owners, modes and types in an xattr by design:
    // only the views are compared, also after the remount.
    if !OVERRIDE.load(Ordering::Relaxed) {
        let uppers = snapshot(&ku, &pins.0, true, false)
            .and_then(|ks| snapshot(&uu, &pins.0, true, false).map(|us| (ks, us)))
            .and_then(|(ks, us)| diff(&meaningful(ks), &meaningful(us), "uppers on disk"));
        if let Err(e) = uppers {
            return fail(ops, n, e);
        }
    }
    drop(k);
    drop(u);
    let k = layers.mount_kernel_with("kernel", kernel_options());
    let u = layers.mount_with("union", union_options());
    if let Err(e) = compare_mounts(&layers, &k, &u, &pins.0, "after remount") {
        return fail(ops, n, e);
    }
    Outcome {
        ops,
        succeeded,
        as_callers,
        on_open_files,
        acl_changes,
        flag_changes,
        failure: None,
    }
}

/// The paths where a lower layer's directory would show through an upper directory that is
/// not opaque: the first lower (top-down) with an entry there has a directory, and no lower
/// above hides the path's ancestors (an opaque directory, a whiteout or a non-directory).
fn lower_dirs_showing(layers: &Layers) -> BTreeSet<String> {
    let mut showing = BTreeSet::new();
    let mut seen: BTreeSet<String> = BTreeSet::new();
    let mut hidden_below: BTreeSet<String> = BTreeSet::new();
    let hidden = |hb: &BTreeSet<String>, p: &str| {
        let mut a = p;
        while let Some((up, _)) = a.rsplit_once('/') {
            if hb.contains(up) {
                return true;
            }
            a = up;
        }
        false
    };
    for l in &layers.lowers {
        let Ok(snap) = snapshot(l, &BTreeSet::new(), true, false) else {
            continue;
        };
        // A directory shown from above merges with this layer's entry only if that is a
        // directory too, and with the layers below only if that is not opaque.
        // (An opaque one's own entries here still show: it hides the layers below once this
        // layer is done.)
        let mut opaque_here = Vec::new();
        for (p, e) in &snap.entries {
            if seen.contains(p) && !hidden(&hidden_below, p) {
                if e.kind != 'd' {
                    hidden_below.insert(p.clone());
                } else if e.xattrs.iter().any(|(n, _)| n == opaque_xattr()) {
                    opaque_here.push(p.clone());
                }
            }
        }
        let entries: Vec<(&String, &Entry)> = snap
            .entries
            .iter()
            .filter(|(p, _)| !p.is_empty() && !seen.contains(*p) && !hidden(&hidden_below, p))
            .collect();
        for (p, e) in &entries {
            let whiteout = e.kind == 'c' && e.rdev == (0, 0);
            let opaque = e.xattrs.iter().any(|(n, _)| n == opaque_xattr());
            if e.kind == 'd' {
                showing.insert((*p).clone());
            }
            if e.kind != 'd' || whiteout || opaque {
                hidden_below.insert((*p).clone());
            }
        }
        seen.extend(entries.into_iter().map(|(p, _)| p.clone()));
        hidden_below.extend(opaque_here);
    }
    showing
}

/// Delta debugging: the smallest operation list (found greedily) that still diverges.
fn shrink(seed: u64, ops: Vec<Op>, budget: &mut usize) -> (Vec<Op>, String) {
    let mut best = ops;
    let mut msg = String::new();
    let mut chunk = best.len().div_ceil(2).max(1);
    loop {
        let mut i = 0;
        let mut changed = false;
        while i < best.len() && *budget > 0 {
            let mut cand = best.clone();
            let end = (i + chunk).min(cand.len());
            cand.drain(i..end);
            *budget -= 1;
            let out = run(seed, Plan::Replay(&cand));
            if let Some(f) = out.failure {
                // Operations after the divergence do not matter.
                let mut kept = cand;
                kept.truncate((f.step + 1).min(kept.len()));
                best = kept;
                msg = f.msg;
                changed = true;
            } else {
                i += chunk;
            }
        }
        if *budget == 0 || (chunk == 1 && !changed) {
            break;
        }
        if !changed {
            chunk = chunk.div_ceil(2);
        }
    }
    (best, msg)
}

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

#[test]
fn differential_against_kernel_overlayfs() {
    check_seeds("");
}

/// The same comparison with both sides mounted by the root of a user namespace that an
/// unprivileged user made (as a rootless container engine runs them): unionmount without
/// passthrough, writing the `userxattr` format, and kernel overlayfs with `userxattr`. The
/// namespace maps ids 0-65535 (the callers' 1000 and 1001 included) to 200000-265535. The
/// test binary runs this test again in there, so its mounts go with that process's mount
/// namespace.
#[test]
fn differential_rootless_against_kernel_overlayfs() {
    if std::env::var_os(IN_USERNS).is_some() {
        ROOTLESS.store(true, Ordering::Relaxed);
        check_seeds("rootless ");
        return;
    }
    let user = common::test_user();
    let again = this_test_again("differential_rootless_against_kernel_overlayfs", IN_USERNS);
    let out = common::in_mapped_user_namespace(user, again);
    check_run_again(
        &out,
        &format!("in a user namespace made by uid {user}"),
        "rootless ",
    );
}

/// The same comparison with unionmount keeping owners and modes in an xattr
/// (`xattr_permissions=2`, what containers-storage's `force_mask` asks for): the views must
/// be the same at every step and after a remount (the uppers on disk differ by design). Run
/// in a process of its own, which alone sets `OVERRIDE`.
#[test]
fn differential_with_xattr_permissions_against_kernel_overlayfs() {
    if std::env::var_os(IN_OVERRIDE).is_some() {
        OVERRIDE.store(true, Ordering::Relaxed);
        check_seeds("xattr_permissions ");
        return;
    }
    let me = "differential_with_xattr_permissions_against_kernel_overlayfs";
    let out = this_test_again(me, IN_OVERRIDE).output().unwrap();
    check_run_again(&out, "with xattr_permissions=2", "xattr_permissions ");
}

/// The same comparison with every lower layer packed into an image of its own (mounted by
/// root), in a process of its own (which alone sets `PACKED`): layers on other filesystems
/// than the upper's, read-only, refusing fsync (EINVAL), and holding no ACLs or ACLs that
/// cannot be set.
fn check_packed_lowers(image: Image, me: &str) {
    if let Some(v) = std::env::var_os(IN_IMAGES) {
        assert_eq!(v, image.name(), "{IN_IMAGES}");
        PACKED.set(image).expect("set once");
        check_seeds(&format!("{} ", image.name()));
        return;
    }
    let mut again = this_test_again(me, IN_IMAGES);
    let out = again.env(IN_IMAGES, image.name()).output().unwrap();
    check_run_again(
        &out,
        &format!("lowers on {}", image.name()),
        &format!("{} ", image.name()),
    );
}

/// Squashfs answers EOPNOTSUPP for ACLs, where kernel overlayfs shows no ACL.
#[test]
fn differential_with_lowers_on_squashfs_against_kernel_overlayfs() {
    check_packed_lowers(
        Image::Squashfs,
        "differential_with_lowers_on_squashfs_against_kernel_overlayfs",
    );
}

/// Erofs shows the ACLs it holds, and kernel overlayfs refuses to change them before copy-up.
#[test]
fn differential_with_lowers_on_erofs_against_kernel_overlayfs() {
    check_packed_lowers(
        Image::Erofs,
        "differential_with_lowers_on_erofs_against_kernel_overlayfs",
    );
}

/// The test binary, to run test `me` again alone, with `env` set to tell it so.
fn this_test_again(me: &str, env: &str) -> std::process::Command {
    let mut again = std::process::Command::new(std::env::current_exe().unwrap());
    again
        .args(["--exact", me, "--nocapture", "--test-threads=1"])
        .env(env, "1");
    again
}

/// That a run of `this_test_again` passed, and compared seeds (its lines carry `label`).
fn check_run_again(out: &std::process::Output, what: &str, label: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{what}: {}\n{}\n{stderr}",
        out.status,
        String::from_utf8_lossy(&out.stdout)
    );
    assert!(
        stderr.contains(&format!("differential: {label}seed")),
        "{what}: the run compared nothing:\n{stderr}"
    );
}

/// Compares kernel overlayfs and unionmount on the seeds and steps the environment names;
/// `label` goes into every line printed.
fn check_seeds(label: &str) {
    // SAFETY: umask only affects this process; the other tests here do not depend on it.
    unsafe { libc::umask(0) };
    let seeds = parse_seeds(&env_or("UNIONMOUNT_DIFF_SEEDS", "1-10"));
    let steps: usize = env_or("UNIONMOUNT_DIFF_STEPS", "150")
        .parse()
        .expect("UNIONMOUNT_DIFF_STEPS is a number");
    for seed in seeds {
        eprintln!("differential: {label}seed {seed}, {steps} steps");
        let out = run(seed, Plan::Generate(steps));
        let Some(f) = out.failure else {
            eprintln!(
                "differential: {label}seed {seed}: same results and trees ({} of {} operations \
                 succeeded; of unprivileged callers' {}, {}; of {} on open files, {}; of {} \
                 ACL changes, {}; of {} flag changes, {})",
                out.succeeded,
                out.ops.len(),
                out.as_callers.1,
                out.as_callers.0,
                out.on_open_files.1,
                out.on_open_files.0,
                out.acl_changes.1,
                out.acl_changes.0,
                out.flag_changes.1,
                out.flag_changes.0
            );
            continue;
        };
        let at = if f.step >= out.ops.len() {
            format!("after all {} steps", out.ops.len())
        } else {
            format!("at step {} of {steps}", f.step + 1)
        };
        eprintln!(
            "differential: {label}seed {seed} diverged {at}: {}\nshrinking {} operations...",
            f.msg,
            (f.step + 1).min(out.ops.len())
        );
        let mut budget = 400;
        let mut ops = out.ops;
        ops.truncate(f.step + 1);
        let (small, msg) = shrink(seed, ops, &mut budget);
        let msg = if msg.is_empty() { f.msg.clone() } else { msg };
        let listing: Vec<String> = small
            .iter()
            .enumerate()
            .map(|(i, o)| format!("  {:>3}. {o}", i + 1))
            .collect();
        panic!(
            "kernel overlayfs and unionmount diverge: {label}seed {seed}, {at} \
             (rerun: UNIONMOUNT_DIFF_SEEDS={seed} UNIONMOUNT_DIFF_STEPS={steps})\n\
             shrunk to {} operations on the lowers of seed {seed}:\n{}\n{}\ndivergence: {msg}",
            small.len(),
            describe_lowers(seed),
            listing.join("\n")
        );
    }
}

/// The deliberate differences the generator stays away from, checked here by name against
/// unionmount's own rules.
#[test]
fn deliberate_differences() {
    let layers = Layers::new(1);
    layers.lower(0).file("d/f", "x");
    layers.lower(0).file("h/a", "linked");
    layers.lower(0).hardlink("h/a", "h/b");
    layers.lower(0).hardlink("h/a", "h/c");
    let k = layers.mount_kernel("kernel");
    let u = layers.mount("union");

    // Rule "char 0/0": the kernel refuses it; unionmount creates it, shows it as 0/0 and stores
    // it in the upper as 0:1048575, the one device number it refuses instead.
    let zero = Op::Mknod("d/z".into(), 'c', 0o600, 0, 0);
    assert_eq!(apply(&zero, &k.merged), Err(libc::EPERM));
    assert_eq!(apply(&zero, &u.merged), Ok(0));
    let m = fs::symlink_metadata(u.path("d/z")).unwrap();
    assert!(m.file_type().is_char_device());
    assert_eq!(m.rdev(), 0);
    let stored = fs::symlink_metadata(u.upper_path("d/z")).unwrap().rdev();
    assert_eq!((libc::major(stored), libc::minor(stored)), (0, 0xfffff));
    let standin = Op::Mknod("d/s".into(), 'c', 0o600, 0, 0xfffff);
    assert_eq!(apply(&standin, &u.merged), Err(libc::EPERM));

    // Rule "private names": `.wh.` names are the layers' whiteout format; unionmount refuses
    // to create them, the kernel does not.
    let private = Op::Create("d/.wh.q".into(), 0o644);
    assert_eq!(apply(&private, &u.merged), Err(libc::EPERM));
    assert_eq!(apply(&private, &k.merged), Ok(0));

    // Rule "same file": renaming one name of a lower hard link onto another, or exchanging
    // two, does nothing in unionmount (rename(2): both names refer to the same file) and
    // copies nothing up; the kernel copies the names up and, for a plain rename, drops the old
    // one.
    let mut names: Vec<String> = fs::read_dir(u.path("h"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    assert_eq!(names, ["a", "b", "c"]);
    let ino = fs::symlink_metadata(u.path("h/a")).unwrap().ino();
    for (op, expect) in [
        (Op::Rename("h/a".into(), "h/b".into(), 0), Ok(0)),
        (
            Op::Rename("h/b".into(), "h/c".into(), libc::RENAME_EXCHANGE),
            Ok(0),
        ),
        (
            Op::Rename("h/c".into(), "h/a".into(), libc::RENAME_NOREPLACE),
            Err(libc::EEXIST),
        ),
    ] {
        assert_eq!(apply(&op, &u.merged), expect, "{op}");
        for n in ["a", "b", "c"] {
            let m = fs::symlink_metadata(u.path(&format!("h/{n}"))).unwrap();
            assert_eq!((m.ino(), m.nlink()), (ino, 3), "h/{n} after {op}");
            assert_eq!(fs::read(u.path(&format!("h/{n}"))).unwrap(), b"linked");
        }
    }
    assert!(!u.upper_path("h").exists(), "nothing is copied up");
    assert_eq!(
        apply(&Op::Rename("h/a".into(), "h/b".into(), 0), &k.merged),
        Ok(0)
    );
    assert!(!k.path("h/a").exists(), "the kernel drops the old name");
}
