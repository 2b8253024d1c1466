mod common;
use common::*;

// File operations through the mount: attributes, xattrs, data, locks, mmap, statfs,
// read-only mounts, inode numbers and hard links. Each test checks the merged view and,
// where something changes, the upper layer on disk (and that the lowers stay untouched).

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------

fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn rc(r: libc::c_int) -> Result<(), i32> {
    if r < 0 { Err(last_errno()) } else { Ok(()) }
}

fn lstat(p: &Path) -> fs::Metadata {
    fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()))
}

fn truncate(p: &Path, len: i64) -> Result<(), i32> {
    let c = cs(p);
    // SAFETY: NUL-terminated path.
    rc(unsafe { libc::truncate(c.as_ptr(), len) })
}

fn chmod(p: &Path, mode: u32) -> Result<(), i32> {
    let c = cs(p);
    // SAFETY: NUL-terminated path.
    rc(unsafe { libc::chmod(c.as_ptr(), mode) })
}

fn lchown(p: &Path, uid: u32, gid: u32) -> Result<(), i32> {
    let c = cs(p);
    // SAFETY: NUL-terminated path.
    rc(unsafe { libc::lchown(c.as_ptr(), uid, gid) })
}

fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// utimensat(AT_FDCWD, p, times, AT_SYMLINK_NOFOLLOW); `None` means a NULL times pointer.
fn utimens(p: &Path, times: Option<[libc::timespec; 2]>) -> Result<(), i32> {
    let c = cs(p);
    let ptr = times.as_ref().map_or(std::ptr::null(), |t| t.as_ptr());
    // SAFETY: NUL-terminated path, and a NULL or two-element times array.
    rc(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ptr, libc::AT_SYMLINK_NOFOLLOW) })
}

fn setx(p: &Path, name: &str, value: &[u8], flags: i32) -> Result<(), i32> {
    let c = cs(p);
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings, readable buffer.
    rc(unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            flags,
        )
    })
}

fn removex(p: &Path, name: &str) -> Result<(), i32> {
    let c = cs(p);
    let n = CString::new(name).unwrap();
    // SAFETY: NUL-terminated strings.
    rc(unsafe { libc::lremovexattr(c.as_ptr(), n.as_ptr()) })
}

/// lgetxattr with a buffer of `size` bytes (a NULL buffer for 0): the returned length.
fn getx_len(p: &Path, name: &str, size: usize) -> Result<usize, i32> {
    let c = cs(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: NUL-terminated strings, writable buffer of `size` bytes (or NULL with 0).
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), ptr, size) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r as usize)
    }
}

/// llistxattr with a buffer of `size` bytes (a NULL buffer for 0): the returned length.
fn listx_len(p: &Path, size: usize) -> Result<usize, i32> {
    let c = cs(p);
    let mut buf = vec![0u8; size];
    let ptr = if size == 0 {
        std::ptr::null_mut()
    } else {
        buf.as_mut_ptr().cast()
    };
    // SAFETY: NUL-terminated path, writable buffer of `size` bytes (or NULL with 0).
    let r = unsafe { libc::llistxattr(c.as_ptr(), ptr, size) };
    if r < 0 {
        Err(last_errno())
    } else {
        Ok(r as usize)
    }
}

/// The user.* xattr names of `p`, sorted.
fn user_xattrs(p: &Path) -> Vec<String> {
    list_xattrs(p)
        .into_iter()
        .filter(|n| n.starts_with("user."))
        .collect()
}

fn fallocate(f: &File, mode: i32, off: i64, len: i64) -> Result<(), i32> {
    // SAFETY: a valid open fd.
    rc(unsafe { libc::fallocate(f.as_raw_fd(), mode, off, len) })
}

fn lseek(f: &File, off: i64, whence: i32) -> Result<i64, i32> {
    // SAFETY: a valid open fd.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 { Err(last_errno()) } else { Ok(r) }
}

fn statvfs(p: &Path) -> libc::statvfs {
    let c = cs(p);
    // SAFETY: NUL-terminated path and a zeroed out-struct.
    unsafe {
        let mut s: libc::statvfs = std::mem::zeroed();
        assert_eq!(
            libc::statvfs(c.as_ptr(), &mut s),
            0,
            "statvfs {}: {}",
            p.display(),
            std::io::Error::last_os_error()
        );
        s
    }
}

/// Deterministic pseudo-random bytes (xorshift64*).
fn random_bytes(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
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

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn rw(p: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap_or_else(|e| panic!("open rw {}: {e}", p.display()))
}

// ---------------------------------------------------------------------------------------
// Attributes
// ---------------------------------------------------------------------------------------

#[test]
fn truncate_grow_and_shrink() {
    let l = Layers::new(1);
    l.lower(0)
        .file("lo", "hello world")
        .file("lo2", "abc")
        .times("lo", 1000, 2000);
    let m = l.mount("u");

    // Shrink a lower-only file by path: copied up, then cut.
    assert!(!m.upper_path("lo").exists());
    truncate(&m.path("lo"), 5).unwrap();
    assert_eq!(m.read("lo"), "hello");
    assert_eq!(lstat(&m.path("lo")).len(), 5);
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"hello");
    // Grow it again: the new bytes read as zeros.
    truncate(&m.path("lo"), 12).unwrap();
    let want = b"hello\0\0\0\0\0\0\0".to_vec();
    assert_eq!(fs::read(m.path("lo")).unwrap(), want);
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), want);
    assert_eq!(fs::read(l.lower(0).path("lo")).unwrap(), b"hello world");

    // Grow a lower-only file through ftruncate on a write fd.
    let f = OpenOptions::new().write(true).open(m.path("lo2")).unwrap();
    f.set_len(10).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 10);
    drop(f);
    let want = b"abc\0\0\0\0\0\0\0".to_vec();
    assert_eq!(fs::read(m.path("lo2")).unwrap(), want);
    assert_eq!(fs::read(m.upper_path("lo2")).unwrap(), want);
    assert_eq!(fs::read(l.lower(0).path("lo2")).unwrap(), b"abc");

    // An upper file.
    m.write("up", "0123456789");
    truncate(&m.path("up"), 3).unwrap();
    assert_eq!(m.read("up"), "012");
    assert_eq!(fs::read(m.upper_path("up")).unwrap(), b"012");
    truncate(&m.path("up"), 8192).unwrap();
    let mut want = b"012".to_vec();
    want.resize(8192, 0);
    assert_eq!(fs::read(m.path("up")).unwrap(), want);
    assert_eq!(fs::read(m.upper_path("up")).unwrap(), want);
    assert_eq!(lstat(&m.upper_path("up")).len(), 8192);
    truncate(&m.path("up"), 0).unwrap();
    assert_eq!(lstat(&m.path("up")).len(), 0);
    assert_eq!(lstat(&m.upper_path("up")).len(), 0);
    // Truncating a directory is EISDIR, as on a local filesystem.
    fs::create_dir(m.path("dir")).unwrap();
    assert_eq!(truncate(&m.path("dir"), 0), Err(libc::EISDIR));
}

#[test]
fn chmod_lower_and_upper() {
    let l = Layers::new(2);
    l.lower(0)
        .file("lo", "x")
        .chmod("lo", 0o644)
        .times("lo", 1000, 2000)
        .dir("d")
        .file("d/f", "f");
    l.lower(0).chmod("d", 0o755);
    l.lower(1).file("d/g", "g");
    let m = l.mount("u");

    chmod(&m.path("lo"), 0o600).unwrap();
    assert_eq!(lstat(&m.path("lo")).mode() & 0o7777, 0o600);
    let up = lstat(&m.upper_path("lo"));
    assert_eq!(up.mode() & 0o7777, 0o600);
    assert_eq!(up.mtime(), 2000, "copy-up keeps mtime");
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"x");
    assert_eq!(m.read("lo"), "x");
    assert_eq!(lstat(&l.lower(0).path("lo")).mode() & 0o7777, 0o644);

    // A merged directory: copied up (not opaque), still merged.
    chmod(&m.path("d"), 0o700).unwrap();
    assert_eq!(lstat(&m.path("d")).mode() & 0o7777, 0o700);
    assert_eq!(lstat(&m.upper_path("d")).mode() & 0o7777, 0o700);
    assert_eq!(m.ls("d"), vec!["f", "g"]);
    assert_eq!(lstat(&l.lower(0).path("d")).mode() & 0o7777, 0o755);

    // An upper file, including the setuid/sticky bits.
    m.write("up", "u");
    chmod(&m.path("up"), 0o4751).unwrap();
    assert_eq!(lstat(&m.path("up")).mode() & 0o7777, 0o4751);
    assert_eq!(lstat(&m.upper_path("up")).mode() & 0o7777, 0o4751);
    chmod(&m.path("up"), 0o640).unwrap();
    assert_eq!(lstat(&m.path("up")).mode() & 0o7777, 0o640);
    assert_eq!(lstat(&m.upper_path("up")).mode() & 0o7777, 0o640);
}

#[test]
fn chown_lower_and_upper() {
    let l = Layers::new(1);
    l.lower(0)
        .file("lo", "x")
        .file("target", "t")
        .symlink("ln", "target")
        .dir("d")
        .file("d/f", "f");
    let m = l.mount("u");

    lchown(&m.path("lo"), 1234, u32::MAX).unwrap();
    let md = lstat(&m.path("lo"));
    assert_eq!((md.uid(), md.gid()), (1234, 0));
    let up = lstat(&m.upper_path("lo"));
    assert_eq!((up.uid(), up.gid()), (1234, 0));
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"x");
    assert_eq!(lstat(&l.lower(0).path("lo")).uid(), 0);

    // lchown of a lower symlink copies the link itself up, not its target.
    lchown(&m.path("ln"), 1234, 1234).unwrap();
    let md = lstat(&m.path("ln"));
    assert!(md.file_type().is_symlink());
    assert_eq!((md.uid(), md.gid()), (1234, 1234));
    let up = lstat(&m.upper_path("ln"));
    assert!(up.file_type().is_symlink());
    assert_eq!((up.uid(), up.gid()), (1234, 1234));
    assert_eq!(
        fs::read_link(m.upper_path("ln")).unwrap().to_str(),
        Some("target")
    );
    assert_eq!(lstat(&m.path("target")).uid(), 0);
    assert!(!m.upper_path("target").exists());

    // A lower directory.
    lchown(&m.path("d"), 1234, 1234).unwrap();
    assert_eq!(lstat(&m.path("d")).uid(), 1234);
    assert_eq!(lstat(&m.upper_path("d")).uid(), 1234);
    assert_eq!(m.ls("d"), vec!["f"]);

    // An upper file.
    m.write("up", "u");
    lchown(&m.path("up"), 1234, 1234).unwrap();
    let md = lstat(&m.path("up"));
    assert_eq!((md.uid(), md.gid()), (1234, 1234));
    let up = lstat(&m.upper_path("up"));
    assert_eq!((up.uid(), up.gid()), (1234, 1234));
}

#[test]
fn times_before_1970_keep_their_nanoseconds() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "x");
    let mut m = l.mount("u");
    fs::write(m.path("up"), "y").unwrap();
    // 1969-12-31 23:59:59.5 and 23:59:55.000000003, as `touch -d` or `tar -x` set them.
    let t = [ts(-1, 500_000_000), ts(-5, 3)];
    let times = |md: &fs::Metadata| (md.atime(), md.atime_nsec(), md.mtime(), md.mtime_nsec());
    let want = (-1, 500_000_000, -5, 3);
    for name in ["lo", "up"] {
        utimens(&m.path(name), Some(t)).unwrap();
        assert_eq!(times(&lstat(&m.path(name))), want, "{name} in the view");
        assert_eq!(
            times(&lstat(&m.upper_path(name))),
            want,
            "{name} in the upper"
        );
    }
    // Read back from the upper by a new mount.
    m.unmount();
    let m = l.mount("u");
    for name in ["lo", "up"] {
        assert_eq!(times(&lstat(&m.path(name))), want, "{name} after a remount");
    }
}

#[test]
fn utimensat_explicit_and_now() {
    let l = Layers::new(1);
    l.lower(0)
        .file("lo", "x")
        .times("lo", 100, 200)
        .file("lo2", "y")
        .times("lo2", 100, 200)
        .file("target", "t")
        .symlink("ln", "target");
    let m = l.mount("u");

    // Explicit times with nanoseconds on a lower-only file. (Atime is checked before any
    // read of the file, which could legitimately move it.)
    let t = [
        ts(1_000_000_000, 123_456_789),
        ts(1_100_000_000, 987_654_321),
    ];
    utimens(&m.path("lo"), Some(t)).unwrap();
    for (what, md) in [
        ("merged", lstat(&m.path("lo"))),
        ("upper", lstat(&m.upper_path("lo"))),
    ] {
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            (1_000_000_000, 123_456_789),
            "{what} atime"
        );
        assert_eq!(
            (md.mtime(), md.mtime_nsec()),
            (1_100_000_000, 987_654_321),
            "{what} mtime"
        );
    }
    assert_eq!(m.read("lo"), "x");
    assert_eq!(lstat(&l.lower(0).path("lo")).mtime(), 200);

    // UTIME_NOW for both, on another lower-only file.
    let before = now_secs();
    utimens(
        &m.path("lo2"),
        Some([ts(0, libc::UTIME_NOW), ts(0, libc::UTIME_NOW)]),
    )
    .unwrap();
    let after = now_secs();
    for (what, md) in [
        ("merged", lstat(&m.path("lo2"))),
        ("upper", lstat(&m.upper_path("lo2"))),
    ] {
        assert!(
            md.mtime() >= before - 1 && md.mtime() <= after + 1,
            "{what}: mtime {} not now ({before}..{after})",
            md.mtime()
        );
        assert!(
            md.atime() >= before - 1 && md.atime() <= after + 1,
            "{what}: atime {} not now",
            md.atime()
        );
    }
    assert_eq!(lstat(&l.lower(0).path("lo2")).mtime(), 200);

    // A symlink's own times (AT_SYMLINK_NOFOLLOW): the link is copied up, the target not.
    utimens(&m.path("ln"), Some([ts(5000, 0), ts(6000, 0)])).unwrap();
    assert_eq!(lstat(&m.path("ln")).mtime(), 6000);
    assert_eq!(lstat(&m.upper_path("ln")).mtime(), 6000);
    assert_ne!(lstat(&m.path("target")).mtime(), 6000);

    // An upper file: explicit, UTIME_OMIT for atime, then NULL times (= now).
    m.write("up", "u");
    utimens(&m.path("up"), Some([ts(300, 1), ts(400, 2)])).unwrap();
    for md in [lstat(&m.path("up")), lstat(&m.upper_path("up"))] {
        assert_eq!((md.atime(), md.atime_nsec()), (300, 1));
        assert_eq!((md.mtime(), md.mtime_nsec()), (400, 2));
    }
    utimens(&m.path("up"), Some([ts(0, libc::UTIME_OMIT), ts(500, 0)])).unwrap();
    for md in [lstat(&m.path("up")), lstat(&m.upper_path("up"))] {
        assert_eq!(
            (md.atime(), md.atime_nsec()),
            (300, 1),
            "UTIME_OMIT kept atime"
        );
        assert_eq!(md.mtime(), 500);
    }
    let before = now_secs();
    utimens(&m.path("up"), None).unwrap();
    let after = now_secs();
    for md in [lstat(&m.path("up")), lstat(&m.upper_path("up"))] {
        assert!(md.mtime() >= before - 1 && md.mtime() <= after + 1);
        assert!(md.atime() >= before - 1 && md.atime() <= after + 1);
    }
}

