mod common;
use common::*;

// Copy-up (SPEC §3 "Operations", "Inode numbers"): the first change to an object that lives
// only in a lower layer gives it a complete copy in the upper — same type, mode, owner,
// atime/mtime and xattrs (minus the overlay's private ones), after its missing parent
// directories, each with its own lower metadata — built in the work directory and renamed
// into place. Every test checks the merged view and the upper on disk, that the work
// directory is empty afterwards, that the lowers are unchanged, and that kernel overlayfs,
// given the same operations on the same lowers, shows the same merged tree.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------

/// Owner of the lower objects (not root, so a copy-up that loses the owner shows).
const UID: u32 = 1234;
const GID: u32 = 1234;
/// Times of the lower objects (atime after mtime, both long past).
const ATIME: i64 = 1_400_000_000;
const MTIME: i64 = 1_300_000_000;
/// An mtime after this was set while the test ran.
const RECENT: i64 = 1_600_000_000;
/// Size of the lower regular files.
const LEN: usize = 100_000;
/// A private xattr put on every lower object: never shown, never copied.
const PRIVATE: &str = "trusted.overlay.private_test";

fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn rc(r: libc::c_int) -> Result<(), i32> {
    if r < 0 { Err(last_errno()) } else { Ok(()) }
}

fn io<T>(r: std::io::Result<T>) -> Result<(), i32> {
    r.map(drop)
        .map_err(|e| e.raw_os_error().expect("an OS error"))
}

/// The content of a layer file, read without touching its atime.
fn read_noatime(p: &Path) -> Vec<u8> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(n + 8);
    while out.len() < n {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(n);
    out
}

fn seed_of(rel: &str) -> u64 {
    rel.bytes()
        .fold(7u64, |a, b| a.wrapping_mul(131).wrapping_add(b as u64))
}

/// st_ino of each of `names` in `dir`.
fn numbers_in<'a>(dir: &Path, names: &[&'a str]) -> BTreeMap<&'a str, u64> {
    names.iter().map(|n| (*n, ino(&dir.join(n)))).collect()
}

/// (d_name, d_ino) of every entry of a directory, by readdir(3).
fn dirents(p: &Path) -> BTreeMap<String, u64> {
    let c = cs(p);
    let mut out = BTreeMap::new();
    // SAFETY: opendir/readdir/closedir on a valid path; entries are copied before closedir.
    unsafe {
        let dp = libc::opendir(c.as_ptr());
        assert!(!dp.is_null(), "opendir {}", p.display());
        while let Some((name, ino, _)) = next_entry(dp) {
            out.insert(name, ino);
        }
        libc::closedir(dp);
    }
    out
}

/// Everything copy-up must keep, as lstat and l*xattr report it (targets and contents are
/// read separately, after every stat: reading updates atime).
#[derive(Clone, Debug, PartialEq, Eq)]
struct Meta {
    kind: char,
    mode: u32,
    uid: u32,
    gid: u32,
    atime: i64,
    mtime: i64,
    size: u64,
    nlink: u64,
    rdev: u64,
    xattrs: Vec<(String, Vec<u8>)>,
}

fn kind_of(md: &fs::Metadata) -> char {
    match md.mode() & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFREG => 'f',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => 's',
    }
}

/// The metadata of `p`, with every xattr except security.*/system.* (so a private overlay
/// xattr showing in the merged view is a difference).
fn meta(p: &Path) -> Meta {
    let md = lstat(p);
    let kind = kind_of(&md);
    let xattrs = list_xattrs(p)
        .into_iter()
        .filter(|n| !n.starts_with("security.") && !n.starts_with("system."))
        .map(|n| {
            let v =
                get_xattr(p, &n).unwrap_or_else(|e| panic!("getxattr {n} {}: {e}", p.display()));
            (n, v)
        })
        .collect();
    Meta {
        kind,
        mode: md.mode() & 0o7777,
        uid: md.uid(),
        gid: md.gid(),
        atime: md.atime(),
        mtime: md.mtime(),
        size: if kind == 'd' { 0 } else { md.size() },
        nlink: if kind == 'd' { 0 } else { md.nlink() },
        rdev: md.rdev(),
        xattrs,
    }
}

/// The metadata of an object in a layer on disk, without the overlay's xattrs (kernel
/// overlayfs and unionmount may keep bookkeeping ones there).
fn layer_meta(p: &Path) -> Meta {
    let mut m = meta(p);
    m.xattrs.retain(|(n, _)| !n.starts_with("trusted.overlay."));
    m
}

/// Asserts `got` is `want`, except the mtime when `any_mtime`.
fn check_meta(what: &str, mut got: Meta, want: &Meta, any_mtime: bool) {
    if any_mtime {
        assert!(
            got.mtime > RECENT,
            "{what}: mtime {} should be the time of the change",
            got.mtime
        );
        got.mtime = want.mtime;
    }
    assert_eq!(&got, want, "{what}: metadata (got, want)");
}

/// Every (atime, mtime) under `root`, the root included.
fn times_under(root: &Path) -> Vec<(PathBuf, libc::timespec, libc::timespec)> {
    fn go(p: &Path, out: &mut Vec<(PathBuf, libc::timespec, libc::timespec)>) {
        let md = lstat(p);
        out.push((
            p.to_path_buf(),
            libc::timespec {
                tv_sec: md.atime(),
                tv_nsec: md.atime_nsec(),
            },
            libc::timespec {
                tv_sec: md.mtime(),
                tv_nsec: md.mtime_nsec(),
            },
        ));
        if md.is_dir() {
            for n in children(p) {
                go(&n, out);
            }
        }
    }
    let mut out = Vec::new();
    go(root, &mut out);
    out
}

/// Everything of the lowers that must never change: the whole tree (contents, modes, owners,
/// all xattrs) and every mtime (directories' too). Reading the tree updates atimes, so they
/// are put back: the copies must get the times the test set.
#[derive(Debug, PartialEq)]
struct LowerState {
    trees: Vec<BTreeMap<String, Obj>>,
    mtimes: Vec<Vec<(PathBuf, i64, i64)>>,
}

fn lower_state(l: &Layers) -> LowerState {
    let o = TreeOpts {
        dir_nlink: true,
        mtime: true,
        xattr_prefix: "",
    };
    let mut trees = Vec::new();
    let mut mtimes = Vec::new();
    for lower in &l.lowers {
        let saved = times_under(lower);
        trees.push(tree(lower, &o));
        for (p, a, m) in &saved {
            let c = cs(p);
            let ts = [*a, *m];
            // SAFETY: a NUL-terminated path and two timespecs.
            let r = unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            };
            assert_eq!(r, 0, "restore times of {}", p.display());
        }
        mtimes.push(
            saved
                .into_iter()
                .map(|(p, _, m)| (p, m.tv_sec, m.tv_nsec))
                .collect(),
        );
    }
    LowerState { trees, mtimes }
}

fn assert_lowers_unchanged(l: &Layers, before: &LowerState) {
    let after = lower_state(l);
    for (i, (a, b)) in before.trees.iter().zip(&after.trees).enumerate() {
        assert_same_tree(a, b, &format!("lower{i} before/after"));
    }
    assert_eq!(before.mtimes, after.mtimes, "lower mtimes before/after");
}

/// The work directory holds only its `work` subdirectory, and that is empty.
fn assert_work_empty(m: &Mount) {
    let work = m.work.as_ref().expect("a work dir");
    assert_eq!(names(work), vec!["work"], "work dir {}", work.display());
    assert_eq!(
        names(&work.join("work")),
        Vec::<String>::new(),
        "left behind in {}/work",
        work.display()
    );
}

