//! Containment (SPEC §6): layer content is hostile, and nothing the daemon does on behalf of
//! a request may reach outside the layers — no following of symlinks, whether they sit in a
//! lower or in the upper, whether they were there at mount time or swapped in under a live
//! mount; no opening of FIFOs or device nodes to copy them up; hard links to outside files are
//! broken by copy-up, never written through.
//!
//! A sentinel tree outside the layers (files, directories, a symlink, xattrs, a file
//! hard-linked into a lower) is snapshotted — content, type, mode, owner, link count, inode,
//! atime/mtime/ctime, every xattr, directory listings, all read without touching atime — and
//! must be identical after every operation: reads, writes, chmod, chown, truncate, utimes,
//! rename, unlink, rmdir, mkdir, link, symlink, setxattr through the mount over the hostile
//! entries. The test process itself resolves every path in the mount with
//! `RESOLVE_NO_SYMLINKS`, so only the daemon could ever follow a symlink. Every operation
//! runs under a time bound (a hang fails the test instead of blocking it), the daemon must
//! answer a stat of the root at the end and must not have panicked.

mod common;
use common::*;

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs::{self, File};
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::mpsc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------

fn cs(p: impl AsRef<std::ffi::OsStr>) -> CString {
    CString::new(p.as_ref().as_bytes()).unwrap()
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap()
}

fn rc(r: libc::c_int) -> Result<(), i32> {
    if r < 0 { Err(last_errno()) } else { Ok(()) }
}

/// Runs `f` in a thread; a call that does not return within the bound fails the test.
fn bounded<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(20)) {
        Ok(v) => v,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            panic!("{what}: no answer within 20 s (the daemon is blocked)")
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: failed (see above)"),
    }
}

/// `openat2` of `rel` under `dir`, refusing every symlink (and never leaving `dir`): the
/// test never follows a link itself.
fn open2(dir: i32, rel: &str, flags: i32, mode: u32) -> Result<OwnedFd, i32> {
    // SAFETY: `dir` is the mount root fd, open for the life of the borrow.
    let dir = unsafe { std::os::fd::BorrowedFd::borrow_raw(dir) };
    unionmount::sys::open_beneath(dir, &cs(rel), flags, mode).map_err(|e| e.code())
}

/// The mount root, opened once; every operation below goes through it.
struct M {
    root: OwnedFd,
}

impl M {
    fn new(merged: &Path) -> M {
        let f = File::open(merged).unwrap();
        M { root: f.into() }
    }

    fn fd(&self) -> i32 {
        self.root.as_raw_fd()
    }