// ---------------------------------------------------------------------------------------
// Extended attributes
// ---------------------------------------------------------------------------------------

#[test]
fn xattrs_on_lower_file_copy_up() {
    let l = Layers::new(2);
    l.lower(0)
        .file("lo", "data")
        .xattr("lo", "user.a", b"1")
        .dir("d")
        .xattr("d", "user.da", b"x")
        .file("d/f", "f");
    l.lower(1).file("d/g", "g");
    let m = l.mount("u");

    assert_eq!(get_xattr(&m.path("lo"), "user.a"), Ok(b"1".to_vec()));
    assert_eq!(user_xattrs(&m.path("lo")), vec!["user.a"]);
    assert!(!m.upper_path("lo").exists(), "reading xattrs copied up");

    setx(&m.path("lo"), "user.b", b"2", 0).unwrap();
    assert_eq!(get_xattr(&m.path("lo"), "user.b"), Ok(b"2".to_vec()));
    assert_eq!(user_xattrs(&m.path("lo")), vec!["user.a", "user.b"]);
    // Copied up with its data and its old xattrs.
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"data");
    assert_eq!(get_xattr(&m.upper_path("lo"), "user.a"), Ok(b"1".to_vec()));
    assert_eq!(get_xattr(&m.upper_path("lo"), "user.b"), Ok(b"2".to_vec()));

    removex(&m.path("lo"), "user.a").unwrap();
    assert_eq!(get_xattr(&m.path("lo"), "user.a"), Err(libc::ENODATA));
    assert_eq!(user_xattrs(&m.path("lo")), vec!["user.b"]);
    assert_eq!(user_xattrs(&m.upper_path("lo")), vec!["user.b"]);
    // The lower is untouched.
    assert_eq!(user_xattrs(&l.lower(0).path("lo")), vec!["user.a"]);

    // Remove from a lower-only file: copy-up, then removal.
    l.lower(0).file("lo3", "3").xattr("lo3", "user.z", b"z");
    removex(&m.path("lo3"), "user.z").unwrap();
    assert_eq!(user_xattrs(&m.path("lo3")), Vec::<String>::new());
    assert!(m.upper_path("lo3").exists());
    assert_eq!(user_xattrs(&m.upper_path("lo3")), Vec::<String>::new());
    assert_eq!(fs::read(m.upper_path("lo3")).unwrap(), b"3");
    assert_eq!(user_xattrs(&l.lower(0).path("lo3")), vec!["user.z"]);

    // A merged directory: copied up keeping its xattr, and still merged.
    setx(&m.path("d"), "user.db", b"y", 0).unwrap();
    assert_eq!(user_xattrs(&m.path("d")), vec!["user.da", "user.db"]);
    assert_eq!(user_xattrs(&m.upper_path("d")), vec!["user.da", "user.db"]);
    assert_eq!(m.ls("d"), vec!["f", "g"]);
}

#[test]
fn xattrs_on_upper_file() {
    let l = Layers::new(1);
    let m = l.mount("u");
    m.write("up", "u");
    let p = m.path("up");
    setx(&p, "user.one", b"1", 0).unwrap();
    setx(&p, "user.two", b"22", libc::XATTR_CREATE).unwrap();
    assert_eq!(get_xattr(&p, "user.one"), Ok(b"1".to_vec()));
    assert_eq!(get_xattr(&p, "user.two"), Ok(b"22".to_vec()));
    assert_eq!(user_xattrs(&p), vec!["user.one", "user.two"]);
    assert_eq!(
        user_xattrs(&m.upper_path("up")),
        vec!["user.one", "user.two"]
    );
    setx(&p, "user.one", b"111", libc::XATTR_REPLACE).unwrap();
    assert_eq!(get_xattr(&p, "user.one"), Ok(b"111".to_vec()));
    assert_eq!(
        get_xattr(&m.upper_path("up"), "user.one"),
        Ok(b"111".to_vec())
    );
    // An empty value is a value.
    setx(&p, "user.empty", b"", 0).unwrap();
    assert_eq!(get_xattr(&p, "user.empty"), Ok(Vec::new()));
    removex(&p, "user.one").unwrap();
    removex(&p, "user.empty").unwrap();
    assert_eq!(user_xattrs(&p), vec!["user.two"]);
    assert_eq!(user_xattrs(&m.upper_path("up")), vec!["user.two"]);
    assert_eq!(removex(&p, "user.one"), Err(libc::ENODATA));
    assert_eq!(get_xattr(&p, "user.one"), Err(libc::ENODATA));
}

#[test]
fn removexattr_missing_on_lower_file_does_not_copy_up() {
    let l = Layers::new(1);
    l.lower(0)
        .file("lo", "x")
        .xattr("lo", "user.there", b"1")
        .file("d/f", "f");
    let m = l.mount("u");
    assert_eq!(removex(&m.path("lo"), "user.missing"), Err(libc::ENODATA));
    assert_eq!(removex(&m.path("d/f"), "user.missing"), Err(libc::ENODATA));
    assert_eq!(removex(&m.path("d"), "user.missing"), Err(libc::ENODATA));
    assert!(!m.upper_path("lo").exists(), "lo copied up");
    assert!(!m.upper_path("d").exists(), "d copied up");
    assert_eq!(names(m.upper.as_ref().unwrap()), Vec::<String>::new());
    assert_eq!(user_xattrs(&m.path("lo")), vec!["user.there"]);
}

#[test]
fn xattr_create_and_replace_flags() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "x").xattr("lo", "user.a", b"old");
    let m = l.mount("u");
    assert_eq!(
        setx(&m.path("lo"), "user.a", b"new", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(get_xattr(&m.path("lo"), "user.a"), Ok(b"old".to_vec()));
    assert_eq!(
        setx(&m.path("lo"), "user.nope", b"v", libc::XATTR_REPLACE),
        Err(libc::ENODATA)
    );
    assert_eq!(get_xattr(&m.path("lo"), "user.nope"), Err(libc::ENODATA));

    m.write("up", "u");
    setx(&m.path("up"), "user.b", b"1", libc::XATTR_CREATE).unwrap();
    assert_eq!(
        setx(&m.path("up"), "user.b", b"2", libc::XATTR_CREATE),
        Err(libc::EEXIST)
    );
    assert_eq!(get_xattr(&m.path("up"), "user.b"), Ok(b"1".to_vec()));
    assert_eq!(get_xattr(&m.upper_path("up"), "user.b"), Ok(b"1".to_vec()));
}

#[test]
fn xattr_small_buffer_is_erange() {
    let l = Layers::new(1);
    let long = vec![b'v'; 100];
    l.lower(0)
        .file("lo", "x")
        .xattr("lo", "user.long", &long)
        .xattr("lo", "user.other", b"o");
    let m = l.mount("u");
    m.write("up", "u");
    setx(&m.path("up"), "user.long", &long, 0).unwrap();
    setx(&m.path("up"), "user.other", b"o", 0).unwrap();
    for f in ["lo", "up"] {
        let p = m.path(f);
        assert_eq!(getx_len(&p, "user.long", 0), Ok(100), "{f}: size query");
        assert_eq!(getx_len(&p, "user.long", 10), Err(libc::ERANGE), "{f}");
        assert_eq!(getx_len(&p, "user.long", 99), Err(libc::ERANGE), "{f}");
        assert_eq!(getx_len(&p, "user.long", 100), Ok(100), "{f}");
        let want = "user.long\0user.other\0".len();
        let all = listx_len(&p, 0).unwrap();
        assert!(all >= want, "{f}: list size {all}");
        assert_eq!(listx_len(&p, 3), Err(libc::ERANGE), "{f}: list");
        assert_eq!(listx_len(&p, all), Ok(all), "{f}: list");
    }
    assert!(!m.upper_path("lo").exists());
}

#[test]
fn listxattr_hides_overlay_private_names() {
    let l = Layers::new(2);
    l.lower(0)
        .opaque_xattr("opq", "trusted.overlay.opaque")
        .xattr("opq", "user.visible", b"1")
        .opaque_xattr("uopq", "user.overlay.opaque")
        .xattr("uopq", "user.visible", b"1")
        .file("f", "x")
        .xattr("f", "trusted.overlay.origin", b"whatever")
        .xattr("f", "user.overlay.redirect", b"/x")
        .xattr("f", "user.visible", b"1");
    l.lower(1).file("del/x", "x").file("opq/below", "b");
    let m = l.mount("u");
    // A directory deleted and recreated: opaque in the upper.
    fs::remove_file(m.path("del/x")).unwrap();
    fs::remove_dir(m.path("del")).unwrap();
    fs::create_dir(m.path("del")).unwrap();
    setx(&m.path("del"), "user.visible", b"1", 0).unwrap();
    // A file copied up from one carrying private xattrs.
    setx(&m.path("f"), "user.more", b"2", 0).unwrap();
    assert!(
        list_xattrs(&m.upper_path("del"))
            .iter()
            .any(|n| n.ends_with("overlay.opaque")),
        "recreated dir is not opaque in the upper: {:?}",
        list_xattrs(&m.upper_path("del"))
    );
    assert!(m.ls("del").is_empty());
    assert_eq!(m.ls("opq"), Vec::<String>::new());

    for p in ["", "opq", "uopq", "f", "del"] {
        let xs = list_xattrs(&m.path(p));
        // As root the format's own names are `trusted.overlay.*`; of `user.overlay.*` only
        // the markers read in every layer are hidden (kernel overlayfs as root shows the
        // rest, here `f`'s `user.overlay.redirect`).
        assert!(
            xs.iter().all(|n| !n.starts_with("trusted.overlay.")
                && (!n.starts_with("user.overlay.") || n == "user.overlay.redirect")),
            "{p:?}: {xs:?}"
        );
        assert_eq!(
            xs.contains(&"user.overlay.redirect".to_string()),
            p == "f",
            "{p:?}: {xs:?}"
        );
        if !p.is_empty() {
            assert!(xs.contains(&"user.visible".to_string()), "{p:?}: {xs:?}");
        }
        // The size query is large enough for the filtered listing.
        let len: usize = xs.iter().map(|n| n.len() + 1).sum();
        let q = listx_len(&m.path(p), 0).unwrap();
        assert!(q >= len, "{p:?}: size query {q} < {len}");
    }
}

/// The view's own `trusted.overlay.*` xattrs are stored escaped (`trusted.overlay.overlay.*`),
/// as kernel overlayfs (Linux 6.7 and later) stores them for an overlay nested in it: they
/// read back through the view and never count as the layers' markers.
#[test]
fn overlay_xattrs_set_through_the_view_are_escaped() {
    let l = Layers::new(2);
    l.lower(0).file("m/a", "a");
    l.lower(1).file("m/b", "b");
    let k = l.mount_kernel("k");
    let u = l.mount("u");
    for m in [&k, &u] {
        assert_eq!(
            setx(&m.path("m"), "trusted.overlay.opaque", b"y", 0),
            Ok(())
        );
        fs::create_dir(m.path("new")).unwrap();
        assert_eq!(
            setx(&m.path("new"), "trusted.overlay.opaque", b"y", 0),
            Ok(())
        );
        fs::write(m.path("new/f"), "f").unwrap();
    }
    for m in [&k, &u] {
        let what = format!("{:?}", m.kind);
        assert_eq!(
            m.ls("m"),
            vec!["a", "b"],
            "{what}: the directory became opaque"
        );
        assert_eq!(m.ls("new"), vec!["f"], "{what}");
        for d in ["m", "new"] {
            assert_eq!(
                get_xattr(&m.path(d), "trusted.overlay.opaque"),
                Ok(b"y".to_vec()),
                "{what}: {d} through the view"
            );
            assert_eq!(
                list_xattrs(&m.path(d)),
                vec!["trusted.overlay.opaque".to_string()],
                "{what}: {d} listed through the view"
            );
            let upper = m.upper_path(d);
            assert_eq!(
                get_xattr(&upper, "trusted.overlay.overlay.opaque"),
                Ok(b"y".to_vec()),
                "{what}: {d} in the upper"
            );
            assert!(
                get_xattr(&upper, "trusted.overlay.opaque").is_err(),
                "{what}: {d}: the marker itself was written"
            );
        }
    }
    // Removed through the view, the escaped xattr goes.
    assert_eq!(removex(&u.path("m"), "trusted.overlay.opaque"), Ok(()));
    assert!(get_xattr(&u.upper_path("m"), "trusted.overlay.overlay.opaque").is_err());
    // A name the escape makes longer than 255 bytes is refused as by the kernel; one that
    // stays within fits.
    for m in [&k, &u] {
        let fits = format!("trusted.overlay.{}", "a".repeat(231));
        let long = format!("trusted.overlay.{}", "a".repeat(232));
        let what = format!("{:?}", m.kind);
        assert_eq!(setx(&m.path("m"), &fits, b"1", 0), Ok(()), "{what}");
        assert_eq!(get_xattr(&m.path("m"), &fits), Ok(b"1".to_vec()), "{what}");
        assert_eq!(
            setx(&m.path("m"), &long, b"1", 0),
            Err(libc::EOPNOTSUPP),
            "{what}"
        );
        assert_eq!(
            get_xattr(&m.path("m"), &long),
            Err(libc::EOPNOTSUPP),
            "{what}"
        );
    }
    // The daemon's own markers stay out of reach.
    assert_eq!(
        setx(&u.path("m"), "user.fuseoverlayfs.opaque", b"y", 0),
        Err(libc::EOPNOTSUPP)
    );
}

// ---------------------------------------------------------------------------------------
// Data
// ---------------------------------------------------------------------------------------

#[test]
fn fsync_and_fdatasync_reach_the_upper() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "old content").dir("d");
    let m = l.mount("u");

    let mut f = rw(&m.path("lo"));
    f.write_all_at(b"NEW", 0).unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"NEW content");
    f.write_all_at(b"!", 11).unwrap();
    f.sync_data().unwrap();
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), b"NEW content!");
    f.seek(SeekFrom::Start(0)).unwrap();
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "NEW content!");
    drop(f);

    let mut f = File::create(m.path("up")).unwrap();
    f.write_all(b"fresh").unwrap();
    f.sync_data().unwrap();
    assert_eq!(fs::read(m.upper_path("up")).unwrap(), b"fresh");
    f.write_all(b" more").unwrap();
    f.sync_all().unwrap();
    assert_eq!(fs::read(m.upper_path("up")).unwrap(), b"fresh more");
    drop(f);

    // fsync of directories (lower-only and merged root) succeeds too.
    File::open(m.path("d")).unwrap().sync_all().unwrap();
    File::open(m.path("")).unwrap().sync_all().unwrap();
    assert_eq!(fs::read(l.lower(0).path("lo")).unwrap(), b"old content");
}