/// The merged trees of two mounts (TreeOpts::default()), with the mtimes that both set while
/// the test ran blanked out (those are "now" on each side); older mtimes are compared.
fn assert_same_merged(k: &Mount, u: &Mount, what: &str) {
    let o = TreeOpts::default();
    let mut tk = tree(&k.merged, &o);
    let mut tu = tree(&u.merged, &o);
    for (name, a) in tk.iter_mut() {
        if let Some(b) = tu.get_mut(name) {
            if a.mtime > RECENT && b.mtime > RECENT {
                a.mtime = 0;
                b.mtime = 0;
            }
        }
    }
    assert_same_tree(
        &tk,
        &tu,
        &format!("{what}: merged tree (kernel, unionmount)"),
    );
}

// ---------------------------------------------------------------------------------------
// Triggers
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Trig {
    /// open(O_WRONLY), then close, nothing written.
    OpenWrite,
    /// open(O_WRONLY|O_TRUNC).
    OTrunc,
    /// truncate(2) to N bytes.
    TruncateTo(i64),
    /// chmod(2).
    Chmod(u32),
    /// lchown(2).
    Chown(u32, u32),
    /// utimensat(AT_SYMLINK_NOFOLLOW) with (atime, mtime).
    Utimes(i64, i64),
    /// lsetxattr(name, value, 0).
    SetXattr(&'static str, &'static str),
    /// linkat(obj, links/NAME, 0): a new name in an upper-only directory.
    Link,
    /// fallocate(mode 0, 0, N) on an O_WRONLY fd (grows the file to N).
    Fallocate(i64),
}

/// Where Link puts the new name of `rel`.
fn link_name(rel: &str) -> String {
    format!("links/{}", rel.replace('/', "_"))
}

fn apply(root: &Path, rel: &str, t: Trig) -> Result<(), i32> {
    let p = root.join(rel);
    let c = cs(&p);
    // SAFETY (every unsafe block here): plain syscalls on NUL-terminated paths/strings and
    // buffers that outlive the call.
    match t {
        Trig::OpenWrite => io(OpenOptions::new().write(true).open(&p)),
        Trig::OTrunc => io(OpenOptions::new().write(true).truncate(true).open(&p)),
        Trig::TruncateTo(n) => rc(unsafe { libc::truncate(c.as_ptr(), n) }),
        Trig::Chmod(mode) => rc(unsafe { libc::chmod(c.as_ptr(), mode) }),
        Trig::Chown(u, g) => rc(unsafe { libc::lchown(c.as_ptr(), u, g) }),
        Trig::Utimes(a, m) => {
            let ts = [
                libc::timespec {
                    tv_sec: a,
                    tv_nsec: 0,
                },
                libc::timespec {
                    tv_sec: m,
                    tv_nsec: 0,
                },
            ];
            rc(unsafe {
                libc::utimensat(
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    ts.as_ptr(),
                    libc::AT_SYMLINK_NOFOLLOW,
                )
            })
        }
        Trig::SetXattr(name, value) => {
            let n = CString::new(name).unwrap();
            rc(unsafe {
                libc::lsetxattr(
                    c.as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            })
        }
        Trig::Link => {
            let to = cs(&root.join(link_name(rel)));
            rc(unsafe { libc::linkat(libc::AT_FDCWD, c.as_ptr(), libc::AT_FDCWD, to.as_ptr(), 0) })
        }
        Trig::Fallocate(n) => {
            let f = OpenOptions::new()
                .write(true)
                .open(&p)
                .map_err(|e| e.raw_os_error().unwrap())?;
            rc(unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, n) })
        }
    }
}

/// What the object must look like after `t`: (metadata, whether the mtime is "now",
/// regular-file content).
fn expected(lower: &Meta, lower_data: &[u8], t: Trig) -> (Meta, bool, Vec<u8>) {
    let mut m = lower.clone();
    let mut data = lower_data.to_vec();
    let mut any_mtime = false;
    match t {
        Trig::OpenWrite => {}
        Trig::OTrunc => {
            data.clear();
            m.size = 0;
            any_mtime = true;
        }
        Trig::TruncateTo(n) => {
            data.truncate(n as usize);
            m.size = n as u64;
            any_mtime = true;
        }
        Trig::Chmod(mode) => m.mode = mode,
        Trig::Chown(u, g) => (m.uid, m.gid) = (u, g),
        Trig::Utimes(a, mt) => (m.atime, m.mtime) = (a, mt),
        Trig::SetXattr(n, v) => {
            m.xattrs.push((n.to_string(), v.as_bytes().to_vec()));
            m.xattrs.sort();
        }
        Trig::Link => m.nlink = 2,
        Trig::Fallocate(n) => {
            if data.len() < n as usize {
                data.resize(n as usize, 0);
                m.size = n as u64;
                any_mtime = true;
            }
        }
    }
    (m, any_mtime, data)
}

// ---------------------------------------------------------------------------------------
// Lower objects
// ---------------------------------------------------------------------------------------

fn mode_of(kind: char) -> u32 {
    match kind {
        'f' => 0o640,
        'd' => 0o751,
        'p' => 0o620,
        _ => 0o777,
    }
}

/// One lower object of `kind` (f, d, l, p) at `rel`: owner UID:GID, its mode, ATIME/MTIME,
/// user.k (files and directories: ext4 allows user.* nowhere else), trusted.k, and the
/// private PRIVATE. A directory has a file inside (which must stay in the lower).
fn make_obj(b: &LayerBuilder, rel: &str, kind: char) {
    match kind {
        'f' => {
            b.file_bytes(rel, &bytes(LEN, seed_of(rel)));
        }
        'd' => {
            b.dir(rel).file(&format!("{rel}/inside"), "inside");
        }
        'l' => {
            b.symlink(rel, "../some/where");
        }
        'p' => {
            b.fifo(rel);
        }
        _ => unreachable!(),
    }
    if matches!(kind, 'f' | 'd') {
        b.xattr(rel, "user.k", b"user value");
    }
    b.xattr(rel, "trusted.k", b"trusted value")
        .xattr(rel, PRIVATE, b"never copied")
        .chown(rel, UID, GID);
    if kind != 'l' {
        b.chmod(rel, mode_of(kind));
    }
    b.times(rel, ATIME, MTIME);
}

