//! Shared fixture for the integration tests: temporary layers, a real mount of unionmount or
//! of kernel overlayfs over them, and an unmount that always happens (in `Drop`, so also
//! when an assertion fails). A mount that cannot be removed leaks its temporary directory
//! rather than deleting through it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_unionmount");

/// Builds one layer directory.
pub struct LayerBuilder {
    pub root: PathBuf,
}

fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

impl LayerBuilder {
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    fn parent_of(&self, rel: &str) {
        if let Some(p) = self.path(rel).parent() {
            fs::create_dir_all(p).unwrap();
        }
    }

    pub fn file(&self, rel: &str, content: &str) -> &Self {
        self.parent_of(rel);
        fs::write(self.path(rel), content).unwrap();
        self
    }

    pub fn file_bytes(&self, rel: &str, content: &[u8]) -> &Self {
        self.parent_of(rel);
        fs::write(self.path(rel), content).unwrap();
        self
    }

    pub fn dir(&self, rel: &str) -> &Self {
        fs::create_dir_all(self.path(rel)).unwrap();
        self
    }

    pub fn symlink(&self, rel: &str, target: &str) -> &Self {
        self.parent_of(rel);
        std::os::unix::fs::symlink(target, self.path(rel)).unwrap();
        self
    }

    pub fn hardlink(&self, existing: &str, rel: &str) -> &Self {
        self.parent_of(rel);
        fs::hard_link(self.path(existing), self.path(rel)).unwrap();
        self
    }

    pub fn fifo(&self, rel: &str) -> &Self {
        self.parent_of(rel);
        mknod(&self.path(rel), libc::S_IFIFO | 0o644, 0);
        self
    }

    /// A whiteout as a character device 0/0.
    pub fn whiteout(&self, rel: &str) -> &Self {
        self.parent_of(rel);
        mknod(&self.path(rel), libc::S_IFCHR, 0);
        self
    }

    /// A whiteout in the AUFS/OCI form `.wh.NAME`.
    pub fn aufs_whiteout(&self, rel: &str) -> &Self {
        let p = self.path(rel);
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        let wh = p.with_file_name(format!(".wh.{name}"));
        fs::create_dir_all(wh.parent().unwrap()).unwrap();
        fs::write(wh, "").unwrap();
        self
    }

    /// An opaque directory marked with the given xattr (e.g. "trusted.overlay.opaque").
    pub fn opaque_xattr(&self, rel: &str, xattr: &str) -> &Self {
        self.dir(rel);
        set_xattr(&self.path(rel), xattr, b"y");
        self
    }

    /// An opaque directory marked with a `.wh..wh..opq` entry.
    pub fn opaque_marker(&self, rel: &str) -> &Self {
        self.dir(rel);
        fs::write(self.path(rel).join(".wh..wh..opq"), "").unwrap();
        self
    }

    pub fn xattr(&self, rel: &str, name: &str, value: &[u8]) -> &Self {
        set_xattr(&self.path(rel), name, value);
        self
    }

    pub fn chmod(&self, rel: &str, mode: u32) -> &Self {
        fs::set_permissions(self.path(rel), fs::Permissions::from_mode(mode)).unwrap();
        self
    }

    pub fn chown(&self, rel: &str, uid: u32, gid: u32) -> &Self {
        let c = cpath(&self.path(rel));
        // SAFETY: plain syscall on a NUL-terminated path.
        assert_eq!(unsafe { libc::lchown(c.as_ptr(), uid, gid) }, 0);
        self
    }

    /// Sets atime and mtime (seconds).
    pub fn times(&self, rel: &str, atime: i64, mtime: i64) -> &Self {
        set_times(&self.path(rel), atime, mtime);
        self
    }
}

/// A `security.capability` value (VFS_CAP_REVISION_2 with the effective flag) permitting the
/// capability numbered `cap`.
pub fn file_capability(cap: u32) -> Vec<u8> {
    [0x0200_0001u32, 1 << cap, 0, 0, 0]
        .iter()
        .flat_map(|w| w.to_le_bytes())
        .collect()
}

/// Makes a filesystem image of `size` bytes at `img` with `mkfs` (the program and its
/// arguments before the image), from the package `package` where it is missing.
pub fn fs_image(img: &Path, size: u64, mkfs: &[&str], package: &str) {
    fs::File::create(img).unwrap().set_len(size).unwrap();
    let out = Command::new(mkfs[0])
        .args(&mkfs[1..])
        .arg(img)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{} (Debian/Ubuntu: apt-get install {package}): {e}",
                mkfs[0]
            )
        });
    assert!(out.status.success(), "{}: {out:?}", mkfs[0]);
}