#[test]
fn fallocate_allocate_and_punch_hole() {
    let l = Layers::new(1);
    l.lower(0)
        .file_bytes("lo", &[b'a'; 8192])
        .file_bytes("big", &vec![0xAB; 1 << 20]);
    let m = l.mount("u");

    // Mode 0 on an upper file: size and blocks grow.
    let f = File::create(m.path("fa")).unwrap();
    fallocate(&f, 0, 0, 1 << 20).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    drop(f);
    let md = lstat(&m.path("fa"));
    assert_eq!(md.len(), 1 << 20);
    assert!(md.blocks() >= 2048, "merged blocks {}", md.blocks());
    let up = lstat(&m.upper_path("fa"));
    assert_eq!(up.len(), 1 << 20);
    assert!(up.blocks() >= 2048, "upper blocks {}", up.blocks());
    // KEEP_SIZE beyond EOF keeps the size.
    let f = rw(&m.path("fa"));
    fallocate(&f, libc::FALLOC_FL_KEEP_SIZE, 1 << 20, 1 << 20).unwrap();
    drop(f);
    assert_eq!(lstat(&m.path("fa")).len(), 1 << 20);
    assert_eq!(lstat(&m.upper_path("fa")).len(), 1 << 20);

    // Mode 0 on a lower-only file: copied up with its data, then extended.
    let f = rw(&m.path("lo"));
    fallocate(&f, 0, 0, 65536).unwrap();
    drop(f);
    let mut want = vec![b'a'; 8192];
    want.resize(65536, 0);
    assert_eq!(fs::read(m.path("lo")).unwrap(), want);
    assert_eq!(fs::read(m.upper_path("lo")).unwrap(), want);
    assert_eq!(lstat(&l.lower(0).path("lo")).len(), 8192);

    // Punch a hole, keeping the size, in a lower-only file.
    let _ = fs::read(m.path("big")).unwrap(); // pages cached before the punch
    let f = rw(&m.path("big"));
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        256 << 10,
        256 << 10,
    )
    .unwrap();
    assert_eq!(f.metadata().unwrap().len(), 1 << 20);
    drop(f);
    let mut want = vec![0xAB; 1 << 20];
    want[256 << 10..512 << 10].fill(0);
    assert_eq!(lstat(&m.path("big")).len(), 1 << 20);
    assert!(
        fs::read(m.path("big")).unwrap() == want,
        "merged data after punch"
    );
    assert!(
        fs::read(m.upper_path("big")).unwrap() == want,
        "upper data after punch"
    );
    let up = lstat(&m.upper_path("big"));
    assert!(
        up.blocks() < 2048,
        "upper still has {} blocks after the punch",
        up.blocks()
    );
    assert_eq!(
        fs::read(l.lower(0).path("big")).unwrap(),
        vec![0xAB; 1 << 20]
    );
}

const MIB: i64 = 1 << 20;

/// 4 KiB of data at 0 and at 1 MiB, size 2 MiB, holes elsewhere.
fn make_sparse(f: &File) {
    f.write_all_at(&[b'x'; 4096], 0).unwrap();
    f.write_all_at(&[b'y'; 4096], MIB as u64).unwrap();
    f.set_len(2 * MIB as u64).unwrap();
}

/// The content of a `make_sparse` file.
fn sparse_content() -> Vec<u8> {
    let mut c = vec![0u8; 2 * MIB as usize];
    c[..4096].fill(b'x');
    c[MIB as usize..MIB as usize + 4096].fill(b'y');
    c
}

fn seeks(f: &File) -> Vec<Result<i64, i32>> {
    vec![
        lseek(f, 0, libc::SEEK_DATA),
        lseek(f, 0, libc::SEEK_HOLE),
        lseek(f, 4096, libc::SEEK_DATA),
        lseek(f, MIB, libc::SEEK_HOLE),
        lseek(f, MIB + 4096, libc::SEEK_DATA),
        lseek(f, MIB + 4096, libc::SEEK_HOLE),
        lseek(f, 3 * MIB, libc::SEEK_DATA),
        lseek(f, 3 * MIB, libc::SEEK_HOLE),
    ]
}

/// What the page-cached path answers for a `make_sparse` file: the kernel's generic answer
/// (everything up to the size is data), as the upper file may lack data the kernel caches.
fn page_cached_expected() -> Vec<Result<i64, i32>> {
    vec![
        Ok(0),
        Ok(2 * MIB),
        Ok(4096),
        Ok(2 * MIB),
        Ok(MIB + 4096),
        Ok(2 * MIB),
        Err(libc::ENXIO),
        Err(libc::ENXIO),
    ]
}

fn sparse_expected() -> Vec<Result<i64, i32>> {
    vec![
        Ok(0),
        Ok(4096),
        Ok(MIB),
        Ok(MIB + 4096),
        Err(libc::ENXIO),
        Ok(MIB + 4096),
        Err(libc::ENXIO),
        Err(libc::ENXIO),
    ]
}

#[test]
fn seek_data_and_hole_on_sparse_files() {
    let l = Layers::new(1);
    l.lower(0).dir("d");
    make_sparse(&File::create(l.lower(0).path("sparse")).unwrap());
    make_sparse(&File::create(l.lower(0).path("sparse2")).unwrap());
    // The backing filesystem itself gives the expected answers.
    assert_eq!(
        seeks(&File::open(l.lower(0).path("sparse")).unwrap()),
        sparse_expected(),
        "backing filesystem"
    );
    let m = l.mount_with("u", &["--passthrough", "auto"]);

    // Lower-only, read-only open.
    let f = File::open(m.path("sparse")).unwrap();
    assert_eq!(seeks(&f), sparse_expected(), "lower-only file");
    drop(f);
    assert!(!m.upper_path("sparse").exists());

    // Copied up (metadata change): holes are kept.
    chmod(&m.path("sparse"), 0o600).unwrap();
    assert_eq!(
        seeks(&File::open(m.upper_path("sparse")).unwrap()),
        sparse_expected(),
        "upper copy (holes lost at copy-up)"
    );
    assert_eq!(
        seeks(&File::open(m.path("sparse")).unwrap()),
        sparse_expected(),
        "copied-up file through the mount"
    );

    // Opened for writing (copy-up on open), seeking on that fd.
    let f = rw(&m.path("sparse2"));
    assert_eq!(seeks(&f), sparse_expected(), "write fd of copied-up file");
    drop(f);

    // Made sparse through the mount.
    let f = File::create(m.path("d/made")).unwrap();
    make_sparse(&f);
    assert_eq!(
        seeks(&f),
        sparse_expected(),
        "sparse file made in the mount"
    );
    drop(f);
    assert_eq!(
        seeks(&File::open(m.upper_path("d/made")).unwrap()),
        sparse_expected(),
        "upper of a sparse file made in the mount"
    );
    let want = sparse_content();
    assert!(fs::read(m.path("d/made")).unwrap() == want);
    assert!(fs::read(m.path("sparse")).unwrap() == want);
}

/// A copy-up from a lower layer on another filesystem (where copy_file_range refuses to copy
/// across) copies every byte at its place and keeps the holes.
#[test]
fn copy_up_from_another_filesystem_keeps_data_and_holes() {
    let l = Layers::new(1);
    let _t = Tmpfs::new(l.lowers[0].clone(), "64m");
    make_sparse(&File::create(l.lower(0).path("sparse")).unwrap());
    // Data that shows a misplaced or missing chunk: every 4-byte word holds its own offset.
    let len = 5 * MIB as usize + 123;
    let data: Vec<u8> = (0..len).map(|i| ((i / 4) >> ((i % 4) * 8)) as u8).collect();
    l.lower(0).file_bytes("big", &data);
    let m = l.mount("u");
    assert_ne!(
        fs::metadata(l.lower(0).path("big")).unwrap().dev(),
        fs::metadata(m.upper_path("")).unwrap().dev(),
        "test setup: lower and upper on different filesystems"
    );
    let mut f = OpenOptions::new().append(true).open(m.path("big")).unwrap();
    f.write_all(b"!").unwrap();
    drop(f);
    let mut want = data.clone();
    want.push(b'!');
    let got = fs::read(m.upper_path("big")).unwrap();
    assert_eq!(got.len(), want.len(), "length of the upper copy");
    assert_eq!(
        got.iter().zip(&want).position(|(a, b)| a != b),
        None,
        "first differing byte of the upper copy"
    );
    chmod(&m.path("sparse"), 0o600).unwrap();
    assert_eq!(
        seeks(&File::open(m.upper_path("sparse")).unwrap()),
        sparse_expected(),
        "holes of the upper copy"
    );
    assert!(
        fs::read(m.path("sparse")).unwrap() == sparse_content(),
        "sparse data"
    );
}

/// On the page-cached path, a file being written shows blocks while its data is still only in
/// the kernel's cache: GNU tar --sparse takes a file of size > 0 and no blocks for one hole and
/// archived such files as zeros (ext4 counts the blocks it reserved). Once written back, the
/// real count shows.
#[test]
fn a_file_being_written_shows_blocks_on_the_page_cached_path() {
    let l = Layers::new(1);
    l.lower(0).file("old", "lower data");
    let m = l.mount_with("u", &["--passthrough", "off"]);
    let data = b"important data\n".repeat(10_000);
    let mut made = File::create(m.path("made")).unwrap();
    made.write_all(&data).unwrap();
    let mut trunc = OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(m.path("old"))
        .unwrap();
    trunc.write_all(&data).unwrap();
    for (name, f) in [("made", &made), ("old", &trunc)] {
        let md = f.metadata().unwrap();
        assert_eq!(md.len(), data.len() as u64, "{name}");
        assert!(
            md.blocks() > 0,
            "{name} while written: {} blocks",
            md.blocks()
        );
        assert!(
            fs::metadata(m.path(name)).unwrap().blocks() > 0,
            "{name} by name"
        );
    }
    // After an fsync the data is in the upper file, and its count shows (a log kept open).
    made.write_all(&data).unwrap();
    made.sync_all().unwrap();
    assert_eq!(
        made.metadata().unwrap().blocks(),
        fs::metadata(m.upper_path("made")).unwrap().blocks(),
        "made after fsync, still open"
    );
    drop(made);
    drop(trunc);
    for name in ["made", "old"] {
        let want = fs::metadata(m.upper_path(name)).unwrap().blocks();
        assert!(
            want >= (data.len() / 512) as u64,
            "{name} written back: {want}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || fs::metadata(m.path(name))
                .unwrap()
                .blocks()
                == want),
            "{name} after close: {} blocks, upper {want}",
            fs::metadata(m.path(name)).unwrap().blocks()
        );
    }
    // With two writers, the other's close leaves the count shown.
    let mut w1 = File::create(m.path("two")).unwrap();
    drop(OpenOptions::new().write(true).open(m.path("two")).unwrap());
    w1.write_all(&data).unwrap();
    assert!(
        fs::metadata(m.path("two")).unwrap().blocks() > 0,
        "two writers, one closed"
    );
    drop(w1);
    File::create(m.path("empty")).unwrap();
    assert_eq!(
        fs::metadata(m.path("empty")).unwrap().blocks(),
        0,
        "an empty file, closed"
    );
}