/// Runs each (kind, trigger) on its own lower object `d/<kind><i>`, in a merged directory
/// `d`, and checks everything this file is about.
fn run_cases(cases: &[(char, Trig)]) {
    let l = Layers::new(2);
    let b = l.lower(0);
    b.dir("d");
    let rels: Vec<String> = cases
        .iter()
        .enumerate()
        .map(|(i, (k, _))| format!("d/{k}{i}"))
        .collect();
    for (rel, (k, _)) in rels.iter().zip(cases) {
        make_obj(&b, rel, *k);
    }
    b.xattr("d", "user.dir", b"d")
        .chown("d", UID, GID)
        .chmod("d", 0o755)
        .times("d", ATIME + 1, MTIME + 1);
    // `d` is in lower 0 only (merged parents have their own test); lower 1 adds names to
    // the root.
    l.lower(1).file("other", "o").file("more/x", "x");

    // What the lower objects are (read before anything else reads them).
    let wants: Vec<(Meta, Vec<u8>)> = rels
        .iter()
        .map(|r| {
            let p = b.path(r);
            let m = layer_meta(&p);
            assert_eq!((m.atime, m.mtime, m.uid), (ATIME, MTIME, UID), "{r}: setup");
            let data = if m.kind == 'f' {
                read_noatime(&p)
            } else {
                Vec::new()
            };
            (m, data)
        })
        .collect();
    let d_want = layer_meta(&b.path("d"));
    let before = lower_state(&l);

    let m = l.mount("u");
    fs::create_dir(m.path("links")).unwrap();
    let d_mtime = lstat(&m.path("d")).mtime();
    assert_eq!(d_mtime, MTIME + 1, "merged d before any copy-up");
    let inos: Vec<u64> = rels.iter().map(|r| ino(&m.path(r))).collect();

    for (rel, (_, t)) in rels.iter().zip(cases) {
        assert_eq!(
            apply(&m.merged, rel, *t),
            Ok(()),
            "{rel}: {t:?} through unionmount"
        );
    }

    // The upper as the copy-ups left it, before anything else looks at the mount (lookups
    // and reads can update atimes; `lookups_leave_directory_times_alone` checks those).
    let upper_now: Vec<Meta> = rels.iter().map(|r| layer_meta(&m.upper_path(r))).collect();
    let upper_d = layer_meta(&m.upper_path("d"));

    // Metadata first (reads below update atimes), upper before merged (the merged view
    // reads the upper).
    let mut exp = Vec::new();
    for (i, (rel, (_, t))) in rels.iter().zip(cases).enumerate() {
        let what = format!("{rel} after {t:?}");
        let (want, any_mtime, data) = expected(&wants[i].0, &wants[i].1, *t);
        check_meta(
            &format!("{what}, upper"),
            upper_now[i].clone(),
            &want,
            any_mtime,
        );
        check_meta(
            &format!("{what}, merged"),
            meta(&m.path(rel)),
            &want,
            any_mtime,
        );
        assert_eq!(
            get_xattr(&m.upper_path(rel), PRIVATE),
            Err(libc::ENODATA),
            "{what}: the lower's private xattr was copied to the upper"
        );
        if let Trig::Link = t {
            let ln = link_name(rel);
            check_meta(
                &format!("{what}, upper new name"),
                layer_meta(&m.upper_path(&ln)),
                &want,
                any_mtime,
            );
            check_meta(
                &format!("{what}, merged new name"),
                meta(&m.path(&ln)),
                &want,
                any_mtime,
            );
            assert_eq!(ino(&m.path(&ln)), inos[i], "{what}: new name's st_ino");
            assert_eq!(
                ino(&m.upper_path(&ln)),
                ino(&m.upper_path(rel)),
                "{what}: upper names are not one inode"
            );
        }
        assert_eq!(
            ino(&m.path(rel)),
            inos[i],
            "{what}: st_ino changed by copy-up"
        );
        exp.push(data);
    }
    // The parent was copied up with its own metadata, and copying children into it did not
    // change its times, in the upper or in the view.
    check_meta("d, upper", upper_d, &d_want, false);
    assert_eq!(
        lstat(&m.path("d")).mtime(),
        d_mtime,
        "merged d's mtime changed by copy-ups"
    );

    // Contents, targets, listings.
    for (i, (rel, (k, t))) in rels.iter().zip(cases).enumerate() {
        let what = format!("{rel} after {t:?}");
        match k {
            'f' => {
                assert!(
                    fs::read(m.upper_path(rel)).unwrap() == exp[i],
                    "{what}: upper content"
                );
                assert!(
                    fs::read(m.path(rel)).unwrap() == exp[i],
                    "{what}: merged content"
                );
            }
            'l' => {
                for p in [m.upper_path(rel), m.path(rel)] {
                    assert_eq!(
                        fs::read_link(&p).unwrap().to_str(),
                        Some("../some/where"),
                        "{what}: target of {}",
                        p.display()
                    );
                }
            }
            'd' => {
                assert_eq!(
                    names(&m.upper_path(rel)),
                    Vec::<String>::new(),
                    "{what}: upper copy of a directory is the directory only"
                );
                assert_eq!(m.ls(rel), vec!["inside"], "{what}: merged");
            }
            _ => {}
        }
    }
    // readdir's d_ino is stat's st_ino.
    let ents = dirents(&m.path("d"));
    for (i, rel) in rels.iter().enumerate() {
        let name = rel.strip_prefix("d/").unwrap();
        assert_eq!(ents.get(name), Some(&inos[i]), "{rel}: d_ino after copy-up");
    }
    assert_eq!(m.ls("d").len(), rels.len(), "merged d: {:?}", m.ls("d"));
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    fs::create_dir(k.path("links")).unwrap();
    for (rel, (_, t)) in rels.iter().zip(cases) {
        assert_eq!(
            apply(&k.merged, rel, *t),
            Ok(()),
            "{rel}: {t:?} through kernel overlayfs"
        );
    }
    assert_same_merged(&k, &m, "copy-up");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

// ---------------------------------------------------------------------------------------
// Regular files, one test per trigger
// ---------------------------------------------------------------------------------------

#[test]
fn file_open_for_write() {
    run_cases(&[('f', Trig::OpenWrite)]);
}

#[test]
fn file_open_o_trunc_is_empty() {
    run_cases(&[('f', Trig::OTrunc)]);
}

#[test]
fn file_truncate_keeps_first_bytes() {
    run_cases(&[('f', Trig::TruncateTo(40_000)), ('f', Trig::TruncateTo(1))]);
}

#[test]
fn file_chmod() {
    run_cases(&[('f', Trig::Chmod(0o604))]);
}

#[test]
fn file_chown() {
    run_cases(&[('f', Trig::Chown(4321, 4322))]);
}

#[test]
fn file_utimes() {
    run_cases(&[('f', Trig::Utimes(1_111_111_111, 1_222_222_222))]);
}

#[test]
fn file_setxattr() {
    run_cases(&[
        ('f', Trig::SetXattr("user.new", "n")),
        ('f', Trig::SetXattr("trusted.new", "t")),
    ]);
}

#[test]
fn file_link() {
    run_cases(&[('f', Trig::Link)]);
}

#[test]
fn file_fallocate() {
    run_cases(&[('f', Trig::Fallocate(LEN as i64 + 10_000))]);
}

// ---------------------------------------------------------------------------------------
// Other types
// ---------------------------------------------------------------------------------------

#[test]
fn directory_metadata_changes() {
    run_cases(&[
        ('d', Trig::Chmod(0o705)),
        ('d', Trig::Chown(4321, 4322)),
        ('d', Trig::Utimes(1_111_111_111, 1_222_222_222)),
        ('d', Trig::SetXattr("user.new", "n")),
        ('d', Trig::SetXattr("trusted.new", "t")),
    ]);
}

#[test]
fn symlink_metadata_changes() {
    run_cases(&[
        ('l', Trig::Chown(4321, 4322)),
        ('l', Trig::Utimes(1_111_111_111, 1_222_222_222)),
        ('l', Trig::SetXattr("trusted.new", "t")),
        ('l', Trig::Link),
    ]);
}

#[test]
fn fifo_metadata_changes() {
    run_cases(&[
        ('p', Trig::Chmod(0o600)),
        ('p', Trig::Chown(4321, 4322)),
        ('p', Trig::Utimes(1_111_111_111, 1_222_222_222)),
        ('p', Trig::SetXattr("trusted.new", "t")),
        ('p', Trig::Link),
    ]);
}

// ---------------------------------------------------------------------------------------
// Parents, holes, inode numbers, open descriptors, the work directory
// ---------------------------------------------------------------------------------------

/// A copy-up into a directory already in the upper moves the directory's change time (its
/// mtime is put back), and the view shows it at once, as kernel overlayfs does.
#[test]
fn a_copy_up_moves_its_parents_change_time() {
    let l = Layers::new(1);
    l.lower(0).file("d/f", "f").file("d/g", "g");
    let ctime = |p: &Path| {
        let md = lstat(p);
        (md.ctime(), md.ctime_nsec(), md.mtime(), md.mtime_nsec())
    };
    for kernel in [true, false] {
        let m = if kernel {
            l.mount_kernel("k")
        } else {
            l.mount("u")
        };
        let what = if kernel {
            "kernel overlayfs"
        } else {
            "unionmount"
        };
        assert_eq!(apply(&m.merged, "d/g", Trig::Chmod(0o600)), Ok(()));
        let before = ctime(&m.path("d"));
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(apply(&m.merged, "d/f", Trig::Chmod(0o600)), Ok(()));
        let after = ctime(&m.path("d"));
        assert_ne!(
            (before.0, before.1),
            (after.0, after.1),
            "{what}: ctime of d"
        );
        assert_eq!(
            (before.2, before.3),
            (after.2, after.3),
            "{what}: mtime of d"
        );
        let upper = ctime(&m.upper_path("d"));
        assert_eq!(after, upper, "{what}: the view shows the upper's times");
    }
}

/// a/b/c/f changed: a, a/b and a/b/c are copied first, each with its own mode, owner,
/// times and xattrs; no parent's mtime in the view moves. With `merged`, a and a/b are also
/// in the second lower layer (merged directories).
fn parents_case(merged: bool) {
    let l = Layers::new(2);
    let b = l.lower(0);
    b.file("a/b/c/f", "deep")
        .file("a/b/c/g", "sibling stays below");
    let dirs = [
        ("a", 0o751, 1001, 1002, 1_310_000_000),
        ("a/b", 0o705, 1003, 1004, 1_320_000_000),
        ("a/b/c", 0o770, 1005, 1006, 1_330_000_000),
    ];
    for (d, mode, uid, gid, _) in dirs {
        b.xattr(d, "user.which", d.as_bytes())
            .xattr(d, "trusted.which", d.as_bytes())
            .xattr(d, PRIVATE, b"x")
            .chown(d, uid, gid)
            .chmod(d, mode);
    }
    b.chown("a/b/c/f", UID, GID).times("a/b/c/f", ATIME, MTIME);
    if merged {
        l.lower(1).file("a/b/from1", "1");
    } else {
        l.lower(1).file("elsewhere/from1", "1");
    }
    // Children first: creating them changed the parents' times.
    for (d, _, _, _, t) in dirs.iter().rev() {
        b.times(d, t + 5, *t);
    }
    let wants: Vec<Meta> = dirs.iter().map(|d| layer_meta(&b.path(d.0))).collect();
    for (w, d) in wants.iter().zip(&dirs) {
        assert_eq!(
            (w.mode, w.uid, w.atime, w.mtime),
            (d.1, d.2, d.4 + 5, d.4),
            "{}: setup",
            d.0
        );
    }
    let before = lower_state(&l);

    let m = l.mount("u");
    let view_before: Vec<(i64, i64, u64)> = dirs
        .iter()
        .map(|d| {
            let md = lstat(&m.path(d.0));
            (md.mtime(), md.mtime_nsec(), md.ino())
        })
        .collect();
    let _ = ino(&m.path("a/b/c/f"));
    assert_eq!(apply(&m.merged, "a/b/c/f", Trig::Chmod(0o600)), Ok(()));

    for ((d, ..), want) in dirs.iter().zip(&wants) {
        check_meta(
            &format!("{d}, upper"),
            layer_meta(&m.upper_path(d)),
            want,
            false,
        );
        check_meta(&format!("{d}, merged"), meta(&m.path(d)), want, false);
        assert_eq!(
            get_xattr(&m.upper_path(d), PRIVATE),
            Err(libc::ENODATA),
            "{d}"
        );
    }
    let view_after: Vec<(i64, i64, u64)> = dirs
        .iter()
        .map(|d| {
            let md = lstat(&m.path(d.0));
            (md.mtime(), md.mtime_nsec(), md.ino())
        })
        .collect();
    assert_eq!(
        view_before, view_after,
        "merged (mtime, nsec, ino) of a, a/b, a/b/c"
    );
    // Only the chain and the file are in the upper.
    let upper: Vec<String> = raw_tree(&m.upper_path("")).into_keys().collect();
    assert_eq!(upper, vec!["", "a", "a/b", "a/b/c", "a/b/c/f"], "upper");
    let f = layer_meta(&m.upper_path("a/b/c/f"));
    assert_eq!(
        (f.mode, f.uid, f.gid, f.atime, f.mtime),
        (0o600, UID, GID, ATIME, MTIME),
        "upper a/b/c/f"
    );
    if merged {
        assert_eq!(m.ls("a/b"), vec!["c", "from1"]);
    } else {
        assert_eq!(m.ls("a/b"), vec!["c"]);
    }
    assert_eq!(m.ls("a/b/c"), vec!["f", "g"]);
    assert_eq!(m.read("a/b/c/f"), "deep");
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    assert_eq!(apply(&k.merged, "a/b/c/f", Trig::Chmod(0o600)), Ok(()));
    assert_same_merged(&k, &m, "parents");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

#[test]
fn missing_parents_copied_with_their_own_metadata() {
    parents_case(false);
}

/// The same when the parents are merged directories (in both lowers): looking names up in
/// them must not change their times either, in the lower or in the copy.
#[test]
fn missing_merged_parents_copied_with_their_own_metadata() {
    parents_case(true);
}

fn seek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: a valid open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 { Err(last_errno()) } else { Ok(r) }
}

/// A sparse lower file stays sparse in the upper and reads back identical.
#[test]
fn holes_are_kept() {
    const MIB: u64 = 1 << 20;
    let l = Layers::new(1);
    let a = bytes(4096, 1);
    let z = bytes(4096, 2);
    let make = |rel: &str, size: u64, parts: &[(&[u8], u64)]| {
        let f = File::create(l.lower(0).path(rel)).unwrap();
        f.set_len(size).unwrap();
        for (d, off) in parts {
            f.write_all_at(d, *off).unwrap();
        }
        f.sync_all().unwrap();
    };
    make("sparse", 64 * MIB, &[(&a, MIB), (&z, 40 * MIB)]);
    make("sparse2", 8 * MIB, &[(&a, 0), (&z, 7 * MIB)]);
    let lo = lstat(&l.lower(0).path("sparse"));
    assert!(
        lo.blocks() * 512 < MIB,
        "setup: the lower is not sparse ({} blocks)",
        lo.blocks()
    );
    let mut want = vec![0u8; 64 * MIB as usize];
    want[MIB as usize..MIB as usize + 4096].copy_from_slice(&a);
    want[40 * MIB as usize..40 * MIB as usize + 4096].copy_from_slice(&z);
    let mut want2 = vec![0u8; 8 * MIB as usize];
    want2[..4096].copy_from_slice(&a);
    want2[7 * MIB as usize..7 * MIB as usize + 4096].copy_from_slice(&z);
    want2[3 * MIB as usize..3 * MIB as usize + 4].copy_from_slice(b"NEW!");
    let before = lower_state(&l);

    let ops = |root: &Path| {
        // A copy-up of the whole file, and one followed by a write in the middle of a hole.
        assert_eq!(apply(root, "sparse", Trig::Chmod(0o600)), Ok(()));
        let w = OpenOptions::new()
            .write(true)
            .open(root.join("sparse2"))
            .unwrap();
        w.write_all_at(b"NEW!", 3 * MIB).unwrap();
        w.sync_all().unwrap();
    };
    // The merged view's SEEK_DATA/SEEK_HOLE answers below are the passthrough path's (see
    // files::seek_data_and_hole_on_sparse_files for the page-cached one).
    let m = l.mount_with("u", &["--passthrough", "auto"]);
    ops(&m.merged);

    let up = lstat(&m.upper_path("sparse"));
    assert_eq!(up.size(), 64 * MIB, "upper size");
    assert!(
        up.blocks() * 512 <= MIB,
        "upper copy is not sparse: {} blocks of 512 for 8 KiB of data",
        up.blocks()
    );
    let up2 = lstat(&m.upper_path("sparse2"));
    assert!(
        up2.blocks() * 512 <= MIB,
        "upper sparse2 not sparse: {} blocks",
        up2.blocks()
    );
    let mv = lstat(&m.path("sparse"));
    assert_eq!(
        (mv.size(), mv.blocks()),
        (up.size(), up.blocks()),
        "merged stat is the upper's"
    );
    // The data sits where it sat.
    let uf = File::open(m.upper_path("sparse")).unwrap();
    assert_eq!(
        seek(&uf, 0, libc::SEEK_DATA),
        Ok(MIB as i64),
        "upper: first data"
    );
    assert_eq!(
        seek(&uf, MIB as i64, libc::SEEK_HOLE),
        Ok(MIB as i64 + 4096),
        "upper: hole after it"
    );
    assert_eq!(
        seek(&uf, 2 * MIB as i64, libc::SEEK_DATA),
        Ok(40 * MIB as i64),
        "upper: second data"
    );
    let mf = File::open(m.path("sparse")).unwrap();
    assert_eq!(
        seek(&mf, 0, libc::SEEK_DATA),
        Ok(MIB as i64),
        "merged: SEEK_DATA"
    );

    assert!(
        fs::read(m.upper_path("sparse")).unwrap() == want,
        "upper sparse content"
    );
    assert!(
        fs::read(m.path("sparse")).unwrap() == want,
        "merged sparse content"
    );
    assert!(
        fs::read(m.upper_path("sparse2")).unwrap() == want2,
        "upper sparse2 content"
    );
    assert!(
        fs::read(m.path("sparse2")).unwrap() == want2,
        "merged sparse2 content"
    );
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    ops(&k.merged);
    assert_same_merged(&k, &m, "holes");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

/// SPEC "Inode numbers": stat, write, stat gives one number, and readdir's d_ino is it.
#[test]
fn st_ino_is_kept_across_copy_up() {
    let l = Layers::new(2);
    l.lower(0)
        .file("dir/f", "lower")
        .symlink("dir/l", "f")
        .fifo("dir/p")
        .dir("dir/sub")
        .file("dir/sub/x", "x");
    l.lower(1).file("dir/f2", "deeper layer");
    let before = lower_state(&l);
    let m = l.mount("u");
    let names_ = ["f", "l", "p", "sub", "f2"];
    let inos: Vec<u64> = names_
        .iter()
        .map(|n| ino(&m.path(&format!("dir/{n}"))))
        .collect();
    let dir_ino = ino(&m.path("dir"));
    let mut uniq = inos.clone();
    uniq.push(dir_ino);
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), 6, "st_ino not unique: {inos:?} {dir_ino}");

    m.append("dir/f", " and more");
    m.append("dir/f2", " and more");
    assert_eq!(apply(&m.merged, "dir/l", Trig::Chown(7, 7)), Ok(()));
    assert_eq!(apply(&m.merged, "dir/p", Trig::Chmod(0o600)), Ok(()));
    assert_eq!(apply(&m.merged, "dir/sub", Trig::Chmod(0o700)), Ok(()));

    let after: Vec<u64> = names_
        .iter()
        .map(|n| ino(&m.path(&format!("dir/{n}"))))
        .collect();
    assert_eq!(inos, after, "st_ino of {names_:?} before/after copy-up");
    assert_eq!(
        ino(&m.path("dir")),
        dir_ino,
        "st_ino of the copied-up parent"
    );
    let ents = dirents(&m.path("dir"));
    for (n, i) in names_.iter().zip(&inos) {
        assert_eq!(ents.get(*n), Some(i), "d_ino of dir/{n}");
    }
    assert_eq!(ents.get("."), Some(&dir_ino), "d_ino of dir/.");
    // All of them are in the upper now.
    for n in names_ {
        assert!(
            m.upper_path(&format!("dir/{n}")).symlink_metadata().is_ok(),
            "upper dir/{n}"
        );
    }
    assert_eq!(
        fs::read_to_string(m.upper_path("dir/f")).unwrap(),
        "lower and more"
    );
    assert_eq!(m.read("dir/f2"), "deeper layer and more");
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    k.append("dir/f", " and more");
    k.append("dir/f2", " and more");
    assert_eq!(apply(&k.merged, "dir/l", Trig::Chown(7, 7)), Ok(()));
    assert_eq!(apply(&k.merged, "dir/p", Trig::Chmod(0o600)), Ok(()));
    assert_eq!(apply(&k.merged, "dir/sub", Trig::Chmod(0o700)), Ok(()));
    assert_same_merged(&k, &m, "st_ino");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

/// SPEC "Inode numbers": a copy keeps its number for the life of the mount also once the
/// kernel forgot its inode and looks it up afresh: a copy of a lower hard link, a copy
/// renamed away from its lower name, a copied-up file and directory. stat and readdir agree.
#[test]
fn copies_keep_their_numbers_when_the_kernel_forgets_them() {
    let l = Layers::new(1);
    l.lower(0)
        .file("d/h", "h")
        .hardlink("d/h", "d/h2")
        .file("d/r", "r")
        .file("d/f", "f")
        .file("d/sub/x", "x");
    let names = ["h", "h2", "r2", "f", "sub"];
    let numbers = |root: &Path| numbers_in(&root.join("d"), &names);
    let m = l.mount("u");
    let first = ino(&m.path("d/h"));
    m.append("d/h", "+");
    m.append("d/r", "+");
    m.append("d/f", "+");
    fs::write(m.path("d/sub/y"), "y").unwrap();
    fs::rename(m.path("d/r"), m.path("d/r2")).unwrap();
    let before = numbers(&m.merged);
    assert_eq!(
        before["h"], first,
        "the written name of a hard link keeps its number"
    );
    for round in 0..2 {
        fs::write("/proc/sys/vm/drop_caches", "2").expect("drop the kernel's caches");
        let ents = dirents(&m.path("d"));
        let listed: BTreeMap<&str, u64> = names.iter().map(|n| (*n, ents[*n])).collect();
        assert_eq!(
            listed, before,
            "round {round}: d_ino after the kernel forgot them"
        );
        assert_eq!(
            numbers(&m.merged),
            before,
            "round {round}: st_ino after the kernel forgot them"
        );
    }
}

/// The numbers of `m` by stat (`numbers`), checked against readdir's (`listed`); then `m`
/// is unmounted and its upper (`u`) mounted again.
fn numbered_then_remounted<'a>(
    l: &Layers,
    mut m: Mount,
    numbers: impl Fn(&Path) -> BTreeMap<&'a str, u64>,
    listed: impl Fn(&Path) -> BTreeMap<&'a str, u64>,
) -> (BTreeMap<&'a str, u64>, Mount) {
    let before = numbers(&m.merged);
    assert_eq!(
        listed(&m.merged),
        before,
        "d_ino against st_ino before the remount"
    );
    m.unmount();
    (before, l.mount("u"))
}