    /// The directory holding `rel` (opened without following links) and the last name.
    fn parent(&self, rel: &str) -> Result<(OwnedFd, CString), i32> {
        let (dir, name) = match rel.rsplit_once('/') {
            Some((d, n)) => (d, n),
            None => ("", rel),
        };
        let fd = open2(self.fd(), dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
        Ok((fd, cs(name)))
    }

    fn open(&self, rel: &str, flags: i32) -> Result<OwnedFd, i32> {
        open2(self.fd(), rel, flags, 0o644)
    }

    fn read(&self, rel: &str) -> Result<Vec<u8>, i32> {
        let fd = self.open(rel, libc::O_RDONLY)?;
        let mut v = Vec::new();
        File::from(fd)
            .read_to_end(&mut v)
            .map_err(|e| e.raw_os_error().unwrap())?;
        Ok(v)
    }

    fn write_at(&self, rel: &str, data: &[u8], off: u64) -> Result<(), i32> {
        use std::os::unix::fs::FileExt;
        let fd = self.open(rel, libc::O_WRONLY)?;
        File::from(fd)
            .write_all_at(data, off)
            .map_err(|e| e.raw_os_error().unwrap())
    }

    fn lstat(&self, rel: &str) -> Result<libc::stat, i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: zeroed stat is valid; fstatat fills it.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: valid fd, NUL-terminated name, writable stat.
        rc(unsafe {
            libc::fstatat(
                d.as_raw_fd(),
                n.as_ptr(),
                &mut st,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })?;
        Ok(st)
    }

    fn readlink(&self, rel: &str) -> Result<Vec<u8>, i32> {
        let (d, n) = self.parent(rel)?;
        let mut buf = vec![0u8; 4096];
        // SAFETY: valid fd, name and buffer.
        let r = unsafe {
            libc::readlinkat(
                d.as_raw_fd(),
                n.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if r < 0 {
            return Err(last_errno());
        }
        buf.truncate(r as usize);
        Ok(buf)
    }

    fn chmod(&self, rel: &str, mode: u32) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: valid fd and name. (fchmodat never follows a symlink for the last name
        // only with AT_SYMLINK_NOFOLLOW, which Linux refuses: targets here are no symlinks.)
        rc(unsafe { libc::fchmodat(d.as_raw_fd(), n.as_ptr(), mode, 0) })
    }

    fn lchown(&self, rel: &str, uid: u32, gid: u32) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: valid fd and name.
        rc(unsafe {
            libc::fchownat(
                d.as_raw_fd(),
                n.as_ptr(),
                uid,
                gid,
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    fn lutimes(&self, rel: &str, sec: i64) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        let ts = [libc::timespec {
            tv_sec: sec,
            tv_nsec: 0,
        }; 2];
        // SAFETY: valid fd, name and two timespecs.
        rc(unsafe {
            libc::utimensat(
                d.as_raw_fd(),
                n.as_ptr(),
                ts.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        })
    }

    fn truncate(&self, rel: &str, len: i64) -> Result<(), i32> {
        let fd = self.open(rel, libc::O_WRONLY)?;
        // SAFETY: valid fd.
        rc(unsafe { libc::ftruncate(fd.as_raw_fd(), len) })
    }

    /// setxattr on the object itself (the file opened without following, or an O_PATH fd
    /// of a symlink through /proc is not possible: symlinks get lsetxattr via the parent).
    fn lsetxattr(&self, rel: &str, name: &str, value: &[u8]) -> Result<(), i32> {
        // lsetxattr needs a path; the parent is resolved without links, the last name is
        // not followed by lsetxattr.
        let (d, n) = self.parent(rel)?;
        let p = cs(format!(
            "/proc/self/fd/{}/{}",
            d.as_raw_fd(),
            n.to_string_lossy()
        ));
        let cn = cs(name);
        // SAFETY: valid strings and buffer.
        rc(unsafe {
            libc::lsetxattr(
                p.as_ptr(),
                cn.as_ptr(),
                value.as_ptr().cast(),
                value.len(),
                0,
            )
        })
    }

    fn rename(&self, from: &str, to: &str) -> Result<(), i32> {
        let (a, an) = self.parent(from)?;
        let (b, bn) = self.parent(to)?;
        // SAFETY: valid fds and names.
        rc(unsafe { libc::renameat(a.as_raw_fd(), an.as_ptr(), b.as_raw_fd(), bn.as_ptr()) })
    }

    fn unlink(&self, rel: &str) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: valid fd and name.
        rc(unsafe { libc::unlinkat(d.as_raw_fd(), n.as_ptr(), 0) })
    }

    fn rmdir(&self, rel: &str) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: valid fd and name.
        rc(unsafe { libc::unlinkat(d.as_raw_fd(), n.as_ptr(), libc::AT_REMOVEDIR) })
    }

    fn mkdir(&self, rel: &str) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        // SAFETY: valid fd and name.
        rc(unsafe { libc::mkdirat(d.as_raw_fd(), n.as_ptr(), 0o755) })
    }

    fn link(&self, from: &str, to: &str) -> Result<(), i32> {
        let (a, an) = self.parent(from)?;
        let (b, bn) = self.parent(to)?;
        // SAFETY: valid fds and names; no AT_SYMLINK_FOLLOW: a symlink is linked itself.
        rc(unsafe { libc::linkat(a.as_raw_fd(), an.as_ptr(), b.as_raw_fd(), bn.as_ptr(), 0) })
    }

    fn symlink(&self, target: &str, rel: &str) -> Result<(), i32> {
        let (d, n) = self.parent(rel)?;
        let t = cs(target);
        // SAFETY: valid strings and fd.
        rc(unsafe { libc::symlinkat(t.as_ptr(), d.as_raw_fd(), n.as_ptr()) })
    }

    fn names(&self, rel: &str) -> Result<Vec<String>, i32> {
        let fd = self.open(rel, libc::O_RDONLY | libc::O_DIRECTORY)?;
        Ok(fd_names(fd))
    }
}

/// Names in an open directory, `.` and `..` included.
fn fd_names(fd: OwnedFd) -> Vec<String> {
    let raw = std::os::fd::IntoRawFd::into_raw_fd(fd);
    // SAFETY: fdopendir takes ownership of a valid directory fd; closedir releases it.
    unsafe {
        let d = libc::fdopendir(raw);
        assert!(!d.is_null(), "fdopendir: {}", last_errno());
        let mut v = Vec::new();
        while let Some((name, _, _)) = next_entry(d) {
            v.push(name);
        }
        libc::closedir(d);
        v.sort();
        v
    }
}

/// A directory's names read without touching its atime.
fn names_noatime(p: &Path) -> Vec<String> {
    let f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOATIME | libc::O_NOFOLLOW)
        .open(p)
        .unwrap_or_else(|e| panic!("open {}: {e}", p.display()));
    fd_names(f.into())
}

/// All xattrs (every namespace) of `p`, not following a symlink.
fn all_xattrs(p: &Path) -> Vec<(String, Vec<u8>)> {
    list_xattrs(p)
        .into_iter()
        .map(|n| {
            let v = get_xattr(p, &n).unwrap_or_default();
            (n, v)
        })
        .collect()
}

/// Everything observable about a tree, read without changing any atime.
fn snapshot(root: &Path) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    fn go(root: &Path, p: &Path, out: &mut BTreeMap<String, String>) {
        // readlink moves a symlink's atime: read the target before the times.
        let target = fs::read_link(p).ok();
        let m = fs::symlink_metadata(p).unwrap();
        let ft = m.file_type();
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let mut s = format!(
            "mode={:o} uid={} gid={} size={} nlink={} ino={} rdev={} a={}.{} m={}.{} c={}.{} x={:?}",
            m.mode(),
            m.uid(),
            m.gid(),
            m.size(),
            m.nlink(),
            m.ino(),
            m.rdev(),
            m.atime(),
            m.atime_nsec(),
            m.mtime(),
            m.mtime_nsec(),
            m.ctime(),
            m.ctime_nsec(),
            all_xattrs(p)
        );
        if ft.is_file() {
            let mut v = Vec::new();
            fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOATIME)
                .open(p)
                .unwrap()
                .read_to_end(&mut v)
                .unwrap();
            s += &format!(" data={:?}", String::from_utf8_lossy(&v));
        } else if ft.is_symlink() {
            s += &format!(" -> {target:?}");
        } else if ft.is_dir() {
            let names = names_noatime(p);
            s += &format!(" names={names:?}");
            for n in names {
                if n != "." && n != ".." {
                    go(root, &p.join(n), out);
                }
            }
        }
        out.insert(rel, s);
    }
    go(root, root, &mut out);
    out
}