/// On the page-cached path (`--passthrough off`, rootless) the kernel answers SEEK_DATA and
/// SEEK_HOLE itself from the file size, because FUSE asks the daemon without first writing back
/// the data it caches: no holes are reported, and no data is ever reported as a hole. The upper
/// copy keeps its holes all the same.
#[test]
fn seek_data_and_hole_on_the_page_cached_path() {
    let l = Layers::new(1);
    l.lower(0).dir("d");
    make_sparse(&File::create(l.lower(0).path("sparse")).unwrap());
    let m = l.mount_with("u", &["--passthrough", "off"]);
    let f = File::open(m.path("sparse")).unwrap();
    assert_eq!(seeks(&f), page_cached_expected(), "lower-only file");
    drop(f);
    let f = rw(&m.path("sparse"));
    assert_eq!(
        seeks(&f),
        page_cached_expected(),
        "write fd of a copied-up file"
    );
    drop(f);
    assert_eq!(
        seeks(&File::open(m.upper_path("sparse")).unwrap()),
        sparse_expected(),
        "the upper copy keeps its holes"
    );
    let f = File::create(m.path("d/made")).unwrap();
    make_sparse(&f);
    assert_eq!(
        seeks(&f),
        page_cached_expected(),
        "sparse file made in the mount"
    );
}

#[test]
fn statfs_is_the_uppers() {
    let l = Layers::new(2);
    l.lower(0).file("a", "a");
    l.lower(1).file("b", "b");
    // The upper on its own tmpfs, so its numbers differ from the lowers'.
    let _t = Tmpfs::new(l.root().join("u"), "37m");
    let m = l.mount("u");
    let sm = statvfs(&m.merged);
    let su = statvfs(&m.upper_path(""));
    let sl = statvfs(&l.lowers[0]);
    assert_ne!(
        su.f_blocks, sl.f_blocks,
        "test setup: upper and lower fs differ"
    );
    assert_eq!(sm.f_blocks, su.f_blocks, "f_blocks");
    assert_eq!(sm.f_bsize, su.f_bsize, "f_bsize");
    assert_eq!(sm.f_namemax, su.f_namemax, "f_namemax");
    assert_eq!(sm.f_files, su.f_files, "f_files");
    // Writing through the mount uses the upper's space, and statfs shows it.
    fs::write(m.path("fill"), vec![1u8; 4 << 20]).unwrap();
    File::open(m.path("fill")).unwrap().sync_all().unwrap();
    let sm = statvfs(&m.merged);
    let su = statvfs(&m.upper_path(""));
    assert_eq!(
        sm.f_bfree * sm.f_frsize,
        su.f_bfree * su.f_frsize,
        "free space"
    );
    assert!(su.f_bfree * su.f_frsize <= (37 << 20) - (4 << 20));
}

#[test]
fn statfs_read_only_is_the_top_lowers() {
    let l = Layers::new(2);
    // The top lower on its own tmpfs.
    let _t = Tmpfs::new(l.lowers[0].clone(), "23m");
    l.lower(0).file("a", "a");
    l.lower(1).file("b", "b");
    let m = l.mount_ro("ro");
    let sm = statvfs(&m.merged);
    let s0 = statvfs(&l.lowers[0]);
    let s1 = statvfs(&l.lowers[1]);
    assert_ne!(s0.f_blocks, s1.f_blocks, "test setup");
    assert_eq!(sm.f_blocks, s0.f_blocks, "f_blocks");
    assert_eq!(sm.f_bsize, s0.f_bsize, "f_bsize");
    assert_eq!(sm.f_namemax, s0.f_namemax, "f_namemax");
    assert!(
        sm.f_flag & libc::ST_RDONLY != 0,
        "read-only mount without ST_RDONLY"
    );
}

#[test]
fn mmap_shared_write_of_lower_file() {
    let l = Layers::new(1);
    l.lower(0).file_bytes("mm", &[b'a'; 8192]);
    let m = l.mount("u");
    let f = rw(&m.path("mm"));
    // SAFETY: a shared mapping of 8192 bytes of an open file, written within bounds,
    // synced and unmapped before the file is closed.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            8192,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(
            p,
            libc::MAP_FAILED,
            "mmap: {}",
            std::io::Error::last_os_error()
        );
        let s = std::slice::from_raw_parts_mut(p.cast::<u8>(), 8192);
        assert_eq!(s[0], b'a');
        s[100..105].copy_from_slice(b"HELLO");
        s[5000..5005].copy_from_slice(b"WORLD");
        assert_eq!(
            libc::msync(p, 8192, libc::MS_SYNC),
            0,
            "msync: {}",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::munmap(p, 8192), 0);
    }
    drop(f);
    let mut want = vec![b'a'; 8192];
    want[100..105].copy_from_slice(b"HELLO");
    want[5000..5005].copy_from_slice(b"WORLD");
    assert_eq!(fs::read(m.path("mm")).unwrap(), want, "read() after munmap");
    assert_eq!(fs::read(m.upper_path("mm")).unwrap(), want, "upper");
    assert_eq!(fs::read(l.lower(0).path("mm")).unwrap(), vec![b'a'; 8192]);
}

// ---------------------------------------------------------------------------------------
// Locks
// ---------------------------------------------------------------------------------------

/// Runs the `flock` command on `p` (-n, exit 99 on conflict): its exit code.
fn flock_cmd(p: &Path, shared: bool) -> i32 {
    let mut c = Command::new("flock");
    c.args(["-n", "-E", "99"]);
    if shared {
        c.arg("-s");
    }
    c.arg(p).arg("true").status().unwrap().code().unwrap()
}

/// Waits for the lock on `p` to be free after its last holder closed it. Tests in this binary
/// run in parallel and spawn programs: a child forked at that moment holds a copy of every
/// descriptor (the lock with it) until it execs, so the release may come a moment later.
fn free_after_close(p: &Path) -> bool {
    wait_until(Duration::from_secs(10), || flock_cmd(p, false) == 0)
}

fn flock(f: &File, op: i32) -> Result<(), i32> {
    // SAFETY: a valid open fd.
    rc(unsafe { libc::flock(f.as_raw_fd(), op) })
}

#[test]
fn flock_contends_between_processes() {
    let l = Layers::new(1);
    l.lower(0).file("lk", "x").file("lk2", "y");
    let m = l.mount("u");

    // A lower-only file opened read-only.
    let f = File::open(m.path("lk")).unwrap();
    assert_eq!(flock_cmd(&m.path("lk"), false), 0, "free lock");
    flock(&f, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_eq!(
        flock_cmd(&m.path("lk"), false),
        99,
        "exclusive vs exclusive"
    );
    assert_eq!(flock_cmd(&m.path("lk"), true), 99, "exclusive vs shared");
    // Same process, another open file description: also conflicts.
    let g = File::open(m.path("lk")).unwrap();
    let e = flock(&g, libc::LOCK_EX | libc::LOCK_NB).unwrap_err();
    assert!(e == libc::EWOULDBLOCK || e == libc::EAGAIN, "errno {e}");
    flock(&f, libc::LOCK_UN).unwrap();
    assert_eq!(flock_cmd(&m.path("lk"), false), 0, "after unlock");
    flock(&f, libc::LOCK_SH | libc::LOCK_NB).unwrap();
    assert_eq!(flock_cmd(&m.path("lk"), true), 0, "shared vs shared");
    assert_eq!(flock_cmd(&m.path("lk"), false), 99, "shared vs exclusive");
    drop(f);
    drop(g);
    assert!(free_after_close(&m.path("lk")), "released on close");

    // A file opened for writing (copied up) while the other process opens it too.
    let f = rw(&m.path("lk2"));
    flock(&f, libc::LOCK_EX | libc::LOCK_NB).unwrap();
    assert_eq!(flock_cmd(&m.path("lk2"), false), 99, "copied-up file");
    drop(f);
    assert!(
        free_after_close(&m.path("lk2")),
        "copied-up file released on close"
    );
}

/// In a forked child: open `path` O_RDWR, try F_SETLK (or F_GETLK when `get`) and exit
/// with 0 / errno for F_SETLK, or for F_GETLK 0 = unlocked, 1 = write-locked by
/// `parent`, 2 = read-locked by `parent`, 3 = something else.
fn child_lock(path: &CString, ltype: i32, start: i64, len: i64, get: bool) -> i32 {
    // SAFETY: the child only makes async-signal-safe calls (open, fcntl, _exit).
    unsafe {
        let parent = libc::getpid();
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            let fd = libc::open(path.as_ptr(), libc::O_RDWR);
            if fd < 0 {
                libc::_exit(200);
            }
            let mut fl: libc::flock = std::mem::zeroed();
            fl.l_type = ltype as libc::c_short;
            fl.l_whence = libc::SEEK_SET as libc::c_short;
            fl.l_start = start;
            fl.l_len = len;
            if get {
                if libc::fcntl(fd, libc::F_GETLK, &mut fl) != 0 {
                    libc::_exit(201);
                }
                let code = match (fl.l_type as i32, fl.l_pid == parent) {
                    (libc::F_UNLCK, _) => 0,
                    (libc::F_WRLCK, true) => 1,
                    (libc::F_RDLCK, true) => 2,
                    _ => 3,
                };
                libc::_exit(code);
            }
            let r = libc::fcntl(fd, libc::F_SETLK, &fl);
            libc::_exit(if r == 0 { 0 } else { *libc::__errno_location() });
        }
        let mut status = 0;
        assert_eq!(libc::waitpid(pid, &mut status, 0), pid);
        assert!(libc::WIFEXITED(status));
        libc::WEXITSTATUS(status)
    }
}

fn setlk(f: &File, ltype: i32, start: i64, len: i64) -> Result<(), i32> {
    // SAFETY: a valid fd and an initialised flock struct.
    unsafe {
        let mut fl: libc::flock = std::mem::zeroed();
        fl.l_type = ltype as libc::c_short;
        fl.l_whence = libc::SEEK_SET as libc::c_short;
        fl.l_start = start;
        fl.l_len = len;
        rc(libc::fcntl(f.as_raw_fd(), libc::F_SETLK, &fl))
    }
}

#[test]
fn posix_locks_contend_between_processes() {
    let l = Layers::new(1);
    l.lower(0).file("lk", "0123456789").file("ro", "r");
    // Served by the daemon (no passthrough), a lock keeps holding across a copy-up made by
    // another open; with passthrough see passthrough::copy_up_of_an_open_file.
    let m = l.mount_with("u", &["--passthrough", "off"]);
    let p = cs(&m.path("lk"));

    let f = rw(&m.path("lk"));
    setlk(&f, libc::F_WRLCK, 0, 100).unwrap();
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 0, 100, false),
        libc::EAGAIN,
        "write vs write"
    );
    assert_eq!(
        child_lock(&p, libc::F_RDLCK, 50, 10, false),
        libc::EAGAIN,
        "read vs write"
    );
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 200, 100, false),
        0,
        "disjoint range"
    );
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 0, 10, true),
        1,
        "F_GETLK sees the holder"
    );
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 200, 10, true),
        0,
        "F_GETLK, free range"
    );
    setlk(&f, libc::F_UNLCK, 0, 100).unwrap();
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 0, 100, false),
        0,
        "after unlock"
    );
    setlk(&f, libc::F_RDLCK, 0, 0).unwrap();
    assert_eq!(
        child_lock(&p, libc::F_RDLCK, 0, 0, false),
        0,
        "read vs read"
    );
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 5, 1, false),
        libc::EAGAIN,
        "write vs read"
    );
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 5, 1, true),
        2,
        "F_GETLK read lock"
    );
    drop(f);
    assert_eq!(
        child_lock(&p, libc::F_WRLCK, 0, 0, false),
        0,
        "released on close"
    );

    // A read lock on a lower-only file opened read-only; the child's O_RDWR open copies
    // the file up while the lock is held, and the lock still holds.
    let g = File::open(m.path("ro")).unwrap();
    setlk(&g, libc::F_RDLCK, 0, 0).unwrap();
    let q = cs(&m.path("ro"));
    assert_eq!(
        child_lock(&q, libc::F_WRLCK, 0, 0, false),
        libc::EAGAIN,
        "across copy-up"
    );
    assert!(m.upper_path("ro").exists());
    drop(g);
    assert_eq!(child_lock(&q, libc::F_WRLCK, 0, 0, false), 0);
}

// ---------------------------------------------------------------------------------------
// Reads and writes
// ---------------------------------------------------------------------------------------

#[test]
fn large_sequential_write_and_read() {
    let l = Layers::new(1);
    let lower_data = random_bytes(8 << 20, 7);
    l.lower(0).file_bytes("lbig", &lower_data);
    let m = l.mount("u");

    let data = random_bytes(8 << 20, 42);
    {
        let mut f = File::create(m.path("big")).unwrap();
        for chunk in data.chunks(300_001) {
            f.write_all(chunk).unwrap();
        }
    }
    assert_eq!(lstat(&m.path("big")).len(), data.len() as u64);
    let mut back = Vec::new();
    File::open(m.path("big"))
        .unwrap()
        .read_to_end(&mut back)
        .unwrap();
    assert!(back == data, "merged read-back differs");
    assert!(
        fs::read(m.upper_path("big")).unwrap() == data,
        "upper differs"
    );

    // A large lower file reads back whole, then its middle is overwritten.
    assert!(
        fs::read(m.path("lbig")).unwrap() == lower_data,
        "lower read"
    );
    let patch = random_bytes(1 << 20, 99);
    rw(&m.path("lbig")).write_all_at(&patch, 3 << 20).unwrap();
    let mut want = lower_data.clone();
    want[3 << 20..4 << 20].copy_from_slice(&patch);
    assert!(
        fs::read(m.path("lbig")).unwrap() == want,
        "merged after patch"
    );
    assert!(
        fs::read(m.upper_path("lbig")).unwrap() == want,
        "upper after patch"
    );
    assert!(fs::read(l.lower(0).path("lbig")).unwrap() == lower_data);
}