/// One copy, one number, for the life of the mount: a copy first looked up while its origin
/// did not apply (renamed away from its lower name, or with a second link) keeps its number
/// and its inode once the origin applies again (renamed back, link removed), also after the
/// kernel forgot it in between; a descriptor opened before sees the same inode.
#[test]
fn a_copy_keeps_its_number_when_its_origin_applies_again() {
    let l = Layers::new(1);
    l.lower(0).file("d/f", "f").file("d/h", "h");
    let m = l.mount_with("u", &["--passthrough", "off"]);
    let forget = || fs::write("/proc/sys/vm/drop_caches", "2").expect("drop caches");
    let d = m.path("d");
    let number = |n: &str| (ino(&d.join(n)), dirents(&d)[n]);

    // Renamed away and back.
    m.append("d/f", "+");
    let first = ino(&d.join("f"));
    fs::rename(d.join("f"), d.join("g")).unwrap();
    forget();
    assert_eq!(number("g"), (first, first), "renamed away");
    let held = File::open(d.join("g")).unwrap();
    fs::rename(d.join("g"), d.join("f")).unwrap();
    assert_eq!(number("f"), (first, first), "renamed back");
    assert_eq!(
        held.metadata().unwrap().ino(),
        first,
        "the descriptor's inode"
    );
    drop(held);
    forget();
    assert_eq!(number("f"), (first, first), "renamed back, forgotten");

    // A second link, then removed.
    m.append("d/h", "+");
    let first = ino(&d.join("h"));
    fs::hard_link(d.join("h"), d.join("h2")).unwrap();
    forget();
    assert_eq!(number("h"), (first, first), "linked");
    let held = File::open(d.join("h")).unwrap();
    fs::remove_file(d.join("h2")).unwrap();
    forget();
    assert_eq!(number("h"), (first, first), "link removed");
    assert_eq!(
        held.metadata().unwrap().ino(),
        first,
        "the descriptor's inode"
    );
}