fn assert_same(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>, what: &str) {
    for (k, v) in a {
        assert_eq!(Some(v), b.get(k), "{what}: {k:?} changed");
    }
    assert_eq!(
        a.keys().collect::<Vec<_>>(),
        b.keys().collect::<Vec<_>>(),
        "{what}: names changed"
    );
}

/// The host root's owner and mode: a daemon following `root -> /` would change them.
fn host_root() -> (u32, u32, u32) {
    let m = fs::symlink_metadata("/").unwrap();
    (m.uid(), m.gid(), m.mode())
}

// ---------------------------------------------------------------------------------------
// The daemon, in the foreground as our child, its stderr kept
// ---------------------------------------------------------------------------------------

// ---------------------------------------------------------------------------------------
// The test
// ---------------------------------------------------------------------------------------

const SENT_F: &[u8] = b"SENTINEL f: must never change\n";

fn build_sentinel(s: &Path) {
    let b = LayerBuilder {
        root: s.to_path_buf(),
    };
    b.file_bytes("f", SENT_F)
        .file("x", "SENTINEL x\n")
        .file("hard", "SENTINEL hard\n")
        .file("q/f", "SENTINEL q/f\n")
        .file("sub/g", "SENTINEL sub/g\n")
        .symlink("link", "f")
        .xattr("f", "user.sentinel", b"1")
        .xattr("f", "trusted.sentinel", b"2")
        .xattr("q", "user.sentinel", b"3");
    for rel in ["f", "x", "hard", "q/f", "sub/g", "q", "sub", "link", ""] {
        // Old times (atime == mtime), so any read would move atime even under relatime.
        b.times(rel, 1_000_000_000, 1_000_000_000);
    }
}

fn is_leak(data: &[u8]) -> bool {
    data.windows(8).any(|w| w == b"SENTINEL")
}