#[test]
fn one_byte_reads_at_odd_offsets() {
    let l = Layers::new(1);
    let pat: Vec<u8> = (0..100_000u32).map(|i| ((i * 7 + 3) % 251) as u8).collect();
    l.lower(0).file_bytes("pat", &pat).file_bytes("pat2", &pat);
    let m = l.mount("u");
    let offs = [
        0u64, 1, 3, 4095, 4096, 4097, 12345, 65535, 65537, 77777, 99_999,
    ];

    let check = |f: &File, want: &[u8], what: &str| {
        for &o in &offs {
            let mut b = [0u8; 1];
            assert_eq!(f.read_at(&mut b, o).unwrap(), 1, "{what} @{o}");
            assert_eq!(b[0], want[o as usize], "{what} @{o}");
        }
        let mut b = [0u8; 1];
        assert_eq!(f.read_at(&mut b, 100_000).unwrap(), 0, "{what}: at EOF");
        assert_eq!(f.read_at(&mut b, 200_001).unwrap(), 0, "{what}: past EOF");
    };
    // Lower-only.
    let f = File::open(m.path("pat")).unwrap();
    check(&f, &pat, "lower");
    // Sequential 1-byte read() from an odd start.
    let mut g = File::open(m.path("pat")).unwrap();
    g.seek(SeekFrom::Start(4093)).unwrap();
    for i in 0..300u64 {
        let mut b = [0u8; 1];
        g.read_exact(&mut b).unwrap();
        assert_eq!(b[0], pat[(4093 + i) as usize], "sequential @{}", 4093 + i);
    }
    drop((f, g));

    // Upper: copied up, 1-byte writes at odd offsets, then 1-byte reads.
    let f = rw(&m.path("pat2"));
    let mut want = pat.clone();
    for &o in &offs {
        f.write_all_at(&[0xEE], o).unwrap();
        want[o as usize] = 0xEE;
    }
    check(&f, &want, "upper fd");
    drop(f);
    check(
        &File::open(m.path("pat2")).unwrap(),
        &want,
        "upper reopened",
    );
    assert!(fs::read(m.upper_path("pat2")).unwrap() == want);
}

#[test]
fn o_append_from_two_fds() {
    let l = Layers::new(1);
    l.lower(0).file("log", "start\n");
    let m = l.mount("u");
    let open = |rel: &str| OpenOptions::new().append(true).open(m.path(rel)).unwrap();
    for rel in ["log", "new"] {
        if rel == "new" {
            m.write("new", "start\n");
        }
        let mut a = open(rel);
        let mut b = open(rel);
        a.write_all(b"a1\n").unwrap();
        b.write_all(b"b1\n").unwrap();
        a.write_all(b"a2\n").unwrap();
        b.write_all(b"b2\n").unwrap();
        // Seeking does not move where O_APPEND writes go.
        a.seek(SeekFrom::Start(0)).unwrap();
        a.write_all(b"a3\n").unwrap();
        drop((a, b));
        let want = "start\na1\nb1\na2\nb2\na3\n";
        assert_eq!(m.read(rel), want, "{rel}");
        assert_eq!(
            fs::read_to_string(m.upper_path(rel)).unwrap(),
            want,
            "{rel} upper"
        );
    }
    assert_eq!(
        fs::read_to_string(l.lower(0).path("log")).unwrap(),
        "start\n"
    );
}

// ---------------------------------------------------------------------------------------
// Read-only mount
// ---------------------------------------------------------------------------------------

#[test]
fn read_only_mount_refuses_every_change() {
    let l = Layers::new(2);
    l.lower(0)
        .file("f", "data")
        .xattr("f", "user.k", b"v")
        .dir("d")
        .file("d/x", "x")
        .symlink("ln", "f");
    l.lower(1).file("g", "g").dir("empty").file("d/y", "y");
    let o = TreeOpts::default();
    let before: Vec<_> = l
        .lowers
        .iter()
        .map(|p| (tree(p, &o), raw_tree(p)))
        .collect();
    let m = l.mount_ro("ro");

    // Reads work.
    assert_eq!(m.read("f"), "data");
    assert_eq!(m.read("g"), "g");
    assert_eq!(m.ls("d"), vec!["x", "y"]);
    assert_eq!(fs::read_link(m.path("ln")).unwrap().to_str(), Some("f"));
    assert_eq!(get_xattr(&m.path("f"), "user.k"), Ok(b"v".to_vec()));

    let p = |r: &str| m.path(r);
    let io = |r: std::io::Result<()>| r.map_err(|e| e.raw_os_error().unwrap());
    let ops: Vec<(&str, Result<(), i32>)> = vec![
        (
            "create",
            io(OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(p("new"))
                .map(drop)),
        ),
        (
            "open for write",
            io(OpenOptions::new().write(true).open(p("f")).map(drop)),
        ),
        (
            "open O_RDWR",
            io(OpenOptions::new()
                .read(true)
                .write(true)
                .open(p("g"))
                .map(drop)),
        ),
        (
            "open O_TRUNC",
            io(OpenOptions::new()
                .write(true)
                .truncate(true)
                .open(p("f"))
                .map(drop)),
        ),
        ("unlink", io(fs::remove_file(p("f")))),
        ("unlink lower1", io(fs::remove_file(p("g")))),
        ("rmdir", io(fs::remove_dir(p("empty")))),
        ("mkdir", io(fs::create_dir(p("nd")))),
        ("rename", io(fs::rename(p("f"), p("f2")))),
        ("rename dir", io(fs::rename(p("d"), p("d2")))),
        ("chmod", chmod(&p("f"), 0o600)),
        ("chown", lchown(&p("f"), 1234, 1234)),
        ("utimes", utimens(&p("f"), Some([ts(1, 0), ts(2, 0)]))),
        ("setxattr", setx(&p("f"), "user.new", b"1", 0)),
        ("removexattr", removex(&p("f"), "user.k")),
        ("truncate", truncate(&p("f"), 0)),
        ("symlink", io(std::os::unix::fs::symlink("f", p("ln2")))),
        ("link", io(fs::hard_link(p("f"), p("f3")))),
        ("mkfifo", {
            let c = cs(&p("fifo"));
            // SAFETY: NUL-terminated path.
            rc(unsafe { libc::mkfifo(c.as_ptr(), 0o644) })
        }),
    ];
    for (what, r) in ops {
        assert_eq!(r, Err(libc::EROFS), "{what}");
    }
    // Still readable, unchanged.
    assert_eq!(m.read("f"), "data");
    assert_eq!(m.ls(""), vec!["d", "empty", "f", "g", "ln"]);
    let after: Vec<_> = l
        .lowers
        .iter()
        .map(|p| (tree(p, &o), raw_tree(p)))
        .collect();
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        assert_same_tree(&b.0, &a.0, &format!("lower{i}"));
        assert_eq!(b.1, a.1, "lower{i} raw");
    }
}

// ---------------------------------------------------------------------------------------
// Inode numbers, hard links, unlinked files
// ---------------------------------------------------------------------------------------

#[test]
fn one_st_dev_and_unique_st_ino() {
    let l = Layers::new(3);
    // 200+ objects over 3 layers: merged directories, per-layer files, shadowed names,
    // symlinks, fifos, per-layer subdirectories.
    for i in 0..90 {
        let layer = i % 3;
        let b = l.lower(layer);
        let dir = ["a", "b", "c/deep"][i % 3];
        b.file(&format!("{dir}/f{i}"), &i.to_string());
        match i % 5 {
            0 => {
                b.symlink(&format!("{dir}/s{i}"), &format!("f{i}"));
            }
            1 => {
                b.fifo(&format!("{dir}/p{i}"));
            }
            2 => {
                b.dir(&format!("{dir}/sub{i}"))
                    .file(&format!("{dir}/sub{i}/x"), "x");
            }
            _ => {
                b.file(&format!("top{i}"), "t");
            }
        }
        // The same name in every layer: one object in the view.
        l.lower(0).file(&format!("a/shared{}", i % 10), "0");
        l.lower(2).file(&format!("a/shared{}", i % 10), "2");
    }
    let m = l.mount("u");
    // Some copy-ups and new objects.
    for i in [0, 1, 2, 10, 20] {
        let dir = ["a", "b", "c/deep"][i % 3];
        chmod(&m.path(&format!("{dir}/f{i}")), 0o600).unwrap();
    }
    fs::create_dir(m.path("newdir")).unwrap();
    for i in 0..10 {
        m.write(&format!("newdir/n{i}"), "n");
    }
    let root_dev = lstat(&m.merged).dev();
    let keys: Vec<String> = tree(&m.merged, &TreeOpts::default()).into_keys().collect();
    assert!(keys.len() >= 200, "only {} objects", keys.len());
    let mut seen = std::collections::BTreeMap::new();
    for k in &keys {
        let md = lstat(&m.path(k));
        assert_eq!(md.dev(), root_dev, "{k:?}: st_dev");
        if let Some(other) = seen.insert(md.ino(), k.clone()) {
            panic!("{k:?} and {other:?} share st_ino {}", md.ino());
        }
    }
    // Stable across a copy-up.
    let before: Vec<u64> = keys.iter().map(|k| ino(&m.path(k))).collect();
    for k in keys.iter().filter(|k| k.contains("/f")) {
        chmod(&m.path(k), 0o640).unwrap();
    }
    let after: Vec<u64> = keys.iter().map(|k| ino(&m.path(k))).collect();
    assert_eq!(before, after, "st_ino changed across copy-up");
}

#[test]
fn hard_links_in_a_lower_share_st_ino() {
    let l = Layers::new(2);
    l.lower(0)
        .file("a", "x")
        .hardlink("a", "d/b")
        .file("other", "o");
    l.lower(1).file("d/c", "c");
    let m = l.mount("u");
    let a = lstat(&m.path("a"));
    let b = lstat(&m.path("d/b"));
    assert_eq!(a.ino(), b.ino(), "hard links show different st_ino");
    assert_eq!(a.nlink(), 2);
    assert_eq!(b.nlink(), 2);
    assert_ne!(a.ino(), ino(&m.path("other")));
    assert_eq!(lstat(&m.path("other")).nlink(), 1);
    assert_eq!(m.read("d/b"), "x");
}

#[test]
fn link_through_the_mount() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "lower data").dir("d");
    let m = l.mount("u");

    // An upper file.
    m.write("x", "data");
    fs::hard_link(m.path("x"), m.path("y")).unwrap();
    let (x, y) = (lstat(&m.path("x")), lstat(&m.path("y")));
    assert_eq!(x.ino(), y.ino());
    assert_eq!((x.nlink(), y.nlink()), (2, 2));
    let (ux, uy) = (lstat(&m.upper_path("x")), lstat(&m.upper_path("y")));
    assert_eq!(ux.ino(), uy.ino(), "upper names are not one inode");
    assert_eq!(ux.nlink(), 2);
    // Writes through one name show through the other.
    rw(&m.path("y")).write_all_at(b"DATA", 0).unwrap();
    assert_eq!(m.read("x"), "DATA");
    fs::remove_file(m.path("y")).unwrap();
    assert_eq!(lstat(&m.path("x")).nlink(), 1);

    // A lower-only file: copied up first, same st_ino before and after.
    let before = ino(&m.path("lo"));
    fs::hard_link(m.path("lo"), m.path("d/lo2")).unwrap();
    let (a, b) = (lstat(&m.path("lo")), lstat(&m.path("d/lo2")));
    assert_eq!(a.ino(), before, "st_ino changed by link's copy-up");
    assert_eq!(a.ino(), b.ino());
    assert_eq!((a.nlink(), b.nlink()), (2, 2));
    assert_eq!(m.read("d/lo2"), "lower data");
    let (ua, ub) = (lstat(&m.upper_path("lo")), lstat(&m.upper_path("d/lo2")));
    assert_eq!(ua.ino(), ub.ino());
    assert_eq!(ua.nlink(), 2);
    assert_eq!(lstat(&l.lower(0).path("lo")).nlink(), 1);
}

#[test]
fn unlinked_open_file_stays_usable() {
    let l = Layers::new(1);
    l.lower(0).file("lo", "lower").file("lo_ro", "read only");
    let m = l.mount("u");

    // An upper file.
    m.write("t", "hello");
    let mut f = rw(&m.path("t"));
    fs::remove_file(m.path("t")).unwrap();
    assert!(!m.exists("t"));
    assert!(!m.upper_path("t").exists());
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    assert_eq!(s, "hello");
    f.write_all(b"XY").unwrap();
    let mut b = [0u8; 7];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"helloXY");
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 7);
    assert_eq!(md.nlink(), 0);
    f.set_len(3).unwrap();
    assert_eq!(f.metadata().unwrap().len(), 3);
    drop(f);

    // A lower-only file opened for writing (copied up), then unlinked (whiteout).
    let f = rw(&m.path("lo"));
    fs::remove_file(m.path("lo")).unwrap();
    assert!(!m.exists("lo"));
    let wh = lstat(&m.upper_path("lo"));
    assert!(
        wh.file_type().is_char_device() && wh.rdev() == 0,
        "no whiteout in the upper"
    );
    f.write_all_at(b"LOW", 0).unwrap();
    let mut b = [0u8; 5];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"LOWer");
    let md = f.metadata().unwrap();
    assert_eq!(md.len(), 5);
    assert_eq!(md.nlink(), 0);
    drop(f);
    assert_eq!(fs::read(l.lower(0).path("lo")).unwrap(), b"lower");

    // A lower-only file opened read-only, then unlinked.
    let f = File::open(m.path("lo_ro")).unwrap();
    fs::remove_file(m.path("lo_ro")).unwrap();
    let mut b = [0u8; 9];
    f.read_exact_at(&mut b, 0).unwrap();
    assert_eq!(&b, b"read only");
    assert_eq!(f.metadata().unwrap().len(), 9);
    assert!(!m.exists("lo_ro"));
}