/// SPEC "Inode numbers" (aim: numbers that survive a remount). A copied-up directory is
/// numbered by the lower directory it merges, as on kernel overlayfs: stat and readdir give
/// the same numbers after a remount, also when readdir comes first; a directory made opaque
/// by a delete and mkdir keeps its own (upper) number.
#[test]
fn merged_directory_numbers_survive_a_remount() {
    let l = Layers::new(2);
    l.lower(0)
        .file("a/b/c/f", "x")
        .file("m/f", "x")
        .dir("m/sub")
        .file("gone/f", "x")
        .dir("keep");
    l.lower(1).file("m/g", "y").dir("m/sub").file("deep/x", "y");
    let dirs = [
        "a", "a/b", "a/b/c", "m", "m/sub", "gone", "keep", "deep", "fresh",
    ];
    let merged = ["a", "a/b", "a/b/c", "m", "m/sub", "keep", "deep"];
    let change = |root: &Path| {
        fs::write(root.join("a/b/c/new"), "n").unwrap();
        fs::write(root.join("m/sub/new"), "n").unwrap();
        fs::write(root.join("deep/new"), "n").unwrap();
        fs::remove_dir_all(root.join("gone")).unwrap();
        fs::create_dir(root.join("gone")).unwrap();
        fs::create_dir(root.join("fresh")).unwrap();
    };
    let numbers = |root: &Path| numbers_in(root, &dirs);
    // d_ino of every directory above, by readdir of its parent.
    let listed = |root: &Path| -> BTreeMap<&str, u64> {
        dirs.iter()
            .map(|d| {
                let p = root.join(d);
                let ents = dirents(p.parent().unwrap());
                let name = p.file_name().unwrap().to_str().unwrap();
                (*d, ents[name])
            })
            .collect()
    };

    let m = l.mount("u");
    change(&m.merged);
    let (before, m) = numbered_then_remounted(&l, m, numbers, listed);
    assert!(
        m.upper_path("m/sub/new").exists(),
        "remounted on the same upper"
    );
    assert_eq!(
        listed(&m.merged),
        before,
        "d_ino after the remount, readdir first"
    );
    assert_eq!(numbers(&m.merged), before, "st_ino after the remount");

    let mut k = l.mount_kernel("k");
    change(&k.merged);
    k.unmount();
    let k = l.mount_kernel("k");
    let kernel = numbers(&k.merged);
    for d in merged {
        assert_eq!(before[d], kernel[d], "{d}: numbered as on kernel overlayfs");
    }
    assert_ne!(
        before["gone"],
        ino(&l.lower(0).path("gone")),
        "an opaque directory is not numbered by the lower one it hides"
    );
}