#[test]
fn hostile_layers_cannot_reach_outside() {
    let l = Layers::new(2);
    let sent = l.mkdir("sentinel");
    build_sentinel(&sent);
    let sent_s = sent.to_string_lossy().into_owned();
    let top = l.lower(0);
    let bottom = l.lower(1);
    top.symlink("root", "/")
        .symlink("up", "..")
        .symlink("up3", "../../..")
        .symlink("abs", &sent_s)
        .symlink("rel", "../sentinel")
        .symlink("d", &sent_s)
        .symlink("dir/link", "../../sentinel/f")
        .file("dir/sub/file", "lower dir/sub/file\n")
        .fifo("fifo")
        .file("sw/f", "lower sw/f\n")
        .file("p/q/f", "lower p/q/f\n")
        .file("w/x", "lower w/x\n")
        .file("w/y", "lower w/y\n")
        .file("lw/lwfile", "lower lw\n");
    fs::hard_link(sent.join("hard"), top.path("hl")).unwrap();
    fs::hard_link(sent.join("hard"), top.path("hl2")).unwrap();
    mknod(
        &top.path("chr"),
        libc::S_IFCHR | 0o644,
        libc::makedev(240, 7),
    );
    mknod(
        &top.path("blk"),
        libc::S_IFBLK | 0o644,
        libc::makedev(241, 9),
    );
    bottom.file("dir/x", "bottom dir/x\n").file("m2/a", "a\n");

    let base = l.mkdir("m");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    let upper = base.join("upper");
    let up = LayerBuilder {
        root: upper.clone(),
    };
    up.symlink("uplink", &sent_s)
        .symlink("updir", &sent_s)
        .symlink("uprel", "../../sentinel");

    let root_names = names_noatime(l.root());
    let before = snapshot(&sent);
    let host_before = host_root();

    let mut d = ForegroundDaemon::start(&l, &base, &[]);
    let m = std::sync::Arc::new(M::new(&d.merged));

    macro_rules! op {
        ($what:expr, |$mm:ident| $body:expr) => {{
            let $mm = m.clone();
            bounded($what, move || $body)
        }};
    }

    // --- Static hostile entries -------------------------------------------------------
    for (name, target) in [
        ("root", "/".to_string()),
        ("up", "..".into()),
        ("up3", "../../..".into()),
        ("abs", sent_s.clone()),
        ("rel", "../sentinel".into()),
        ("d", sent_s.clone()),
        ("dir/link", "../../sentinel/f".into()),
        ("uplink", sent_s.clone()),
        ("uprel", "../../sentinel".into()),
    ] {
        let got = op!("readlink", |m| m.readlink(name));
        assert_eq!(got, Ok(target.into_bytes()), "readlink {name}");
    }
    // The test's own resolution refuses links: the daemon is never asked to follow one.
    assert_eq!(
        op!("open d/f", |m| m.open("d/f", libc::O_WRONLY).map(drop)),
        Err(libc::ELOOP)
    );

    // FIFO: stat, a non-blocking open for reading, and a copy-up by chmod that must not
    // open it.
    let st = op!("stat fifo", |m| m.lstat("fifo")).unwrap();
    assert_eq!(st.st_mode & libc::S_IFMT, libc::S_IFIFO);
    op!("open fifo", |m| m
        .open("fifo", libc::O_RDONLY | libc::O_NONBLOCK)
        .map(drop))
    .expect("open the fifo O_NONBLOCK");
    op!("chmod fifo", |m| m.chmod("fifo", 0o600)).expect("chmod fifo");
    let u = fs::symlink_metadata(upper.join("fifo")).expect("fifo copied up");
    assert!(u.file_type().is_fifo() && u.mode() & 0o7777 == 0o600);

    // Device nodes: chmod/chown copy them up as devices (opening one would fail: no driver).
    op!("chmod chr", |m| m.chmod("chr", 0o600)).expect("chmod chr");
    op!("chown chr", |m| m.lchown("chr", 5, 6)).expect("chown chr");
    op!("chmod blk", |m| m.chmod("blk", 0o640)).expect("chmod blk");
    let c = fs::symlink_metadata(upper.join("chr")).expect("chr copied up");
    assert!(c.file_type().is_char_device());
    assert_eq!(
        (c.rdev(), c.mode() & 0o7777, c.uid(), c.gid()),
        (libc::makedev(240, 7), 0o600, 5, 6)
    );
    let b = fs::symlink_metadata(upper.join("blk")).expect("blk copied up");
    assert!(b.file_type().is_block_device());
    assert_eq!(
        (b.rdev(), b.mode() & 0o7777),
        (libc::makedev(241, 9), 0o640)
    );

    // Symlinks changed themselves: lchown, utimes, xattr, rename, link, unlink.
    op!("lchown root", |m| m.lchown("root", 1, 1)).expect("lchown root");
    let r = fs::symlink_metadata(upper.join("root")).expect("root copied up");
    assert!(r.file_type().is_symlink() && (r.uid(), r.gid()) == (1, 1));
    assert_eq!(fs::read_link(upper.join("root")).unwrap(), Path::new("/"));
    op!("utimes abs", |m| m.lutimes("abs", 1_234_567_890)).expect("utimes abs");
    assert_eq!(
        fs::symlink_metadata(upper.join("abs")).unwrap().mtime(),
        1_234_567_890
    );
    let _ = op!("setxattr d", |m| m.lsetxattr("d", "trusted.hostile", b"1"));
    let _ = op!("setxattr uplink", |m| m.lsetxattr(
        "uplink",
        "trusted.hostile",
        b"1"
    ));
    let _ = op!("chown updir", |m| m.lchown("updir", 3, 3));
    op!("rename up3", |m| m.rename("up3", "up3.moved")).expect("rename up3");
    op!("rename rel", |m| m.rename("rel", "dir/rel2")).expect("rename rel");
    assert_eq!(
        op!("readlink", |m| m.readlink("dir/rel2")),
        Ok(b"../sentinel".to_vec())
    );
    if op!("link", |m| m.link("dir/rel2", "rel.link")).is_ok() {
        assert_eq!(
            op!("readlink", |m| m.readlink("rel.link")),
            Ok(b"../sentinel".to_vec())
        );
    }
    op!("rename uprel", |m| m.rename("uprel", "dir/uprel")).expect("rename uprel");
    op!("unlink d", |m| m.unlink("d")).expect("unlink d");
    op!("unlink up", |m| m.unlink("up")).expect("unlink up");
    op!("unlink updir", |m| m.unlink("updir")).expect("unlink updir");
    op!("symlink", |m| m.symlink("/", "newroot")).expect("symlink");
    op!("symlink", |m| m.symlink("../../sentinel/f", "dir/newrel")).expect("symlink");

    // Hard links to an outside file: written, chmod'ed, chown'ed, truncated, xattr'ed through
    // the mount, each a copy-up that breaks the link.
    op!("write hl", |m| m.write_at("hl", b"HACK", 0)).expect("write hl");
    assert_eq!(
        op!("read hl", |m| m.read("hl")).unwrap(),
        b"HACKINEL hard\n".to_vec()
    );
    op!("chmod hl", |m| m.chmod("hl", 0o600)).expect("chmod hl");
    op!("chown hl", |m| m.lchown("hl", 7, 7)).expect("chown hl");
    op!("truncate hl2", |m| m.truncate("hl2", 3)).expect("truncate hl2");
    op!("link hl2", |m| m.link("hl2", "hl3")).expect("link hl2");
    op!("setxattr hl3", |m| m.lsetxattr("hl3", "user.x", b"1")).expect("setxattr hl3");
    let sent_hard = fs::metadata(sent.join("hard")).unwrap().ino();
    for n in ["hl", "hl2", "hl3"] {
        assert_ne!(
            fs::metadata(upper.join(n)).unwrap().ino(),
            sent_hard,
            "upper/{n} is the sentinel"
        );
    }

    // Directories holding hostile links: xattr, truncate, write, rename, unlink, rmdir,
    // mkdir (an opaque one where a merged directory was).
    op!("setxattr dir/sub", |m| m
        .lsetxattr("dir/sub", "user.x", b"1"))
    .expect("setxattr");
    op!("truncate", |m| m.truncate("dir/sub/file", 4)).expect("truncate");
    op!("write", |m| m.write_at("dir/sub/file", b"ZZ", 2)).expect("write");
    op!("rename file", |m| m.rename("dir/sub/file", "dir/file2")).expect("rename");
    assert_eq!(op!("read", |m| m.read("dir/file2")), Ok(b"loZZ".to_vec()));
    op!("unlink dir/link", |m| m.unlink("dir/link")).expect("unlink dir/link");
    op!("rmdir dir/sub", |m| m.rmdir("dir/sub")).expect("rmdir dir/sub");
    assert_eq!(op!("rmdir dir", |m| m.rmdir("dir")), Err(libc::ENOTEMPTY));
    for n in ["dir/x", "dir/file2", "dir/rel2", "dir/uprel", "dir/newrel"] {
        op!("unlink", |m| m.unlink(n)).unwrap_or_else(|e| panic!("unlink {n}: {e}"));
    }
    op!("rmdir dir", |m| m.rmdir("dir")).expect("rmdir dir");
    op!("mkdir dir", |m| m.mkdir("dir")).expect("mkdir dir");
    assert_eq!(
        op!("ls dir", |m| m.names("dir")),
        Ok(vec![".".to_string(), "..".into()])
    );
    op!("mkdir new", |m| m.mkdir("newdir")).expect("mkdir newdir");

    // `.` and `..` through the mount.
    let ino = |m: &M, rel: &str| -> u64 {
        let fd = m.open(rel, libc::O_PATH | libc::O_DIRECTORY).unwrap();
        fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    };
    let root_ino = fs::metadata(&d.merged).unwrap().ino();
    let pq = fs::metadata(d.merged.join("p/q")).unwrap().ino();
    assert_eq!(fs::metadata(d.merged.join("p/q/.")).unwrap().ino(), pq);
    assert_eq!(
        fs::metadata(d.merged.join("p/q/../..")).unwrap().ino(),
        root_ino
    );
    assert_eq!(ino(&m, "m2/.."), root_ino);
    assert_eq!(ino(&m, "p/q/."), pq);
    let names = op!("ls m2", |m| m.names("m2")).unwrap();
    assert_eq!(names, vec![".", "..", "a"]);

    // --- Symlinks swapped in under the live mount --------------------------------------
    // (a) A lower directory on the path of a file being copied up becomes a symlink to the
    // sentinel.
    assert_eq!(
        op!("read sw/f", |m| m.read("sw/f")),
        Ok(b"lower sw/f\n".to_vec())
    );
    let _ = op!("stat", |m| m.lstat("p/q/f"));
    let _ = op!("stat", |m| m.lstat("w/x"));
    let _ = op!("stat", |m| m.lstat("w/y"));
    let _ = op!("stat", |m| m.lstat("lw/lwfile"));
    fs::rename(top.path("sw"), top.path("sw.orig")).unwrap();
    std::os::unix::fs::symlink(&sent, top.path("sw")).unwrap();
    if let Ok(v) = op!("read sw/f", |m| m.read("sw/f")) {
        assert!(!is_leak(&v), "read through a swapped lower symlink: {v:?}");
    }
    let _ = op!("write sw/f", |m| m.write_at("sw/f", b"PWNED", 0));
    let _ = op!("chmod sw/f", |m| m.chmod("sw/f", 0o777));
    let _ = op!("truncate sw/f", |m| m.truncate("sw/f", 1));
    let _ = op!("setxattr sw/f", |m| m.lsetxattr("sw/f", "user.pwn", b"1"));
    let _ = op!("unlink sw/f", |m| m.unlink("sw/f"));
    if let Ok(v) = fs::read(upper.join("sw/f")) {
        assert!(!is_leak(&v), "the sentinel was copied up: {v:?}");
    }
    if let Ok(md) = fs::symlink_metadata(upper.join("sw")) {
        assert!(md.is_dir(), "upper/sw is not a directory");
    }

    // (b) A symlink in the upper where a copy-up will create the parent.
    std::os::unix::fs::symlink(&sent, upper.join("p")).unwrap();
    let _ = op!("write p/q/f", |m| m.write_at("p/q/f", b"PWNED", 0));
    let _ = op!("chmod p/q/f", |m| m.chmod("p/q/f", 0o777));
    let _ = op!("setxattr p/q/f", |m| m.lsetxattr("p/q/f", "user.pwn", b"1"));
    let _ = op!("rename p/q/f", |m| m.rename("p/q/f", "p/q/g"));
    let _ = op!("mkdir p/q/n", |m| m.mkdir("p/q/n"));

    // (c) A symlink in the upper where an unlink will put a whiteout, a rename its new name,
    // a create its file.
    std::os::unix::fs::symlink(&sent, upper.join("w")).unwrap();
    let _ = op!("unlink w/x", |m| m.unlink("w/x"));
    let _ = op!("rename w/y", |m| m.rename("w/y", "w/q"));
    let _ = op!("mkdir w/sub", |m| m.mkdir("w/sub"));
    let _ = op!("create w/new", |m| m
        .open("w/new", libc::O_CREAT | libc::O_WRONLY)
        .map(drop));
    let _ = op!("symlink w/l", |m| m.symlink("/", "w/l"));

    // (d) An upper directory, open in the mount, replaced by a symlink to the sentinel.
    op!("mkdir u", |m| m.mkdir("u")).expect("mkdir u");
    op!("create u/e", |m| m
        .open("u/e", libc::O_CREAT | libc::O_WRONLY)
        .map(drop))
    .expect("create u/e");
    let ufd = op!("open u", |m| m
        .open("u", libc::O_RDONLY | libc::O_DIRECTORY)
        .unwrap());
    fs::rename(upper.join("u"), upper.join("u.orig")).unwrap();
    std::os::unix::fs::symlink(&sent, upper.join("u")).unwrap();
    let ufd = std::sync::Arc::new(ufd);
    for (what, f) in [
        ("create", "creat"),
        ("mkdir", "mkdir"),
        ("unlink", "unlink"),
        ("rename", "rename"),
        ("symlink", "symlink"),
        ("link", "link"),
        ("list", "list"),
    ] {
        let u = ufd.clone();
        let _ = bounded(what, move || {
            let fd = u.as_raw_fd();
            // SAFETY: valid fd and NUL-terminated names.
            unsafe {
                match f {
                    "creat" => {
                        let r = libc::openat(
                            fd,
                            c"x".as_ptr(),
                            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
                            0o644,
                        );
                        if r >= 0 {
                            libc::close(r);
                        }
                        r
                    }
                    "mkdir" => libc::mkdirat(fd, c"q".as_ptr(), 0o755),
                    "unlink" => libc::unlinkat(fd, c"e".as_ptr(), 0),
                    "rename" => libc::renameat(fd, c"link".as_ptr(), fd, c"y".as_ptr()),
                    "symlink" => libc::symlinkat(c"/".as_ptr(), fd, c"f".as_ptr()),
                    "link" => libc::linkat(fd, c"e".as_ptr(), fd, c"hard".as_ptr(), 0),
                    _ => {
                        let dup = libc::dup(fd);
                        let names = fd_names(OwnedFd::from_raw_fd(dup));
                        assert!(
                            !names.iter().any(|n| n == "hard" || n == "sub"),
                            "listing of an upper dir swapped for a symlink shows the sentinel: {names:?}"
                        );
                        0
                    }
                }
            }
        });
    }
    drop(ufd);
    // A lower directory, listed through the mount after it became a symlink to the sentinel.
    fs::rename(top.path("lw"), top.path("lw.orig")).unwrap();
    std::os::unix::fs::symlink(&sent, top.path("lw")).unwrap();
    if let Ok(names) = op!("ls lw", |m| m.names("lw")) {
        assert!(
            !names.iter().any(|n| n == "hard" || n == "sub"),
            "listing of a lower dir swapped for a symlink shows the sentinel: {names:?}"
        );
    }
    if let Ok(v) = op!("read lw/lwfile", |m| m.read("lw/lwfile")) {
        assert!(!is_leak(&v));
    }

    // --- Still serving, never panicked ------------------------------------------------
    let merged = d.merged.clone();
    let st = bounded("stat the root", move || {
        fs::metadata(&merged).map(|m| m.is_dir())
    });
    assert!(matches!(st, Ok(true)), "stat of the root: {st:?}");
    assert!(d.alive(), "the daemon exited: {}", d.log());
    drop(m);
    d.unmount()
        .unwrap_or_else(|e| panic!("unmount after the hostile operations: {e}"));
    let log = d.log();
    assert!(!log.contains("panicked"), "the daemon panicked: {log}");

    let after = snapshot(&sent);
    assert_same(&before, &after, "sentinel");
    assert_eq!(host_root(), host_before, "the host root changed");
    let mut root_after = names_noatime(l.root());
    root_after.retain(|n| n != "daemon.log");
    let mut root_before = root_names;
    root_before.retain(|n| n != "daemon.log");
    assert_eq!(
        root_before, root_after,
        "entries appeared beside the layers"
    );
    assert!(!is_mounted(&base.join("merged")));
}