pub fn mknod(p: &Path, mode: u32, dev: u64) {
    let c = cpath(p);
    // SAFETY: plain syscall on a NUL-terminated path.
    let r = unsafe { libc::mknod(c.as_ptr(), mode, dev) };
    assert_eq!(
        r,
        0,
        "mknod {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

pub fn set_xattr(p: &Path, name: &str, value: &[u8]) {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    // SAFETY: valid NUL-terminated strings and a readable buffer.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        r,
        0,
        "setxattr {name} on {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// The value of an xattr, `Err(errno)` if it cannot be read.
pub fn get_xattr(p: &Path, name: &str) -> Result<Vec<u8>, i32> {
    let c = cpath(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid NUL-terminated strings and a writable buffer.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Err(std::io::Error::last_os_error().raw_os_error().unwrap());
    }
    buf.truncate(r as usize);
    Ok(buf)
}

pub fn list_xattrs(p: &Path) -> Vec<String> {
    let c = cpath(p);
    let mut buf = vec![0u8; 65536];
    // SAFETY: valid NUL-terminated path and a writable buffer.
    let r = unsafe { libc::llistxattr(c.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        return Vec::new();
    }
    buf.truncate(r as usize);
    let mut v: Vec<String> = buf
        .split(|&b| b == 0)
        .filter(|s| !s.is_empty())
        .map(|s| String::from_utf8_lossy(s).into_owned())
        .collect();
    v.sort();
    v
}

pub fn set_times(p: &Path, atime: i64, mtime: i64) {
    let c = cpath(p);
    let ts = [
        libc::timespec {
            tv_sec: atime,
            tv_nsec: 0,
        },
        libc::timespec {
            tv_sec: mtime,
            tv_nsec: 0,
        },
    ];
    // SAFETY: valid path and two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            ts.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    assert_eq!(
        r,
        0,
        "utimensat {}: {}",
        p.display(),
        std::io::Error::last_os_error()
    );
}

/// Timestamp `age` gives to lower objects; anything newer was set while a test ran.
pub const OLD: i64 = 1_500_000_000;

/// Sets atime/mtime of every non-directory under `root` to `OLD`.
pub fn age(root: &Path) {
    for e in fs::read_dir(root).unwrap() {
        let p = e.unwrap().path();
        if fs::symlink_metadata(&p).unwrap().is_dir() {
            age(&p);
        } else {
            set_times(&p, OLD, OLD);
        }
    }
}

/// `age` for every lower layer of `l`.
pub fn age_all(l: &Layers) {
    for lower in &l.lowers {
        age(lower);
    }
}

/// The errno of a failed `std::io` call.
pub fn errno<T: std::fmt::Debug>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(v) => panic!("expected an error, got {v:?}"),
        Err(e) => e.raw_os_error().expect("an OS error"),
    }
}

/// A temporary set of layers: `lowers[0]` is the top-most lower.
pub struct Layers {
    pub tmp: std::mem::ManuallyDrop<tempfile::TempDir>,
    pub lowers: Vec<PathBuf>,
}

impl Drop for Layers {
    fn drop(&mut self) {
        // Never delete through a mount that is still live: keep the files instead.
        let root = self.tmp.path().to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        if mounts
            .lines()
            .any(|l| l.split(' ').nth(1).is_some_and(|m| m.starts_with(&root)))
        {
            eprintln!("LEAK: keeping {root}: a mount under it is still live");
            return;
        }
        // SAFETY: taken once, here, and never used again.
        let tmp = unsafe { std::mem::ManuallyDrop::take(&mut self.tmp) };
        let path = tmp.path().to_path_buf();
        if tmp.close().is_err() {
            // A test that failed with a file or directory immutable or append-only (chattr
            // through the view sets it on the upper) leaves what nobody can delete: the flags
            // go first.
            clear_protection_flags(&path);
            let _ = fs::remove_dir_all(&path);
        }
    }
}

/// Clears FS_IMMUTABLE_FL and FS_APPEND_FL under `p` (not following symlinks).
fn clear_protection_flags(p: &Path) {
    let Ok(md) = fs::symlink_metadata(p) else {
        return;
    };
    if md.is_file() || md.is_dir() {
        let _ = remove_flags(p, FS_IMMUTABLE_FL | FS_APPEND_FL);
    }
    if md.is_dir() {
        for e in fs::read_dir(p).into_iter().flatten().flatten() {
            clear_protection_flags(&e.path());
        }
    }
}

impl Layers {
    pub fn new(n: usize) -> Layers {
        let tmp = tempfile::Builder::new()
            .prefix("um-test-")
            .tempdir_in("/tmp")
            .unwrap();
        let mut lowers = Vec::new();
        for i in 0..n {
            let p = tmp.path().join(format!("lower{i}"));
            fs::create_dir(&p).unwrap();
            lowers.push(p);
        }
        Layers {
            tmp: std::mem::ManuallyDrop::new(tmp),
            lowers,
        }
    }

    pub fn lower(&self, i: usize) -> LayerBuilder {
        LayerBuilder {
            root: self.lowers[i].clone(),
        }
    }

    pub fn root(&self) -> &Path {
        self.tmp.path()
    }

    /// A fresh directory under the temporary root.
    pub fn mkdir(&self, name: &str) -> PathBuf {
        let p = self.tmp.path().join(name);
        fs::create_dir_all(&p).unwrap();
        p
    }

    pub fn lowerdir_opt(&self) -> String {
        layer_list(&self.lower_paths())
    }

    /// The lower layers' paths, top first.
    pub fn lower_paths(&self) -> Vec<&Path> {
        self.lowers.iter().map(PathBuf::as_path).collect()
    }

    /// Mounts unionmount over these lowers with upper `name/upper` and work `name/work`.
    pub fn mount(&self, name: &str) -> Mount {
        self.mount_with(name, &[])
    }

    /// `name/upper`, `name/work` and `name/merged`, made (if missing) for a mount.
    pub fn mount_dirs(&self, name: &str) -> (PathBuf, PathBuf, PathBuf) {
        let base = self.mkdir(name);
        let dirs = (base.join("upper"), base.join("work"), base.join("merged"));
        for d in [&dirs.0, &dirs.1, &dirs.2] {
            fs::create_dir_all(d).unwrap();
        }
        dirs
    }

    pub fn mount_with(&self, name: &str, extra: &[&str]) -> Mount {
        let (upper, work, merged) = self.mount_dirs(name);
        let mut args: Vec<OsString> = vec![
            "--lower".into(),
            self.lowerdir_opt().into(),
            "--upper".into(),
            upper.clone().into(),
            "--work".into(),
            work.clone().into(),
        ];
        args.extend(extra.iter().map(OsString::from));
        args.push(merged.clone().into());
        Mount::union(&args, merged, Some(upper), Some(work))
    }

    /// A read-only unionmount (no upper).
    pub fn mount_ro(&self, name: &str) -> Mount {
        let merged = self.mkdir(&format!("{name}/merged"));
        let args: Vec<OsString> = vec![
            "--lower".into(),
            self.lowerdir_opt().into(),
            merged.clone().into(),
        ];
        Mount::union(&args, merged, None, None)
    }

    /// Mounts kernel overlayfs over these lowers with upper `name/upper` and work `name/work`.
    pub fn mount_kernel(&self, name: &str) -> Mount {
        self.mount_kernel_with(name, &[])
    }

    /// The same with mount options added (e.g. `userxattr`).
    pub fn mount_kernel_with(&self, name: &str, extra: &[&str]) -> Mount {
        let base = self.mkdir(name);
        let upper = base.join("upper");
        let work = base.join("work");
        let merged = base.join("merged");
        for d in [&upper, &work, &merged] {
            fs::create_dir_all(d).unwrap();
        }
        Mount::kernel(&self.lowerdir_opt(), &upper, &work, &merged, extra)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Union,
    Kernel,
}

/// A live mount, unmounted on drop.
pub struct Mount {
    pub merged: PathBuf,
    pub upper: Option<PathBuf>,
    pub work: Option<PathBuf>,
    pub kind: Kind,
    live: bool,
}

pub fn is_mounted(p: &Path) -> bool {
    let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    let want = p.to_string_lossy().replace(' ', "\\040");
    mounts
        .lines()
        .any(|l| l.split(' ').nth(1) == Some(want.as_str()))
}

/// The options `UNIONMOUNT_TEST_ARGS` (space-separated) adds to every mount, e.g.
/// `--passthrough off` to run the suite on the page-cached path. A test that picks the I/O
/// path itself (`--passthrough` in `explicit`) keeps its choice.
pub fn env_args<S: AsRef<OsStr>>(explicit: &[S]) -> Vec<String> {
    let env = std::env::var("UNIONMOUNT_TEST_ARGS").unwrap_or_default();
    let own_path = explicit.iter().any(|a| a.as_ref() == "--passthrough");
    let mut out = Vec::new();
    let mut words = env.split_whitespace();
    while let Some(w) = words.next() {
        if own_path && w == "--passthrough" {
            words.next();
            continue;
        }
        out.push(w.to_string());
    }
    out
}

/// Runs `cmd` and asserts that it succeeded (`what` and its stderr tell otherwise).
pub fn run_ok(cmd: &mut Command, what: &str) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Runs unionmount with `args` (and `env_args`); returns its output (it exits once the mount
/// is live).
pub fn run_unionmount<S: AsRef<OsStr>>(args: &[S]) -> Output {
    Command::new(BIN)
        .args(env_args(args))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run unionmount")
}

impl Mount {
    pub fn union(
        args: &[OsString],
        merged: PathBuf,
        upper: Option<PathBuf>,
        work: Option<PathBuf>,
    ) -> Mount {
        let out = run_unionmount(args);
        let mut m = Mount {
            merged,
            upper,
            work,
            kind: Kind::Union,
            live: true,
        };
        assert!(
            out.status.success(),
            "unionmount {:?} failed: {}",
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            is_mounted(&m.merged),
            "exited 0 but {} is not mounted",
            m.merged.display()
        );
        m.live = true;
        m
    }

    /// Adopts a mount made some other way (it will be unmounted on drop).
    pub fn adopt(
        merged: PathBuf,
        upper: Option<PathBuf>,
        work: Option<PathBuf>,
        kind: Kind,
    ) -> Mount {
        Mount {
            merged,
            upper,
            work,
            kind,
            live: true,
        }
    }

    pub fn kernel(
        lowerdir: &str,
        upper: &Path,
        work: &Path,
        merged: &Path,
        extra: &[&str],
    ) -> Mount {
        let mut opts = format!(
            "lowerdir={lowerdir},upperdir={},workdir={}",
            upper.display(),
            work.display()
        );
        for e in extra {
            opts.push(',');
            opts.push_str(e);
        }
        run_ok(
            Command::new("mount")
                .args(["-t", "overlay", "overlay", "-o", &opts])
                .arg(merged),
            "kernel overlay mount",
        );
        Mount {
            merged: merged.to_path_buf(),
            upper: Some(upper.to_path_buf()),
            work: Some(work.to_path_buf()),
            kind: Kind::Kernel,
            live: true,
        }
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        if rel.is_empty() {
            self.merged.clone()
        } else {
            self.merged.join(rel)
        }
    }

    pub fn upper_path(&self, rel: &str) -> PathBuf {
        self.upper.as_ref().expect("mount has an upper").join(rel)
    }

    pub fn write(&self, rel: &str, content: &str) {
        fs::write(self.path(rel), content).unwrap();
    }

    pub fn append(&self, rel: &str, content: &str) {
        let mut f = fs::OpenOptions::new()
            .append(true)
            .open(self.path(rel))
            .unwrap();
        f.write_all(content.as_bytes()).unwrap();
    }

    pub fn read(&self, rel: &str) -> String {
        fs::read_to_string(self.path(rel)).unwrap_or_else(|e| panic!("read {rel}: {e}"))
    }

    /// Sorted names of a directory in the merged view.
    pub fn ls(&self, rel: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.path(rel))
            .unwrap_or_else(|e| panic!("readdir {rel}: {e}"))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    }

    pub fn exists(&self, rel: &str) -> bool {
        fs::symlink_metadata(self.path(rel)).is_ok()
    }

    /// Unmounts now (and waits until the mount is gone).
    pub fn unmount(&mut self) {
        if !self.live {
            return;
        }
        self.live = false;
        let status = match self.kind {
            Kind::Union => Command::new("fusermount3")
                .arg("-u")
                .arg(&self.merged)
                .stderr(Stdio::null())
                .status(),
            Kind::Kernel => Command::new("umount")
                .arg(&self.merged)
                .stderr(Stdio::null())
                .status(),
        };
        if !status.map(|s| s.success()).unwrap_or(false) {
            // Busy (an open file in a failing test): detach lazily.
            let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while is_mounted(&self.merged) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn is_live(&self) -> bool {
        self.live && is_mounted(&self.merged)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.unmount();
        if is_mounted(&self.merged) {
            eprintln!("LEAK: {} is still mounted", self.merged.display());
        }
    }
}

/// One object of a tree, as compared between mounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Obj {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub nlink: u64,
    pub content: Option<Vec<u8>>,
    pub target: Option<String>,
    pub rdev: u64,
    pub xattrs: Vec<(String, Vec<u8>)>,
    pub mtime: i64,
}

pub struct TreeOpts {
    /// Compare nlink of directories (kernel overlayfs reports 1 for merged directories).
    pub dir_nlink: bool,
    pub mtime: bool,
    /// Only xattrs with this prefix are compared.
    pub xattr_prefix: &'static str,
}

impl Default for TreeOpts {
    fn default() -> Self {
        TreeOpts {
            dir_nlink: false,
            mtime: true,
            xattr_prefix: "user.",
        }
    }
}

/// Every object under `root` by relative path (the root itself is "").
pub fn tree(root: &Path, o: &TreeOpts) -> BTreeMap<String, Obj> {
    let mut out = BTreeMap::new();
    walk(root, root, o, &mut out);
    out
}

fn walk(root: &Path, p: &Path, o: &TreeOpts, out: &mut BTreeMap<String, Obj>) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    let ft = m.file_type();
    let kind = kind_of(&ft);
    let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
    let xattrs = list_xattrs(p)
        .into_iter()
        .filter(|n| n.starts_with(o.xattr_prefix))
        .map(|n| {
            let v = get_xattr(p, &n).unwrap_or_default();
            (n, v)
        })
        .collect();
    out.insert(
        rel,
        Obj {
            kind,
            mode: m.mode() & 0o7777,
            uid: m.uid(),
            gid: m.gid(),
            size: if kind == 'd' { 0 } else { m.size() },
            nlink: if kind == 'd' && !o.dir_nlink {
                0
            } else {
                m.nlink()
            },
            content: (kind == 'f').then(|| fs::read(p).unwrap()),
            target: (kind == 'l').then(|| fs::read_link(p).unwrap().to_string_lossy().into_owned()),
            rdev: m.rdev(),
            xattrs,
            mtime: if o.mtime && kind != 'd' { m.mtime() } else { 0 },
        },
    );
    if kind == 'd' {
        for n in children(p) {
            walk(root, &n, o, out);
        }
    }
}

/// Asserts two trees are equal, naming the first difference.
pub fn assert_same_tree(a: &BTreeMap<String, Obj>, b: &BTreeMap<String, Obj>, what: &str) {
    let keys_a: Vec<_> = a.keys().collect();
    let keys_b: Vec<_> = b.keys().collect();
    assert_eq!(keys_a, keys_b, "{what}: different names");
    for (k, va) in a {
        assert_eq!(Some(va), b.get(k), "{what}: {k:?} differs");
    }
}

/// The raw on-disk listing of an upper/lower directory (names and types, whiteouts included).
pub fn raw_tree(root: &Path) -> BTreeMap<String, (char, u64, Vec<String>)> {
    let mut out = BTreeMap::new();
    fn go(root: &Path, p: &Path, out: &mut BTreeMap<String, (char, u64, Vec<String>)>) {
        let m = fs::symlink_metadata(p).unwrap();
        let ft = m.file_type();
        let kind = kind_of(&ft);
        let rel = p.strip_prefix(root).unwrap().to_string_lossy().into_owned();
        let xattrs = list_xattrs(p)
            .into_iter()
            .filter(|x| x.contains("overlay"))
            .collect();
        out.insert(rel, (kind, m.rdev(), xattrs));
        if kind == 'd' {
            for e in fs::read_dir(p).unwrap() {
                go(root, &e.unwrap().path(), out);
            }
        }
    }
    go(root, root, &mut out);
    out
}

/// The inode number stat gives.
pub fn ino(p: &Path) -> u64 {
    fs::symlink_metadata(p).unwrap().ino()
}

/// Names in a directory, sorted (read now, through a mount if there is one).
pub fn names(p: &Path) -> Vec<String> {
    children(p)
        .iter()
        .map(|c| c.file_name().unwrap().to_string_lossy().into_owned())
        .collect()
}

/// The paths of a directory's entries, sorted.
pub fn children(p: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(p)
        .unwrap_or_else(|e| panic!("readdir {}: {e}", p.display()))
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

/// Owned strings, to compare with `names`.
pub fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

// ---------------------------------------------------------------------------------------------
// Unprivileged test users

/// The unprivileged user the rootless tests run as.
pub const TEST_USER: &str = "umtest";

/// Runs an account tool (useradd, groupadd, usermod) until `done` holds, retrying while
/// another test holds the account database lock.
pub fn account_tool(cmd: &str, args: &[&str], done: impl Fn() -> bool) {
    for _ in 0..50 {
        if done() {
            return;
        }
        let _ = Command::new(cmd).args(args).output();
        if done() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("{cmd} {args:?} did not succeed");
}

/// The uid of user `name`, if it exists.
pub fn uid_of(name: &str) -> Option<u32> {
    let out = Command::new("id").args(["-u", name]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

/// The unprivileged test user (created if missing) and its uid. /dev/fuse must be usable by
/// other users, as distributions ship it (mode 0666).
pub fn test_user() -> u32 {
    account_tool(
        "useradd",
        &["-M", "-s", "/usr/sbin/nologin", TEST_USER],
        || uid_of(TEST_USER).is_some(),
    );
    let md = fs::metadata("/dev/fuse").unwrap();
    if md.permissions().mode() & 0o006 != 0o006 {
        fs::set_permissions("/dev/fuse", fs::Permissions::from_mode(0o666)).unwrap();
    }
    uid_of(TEST_USER).expect("the test user exists")
}

/// Gives a tree to `uid` (symlinks themselves, never their targets).
pub fn chown_tree(p: &Path, uid: u32) {
    let st = Command::new("chown")
        .args(["-R", "-h", &format!("{uid}:{uid}")])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "chown -R {}", p.display());
}

/// Runs `script` with bash as the test user inside `unshare -Urm` (so it is the namespace's
/// root and may mount FUSE); returns stdout, failing on a non-zero exit.
pub fn as_user_in_namespace(script: &str) -> String {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            TEST_USER,
            "--regid",
            TEST_USER,
            "--clear-groups",
            "--",
            "unshare",
            "-Urm",
            "bash",
            "-euc",
            script,
        ])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as {TEST_USER}: {script}\nstatus {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The first host id of the user namespaces `in_mapped_user_namespace` makes.
pub const NS_BASE: u32 = 200_000;

/// Runs `cmd` as the root of a new user and mount namespace made by `user`, with ids 0-65535
/// mapped to `NS_BASE`.. (written from here, as `newuidmap` would for a rootless container
/// engine) and private mount propagation; returns its output.
pub fn in_mapped_user_namespace(user: u32, mut cmd: Command) -> Output {
    use std::io::Read;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::os::unix::process::CommandExt;
    fn pipe() -> (OwnedFd, OwnedFd) {
        let mut fds = [0; 2];
        // SAFETY: pipe2 fills the two-element array it is given.
        let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
        assert_eq!(r, 0, "pipe2: {}", std::io::Error::last_os_error());
        // SAFETY: both descriptors are new and owned by nobody else.
        unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
    }
    let (ready_r, ready_w) = pipe();
    let (go_r, go_w) = pipe();
    let (ready, go, go_w_raw) = (ready_w.as_raw_fd(), go_r.as_raw_fd(), go_w.as_raw_fd());
    // The child stops after unshare until the maps are written; spawning returns only once it
    // has run the program, so the maps are written from a thread.
    let mapper = std::thread::spawn(move || -> Result<(), String> {
        let mut pid = [0u8; 4];
        fs::File::from(ready_r)
            .read_exact(&mut pid)
            .map_err(|e| format!("no word from the child: {e}"))?;
        let pid = i32::from_ne_bytes(pid);
        for map in ["uid_map", "gid_map"] {
            fs::write(format!("/proc/{pid}/{map}"), format!("0 {NS_BASE} 65536\n"))
                .map_err(|e| format!("writing {map} of {pid}: {e}"))?;
        }
        fs::File::from(go_w)
            .write_all(b"g")
            .map_err(|e| format!("waking the child: {e}"))
    });
    // SAFETY: between fork and exec the closure makes raw system calls only (no allocation,
    // no locks) on descriptors the parent keeps open until the child has run the program.
    unsafe {
        cmd.pre_exec(move || {
            let fail = || Err(std::io::Error::last_os_error());
            libc::close(go_w_raw);
            if libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresgid, user, user, user) != 0
                || libc::syscall(libc::SYS_setresuid, user, user, user) != 0
                || libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNS) != 0
            {
                return fail();
            }
            let pid = libc::getpid().to_ne_bytes();
            if libc::write(ready, pid.as_ptr().cast(), 4) != 4 {
                return fail();
            }
            let mut b = 0u8;
            if libc::read(go, (&raw mut b).cast(), 1) != 1 {
                // The maps were not written (no allocation here: EPIPE stands for that).
                return Err(std::io::Error::from_raw_os_error(libc::EPIPE));
            }
            if libc::syscall(libc::SYS_setresgid, 0, 0, 0) != 0
                || libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<libc::gid_t>()) != 0
                || libc::syscall(libc::SYS_setresuid, 0, 0, 0) != 0
                || libc::mount(
                    c"none".as_ptr(),
                    c"/".as_ptr(),
                    std::ptr::null(),
                    libc::MS_REC | libc::MS_PRIVATE,
                    std::ptr::null(),
                ) != 0
            {
                return fail();
            }
            Ok(())
        });
    }
    let child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn();
    // A child that failed before its word leaves the thread waiting on this end.
    drop(ready_w);
    let mapped = mapper.join().expect("the mapping thread");
    let mut child = child.unwrap_or_else(|e| panic!("running {cmd:?} in a user namespace: {e}"));
    if let Err(e) = mapped {
        panic!("mapping the ids of the user namespace: {e}");
    }
    drop(go_r);
    // Its stderr is passed on line by line as it comes (a long run shows its progress), and
    // kept.
    let mut stdout = child.stdout.take().expect("piped");
    let reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        stdout.read_to_end(&mut v).map(|_| v)
    });
    let mut stderr = Vec::new();
    for line in
        std::io::BufRead::split(std::io::BufReader::new(child.stderr.take().unwrap()), b'\n')
    {
        let line = line.expect("reading the child's stderr");
        eprintln!("{}", String::from_utf8_lossy(&line));
        stderr.extend_from_slice(&line);
        stderr.push(b'\n');
    }
    let status = child.wait().expect("waiting for the child");
    let stdout = reader.join().unwrap().expect("reading the child's stdout");
    Output {
        status,
        stdout,
        stderr,
    }
}