/// SPEC "Inode numbers" (aim: numbers that survive a remount). A copy-up records its lower
/// file in kernel overlayfs's `overlay.origin`, so a copied-up file keeps its number after a
/// remount (stat and readdir, readdir first), here and on kernel overlayfs mounted on the same
/// upper. A copy of a lower hard link, a copy renamed away from its lower name and a file made
/// over a deleted one show numbers of their own, distinct from every other.
#[test]
fn copied_up_file_numbers_survive_a_remount() {
    let l = Layers::new(2);
    l.lower(0)
        .file("d/f", "f")
        .symlink("d/s", "f")
        .fifo("d/p")
        .file("d/h", "h")
        .hardlink("d/h", "d/h2")
        .file("d/r", "r")
        .file("d/re", "re")
        .file("d/same", "0");
    l.lower(1).file("d/deep", "deep").file("d/same", "1");
    let names = ["f", "s", "p", "h", "h2", "r2", "re", "deep", "same", "new"];
    let kept = ["f", "s", "p", "deep", "same"];
    let numbers = |root: &Path| numbers_in(&root.join("d"), &names);
    let listed = |root: &Path| -> BTreeMap<&str, u64> {
        let ents = dirents(&root.join("d"));
        names.iter().map(|n| (*n, ents[*n])).collect()
    };

    let m = l.mount("u");
    let d = m.path("d");
    for f in ["f", "h", "deep", "same"] {
        m.append(&format!("d/{f}"), "+");
    }
    assert_eq!(apply(&m.merged, "d/s", Trig::Chown(7, 7)), Ok(()));
    assert_eq!(apply(&m.merged, "d/p", Trig::Chmod(0o600)), Ok(()));
    m.append("d/r", "+");
    fs::rename(d.join("r"), d.join("r2")).unwrap();
    fs::remove_file(d.join("re")).unwrap();
    fs::write(d.join("re"), "made again").unwrap();
    fs::write(d.join("new"), "new").unwrap();
    let (before, m) = numbered_then_remounted(&l, m, numbers, listed);
    let after = listed(&m.merged);
    assert_eq!(
        numbers(&m.merged),
        after,
        "d_ino against st_ino after the remount"
    );
    for n in kept {
        assert_eq!(after[n], before[n], "{n}: number after the remount");
    }
    let mut uniq: Vec<u64> = after.values().copied().collect();
    uniq.sort();
    uniq.dedup();
    assert_eq!(uniq.len(), names.len(), "numbers not unique: {after:?}");
    assert_eq!(m.read("d/h"), "h+");
    assert_eq!(m.read("d/h2"), "h");
    let upper = m.upper_path("");
    drop(m);

    // Kernel overlayfs reads the origins unionmount wrote.
    let w = l.mkdir("kwork");
    let km = l.mkdir("kmerged");
    let k = Mount::kernel(&l.lowerdir_opt(), &upper, &w, &km, &[]);
    for n in kept {
        assert_eq!(
            ino(&k.path(&format!("d/{n}"))),
            after[n],
            "{n}: kernel overlayfs's number"
        );
    }
}