/// A truncating open of a program that is running fails with ETXTBSY and loses nothing. (The
/// kernel checks for the running program only after the filesystem has done O_TRUNC.)
#[test]
fn truncating_open_of_running_program_keeps_its_data() {
    let l = Layers::new(1);
    let m = l.mount("u");
    let prog = m.path("sleeper");
    std::fs::copy("/bin/sleep", &prog).unwrap();
    let len = std::fs::metadata(&prog).unwrap().len();
    // Another test's fork may briefly hold our write descriptor (ETXTBSY): try again.
    let mut tries = 0;
    let child = loop {
        match std::process::Command::new(&prog).arg("30").spawn() {
            Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && tries < 50 => {
                tries += 1;
                std::thread::sleep(Duration::from_millis(20));
            }
            r => break r.unwrap(),
        }
    };
    let _guard = KillOnDrop(child);
    for flags in [
        libc::O_RDONLY | libc::O_TRUNC,
        libc::O_WRONLY,
        libc::O_RDWR | libc::O_TRUNC,
    ] {
        let c = std::ffi::CString::new(prog.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: open on a valid path; a returned fd is closed right away.
        let fd = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC) };
        let e = std::io::Error::last_os_error().raw_os_error();
        if fd >= 0 {
            // SAFETY: closing the fd just opened.
            unsafe { libc::close(fd) };
        }
        assert_eq!((fd, e), (-1, Some(libc::ETXTBSY)), "flags {flags:#x}");
    }
    assert_eq!(std::fs::metadata(&prog).unwrap().len(), len, "view");
    assert_eq!(
        std::fs::metadata(m.upper_path("sleeper")).unwrap().len(),
        len,
        "upper"
    );
}

/// A character device 0/0 made through the mount is a device, not a whiteout: it shows as
/// 0/0, survives a remount, and is stored as the stand-in char 0:1048575 in the upper.
#[test]
fn char_device_zero_zero_round_trips() {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let l = Layers::new(1);
    l.lower(0).file("lowerfile", "x");
    let mut m = l.mount("u");
    mknod(&m.path("dev00"), libc::S_IFCHR | 0o640, 0);
    let md = std::fs::symlink_metadata(m.path("dev00")).unwrap();
    assert!(md.file_type().is_char_device());
    assert_eq!(md.rdev(), 0);
    assert!(m.ls("").contains(&"dev00".to_string()));
    let up = std::fs::symlink_metadata(m.upper_path("dev00")).unwrap();
    assert!(up.file_type().is_char_device());
    assert_eq!(
        (libc::major(up.rdev()), libc::minor(up.rdev())),
        (0, 0xfffff)
    );
    // The stand-in number itself cannot be created.
    let c = std::ffi::CString::new(m.path("standin").as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: mknod on a valid path.
    let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, up.rdev()) };
    assert_eq!(
        (r, std::io::Error::last_os_error().raw_os_error()),
        (-1, Some(libc::EPERM))
    );
    m.unmount();
    let m2 = Mount::union(
        &[
            "--lower".into(),
            l.lowerdir_opt().into(),
            "--upper".into(),
            m.upper.clone().unwrap().into(),
            "--work".into(),
            m.work.clone().unwrap().into(),
            m.merged.clone().into(),
        ],
        m.merged.clone(),
        m.upper.clone(),
        m.work.clone(),
    );
    let md = std::fs::symlink_metadata(m2.path("dev00")).unwrap();
    assert!(
        md.file_type().is_char_device() && md.rdev() == 0,
        "after remount"
    );
}

/// A change made through one name of a lower hard link lands on that name when the name was
/// just looked up, whichever name the mount met first: copy-up breaks the link there, as
/// kernel overlayfs does, and the other names keep the lower file. (When both names are
/// cached by the kernel, FUSE does not say which one a change came through: see README.)
#[test]
fn copy_up_of_a_lower_hard_link_through_either_name() {
    for (first, then) in [("d/c", "b/b"), ("b/b", "d/c")] {
        let l = Layers::new(1);
        l.lower(0)
            .file("b/b", "shared")
            .dir("d")
            .hardlink("b/b", "d/c")
            .chmod("b/b", 0o644);
        let m = l.mount("u");
        let k = l.mount_kernel("k");
        for mnt in [&m, &k] {
            let a = lstat(&mnt.path(first));
            let b = lstat(&mnt.path(then));
            assert_eq!(a.ino(), b.ino());
            assert_eq!(a.nlink(), 2);
            let mut f = OpenOptions::new()
                .append(true)
                .open(mnt.path(then))
                .unwrap();
            f.write_all(b"+more").unwrap();
        }
        for mnt in [&m, &k] {
            // The name that kept the lower file lists the number it stats with, also before
            // it is looked up again.
            for name in [first, then] {
                let p = mnt.path(name);
                let listed = fs::read_dir(p.parent().unwrap())
                    .unwrap()
                    .map(|e| e.unwrap())
                    .find(|e| e.path() == p)
                    .map(|e| std::os::unix::fs::DirEntryExt::ino(&e))
                    .unwrap();
                assert_eq!(listed, lstat(&p).ino(), "d_ino of {name} after the copy-up");
            }
            assert_eq!(mnt.read(then), "shared+more", "written through {then}");
            assert_eq!(mnt.read(first), "shared", "{first} keeps the lower file");
            assert!(mnt.upper_path(then).exists());
            assert!(!mnt.upper_path(first).exists(), "{first} not copied up");
        }
        assert_eq!(
            fs::read_to_string(l.lower(0).path("b/b")).unwrap(),
            "shared"
        );
    }
}

/// A lower file with many names (more than a node keeps in a plain list) behaves as one with
/// two: each name is looked up, written through and removed on its own, as on kernel overlayfs.
#[test]
fn a_lower_file_with_many_names() {
    let l = Layers::new(1);
    let lower = l.lower(0);
    lower.file("d/f0", "shared").dir("e");
    for i in 1..120 {
        let dir = if i % 3 == 0 { "e" } else { "d" };
        lower.hardlink("d/f0", &format!("{dir}/f{i}"));
    }
    let name = |i: usize| format!("{}/f{i}", if i % 3 == 0 && i > 0 { "e" } else { "d" });
    let m = l.mount("u");
    let k = l.mount_kernel("k");
    for mnt in [&m, &k] {
        let ino0 = lstat(&mnt.path(&name(0))).ino();
        for i in 0..120 {
            let st = lstat(&mnt.path(&name(i)));
            assert_eq!((st.ino(), st.nlink()), (ino0, 120), "{}", name(i));
        }
        // Through a name in the middle, looked up again first, as the kernel does.
        let mut f = OpenOptions::new()
            .append(true)
            .open(mnt.path(&name(61)))
            .unwrap();
        f.write_all(b"+61").unwrap();
        drop(f);
        for i in (0..120).filter(|i| i % 4 != 1) {
            fs::remove_file(mnt.path(&name(i))).unwrap();
        }
    }
    for mnt in [&m, &k] {
        assert_eq!(mnt.read(&name(61)), "shared+61");
        assert!(mnt.upper_path(&name(61)).exists());
        for i in (0..120).filter(|i| i % 4 == 1 && *i != 61) {
            assert_eq!(mnt.read(&name(i)), "shared", "{}", name(i));
            assert!(!mnt.upper_path(&name(i)).exists(), "{} copied up", name(i));
        }
        for i in (0..120).filter(|i| i % 4 != 1) {
            assert!(!mnt.path(&name(i)).exists(), "{} still there", name(i));
        }
    }
    let o = TreeOpts {
        mtime: false,
        ..TreeOpts::default()
    };
    assert_eq!(tree(&m.merged, &o), tree(&k.merged, &o));
}

/// The names of a lower hard link are looked up at each use (the daemon must know which
/// name a change comes through), but its attributes are kept as any file's: a `stat` asks
/// for the name only, not for the attributes again.
#[test]
fn a_lower_hard_link_keeps_its_attributes_cached() {
    let l = Layers::new(1);
    l.lower(0).file("a", "shared").hardlink("a", "b");
    let base = l.mkdir("fg");
    let mut d = ForegroundDaemon::start(&l, &base, &["--log-level", "debug"]);
    for _ in 0..5 {
        for name in ["a", "b"] {
            assert_eq!(lstat(&d.merged.join(name)).nlink(), 2);
        }
    }
    let log = d.log();
    let lookups = log.matches("Lookup { name: \"a\" }").count();
    assert!(lookups >= 5, "{log}");
    // The first statx asks for the birth time too, which a lookup does not bring.
    let attrs = log
        .lines()
        .filter(|l| !l.contains(" ino 1 ") && (l.contains(": Getattr") || l.contains(": Statx")))
        .count();
    assert!(
        attrs <= 1,
        "the file's attributes asked for {attrs} times\n{log}"
    );
    d.unmount().unwrap();
}

/// Breaking a lower hard link gives the names that keep the lower file a number of their own.
/// Listings the kernel cached before show that number right after the change: those of
/// names the mount looked up and of names it only ever listed (readdirplus off).
#[test]
fn listings_cached_before_a_hard_link_copy_up_show_the_new_numbers() {
    // Reads the whole listing, so that the kernel keeps it.
    let d_ino = |dir: &Path, name: &str| {
        let all: Vec<fs::DirEntry> = fs::read_dir(dir).unwrap().map(|e| e.unwrap()).collect();
        all.iter()
            .find(|e| e.file_name() == name)
            .map(std::os::unix::fs::DirEntryExt::ino)
            .unwrap()
    };
    for (opts, look_up) in [(&[][..], true), (&["-o", "readdirplus=off"][..], false)] {
        let l = Layers::new(1);
        l.lower(0)
            .file("b/b", "shared")
            .dir("d")
            .dir("e")
            .hardlink("b/b", "d/c")
            .hardlink("b/b", "e/f");
        let m = l.mount_with("u", opts);
        // The kernel caches each listing.
        let before = lstat(&m.path("b/b")).ino();
        for (dir, name) in [("b", "b"), ("d", "c"), ("e", "f")] {
            assert_eq!(
                d_ino(&m.path(dir), name),
                before,
                "{opts:?}: {dir} listed before"
            );
        }
        if look_up {
            assert_eq!(lstat(&m.path("d/c")).ino(), before);
        }
        fs::OpenOptions::new()
            .append(true)
            .open(m.path("b/b"))
            .unwrap()
            .write_all(b"+more")
            .unwrap();
        assert_eq!(lstat(&m.path("b/b")).ino(), before, "stable across copy-up");
        for (dir, name) in [("b", "b"), ("d", "c"), ("e", "f")] {
            let listed = d_ino(&m.path(dir), name);
            let stat = lstat(&m.path(&format!("{dir}/{name}"))).ino();
            assert_eq!(
                listed, stat,
                "{opts:?}: d_ino of {dir}/{name} after the copy-up"
            );
        }
        let others = lstat(&m.path("d/c")).ino();
        assert_ne!(others, before);
        assert_eq!(lstat(&m.path("e/f")).ino(), others);
    }
}

/// A read through an `O_NOATIME` descriptor leaves the upper file's access time alone, on both
/// I/O paths; an ordinary read updates it (relatime: the old atime is before the mtime). Each
/// read runs on a fresh mount, so that it reaches the daemon rather than the page cache.
#[test]
fn o_noatime_reaches_the_upper_file() {
    for args in [&[][..], &["--passthrough", "off"][..]] {
        let l = Layers::new(1);
        l.lower(0).dir("d");
        let m = l.mount_with("u", args);
        fs::write(m.path("d/f"), "data").unwrap();
        let up = m.upper_path("d/f");
        drop(m);
        let old = 1_000_000_000;
        set_times(&up, old, lstat(&up).mtime());
        for noatime in [true, false] {
            let m = l.mount_with("u", args);
            let mut f = OpenOptions::new()
                .read(true)
                .custom_flags(if noatime { libc::O_NOATIME } else { 0 })
                .open(m.path("d/f"))
                .unwrap();
            let mut s = String::new();
            f.read_to_string(&mut s).unwrap();
            assert_eq!(s, "data");
            drop(f);
            let atime = lstat(&up).atime();
            if noatime {
                assert_eq!(
                    atime, old,
                    "{args:?}: a read with O_NOATIME changed the atime"
                );
            } else {
                assert!(atime > old, "{args:?}: an ordinary read left the atime");
            }
        }
    }
}