/// The work directory's stale entries (a killed mount's leftovers) are deleted at mount
/// without following links out of it; a `work/work` that is a symlink is refused.
#[test]
fn stale_work_entries_are_removed_without_following_links() {
    let l = Layers::new(1);
    let sent = l.mkdir("sentinel");
    build_sentinel(&sent);
    let sent_s = sent.to_string_lossy().into_owned();
    l.lower(0).file("f", "lower\n");
    let base = l.mkdir("m");
    for d in ["upper", "work/work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    let w = LayerBuilder {
        root: base.join("work/work"),
    };
    w.symlink("#um1.0", &sent_s)
        .symlink("#um1.1", "../../../sentinel")
        .symlink("#um1.2", &format!("{sent_s}/f"))
        .symlink("stale/inner", &sent_s)
        .symlink("stale/deeper/rel", "../../../../../sentinel")
        .file("stale/deeper/file", "stale\n");
    fs::hard_link(sent.join("hard"), base.join("work/work/stale/hard")).unwrap();
    let before = snapshot(&sent);

    let mut d = ForegroundDaemon::start(&l, &base, &[]);
    let left = names_noatime(&base.join("work/work"));
    assert_eq!(left, vec![".", ".."], "stale work entries not cleaned");
    assert_eq!(fs::read(d.merged.join("f")).unwrap(), b"lower\n");
    d.unmount().unwrap_or_else(|e| panic!("unmount: {e}"));
    // The hard link's removal is the one change the sentinel may see: its link count and
    // ctime. Everything else is identical.
    let mut after = snapshot(&sent);
    let mut before = before;
    for s in [&mut before, &mut after] {
        let v = s.get_mut("hard").unwrap();
        *v = v
            .split(' ')
            .filter(|f| !f.starts_with("nlink=") && !f.starts_with("c="))
            .collect::<Vec<_>>()
            .join(" ");
    }
    assert_same(
        &before,
        &after,
        "sentinel after cleaning stale work entries",
    );

    // work/work itself a symlink to the sentinel: refused, nothing touched.
    let base = l.mkdir("m2");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    std::os::unix::fs::symlink(&sent, base.join("work/work")).unwrap();
    let before = snapshot(&sent);
    let out = run_unionmount(&native_args(
        &l.lower_paths(),
        Some(&base.join("upper")),
        Some(&base.join("work")),
        &base.join("merged"),
    ));
    if out.status.success() {
        // Should it ever be accepted, it must not have cleaned the sentinel.
        let _ = Command::new("fusermount3")
            .arg("-u")
            .arg(base.join("merged"))
            .status();
        wait_until(Duration::from_secs(10), || {
            !is_mounted(&base.join("merged"))
        });
    }
    assert_same(
        &before,
        &snapshot(&sent),
        "sentinel behind a work/work symlink",
    );
    assert!(
        !out.status.success(),
        "a work/work symlink was accepted as the work directory"
    );
}