/// Kernel overlayfs reads the origins unionmount writes also where the lower filesystem has
/// a UUID (a tmpfs): it checks the UUID in `overlay.origin`, and then shows a copied-up file
/// under its lower file's number, as it shows the lower file itself.
#[test]
fn kernel_overlayfs_reads_origins_on_a_lower_with_a_uuid() {
    let l = Layers::new(1);
    let lower = l.root().join("tmpfs-lower");
    let _t = Tmpfs::new(lower.clone(), "4m");
    fs::write(lower.join("f"), "f").unwrap();
    let lowers = [lower.as_path()];
    let (upper, work, merged) = l.mount_dirs("u");
    let mut m = Mount::union(
        &native_args(&lowers, Some(&upper), Some(&work), &merged),
        merged.clone(),
        Some(upper.clone()),
        Some(work.clone()),
    );
    m.append("f", "+");
    m.unmount();
    let kernel_at = |name: &str, upper: &Path| {
        let b = l.mkdir(name);
        let (w, km) = (b.join("work"), b.join("merged"));
        for d in [upper, &w, &km] {
            fs::create_dir_all(d).unwrap();
        }
        Mount::kernel(&lower.to_string_lossy(), upper, &w, &km, &[])
    };
    let plain = kernel_at("k1", &l.root().join("k1/upper"));
    let lower_number = ino(&plain.path("f"));
    drop(plain);
    let k = kernel_at("k2", &upper);
    assert_eq!(k.read("f"), "f+");
    assert_eq!(
        ino(&k.path("f")),
        lower_number,
        "the copy under its lower file's number"
    );
}