/// Changes of data made as root: what a root process with CAP_FSETID writes or truncates
/// keeps its set-ID bits; without that capability (`setpriv --bounding-set -fsetid`) a write,
/// truncate, truncating open and fallocate drop set-user-ID and group-executable
/// set-group-ID. A chown to the same owner (-1, -1) drops them even with the capability. The
/// same as kernel overlayfs, on both I/O paths.
#[test]
fn set_id_bits_follow_cap_fsetid_as_kernel_overlayfs_does() {
    const SCRIPT: &str = r#"
import os, sys
root, phase = sys.argv[1], sys.argv[2]
def append(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    os.write(fd, b"x")
    os.close(fd)
if phase == "keep":
    os.truncate(f"{root}/t_keep", 1)
    append(f"{root}/w_keep")
    os.chown(f"{root}/c_same", -1, -1)
else:
    os.truncate(f"{root}/t_drop", 1)
    append(f"{root}/w_drop")
    os.close(os.open(f"{root}/o_drop", os.O_WRONLY | os.O_TRUNC))
    fd = os.open(f"{root}/f_drop", os.O_WRONLY)
    os.posix_fallocate(fd, 0, 8192)
    os.close(fd)
"#;
    let names = [
        "t_keep", "w_keep", "c_same", "t_drop", "w_drop", "o_drop", "f_drop",
    ];
    let l = Layers::new(1);
    for n in names {
        l.lower(0).file(n, "data").chmod(n, 0o6755);
    }
    let modes = |m: &Mount| -> Vec<String> {
        let root = m.merged.to_str().unwrap();
        let run = |pre: &[&str], phase: &str| {
            let out = Command::new(pre[0])
                .args(&pre[1..])
                .args(["python3", "-c", SCRIPT, root, phase])
                .output()
                .unwrap();
            assert!(out.status.success(), "{phase}: {out:?}");
        };
        run(&["env"], "keep");
        run(&["setpriv", "--bounding-set", "-fsetid", "--"], "drop");
        names
            .iter()
            .map(|n| format!("{n} {:o}", lstat(&m.path(n)).mode()))
            .collect()
    };
    let kernel = [
        "t_keep 106755",
        "w_keep 106755",
        "c_same 100755",
        "t_drop 100755",
        "w_drop 100755",
        "o_drop 100755",
        "f_drop 100755",
    ];
    same_as_kernel_on_both_paths(&l, &kernel, modes);
}

/// What the Python `script`, run by the command prefix `who` (`env`, or `setpriv` with other
/// ids) with `args`, prints, trimmed.
fn python_says<S: AsRef<std::ffi::OsStr>>(who: &[&str], script: &str, args: &[S]) -> String {
    let out = Command::new(who[0])
        .args(&who[1..])
        .args(["/usr/bin/python3", "-I", "-c", script])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{who:?} {script}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `outcome` on kernel overlayfs over `l`, which must give `kernel`, then on unionmount
/// over the same layers on each I/O path, which must give the same.
fn same_as_kernel_on_both_paths(
    l: &Layers,
    kernel: &[&str],
    outcome: impl Fn(&Mount) -> Vec<String>,
) {
    let k = l.mount_kernel("k");
    let a = l.mount_with("a", &["--passthrough", "auto"]);
    let b = l.mount_with("b", &["--passthrough", "off"]);
    let want = outcome(&k);
    assert_eq!(want, kernel, "kernel overlayfs");
    assert_eq!(outcome(&a), want, "unionmount, passthrough");
    assert_eq!(outcome(&b), want, "unionmount, page-cached path");
}

/// chown(f, -1, -1) of a FIFO or a device node with set-ID bits: the kernel takes them from
/// every kind but directories (`chown_common`), so as root set-user-ID and group-executable
/// set-group-ID go, and a caller that does not own the object, and so may not change its
/// mode, gets EPERM and changes nothing. The same as kernel overlayfs, on both I/O paths.
#[test]
fn chown_to_the_same_ids_drops_set_ids_of_fifos_and_devices() {
    const SCRIPT: &str = r#"
import errno, os, sys
try:
    os.chown(sys.argv[1], -1, -1)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;
    let l = Layers::new(1);
    let lower = l.lower(0);
    lower.fifo("p_root").fifo("p_other");
    for n in ["c_root", "c_other"] {
        mknod(&lower.path(n), libc::S_IFCHR | 0o644, libc::makedev(1, 3));
    }
    for n in ["p_root", "p_other", "c_root", "c_other"] {
        lower.chmod(n, 0o6755);
    }
    let outcome = |m: &Mount| -> Vec<String> {
        let mut v = Vec::new();
        for (n, who) in [
            ("p_root", &["env"][..]),
            ("c_root", &["env"][..]),
            (
                "p_other",
                &["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"][..],
            ),
            (
                "c_other",
                &["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"][..],
            ),
        ] {
            let said = python_says(who, SCRIPT, &[&m.path(n)]);
            v.push(format!("{n} {said} {:o}", lstat(&m.path(n)).mode()));
        }
        v
    };
    let kernel = [
        "p_root ok 10755",
        "c_root ok 20755",
        "p_other EPERM 16755",
        "c_other EPERM 26755",
    ];
    same_as_kernel_on_both_paths(&l, &kernel, outcome);
}

/// Setting or removing an access ACL takes set-group-ID from an owner outside the object's
/// group and without CAP_FSETID (`posix_acl_update_mode`; kernel overlayfs also on a removal,
/// which then finds the copied-up object and succeeds even where there was no ACL),
/// directories included, and leaves it to a member of the group.
/// The daemon changes the ACL with its own privileges, which keep the bit. The same as kernel
/// overlayfs, on both I/O paths.
#[test]
fn acl_changes_drop_set_group_id_of_non_members() {
    const SCRIPT: &str = r#"
import errno, os, struct, sys
acl = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF) for tag, perm in ((1, 7), (4, 5), (0x20, 5)))
name = "system.posix_acl_access"
try:
    if sys.argv[1] == "set":
        os.setxattr(sys.argv[2], name, acl, follow_symlinks=False)
    else:
        os.removexattr(sys.argv[2], name, follow_symlinks=False)
    print("ok")
except OSError as e:
    print(errno.errorcode[e.errno])
"#;
    let l = Layers::new(1);
    let lower = l.lower(0);
    lower.dir("d").dir("r").file("f", "f").file("g", "g");
    for (n, mode, gid) in [
        ("d", 0o2775, 0),
        ("r", 0o2775, 0),
        ("f", 0o2755, 0),
        ("g", 0o2755, 1000),
    ] {
        // The owner first: root's chown takes set-group-ID from group-executable files.
        lower.chown(n, 1000, gid).chmod(n, mode);
    }
    let outcome = |m: &Mount| -> Vec<String> {
        let mut v = Vec::new();
        let user = ["setpriv", "--reuid=1000", "--regid=1000", "--clear-groups"];
        for (op, n) in [("set", "d"), ("set", "f"), ("set", "g"), ("remove", "r")] {
            let said = python_says(&user, SCRIPT, &[op.as_ref(), m.path(n).as_os_str()]);
            v.push(format!("{op} {n} {said} {:o}", lstat(&m.path(n)).mode()));
        }
        v
    };
    let kernel = [
        "set d ok 40755",
        "set f ok 100755",
        "set g ok 102755",
        "remove r ok 40775",
    ];
    same_as_kernel_on_both_paths(&l, &kernel, outcome);
}

/// A 32-bit program's chown(f, -1, -1): the daemon reads the caller's call from /proc to tell
/// a chown from a change of data, and a 32-bit program's calls carry the numbers of the i386
/// table. As root (with CAP_FSETID) the chown drops set-user-ID and group-executable
/// set-group-ID, where a write would keep them; the same as kernel overlayfs, on both I/O
/// paths, for chown32, lchown32 and the 16-bit chown. While the file is open for writing, the
/// daemon's fallback guess (no call known) would be a change of data.
#[cfg(target_arch = "x86_64")]
#[test]
fn a_32_bit_programs_chown_is_told_from_a_write() {
    use std::os::unix::fs::PermissionsExt;
    // No C library: the call through `int $0x80`, the errno as the exit status.
    const PROGRAM: &str = r#"
static int sys3(int nr, int a, int b, int c)
{
    int r;
    __asm__ volatile("int $0x80" : "=a"(r) : "a"(nr), "b"(a), "c"(b), "d"(c) : "memory");
    return r;
}
void _start(void)
{
    int r = sys3(NR, (int)"f", -1, -1);
    sys3(1, r < 0 ? -r : 0, 0, 0);
    for (;;)
        ;
}
"#;
    let l = Layers::new(1);
    l.lower(0).dir("d");
    let src = l.tmp.path().join("chown.c");
    fs::write(&src, PROGRAM).unwrap();
    let calls = [("chown32", 212), ("lchown32", 198), ("chown16", 182)];
    for (name, nr) in calls {
        let out = Command::new("cc")
            .args(["-m32", "-O2", "-static", "-nostdlib", "-fno-pic"])
            .args(["-fno-stack-protector", &format!("-DNR={nr}"), "-o"])
            .arg(l.tmp.path().join(name))
            .arg(&src)
            .output()
            .expect("run cc");
        assert!(
            out.status.success(),
            "cannot build the 32-bit test program (cc -m32): {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let k = l.mount_kernel("k");
    let a = l.mount("a");
    let b = l.mount_with("b", &["--passthrough", "off"]);
    for m in [&k, &a, &b] {
        for (name, _) in calls {
            let dir = m.path(&format!("d/{name}"));
            fs::create_dir(&dir).unwrap();
            fs::write(dir.join("f"), "data").unwrap();
            fs::set_permissions(dir.join("f"), fs::Permissions::from_mode(0o6755)).unwrap();
            let writer = OpenOptions::new().append(true).open(dir.join("f")).unwrap();
            let st = Command::new(l.tmp.path().join(name))
                .current_dir(&dir)
                .status()
                .unwrap();
            drop(writer);
            assert_eq!(st.code(), Some(0), "{name} in {}", dir.display());
            assert_eq!(
                lstat(&dir.join("f")).mode() & 0o7777,
                0o0755,
                "{name} on {}",
                m.merged.display()
            );
        }
    }
}

/// A write drops a file capability (`security.capability`), also one set through the mount
/// after earlier writes (when the kernel had already stopped checking that file), on both
/// I/O paths, as kernel overlayfs does.
#[test]
fn writes_drop_file_capabilities() {
    // Permitted: CAP_NET_BIND_SERVICE.
    let cap = file_capability(10);
    let l = Layers::new(1);
    l.lower(0)
        .file("lower_cap", "data")
        .xattr("lower_cap", "security.capability", &cap)
        .file("later_cap", "data");
    let k = l.mount_kernel("k");
    let a = l.mount_with("a", &["--passthrough", "auto"]);
    let b = l.mount_with("b", &["--passthrough", "off"]);
    for (m, what) in [
        (&k, "kernel overlayfs"),
        (&a, "passthrough"),
        (&b, "page-cached"),
    ] {
        let append = |name: &str| {
            let mut f = OpenOptions::new().append(true).open(m.path(name)).unwrap();
            f.write_all(b"+").unwrap();
        };
        assert_eq!(
            get_xattr(&m.path("lower_cap"), "security.capability"),
            Ok(cap.clone())
        );
        append("lower_cap");
        assert_eq!(
            get_xattr(&m.path("lower_cap"), "security.capability"),
            Err(libc::ENODATA),
            "{what}: the copied-up file kept its capability after a write"
        );
        append("later_cap");
        set_xattr(&m.path("later_cap"), "security.capability", &cap);
        append("later_cap");
        assert_eq!(
            get_xattr(&m.path("later_cap"), "security.capability"),
            Err(libc::ENODATA),
            "{what}: a capability set after a write survived the next write"
        );
        assert_eq!(m.read("later_cap"), "data++", "{what}");
    }
}

/// Changes the first byte of each page of the first `len` bytes of the file at `p` through a
/// shared mapping, and syncs them.
fn store_through_a_mapping(p: &Path, len: usize) {
    let f = OpenOptions::new().read(true).write(true).open(p).unwrap();
    // SAFETY: maps `len` bytes of an open file at least that long, shared, stores one byte
    // in each page, syncs the pages and unmaps them.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "mmap {}", p.display());
        for page in (0..len).step_by(4096) {
            *(at as *mut u8).add(page) = b'Q';
        }
        let r = libc::msync(at, len, libc::MS_SYNC);
        libc::munmap(at, len);
        assert_eq!(r, 0, "msync {}", p.display());
    }
}

/// The kernel's write-back of cached pages keeps a file's capability and set-ID bits: a
/// store through a shared mapping drops nothing (as on ext4), nor does the write-back of
/// bytes written before a capability was set on the same descriptor. (The upper's own write
/// path drops them: the daemon puts them back.)
#[test]
fn write_backs_keep_capabilities_and_set_id_bits() {
    let cap = file_capability(10);
    let l = Layers::new(1);
    l.lower(0)
        .file("cap", "data")
        .xattr("cap", "security.capability", &cap)
        .file("suid", "data")
        .chmod("suid", 0o4755)
        .file("sgid", "data")
        .chmod("sgid", 0o2775)
        .file_bytes("big", &vec![b'b'; 8 << 20]);
    let k = l.mount_kernel("k");
    let a = l.mount_with("a", &["--passthrough", "auto"]);
    let b = l.mount_with("b", &["--passthrough", "off"]);
    for (m, what) in [
        (&k, "kernel overlayfs"),
        (&a, "passthrough"),
        (&b, "page-cached"),
    ] {
        for name in ["cap", "suid", "sgid"] {
            store_through_a_mapping(&m.path(name), 4);
        }
        // Written back in several requests at once, each of which must leave the capability
        // for the others to find.
        for round in 0..10 {
            set_xattr(&m.path("big"), "security.capability", &cap);
            store_through_a_mapping(&m.path("big"), 8 << 20);
            assert_eq!(
                get_xattr(&m.path("big"), "security.capability"),
                Ok(cap.clone()),
                "{what}: round {round} of 8 MiB stores"
            );
        }
        let mut f = File::create(m.path("later")).unwrap();
        f.write_all(&[7u8; 10000]).unwrap();
        let c = CString::new(b"security.capability".to_vec()).unwrap();
        // SAFETY: sets an xattr from a buffer we own on an fd we hold.
        let r = unsafe {
            libc::fsetxattr(f.as_raw_fd(), c.as_ptr(), cap.as_ptr().cast(), cap.len(), 0)
        };
        assert_eq!(r, 0, "{what}: {}", std::io::Error::last_os_error());
        drop(f);
        for name in ["cap", "later"] {
            assert_eq!(
                get_xattr(&m.path(name), "security.capability"),
                Ok(cap.clone()),
                "{what}: {name}"
            );
        }
        let mode = |n: &str| lstat(&m.path(n)).mode() & 0o7777;
        assert_eq!((mode("suid"), mode("sgid")), (0o4755, 0o2775), "{what}");
        assert_eq!(&m.read("cap")[..4], "Qata", "{what}");
        assert_eq!(
            fs::read(m.path("later")).unwrap(),
            vec![7u8; 10000],
            "{what}"
        );
    }
}

/// Whether the first page of the file at `p` is in the page cache.
fn first_page_cached(p: &Path) -> bool {
    let f = File::open(p).unwrap();
    // SAFETY: maps one page of an open file read-only (touching nothing), asks the kernel
    // which of it is cached into a one-byte vector, and unmaps it.
    unsafe {
        let at = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        );
        assert_ne!(at, libc::MAP_FAILED, "mmap {}", p.display());
        let mut vec = 0u8;
        let r = libc::mincore(at, 4096, &mut vec);
        libc::munmap(at, 4096);
        assert_eq!(r, 0, "mincore {}", p.display());
        vec & 1 == 1
    }
}