/// Files replaced under the live mount, after the kernel looked them up, by a device node or
/// a fifo are never opened by the daemon for their data: a device is not read through the
/// view (the mount is `nodev`: the view shows the device node, which may not be opened),
/// and a fifo does not block a request thread in its open.
#[test]
fn files_replaced_by_devices_or_fifos_are_not_opened() {
    let l = Layers::new(1);
    l.lower(0)
        .file("dev", "lower data")
        .file("fifo", "lower data")
        .file("up", "x");
    let m = l.mount_with("m", &["-o", "nodev"]);
    fs::write(m.path("up"), "upper data").unwrap();
    for name in ["dev", "fifo", "up"] {
        fs::metadata(m.path(name)).unwrap();
    }
    // /dev/zero's numbers in place of a lower file and of an upper one.
    for p in [l.lower(0).path("dev"), m.upper_path("up")] {
        fs::remove_file(&p).unwrap();
        mknod(&p, libc::S_IFCHR | 0o666, libc::makedev(1, 5));
    }
    for name in ["dev", "up"] {
        let p = m.path(name);
        let got = bounded(name, move || {
            let mut buf = [7u8; 16];
            let n = File::open(&p).and_then(|mut f| f.read(&mut buf));
            n.map(|n| buf[..n].to_vec()).map_err(|e| e.raw_os_error())
        });
        assert_eq!(
            got,
            Err(Some(libc::EACCES)),
            "{name}: read through the view"
        );
    }
    // A fifo in place of `on_disk`; the view's `name` opened O_NONBLOCK, for writing or not.
    let swap_and_open = |on_disk: std::path::PathBuf, name: &str, write: bool| {
        fs::remove_file(&on_disk).unwrap();
        assert!(
            Command::new("mkfifo")
                .arg(&on_disk)
                .status()
                .unwrap()
                .success()
        );
        let p = m.path(name);
        bounded(name, move || {
            let f = fs::OpenOptions::new()
                .read(!write)
                .write(write)
                .custom_flags(libc::O_NONBLOCK)
                .open(&p);
            f.and_then(|f| f.metadata())
                .map(|md| md.file_type().is_fifo())
                .map_err(|e| e.raw_os_error())
        })
    };
    let kind = swap_and_open(l.lower(0).path("fifo"), "fifo", false);
    assert_eq!(kind, Ok(true), "the view shows the fifo");
    // Opened for writing, with no reader: the daemon's open fails (ENXIO), and the view
    // shows the fifo all the same, whose open answers as a fifo's does.
    fs::write(m.path("wfifo"), "upper").unwrap();
    let opened = swap_and_open(m.upper_path("wfifo"), "wfifo", true);
    assert_eq!(opened, Err(Some(libc::ENXIO)), "write-open of the fifo");
    assert!(fs::metadata(m.path("wfifo")).unwrap().file_type().is_fifo());
}