/// Rule (SPEC §3 "Operations": files "behave as on a local filesystem"; POSIX read-after-
/// write coherence): once a write() has returned, a read() of that file returns the new
/// data, through any descriptor — also one opened read-only before the write copied the file
/// up. Kernel overlayfs since 4.19 does the same (it reopens such a descriptor on the upper
/// copy). This holds on the page-cached path; with passthrough the kernel reads a descriptor
/// opened before the copy-up from the lower file itself (README, tests/passthrough.rs).
#[test]
fn read_only_fd_opened_before_copy_up_sees_new_data() {
    let l = Layers::new(1);
    let old = bytes(3 * 4096, 9);
    l.lower(0).file_bytes("f", &old).file("g", "0123456789");
    let before = lower_state(&l);
    let m = l.mount_with("u", &["--passthrough", "off"]);

    let ro = File::open(m.path("f")).unwrap();
    let mut buf = vec![0u8; old.len()];
    ro.read_exact_at(&mut buf, 0).unwrap();
    assert!(buf == old, "ro fd reads the lower data first");
    let ro_g = File::open(m.path("g")).unwrap();
    let mut b10 = [0u8; 10];
    ro_g.read_exact_at(&mut b10, 0).unwrap();
    assert_eq!(&b10, b"0123456789");

    let w = OpenOptions::new().write(true).open(m.path("f")).unwrap();
    w.write_all_at(b"NEW DATA", 0).unwrap();
    w.write_all_at(b"MIDDLE", 5000).unwrap();
    w.sync_all().unwrap();
    let mut want = old.clone();
    want[..8].copy_from_slice(b"NEW DATA");
    want[5000..5006].copy_from_slice(b"MIDDLE");
    assert!(
        fs::read(m.upper_path("f")).unwrap() == want,
        "upper content"
    );

    // Drop the clean cached pages of the file, so that reads go to the filesystem.
    // SAFETY: a valid open fd.
    unsafe { libc::posix_fadvise(ro.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    let mut got = vec![0u8; 8];
    ro.read_exact_at(&mut got, 0).unwrap();
    assert_eq!(
        &got, b"NEW DATA",
        "ro fd opened before the copy-up, offset 0"
    );
    let mut got = vec![0u8; 6];
    ro.read_exact_at(&mut got, 5000).unwrap();
    assert_eq!(
        &got, b"MIDDLE",
        "ro fd opened before the copy-up, offset 5000"
    );
    let mut all = Vec::new();
    (&ro).read_to_end(&mut all).unwrap();
    assert!(all == want, "whole file through the old ro fd");

    // A truncate by path: a descriptor opened before sees the new size.
    assert_eq!(apply(&m.merged, "g", Trig::TruncateTo(4)), Ok(()));
    let mut rest = Vec::new();
    (&ro_g).read_to_end(&mut rest).unwrap();
    assert_eq!(
        rest, b"0123",
        "old ro fd of g after truncate to 4 (reads from offset 0)"
    );
    assert_eq!(fs::read(m.upper_path("g")).unwrap(), b"0123");
    assert_eq!(m.read("g"), "0123");
    drop((ro, ro_g, w));
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    let w = OpenOptions::new().write(true).open(k.path("f")).unwrap();
    w.write_all_at(b"NEW DATA", 0).unwrap();
    w.write_all_at(b"MIDDLE", 5000).unwrap();
    drop(w);
    assert_eq!(apply(&k.merged, "g", Trig::TruncateTo(4)), Ok(()));
    assert_same_merged(&k, &m, "ro fd");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

/// Looking names up, stat()ing and copying up inside a directory changes neither the
/// directory's times in the lowers nor those of its copy (on a local filesystem, and in
/// kernel overlayfs, only readdir updates a directory's atime). Checked first on kernel
/// overlayfs, as the oracle, then on unionmount.
#[test]
fn lookups_leave_directory_times_alone() {
    let l = Layers::new(2);
    // x: in lower 0 only; y: merged (both lowers).
    l.lower(0)
        .file("x/f", "f")
        .file("x/g", "g")
        .file("y/f", "f");
    l.lower(1).file("y/h", "h");
    let dirs = [(0, "x"), (0, "y"), (1, "y")];
    for (i, d) in dirs {
        l.lower(i).times(d, ATIME, MTIME);
    }
    let lower_times = || -> Vec<(i64, i64)> {
        dirs.iter()
            .map(|(i, d)| {
                let md = lstat(&l.lower(*i).path(d));
                (md.atime(), md.mtime())
            })
            .collect()
    };
    assert_eq!(lower_times(), vec![(ATIME, MTIME); 3], "setup");
    let before = lower_state(&l);

    let ops = |m: &Mount| {
        for rel in ["x/f", "y/f", "x/g", "y/h"] {
            lstat(&m.path(rel));
        }
        assert_eq!(apply(&m.merged, "x/f", Trig::Chmod(0o600)), Ok(()));
        assert_eq!(apply(&m.merged, "y/f", Trig::Chmod(0o600)), Ok(()));
        for rel in ["x/f", "y/f", "x/g", "y/h", "x/nothing", "y/nothing"] {
            let _ = fs::symlink_metadata(m.path(rel));
        }
        assert_eq!(apply(&m.merged, "x/g", Trig::Chmod(0o600)), Ok(()));
        assert_eq!(apply(&m.merged, "y/h", Trig::Chmod(0o600)), Ok(()));
    };
    let uppers = |m: &Mount| -> Vec<(i64, i64)> {
        ["x", "y"]
            .iter()
            .map(|d| {
                let md = lstat(&m.upper_path(d));
                (md.atime(), md.mtime())
            })
            .collect()
    };

    let k = l.mount_kernel("k");
    ops(&k);
    assert_eq!(
        lower_times(),
        vec![(ATIME, MTIME); 3],
        "kernel overlayfs: lower dirs' (atime, mtime)"
    );
    assert_eq!(
        uppers(&k),
        vec![(ATIME, MTIME); 2],
        "kernel overlayfs: upper x, y (atime, mtime)"
    );

    let m = l.mount("u");
    ops(&m);
    assert_eq!(
        lower_times(),
        vec![(ATIME, MTIME); 3],
        "unionmount: lower dirs' (atime, mtime)"
    );
    assert_eq!(
        uppers(&m),
        vec![(ATIME, MTIME); 2],
        "unionmount: upper x, y (atime, mtime)"
    );
    assert_work_empty(&m);
    assert_same_merged(&k, &m, "lookups");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

/// Many copy-ups of every kind, several racing on one file: one copy each, nothing left in
/// the work directory, the lowers untouched.
#[test]
fn work_dir_is_empty_after_copy_ups() {
    let l = Layers::new(2);
    let b = l.lower(0);
    for i in 0..20 {
        b.file_bytes(&format!("t/f{i}"), &bytes(200_000 + i * 1000, i as u64));
    }
    b.file_bytes("race", &bytes(1 << 20, 77))
        .dir("t/d/e")
        .symlink("t/l", "f0")
        .fifo("t/p");
    l.lower(1).file("t/below", "b").file("race2", "r");
    let before = lower_state(&l);

    let ops = |root: &Path| {
        for i in 0..20 {
            let t = [
                Trig::OpenWrite,
                Trig::OTrunc,
                Trig::TruncateTo(5),
                Trig::Chmod(0o600),
            ][i % 4];
            assert_eq!(apply(root, &format!("t/f{i}"), t), Ok(()), "t/f{i} {t:?}");
        }
        assert_eq!(apply(root, "t/d/e", Trig::Chmod(0o700)), Ok(()));
        assert_eq!(apply(root, "t/l", Trig::Chown(5, 5)), Ok(()));
        assert_eq!(apply(root, "t/p", Trig::Chmod(0o600)), Ok(()));
        // Eight threads open one lower file for writing at once and write their own byte.
        let threads: Vec<_> = (0..8u8)
            .map(|i| {
                let p = root.join("race");
                let p2 = root.join("race2");
                std::thread::spawn(move || {
                    let f = OpenOptions::new().write(true).open(&p).unwrap();
                    f.write_all_at(&[i], 4096 * i as u64).unwrap();
                    let f = OpenOptions::new().write(true).open(&p2).unwrap();
                    f.write_all_at(b"R", 0).unwrap();
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    };
    let m = l.mount("u");
    ops(&m.merged);
    let mut want = bytes(1 << 20, 77);
    for i in 0..8 {
        want[4096 * i] = i as u8;
    }
    assert!(
        fs::read(m.upper_path("race")).unwrap() == want,
        "upper race: every write kept"
    );
    assert!(fs::read(m.path("race")).unwrap() == want, "merged race");
    assert_eq!(fs::read(m.upper_path("race2")).unwrap(), b"R");
    assert_eq!(lstat(&m.upper_path("race")).nlink(), 1);
    assert_eq!(
        fs::read(m.upper_path("t/f2")).unwrap(),
        &bytes(202_000, 2)[..5]
    );
    assert_eq!(lstat(&m.upper_path("t/f1")).size(), 0);
    assert_eq!(m.ls("t/d"), vec!["e"]);
    assert_eq!(names(&m.upper_path("t/d")), vec!["e"]);
    assert_work_empty(&m);

    let k = l.mount_kernel("k");
    ops(&k.merged);
    assert_same_merged(&k, &m, "many copy-ups");
    drop(k);
    drop(m);
    assert_lowers_unchanged(&l, &before);
}

/// Kernel overlayfs mounted on an upper unionmount wrote lists copies under the numbers its
/// stat shows (their lower files'): unionmount marks `overlay.impure` the directories kernel
/// overlayfs marks, the parent of a copy-up and the new parent of a copy moved by a rename,
/// which make kernel overlayfs number those listings' entries by lookup. Before, `d_ino` was
/// the upper file's own number there (a copy in a merged directory whose upper already
/// existed, and a copy moved into an upper-only directory).
#[test]
fn kernel_overlayfs_lists_copies_under_their_numbers() {
    let l = Layers::new(1);
    l.lower(0)
        .file("d/f", "f")
        .file("d/g", "g")
        .file("e/h", "h");
    let (upper, _, _) = l.mount_dirs("u");
    fs::create_dir(upper.join("d")).unwrap();
    let mut m = l.mount("u");
    fs::set_permissions(
        m.path("d/f"),
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    fs::rename(m.path("e/h"), m.path("d/h")).unwrap();
    fs::create_dir(m.path("n")).unwrap();
    fs::rename(m.path("d/g"), m.path("n/g")).unwrap();
    m.unmount();
    let b = l.mkdir("k");
    let (w, km) = (b.join("work"), b.join("merged"));
    for d in [&w, &km] {
        fs::create_dir_all(d).unwrap();
    }
    let k = Mount::kernel(&l.lowerdir_opt(), &upper, &w, &km, &[]);
    for (dir, name) in [("d", "f"), ("d", "h"), ("n", "g")] {
        let listed = fs::read_dir(k.path(dir))
            .unwrap()
            .map(|e| e.unwrap())
            .find(|e| e.file_name() == name)
            .map(|e| std::os::unix::fs::DirEntryExt::ino(&e));
        assert_eq!(
            listed,
            Some(ino(&k.path(&format!("{dir}/{name}")))),
            "{dir}/{name}: kernel overlayfs's listing and stat"
        );
    }
}

/// A copy-up that fails with ENOENT (its work directory removed under the mount) fails the
/// open with ENOENT, as on kernel overlayfs: only an open whose file went away is answered
/// ESTALE (so that the kernel walks the path again). Before, any ENOENT of a file's open
/// became ESTALE, which reached the program.
#[test]
fn a_copy_up_without_its_work_directory_fails_with_enoent() {
    let l = Layers::new(1);
    l.lower(0).file("d/f", "f");
    let m = l.mount("u");
    let (_, work, _) = l.mount_dirs("u");
    fs::remove_dir_all(work.join("work")).unwrap();
    let e = OpenOptions::new()
        .write(true)
        .open(m.path("d/f"))
        .unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::ENOENT), "{e}");
}

/// Copies are built in the work directory, so nothing of it may pass on to them: a default
/// ACL that its `work/` took from its parent at mkdir (one naming `nobody` here) gave every
/// copy-up, and so every file later made in a copied-up directory, its entries (nobody could
/// read a copied-up 0660 root file, new files came out `-rw-r--rwx`). The daemon strips both
/// ACLs and the mode of `work/` at mount, as kernel overlayfs does. Kernel overlayfs as the
/// oracle (fstests overlay/023).
#[test]
fn a_default_acl_on_the_work_directory_does_not_reach_copies() {
    let l = Layers::new(1);
    l.lower(0).file("f", "secret").file("d/e", "e");
    l.lower(0).chmod("f", 0o660).chmod("d", 0o755);
    for kernel in [true, false] {
        let name = if kernel { "k" } else { "u" };
        let work = l.mkdir(&format!("{name}/work"));
        let st = std::process::Command::new("setfacl")
            .args(["-d", "-m", "u:nobody:rwx"])
            .arg(&work)
            .status()
            .unwrap();
        assert!(st.success(), "setfacl");
        let m = if kernel {
            l.mount_kernel(name)
        } else {
            l.mount(name)
        };
        let what = if kernel {
            "kernel overlayfs"
        } else {
            "unionmount"
        };
        assert_eq!(apply(&m.merged, "f", Trig::Chown(0, 0)), Ok(()));
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o022) };
        let made = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.path("d/new"));
        // SAFETY: as above.
        unsafe { libc::umask(old) };
        made.unwrap();
        for (rel, acl) in [
            ("f", "system.posix_acl_access"),
            ("d", "system.posix_acl_access"),
            ("d", "system.posix_acl_default"),
            ("d/new", "system.posix_acl_access"),
        ] {
            assert_eq!(
                get_xattr(&m.path(rel), acl),
                Err(libc::ENODATA),
                "{what}: {acl} of {rel}"
            );
        }
        assert_eq!(lstat(&m.path("f")).mode() & 0o7777, 0o660, "{what}: f");
        assert_eq!(
            lstat(&m.path("d/new")).mode() & 0o7777,
            0o644,
            "{what}: a file made in the copied-up d"
        );
    }
}