// ---------------------------------------------------------------------------------------------
// "Nothing changed on disk"

/// One letter per file type: d f l p c b s.
pub fn kind_of(ft: &fs::FileType) -> char {
    if ft.is_dir() {
        'd'
    } else if ft.is_file() {
        'f'
    } else if ft.is_symlink() {
        'l'
    } else if ft.is_fifo() {
        'p'
    } else if ft.is_char_device() {
        'c'
    } else if ft.is_block_device() {
        'b'
    } else {
        's'
    }
}

/// One object of a `disk_snapshot`.
#[derive(Debug, PartialEq, Eq)]
pub struct DiskEntry {
    pub kind: char,
    pub mode: u32,
    pub ino: u64,
    pub size: u64,
    pub mtime: (i64, i64),
    pub ctime: (i64, i64),
    pub content: Option<Vec<u8>>,
    pub target: Option<PathBuf>,
}

/// Every object under `root` (not following symlinks), by path relative to it: type, mode,
/// inode, size, mtime, ctime, file content and symlink target.
pub fn disk_snapshot(root: &Path) -> BTreeMap<PathBuf, DiskEntry> {
    fn go(root: &Path, p: &Path, out: &mut BTreeMap<PathBuf, DiskEntry>) {
        let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
        let ft = m.file_type();
        let kind = kind_of(&ft);
        out.insert(
            p.strip_prefix(root).unwrap().to_path_buf(),
            DiskEntry {
                kind,
                mode: m.mode(),
                ino: m.ino(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                content: (kind == 'f').then(|| fs::read(p).unwrap()),
                target: (kind == 'l').then(|| fs::read_link(p).unwrap()),
            },
        );
        if kind == 'd' {
            for n in children(p) {
                go(root, &n, out);
            }
        }
    }
    let mut out = BTreeMap::new();
    go(root, root, &mut out);
    out
}

/// What differs between two snapshots, one line per path (empty: nothing changed).
pub fn snapshot_changes(
    a: &BTreeMap<PathBuf, DiskEntry>,
    b: &BTreeMap<PathBuf, DiskEntry>,
) -> Vec<String> {
    let mut d = Vec::new();
    for (k, v) in a {
        match b.get(k) {
            None => d.push(format!("removed {k:?}")),
            Some(w) if w != v => d.push(format!("changed {k:?}: {v:?} -> {w:?}")),
            _ => {}
        }
    }
    for k in b.keys() {
        if !a.contains_key(k) {
            d.push(format!("created {k:?}"));
        }
    }
    d
}

// ---------------------------------------------------------------------------------------------
// Refusals

/// A path as the mounts tables write it (space, tab, newline and backslash escaped).
pub fn mounts_escape(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012")
}

/// Mount points at or under `root` in our mount namespace.
pub fn mounts_under(root: &Path) -> Vec<String> {
    let r = mounts_escape(root);
    fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').nth(1).map(String::from))
        .filter(|m| m.starts_with(&r))
        .collect()
}

/// Runs `cmd` and checks that it refused: non-zero exit, no panic, exactly one stderr line
/// starting with `unionmount: ` that contains every one of `words` (case-insensitive),
/// nothing mounted at `merged` or anywhere under `root` (a mount made anyway is taken down),
/// and the whole tree under `root` unchanged. Returns the problems found.
pub fn refusal(
    root: &Path,
    what: &str,
    cmd: &mut Command,
    merged: &Path,
    words: &[&str],
) -> Vec<String> {
    let mounts_before = mounts_under(root);
    let before = disk_snapshot(root);
    let out = cmd.stdin(Stdio::null()).output().expect("run unionmount");
    let mut fails = Vec::new();
    if is_mounted(merged) {
        drop(Mount::adopt(merged.to_path_buf(), None, None, Kind::Union));
        fails.push(format!(
            "{what}: something was mounted at {}",
            merged.display()
        ));
    }
    let mounts_after = mounts_under(root);
    if mounts_after != mounts_before {
        fails.push(format!(
            "{what}: mounts under the root changed: {mounts_before:?} -> {mounts_after:?}"
        ));
    }
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    match out.status.code() {
        Some(0) => fails.push(format!("{what}: exit status 0 (stderr {err:?})")),
        None => fails.push(format!("{what}: killed by a signal: {}", out.status)),
        Some(_) => {}
    }
    if err.contains("panicked") {
        fails.push(format!("{what}: panicked: {err:?}"));
    }
    let lines: Vec<&str> = err.lines().collect();
    if lines.len() != 1 {
        fails.push(format!(
            "{what}: stderr is {} lines, not one: {err:?}",
            lines.len()
        ));
    } else {
        let line = lines[0];
        if !line.starts_with("unionmount: ") {
            fails.push(format!(
                "{what}: stderr does not start with 'unionmount: ': {line:?}"
            ));
        }
        let low = line.to_lowercase();
        for w in words {
            if !low.contains(&w.to_lowercase()) {
                fails.push(format!("{what}: stderr does not mention {w:?}: {line:?}"));
            }
        }
    }
    let d = snapshot_changes(&before, &disk_snapshot(root));
    if !d.is_empty() {
        fails.push(format!("{what}: the tree changed: {d:?}"));
    }
    fails
}

// ---------------------------------------------------------------------------------------------
// A daemon in the foreground, as a child process of the test (so its pid is exact)

/// `unionmount -f` over a `Layers`, as a child of the test; on drop it is killed and its
/// mount detached, so a failing test leaves nothing mounted.
pub struct ForegroundDaemon {
    pub child: Option<Child>,
    pub merged: PathBuf,
    pub log: PathBuf,
}

/// Polls `cond` until it holds or `d` passes; returns whether it held. A wait, not a timing
/// assertion: the deadline only keeps a broken daemon from hanging the test.
pub fn wait_until(d: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + d;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() > end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Detaches a mount (a dead daemon's included) and waits until it is gone.
pub fn lazy_unmount(p: &Path) {
    if is_mounted(p) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(p)
            .stderr(Stdio::null())
            .status();
        assert!(
            wait_until(Duration::from_secs(10), || !is_mounted(p)),
            "{} is still mounted after umount -l",
            p.display()
        );
    }
}

impl ForegroundDaemon {
    /// Mounts `base/merged` over the lowers with `base/upper` and `base/work`, in the foreground.
    pub fn start(layers: &Layers, base: &Path, extra: &[&str]) -> ForegroundDaemon {
        ForegroundDaemon::start_with(layers, base, extra, None)
    }

    /// As `start`, with the daemon run under `wrapper` (e.g. strace).
    pub fn start_with(
        layers: &Layers,
        base: &Path,
        extra: &[&str],
        wrapper: Option<&[&str]>,
    ) -> ForegroundDaemon {
        let merged = base.join("merged");
        for d in ["upper", "work", "merged"] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        let log = base.join("daemon.log");
        let mut cmd = match wrapper {
            Some(w) => {
                let mut c = Command::new(w[0]);
                c.args(&w[1..]).arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args(env_args(extra))
            .arg("-f")
            .arg("--lower")
            .arg(layers.lowerdir_opt())
            .arg("--upper")
            .arg(base.join("upper"))
            .arg("--work")
            .arg(base.join("work"))
            .args(extra)
            .arg(&merged)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap());
        let child = cmd.spawn().expect("start unionmount");
        let mut d = ForegroundDaemon {
            child: Some(child),
            merged,
            log,
        };
        let mounted = wait_until(Duration::from_secs(20), || {
            is_mounted(&d.merged) || d.child.as_mut().unwrap().try_wait().unwrap().is_some()
        });
        assert!(
            mounted && is_mounted(&d.merged),
            "unionmount -f did not mount {}: {}",
            d.merged.display(),
            fs::read_to_string(&d.log).unwrap_or_default()
        );
        d
    }

    /// `kill -9` of the daemon, then the dead mount is detached.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
        lazy_unmount(&self.merged);
    }

    /// A clean unmount; the daemon must then exit on its own. A mount that something else
    /// holds busy for a moment (a process walking the temporary directories) is retried, then
    /// detached lazily; a daemon that still does not exit is reported with where its threads
    /// wait.
    pub fn unmount(&mut self) -> Result<(), String> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        let mut busy = String::new();
        for _ in 0..50 {
            let out = Command::new("fusermount3")
                .arg("-u")
                .arg(&self.merged)
                .output()
                .expect("run fusermount3");
            if out.status.success() || !is_mounted(&self.merged) {
                busy.clear();
                break;
            }
            busy = String::from_utf8_lossy(&out.stderr).into_owned();
            std::thread::sleep(Duration::from_millis(200));
        }
        lazy_unmount(&self.merged);
        let exited = wait_until(Duration::from_secs(60), || c.try_wait().unwrap().is_some());
        if exited {
            return Ok(());
        }
        let pid = c.id();
        let mut threads = String::new();
        if let Ok(tasks) = fs::read_dir(format!("/proc/{pid}/task")) {
            for t in tasks.flatten() {
                let comm = fs::read_to_string(t.path().join("comm")).unwrap_or_default();
                let wchan = fs::read_to_string(t.path().join("wchan")).unwrap_or_default();
                threads += &format!(
                    "  {} {}: {wchan}\n",
                    comm.trim(),
                    t.file_name().to_string_lossy()
                );
            }
        }
        let _ = c.kill(); // SIGKILL
        let _ = c.wait();
        Err(format!(
            "the daemon did not exit after its unmount (fusermount3 -u busy: {busy:?}); \
             threads:\n{threads}log: {}",
            self.log()
        ))
    }

    /// Whether the daemon process still runs.
    pub fn alive(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().unwrap().is_none())
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ForegroundDaemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill(); // SIGKILL
            let _ = c.wait();
        }
        lazy_unmount(&self.merged);
    }
}

