mod common;
use common::*;

// Directory operations (SPEC §3 "Operations", "On-disk formats"): creating every kind of
// object (owned by the caller, setgid directories honoured), refusing what would read back as
// a private marker, deleting (whiteouts exactly where a lower layer still has the name),
// directories made where a lower one was removed (opaque), and rename in all its forms
// (EXDEV for directories from a lower layer, NOREPLACE, EXCHANGE, replacement errors).
// Every test checks the merged view and the upper on disk (as root: char 0/0 whiteouts and
// trusted.overlay.opaque=y), then runs the same operations on kernel overlayfs over the same
// lowers and compares each result, the merged tree and the upper on disk.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;
use std::process::Command;

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    /// open(O_CREAT|O_EXCL|O_WRONLY, 0644).
    Create(&'static str),
    /// Create or truncate, then write.
    Write(&'static str, &'static str),
    /// mkdir(path, 0755).
    Mkdir(&'static str),
    Rmdir(&'static str),
    Unlink(&'static str),
    /// mknod(path, type | perm, makedev(major, minor)).
    Mknod(&'static str, u32, u32, u32),
    /// (target, path)
    Symlink(&'static str, &'static str),
    /// (existing, new)
    Link(&'static str, &'static str),
    /// rename(2).
    Rename(&'static str, &'static str),
    /// renameat2(2) through syscall(SYS_renameat2), with flags.
    Rename2(&'static str, &'static str, u32),
    /// `sh -c SCRIPT` in the mount's root as uid = gid = the number given (no supplementary
    /// groups, CAP_MKNOD kept for device nodes) with umask 022: Ok, or Err(-exit status).
    As(u32, &'static str),
}

use Op::*;

const NOREPLACE: u32 = libc::RENAME_NOREPLACE;
const EXCHANGE: u32 = libc::RENAME_EXCHANGE;
const USER: u32 = 1234;

fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn rc(r: libc::c_long) -> Result<(), i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(())
    }
}

fn io<T>(r: std::io::Result<T>) -> Result<(), i32> {
    r.map(drop)
        .map_err(|e| e.raw_os_error().expect("an OS error"))
}

fn apply_one(root: &Path, op: Op) -> Result<(), i32> {
    let p = |r: &str| cs(&root.join(r));
    // SAFETY (all unsafe blocks below): plain syscalls on NUL-terminated paths.
    match op {
        Create(f) => io(fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(root.join(f))),
        Write(f, data) => io(fs::write(root.join(f), data)),
        Mkdir(d) => rc(unsafe { libc::mkdir(p(d).as_ptr(), 0o755) } as libc::c_long),
        Rmdir(d) => io(fs::remove_dir(root.join(d))),
        Unlink(f) => io(fs::remove_file(root.join(f))),
        Mknod(f, mode, ma, mi) => {
            rc(unsafe { libc::mknod(p(f).as_ptr(), mode, libc::makedev(ma, mi)) } as libc::c_long)
        }
        Symlink(target, f) => io(std::os::unix::fs::symlink(target, root.join(f))),
        Link(a, b) => io(fs::hard_link(root.join(a), root.join(b))),
        Rename(a, b) => rc(unsafe { libc::rename(p(a).as_ptr(), p(b).as_ptr()) } as libc::c_long),
        Rename2(a, b, flags) => rc(unsafe {
            libc::syscall(
                libc::SYS_renameat2,
                libc::AT_FDCWD,
                p(a).as_ptr(),
                libc::AT_FDCWD,
                p(b).as_ptr(),
                flags,
            )
        }),
        As(uid, script) => {
            let mut c = if uid == 0 {
                Command::new("sh")
            } else {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={uid}"))
                    .args([
                        "--clear-groups",
                        "--inh-caps=+mknod",
                        "--ambient-caps=+mknod",
                        "sh",
                    ]);
                c
            };
            let out = c
                .arg("-c")
                .arg(format!("umask 022; {script}"))
                .current_dir(root)
                .output()
                .expect("run sh");
            if out.status.success() {
                Ok(())
            } else {
                eprintln!(
                    "as {uid}: {script:?}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                // A negative number: an exit status, not an errno.
                Err(-out.status.code().unwrap_or(255))
            }
        }
    }
}

/// Applies `ops` in order under `root`; each result as Ok or the errno.
fn apply(root: &Path, ops: &[(Op, Result<(), i32>)]) -> Vec<Result<(), i32>> {
    ops.iter().map(|(op, _)| apply_one(root, *op)).collect()
}

fn fmt_result(r: &Result<(), i32>) -> String {
    match r {
        Ok(()) => "Ok".into(),
        Err(e) if *e < 0 => format!("exit status {}", -e),
        Err(e) => format!("Err({})", std::io::Error::from_raw_os_error(*e)),
    }
}

/// Runs `ops` on a fresh unionmount over `l` and asserts each result is the one given.
fn run_union(l: &Layers, ops: &[(Op, Result<(), i32>)]) -> Mount {
    let m = l.mount("u");
    let got = apply(&m.merged, ops);
    let diffs: Vec<String> = ops
        .iter()
        .zip(&got)
        .filter(|((_, want), got)| want != *got)
        .map(|((op, want), got)| {
            format!(
                "  {op:?}: want {}, got {}",
                fmt_result(want),
                fmt_result(got)
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "unionmount results:\n{}",
        diffs.join("\n")
    );
    m
}

// ---------------------------------------------------------------------------------------
// Comparison with kernel overlayfs
// ---------------------------------------------------------------------------------------

/// The overlay xattrs that define the view (kernel overlayfs also writes bookkeeping ones —
/// origin, impure, uuid — that unionmount need not).
fn view_xattr(name: &str) -> bool {
    ["opaque", "redirect", "metacopy", "whiteout"]
        .iter()
        .any(|s| name == format!("trusted.overlay.{s}") || name == format!("user.overlay.{s}"))
}

fn upper_tree(root: &Path) -> BTreeMap<String, (char, u64, Vec<String>)> {
    raw_tree(root)
        .into_iter()
        .map(|(k, (kind, rdev, xs))| {
            (
                k,
                (
                    kind,
                    rdev,
                    xs.into_iter().filter(|x| view_xattr(x)).collect(),
                ),
            )
        })
        .collect()
}

/// Mounts kernel overlayfs over the same lowers, applies `ops`, and compares with the
/// unionmount `u` that ran them: each result, the merged tree (mtimes both set during the
/// test blanked), and the upper on disk (names, kinds, rdev, view-defining overlay xattrs).
fn same_as_kernel(l: &Layers, u: &Mount, ops: &[(Op, Result<(), i32>)]) {
    let k = l.mount_kernel("k");
    let rk = apply(&k.merged, ops);
    let diffs: Vec<String> = ops
        .iter()
        .zip(&rk)
        .filter(|((_, want), got)| want != *got)
        .map(|((op, want), got)| {
            format!(
                "  {op:?}: unionmount {}, kernel {}",
                fmt_result(want),
                fmt_result(got)
            )
        })
        .collect();
    assert!(
        diffs.is_empty(),
        "results differ from kernel overlayfs:\n{}",
        diffs.join("\n")
    );

    let o = TreeOpts::default();
    let mut tk = tree(&k.merged, &o);
    let mut tu = tree(&u.merged, &o);
    for (name, a) in tk.iter_mut() {
        if let Some(b) = tu.get_mut(name) {
            if a.mtime > OLD && b.mtime > OLD {
                a.mtime = 0;
                b.mtime = 0;
            }
        }
    }
    assert_same_tree(&tk, &tu, "merged tree (kernel, unionmount)");

    let (uk, uu) = (upper_tree(&k.upper_path("")), upper_tree(&u.upper_path("")));
    let mut diffs = Vec::new();
    for name in uk.keys().chain(uu.keys().filter(|n| !uk.contains_key(*n))) {
        let (a, b) = (uk.get(name), uu.get(name));
        if a != b {
            diffs.push(format!("  {name:?}: kernel {a:?}, unionmount {b:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "uppers on disk differ (kind, rdev, overlay xattrs):\n{}",
        diffs.join("\n")
    );
}

// ---------------------------------------------------------------------------------------
// Checks
// ---------------------------------------------------------------------------------------

/// (kind, rdev) of a path, None if it does not exist.
fn entry(p: &Path) -> Option<(char, u64)> {
    let md = fs::symlink_metadata(p).ok()?;
    let kind = match md.mode() & libc::S_IFMT {
        libc::S_IFDIR => 'd',
        libc::S_IFREG => 'f',
        libc::S_IFLNK => 'l',
        libc::S_IFIFO => 'p',
        libc::S_IFCHR => 'c',
        libc::S_IFBLK => 'b',
        _ => 's',
    };
    Some((kind, md.rdev()))
}

/// A whiteout as kernel overlayfs writes it: a character device 0/0.
const WHITEOUT: Option<(char, u64)> = Some(('c', 0));
const FILE: Option<(char, u64)> = Some(('f', 0));
const DIR: Option<(char, u64)> = Some(('d', 0));

fn assert_upper(m: &Mount, want: &[(&str, Option<(char, u64)>)]) {
    for (rel, w) in want {
        assert_eq!(entry(&m.upper_path(rel)), *w, "upper {rel:?} (kind, rdev)");
    }
}

fn assert_opaque(m: &Mount, rel: &str) {
    assert_eq!(
        get_xattr(&m.upper_path(rel), "trusted.overlay.opaque"),
        Ok(b"y".to_vec()),
        "upper {rel:?} must be opaque"
    );
}

fn owner(p: &Path) -> (u32, u32, u32) {
    let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (md.uid(), md.gid(), md.mode() & 0o7777)
}

fn set_umask() {
    // SAFETY: umask has no failure mode; every test uses the same value.
    unsafe { libc::umask(0o022) };
}

// ---------------------------------------------------------------------------------------
// Creation
// ---------------------------------------------------------------------------------------

/// Objects of every kind made through the mount belong to the caller: a child process
/// running as 1234:1234, and root.
#[test]
fn new_objects_are_owned_by_the_caller() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .dir("pub")
        .chmod("pub", 0o777)
        .file("pub/mine", "owned by 1234")
        .chown("pub/mine", USER, USER);
    l.lower(1).file("pub/from1", "1");
    age_all(&l);
    let ops = [
        (As(USER, "touch pub/file"), Ok(())),
        (As(USER, "mkdir pub/dir"), Ok(())),
        (As(USER, "mkfifo pub/fifo"), Ok(())),
        (As(USER, "ln -s some/target pub/sym"), Ok(())),
        (As(USER, "ln pub/file pub/hard"), Ok(())),
        (As(USER, "ln pub/mine pub/mine2"), Ok(())),
        (As(USER, "mknod pub/chr c 1 3"), Ok(())),
        (As(USER, "mknod pub/blk b 7 0"), Ok(())),
        (As(USER, "echo data > pub/dir/nested"), Ok(())),
        (Create("pub/rootfile"), Ok(())),
        (Mkdir("pub/rootdir"), Ok(())),
        (Mknod("pub/rootfifo", libc::S_IFIFO | 0o640, 0, 0), Ok(())),
        (Mknod("pub/rootchr", libc::S_IFCHR | 0o600, 1, 3), Ok(())),
        (Mknod("pub/rootblk", libc::S_IFBLK | 0o600, 7, 0), Ok(())),
        (Symlink("t", "pub/rootsym"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    let u = (USER, USER);
    // (path, (uid, gid), kind, rdev, mode)
    type Want = (&'static str, (u32, u32), char, u64, u32);
    let want: &[Want] = &[
        ("pub/file", u, 'f', 0, 0o644),
        ("pub/dir", u, 'd', 0, 0o755),
        ("pub/dir/nested", u, 'f', 0, 0o644),
        ("pub/fifo", u, 'p', 0, 0o644),
        ("pub/sym", u, 'l', 0, 0o777),
        ("pub/hard", u, 'f', 0, 0o644),
        ("pub/chr", u, 'c', libc::makedev(1, 3), 0o644),
        ("pub/blk", u, 'b', libc::makedev(7, 0), 0o644),
        ("pub/rootfile", (0, 0), 'f', 0, 0o644),
        ("pub/rootdir", (0, 0), 'd', 0, 0o755),
        ("pub/rootfifo", (0, 0), 'p', 0, 0o640),
        ("pub/rootchr", (0, 0), 'c', libc::makedev(1, 3), 0o600),
        ("pub/rootblk", (0, 0), 'b', libc::makedev(7, 0), 0o600),
        ("pub/rootsym", (0, 0), 'l', 0, 0o777),
    ];
    for (rel, (uid, gid), kind, rdev, mode) in want {
        for (what, p) in [("merged", m.path(rel)), ("upper", m.upper_path(rel))] {
            assert_eq!(
                entry(&p),
                Some((*kind, *rdev)),
                "{what} {rel}: (kind, rdev)"
            );
            assert_eq!(
                owner(&p),
                (*uid, *gid, *mode),
                "{what} {rel}: (uid, gid, mode)"
            );
        }
    }
    for p in [m.path("pub/sym"), m.upper_path("pub/sym")] {
        assert_eq!(
            fs::read_link(&p).unwrap().to_str(),
            Some("some/target"),
            "{}",
            p.display()
        );
    }
    // Hard links: one inode, two links, in the view and in the upper.
    for (a, b) in [("pub/file", "pub/hard"), ("pub/mine", "pub/mine2")] {
        let (ma, mb) = (
            fs::symlink_metadata(m.path(a)).unwrap(),
            fs::symlink_metadata(m.path(b)).unwrap(),
        );
        assert_eq!((ma.ino(), ma.nlink()), (mb.ino(), 2), "merged {a} / {b}");
        let (ua, ub) = (
            fs::symlink_metadata(m.upper_path(a)).unwrap(),
            fs::symlink_metadata(m.upper_path(b)).unwrap(),
        );
        assert_eq!((ua.ino(), ua.nlink()), (ub.ino(), 2), "upper {a} / {b}");
    }
    assert_eq!(owner(&m.upper_path("pub/mine2")), (USER, USER, 0o644));
    assert_eq!(m.read("pub/mine2"), "owned by 1234");
    assert_eq!(m.read("pub/dir/nested"), "data\n");
    // The parent was copied up as it was (root's, 0777).
    assert_eq!(owner(&m.upper_path("pub")), (0, 0, 0o777));
    assert!(m.ls("pub").contains(&"from1".to_string()));
    same_as_kernel(&l, &m, &ops);
}

/// In a setgid directory new objects take the directory's group, and new directories the
/// setgid bit, whoever creates them.
#[test]
fn setgid_directory_inheritance() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .dir("sg")
        .chown("sg", 0, 5000)
        .chmod("sg", 0o2777)
        .dir("pub")
        .chmod("pub", 0o777);
    l.lower(1).file("sg/below", "b");
    age_all(&l);
    let ops = [
        (As(USER, "touch sg/uf"), Ok(())),
        (As(USER, "mkdir sg/ud"), Ok(())),
        (As(USER, "mkdir sg/ud/nested"), Ok(())),
        (As(USER, "mkfifo sg/up"), Ok(())),
        (As(USER, "ln -s x sg/us"), Ok(())),
        (Create("sg/rf"), Ok(())),
        (Mkdir("sg/rd"), Ok(())),
        // Outside the setgid directory: the caller's own group.
        (As(USER, "mkdir pub/own && touch pub/own/f"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    let want: &[(&str, u32, u32, u32)] = &[
        ("sg/uf", USER, 5000, 0o644),
        ("sg/ud", USER, 5000, 0o2755),
        ("sg/ud/nested", USER, 5000, 0o2755),
        ("sg/up", USER, 5000, 0o644),
        ("sg/rf", 0, 5000, 0o644),
        ("sg/rd", 0, 5000, 0o2755),
        ("pub/own", USER, USER, 0o755),
        ("pub/own/f", USER, USER, 0o644),
    ];
    for (rel, uid, gid, mode) in want {
        assert_eq!(
            owner(&m.path(rel)),
            (*uid, *gid, *mode),
            "merged {rel}: (uid, gid, mode)"
        );
        assert_eq!(
            owner(&m.upper_path(rel)),
            (*uid, *gid, *mode),
            "upper {rel}: (uid, gid, mode)"
        );
    }
    let us = fs::symlink_metadata(m.path("sg/us")).unwrap();
    assert_eq!((us.uid(), us.gid()), (USER, 5000), "merged sg/us");
    assert_eq!(
        owner(&m.upper_path("sg")),
        (0, 5000, 0o2777),
        "upper sg copied as it was"
    );
    same_as_kernel(&l, &m, &ops);
}

/// Rule (deliberate difference, README): a character device 0/0 can be made, as on a local
/// filesystem (kernel overlayfs refuses it with EPERM, as it would read back as a whiteout).
/// unionmount stores it as the stand-in char 0:1048575 and shows it as 0/0; the stand-in
/// number itself is the one refused. No kernel comparison: the kernel refuses these.
#[test]
fn char_device_0_0_is_a_device() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("lowerfile", "l")
        .file("d/x", "x")
        .dir("pub")
        .chmod("pub", 0o777);
    l.lower(1).file("d/y", "y");
    age_all(&l);
    let standin = libc::makedev(0, 0xfffff);
    let ops = [
        (Mknod("dev00", libc::S_IFCHR | 0o600, 0, 0), Ok(())),
        (Mknod("d/dev00", libc::S_IFCHR | 0o644, 0, 0), Ok(())),
        (
            Mknod("standin", libc::S_IFCHR | 0o600, 0, 0xfffff),
            Err(libc::EPERM),
        ),
    ];
    let m = run_union(&l, &ops);
    for p in ["dev00", "d/dev00"] {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        assert!(md.file_type().is_char_device(), "merged {p}");
        assert_eq!(md.rdev(), 0, "merged {p} rdev");
        let up = fs::symlink_metadata(m.upper_path(p)).unwrap();
        assert!(up.file_type().is_char_device(), "upper {p}");
        assert_eq!(
            up.rdev(),
            standin,
            "upper {p} is the stand-in, not a whiteout"
        );
    }
    assert_eq!(entry(&m.path("standin")), None, "merged standin");
    assert_eq!(m.ls("d"), vec!["dev00", "x", "y"]);
}

/// Names starting with `.wh.` would read back as AUFS whiteouts (or the opaque marker): every
/// way of making one is refused with EPERM. (Kernel overlayfs has no such rule: no
/// comparison.)
#[test]
fn wh_names_are_refused() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("lowerfile", "l")
        .file("d/x", "x")
        .dir("pub")
        .chmod("pub", 0o777);
    l.lower(1).file("d/y", "y");
    let ops = [
        (Create(".wh.x"), Err(libc::EPERM)),
        (Write("d/.wh.x", "hide x"), Err(libc::EPERM)),
        (Mkdir(".wh.d"), Err(libc::EPERM)),
        (Mkdir("d/.wh..wh..opq"), Err(libc::EPERM)),
        (Create("d/.wh..wh..opq"), Err(libc::EPERM)),
        (
            Mknod(".wh.p", libc::S_IFIFO | 0o644, 0, 0),
            Err(libc::EPERM),
        ),
        (Symlink("t", "d/.wh.y"), Err(libc::EPERM)),
        (Link("lowerfile", "d/.wh.x"), Err(libc::EPERM)),
        (Rename("lowerfile", "d/.wh.y"), Err(libc::EPERM)),
        (Write("up", "u"), Ok(())),
        (Rename("up", ".wh.lowerfile"), Err(libc::EPERM)),
        (Rename2("up", ".wh.up", NOREPLACE), Err(libc::EPERM)),
        (
            As(
                USER,
                "touch pub/.wh.y 2>&1 | grep -q 'Operation not permitted'",
            ),
            Ok(()),
        ),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls("d"), vec!["x", "y"], "merged d");
    assert_eq!(m.ls(""), vec!["d", "lowerfile", "pub", "up"], "merged root");
    assert_eq!(m.ls("pub"), Vec::<String>::new(), "merged pub");
    assert_eq!(m.read("lowerfile"), "l");
    let upper: Vec<String> = raw_tree(&m.upper_path("")).into_keys().collect();
    assert!(
        upper.iter().all(|n| !n.contains(".wh.")),
        "a .wh. name reached the upper: {upper:?}"
    );
    assert_eq!(
        names(&m.work.as_ref().unwrap().join("work")),
        Vec::<String>::new(),
        "work dir"
    );
}

// ---------------------------------------------------------------------------------------
// Deletion
// ---------------------------------------------------------------------------------------

#[test]
fn unlink_and_rmdir() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("lo_f", "l")
        .dir("lo_d")
        .file("both_f", "0")
        .file("m/a", "a")
        .file("m/b", "b")
        .file("ne/x", "x")
        .file("nem/y", "y")
        .dir("isdir")
        .file("isfile", "f")
        .symlink("lo_l", "lo_f")
        .fifo("lo_p");
    l.lower(1)
        .file("deep_f", "d")
        .dir("deep_d")
        .file("both_f", "1")
        .file("m/c", "c")
        .file("nem/z", "z");
    age_all(&l);
    let ops = [
        // Upper-only names leave nothing.
        (Write("up_f", "u"), Ok(())),
        (Mkdir("up_d"), Ok(())),
        (Write("up_d/inner", "i"), Ok(())),
        (Unlink("up_d/inner"), Ok(())),
        (Unlink("up_f"), Ok(())),
        (Rmdir("up_d"), Ok(())),
        // Lower names leave a whiteout.
        (Unlink("lo_f"), Ok(())),
        (Rmdir("lo_d"), Ok(())),
        (Unlink("deep_f"), Ok(())),
        (Rmdir("deep_d"), Ok(())),
        (Unlink("lo_l"), Ok(())),
        (Unlink("lo_p"), Ok(())),
        // A name in the upper and a lower: a whiteout.
        (Write("both_f", "changed"), Ok(())),
        (Unlink("both_f"), Ok(())),
        // A merged directory, empty in the view, whiteouts inside: rmdir works.
        (Rmdir("m"), Err(libc::ENOTEMPTY)),
        (Unlink("m/a"), Ok(())),
        (Unlink("m/b"), Ok(())),
        (Unlink("m/c"), Ok(())),
        (Rmdir("m"), Ok(())),
        // Not empty in the view.
        (Rmdir("ne"), Err(libc::ENOTEMPTY)),
        (Rmdir("nem"), Err(libc::ENOTEMPTY)),
        (Unlink("nem/y"), Ok(())),
        (Rmdir("nem"), Err(libc::ENOTEMPTY)),
        // Wrong types, as unlink(2)/rmdir(2)/rename(2) give them.
        (Unlink("isdir"), Err(libc::EISDIR)),
        (Rmdir("isfile"), Err(libc::ENOTDIR)),
        (Rmdir("isfile/x"), Err(libc::ENOTDIR)),
        (Rename("isfile", "isdir"), Err(libc::EISDIR)),
        (Rename("isdir", "isfile"), Err(libc::ENOTDIR)),
        (Mkdir("up_d2"), Ok(())),
        (Write("up_d2/f", "f"), Ok(())),
        (Unlink("up_d2"), Err(libc::EISDIR)),
        (Rmdir("up_d2"), Err(libc::ENOTEMPTY)),
        (Rename("up_d2/f", "isdir"), Err(libc::EISDIR)),
        (Rename("up_d2", "isfile"), Err(libc::ENOTDIR)),
        // Gone is gone.
        (Unlink("lo_f"), Err(libc::ENOENT)),
        (Rmdir("lo_d"), Err(libc::ENOENT)),
        (Rmdir("m"), Err(libc::ENOENT)),
        (Unlink("m/a"), Err(libc::ENOENT)),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(
        m.ls(""),
        vec!["isdir", "isfile", "ne", "nem", "up_d2"],
        "merged root"
    );
    assert_eq!(m.ls("nem"), vec!["z"]);
    assert_eq!(m.ls("ne"), vec!["x"]);
    assert_upper(
        &m,
        &[
            ("up_f", None),
            ("up_d", None),
            ("lo_f", WHITEOUT),
            ("lo_d", WHITEOUT),
            ("deep_f", WHITEOUT),
            ("deep_d", WHITEOUT),
            ("lo_l", WHITEOUT),
            ("lo_p", WHITEOUT),
            ("both_f", WHITEOUT),
            ("m", WHITEOUT),
            ("nem", DIR),
            ("nem/y", WHITEOUT),
            ("nem/z", None),
            ("ne", None),
            ("isdir", None),
            ("isfile", None),
        ],
    );
    // Only what the operations left: no stray entries anywhere in the upper.
    let upper: Vec<String> = raw_tree(&m.upper_path("")).into_keys().collect();
    assert_eq!(
        upper,
        vec![
            "", "both_f", "deep_d", "deep_f", "lo_d", "lo_f", "lo_l", "lo_p", "m", "nem", "nem/y",
            "up_d2", "up_d2/f"
        ],
        "upper"
    );
    same_as_kernel(&l, &m, &ops);
}

/// A directory made where a lower directory was removed is empty, opaque in the upper, and
/// stays so under kernel overlayfs.
#[test]
fn mkdir_where_lower_dir_was_removed_is_opaque() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("d/x", "x")
        .file("d/sub/s", "s")
        .file("f", "a file");
    l.lower(1)
        .file("d/y", "y")
        .file("d/sub/t", "t")
        .file("e/z", "z");
    age_all(&l);
    let ops = [
        (Unlink("d/x"), Ok(())),
        (Unlink("d/y"), Ok(())),
        (Unlink("d/sub/s"), Ok(())),
        (Unlink("d/sub/t"), Ok(())),
        (Rmdir("d/sub"), Ok(())),
        (Rmdir("d"), Ok(())),
        (Mkdir("d"), Ok(())),
        // A lower file removed, a directory in its place.
        (Unlink("f"), Ok(())),
        (Mkdir("f"), Ok(())),
        // A lower-only directory removed whole, made again, filled.
        (Unlink("e/z"), Ok(())),
        (Rmdir("e"), Ok(())),
        (Mkdir("e"), Ok(())),
        (Write("e/new", "n"), Ok(())),
        (Mkdir("e/sub"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls("d"), Vec::<String>::new(), "merged d");
    assert_eq!(m.ls("f"), Vec::<String>::new(), "merged f");
    assert_eq!(m.ls("e"), vec!["new", "sub"], "merged e");
    assert_eq!(m.ls("e/sub"), Vec::<String>::new(), "merged e/sub");
    for rel in ["d", "f", "e"] {
        assert_eq!(entry(&m.path(rel)), DIR, "merged {rel}");
        assert_eq!(
            entry(&m.upper_path(rel)),
            DIR,
            "upper {rel} must be a directory, not a whiteout"
        );
        assert_opaque(&m, rel);
    }
    assert_eq!(
        names(&m.upper_path("d")),
        Vec::<String>::new(),
        "upper d holds nothing"
    );
    assert_eq!(names(&m.upper_path("e")), vec!["new", "sub"], "upper e");
    assert!(
        list_xattrs(&m.path("d"))
            .iter()
            .all(|x| !x.contains("overlay")),
        "private xattr visible on merged d"
    );
    same_as_kernel(&l, &m, &ops);

    // The upper unionmount wrote, under kernel overlayfs (fresh work dir): the same view.
    let before = tree(&m.merged, &TreeOpts::default());
    let upper = m.upper_path("");
    drop(m);
    let base = l.mkdir("kernel_on_union");
    let (work, merged) = (base.join("work"), base.join("merged"));
    fs::create_dir_all(&work).unwrap();
    fs::create_dir_all(&merged).unwrap();
    let k = Mount::kernel(&l.lowerdir_opt(), &upper, &work, &merged, &[]);
    assert_same_tree(
        &before,
        &tree(&k.merged, &TreeOpts::default()),
        "unionmount's upper under kernel overlayfs",
    );
}

// ---------------------------------------------------------------------------------------
// Rename
// ---------------------------------------------------------------------------------------

#[test]
fn rename_files() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("lo", "lower only")
        .xattr("lo", "user.k", b"v")
        .chown("lo", USER, USER)
        .chmod("lo", 0o640)
        .file("d/lo2", "lo2")
        .file("tgt_lo", "target")
        .file("both", "both 0")
        .symlink("lnk", "lo")
        .fifo("fifo");
    l.lower(1)
        .file("both", "both 1")
        .file("deep", "deep")
        .dir("d");
    age_all(&l);
    let ops = [
        (Write("up", "u"), Ok(())),
        (Rename("up", "up_renamed"), Ok(())),
        (Rename("lo", "lo_renamed"), Ok(())),
        (Rename("deep", "d/deep_moved"), Ok(())),
        (Rename("d/lo2", "tgt_lo"), Ok(())),
        (Write("up2", "x"), Ok(())),
        (Rename("up2", "both"), Ok(())),
        (Rename("lnk", "d/lnk"), Ok(())),
        (Rename("fifo", "fifo2"), Ok(())),
        (Rename("lo_renamed", "lo_renamed"), Ok(())),
        (Rename("missing", "x"), Err(libc::ENOENT)),
        (Rename("lo", "x"), Err(libc::ENOENT)),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(
        m.ls(""),
        vec!["both", "d", "fifo2", "lo_renamed", "tgt_lo", "up_renamed"],
        "merged root"
    );
    assert_eq!(m.ls("d"), vec!["deep_moved", "lnk"]);
    assert_eq!(m.read("up_renamed"), "u");
    assert_eq!(m.read("lo_renamed"), "lower only");
    assert_eq!(m.read("d/deep_moved"), "deep");
    assert_eq!(m.read("tgt_lo"), "lo2");
    assert_eq!(m.read("both"), "x");
    assert_eq!(fs::read_link(m.path("d/lnk")).unwrap().to_str(), Some("lo"));
    // The copied-up file kept its metadata.
    for p in [m.path("lo_renamed"), m.upper_path("lo_renamed")] {
        assert_eq!(owner(&p), (USER, USER, 0o640), "{}", p.display());
        assert_eq!(
            get_xattr(&p, "user.k"),
            Ok(b"v".to_vec()),
            "{}",
            p.display()
        );
    }
    assert_upper(
        &m,
        &[
            ("up", None),
            ("up_renamed", FILE),
            ("up2", None),
            ("lo", WHITEOUT),
            ("lo_renamed", FILE),
            ("deep", WHITEOUT),
            ("d", DIR),
            ("d/deep_moved", FILE),
            ("d/lo2", WHITEOUT),
            ("tgt_lo", FILE),
            ("both", FILE),
            ("lnk", WHITEOUT),
            ("d/lnk", Some(('l', 0))),
            ("fifo", WHITEOUT),
            ("fifo2", Some(('p', 0))),
        ],
    );
    assert_eq!(fs::read_to_string(m.upper_path("tgt_lo")).unwrap(), "lo2");
    same_as_kernel(&l, &m, &ops);
}

/// A directory that exists in a lower layer (lower only, merged, or lower with an upper
/// part) cannot be renamed: EXDEV, nothing changes, and `mv` falls back to copying.
#[test]
fn rename_of_lower_directory_is_exdev() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("ld/x", "x")
        .file("md/a", "a")
        .file("cd/c", "c")
        .dir("emptylower")
        .file("mvme/f", "f")
        .file("mvme/sub/g", "g");
    l.lower(1).file("md/b", "b").file("deepd/z", "z");
    age_all(&l);
    let ops = [
        (Rename("ld", "ld2"), Err(libc::EXDEV)),
        (Rename("md", "md2"), Err(libc::EXDEV)),
        (Rename("deepd", "deepd2"), Err(libc::EXDEV)),
        (Rename("emptylower", "e2"), Err(libc::EXDEV)),
        (Rename("ld", "md/ld"), Err(libc::EXDEV)),
        (Write("cd/new", "n"), Ok(())),
        (Rename("cd", "cd2"), Err(libc::EXDEV)),
        (Mkdir("upd"), Ok(())),
        (Rename2("ld", "upd", EXCHANGE), Err(libc::EXDEV)),
        (Rename2("upd", "ld", EXCHANGE), Err(libc::EXDEV)),
        (Rename2("md", "md3", NOREPLACE), Err(libc::EXDEV)),
        (As(0, "mv mvme moved"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(
        m.ls(""),
        vec!["cd", "deepd", "emptylower", "ld", "md", "moved", "upd"],
        "merged root"
    );
    assert_eq!(m.ls("ld"), vec!["x"]);
    assert_eq!(m.ls("md"), vec!["a", "b"]);
    assert_eq!(m.ls("cd"), vec!["c", "new"]);
    assert_eq!(m.ls("moved"), vec!["f", "sub"]);
    assert_eq!(m.read("moved/sub/g"), "g");
    assert_upper(
        &m,
        &[
            ("ld2", None),
            ("md2", None),
            ("md3", None),
            ("deepd2", None),
            ("e2", None),
            ("cd2", None),
            ("cd", DIR),
            ("upd", DIR),
            ("mvme", WHITEOUT),
            ("moved", DIR),
            ("moved/sub/g", FILE),
        ],
    );
    assert_eq!(names(&m.upper_path("upd")), Vec::<String>::new());
    same_as_kernel(&l, &m, &ops);
}

/// A directory that lives only in the upper renames freely; moved onto a name a lower
/// layer has (whited out, or an empty merged directory) it hides the lower contents.
#[test]
fn rename_of_upper_directory() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("gone/x", "x")
        .file("emp/y", "y")
        .dir("lempty")
        .file("md/a", "a");
    l.lower(1).file("gone/x2", "x2").file("md/b", "b");
    age_all(&l);
    let ops = [
        (Mkdir("nd"), Ok(())),
        (Write("nd/f", "f"), Ok(())),
        (Rename("nd", "nd2"), Ok(())),
        (Rename("nd2", "md/nd2"), Ok(())),
        // Onto a whited-out lower directory.
        (Unlink("gone/x"), Ok(())),
        (Unlink("gone/x2"), Ok(())),
        (Rmdir("gone"), Ok(())),
        (Mkdir("n1"), Ok(())),
        (Write("n1/mine", "1"), Ok(())),
        (Rename("n1", "gone"), Ok(())),
        // Onto a merged directory that is empty in the view.
        (Unlink("emp/y"), Ok(())),
        (Mkdir("n2"), Ok(())),
        (Write("n2/mine", "2"), Ok(())),
        (Rename("n2", "emp"), Ok(())),
        // Onto an empty lower-only directory.
        (Mkdir("n3"), Ok(())),
        (Write("n3/mine", "3"), Ok(())),
        (Rename("n3", "lempty"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls(""), vec!["emp", "gone", "lempty", "md"], "merged root");
    assert_eq!(m.ls("md"), vec!["a", "b", "nd2"]);
    assert_eq!(m.read("md/nd2/f"), "f");
    assert_eq!(
        m.ls("gone"),
        vec!["mine"],
        "merged gone shows lower contents"
    );
    assert_eq!(m.ls("emp"), vec!["mine"], "merged emp shows lower contents");
    assert_eq!(m.ls("lempty"), vec!["mine"]);
    assert_eq!(m.read("gone/mine"), "1");
    assert!(!m.exists("gone/x") && !m.exists("gone/x2") && !m.exists("emp/y"));
    assert_upper(
        &m,
        &[
            ("nd", None),
            ("nd2", None),
            ("n1", None),
            ("n2", None),
            ("n3", None),
            ("md/nd2", DIR),
            ("md/nd2/f", FILE),
            ("gone", DIR),
            ("gone/mine", FILE),
            ("emp", DIR),
            ("emp/mine", FILE),
            ("emp/y", None),
            ("lempty", DIR),
        ],
    );
    // The renamed directories hide what the lowers have at their new names.
    assert_opaque(&m, "gone");
    assert_opaque(&m, "emp");
    same_as_kernel(&l, &m, &ops);
}

#[test]
fn rename_over_existing_file() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0).file("a", "a0").file("b", "b0").file("d/c", "c0");
    l.lower(1).file("e", "e1").file("d/f", "f1");
    age_all(&l);
    let ops = [
        (Rename("a", "b"), Ok(())),
        (Write("u", "u"), Ok(())),
        (Rename("u", "e"), Ok(())),
        (Rename("d/c", "d/f"), Ok(())),
        (Write("v", "v"), Ok(())),
        (Write("w", "w"), Ok(())),
        (Rename("v", "w"), Ok(())),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls(""), vec!["b", "d", "e", "w"]);
    assert_eq!(m.ls("d"), vec!["f"]);
    assert_eq!(
        (m.read("b"), m.read("e"), m.read("d/f"), m.read("w")),
        ("a0".into(), "u".into(), "c0".into(), "v".into())
    );
    assert_upper(
        &m,
        &[
            ("a", WHITEOUT),
            ("b", FILE),
            ("u", None),
            ("e", FILE),
            ("d/c", WHITEOUT),
            ("d/f", FILE),
            ("v", None),
            ("w", FILE),
        ],
    );
    same_as_kernel(&l, &m, &ops);
}

#[test]
fn rename_noreplace() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("a", "a0")
        .file("b", "b0")
        .file("wh", "wh0")
        .dir("ld");
    l.lower(1).file("c", "c1");
    age_all(&l);
    let ops = [
        (Rename2("a", "b", NOREPLACE), Err(libc::EEXIST)),
        (Write("u", "u"), Ok(())),
        (Rename2("u", "b", NOREPLACE), Err(libc::EEXIST)),
        (Rename2("u", "c", NOREPLACE), Err(libc::EEXIST)),
        (Rename2("u", "ld", NOREPLACE), Err(libc::EEXIST)),
        (Rename2("u", "new", NOREPLACE), Ok(())),
        // The target is only a whiteout in the upper.
        (Unlink("wh"), Ok(())),
        (Rename2("new", "wh", NOREPLACE), Ok(())),
        // A lower source.
        (Rename2("a", "fresh", NOREPLACE), Ok(())),
        (Mkdir("ud"), Ok(())),
        (Rename2("ud", "b", NOREPLACE), Err(libc::EEXIST)),
        (Rename2("ud", "ud2", NOREPLACE), Ok(())),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls(""), vec!["b", "c", "fresh", "ld", "ud2", "wh"]);
    assert_eq!(m.read("wh"), "u");
    assert_eq!(m.read("fresh"), "a0");
    assert_eq!(m.read("b"), "b0");
    assert_upper(
        &m,
        &[
            ("u", None),
            ("new", None),
            ("wh", FILE),
            ("a", WHITEOUT),
            ("fresh", FILE),
            ("b", None),
            ("c", None),
            ("ud", None),
            ("ud2", DIR),
        ],
    );
    same_as_kernel(&l, &m, &ops);
}

#[test]
fn rename_exchange() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0)
        .file("lf", "lower file")
        .chown("lf", USER, USER)
        .chmod("lf", 0o640)
        .file("xl", "lower x");
    l.lower(1).file("deep", "deep file");
    age_all(&l);
    let ops = [
        // A lower-only file with an upper file.
        (Write("uf", "upper file"), Ok(())),
        (Rename2("lf", "uf", EXCHANGE), Ok(())),
        // An upper directory with an upper file.
        (Mkdir("udir"), Ok(())),
        (Write("udir/in", "i"), Ok(())),
        (Write("ufile2", "f2"), Ok(())),
        (Rename2("udir", "ufile2", EXCHANGE), Ok(())),
        // An upper directory with a lower-only file.
        (Mkdir("udir3"), Ok(())),
        (Rename2("udir3", "xl", EXCHANGE), Ok(())),
        // Two lower files (different layers).
        (Rename2("udir3", "deep", EXCHANGE), Ok(())),
        (Rename2("uf", "missing", EXCHANGE), Err(libc::ENOENT)),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.read("lf"), "upper file");
    assert_eq!(m.read("uf"), "lower file");
    for p in [m.path("uf"), m.upper_path("uf")] {
        assert_eq!(
            owner(&p),
            (USER, USER, 0o640),
            "{}: the lower file's owner and mode",
            p.display()
        );
    }
    assert_eq!(m.read("udir"), "f2");
    assert_eq!(m.ls("ufile2"), vec!["in"]);
    assert_eq!(entry(&m.path("xl")), DIR);
    assert_eq!(m.ls("xl"), Vec::<String>::new());
    assert_eq!(m.read("udir3"), "deep file");
    assert_eq!(m.read("deep"), "lower x");
    assert_upper(
        &m,
        &[
            ("lf", FILE),
            ("uf", FILE),
            ("udir", FILE),
            ("ufile2", DIR),
            ("ufile2/in", FILE),
            ("xl", DIR),
            ("udir3", FILE),
            ("deep", FILE),
        ],
    );
    assert_eq!(
        fs::read_to_string(m.upper_path("uf")).unwrap(),
        "lower file"
    );
    assert_eq!(
        fs::read_to_string(m.upper_path("lf")).unwrap(),
        "upper file"
    );
    same_as_kernel(&l, &m, &ops);
}

#[test]
fn rename_onto_non_empty_merged_dir_is_enotempty() {
    set_umask();
    let l = Layers::new(2);
    l.lower(0).file("md/a", "a").file("ld/x", "x");
    l.lower(1).file("md/b", "b");
    age_all(&l);
    let ops = [
        (Mkdir("nd"), Ok(())),
        (Write("nd/mine", "m"), Ok(())),
        (Rename("nd", "md"), Err(libc::ENOTEMPTY)),
        (Rename("nd", "ld"), Err(libc::ENOTEMPTY)),
        (Unlink("md/a"), Ok(())),
        (Rename("nd", "md"), Err(libc::ENOTEMPTY)),
        (Rename2("nd", "md", NOREPLACE), Err(libc::EEXIST)),
        (Unlink("md/b"), Ok(())),
        (Rename("nd", "md"), Ok(())),
        (Write("f", "f"), Ok(())),
        (Rename("f", "ld"), Err(libc::EISDIR)),
        (Rename("md", "f"), Err(libc::ENOTDIR)),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(m.ls(""), vec!["f", "ld", "md"]);
    assert_eq!(m.ls("md"), vec!["mine"]);
    assert_eq!(m.ls("ld"), vec!["x"]);
    assert_upper(
        &m,
        &[
            ("nd", None),
            ("md", DIR),
            ("md/mine", FILE),
            ("md/a", None),
            ("md/b", None),
        ],
    );
    assert_opaque(&m, "md");
    same_as_kernel(&l, &m, &ops);
}

/// One longer mixed sequence of everything above, compared with kernel overlayfs result by
/// result, then the merged trees and the uppers.
#[test]
fn mixed_sequence_matches_kernel() {
    set_umask();
    let l = Layers::new(3);
    l.lower(0)
        .file("a", "a0")
        .file("m/x", "x0")
        .whiteout("m/hidden")
        .opaque_xattr("o", "trusted.overlay.opaque")
        .file("o/in", "in")
        .dir("pub")
        .chmod("pub", 0o777)
        .symlink("ln", "a");
    l.lower(1)
        .file("a", "a1")
        .file("m/y", "y1")
        .file("m/hidden", "h")
        .file("o/below", "hidden by opaque")
        .file("ld/z", "z");
    l.lower(2).file("m/sub/deep", "d").file("b", "b2");
    age_all(&l);
    let ops = [
        (Create("new"), Ok(())),
        (Create("new"), Err(libc::EEXIST)),
        (Create("a"), Err(libc::EEXIST)),
        (Create("m/hidden"), Ok(())),
        (Mkdir("m"), Err(libc::EEXIST)),
        (Mkdir("m/sub2"), Ok(())),
        (Mknod("m/fifo", libc::S_IFIFO | 0o600, 0, 0), Ok(())),
        (Mknod("m/null", libc::S_IFCHR | 0o666, 1, 3), Ok(())),
        (Mknod("m/loop", libc::S_IFBLK | 0o600, 7, 0), Ok(())),
        // (Char 0/0 is left to `char_device_0_0_is_refused`.)
        (Symlink("x", "m/sym"), Ok(())),
        (Link("a", "m/alink"), Ok(())),
        (
            As(USER, "touch pub/u && mkdir pub/ud && ln -s u pub/ul"),
            Ok(()),
        ),
        (Unlink("m/x"), Ok(())),
        (Unlink("m/y"), Ok(())),
        (Rmdir("m/sub"), Err(libc::ENOTEMPTY)),
        (Unlink("m/sub/deep"), Ok(())),
        (Rmdir("m/sub"), Ok(())),
        (Mkdir("m/sub"), Ok(())),
        (Rmdir("o"), Err(libc::ENOTEMPTY)),
        (Unlink("o/in"), Ok(())),
        (Rmdir("o"), Ok(())),
        (Mkdir("o"), Ok(())),
        (Rename("ld", "ld2"), Err(libc::EXDEV)),
        (Rename("m", "m2"), Err(libc::EXDEV)),
        (Rename("b", "m/b"), Ok(())),
        (Rename("ln", "m/ln"), Ok(())),
        (Rename2("a", "new", NOREPLACE), Err(libc::EEXIST)),
        (Rename2("a", "new", EXCHANGE), Ok(())),
        (Rename2("m/sub2", "m/sub", EXCHANGE), Ok(())),
        (Rename("m/sub2", "ld"), Err(libc::ENOTEMPTY)),
        (Rename("m/sub2", "fresh_dir"), Ok(())),
        (Rename("fresh_dir", "m/alink"), Err(libc::ENOTDIR)),
        (Rename("m/alink", "fresh_dir"), Err(libc::EISDIR)),
        (Unlink("m"), Err(libc::EISDIR)),
        (Rmdir("a"), Err(libc::ENOTDIR)),
        (Rmdir("m/hidden"), Err(libc::ENOTDIR)),
    ];
    let m = run_union(&l, &ops);
    assert_eq!(
        m.ls("m"),
        vec![
            "alink", "b", "fifo", "hidden", "ln", "loop", "null", "sub", "sym"
        ],
        "merged m"
    );
    assert_eq!(m.ls("o"), Vec::<String>::new());
    assert_upper(
        &m,
        &[
            ("m/x", WHITEOUT),
            ("m/y", WHITEOUT),
            ("m/null", Some(('c', libc::makedev(1, 3)))),
            ("m/loop", Some(('b', libc::makedev(7, 0)))),
            ("m/wh", None),
            ("b", WHITEOUT),
            ("ln", WHITEOUT),
            ("o", DIR),
            ("ld", None),
        ],
    );
    assert_opaque(&m, "o");
    same_as_kernel(&l, &m, &ops);
}

/// An object created where a whiteout stands is built in the work directory, away from its
/// parent: it still inherits the parent's default ACL, exactly as on kernel overlayfs (a file
/// and a fifo get the masked access ACL, a directory also the default ACL, the umask is not
/// applied), and the upper on disk holds the same ACLs.
#[test]
fn objects_made_over_a_whiteout_inherit_the_default_acl() {
    let l = Layers::new(1);
    l.lower(0)
        .dir("d")
        .file("d/f", "x")
        .file("d/p", "y")
        .dir("d/sub")
        .file("plain", "z");
    let getfacl = |root: &Path| -> String {
        let out = run_ok(
            Command::new("getfacl")
                .args(["-n", "d/f", "d/p", "d/sub", "d/new"])
                .current_dir(root),
            "getfacl",
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let run = |m: &Mount| {
        let d = m.path("d");
        let st = Command::new("setfacl")
            .args(["-d", "-m", "u:1000:rwx,g::r-x,o::-"])
            .arg(&d)
            .status()
            .unwrap();
        assert!(st.success());
        fs::remove_file(d.join("f")).unwrap();
        fs::remove_file(d.join("p")).unwrap();
        fs::remove_dir(d.join("sub")).unwrap();
        // SAFETY: umask only changes this process's file-creation mask.
        let old = unsafe { libc::umask(0o022) };
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(d.join("f"))
            .unwrap();
        fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o666)
            .open(d.join("new"))
            .unwrap();
        mknod(&d.join("p"), libc::S_IFIFO | 0o666, 0);
        fs::DirBuilder::new().create(d.join("sub")).unwrap();
        // SAFETY: restores the mask read above.
        unsafe { libc::umask(old) };
        getfacl(&m.merged)
    };
    let m = l.mount("u");
    let ours = run(&m);
    assert!(ours.contains("# file: d/f\n# owner: 0\n# group: 0\nuser::rw-\nuser:1000:rwx\t#effective:rw-\ngroup::r-x\t#effective:r--\nmask::rw-\nother::---\n"), "{ours}");
    assert!(ours.contains("default:user:1000:rwx"), "{ours}");
    let k = l.mount_kernel("k");
    let theirs = run(&k);
    assert_eq!(ours, theirs);
    let upper = m.upper.clone().unwrap();
    drop(m);
    assert_eq!(getfacl(&upper), ours);
    assert!(fs::symlink_metadata(upper.join("d/f")).unwrap().is_file());
}

/// In a directory that lives in the upper layer alone, a name held by a whiteout left from an
/// earlier stack of layers is free: files and directories are made there as on kernel
/// overlayfs, a name held by an object stays taken, and unionmount also frees a name held
/// by a `.wh.NAME` file (a form the kernel does not read).
#[test]
fn whiteouts_in_an_upper_only_directory_hold_no_name() {
    let l = Layers::new(1);
    l.lower(0).file("elsewhere", "0");
    let seed = |name: &str| {
        let d = l.mkdir(&format!("{name}/upper/d"));
        mknod(&d.join("x"), libc::S_IFCHR, 0);
        mknod(&d.join("dx"), libc::S_IFCHR, 0);
        fs::write(d.join("taken"), "t").unwrap();
        fs::write(d.join(".wh.y"), "").unwrap();
    };
    seed("u");
    seed("k");
    let run = |m: &Mount| {
        fs::write(m.path("d/x"), "x").unwrap();
        fs::create_dir(m.path("d/dx")).unwrap();
        let taken = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(m.path("d/taken"));
        (m.read("d/x"), m.path("d/dx").is_dir(), errno(taken))
    };
    let m = l.mount("u");
    let k = l.mount_kernel("k");
    let ours = run(&m);
    assert_eq!(ours, ("x".to_string(), true, libc::EEXIST));
    assert_eq!(ours, run(&k));
    assert_eq!(m.ls("d"), strs(&["dx", "taken", "x"]));
    fs::write(m.path("d/y"), "y").unwrap();
    assert_eq!(m.read("d/y"), "y");
    assert_eq!(m.ls("d"), strs(&["dx", "taken", "x", "y"]));
    let upper = m.upper.clone().unwrap();
    drop(m);
    assert!(fs::symlink_metadata(upper.join("d/x")).unwrap().is_file());
    assert!(fs::symlink_metadata(upper.join("d/dx")).unwrap().is_dir());
}

const WHITEOUT_FLAG: u32 = libc::RENAME_WHITEOUT;

/// renameat2(pub/mine, pub/moved, RENAME_WHITEOUT) from the shell of an `As` step.
const RENAME_WHITEOUT_PY: &str = "python3 -c 'import ctypes, sys; l = ctypes.CDLL(None, \
    use_errno=True); sys.exit(0 if l.renameat2(-100, b\"pub/mine\", -100, b\"pub/moved\", 4) == 0 \
    else 1)'";

/// renameat2(RENAME_WHITEOUT) leaves a character device 0/0 at the old name, as on ext4
/// (kernel overlayfs refuses the flag with EINVAL: no comparison with it here).
#[test]
fn rename_whiteout_leaves_a_device_as_on_ext4() {
    set_umask();
    let l = Layers::new(1);
    l.lower(0)
        .file("lf", "lower")
        .file("lg", "lower g")
        .file("lh", "lower h")
        .dir("pub")
        .chmod("pub", 0o777)
        .file("pub/mine", "m")
        .chown("pub/mine", USER, USER);
    age_all(&l);
    let ops = [
        (Write("uf", "upper"), Ok(())),
        (Rename2("uf", "ug", WHITEOUT_FLAG), Ok(())),
        // An unprivileged caller may (Linux 5.8 and later); the device is the caller's.
        (As(USER, RENAME_WHITEOUT_PY), Ok(())),
        (Rename2("lf", "lf2", WHITEOUT_FLAG), Ok(())),
        (Rename2("lg", "lh", WHITEOUT_FLAG), Ok(())),
        (Mkdir("ud"), Ok(())),
        (Write("ud/in", "i"), Ok(())),
        (Rename2("ud", "ud2", WHITEOUT_FLAG), Ok(())),
        (
            Rename2("lh", "lf2", WHITEOUT_FLAG | EXCHANGE),
            Err(libc::EINVAL),
        ),
        (Rename2("missing", "x", WHITEOUT_FLAG), Err(libc::ENOENT)),
        (
            Rename2("lh", "ug", WHITEOUT_FLAG | NOREPLACE),
            Err(libc::EEXIST),
        ),
    ];
    // The same on a plain ext4 directory holding what the view shows.
    let plain = l.mkdir("plain");
    for (f, c) in [("lf", "lower"), ("lg", "lower g"), ("lh", "lower h")] {
        fs::write(plain.join(f), c).unwrap();
    }
    fs::create_dir(plain.join("pub")).unwrap();
    let open = std::os::unix::fs::PermissionsExt::from_mode(0o777);
    fs::set_permissions(plain.join("pub"), open).unwrap();
    fs::write(plain.join("pub/mine"), "m").unwrap();
    std::os::unix::fs::chown(plain.join("pub/mine"), Some(USER), Some(USER)).unwrap();
    let on_ext4 = apply(&plain, &ops);
    let expected: Vec<Result<(), i32>> = ops.iter().map(|(_, r)| *r).collect();
    assert_eq!(on_ext4, expected, "ext4's results");
    let m = run_union(&l, &ops);
    let names = [
        "uf",
        "ug",
        "lf",
        "lf2",
        "lg",
        "lh",
        "ud",
        "ud2",
        "ud2/in",
        "pub/mine",
        "pub/moved",
    ];
    for n in names {
        assert_eq!(
            entry(&m.path(n)),
            entry(&plain.join(n)),
            "{n}: the view against ext4"
        );
    }
    // The devices' owners and modes (S_IFCHR with no permission bits).
    for n in ["uf", "lf", "lg", "ud", "pub/mine"] {
        let (v, e) = (
            fs::symlink_metadata(m.path(n)).unwrap(),
            fs::symlink_metadata(plain.join(n)).unwrap(),
        );
        assert_eq!(
            (v.mode(), v.uid(), v.gid()),
            (e.mode(), e.uid(), e.gid()),
            "{n}: owner and mode"
        );
    }
    assert_eq!(owner(&m.path("pub/mine")), (USER, USER, 0));
    for n in ["ug", "lf2", "lh", "ud2/in"] {
        assert_eq!(
            fs::read_to_string(m.path(n)).unwrap(),
            fs::read_to_string(plain.join(n)).unwrap(),
            "{n}"
        );
    }
    assert_eq!(m.ls(""), {
        let mut v: Vec<String> = fs::read_dir(&plain)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    });
    // In the upper, the devices are stand-ins, not whiteouts: nothing is hidden.
    for n in ["uf", "lf", "lg", "ud"] {
        assert_eq!(
            entry(&m.upper_path(n)),
            Some(('c', libc::makedev(0, 0xfffff))),
            "upper {n}"
        );
    }
}

/// Kernel overlayfs mounted on `m`'s `in/mnt`, over its `in/lo`, with its upper and work
/// directories `in/up` and `in/wk` (made if missing) on `m`.
fn nested_kernel_overlayfs(m: &Mount) -> Mount {
    let lower = m.path("in/lo").display().to_string();
    let (up, wk, mnt) = (m.path("in/up"), m.path("in/wk"), m.path("in/mnt"));
    for d in [&up, &wk, &mnt] {
        fs::create_dir_all(d).unwrap();
    }
    Mount::kernel(&lower, &up, &wk, &mnt, &[])
}

/// Kernel overlayfs mounted with its upper and work directories on unionmount (it needs
/// RENAME_WHITEOUT, whiteout devices and its own `trusted.overlay.*` xattrs of its upper):
/// deletes, an opaque directory and a copied-up rename work, and survive a remount.
#[test]
fn kernel_overlayfs_nests_on_the_mount() {
    let l = Layers::new(1);
    l.lower(0)
        .file("in/lo/b", "b")
        .file("in/lo/c", "c\n")
        .file("in/lo/dd/a", "a");
    let m = l.mount("u");
    let n = nested_kernel_overlayfs(&m);
    fs::remove_dir_all(n.path("dd")).unwrap();
    fs::create_dir(n.path("dd")).unwrap();
    fs::write(n.path("dd/n"), "n").unwrap();
    fs::remove_file(n.path("b")).unwrap();
    fs::rename(n.path("c"), n.path("c2")).unwrap();
    n.append("c2", "more\n");
    let check = |n: &Mount, what: &str| {
        assert_eq!(n.ls(""), vec!["c2", "dd"], "{what}");
        assert_eq!(n.ls("dd"), vec!["n"], "{what}");
        assert_eq!(n.read("c2"), "c\nmore\n", "{what}");
    };
    check(&n, "nested view");
    drop(n);
    // What the nested upper holds, seen through unionmount: its whiteouts and marker.
    assert_eq!(entry(&m.path("in/up/b")), WHITEOUT);
    assert_eq!(entry(&m.path("in/up/c")), WHITEOUT);
    assert_eq!(
        get_xattr(&m.path("in/up/dd"), "trusted.overlay.opaque"),
        Ok(b"y".to_vec())
    );
    let n = nested_kernel_overlayfs(&m);
    check(&n, "nested view after a remount");
}

/// Kernel overlayfs nested on the mount copies files up with their set-ID bits and
/// capability, as on ext4: it sets the copy's size and owner after them, which drops nothing
/// there (the daemon puts back what its own ftruncate and fchown drop). A chown(2) through
/// the nested overlay still drops them.
#[test]
fn kernel_overlayfs_nested_on_the_mount_keeps_set_id_bits_and_capabilities() {
    // Permitted: CAP_NET_RAW.
    let cap = file_capability(13);
    let l = Layers::new(1);
    l.lower(0)
        .file("in/lo/suid", "s")
        .chmod("in/lo/suid", 0o4755)
        .file("in/lo/sgid", "g")
        .chmod("in/lo/sgid", 0o2755)
        .file("in/lo/cap", "c")
        .xattr("in/lo/cap", "security.capability", &cap);
    let m = l.mount("u");
    let n = nested_kernel_overlayfs(&m);
    for name in ["suid", "sgid", "cap"] {
        // touch: an open without O_TRUNC, then the times.
        fs::OpenOptions::new()
            .write(true)
            .open(n.path(name))
            .unwrap();
        assert!(m.path("in/up").join(name).exists(), "{name} copied up");
    }
    let mode = |p: &Path| fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&n.path("suid")), 0o4755);
    assert_eq!(mode(&n.path("sgid")), 0o2755);
    assert_eq!(
        get_xattr(&n.path("cap"), "security.capability"),
        Ok(cap.clone())
    );
    assert_eq!(mode(&m.path("in/up/suid")), 0o4755, "in the nested upper");
    std::os::unix::fs::chown(n.path("suid"), Some(1), Some(1)).unwrap();
    std::os::unix::fs::chown(n.path("cap"), Some(1), Some(1)).unwrap();
    assert_eq!(mode(&n.path("suid")), 0o755, "a chown drops set-user-ID");
    assert_eq!(
        get_xattr(&n.path("cap"), "security.capability"),
        Err(libc::ENODATA),
        "a chown drops the capability"
    );
}

/// Listing a directory through the view times an access of its upper directory, by the
/// upper's mount rules (relatime here), as kernel overlayfs does: a merged directory and one
/// only in the upper take the listing's time; a directory only in a lower layer keeps its
/// times there; a lookup is no listing; a `noatime`, `nodiratime` or read-only view times
/// nothing. (The times are set on the upper between two mounts: kernel overlayfs decides
/// from the times it read at lookup.)
#[test]
fn listings_time_the_upper_directory() {
    const OLD_ATIME: i64 = 1_000_000_000;
    const OLD_MTIME: i64 = 1_100_000_000;
    let lstat = |p: &Path| fs::symlink_metadata(p).unwrap();
    let l = Layers::new(1);
    l.lower(0)
        .file("merged/a", "a")
        .file("lower/b", "b")
        .times("lower", OLD_ATIME, OLD_MTIME);
    let cases: [(&[&str], bool); 4] = [
        (&[], true),
        (&["noatime"], false),
        (&["nodiratime"], false),
        (&["ro"], false),
    ];
    for (i, (opts, timed)) in cases.into_iter().enumerate() {
        for kernel in [true, false] {
            let name = format!("{}{i}", if kernel { "k" } else { "u" });
            let mount = |opts: &[&str]| match kernel {
                true => l.mount_kernel_with(&name, opts),
                false if opts.is_empty() => l.mount_with(&name, &[]),
                false => l.mount_with(&name, &["-o", &opts.join(",")]),
            };
            let m = mount(&[]);
            fs::write(m.path("merged/new"), "n").unwrap();
            fs::create_dir(m.path("made")).unwrap();
            fs::create_dir(m.path("looked")).unwrap();
            fs::write(m.path("looked/f"), "f").unwrap();
            drop(m);
            let upper = l.root().join(&name).join("upper");
            for d in ["merged", "made", "looked"] {
                set_times(&upper.join(d), OLD_ATIME, OLD_MTIME);
            }
            let m = mount(opts);
            for d in ["merged", "made", "lower"] {
                assert!(fs::read_dir(m.path(d)).unwrap().count() <= 2, "{d}");
            }
            let _ = fs::symlink_metadata(m.path("looked/f"));
            let _ = fs::symlink_metadata(m.path("looked/nothing"));
            let t = [
                lstat(&upper.join("merged")).atime(),
                lstat(&upper.join("made")).atime(),
                lstat(&l.lower(0).path("lower")).atime(),
                lstat(&upper.join("looked")).atime(),
            ];
            let listed = |t: i64| t > OLD_MTIME;
            assert_eq!(
                (listed(t[0]), listed(t[1]), t[2], t[3]),
                (timed, timed, OLD_ATIME, OLD_ATIME),
                "{name} {opts:?}: atimes of upper merged, upper made, lower, upper looked-up: {t:?}"
            );
        }
    }
}