/// A process that opens one file after another of a directory for reading has the rest of
/// the directory's small files read into the page cache, from the layer they came from: a
/// lower file is dropped from the cache, four others are opened through the mount (nothing
/// is read), and the dropped one comes back into the cache.
#[test]
fn opening_files_one_after_another_reads_the_rest_ahead() {
    let l = Layers::new(1);
    for i in 0..8 {
        l.lower(0).file_bytes(&format!("d/f{i}"), &[7u8; 65536]);
    }
    let m = l.mount("u");
    let last = l.lowers[0].join("d/f7");
    let f = File::open(&last).unwrap();
    f.sync_all().unwrap();
    // SAFETY: a valid open fd; dropping clean cached pages changes no data.
    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    assert!(!first_page_cached(&last), "the lower file was dropped");
    for i in 0..4 {
        File::open(m.path(&format!("d/f{i}"))).unwrap();
    }
    // Read ahead in the background: wait for it (a bound, not a timing assertion).
    assert!(
        wait_until(Duration::from_secs(20), || first_page_cached(&last)),
        "the fifth file was read ahead"
    );
}

// ---------------------------------------------------------------------------------------
// Streaming ahead of sequential readers (page-cached path)
// ---------------------------------------------------------------------------------------

/// Content of the streaming tests' files: differs in every page and at every offset in it.
fn streamed_byte(i: u64) -> u8 {
    ((i * 31 + i / 4096 * 7) % 251) as u8
}

fn streamed_content(len: u64) -> Vec<u8> {
    (0..len).map(streamed_byte).collect()
}

/// Which of the pages of `f` in `[from, to)` the kernel's page cache holds.
fn resident_pages(f: &File, len: u64, from: u64, to: u64) -> Vec<bool> {
    // SAFETY: a read-only shared mapping of an open file, unmapped below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len as usize,
            libc::PROT_READ,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED, "mmap");
    let mut vec = vec![0u8; len.div_ceil(4096) as usize];
    // SAFETY: `vec` has a byte for every page of the mapping.
    let r = unsafe { libc::mincore(p, len as usize, vec.as_mut_ptr()) };
    // SAFETY: unmaps the mapping made above.
    unsafe { libc::munmap(p, len as usize) };
    assert_eq!(r, 0, "mincore");
    vec[(from / 4096) as usize..(to / 4096) as usize]
        .iter()
        .map(|b| b & 1 == 1)
        .collect()
}

/// The runs of `true` in `pages` (pages from byte `base`), as byte ranges.
fn page_runs(pages: &[bool], base: u64) -> String {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, p) in pages.iter().chain([&false]).enumerate() {
        match (start, *p) {
            (None, true) => start = Some(i),
            (Some(s), false) => {
                runs.push(format!(
                    "{:#x}-{:#x}",
                    base + s as u64 * 4096,
                    base + i as u64 * 4096
                ));
                start = None;
            }
            _ => {}
        }
    }
    runs.join(", ")
}

/// On the page-cached path a lower file read in order is stored in the kernel's page cache
/// ahead of the reader, 4 MiB windows at a time (the first page of each left for the reader
/// to miss), and the reader sees exactly the file's data.
#[test]
fn a_lower_file_read_in_order_is_streamed_ahead_of_the_reader() {
    const MIB: u64 = 1 << 20;
    let len = 24 * MIB + 1000;
    let want = streamed_content(len);
    let l = Layers::new(1);
    l.lower(0).file_bytes("big", &want);
    let m = l.mount_with("u", &["--passthrough", "off"]);
    let mut f = File::open(m.path("big")).unwrap();
    let mut got = vec![0u8; 2 * MIB as usize];
    for chunk in got.chunks_mut(128 << 10) {
        f.read_exact(chunk).unwrap();
    }
    assert!(got == want[..2 * MIB as usize], "first 2 MiB");
    // The reader stopped at 2 MiB (the kernel's own read-ahead, 1 MiB as root, reaches a
    // little past it): what lies beyond 5 MiB can only have been stored by the daemon, up to
    // two windows past the last READ. Streaming starts with a READ that ends past 1 MiB (a
    // busy machine may serve the reader's later pages from the stream, with no READ), so
    // that is at least 9 MiB, all but the page at 8 MiB.
    const PAGES: usize = (MIB / 4096) as usize;
    let stored = |r: &[bool]| {
        r[PAGES..4 * PAGES]
            .iter()
            .chain(&r[4 * PAGES + 1..5 * PAGES])
            .all(|x| *x)
    };
    let mut resident = Vec::new();
    for _ in 0..100 {
        resident = resident_pages(&f, len, 4 * MIB, 12 * MIB);
        if stored(&resident) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        stored(&resident),
        "pages 5-9 MiB but 8 MiB stored ahead; resident pages in 4-12 MiB: {}",
        page_runs(&resident, 4 * MIB)
    );
    assert!(
        !resident[4 * PAGES],
        "the first page of a window is left for the reader"
    );
    assert!(
        !resident_pages(&f, len, 12 * MIB, 16 * MIB)
            .iter()
            .any(|r| *r),
        "nothing stored beyond two windows past the reader"
    );
    let mut rest = Vec::new();
    f.read_to_end(&mut rest).unwrap();
    assert_eq!(rest.len() as u64, len - 2 * MIB, "length read");
    let first_bad = rest
        .iter()
        .zip(&want[2 * MIB as usize..])
        .position(|(a, b)| a != b);
    assert_eq!(first_bad, None, "data after 2 MiB (offset from 2 MiB)");
    assert!(
        fs::read(m.path("big")).unwrap() == want,
        "whole file read again"
    );
    assert!(!m.upper_path("big").exists(), "reading copies nothing up");
}

/// Pages stored ahead of a reader never overwrite what is written after: a writable open or
/// a truncation of the file waits for a store under way. Writers open the file while a
/// reader streams it; every write and every truncation must show afterwards.
#[test]
fn writes_and_truncations_during_streaming_are_kept() {
    const MIB: u64 = 1 << 20;
    let len = 16 * MIB;
    let content = streamed_content(len);
    let l = Layers::new(1);
    for i in 0..6 {
        l.lower(0).file_bytes(&format!("f{i}"), &content);
    }
    let m = l.mount_with("u", &["--passthrough", "off"]);
    for i in 0..6 {
        let path = m.path(&format!("f{i}"));
        let mut reader = File::open(&path).unwrap();
        let mut buf = vec![0u8; 128 << 10];
        // Read 1.125-1.75 MiB in order (the stream starts at 1 MiB), then change the file
        // ahead of the reader, while the stream may still be storing.
        for _ in 0..9 + i {
            reader.read_exact(&mut buf).unwrap();
        }
        let mut want = content.clone();
        if i % 2 == 0 {
            let w = OpenOptions::new().write(true).open(&path).unwrap();
            for k in 0..6u64 {
                let off = 2 * MIB + k * 2 * MIB + 4096 * k + 100;
                let mark = vec![b'A' + k as u8; 5000];
                w.write_all_at(&mark, off).unwrap();
                want[off as usize..off as usize + mark.len()].copy_from_slice(&mark);
            }
        } else {
            let cut = 3 * MIB + 17;
            fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(cut)
                .unwrap();
            want.truncate(cut as usize);
            // Grown again: what lies past the cut must read back as zeros.
            nix_truncate(&path, len);
            want.resize(len as usize, 0);
        }
        // The reader goes on to the end; then everything is read again from the cache.
        let mut rest = Vec::new();
        reader.read_to_end(&mut rest).unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let got = fs::read(&path).unwrap();
        assert_eq!(got.len(), want.len(), "f{i}: size");
        let first_bad = got.iter().zip(&want).position(|(a, b)| a != b);
        assert_eq!(first_bad, None, "f{i}: first byte that differs");
        assert_eq!(
            fs::metadata(&path).unwrap().len(),
            want.len() as u64,
            "f{i}: size after the stream"
        );
    }
}

/// truncate(2) by path (no open file).
fn nix_truncate(p: &Path, len: u64) {
    // SAFETY: a valid C string path.
    let r = unsafe { libc::truncate(cs(p).as_ptr(), len as i64) };
    assert_eq!(r, 0, "truncate {p:?}: {}", std::io::Error::last_os_error());
}

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct Handle {
    bytes: libc::c_uint,
    kind: libc::c_int,
    data: [u8; 128],
}

fn handle_of(p: &Path) -> Handle {
    let mut h = Handle {
        bytes: 128,
        kind: 0,
        data: [0; 128],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: a valid C string path, a handle buffer of the size it states, an int out-pointer.
    let r = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            libc::AT_FDCWD,
            cs(p).as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "name_to_handle_at {p:?}: {}",
        std::io::Error::last_os_error()
    );
    h
}

/// Reads the file a handle opens (through `dir`'s mount), or the errno.
fn read_by_handle(dir: &File, h: &mut Handle) -> Result<String, i32> {
    // SAFETY: a valid directory fd and a handle filled by name_to_handle_at.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            dir.as_raw_fd(),
            h as *mut Handle,
            libc::O_RDONLY | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0));
    }
    // SAFETY: open_by_handle_at returned a new fd that nothing else owns.
    let mut f = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    let mut s = String::new();
    f.read_to_string(&mut s).unwrap();
    Ok(s)
}

/// A file handle of a deleted file never opens another file that got its inode number, as
/// on ext4 (ESTALE): the number comes back with another generation. A live file's handle
/// opens it.
#[test]
fn a_deleted_files_handle_does_not_open_its_successor() {
    let l = Layers::new(1);
    l.lower(0).dir("d");
    // The upper on an ext4 of its own: no other test takes the freed inode meanwhile.
    let image = l.root().join("upper.img");
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F"])
        .arg(&image)
        .arg("8M")
        .output()
        .expect("mkfs.ext4 (Debian/Ubuntu: apt-get install e2fsprogs)");
    assert!(out.status.success(), "mkfs.ext4: {out:?}");
    let fs_root = l.mkdir("u");
    let _ext4 = scratch_mount(&["-o", "loop"], &image, &fs_root);
    let m = l.mount("u");
    let d = m.path("e");
    fs::create_dir(&d).unwrap();
    // Made in the upper itself: no open of it through the mount, whose release (sent to
    // the daemon after the close returns) could keep the inode in use past the unlink.
    fs::write(m.upper_path("e/victim"), "victim").unwrap();
    let upper_number = fs::metadata(m.upper_path("e/victim")).unwrap().ino();
    let number = ino(&d.join("victim"));
    let mut old = handle_of(&d.join("victim"));
    fs::remove_file(d.join("victim")).unwrap();
    // ext4 gives the freed inode to the next file made. Its number is the deleted file's
    // once the daemon has also forgotten the deleted file's node (the kernel tells it a
    // moment later); a file made before that gets a number of its own and is removed again.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut successor = None;
    for i in 0.. {
        let p = d.join(format!("new{i}"));
        fs::write(&p, p.file_name().unwrap().as_bytes()).unwrap();
        if ino(&p) == number {
            successor = Some(p);
            break;
        }
        if std::time::Instant::now() > deadline {
            break;
        }
        if fs::symlink_metadata(m.upper_path(&format!("e/new{i}")))
            .unwrap()
            .ino()
            == upper_number
        {
            fs::remove_file(&p).unwrap();
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let successor = successor.expect("a new file got the deleted file's number");
    let dir = File::open(&d).unwrap();
    assert_eq!(
        read_by_handle(&dir, &mut old),
        Err(libc::ESTALE),
        "the deleted file's handle, now that {successor:?} has its number"
    );
    let mut live = handle_of(&successor);
    assert_eq!(
        read_by_handle(&dir, &mut live).as_deref(),
        Ok(successor.file_name().unwrap().to_str().unwrap()),
        "a live file's handle"
    );
}

/// `copy_file_range` between files opened with O_DIRECT keeps direct I/O's alignment, as on
/// kernel overlayfs and ext4 (the kernel's copy reads or writes such a file directly):
/// EINVAL for an offset or a length off it, nothing copied; aligned copies work. The daemon
/// copies with descriptors of its own, which used to copy anything.
#[test]
fn copy_file_range_keeps_direct_io_alignment() {
    let data: Vec<u8> = (0..8192u32).map(|i| b'A' + (i % 8) as u8).collect();
    let l = Layers::new(1);
    l.lower(0).file_bytes("f", &data);
    // (source O_DIRECT, target O_DIRECT, offset in, offset out, length); one file.
    let cases = [
        (true, true, 0, 1, 1),
        (true, false, 0, 6000, 100),
        (false, true, 0, 1000, 512),
        (false, true, 3, 4096, 4096),
        (true, true, 0, 4096, 4096),
        (false, false, 1, 3, 7),
    ];
    let run = |m: &Mount| -> Vec<(Result<isize, i32>, Vec<u8>)> {
        let p = m.path("f");
        let open = |direct: bool, write: bool| {
            OpenOptions::new()
                .read(true)
                .write(write)
                .custom_flags(if direct { libc::O_DIRECT } else { 0 })
                .open(&p)
                .unwrap()
        };
        cases
            .iter()
            .map(|&(src_direct, dst_direct, off_in, off_out, len)| {
                fs::write(&p, &data).unwrap();
                let (src, dst) = (open(src_direct, false), open(dst_direct, true));
                let (mut oi, mut oo): (i64, i64) = (off_in, off_out);
                // SAFETY: valid fds and offsets.
                let n = unsafe {
                    libc::copy_file_range(
                        src.as_raw_fd(),
                        &mut oi,
                        dst.as_raw_fd(),
                        &mut oo,
                        len,
                        0,
                    )
                };
                drop((src, dst));
                let res = if n < 0 { Err(last_errno()) } else { Ok(n) };
                (res, fs::read(&p).unwrap())
            })
            .collect()
    };
    let k = l.mount_kernel("k");
    let want = run(&k);
    assert_eq!(
        want[0].0,
        Err(libc::EINVAL),
        "kernel overlayfs, the 1-byte copy"
    );
    assert_eq!(want[4].0, Ok(4096), "kernel overlayfs, the aligned copy");
    for extra in [&[][..], &["--passthrough", "off"][..]] {
        let m = l.mount_with(&format!("u{}", extra.len()), extra);
        let got = run(&m);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert_eq!(g.0, w.0, "{extra:?} case {:?}: result", cases[i]);
            assert!(g.1 == w.1, "{extra:?} case {:?}: content differs", cases[i]);
        }
    }
}