/// An open through the view waits for the break of a lease another process holds on the
/// layer file, as an open does (and as kernel overlayfs's does): the daemon's first,
/// non-blocking open does not wait, and must not answer EAGAIN for it.
#[test]
fn opens_wait_for_the_break_of_a_lease_on_the_layer_file() {
    use std::io::BufRead;
    let l = Layers::new(1);
    l.lower(0).file("lo", "lower");
    let m = l.mount("m");
    fs::write(m.path("up"), "upper").unwrap();
    // Takes a write lease and gives it up when asked to (SIGIO).
    let holder = r#"
import fcntl, os, signal, sys, time
fd = os.open(sys.argv[1], os.O_RDWR)
signal.signal(signal.SIGIO, lambda s, f: fcntl.fcntl(fd, 1024, fcntl.F_UNLCK))
fcntl.fcntl(fd, 1024, fcntl.F_WRLCK)
print("held", flush=True)
time.sleep(30)
"#;
    for (name, on_disk, content) in [
        ("up", m.upper_path("up"), "upper"),
        ("lo", l.lower(0).path("lo"), "lower"),
    ] {
        // Ended when dropped, also when an assertion fails first.
        struct Holder(std::process::Child);
        impl Drop for Holder {
            fn drop(&mut self) {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
        let mut h = Holder(
            Command::new("python3")
                .args(["-c", holder])
                .arg(&on_disk)
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap(),
        );
        let mut line = String::new();
        std::io::BufReader::new(h.0.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), "held", "{name}: the lease was not taken");
        let p = m.path(name);
        let got = bounded(name, move || {
            fs::read_to_string(p).map_err(|e| e.raw_os_error())
        });
        drop(h);
        assert_eq!(got.as_deref(), Ok(content), "{name}: read through the view");
    }
}