/// A mount a test made itself (a tmpfs, a bind mount), unmounted when dropped.
pub struct ScratchMount(pub PathBuf);

/// `mount ARGS SOURCE AT` (a loop image or a filesystem without a device), unmounted when
/// the guard drops.
pub fn scratch_mount(args: &[&str], source: impl AsRef<OsStr>, at: &Path) -> ScratchMount {
    let st = Command::new("mount")
        .args(args)
        .arg(source.as_ref())
        .arg(at)
        .status()
        .unwrap();
    assert!(
        st.success(),
        "mount {args:?} {:?} {}",
        source.as_ref(),
        at.display()
    );
    ScratchMount(at.to_path_buf())
}

impl Drop for ScratchMount {
    fn drop(&mut self) {
        if is_mounted(&self.0) {
            let _ = Command::new("umount").arg(&self.0).status();
            if is_mounted(&self.0) {
                let _ = Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
}

/// A layer path as `--lower`, `lowerdir=`, `upperdir=` and `workdir=` take it: `\`, `:` and
/// `,` escaped.
pub fn esc_layer(p: &Path) -> String {
    p.to_string_lossy()
        .replace('\\', "\\\\")
        .replace(':', "\\:")
        .replace(',', "\\,")
}

fn layer_list(lowers: &[&Path]) -> String {
    lowers
        .iter()
        .map(|p| esc_layer(p))
        .collect::<Vec<_>>()
        .join(":")
}

/// The native command line: `--lower L1:L2 [--upper U] [--work W] MERGED`.
pub fn native_args(
    lowers: &[&Path],
    upper: Option<&Path>,
    work: Option<&Path>,
    merged: &Path,
) -> Vec<OsString> {
    let mut a: Vec<OsString> = vec!["--lower".into(), layer_list(lowers).into()];
    if let Some(u) = upper {
        a.extend(["--upper".into(), u.as_os_str().to_owned()]);
    }
    if let Some(w) = work {
        a.extend(["--work".into(), w.as_os_str().to_owned()]);
    }
    a.push(merged.as_os_str().to_owned());
    a
}

/// The fuse-overlayfs command line: `[SOURCE] MERGED -o lowerdir=...,upperdir=...,workdir=...`.
pub fn overlay_args(
    source: Option<&str>,
    lowers: &[&Path],
    upper: Option<&Path>,
    work: Option<&Path>,
    merged: &Path,
) -> Vec<OsString> {
    let mut o = format!("lowerdir={}", layer_list(lowers));
    if let Some(u) = upper {
        o.push_str(&format!(",upperdir={}", esc_layer(u)));
    }
    if let Some(w) = work {
        o.push_str(&format!(",workdir={}", esc_layer(w)));
    }
    let mut a: Vec<OsString> = source.map(OsString::from).into_iter().collect();
    a.extend([merged.as_os_str().to_owned(), "-o".into(), o.into()]);
    a
}

/// Seeds from `1-100`, `7,9,20-30` and the like (the seed lists of the generated tests).
pub fn parse_seeds(s: &str) -> Vec<u64> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if let Some((a, b)) = part.split_once('-') {
            let a: u64 = a.trim().parse().expect("seed range start");
            let b: u64 = b.trim().parse().expect("seed range end");
            v.extend(a..=b);
        } else {
            v.push(part.parse().expect("seed"));
        }
    }
    v
}

/// A tmpfs of `size` (as `mount -o size=` takes it) mounted on a directory for the life of
/// the guard.
pub struct Tmpfs(PathBuf);

impl Tmpfs {
    pub fn new(dir: PathBuf, size: &str) -> Tmpfs {
        fs::create_dir_all(&dir).unwrap();
        let st = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "mount tmpfs on {}", dir.display());
        Tmpfs(dir)
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // A daemon with a layer on it keeps that open for a moment after its unmount.
        let umount = |lazy: bool| {
            let mut c = Command::new("umount");
            c.args(lazy.then_some("-l"))
                .arg(&self.0)
                .stderr(Stdio::null());
            c.status().is_ok_and(|s| s.success())
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while !umount(false) {
            if Instant::now() > deadline {
                umount(true);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// splitmix64: small and seedable, for generated test cases (a seed replays its case).
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (0 when `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// `below` for indices and counts.
    pub fn index(&mut self, n: usize) -> usize {
        self.below(n as u64) as usize
    }

    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    pub fn one_in(&mut self, n: usize) -> bool {
        self.index(n) == 0
    }

    pub fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.index(v.len())]
    }
}

/// Live processes other than this one (zombies left out) for which `matches(exe, args)`
/// holds; `exe` is `None` where it cannot be read.
pub fn processes(matches: impl Fn(Option<&Path>, &[String]) -> bool) -> Vec<i32> {
    let me = std::process::id() as i32;
    let mut out = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let base = e.path();
        let Ok(cmd) = fs::read(base.join("cmdline")) else {
            continue;
        };
        if pid == me {
            continue;
        }
        let stat = fs::read_to_string(base.join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").map(|(_, r)| r.chars().next());
        if matches!(state, Some(Some('Z' | 'X')) | None) {
            continue;
        }
        let args: Vec<String> = cmd
            .split(|&b| b == 0)
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        let exe = fs::read_link(base.join("exe")).ok();
        if matches(exe.as_deref(), &args) {
            out.push(pid);
        }
    }
    out
}

/// PIDs of unionmount daemons (under either name) whose command line mentions `root`.
pub fn daemons_under(root: &Path) -> Vec<i32> {
    let needle = root.to_string_lossy().into_owned();
    processes(|_, args| {
        let name = args
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(""))
            .unwrap_or_default();
        (name == "unionmount" || name == "fuse-overlayfs")
            && args.iter().any(|a| a.contains(&needle))
    })
}

/// Every daemon started for `root` has exited (they exit once unmounted).
pub fn assert_no_daemons(root: &Path, when: &str) {
    assert!(
        wait_until(Duration::from_secs(10), || daemons_under(root).is_empty()),
        "{when}: daemons still running: {:?}",
        daemons_under(root)
    );
}

/// A child process killed (and reaped) when the guard drops, also when a test fails.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Kills, on drop, any daemon this test started that is still running (a failed test inside a
/// namespace must not leave one behind). Declare it after the `Layers` so it runs first.
pub struct Reaper(pub PathBuf);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in daemons_under(&self.0) {
            // SAFETY: plain syscall; the pid is a daemon whose arguments name our temp dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

// Inode flags (FS_IOC_GETFLAGS and friends: lsattr/chattr), errors as errnos.

pub const FS_IOC_GETFLAGS: libc::Ioctl = libc::FS_IOC_GETFLAGS;
pub const FS_IOC_SETFLAGS: libc::Ioctl = libc::FS_IOC_SETFLAGS;
pub const FS_IOC_FSGETXATTR: libc::Ioctl = libc::_IOR::<[u32; 7]>(b'X' as u32, 31);
pub const FS_IOC_FSSETXATTR: libc::Ioctl = libc::_IOW::<[u32; 7]>(b'X' as u32, 32);
/// FS_XFLAG_NODUMP, the `fsx_xflags` form of FS_NODUMP_FL.
pub const FS_XFLAG_NODUMP: u32 = 0x80;
pub const FS_SYNC_FL: u32 = 0x8;
pub const FS_IMMUTABLE_FL: u32 = 0x10;
pub const FS_APPEND_FL: u32 = 0x20;
pub const FS_NODUMP_FL: u32 = 0x40;
pub const FS_NOATIME_FL: u32 = 0x80;

pub fn open_for_flags(p: &Path) -> Result<fs::File, i32> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_NOFOLLOW)
        .open(p)
        .map_err(|e| e.raw_os_error().unwrap_or(-1))
}

pub fn get_flags(p: &Path) -> Result<u32, i32> {
    use std::os::fd::AsRawFd;
    let f = open_for_flags(p)?;
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through a valid pointer.
    flag_rc(unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_GETFLAGS, &mut flags) })?;
    Ok(flags as u32)
}

pub fn set_flags(p: &Path, flags: u32) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    let f = open_for_flags(p)?;
    let flags = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through a valid pointer.
    flag_rc(unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_SETFLAGS, &flags) })
}

/// FS_IOC_FSGETXATTR's struct fsxattr, as seven 32-bit words (`fsx_xflags` first).
fn get_fsxattr(f: &fs::File) -> Result<[u32; 7], i32> {
    use std::os::fd::AsRawFd;
    let mut fsx = [0u32; 7];
    // SAFETY: FS_IOC_FSGETXATTR writes a 28-byte struct fsxattr into the buffer.
    flag_rc(unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSGETXATTR, fsx.as_mut_ptr()) })?;
    Ok(fsx)
}

/// `fsx_xflags`, the first field of FS_IOC_FSGETXATTR's struct fsxattr.
pub fn get_xflags(p: &Path) -> Result<u32, i32> {
    Ok(get_fsxattr(&open_for_flags(p)?)?[0])
}

/// Adds to `fsx_xflags` with FS_IOC_FSSETXATTR (read, changed, written back).
pub fn add_xflags(p: &Path, add: u32) -> Result<(), i32> {
    use std::os::fd::AsRawFd;
    let f = open_for_flags(p)?;
    let mut fsx = get_fsxattr(&f)?;
    fsx[0] |= add;
    // SAFETY: FS_IOC_FSSETXATTR reads a 28-byte struct fsxattr from the buffer.
    flag_rc(unsafe { libc::ioctl(f.as_raw_fd(), FS_IOC_FSSETXATTR, fsx.as_ptr()) })
}

pub fn add_flags(p: &Path, add: u32) -> Result<(), i32> {
    set_flags(p, get_flags(p)? | add)
}

pub fn remove_flags(p: &Path, remove: u32) -> Result<(), i32> {
    set_flags(p, get_flags(p)? & !remove)
}

fn flag_rc(r: libc::c_int) -> Result<(), i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(-1))
    } else {
        Ok(())
    }
}

/// Gives `user` subordinate uid and gid ranges for a rootless container's user namespace when
/// it has none (useradd gives them on most systems).
pub fn ensure_subids(user: &str) {
    let has = |f: &str| {
        fs::read_to_string(f)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with(&format!("{user}:")))
    };
    if has("/etc/subuid") && has("/etc/subgid") {
        return;
    }
    account_tool(
        "usermod",
        &[
            "--add-subuids",
            "300000-365535",
            "--add-subgids",
            "300000-365535",
            user,
        ],
        || has("/etc/subuid") && has("/etc/subgid"),
    );
}

/// The next entry of an open directory stream: name, `d_ino` and `d_type`; None at its end.
///
/// # Safety
/// `dp` must be a stream from `opendir`/`fdopendir` that is not closed yet.
pub unsafe fn next_entry(dp: *mut libc::DIR) -> Option<(String, u64, u8)> {
    // SAFETY: the caller passes an open stream; the entry is copied before the next call.
    unsafe {
        let e = libc::readdir(dp);
        if e.is_null() {
            return None;
        }
        let name = std::ffi::CStr::from_ptr((*e).d_name.as_ptr())
            .to_string_lossy()
            .into_owned();
        Some((name, (*e).d_ino, (*e).d_type))
    }
}
