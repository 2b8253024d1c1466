mod common;
use common::*;

// unionmount against kernel overlayfs as the oracle: the same operations on the same lowers
// give the same results (values and errnos), the same merged tree and the same upper on disk;
// an upper written by one mounts under the other with the same view; and a remount of
// unionmount shows what it showed before.

use std::collections::BTreeMap;
use std::ffi::{CString, OsString};
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

// ---------------------------------------------------------------------------------------
// Operations
// ---------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
enum Op {
    /// Create or truncate, then write.
    Write(&'static str, &'static str),
    /// Open O_APPEND (no create) and write.
    Append(&'static str, &'static str),
    Truncate(&'static str, i64),
    Mkdir(&'static str),
    Rmdir(&'static str),
    Unlink(&'static str),
    Rename(&'static str, &'static str),
    /// (target, path)
    Symlink(&'static str, &'static str),
    /// (existing, new)
    Link(&'static str, &'static str),
    /// chmod(2): follows symlinks.
    Chmod(&'static str, u32),
    /// lchown(2).
    Chown(&'static str, u32, u32),
    /// lsetxattr(path, name, value, 0).
    SetXattr(&'static str, &'static str, &'static str),
    Mkfifo(&'static str),
}

use Op::*;

fn cs(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

fn rc(r: libc::c_int) -> Result<(), i32> {
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
    let p = |r: &str| root.join(r);
    // SAFETY (all unsafe blocks below): plain syscalls on NUL-terminated paths/strings.
    match op {
        Write(f, data) => io(fs::write(p(f), data)),
        Append(f, data) => io(OpenOptions::new()
            .append(true)
            .open(p(f))
            .and_then(|mut h| h.write_all(data.as_bytes()))),
        Truncate(f, len) => rc(unsafe { libc::truncate(cs(&p(f)).as_ptr(), len) }),
        Mkdir(d) => io(fs::create_dir(p(d))),
        Rmdir(d) => io(fs::remove_dir(p(d))),
        Unlink(f) => io(fs::remove_file(p(f))),
        Rename(a, b) => io(fs::rename(p(a), p(b))),
        Symlink(target, f) => io(std::os::unix::fs::symlink(target, p(f))),
        Link(a, b) => io(fs::hard_link(p(a), p(b))),
        Chmod(f, mode) => rc(unsafe { libc::chmod(cs(&p(f)).as_ptr(), mode) }),
        Chown(f, uid, gid) => rc(unsafe { libc::lchown(cs(&p(f)).as_ptr(), uid, gid) }),
        SetXattr(f, name, value) => {
            let n = CString::new(name).unwrap();
            rc(unsafe {
                libc::lsetxattr(
                    cs(&p(f)).as_ptr(),
                    n.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    0,
                )
            })
        }
        Mkfifo(f) => rc(unsafe { libc::mkfifo(cs(&p(f)).as_ptr(), 0o644) }),
    }
}

/// Applies `ops` in order under `root`; each result as Ok or the errno.
fn apply(root: &Path, ops: &[Op]) -> Vec<Result<(), i32>> {
    ops.iter().map(|&op| apply_one(root, op)).collect()
}

// ---------------------------------------------------------------------------------------
// Layers and comparison
// ---------------------------------------------------------------------------------------

/// Lowers in formats kernel overlayfs reads (char 0/0 whiteouts, trusted.overlay.opaque):
/// shadowed files, merged directories, an opaque directory, whiteouts, a hard link, a
/// symlink, a fifo and user xattrs.
fn layers() -> Layers {
    let l = Layers::new(3);
    l.lower(0)
        .file("shadow", "0 wins")
        .file("m/a", "a")
        .xattr("m/a", "user.k", b"v")
        .xattr("m", "user.dir", b"m")
        .whiteout("m/b")
        .opaque_xattr("o", "trusted.overlay.opaque")
        .file("o/x", "x")
        .file("h1", "hard")
        .hardlink("h1", "hd/h2")
        .symlink("ln", "shadow")
        .fifo("p")
        .whiteout("gone")
        .chmod("shadow", 0o640);
    l.lower(1)
        .file("shadow", "1 loses")
        .file("m/b", "b hidden")
        .file("m/c", "c")
        .file("m/e", "e")
        .file("gone", "hidden")
        .file("o/y", "y hidden")
        .file("d1/f", "f")
        .dir("d2")
        .file("ld/x/y", "deep")
        .file("f1", "f1")
        .xattr("f1", "user.f", b"1");
    l.lower(2)
        .file("m/sub/deep", "2")
        .file("bottom", "2")
        .file("ld/z", "z");
    age_all(&l);
    l
}

/// The merged tree with the mtimes that both sides set during the test (anything newer
/// than OLD on both) blanked out; older mtimes (kept from the lowers) are compared.
fn merged_trees(a: &Path, b: &Path) -> (BTreeMap<String, Obj>, BTreeMap<String, Obj>) {
    let o = TreeOpts::default();
    let mut ta = tree(a, &o);
    let mut tb = tree(b, &o);
    for (k, va) in ta.iter_mut() {
        if let Some(vb) = tb.get_mut(k) {
            if va.mtime > OLD && vb.mtime > OLD {
                va.mtime = 0;
                vb.mtime = 0;
            }
        }
    }
    (ta, tb)
}

/// The overlay xattrs that define the view (kernel overlayfs also writes bookkeeping ones,
/// origin/impure/uuid, which unionmount need not).
fn view_xattr(name: &str) -> bool {
    ["opaque", "redirect", "metacopy", "whiteout", "protattr"]
        .iter()
        .any(|s| name == format!("trusted.overlay.{s}") || name == format!("user.overlay.{s}"))
}

/// Each entry of an upper: kind, rdev, owner (uid, gid) and the overlay xattrs that define
/// the view.
type UpperEntry = (char, u64, (u32, u32), Vec<String>);

fn upper_tree(root: &Path) -> BTreeMap<String, UpperEntry> {
    raw_tree(root)
        .into_iter()
        .map(|(k, (kind, rdev, xs))| {
            let md = fs::symlink_metadata(root.join(&k)).unwrap();
            let xs = xs.into_iter().filter(|x| view_xattr(x)).collect();
            (k, (kind, rdev, (md.uid(), md.gid()), xs))
        })
        .collect()
}

fn assert_same_upper(k: &Path, u: &Path, what: &str) {
    let (tk, tu) = (upper_tree(k), upper_tree(u));
    let mut diffs = Vec::new();
    for name in tk.keys().chain(tu.keys().filter(|n| !tk.contains_key(*n))) {
        let (a, b) = (tk.get(name), tu.get(name));
        if a != b {
            diffs.push(format!("  {name:?}: kernel {a:?}, unionmount {b:?}"));
        }
    }
    assert!(
        diffs.is_empty(),
        "{what}: uppers on disk differ (kind, rdev, owner, overlay xattrs):\n{}",
        diffs.join("\n")
    );
}

/// Asserts equal per-operation results, listing every difference.
fn assert_same_results(ops: &[Op], k: &[Result<(), i32>], u: &[Result<(), i32>], what: &str) {
    let diffs: Vec<String> = ops
        .iter()
        .zip(k)
        .zip(u)
        .filter(|((_, a), b)| a != b)
        .map(|((op, a), b)| format!("  {op:?}: kernel {a:?}, unionmount {b:?}"))
        .collect();
    assert!(
        diffs.is_empty(),
        "{what}: results differ:\n{}",
        diffs.join("\n")
    );
}

/// Asserts that unionmount's rows (`got`) are kernel overlayfs's (`want`), row by row.
fn assert_rows_match<T: PartialEq + std::fmt::Debug>(want: &[T], got: &[T]) {
    assert_eq!(want.len(), got.len(), "as many rows");
    for (w, g) in want.iter().zip(got) {
        eprintln!("kernel: {w:?}");
        assert_eq!(w, g, "unionmount (right) against kernel overlayfs (left)");
    }
}

/// unionmount over `l` with passthrough and on the page-cached path, each mount's `rows`
/// against `want` (kernel overlayfs's).
fn assert_both_paths_match<T: PartialEq + std::fmt::Debug>(
    l: &Layers,
    want: &[T],
    rows: impl Fn(&Mount) -> Vec<T>,
) {
    for (name, path) in [("u", "on"), ("c", "off")] {
        let u = l.mount_with(name, &["--passthrough", path]);
        assert_rows_match(want, &rows(&u));
    }
}

/// Mounts both over the same lowers, applies `ops` to each, and compares results, merged
/// trees and uppers.
fn run_both(l: &Layers, ops: &[Op], what: &str) {
    let k = l.mount_kernel("k");
    let u = l.mount("u");
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, &format!("{what}: before any operation"));

    let rk = apply(&k.merged, ops);
    let ru = apply(&u.merged, ops);
    for (op, r) in ops.iter().zip(&rk) {
        eprintln!("{what}: {op:?} -> kernel {r:?}");
    }
    assert_same_results(ops, &rk, &ru, what);
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, &format!("{what}: merged (kernel, unionmount)"));
    assert_same_upper(&k.upper_path(""), &u.upper_path(""), what);
}

/// unionmount on explicit upper/work under `base`.
fn union_at(l: &Layers, upper: &Path, work: &Path, merged: &Path) -> Mount {
    for d in [upper, work, merged] {
        fs::create_dir_all(d).unwrap();
    }
    let args: Vec<OsString> = vec![
        "--lower".into(),
        l.lowerdir_opt().into(),
        "--upper".into(),
        upper.into(),
        "--work".into(),
        work.into(),
        merged.into(),
    ];
    Mount::union(
        &args,
        merged.to_path_buf(),
        Some(upper.to_path_buf()),
        Some(work.to_path_buf()),
    )
}

/// Kernel overlayfs on explicit upper/work.
fn kernel_at(l: &Layers, upper: &Path, work: &Path, merged: &Path) -> Mount {
    kernel_at_with(l, upper, work, merged, &[])
}

/// `kernel_at` with mount options (`metacopy=on`, `redirect_dir=on`).
fn kernel_at_with(l: &Layers, upper: &Path, work: &Path, merged: &Path, opts: &[&str]) -> Mount {
    for d in [upper, work, merged] {
        fs::create_dir_all(d).unwrap();
    }
    Mount::kernel(&l.lowerdir_opt(), upper, work, merged, opts)
}

/// Kernel overlayfs (`kernel`) or unionmount over `l`, with options `extra` of the one
/// mounted, for the tests that run one sequence on both.
fn mount_either(l: &Layers, name: &str, kernel: bool, extra: &[&str]) -> Mount {
    if kernel {
        l.mount_kernel_with(name, extra)
    } else {
        l.mount_with(name, extra)
    }
}

fn assert_no_private_xattrs(root: &Path) {
    for k in tree(root, &TreeOpts::default()).keys() {
        let xs = list_xattrs(&root.join(k));
        assert!(
            xs.iter().all(|x| !x.contains("overlay")),
            "{k:?} lists private xattrs: {xs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Operation sequences
// ---------------------------------------------------------------------------------------

const DELETE_RECREATE: &[Op] = &[
    Unlink("shadow"),
    Write("shadow", "new"),
    Unlink("m/a"),
    Write("m/a", "again"),
    Unlink("m/c"),
    Mkdir("m/c"),
    Write("m/c/inside", "i"),
    Unlink("ln"),
    Symlink("m/a", "ln"),
    Unlink("p"),
    Mkfifo("p"),
    Unlink("gone"),
    Write("gone", "back"),
    Unlink("h1"),
    Write("h1", "new h1"),
    Unlink("hd/h2"),
    Unlink("f1"),
    Unlink("f1"),
    Symlink("x", "f1"),
    Unlink("m/b"),
    Write("m/b", "b is back"),
    Unlink("o/x"),
    Write("o/y", "y new"),
    Rmdir("d2"),
    Write("d2", "now a file"),
    Unlink("d1/f"),
    Rmdir("d1"),
    Symlink("shadow", "d1"),
    Unlink("bottom"),
    Mkfifo("bottom"),
    Unlink("ld/z"),
    Write("ld/z", "z2"),
];

#[test]
fn deletes_then_recreates() {
    run_both(&layers(), DELETE_RECREATE, "delete/recreate");
}

const RENAMES: &[Op] = &[
    Rename("shadow", "m/shadow2"),
    Rename("m/c", "d1/c"),
    Rename("o/x", "x"),
    Rename("m", "m2"),
    Rename("d2", "d3"),
    Rename("ld", "m/ld"),
    Rename("ld/x", "ldx"),
    Mkdir("new"),
    Write("new/f", "nf"),
    Rename("new", "m/new"),
    Rename("m/new", "d1/new"),
    Rename("m/b", "z"),
    Rename("ln", "d1/ln"),
    Rename("p", "d1/p"),
    Rename("h1", "hd/h1moved"),
    Rename("d1/f", "m/a"),
    Rename("f1", "d2"),
    Rename("d1/new", "f1"),
    Mkdir("e"),
    Rename("e", "m"),
    Rename("e", "d2"),
    Rename("x", "x"),
    Rename("m/a", "m/a"),
    Write("shadow", "recreated after rename"),
    Rename("bottom", "ld/x/bottom"),
    Rename("x", "gone"),
    Rename("m/sub/deep", "m/sub/deeper"),
    Rename("hd/h2", "m/sub/h2"),
];

#[test]
fn renames_across_directories() {
    run_both(&layers(), RENAMES, "renames");
}

const DIR_RECREATE: &[Op] = &[
    Unlink("d1/f"),
    Rmdir("d1"),
    Mkdir("d1"),
    Write("d1/g", "g"),
    Rmdir("m"),
    Unlink("m/a"),
    Unlink("m/c"),
    Rmdir("m"),
    Unlink("m/sub/deep"),
    Rmdir("m/sub"),
    Rmdir("m"),
    Mkdir("m"),
    Write("m/new", "n"),
    Unlink("o/x"),
    Rmdir("o"),
    Mkdir("o"),
    Rmdir("d2"),
    Mkdir("d2"),
    Rmdir("ld"),
    Unlink("ld/x/y"),
    Rmdir("ld/x"),
    Unlink("ld/z"),
    Rmdir("ld"),
    Mkdir("ld"),
    Mkdir("ld/x"),
    Rmdir("hd"),
    Rmdir("shadow"),
    Unlink("m"),
    Unlink("d1/g"),
    Rmdir("d1"),
    Write("d1", "a file now"),
    Rmdir("d2"),
    Mkdir("d2"),
    Mkdir("d2/sub"),
];

/// Lowers with kernel overlayfs's xattr whiteouts (Linux 6.7 and later, as composefs-style
/// layers carry them): in a directory whose `overlay.opaque` is `x`, an empty regular file
/// with `overlay.whiteout` hides its name below.
fn xwhiteout_layers() -> Layers {
    let l = Layers::new(2);
    l.lower(0)
        .dir("x")
        .xattr("x", "trusted.overlay.opaque", b"x")
        .file("x/gone", "")
        .xattr("x/gone", "trusted.overlay.whiteout", b"")
        .file("x/sub", "")
        .xattr("x/sub", "trusted.overlay.whiteout", b"")
        .file("x/empty", "")
        .file("x/kept", "k");
    l.lower(1)
        .file("x/gone", "hidden")
        .file("x/sub/deep", "hidden")
        .file("x/below", "b");
    age_all(&l);
    l
}

const XWHITEOUT_OPS: &[Op] = &[
    Unlink("x/gone"),
    Mkdir("x/sub"),
    Write("x/sub/new", "n"),
    Write("x/gone", "again"),
    Unlink("x/empty"),
    Rename("x/kept", "x/kept2"),
    Unlink("x/below"),
    Unlink("x/gone"),
    Unlink("x/sub/new"),
    Rmdir("x/sub"),
    Rename("x/kept2", "x/sub"),
    Rmdir("x"),
];

#[test]
fn xattr_whiteouts_hide_as_on_kernel_overlayfs() {
    run_both(&xwhiteout_layers(), XWHITEOUT_OPS, "xattr whiteouts");
}

/// Outside a directory marked `x`, a file with `overlay.whiteout` is a file, in the listing
/// and to `lstat` alike. (Kernel overlayfs lists it there but answers ENOENT to a lookup once
/// any directory of its layer is marked: it checks the xattr layer-wide on lookup and only in
/// marked directories on readdir.)
#[test]
fn a_whiteout_xattr_outside_a_marked_directory_is_a_file() {
    let l = xwhiteout_layers();
    l.lower(0)
        .file("y/notwh", "")
        .xattr("y/notwh", "trusted.overlay.whiteout", b"");
    l.lower(1).file("y/notwh", "below").file("y/other", "o");
    let m = l.mount("u");
    assert_eq!(names(&m.path("y")), ["notwh", "other"]);
    let md = fs::symlink_metadata(m.path("y/notwh")).unwrap();
    assert!(md.is_file() && md.len() == 0, "{md:?}");
    assert_eq!(names(&m.path("x")), ["below", "empty", "kept"]);
}

#[test]
fn directory_deleted_and_recreated_is_opaque() {
    run_both(&layers(), DIR_RECREATE, "dir recreate");
}

const METADATA_AND_LINKS: &[Op] = &[
    Chmod("shadow", 0o600),
    Chown("m/a", 1234, 1234),
    SetXattr("m/a", "user.new", "v"),
    SetXattr("m", "user.dir", "d"),
    SetXattr("o", "user.o", "1"),
    Truncate("shadow", 1),
    Append("m/c", "more"),
    Chmod("ln", 0o604),
    Chown("ln", 1234, 1234),
    Chown("p", 1234, 1234),
    Chmod("p", 0o600),
    Link("h1", "h3"),
    Link("shadow", "m/shadowlink"),
    Link("m", "mlink"),
    Chmod("d1", 0o700),
    Chmod("ld/x", 0o711),
    Truncate("m", 0),
    SetXattr("ln", "user.x", "1"),
    SetXattr("p", "user.x", "1"),
    Mkfifo("p"),
    Mkfifo("m/fifo2"),
    Append("missing", "x"),
    Truncate("f1", 10000),
    SetXattr("f1", "user.f", "changed"),
    Chmod("gone", 0o600),
    Link("m/b", "m/b2"),
    Symlink("t", "shadow"),
    Mkdir("o/y"),
    Write("hd/h2", "via h2"),
    Chown("bottom", 4321, 4321),
    Link("bottom", "o/bottom"),
];

/// Whiteouts in a set-group-ID directory: one for a name only a lower layer has keeps the
/// mounter's group (kernel overlayfs makes it in the work directory and moves it there), the
/// one a rename leaves (`RENAME_WHITEOUT`, made in place by the upper filesystem) takes the
/// directory's group, and a rename onto a whiteout swaps the two names, so the target's
/// whiteout, with its owner, is what is left at the old name.
const SET_GROUP_ID_DIR: &[Op] = &[
    Chown("m", 0, 1000),
    Chmod("m", 0o2777),
    Unlink("m/c"),
    Rename("m/a", "m/a2"),
    Unlink("f1"),
    Rename("m/e", "f1"),
    Unlink("m/sub/deep"),
    Rmdir("m/sub"),
    Mkdir("m/new"),
    Write("m/new/f", "f"),
];

#[test]
fn whiteouts_in_a_set_group_id_directory() {
    run_both(&layers(), SET_GROUP_ID_DIR, "set-group-ID directory");
}

#[test]
fn metadata_changes_and_links() {
    run_both(&layers(), METADATA_AND_LINKS, "metadata/links");
}

const ERRORS: &[Op] = &[
    Unlink("m"),
    Rmdir("shadow"),
    Mkdir("shadow"),
    Mkdir("m"),
    Rmdir("m/b"),
    Write("m/b/x", "x"),
    Write("shadow/x", "x"),
    Mkdir("gone/sub"),
    Rename("m", "m/sub/inside"),
    Rename("missing", "x"),
    Rename("shadow", "missing/x"),
    Rename("hd", "shadow"),
    Link("missing", "x"),
    Link("shadow", "ln"),
    Symlink("t", "m"),
    Truncate("o", 0),
    Truncate("missing", 0),
    Chown("missing", 1, 1),
    Chmod("o/y", 0o600),
    SetXattr("missing", "user.a", "b"),
    Rmdir("o/y"),
    Unlink("o/y"),
    Rmdir("hd/h2"),
    Mkdir("o/x"),
    Mkdir("d1/f/g"),
];

#[test]
fn errors_match() {
    run_both(&layers(), ERRORS, "errors");
}

// ---------------------------------------------------------------------------------------
// Interchange and remount
// ---------------------------------------------------------------------------------------

/// Every sequence at once (their errors are fine: both sides give the same ones).
fn all_ops() -> Vec<Op> {
    let mut v = DELETE_RECREATE.to_vec();
    v.extend_from_slice(&[
        Rename("m/a", "m/sub/a"),
        Rename("h1", "o/h1"),
        Mkdir("o/nd"),
        Write("o/nd/f", "f"),
        Rename("o/nd", "hd/nd"),
        Chmod("shadow", 0o600),
        Chown("m/sub/deep", 1234, 1234),
        SetXattr("m/c/inside", "user.i", "1"),
        SetXattr("m", "user.dir", "changed"),
        Link("m/sub/a", "m/sub/a2"),
        Truncate("ld/x/y", 2),
        Unlink("m/sub/deep"),
        Rmdir("m/sub"),
        Mkdir("m/sub"),
    ]);
    v
}

/// An upper left by unionmount, mounted with kernel overlayfs (new workdir), shows what
/// unionmount showed.
#[test]
fn union_upper_under_kernel() {
    let l = layers();
    let base = l.mkdir("x");
    let (upper, merged) = (base.join("upper"), base.join("merged"));
    let mut u = union_at(&l, &upper, &base.join("work"), &merged);
    let ops = all_ops();
    let r = apply(&u.merged, &ops);
    // The results themselves are checked against the kernel elsewhere; here make sure the
    // sequence really changed things.
    assert!(r.iter().filter(|x| x.is_ok()).count() > 30, "{r:?}");
    let o = TreeOpts::default();
    let seen = tree(&u.merged, &o);
    u.unmount();
    assert!(!is_mounted(&merged));
    let k = kernel_at(&l, &upper, &base.join("kwork"), &base.join("kmerged"));
    assert_same_tree(
        &seen,
        &tree(&k.merged, &o),
        "unionmount's upper under kernel",
    );
}

/// An upper written by kernel overlayfs, mounted with unionmount, shows what the kernel
/// showed, without the kernel's private xattrs.
#[test]
fn kernel_upper_under_union() {
    let l = layers();
    let base = l.mkdir("x");
    let (upper, merged) = (base.join("upper"), base.join("merged"));
    let mut k = kernel_at(&l, &upper, &base.join("work"), &merged);
    let ops = all_ops();
    let r = apply(&k.merged, &ops);
    assert!(r.iter().filter(|x| x.is_ok()).count() > 30, "{r:?}");
    let o = TreeOpts::default();
    let seen = tree(&k.merged, &o);
    k.unmount();
    assert!(!is_mounted(&merged));
    let u = union_at(&l, &upper, &base.join("uwork"), &base.join("umerged"));
    assert_same_tree(
        &seen,
        &tree(&u.merged, &o),
        "kernel's upper under unionmount",
    );
    assert_no_private_xattrs(&u.merged);
}

/// Copies a directory tree with its xattrs, device nodes and hard links.
fn copy_tree(from: &Path, to: &Path) {
    let st = Command::new("cp")
        .arg("-a")
        .arg(from)
        .arg(to)
        .status()
        .unwrap();
    assert!(st.success(), "cp -a");
}

/// An upper written by the kernel is then changed further by both: unionmount on it, the
/// kernel on an identical copy; results, trees and uppers agree.
#[test]
fn kernel_upper_continued_by_both() {
    let l = layers();
    let base = l.mkdir("x");
    let mut k = kernel_at(
        &l,
        &base.join("upper"),
        &base.join("work"),
        &base.join("merged"),
    );
    apply(&k.merged, &all_ops());
    k.unmount();
    let ku: PathBuf = base.join("kupper");
    copy_tree(&base.join("upper"), &ku);
    assert_same_upper(&base.join("upper"), &ku, "cp -a copy");

    let k = kernel_at(&l, &ku, &base.join("kwork"), &base.join("kmerged"));
    let u = union_at(
        &l,
        &base.join("upper"),
        &base.join("uwork"),
        &base.join("umerged"),
    );
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, "before continuing");
    let more: &[Op] = &[
        Unlink("shadow"),
        Rmdir("m/c"),
        Unlink("m/c/inside"),
        Rmdir("m/c"),
        Write("m/c", "file again"),
        Unlink("gone"),
        Rmdir("m/sub"),
        Rename("m/sub", "msub"),
        Mkdir("m/sub/again"),
        Unlink("m/sub/a2"),
        Rename("m/sub/a", "top_a"),
        Rename("hd/nd", "nd2"),
        Rmdir("o"),
        Unlink("o/h1"),
        Rmdir("o"),
        Mkdir("o"),
        SetXattr("d2", "user.d2", "x"),
        Chmod("ld/x", 0o700),
        Rename("ld", "ld2"),
    ];
    let rk = apply(&k.merged, more);
    let ru = apply(&u.merged, more);
    assert_same_results(more, &rk, &ru, "continued");
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, "after continuing");
    assert_same_upper(&ku, &base.join("upper"), "after continuing");
}

/// Unmount unionmount and mount it again on the same upper and work: the same tree.
#[test]
fn remount_shows_same_tree() {
    let l = layers();
    let base = l.mkdir("x");
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    let mut u = union_at(&l, &upper, &work, &merged);
    let r = apply(&u.merged, &all_ops());
    assert!(r.iter().filter(|x| x.is_ok()).count() > 30, "{r:?}");
    let o = TreeOpts::default();
    let seen = tree(&u.merged, &o);
    let files: Vec<(String, u64)> = seen
        .keys()
        .map(|k| {
            (
                k.clone(),
                fs::symlink_metadata(u.path(k)).unwrap().mode() as u64,
            )
        })
        .collect();
    u.unmount();
    assert!(!is_mounted(&merged));
    let u2 = union_at(&l, &upper, &work, &merged);
    assert_same_tree(&seen, &tree(&u2.merged, &o), "after remount");
    for (k, mode) in files {
        assert_eq!(
            fs::symlink_metadata(u2.path(&k)).unwrap().mode() as u64,
            mode,
            "{k:?}: file type/mode after remount"
        );
    }
    // And it still works: a change after the remount.
    fs::write(u2.path("after"), "x").unwrap();
    assert_eq!(fs::read(u2.upper_path("after")).unwrap(), b"x");
}

// ---------------------------------------------------------------------------------------
// Inode flags (lsattr/chattr)
// ---------------------------------------------------------------------------------------

/// What one mount shows of inode flags and what changing them does, as (what, result) rows.
fn inode_flag_rows(m: &Mount) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut row =
        |what: &str, r: &dyn std::fmt::Debug| rows.push((what.to_string(), format!("{r:?}")));
    for name in ["", "d", "d/noatime", "d/plain", "d/sub", "d/fifo"] {
        row(&format!("flags of {name:?}"), &get_flags(&m.path(name)));
    }
    row("xflags of d/noatime", &get_xflags(&m.path("d/noatime")));
    // Copy-ups carry FS_SYNC_FL and FS_NOATIME_FL, not FS_NODUMP_FL.
    row(
        "chmod d/noatime",
        &io(fs::set_permissions(
            m.path("d/noatime"),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )),
    );
    row("copied file", &get_flags(&m.path("d/noatime")));
    row("create in d/sub", &io(fs::write(m.path("d/sub/new"), "n")));
    row("copied directory", &get_flags(&m.path("d/sub")));
    // Set through the view (the file is copied up first).
    row(
        "chattr +d d/plain",
        &add_flags(&m.path("d/plain"), FS_NODUMP_FL),
    );
    row("flags of d/plain", &get_flags(&m.path("d/plain")));
    row(
        "read d/plain",
        &fs::read_to_string(m.path("d/plain")).map_err(|e| e.raw_os_error()),
    );
    // The same through FS_IOC_FSSETXATTR.
    row(
        "fssetxattr nodump d/xflag",
        &add_xflags(&m.path("d/xflag"), FS_XFLAG_NODUMP),
    );
    row("flags of d/xflag", &get_flags(&m.path("d/xflag")));
    // An immutable file refuses every change.
    let frozen = m.path("d/frozen");
    row("chattr +i d/frozen", &add_flags(&frozen, FS_IMMUTABLE_FL));
    row("flags of d/frozen", &get_flags(&frozen));
    row(
        "write d/frozen",
        &io(OpenOptions::new().append(true).open(&frozen)),
    );
    row(
        "chmod d/frozen",
        &io(fs::set_permissions(
            &frozen,
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )),
    );
    row("unlink d/frozen", &io(fs::remove_file(&frozen)));
    row(
        "rename d/frozen",
        &io(fs::rename(&frozen, m.path("d/thawed"))),
    );
    row(
        "chattr -i d/frozen",
        &remove_flags(&frozen, FS_IMMUTABLE_FL),
    );
    row(
        "append d/frozen",
        &io(OpenOptions::new()
            .append(true)
            .open(&frozen)
            .and_then(|mut f| f.write_all(b"+"))),
    );
    row(
        "read d/frozen",
        &fs::read_to_string(&frozen).map_err(|e| e.raw_os_error()),
    );
    row("unlink d/frozen again", &io(fs::remove_file(&frozen)));
    rows
}

/// lsattr/chattr through the view: the flags shown, what a copy-up carries, flags set on
/// the upper copy, and an immutable file refusing changes, as kernel overlayfs.
#[test]
fn inode_flags_match_kernel_overlayfs() {
    let l = Layers::new(1);
    l.lower(0)
        .file("d/noatime", "a")
        .file("d/plain", "p")
        .file("d/frozen", "f")
        .file("d/xflag", "x")
        .dir("d/sub")
        .fifo("d/fifo");
    let lower = l.lower(0);
    add_flags(
        &lower.path("d/noatime"),
        FS_NOATIME_FL | FS_SYNC_FL | FS_NODUMP_FL,
    )
    .unwrap();
    add_flags(&lower.path("d/sub"), FS_NOATIME_FL | FS_NODUMP_FL).unwrap();
    let k = l.mount_kernel("k");
    let want = inode_flag_rows(&k);
    let u = l.mount("u");
    assert_rows_match(&want, &inode_flag_rows(&u));
    // The flags that are no protection flags land on the upper copies alike.
    for name in ["d/noatime", "d/sub", "d/plain", "d/frozen", "d/xflag"] {
        let (kf, uf) = (
            get_flags(&k.upper_path(name)),
            get_flags(&u.upper_path(name)),
        );
        assert_eq!(kf, uf, "{name}: flags in the upper");
    }
    let copied = get_flags(&u.upper_path("d/noatime")).unwrap();
    assert_eq!(
        copied & (FS_NOATIME_FL | FS_SYNC_FL | FS_NODUMP_FL),
        FS_NOATIME_FL | FS_SYNC_FL
    );
    assert_eq!(
        get_flags(&u.upper_path("d/plain")).unwrap() & FS_NODUMP_FL,
        FS_NODUMP_FL
    );
    assert_eq!(
        get_flags(&u.upper_path("d/xflag")).unwrap() & FS_NODUMP_FL,
        FS_NODUMP_FL
    );
}

/// chown, chmod, times and truncate through the fd of a file open for writing (as tar, cp -p
/// and install do), also once the file was renamed or unlinked while open, and with a lower
/// hard link: each call's result and the file's stat afterwards, then the trees.
fn fd_change_rows(root: &Path) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let mut rows = Vec::new();
    for (name, before) in [
        ("f1", None),
        ("m/c", Some("rename")),
        ("bottom", Some("unlink")),
        ("h1", None),
    ] {
        let p = root.join(name);
        let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
        let reader = fs::File::open(&p).unwrap();
        match before {
            Some("rename") => fs::rename(&p, root.join("m/c2")).unwrap(),
            Some("unlink") => fs::remove_file(&p).unwrap(),
            _ => {}
        }
        let fd = f.as_raw_fd();
        let times = [
            libc::timespec {
                tv_sec: OLD + 5,
                tv_nsec: 0,
            },
            libc::timespec {
                tv_sec: OLD + 7,
                tv_nsec: 0,
            },
        ];
        // SAFETY: plain syscalls on an open fd; `times` holds two timespecs.
        let results = [
            rc(unsafe { libc::fchmod(fd, 0o6751) }),
            rc(unsafe { libc::fchown(fd, 1234, 5678) }),
            rc(unsafe { libc::ftruncate(fd, 3) }),
            rc(unsafe { libc::futimens(fd, times.as_ptr()) }),
            rc(unsafe { libc::fchown(fd, u32::MAX, 42) }),
            rc(unsafe { libc::fchmod(fd, 0o4750) }),
        ];
        for md in [f.metadata().unwrap(), reader.metadata().unwrap()] {
            rows.push(format!(
                "{name}: {results:?} mode {:o} owner {}:{} size {} atime {} mtime {}",
                md.mode(),
                md.uid(),
                md.gid(),
                md.len(),
                md.atime(),
                md.mtime()
            ));
        }
    }
    rows
}

#[test]
fn changes_through_a_file_open_for_writing() {
    let l = layers();
    let k = l.mount_kernel("k");
    let u = l.mount("u");
    assert_rows_match(&fd_change_rows(&k.merged), &fd_change_rows(&u.merged));
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, "merged after changes through open files");
    assert_same_upper(
        &k.upper_path(""),
        &u.upper_path(""),
        "changes through open files",
    );
}

/// A file opened read-only before its copy-up, whose copy then loses its name (unlinked, or
/// renamed over): reading, fchmod and fstat through the old fd reach the copy, as in kernel
/// overlayfs, and never the lower file (with passthrough, reading stays on it).
fn stale_reader_rows(root: &Path) -> Vec<String> {
    use std::io::{Read, Seek};
    use std::os::fd::AsRawFd;
    let mut rows = Vec::new();
    for (name, how) in [("f1", "unlink"), ("m/c", "rename over")] {
        let p = root.join(name);
        let mut f = fs::File::open(&p).unwrap();
        // Copy-up by a change of mode, then new data in the copy.
        fs::set_permissions(&p, fs::Permissions::from_mode(0o640)).unwrap();
        fs::write(&p, "changed in the copy").unwrap();
        match how {
            "unlink" => fs::remove_file(&p).unwrap(),
            _ => {
                fs::write(root.join("other"), "other").unwrap();
                fs::rename(root.join("other"), &p).unwrap();
            }
        }
        let mut data = String::new();
        f.seek(std::io::SeekFrom::Start(0)).unwrap();
        let read = f
            .read_to_string(&mut data)
            .map(drop)
            .map_err(|e| e.raw_os_error());
        // SAFETY: plain syscall on an open fd.
        let chmod = rc(unsafe { libc::fchmod(f.as_raw_fd(), 0o604) });
        let md = f.metadata().unwrap();
        rows.push(format!(
            "{name} ({how}): read {read:?} {data:?}, fchmod {chmod:?}, mode {:o}",
            md.mode()
        ));
    }
    rows
}

/// Changes through a file open on a lower file that was deleted since: kernel overlayfs
/// refuses them with EEXIST (its copy-up meets the whiteout at the name), and the lower file
/// stays as it was.
fn deleted_reader_rows(root: &Path, file: &str, then_rmdir: Option<&str>) -> Vec<String> {
    use std::os::fd::AsRawFd;
    let p = root.join(file);
    let f = fs::File::open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    if let Some(d) = then_rmdir {
        fs::remove_dir(root.join(d)).unwrap();
    }
    let fd = f.as_raw_fd();
    let times = [libc::timespec {
        tv_sec: 1_000_000,
        tv_nsec: 0,
    }; 2];
    // SAFETY: plain syscalls on an open fd, with a valid times array and xattr name/value.
    let rows = unsafe {
        [
            ("fchmod", rc(libc::fchmod(fd, 0o600))),
            ("fchown", rc(libc::fchown(fd, 1, 1))),
            ("futimens", rc(libc::futimens(fd, times.as_ptr()))),
            (
                "fsetxattr",
                rc(libc::fsetxattr(
                    fd,
                    c"user.k".as_ptr(),
                    b"v".as_ptr().cast(),
                    1,
                    0,
                )),
            ),
        ]
    };
    let md = f.metadata().unwrap();
    let mut out: Vec<String> = rows.iter().map(|(op, r)| format!("{op}: {r:?}")).collect();
    out.push(format!("fstat mode {:o} nlink {}", md.mode(), md.nlink()));
    out
}

#[test]
fn changes_through_a_file_of_a_deleted_lower_file_fail_as_on_kernel_overlayfs() {
    let l = layers();
    let k = l.mount_kernel("k");
    let kernel = deleted_reader_rows(&k.merged, "m/e", None);
    let u = l.mount("u");
    assert_rows_match(&kernel, &deleted_reader_rows(&u.merged, "m/e", None));
    // With the directory it was in deleted too: nowhere to put a copy (ENOENT).
    let kernel = deleted_reader_rows(&k.merged, "d1/f", Some("d1"));
    assert_rows_match(&kernel, &deleted_reader_rows(&u.merged, "d1/f", Some("d1")));
    let lower = fs::metadata(l.lower(1).path("m/e")).unwrap();
    assert_eq!(
        (lower.mode() & 0o7777, lower.mtime() != 1_000_000),
        (0o644, true)
    );
    assert_eq!(
        get_xattr(&l.lower(1).path("m/e"), "user.k"),
        Err(libc::ENODATA)
    );
}

/// The lower files `stale_reader_rows` opens are untouched.
fn assert_stale_readers_left_lower_alone(l: &Layers) {
    for (name, content) in [("f1", "f1"), ("m/c", "c")] {
        let p = l.lower(1).path(name);
        assert_eq!(fs::read_to_string(&p).unwrap(), content, "{name}");
        let mode = fs::metadata(&p).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o644, "{name}: lower mode");
    }
}

#[test]
fn a_reader_opened_before_copy_up_follows_the_copy() {
    let l = layers();
    let k = l.mount_kernel("k");
    // The page-cached path follows as kernel overlayfs does.
    let u = l.mount_with("u", &["--passthrough", "off"]);
    let kernel_rows = stale_reader_rows(&k.merged);
    assert_rows_match(&kernel_rows, &stale_reader_rows(&u.merged));
    assert_stale_readers_left_lower_alone(&l);
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, "merged after the readers' changes");
    assert_same_upper(&k.upper_path(""), &u.upper_path(""), "readers' changes");
    drop(u);
    // With passthrough the old descriptor reads the lower file, as the README says (its
    // inode lost its name to the copy's); a change through it and its mode are the copy's.
    let p = l.mount_with("p", &["--passthrough", "on"]);
    let rows = stale_reader_rows(&p.merged);
    let expected: Vec<String> = kernel_rows
        .iter()
        .zip(["f1", "c"])
        .map(|(row, was)| row.replace("\"changed in the copy\"", &format!("{was:?}")))
        .collect();
    assert_rows_match(&expected, &rows);
    assert_stale_readers_left_lower_alone(&l);
}

/// Reading a lower file through the view changes no time in the lower layer, and the view
/// shows the lower file's atime, as on kernel overlayfs (which makes its lower layers'
/// mounts read-only and noatime): with passthrough the kernel reads through a file of its
/// own, opened with the reader's flags, and only the layer's mount can keep it from
/// touching the atime.
#[test]
fn reading_a_lower_file_changes_no_time_in_its_layer() {
    use std::io::Read;
    let l = Layers::new(1);
    // relatime updates an atime not later than the mtime, and one older than a day.
    l.lower(0)
        .file("f", "lower data")
        .times("f", 1_262_304_000, 1_262_304_000);
    let lower = l.lower(0).path("f");
    let rows = |m: &Mount| {
        let mut data = String::new();
        fs::File::open(m.path("f"))
            .unwrap()
            .read_to_string(&mut data)
            .unwrap();
        let view = fs::metadata(m.path("f")).unwrap();
        let below = fs::metadata(&lower).unwrap();
        vec![
            format!("read {data:?}"),
            format!("view atime {} mtime {}", view.atime(), view.mtime()),
            format!("lower atime {} mtime {}", below.atime(), below.mtime()),
        ]
    };
    let k = l.mount_kernel("k");
    let kernel = rows(&k);
    let u = l.mount("u");
    let ours = rows(&u);
    assert_rows_match(&kernel, &ours);
    assert_eq!(
        fs::metadata(&lower).unwrap().atime(),
        1_262_304_000,
        "lower atime"
    );
}

/// An append-only file (the flag set through the view) takes appends and nothing else.
fn append_only_rows(m: &Mount) -> Vec<(String, String)> {
    let mut rows = Vec::new();
    let mut row =
        |what: &str, r: &dyn std::fmt::Debug| rows.push((what.to_string(), format!("{r:?}")));
    let log = m.path("d/log");
    row("chattr +a d/log", &add_flags(&log, FS_APPEND_FL));
    row("flags of d/log", &get_flags(&log));
    let append = |data: &[u8]| {
        io(OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|mut f| f.write_all(data)))
    };
    row("append d/log", &append(b"+"));
    row("append d/log again", &append(b"++"));
    row(
        "write d/log in place",
        &io(OpenOptions::new().write(true).open(&log)),
    );
    row(
        "truncating open d/log",
        &io(OpenOptions::new()
            .append(true)
            .custom_flags(libc::O_TRUNC)
            .open(&log)),
    );
    row(
        "ftruncate d/log",
        &io(OpenOptions::new()
            .append(true)
            .open(&log)
            .and_then(|f| f.set_len(1))),
    );
    row("unlink d/log", &io(fs::remove_file(&log)));
    row(
        "read d/log",
        &fs::read_to_string(&log).map_err(|e| e.raw_os_error()),
    );
    row("chattr -a d/log", &remove_flags(&log, FS_APPEND_FL));
    row("unlink d/log again", &io(fs::remove_file(&log)));
    rows
}

/// Appends to a file made append-only through the view work as on kernel overlayfs, on both
/// paths; writes in place, truncation and unlinking are refused on both. (The flag is kept
/// in `overlay.protattr`, so the real upper file takes the page writes of the page-cached
/// path's write-back wherever they lie.)
#[test]
fn append_only_file_takes_appends() {
    let l = Layers::new(1);
    l.lower(0).file("d/log", "l");
    let k = l.mount_kernel("k");
    assert_both_paths_match(&l, &append_only_rows(&k), append_only_rows);
}

/// What becomes of an append-only file after writes that name an offset: a pwrite once fcntl
/// cleared O_APPEND, a pwritev2 with RWF_NOAPPEND, and (`mapping`) a store through a shared
/// mapping (kernel overlayfs refuses the fcntl, the flag and the mapping).
fn append_only_overwrites(m: &Mount, mapping: bool) -> String {
    use std::os::fd::AsRawFd;
    let log = m.path("d/keep");
    add_flags(&log, FS_APPEND_FL).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .append(true)
        .open(&log)
        .unwrap();
    let fd = f.as_raw_fd();
    let iov = libc::iovec {
        iov_base: b"N".as_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: plain syscalls on an open fd, with valid buffers; the mapping is one page,
    // written once and unmapped.
    unsafe {
        libc::fcntl(fd, libc::F_SETFL, 0);
        libc::pwrite(fd, b"Z".as_ptr().cast(), 1, 0);
        libc::pwritev2(fd, &iov, 1, 0, libc::RWF_NOAPPEND);
        let map = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd,
            0,
        );
        if mapping && map != libc::MAP_FAILED {
            *(map as *mut u8) = b'M';
            libc::msync(map, 4096, libc::MS_SYNC);
            libc::munmap(map, 4096);
        }
    }
    drop(f);
    // Pages the daemon refused leave the kernel's cache right after (asynchronously).
    let read = || fs::read_to_string(&log).unwrap();
    wait_until(std::time::Duration::from_secs(2), || {
        read().starts_with("hello")
    });
    let content = read();
    remove_flags(&log, FS_APPEND_FL).unwrap();
    content
}

/// An append-only file keeps every byte it has, whatever offset a write names: with
/// passthrough such writes land at the end (the backing file is open O_APPEND); on the
/// page-cached path they are refused, and so are a shared mapping's stores (with passthrough
/// those reach the backing file, README). Kernel overlayfs refuses the fcntl that clears
/// O_APPEND (so the pwrite after it appends), RWF_NOAPPEND and the mapping.
#[test]
fn append_only_file_keeps_its_bytes() {
    let l = Layers::new(1);
    l.lower(0).file("d/keep", "hello");
    let k = l.mount_kernel("k");
    assert_eq!(append_only_overwrites(&k, true), "helloZ");
    for (name, path, mapping, want) in [("u", "on", false, "helloZN"), ("c", "off", true, "hello")]
    {
        let u = l.mount_with(name, &["--passthrough", path]);
        let content = append_only_overwrites(&u, mapping);
        assert_eq!(content, want, "{path}");
        let on_disk = fs::read_to_string(u.upper_path("d/keep")).unwrap();
        assert_eq!(on_disk, want, "{path}: upper");
    }
}

/// Takes the inode flags off paths when dropped (also when a test fails), so that their
/// temporary directory can go.
struct Unflag(Vec<PathBuf>);

impl Drop for Unflag {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = remove_flags(p, FS_IMMUTABLE_FL | FS_APPEND_FL);
        }
    }
}

/// What append-only and immutable flags allow, set through the view on lower files and
/// directories, or found on lower objects, as (what, result) rows.
fn protection_rows(m: &Mount) -> Vec<(String, String)> {
    use std::os::fd::AsRawFd;
    let mut rows = Vec::new();
    let mut row =
        |what: &str, r: &dyn std::fmt::Debug| rows.push((what.to_string(), format!("{r:?}")));
    let p = |rel: &str| m.path(rel);
    let open = |rel: &str, o: &mut OpenOptions| io(o.open(p(rel)));
    let write_at_end = |rel: &str, data: &[u8]| {
        io(OpenOptions::new()
            .append(true)
            .open(p(rel))
            .and_then(|mut f| f.write_all(data)))
    };
    let read = |rel: &str| fs::read_to_string(p(rel)).map_err(|e| e.raw_os_error());
    let chmod =
        |rel: &str, mode: u32| io(fs::set_permissions(p(rel), PermissionsExt::from_mode(mode)));
    // Both times now (a touch), or both set, or the access time now and the other set.
    let utimes_mixed = |rel: &str, now: (bool, bool)| {
        let c = cs(&p(rel));
        let one = |now| libc::timespec {
            tv_sec: 1_000_000,
            tv_nsec: if now { libc::UTIME_NOW } else { 0 },
        };
        let t = [one(now.0), one(now.1)];
        // SAFETY: valid path and two timespecs.
        rc(unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), 0) })
    };
    let utimes = |rel: &str, now: bool| utimes_mixed(rel, (now, now));
    let setx = |rel: &str| {
        let (c, n) = (cs(&p(rel)), CString::new("user.t").unwrap());
        // SAFETY: valid strings and a one-byte value.
        rc(unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) })
    };
    let fallocate = |rel: &str, mode: i32| {
        io(OpenOptions::new().append(true).open(p(rel)).and_then(|f| {
            // SAFETY: a valid fd.
            match unsafe { libc::fallocate(f.as_raw_fd(), mode, 0, 4) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        }))
    };

    // A file open for writing before it is made immutable keeps writing and truncating.
    let pre = OpenOptions::new().write(true).open(p("pre")).unwrap();
    row("chattr +i pre", &add_flags(&p("pre"), FS_IMMUTABLE_FL));
    row("ftruncate pre", &io(pre.set_len(1)));
    row("pwrite pre", &io(pre.write_at(b"w", 1)));
    // copy_file_range checks the target's flag itself, whenever the file was opened.
    let source = fs::File::open(p("rd")).unwrap();
    let (mut from, mut to) = (0i64, 0i64);
    // SAFETY: two open fds and valid offset pointers.
    let copied = unsafe {
        libc::copy_file_range(
            source.as_raw_fd(),
            &mut from,
            pre.as_raw_fd(),
            &mut to,
            1,
            0,
        )
    };
    let copied = match copied {
        -1 => Err(std::io::Error::last_os_error().raw_os_error()),
        n => Ok(n),
    };
    row("copy_file_range into pre", &copied);
    row("read pre", &read("pre"));
    row(
        "open pre for writing",
        &open("pre", OpenOptions::new().write(true)),
    );
    drop(pre);
    row("chattr -i pre", &remove_flags(&p("pre"), FS_IMMUTABLE_FL));

    // A file open for reading when it is made append-only takes appends (with passthrough
    // the reader's open holds the inode's backing file): one opened on the lower file (its
    // name then moves to a new inode with the copy, README), one on the upper copy.
    let reader = fs::File::open(p("rd")).unwrap();
    row("chattr +a rd", &add_flags(&p("rd"), FS_APPEND_FL));
    row("append to rd", &write_at_end("rd", b"+"));
    row("read rd", &read("rd"));
    drop(reader);
    row("chmod rd2", &chmod("rd2", 0o644));
    let reader = fs::File::open(p("rd2")).unwrap();
    row("chattr +a rd2", &add_flags(&p("rd2"), FS_APPEND_FL));
    row("append to rd2", &write_at_end("rd2", b"+"));
    let mut seen = String::new();
    row(
        "read rd2 through the reader",
        &io(std::io::Read::read_to_string(&mut &reader, &mut seen)),
    );
    row("what the reader read", &seen);
    drop(reader);
    // A file open for writing before it is made append-only writes in place, also while an
    // appending file is open (the page-cached path writes back through the latest writable
    // file of the inode).
    let older = OpenOptions::new()
        .read(true)
        .write(true)
        .open(p("wr"))
        .unwrap();
    row("chattr +a wr", &add_flags(&p("wr"), FS_APPEND_FL));
    let appender = OpenOptions::new().append(true).open(p("wr")).unwrap();
    row(
        "pwrite wr through the older file",
        &io(older.write_at(b"Y", 0)),
    );
    row("append to wr", &io((&appender).write_all(b"+")));
    // SAFETY: closes the fd `older` owns, which is forgotten so it is not closed twice.
    row(
        "close the older file",
        &rc(unsafe { libc::close(std::os::fd::IntoRawFd::into_raw_fd(older)) }),
    );
    drop(appender);
    row("read wr", &read("wr"));
    for n in ["rd", "rd2", "wr"] {
        row(
            &format!("chattr -a {n}"),
            &remove_flags(&p(n), FS_APPEND_FL),
        );
    }

    // Set through the view: the objects are copied up, the flags kept aside.
    row("chattr +i d", &add_flags(&p("d"), FS_IMMUTABLE_FL));
    row("chattr +a ad", &add_flags(&p("ad"), FS_APPEND_FL));
    row("chattr +i fi", &add_flags(&p("fi"), FS_IMMUTABLE_FL));
    row("chattr +a fa", &add_flags(&p("fa"), FS_APPEND_FL));
    row(
        "chattr +ai both",
        &add_flags(&p("both"), FS_IMMUTABLE_FL | FS_APPEND_FL),
    );
    for n in ["d", "ad", "fi", "fa", "both", "li", "ld", "ld/c"] {
        row(
            &format!("flags of {n}"),
            &get_flags(&p(n)).map(|f| f & (FS_IMMUTABLE_FL | FS_APPEND_FL)),
        );
    }
    row("xflags of both", &get_xflags(&p("both")).map(|f| f & 0x18));
    // Through FS_IOC_FSSETXATTR (FS_XFLAG_APPEND) as well.
    row("fssetxattr append xa", &add_xflags(&p("xa"), 0x10));
    row(
        "flags of xa",
        &get_flags(&p("xa")).map(|f| f & (FS_IMMUTABLE_FL | FS_APPEND_FL)),
    );
    row(
        "open xa for writing",
        &open("xa", OpenOptions::new().write(true)),
    );

    // An immutable directory: its entries stay, the files in it change.
    row(
        "create in d",
        &open("d/new", OpenOptions::new().write(true).create(true)),
    );
    row("mkdir in d", &io(fs::create_dir(p("d/nd"))));
    row(
        "symlink in d",
        &io(std::os::unix::fs::symlink("x", p("d/sl"))),
    );
    row("link into d", &io(fs::hard_link(p("plain"), p("d/hl"))));
    row("unlink in d", &io(fs::remove_file(p("d/f"))));
    row("rename in d", &io(fs::rename(p("d/f"), p("d/f2"))));
    row("rename out of d", &io(fs::rename(p("d/g"), p("g"))));
    row("rename into d", &io(fs::rename(p("plain"), p("d/plain"))));
    row("rmdir d/sub", &io(fs::remove_dir(p("d/sub"))));
    row("chmod d/f", &chmod("d/f", 0o600));
    row("append to d/f", &write_at_end("d/f", b"+"));
    row("read d/f", &read("d/f"));
    row("chmod d", &chmod("d", 0o700));
    row("rmdir d", &io(fs::remove_dir(p("d"))));

    // An append-only directory: names come, none go.
    row(
        "create in ad",
        &open("ad/new", OpenOptions::new().write(true).create(true)),
    );
    row("unlink in ad", &io(fs::remove_file(p("ad/f"))));
    row("rename out of ad", &io(fs::rename(p("ad/new"), p("new"))));
    row(
        "rename over a name in ad",
        &io(fs::rename(p("plain"), p("ad/f"))),
    );
    row("rename into ad", &io(fs::rename(p("plain"), p("ad/plain"))));
    row("rmdir ad", &io(fs::remove_dir(p("ad"))));

    // An immutable file: nothing changes.
    row(
        "open fi for writing",
        &open("fi", OpenOptions::new().write(true)),
    );
    row(
        "open fi O_RDONLY|O_TRUNC",
        &open(
            "fi",
            OpenOptions::new().read(true).custom_flags(libc::O_TRUNC),
        ),
    );
    row(
        "truncate fi",
        &io(OpenOptions::new().read(true).open(p("fi")).and_then(|_| {
            let c = cs(&p("fi"));
            // SAFETY: a valid path.
            match unsafe { libc::truncate(c.as_ptr(), 0) } {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        })),
    );
    row("chmod fi", &chmod("fi", 0o600));
    row(
        "chown fi",
        &io(std::os::unix::fs::lchown(p("fi"), Some(1), Some(1))),
    );
    row("touch fi", &utimes("fi", true));
    row("utimes fi", &utimes("fi", false));
    row("setxattr fi", &setx("fi"));
    row("unlink fi", &io(fs::remove_file(p("fi"))));
    // (rmdir of it answers ENOTDIR here: the FUSE kernel checks the type before asking.)
    row("rename fi", &io(fs::rename(p("fi"), p("fi2"))));
    row("link fi", &io(fs::hard_link(p("fi"), p("fi3"))));
    row("read fi", &read("fi"));

    // An append-only file: appends only.
    row(
        "open fa for writing",
        &open("fa", OpenOptions::new().write(true)),
    );
    row("append to fa", &write_at_end("fa", b"+"));
    row(
        "open fa O_APPEND|O_TRUNC",
        &open(
            "fa",
            OpenOptions::new().append(true).custom_flags(libc::O_TRUNC),
        ),
    );
    row("chmod fa", &chmod("fa", 0o600));
    row("touch fa", &utimes("fa", true));
    row("utimes fa", &utimes("fa", false));
    row(
        "utimes fa, access time now",
        &utimes_mixed("fa", (true, false)),
    );
    row("setxattr fa", &setx("fa"));
    row(
        "fallocate fa keep size",
        &fallocate("fa", libc::FALLOC_FL_KEEP_SIZE),
    );
    row("fallocate fa", &fallocate("fa", 0));
    row(
        "punch a hole in fa",
        &fallocate("fa", libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE),
    );
    row("unlink fa", &io(fs::remove_file(p("fa"))));
    row("link fa", &io(fs::hard_link(p("fa"), p("fa3"))));
    row("read fa", &read("fa"));
    row("append to both", &write_at_end("both", b"+"));
    row("touch both", &utimes("both", true));

    // Flags a lower object has for real: shown and kept, also by a copy-up of the directory.
    row("append to li", &write_at_end("li", b"+"));
    row("chmod li", &chmod("li", 0o600));
    row("unlink li", &io(fs::remove_file(p("li"))));
    row("chmod ld/c", &chmod("ld/c", 0o600));
    row(
        "flags of ld after its copy-up",
        &get_flags(&p("ld")).map(|f| f & FS_IMMUTABLE_FL),
    );
    row(
        "create in ld",
        &open("ld/new", OpenOptions::new().write(true).create(true)),
    );

    // Taken off again, everything goes.
    for (n, f) in [
        ("d", FS_IMMUTABLE_FL),
        ("ad", FS_APPEND_FL),
        ("fi", FS_IMMUTABLE_FL),
        ("fa", FS_APPEND_FL),
        ("both", FS_IMMUTABLE_FL | FS_APPEND_FL),
        ("li", FS_IMMUTABLE_FL),
        ("ld", FS_IMMUTABLE_FL),
        ("xa", FS_APPEND_FL),
    ] {
        row(&format!("chattr -{f:#x} {n}"), &remove_flags(&p(n), f));
    }
    row("append to li after", &write_at_end("li", b"+"));
    row("unlink d/f after", &io(fs::remove_file(p("d/f"))));
    row("unlink ad/f after", &io(fs::remove_file(p("ad/f"))));
    row(
        "open fa for writing after",
        &open("fa", OpenOptions::new().write(true)),
    );
    row("unlink fi after", &io(fs::remove_file(p("fi"))));
    rows
}

/// Append-only and immutable flags set through the view (on lower objects, so copied up
/// first) and found on lower objects do what they do on kernel overlayfs: an immutable
/// directory keeps its names while the files in it change (a copy-up into it), an
/// append-only one gains names but loses none, and so on. Both keep them in the upper's
/// `overlay.protattr` xattr, never as real flags, and an upper kernel overlayfs wrote with
/// them shows and enforces them here too.
#[test]
fn protection_flags_as_kernel_overlayfs() {
    let l = Layers::new(1);
    let lower = l.lower(0);
    lower
        .file("d/f", "f")
        .file("d/g", "g")
        .dir("d/sub")
        .file("ad/f", "f")
        .file("fi", "i")
        .file("fa", "a")
        .file("both", "b")
        .file("plain", "p")
        .file("pre", "before")
        .file("rd", "read")
        .file("rd2", "read")
        .file("wr", "write")
        .file("xa", "x")
        .file("li", "l")
        .file("ld/c", "c");
    let _unflag = Unflag(vec![lower.path("li"), lower.path("ld")]);
    add_flags(&lower.path("li"), FS_IMMUTABLE_FL).unwrap();
    add_flags(&lower.path("ld"), FS_IMMUTABLE_FL).unwrap();
    let k = l.mount_kernel("k");
    let want = protection_rows(&k);
    // The page-cached path too (its writeback caching sends times differently).
    let c = l.mount_with("c", &["--passthrough", "off"]);
    let _unflag_c = Unflag(
        ["d", "ad", "fi", "fa", "both", "xa", "ld"]
            .map(|n| c.upper_path(n))
            .to_vec(),
    );
    assert_rows_match(&want, &protection_rows(&c));
    drop(c);
    let u = l.mount("u");
    let _unflag_u = Unflag(
        ["d", "ad", "fi", "fa", "both", "xa", "ld"]
            .map(|n| u.upper_path(n))
            .to_vec(),
    );
    assert_rows_match(&want, &protection_rows(&u));
    let (tk, tu) = merged_trees(&k.merged, &u.merged);
    assert_same_tree(&tk, &tu, "merged after the flag changes");
    assert_same_upper(
        &k.upper_path(""),
        &u.upper_path(""),
        "after the flag changes",
    );

    // On disk: the xattr as the kernel writes it, no real flag.
    let probe = [
        ("d", FS_IMMUTABLE_FL),
        ("both", FS_IMMUTABLE_FL | FS_APPEND_FL),
        ("ld", FS_IMMUTABLE_FL),
    ];
    let mut on_disk = Vec::new();
    for m in [&k, &u] {
        for (n, f) in probe {
            add_flags(&m.path(n), f).unwrap();
        }
        on_disk.push(
            probe
                .iter()
                .map(|(n, _)| {
                    let up = m.upper_path(n);
                    (
                        get_xattr(&up, "trusted.overlay.protattr"),
                        get_flags(&up).map(|f| f & (FS_IMMUTABLE_FL | FS_APPEND_FL)),
                    )
                })
                .collect::<Vec<_>>(),
        );
    }
    assert_eq!(
        on_disk[0], on_disk[1],
        "protattr and real flags in the upper (kernel, unionmount)"
    );
    assert_eq!(on_disk[1][1], (Ok(b"ai".to_vec()), Ok(0)));

    // The kernel's upper under unionmount: flags shown and enforced.
    let ku = k.upper_path("");
    drop(k);
    let merged = l.root().join("k2/merged");
    let here = union_at(&l, &ku, &l.root().join("k2/work"), &merged);
    assert_eq!(
        get_flags(&merged.join("both")).map(|f| f & 0x30),
        Ok(FS_IMMUTABLE_FL | FS_APPEND_FL)
    );
    assert_eq!(errno(fs::write(merged.join("d/new"), "n")), libc::EPERM);
    assert_eq!(
        errno(OpenOptions::new().append(true).open(merged.join("both"))),
        libc::EPERM
    );
    assert_eq!(errno(fs::remove_file(merged.join("ld/c"))), libc::EPERM);
    remove_flags(&merged.join("d"), FS_IMMUTABLE_FL).unwrap();
    fs::write(merged.join("d/new"), "n").unwrap();
    assert_eq!(
        get_xattr(&ku.join("d"), "trusted.overlay.protattr"),
        Err(libc::ENODATA)
    );
    for (n, f) in probe {
        let _ = remove_flags(&merged.join(n), f);
        let _ = remove_flags(&u.path(n), f);
    }
    drop(here);
}

/// `statx` reports a birth time as kernel overlayfs does: the one of the object the view shows
/// (the lower object until a copy-up, the upper one from then on), for files, symlinks and
/// directories.
#[test]
fn birth_times_are_those_of_the_objects_shown() {
    use std::os::unix::fs::PermissionsExt;
    let l = Layers::new(1);
    l.lower(0)
        .dir("d")
        .file("d/f", "a")
        .file("d/g", "b")
        .symlink("d/s", "f");
    let ours = l.mount("u");
    let kernel = l.mount_kernel("k");
    let born = |p: &Path| -> std::time::SystemTime {
        fs::symlink_metadata(p)
            .and_then(|m| m.created())
            .unwrap_or_else(|e| panic!("birth time of {}: {e}", p.display()))
    };
    for m in [&ours, &kernel] {
        for rel in ["d", "d/f", "d/s"] {
            assert_eq!(
                born(&m.path(rel)),
                born(&l.lower(0).path(rel)),
                "{rel}: the lower object's, through {}",
                m.path("").display()
            );
        }
        fs::write(m.path("new"), "n").unwrap();
        fs::set_permissions(m.path("d/g"), fs::Permissions::from_mode(0o600)).unwrap();
        for rel in ["new", "d/g"] {
            assert_eq!(
                born(&m.path(rel)),
                born(&m.upper_path(rel)),
                "{rel}: the upper object's, through {}",
                m.path("").display()
            );
        }
    }
}

/// open(2) with O_TMPFILE in a lower directory (copied up first) makes an unnamed file in the
/// upper that linkat(2) through /proc/self/fd names and open(2) through it reopens, as on
/// kernel overlayfs; with O_EXCL it cannot be named (ENOENT), and one never named leaves
/// nothing behind.
#[test]
fn unnamed_temporary_files_as_kernel_overlayfs_makes_them() {
    use std::os::fd::AsRawFd;
    let l = Layers::new(1);
    l.lower(0).dir("d").file("d/old", "o");
    let ours = l.mount("u");
    let kernel = l.mount_kernel("k");
    let run = |m: &Mount| -> Vec<String> {
        let dir = m.path("d");
        let tmp = |flags: i32| {
            OpenOptions::new()
                .read(flags & libc::O_ACCMODE == libc::O_RDWR)
                .write(true)
                .custom_flags(libc::O_TMPFILE | (flags & !libc::O_ACCMODE))
                .mode(0o640)
                .open(&dir)
                .expect("open O_TMPFILE")
        };
        let link = |f: &fs::File, name: &str| {
            let src = cs(Path::new(&format!("/proc/self/fd/{}", f.as_raw_fd())));
            let dst = cs(&dir.join(name));
            // SAFETY: two NUL-terminated paths.
            rc(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    src.as_ptr(),
                    libc::AT_FDCWD,
                    dst.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            })
        };
        let mut out = Vec::new();
        let mut f = tmp(libc::O_RDWR);
        f.write_all(b"tmp\n").unwrap();
        out.push(format!("unnamed: nlink {}", f.metadata().unwrap().nlink()));
        // SAFETY: an open fd, NUL-terminated name, a value of the given length.
        let set = rc(unsafe {
            libc::fsetxattr(
                f.as_raw_fd(),
                c"user.t".as_ptr(),
                b"v".as_ptr().cast(),
                1,
                0,
            )
        });
        out.push(format!("fsetxattr unnamed: {set:?}"));
        let again = fs::read_to_string(format!("/proc/self/fd/{}", f.as_raw_fd()));
        out.push(format!("reopened unnamed: {again:?}"));
        out.push(format!("link: {:?}", link(&f, "named")));
        out.push(format!(
            "xattr named: {:?}",
            get_xattr(&dir.join("named"), "user.t")
        ));
        let meta = f.metadata().unwrap();
        out.push(format!(
            "named: nlink {} mode {:o}",
            meta.nlink(),
            meta.mode()
        ));
        let named = fs::metadata(dir.join("named")).unwrap();
        out.push(format!("same file: {}", named.ino() == meta.ino()));
        drop(f);
        out.push(format!(
            "content: {:?}",
            fs::read_to_string(dir.join("named"))
        ));
        let excl = tmp(libc::O_RDWR | libc::O_EXCL);
        out.push(format!("O_EXCL link: {:?}", link(&excl, "x")));
        drop(excl);
        let mut gone = tmp(libc::O_WRONLY);
        gone.write_all(b"gone").unwrap();
        drop(gone);
        let mut names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        out.push(format!("listing: {names:?}"));
        let mut upper: Vec<_> = fs::read_dir(m.upper_path("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        upper.sort();
        out.push(format!("upper: {upper:?}"));
        out
    };
    let (got, want) = (run(&ours), run(&kernel));
    assert_eq!(got, want, "unionmount against kernel overlayfs");
    assert!(got.contains(&"link: Ok(())".to_string()), "{got:?}");
    assert!(
        got.contains(&format!("O_EXCL link: Err({})", libc::ENOENT)),
        "{got:?}"
    );
}

/// A lower layer on squashfs, a read-only filesystem without POSIX ACLs (as image layers
/// often are), as on kernel overlayfs: fsync(2) and fdatasync(2) of a file opened read-only
/// from it succeed (only upper files are synced; squashfs itself refuses fsync with EINVAL);
/// its files have no ACL (ENODATA), so permission checks that consult one pass (squashfs
/// answers EOPNOTSUPP); an ACL cannot be set on them (EOPNOTSUPP, before any copy-up); a
/// file copied up syncs its copy.
#[test]
fn a_lower_layer_on_squashfs_as_kernel_overlayfs_shows_it() {
    use std::os::fd::AsRawFd;
    let l = Layers::new(1);
    let src = l.mkdir("squash-src");
    fs::write(src.join("f"), "lower\n").unwrap();
    fs::write(src.join("g"), "lower\n").unwrap();
    // Owned by another user, group bits set: root's access goes through the ACL check.
    fs::create_dir(src.join("d")).unwrap();
    fs::write(src.join("d/x"), "x\n").unwrap();
    for p in ["d", "d/x"] {
        std::os::unix::fs::lchown(src.join(p), Some(1000), Some(1000)).unwrap();
    }
    fs::set_permissions(src.join("d"), fs::Permissions::from_mode(0o775)).unwrap();
    fs::set_permissions(src.join("d/x"), fs::Permissions::from_mode(0o664)).unwrap();
    let img = l.root().join("layer.squashfs");
    let st = Command::new("mksquashfs")
        .arg(&src)
        .arg(&img)
        .args(["-quiet", "-noappend", "-no-progress"])
        .status()
        .expect("mksquashfs (Debian/Ubuntu: apt-get install squashfs-tools)");
    assert!(st.success(), "mksquashfs");
    let _lower = scratch_mount(&["-t", "squashfs", "-o", "loop,ro"], &img, &l.lowers[0]);
    let sync = |p: &Path| -> String {
        let f = fs::File::open(p).unwrap();
        // SAFETY: fsync and fdatasync of an open fd.
        let r = (
            rc(unsafe { libc::fsync(f.as_raw_fd()) }),
            rc(unsafe { libc::fdatasync(f.as_raw_fd()) }),
        );
        format!("{r:?}")
    };
    // The minimal ACL of mode 0644: owner rw, group r, other r.
    let acl = acl_xattr(&[(1, 6, u32::MAX), (4, 4, u32::MAX), (0x20, 4, u32::MAX)]);
    let set_acl = |p: &Path| {
        let c = cs(p);
        // SAFETY: NUL-terminated path and name, a value of the given length.
        rc(unsafe {
            libc::lsetxattr(
                c.as_ptr(),
                c"system.posix_acl_access".as_ptr(),
                acl.as_ptr().cast(),
                acl.len(),
                0,
            )
        })
    };
    let lower_f = l.lowers[0].join("f");
    assert_eq!(
        (
            sync(&lower_f),
            get_xattr(&lower_f, "system.posix_acl_access")
        ),
        (
            format!(
                "{:?}",
                (Err::<(), i32>(libc::EINVAL), Err::<(), i32>(libc::EINVAL))
            ),
            Err(libc::EOPNOTSUPP)
        ),
        "test setup: squashfs refuses fsync and has no ACLs"
    );
    let run = |m: &Mount| -> Vec<String> {
        let mut out = vec![format!("lower file: {}", sync(&m.path("f")))];
        let names = fs::read_dir(m.path("d")).map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
        });
        out.push(format!("list d: {:?}", names.map_err(|e| e.raw_os_error())));
        out.push(format!(
            "read d/x: {:?}",
            fs::read_to_string(m.path("d/x")).map_err(|e| e.raw_os_error())
        ));
        out.push(format!(
            "ACL of d/x: {:?}",
            get_xattr(&m.path("d/x"), "system.posix_acl_access")
        ));
        out.push(format!("set an ACL on f: {:?}", set_acl(&m.path("f"))));
        out.push(format!("f copied up: {}", m.upper_path("f").exists()));
        let mut w = OpenOptions::new().append(true).open(m.path("g")).unwrap();
        w.write_all(b"upper\n").unwrap();
        out.push(format!(
            "copied up, writer: {:?}",
            w.sync_all().map_err(|e| e.raw_os_error())
        ));
        drop(w);
        out.push(format!("copied up, reader: {}", sync(&m.path("g"))));
        out.push(format!("set an ACL on g: {:?}", set_acl(&m.path("g"))));
        out.push(format!(
            "content: {:?}",
            fs::read_to_string(m.path("g")).unwrap()
        ));
        out
    };
    let ours = run(&l.mount("u"));
    let kernel = run(&l.mount_kernel("k"));
    assert_eq!(ours, kernel);
    assert!(ours[0].contains("Ok(()), Ok(())"), "{ours:?}");
}

/// A POSIX ACL as its xattr value holds it: (tag, permission bits, id) per entry, in tag
/// order; the id is `u32::MAX` for the entries without one.
fn acl_xattr(entries: &[(u16, u16, u32)]) -> Vec<u8> {
    let mut acl = 2u32.to_le_bytes().to_vec();
    for (tag, perm, id) in entries {
        acl.extend(tag.to_le_bytes());
        acl.extend(perm.to_le_bytes());
        acl.extend(id.to_le_bytes());
    }
    acl
}

/// Sets (`set`) or removes the access or default ACL of `p`, as `user` if given (with its own
/// group only); answers the result and the mode after it. The ACL set is
/// `u::rw-,u:1000:r--,g::r--,m::r--,o::r--`.
fn change_acl(p: &Path, default: bool, set: bool, user: Option<u32>) -> String {
    const SCRIPT: &str = "import os, sys
p, name, value = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    if value:
        os.setxattr(p, name, bytes.fromhex(value), follow_symlinks=False)
    else:
        os.removexattr(p, name, follow_symlinks=False)
    r = 'ok'
except OSError as e:
    r = e.strerror
print(r, oct(os.lstat(p).st_mode))";
    let mut value = String::new();
    if set {
        let acl = acl_xattr(&[
            (1, 6, u32::MAX),
            (2, 4, 1000),
            (4, 4, u32::MAX),
            (0x10, 4, u32::MAX),
            (0x20, 4, u32::MAX),
        ]);
        value = acl.iter().map(|b| format!("{b:02x}")).collect();
    }
    let name = if default {
        "system.posix_acl_default"
    } else {
        "system.posix_acl_access"
    };
    let mut cmd = Command::new("setpriv");
    if let Some(u) = user {
        cmd.args([
            format!("--reuid={u}"),
            format!("--regid={u}"),
            "--clear-groups".into(),
        ]);
    }
    let out = cmd
        .args(["--", "/usr/bin/python3", "-I", "-c", SCRIPT])
        .arg(p)
        .args([name, &value])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Mounts unionmount and kernel overlayfs over `lowers` (a `lowerdir` list), each with its
/// upper and work directories in `ours` and `kernel` and its view at `ours/merged` and
/// `kernel/merged`, and answers what `run` finds on each.
fn on_both(lowers: &str, ours: &Path, kernel: &Path, run: impl Fn(&Mount) -> Vec<String>) {
    let dirs = |base: &Path| {
        let d: Vec<PathBuf> = ["upper", "work", "merged"]
            .iter()
            .map(|n| base.join(n))
            .collect();
        for p in &d {
            fs::create_dir_all(p).unwrap();
        }
        d
    };
    let [u, w, m] = <[PathBuf; 3]>::try_from(dirs(ours)).unwrap();
    let args: Vec<OsString> = vec![
        "--lower".into(),
        lowers.into(),
        "--upper".into(),
        u.clone().into(),
        "--work".into(),
        w.clone().into(),
        m.clone().into(),
    ];
    let got = run(&Mount::union(&args, m, Some(u), Some(w)));
    let [u, w, m] = <[PathBuf; 3]>::try_from(dirs(kernel)).unwrap();
    let want = run(&Mount::kernel(lowers, &u, &w, &m, &[]));
    assert_eq!(got, want, "unionmount against kernel overlayfs");
}

/// POSIX ACL changes follow the real filesystems, as on kernel overlayfs:
/// - a lower layer on erofs shows the ACLs it holds, but none can be set on or removed from
///   its files before they are copied up (EOPNOTSUPP, nothing copied up, the set-group-ID
///   bit kept when the owner is outside the file's group);
/// - a lower layer on ramfs (no ACLs at all) is treated as erofs;
/// - a lower layer on a filesystem mounted `noacl` has files that take an ACL by copy-up;
/// - an upper filesystem mounted `noacl` takes no ACL at all, and copies nothing up for one.
#[test]
fn acl_changes_follow_the_layers_filesystems_as_kernel_overlayfs() {
    let user = test_user();
    let l = Layers::new(1);
    let src = l.mkdir("erofs-src");
    for f in ["f", "a", "s"] {
        fs::write(src.join(f), "lower\n").unwrap();
    }
    fs::create_dir(src.join("d")).unwrap();
    assert_eq!(change_acl(&src.join("a"), false, true, None), "ok 0o100644");
    assert_eq!(change_acl(&src.join("d"), true, true, None), "ok 0o40755");
    std::os::unix::fs::lchown(src.join("s"), Some(user), Some(0)).unwrap();
    fs::set_permissions(src.join("s"), fs::Permissions::from_mode(0o2775)).unwrap();
    let img = l.root().join("layer.erofs");
    let out = Command::new("mkfs.erofs")
        .arg(&img)
        .arg(&src)
        .output()
        .expect("mkfs.erofs (Debian/Ubuntu: apt-get install erofs-utils)");
    assert!(out.status.success(), "mkfs.erofs: {out:?}");
    let _erofs = scratch_mount(&["-t", "erofs", "-o", "loop,ro"], &img, &l.lowers[0]);
    assert!(
        get_xattr(&l.lowers[0].join("a"), "system.posix_acl_access").is_ok(),
        "test setup: erofs holds the ACL"
    );

    // A filesystem mounted `noacl` for the second and third comparisons.
    let img = l.root().join("noacl.btrfs");
    fs_image(&img, 128 << 20, &["mkfs.btrfs", "-q"], "btrfs-progs");
    let noacl = l.mkdir("noacl");
    let _noacl = scratch_mount(&["-o", "loop,noacl"], &img, &noacl);

    let copied = |m: &Mount, names: &[&str]| -> String {
        let c: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| m.upper_path(n).exists())
            .collect();
        format!("copied up: {c:?}")
    };
    on_both(
        &esc_layer(&l.lowers[0]),
        &l.mkdir("u1"),
        &l.mkdir("k1"),
        |m| {
            vec![
                format!("{:?}", get_xattr(&m.path("a"), "system.posix_acl_access")),
                format!("{:?}", get_xattr(&m.path("d"), "system.posix_acl_default")),
                change_acl(&m.path("f"), false, true, None),
                change_acl(&m.path("a"), false, false, None),
                change_acl(&m.path("d"), true, false, None),
                change_acl(&m.path("s"), false, true, Some(user)),
                change_acl(&m.path("s"), false, false, Some(user)),
                copied(m, &["f", "a", "d", "s"]),
            ]
        },
    );

    let lower = noacl.join("lower");
    fs::create_dir(&lower).unwrap();
    for f in ["f", "g"] {
        fs::write(lower.join(f), "lower\n").unwrap();
    }
    on_both(&esc_layer(&lower), &l.mkdir("u2"), &l.mkdir("k2"), |m| {
        vec![
            format!("{:?}", get_xattr(&m.path("f"), "system.posix_acl_access")),
            change_acl(&m.path("f"), false, true, None),
            format!(
                "{:?}",
                get_xattr(&m.path("f"), "system.posix_acl_access").map(|v| v.len())
            ),
            change_acl(&m.path("g"), false, false, None),
            copied(m, &["f", "g"]),
        ]
    });

    let lower = l.mkdir("ramfs");
    let _ramfs = scratch_mount(&["-t", "ramfs"], "ramfs", &lower);
    fs::write(lower.join("f"), "lower\n").unwrap();
    on_both(&esc_layer(&lower), &l.mkdir("u4"), &l.mkdir("k4"), |m| {
        vec![
            format!("{:?}", get_xattr(&m.path("f"), "system.posix_acl_access")),
            change_acl(&m.path("f"), false, true, None),
            change_acl(&m.path("f"), false, false, None),
            copied(m, &["f"]),
        ]
    });

    let lower = l.mkdir("plain");
    fs::write(lower.join("f"), "lower\n").unwrap();
    on_both(
        &esc_layer(&lower),
        &noacl.join("u3"),
        &noacl.join("k3"),
        |m| {
            fs::write(m.path("n"), "new\n").unwrap();
            vec![
                format!("{:?}", get_xattr(&m.path("f"), "system.posix_acl_access")),
                change_acl(&m.path("f"), false, true, None),
                change_acl(&m.path("f"), false, false, None),
                change_acl(&m.path("n"), false, true, None),
                copied(m, &["f"]),
            ]
        },
    );
}

/// A filesystem mounted inside a lower layer is not part of the view, as on kernel overlayfs:
/// the view shows the directory it covers, and a file there is copied up from it.
#[test]
fn mounts_inside_a_lower_layer_are_not_crossed_as_kernel_overlayfs() {
    let l = Layers::new(1);
    l.lower(0).file("m/under", "under\n").file("top", "top\n");
    let _inside = scratch_mount(&["-t", "tmpfs"], "tmpfs", &l.lowers[0].join("m"));
    fs::write(l.lowers[0].join("m/over"), "over\n").unwrap();
    let run = |m: &Mount| -> Vec<String> {
        let dev = |p: &str| fs::metadata(m.path(p)).map(|md| md.dev());
        let mut out = vec![
            format!("m: {:?}", m.ls("m")),
            format!("same device: {}", dev("m").ok() == dev("").ok()),
            format!(
                "m/over: {:?}",
                fs::read_to_string(m.path("m/over")).map_err(|e| e.raw_os_error())
            ),
        ];
        m.append("m/under", "more\n");
        out.push(m.read("m/under"));
        out.push(fs::read_to_string(m.upper_path("m/under")).unwrap());
        out
    };
    let ours = run(&l.mount("u"));
    let kernel = run(&l.mount_kernel("k"));
    assert_eq!(ours, kernel);
    assert_eq!(ours[0], r#"m: ["under"]"#, "{ours:?}");
}

/// What a walk or a call through an fd answers: the value, or the errno.
fn fd_row<T: std::fmt::Debug>(r: Result<T, i32>) -> String {
    match r {
        Ok(v) => format!("{v:?}"),
        Err(e) => format!("errno {e}"),
    }
}

/// `r` of a syscall returning a length or -1.
fn len_of(r: isize) -> Result<usize, i32> {
    if r < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        Ok(r as usize)
    }
}

/// Objects deleted, or replaced by a rename, while something still holds them: an `O_PATH`
/// descriptor (as container runtimes keep), a walk from it (as from a working directory),
/// and an open FIFO, none of them a file the daemon opened. Each is stat-ed, its xattrs and
/// symlink target read, reopened through `/proc` and, if it was an upper object, changed
/// there. Changes to a removed lower object are left out: kernel overlayfs copies it up over
/// whatever is at its old name by then (a FIFO or a device comes back at its deleted name, a
/// directory fails with ENOTDIR or replaces the directory renamed onto its name), where
/// unionmount refuses them (EEXIST; ENOENT for directories). A removed upper file or
/// symlink with no other link is only stat-ed: unionmount keeps its attributes, not the
/// object.
/// Linking a removed file again fails (ENOENT) on both.
fn held_rows(root: &Path) -> Vec<String> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let mut out = Vec::new();
    for origin in ["lo", "up"] {
        for kind in ['f', 'd', 'p', 's', 'c'] {
            for how in ["rm", "mv"] {
                let name = format!("{origin}_{kind}_{how}");
                let p = root.join(&name);
                if origin == "up" {
                    match kind {
                        'f' => fs::write(&p, "upper").unwrap(),
                        'd' => fs::create_dir(&p).unwrap(),
                        'p' => mknod(&p, libc::S_IFIFO | 0o644, 0),
                        's' => std::os::unix::fs::symlink("target-up", &p).unwrap(),
                        _ => mknod(&p, libc::S_IFCHR | 0o600, libc::makedev(1, 3)),
                    }
                    if matches!(kind, 'f' | 'd') {
                        set_xattr(&p, "user.v", b"up");
                    }
                }
                let cp = cs(&p);
                // SAFETY: plain syscall on a NUL-terminated path; the fd is owned below.
                let raw = unsafe {
                    libc::open(
                        cp.as_ptr(),
                        libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC,
                    )
                };
                assert!(raw >= 0, "{name}: {}", std::io::Error::last_os_error());
                // SAFETY: a fresh fd owned by nothing else.
                let fd = unsafe { OwnedFd::from_raw_fd(raw) };
                let fifo = (kind == 'p')
                    .then(|| OpenOptions::new().read(true).write(true).open(&p).unwrap());
                if how == "rm" {
                    if kind == 'd' {
                        fs::remove_dir(&p).unwrap();
                    } else {
                        fs::remove_file(&p).unwrap();
                    }
                } else {
                    let other = root.join(format!("other_{name}"));
                    if kind == 'd' {
                        fs::create_dir(&other).unwrap();
                    } else {
                        fs::write(&other, "other").unwrap();
                    }
                    fs::rename(&other, &p).unwrap();
                }
                let proc = PathBuf::from(format!("/proc/self/fd/{raw}"));
                let stat = |what: &str, out: &mut Vec<String>| {
                    let md = match fs::metadata(&proc) {
                        Ok(md) => md,
                        Err(e) => return out.push(format!("{name} {what}: {e}")),
                    };
                    let nlink = md.nlink();
                    let size = if kind == 'd' { 0 } else { md.size() };
                    out.push(format!(
                        "{name} {what}: mode {:o} nlink {nlink} size {size} uid {} mtime {}",
                        md.mode(),
                        md.uid(),
                        if md.mtime() < OLD { md.mtime() } else { 0 }
                    ));
                };
                // fstat through the O_PATH descriptor (the magic link, followed).
                stat("stat", &mut out);
                // A removed upper file or symlink with no other link is not held by
                // unionmount (README): only its attributes answer.
                if origin == "up" && matches!(kind, 'f' | 's') {
                    continue;
                }
                if let Some(f) = &fifo {
                    let got = f
                        .metadata()
                        .map(|md| format!("{:o} {}", md.mode(), md.nlink()))
                        .map_err(|e| e.raw_os_error().unwrap());
                    out.push(format!("{name} open fifo: {}", fd_row(got)));
                }
                if matches!(kind, 'f' | 'd') {
                    let cproc = cs(&proc);
                    let mut buf = [0u8; 256];
                    // SAFETY: NUL-terminated strings and a writable buffer of its length.
                    let got = len_of(unsafe {
                        libc::getxattr(
                            cproc.as_ptr(),
                            c"user.v".as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        )
                    })
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
                    out.push(format!("{name} getxattr: {}", fd_row(got)));
                    // SAFETY: as above.
                    let got = len_of(unsafe {
                        libc::listxattr(cproc.as_ptr(), buf.as_mut_ptr().cast(), buf.len())
                    })
                    .map(|n| {
                        let mut v: Vec<String> = buf[..n]
                            .split(|&b| b == 0)
                            .map(|s| String::from_utf8_lossy(s).into_owned())
                            .filter(|s| s.starts_with("user."))
                            .collect();
                        v.sort();
                        v
                    });
                    out.push(format!("{name} listxattr: {}", fd_row(got)));
                }
                if kind == 's' {
                    let mut buf = [0u8; 256];
                    // SAFETY: a valid fd, an empty NUL-terminated path and a writable buffer.
                    let got = len_of(unsafe {
                        libc::readlinkat(
                            fd.as_raw_fd(),
                            c"".as_ptr(),
                            buf.as_mut_ptr().cast(),
                            buf.len(),
                        )
                    })
                    .map(|n| String::from_utf8_lossy(&buf[..n]).into_owned());
                    out.push(format!("{name} readlink: {}", fd_row(got)));
                }
                if kind == 'f' {
                    let got = io(fs::read_to_string(&proc).map(|s| out.push(s)));
                    out.push(format!("{name} reopen: {}", fd_row(got)));
                    let to = cs(&root.join(format!("{name}.linked")));
                    // SAFETY: a valid fd, NUL-terminated paths.
                    let got = rc(unsafe {
                        libc::linkat(
                            fd.as_raw_fd(),
                            c"".as_ptr(),
                            libc::AT_FDCWD,
                            to.as_ptr(),
                            libc::AT_EMPTY_PATH,
                        )
                    });
                    out.push(format!("{name} link: {}", fd_row(got)));
                }
                if kind == 'd' {
                    // As from a working directory: `.` walked, stat-ed and listed.
                    let mut st: libc::stat = unsafe { std::mem::zeroed() };
                    // SAFETY: a valid fd, a NUL-terminated path and a stat buffer.
                    let got =
                        rc(unsafe { libc::fstatat(fd.as_raw_fd(), c".".as_ptr(), &mut st, 0) })
                            .map(|()| format!("{:o} {}", st.st_mode, st.st_nlink));
                    out.push(format!("{name} stat .: {}", fd_row(got)));
                    let got = fs::read_dir(&proc)
                        .map(|d| d.count())
                        .map_err(|e| e.raw_os_error().unwrap());
                    out.push(format!("{name} list: {}", fd_row(got)));
                }
                if origin == "up" {
                    let got = io(fs::set_permissions(
                        &proc,
                        fs::Permissions::from_mode(0o640),
                    ));
                    out.push(format!("{name} chmod: {}", fd_row(got)));
                    let cproc = cs(&proc);
                    let times = [libc::timespec {
                        tv_sec: 5,
                        tv_nsec: 0,
                    }; 2];
                    // SAFETY: NUL-terminated path and a valid times array.
                    let got = rc(unsafe {
                        libc::utimensat(libc::AT_FDCWD, cproc.as_ptr(), times.as_ptr(), 0)
                    });
                    out.push(format!("{name} utimes: {}", fd_row(got)));
                    if matches!(kind, 'f' | 'd') {
                        // SAFETY: NUL-terminated strings and a readable value.
                        let got = rc(unsafe {
                            libc::setxattr(
                                cproc.as_ptr(),
                                c"user.w".as_ptr(),
                                b"2".as_ptr().cast(),
                                1,
                                0,
                            )
                        });
                        out.push(format!("{name} setxattr: {}", fd_row(got)));
                    }
                    if kind == 'f' {
                        let got = OpenOptions::new()
                            .append(true)
                            .open(&proc)
                            .and_then(|mut f| f.write_all(b"+"));
                        out.push(format!("{name} append: {}", fd_row(io(got))));
                        let got = io(fs::read_to_string(&proc).map(|s| out.push(s)));
                        out.push(format!("{name} read again: {}", fd_row(got)));
                    }
                    stat("after", &mut out);
                }
            }
        }
    }
    // An upper file with another name: one name deleted, the file changed through the other,
    // and what an O_PATH descriptor of it shows follows.
    let p = root.join("twice");
    fs::write(&p, "upper").unwrap();
    fs::hard_link(&p, root.join("twice2")).unwrap();
    let held = fs::File::options()
        .custom_flags(libc::O_PATH)
        .read(true)
        .open(&p)
        .unwrap();
    fs::remove_file(&p).unwrap();
    OpenOptions::new()
        .append(true)
        .open(root.join("twice2"))
        .and_then(|mut f| f.write_all(b"+++"))
        .unwrap();
    fs::set_permissions(root.join("twice2"), fs::Permissions::from_mode(0o600)).unwrap();
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
    let got = fs::metadata(&proc)
        .map(|md| {
            format!(
                "mode {:o} size {} nlink {}",
                md.mode(),
                md.size(),
                md.nlink()
            )
        })
        .map_err(|e| e.raw_os_error().unwrap());
    out.push(format!("other name changed: {}", fd_row(got)));
    // An upper file written through an open file after its last name went, which then
    // closes: what an O_PATH descriptor of it shows follows.
    let p = root.join("written");
    fs::write(&p, "upper").unwrap();
    let held = fs::File::options()
        .custom_flags(libc::O_PATH)
        .read(true)
        .open(&p)
        .unwrap();
    let mut w = OpenOptions::new().append(true).open(&p).unwrap();
    fs::remove_file(&p).unwrap();
    w.write_all(b"+++").unwrap();
    drop(w);
    let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
    let got = fs::metadata(&proc)
        .map(|md| format!("size {} nlink {}", md.size(), md.nlink()))
        .map_err(|e| e.raw_os_error().unwrap());
    out.push(format!("written after deletion: {}", fd_row(got)));
    let mut names = names(root);
    names.sort();
    out.push(format!("merged: {names:?}"));
    out
}

#[test]
fn objects_deleted_while_held_answer_as_on_kernel_overlayfs() {
    let l = Layers::new(1);
    let lower = l.lower(0);
    for how in ["rm", "mv"] {
        lower
            .file(&format!("lo_f_{how}"), "lower")
            .xattr(&format!("lo_f_{how}"), "user.v", b"lo")
            .dir(&format!("lo_d_{how}"))
            .xattr(&format!("lo_d_{how}"), "user.v", b"lo")
            .fifo(&format!("lo_p_{how}"))
            .symlink(&format!("lo_s_{how}"), "target-lo");
        mknod(
            &lower.path(&format!("lo_c_{how}")),
            libc::S_IFCHR | 0o600,
            libc::makedev(1, 3),
        );
    }
    age(&l.lowers[0]);
    let k = l.mount_kernel("k");
    assert_both_paths_match(&l, &held_rows(&k.merged), |u| held_rows(&u.merged));
    // unionmount's own answer to a change of a removed lower object: refused, and the name
    // stays deleted (kernel overlayfs brings a FIFO or a device back at its old name).
    let u = l.mount("r");
    for (name, want) in [
        ("lo_f_rm", libc::EEXIST),
        ("lo_p_rm", libc::EEXIST),
        ("lo_c_rm", libc::EEXIST),
        ("lo_d_rm", libc::ENOENT),
    ] {
        let p = u.path(name);
        let held = fs::File::options()
            .custom_flags(libc::O_PATH)
            .read(true)
            .open(&p)
            .unwrap();
        if name == "lo_d_rm" {
            fs::remove_dir(&p).unwrap();
        } else {
            fs::remove_file(&p).unwrap();
        }
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
        let got = io(fs::set_permissions(
            &proc,
            fs::Permissions::from_mode(0o640),
        ));
        assert_eq!(got, Err(want), "{name}");
        assert!(!u.exists(name), "{name} stays deleted");
    }
    assert!(
        names(&l.lowers[0]).len() == 10,
        "the lower layer keeps its objects"
    );
    drop(u);
    // An upper file with a hard link the view has not looked up (made before the mount):
    // one name deleted, the file changed through the other. On the page-cached path the
    // FUSE kernel keeps its own size of the deleted name's inode (README).
    let page_cached = env_args::<&str>(&[])
        .join(" ")
        .contains("--passthrough off");
    let base = l.root().join("hidden");
    for side in ["ours", "kernel"] {
        let up = base.join(side).join("upper");
        fs::create_dir_all(&up).unwrap();
        fs::write(up.join("v"), "abc").unwrap();
        fs::hard_link(up.join("v"), up.join("v_hidden")).unwrap();
    }
    on_both(
        &l.lowerdir_opt(),
        &base.join("ours"),
        &base.join("kernel"),
        |m| {
            let held = fs::File::options()
                .custom_flags(libc::O_PATH)
                .read(true)
                .open(m.path("v"))
                .unwrap();
            let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
            let row = |what: &str| {
                let md = fs::metadata(&proc).unwrap();
                let size = if page_cached { 0 } else { md.size() };
                format!(
                    "{what}: mode {:o} size {size} nlink {}",
                    md.mode(),
                    md.nlink()
                )
            };
            fs::remove_file(m.path("v")).unwrap();
            let mut rows = vec![row("deleted")];
            OpenOptions::new()
                .append(true)
                .open(m.path("v_hidden"))
                .and_then(|mut f| f.write_all(b"+++"))
                .unwrap();
            fs::set_permissions(m.path("v_hidden"), fs::Permissions::from_mode(0o600)).unwrap();
            rows.push(row("changed"));
            fs::remove_file(m.path("v_hidden")).unwrap();
            rows.push(row("both deleted"));
            rows
        },
    );
    // With `xattr_permissions`, a removed object shows the owner the view gave it.
    let u = l.mount_with("x", &["-o", "xattr_permissions=2"]);
    let mut rows = Vec::new();
    for (name, how) in [("xd", "rmdir"), ("xf", "unlink"), ("xg", "rename over")] {
        let p = u.path(name);
        if name == "xd" {
            fs::create_dir(&p).unwrap();
        } else {
            fs::write(&p, "x").unwrap();
        }
        std::os::unix::fs::lchown(&p, Some(1234), Some(1234)).unwrap();
        let held = fs::File::options()
            .custom_flags(libc::O_PATH)
            .read(true)
            .open(&p)
            .unwrap();
        match how {
            "rmdir" => fs::remove_dir(&p).unwrap(),
            "unlink" => fs::remove_file(&p).unwrap(),
            _ => {
                fs::write(u.path("other"), "y").unwrap();
                fs::rename(u.path("other"), &p).unwrap();
            }
        }
        let proc = format!("/proc/self/fd/{}", std::os::fd::AsRawFd::as_raw_fd(&held));
        let md = fs::metadata(&proc).unwrap();
        rows.push(format!("{name}: {} {}", md.uid(), md.gid()));
    }
    assert_eq!(rows, ["xd: 1234 1234", "xf: 1234 1234", "xg: 1234 1234"]);
}

/// The xattr names `path` lists to `user` (None: root), one per line, sorted.
fn listed_xattrs(path: &Path, user: Option<&str>) -> String {
    let script = "import os, sys; print(sorted(os.listxattr(sys.argv[1], follow_symlinks=False)))";
    let mut cmd = match user {
        Some(u) => {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", u, "--regid", u, "--clear-groups", "--"]);
            c.arg("/usr/bin/python3");
            c
        }
        None => Command::new("/usr/bin/python3"),
    };
    let out = cmd.args(["-I", "-c", script]).arg(path).output().unwrap();
    assert!(
        out.status.success(),
        "listxattr {} as {user:?}: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// `trusted.*` xattr names are listed only to callers with CAP_SYS_ADMIN, as ext4 and kernel
/// overlayfs list them; the daemon reads them all, and used to list them to everybody.
#[test]
fn trusted_xattr_names_are_listed_only_to_the_privileged() {
    let l = Layers::new(1);
    l.lower(0)
        .file("f", "x")
        .xattr("f", "trusted.secret", b"s")
        .xattr("f", "user.public", b"p")
        .dir("d")
        .xattr("d", "trusted.secret", b"s");
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let k = l.mount_kernel("k");
    let u = l.mount("u");
    for (rel, root_sees, nobody_sees) in [
        ("f", "['trusted.secret', 'user.public']", "['user.public']"),
        ("d", "['trusted.secret']", "[]"),
    ] {
        for (user, want) in [(None, root_sees), (Some("65534"), nobody_sees)] {
            assert_eq!(
                listed_xattrs(&k.path(rel), user),
                want,
                "kernel: {rel} as {user:?}"
            );
            assert_eq!(listed_xattrs(&u.path(rel), user), want, "{rel} as {user:?}");
        }
    }
}

/// One inode in two lower layers (layers made with hard links: `cp -al`, or a pull that links
/// files it already has): every name reads, and changes copy each name up, as on kernel
/// overlayfs. The node of such an inode has names from both layers; the second name used to
/// answer ENOENT (its object was looked for in the first name's layer).
#[test]
fn one_inode_in_two_lower_layers() {
    let l = Layers::new(2);
    l.lower(0).file("x", "shared").file("d/w", "deep");
    l.lower(1).dir("d").dir("e");
    fs::hard_link(l.lower(0).path("x"), l.lower(1).path("y")).unwrap();
    fs::hard_link(l.lower(0).path("d/w"), l.lower(1).path("e/v")).unwrap();
    let ops = [
        Append("y", "+y"),
        Append("e/v", "+v"),
        Chmod("x", 0o600),
        Append("x", "+x"),
        Link("d/w", "d/w2"),
        Unlink("y"),
    ];
    run_both(&l, &ops, "one inode in two lower layers");
    assert_eq!(fs::read_to_string(l.lower(0).path("x")).unwrap(), "shared");
    assert_eq!(fs::read_to_string(l.lower(1).path("e/v")).unwrap(), "deep");
}

/// An upper written by kernel overlayfs with `metacopy=on`: a chmod copies up the metadata
/// only, and the file's data stays in the lower file, which the kernel finds through its
/// origin. unionmount does not follow it: opening such a file, writing it (truncating or
/// not) and copying it up from a lower layer are refused (EPERM, as kernel overlayfs refuses
/// the file without `metacopy=on`); it used to read as zeros, also after a chmod copied it up.
/// A `user.overlay.metacopy` on a root mount is a layer's own xattr, as for the kernel.
#[test]
fn a_metadata_only_copy_is_refused_not_read_as_zeros() {
    let l = Layers::new(1);
    l.lower(0)
        .file("f", "lower data")
        .file("g", "other")
        .file("h", "own xattr")
        .xattr("h", "user.overlay.metacopy", b"");
    let base = l.mkdir("x");
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    let mut k = kernel_at_with(&l, &upper, &work, &merged, &["metacopy=on"]);
    fs::set_permissions(k.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(fs::read_to_string(k.path("f")).unwrap(), "lower data");
    k.unmount();
    assert_eq!(fs::metadata(upper.join("f")).unwrap().len(), 10);
    {
        // The kernel's upper as unionmount's upper.
        let u = union_at(&l, &upper, &base.join("uwork"), &base.join("umerged"));
        assert_eq!(errno(fs::read(u.path("f"))), libc::EPERM);
        let append = OpenOptions::new().append(true).open(u.path("f"));
        assert_eq!(errno(append), libc::EPERM);
        assert_eq!(errno(fs::write(u.path("f"), "new")), libc::EPERM);
        assert_eq!(fs::read_to_string(u.path("g")).unwrap(), "other");
        assert_eq!(fs::read_to_string(u.path("h")).unwrap(), "own xattr");
    }
    // The kernel's upper as a lower layer: a change copies it up, which is refused.
    let (upper2, work2, merged2) = (
        base.join("upper2"),
        base.join("work2"),
        base.join("merged2"),
    );
    for d in [&upper2, &work2, &merged2] {
        fs::create_dir_all(d).unwrap();
    }
    let lowers = format!("{}:{}", upper.display(), l.lowerdir_opt());
    let args: Vec<OsString> = vec![
        "--lower".into(),
        lowers.into(),
        "--upper".into(),
        upper2.clone().into(),
        "--work".into(),
        work2.clone().into(),
        merged2.clone().into(),
    ];
    let u = Mount::union(&args, merged2, Some(upper2), Some(work2));
    let chmod = fs::set_permissions(u.path("f"), fs::Permissions::from_mode(0o644));
    assert_eq!(errno(chmod), libc::EPERM);
    assert_eq!(errno(fs::read(u.path("f"))), libc::EPERM);
    assert!(!u.upper_path("f").exists());
    assert_eq!(
        fs::read_to_string(l.lower(0).path("f")).unwrap(),
        "lower data"
    );
}

/// Directories renamed by kernel overlayfs with `redirect_dir=on` carry `overlay.redirect`
/// (a name in the same parent, or a path from the layer roots after a move to another
/// parent), which the kernel follows by default. unionmount follows it too: the renamed
/// directories show their lower contents, which can be read, changed and deleted, and the
/// kernel shows the result the same way.
#[test]
fn directories_renamed_with_redirects_keep_their_lower_contents() {
    let l = Layers::new(2);
    l.lower(0)
        .file("a/f", "a0")
        .file("a/sub/g", "g0")
        .file("b/x", "x0")
        .file("c/deep/y", "y0");
    l.lower(1)
        .file("a/lowest", "l1")
        .file("b/under", "u1")
        .file("c/deep/z", "z1");
    age_all(&l);
    let base = l.mkdir("x");
    let (upper, work, merged) = (base.join("upper"), base.join("work"), base.join("merged"));
    let mut k = kernel_at_with(&l, &upper, &work, &merged, &["redirect_dir=on"]);
    fs::rename(k.path("a"), k.path("a2")).unwrap();
    fs::create_dir(k.path("new")).unwrap();
    fs::rename(k.path("b"), k.path("new/b2")).unwrap();
    fs::rename(k.path("c/deep"), k.path("new/deep2")).unwrap();
    fs::remove_file(k.path("a2/sub/g")).unwrap();
    fs::write(k.path("a2/added"), "new").unwrap();
    let o = TreeOpts::default();
    let seen = tree(&k.merged, &o);
    k.unmount();
    let redirect = |p: &str| get_xattr(&upper.join(p), "trusted.overlay.redirect");
    assert_eq!(redirect("a2").as_deref(), Ok(&b"a"[..]));
    assert_eq!(redirect("new/b2").as_deref(), Ok(&b"/b"[..]));
    assert_eq!(redirect("new/deep2").as_deref(), Ok(&b"/c/deep"[..]));
    assert!(seen.contains_key("new/b2/under") && !seen.contains_key("a"));

    let mut u = union_at(&l, &upper, &base.join("uwork"), &base.join("umerged"));
    assert_same_tree(&seen, &tree(&u.merged, &o), "redirected directories");
    assert_no_private_xattrs(&u.merged);
    assert_eq!(fs::read_to_string(u.path("new/b2/under")).unwrap(), "u1");
    assert_eq!(fs::read_to_string(u.path("a2/lowest")).unwrap(), "l1");
    // A copy-up into a redirected directory, a deletion there (a whiteout: the lower file
    // is reached through the redirect), and the rename of a merged directory (EXDEV).
    fs::write(u.path("new/deep2/y"), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(u.upper_path("new/deep2/y")).unwrap(),
        "changed"
    );
    fs::remove_file(u.path("a2/f")).unwrap();
    fs::remove_file(u.path("new/b2/under")).unwrap();
    assert_eq!(errno(fs::rename(u.path("a2"), u.path("a3"))), libc::EXDEV);
    let changed = tree(&u.merged, &o);
    assert!(!changed.contains_key("a2/f") && changed.contains_key("new/b2/x"));
    u.unmount();
    assert_eq!(
        fs::read_to_string(l.lower(0).path("c/deep/y")).unwrap(),
        "y0"
    );

    let k = kernel_at(&l, &upper, &base.join("kwork"), &base.join("kmerged"));
    assert_same_tree(
        &changed,
        &tree(&k.merged, &o),
        "unionmount's changes under kernel",
    );
}

/// As root, kernel overlayfs's own xattrs are `trusted.overlay.*`: a layer's `user.overlay.*`
/// names (but the opaque and whiteout markers, read in every layer) are ordinary xattrs,
/// listed, copied up and settable as on kernel overlayfs. They used to be hidden and lost at
/// copy-up.
#[test]
fn user_overlay_xattrs_are_ordinary_as_root() {
    let l = Layers::new(1);
    l.lower(0)
        .file("f", "x")
        .xattr("f", "user.overlay.note", b"hello")
        .xattr("f", "user.other", b"1")
        .file("g", "y");
    age_all(&l);
    let ops = [
        Chmod("f", 0o600),
        SetXattr("g", "user.overlay.mine", "v"),
        SetXattr("g", "user.overlay.overlay.nested", "n"),
    ];
    run_both(&l, &ops, "user.overlay xattrs as root");
    let u = l.mount("u2");
    assert_eq!(
        listed_xattrs(&u.path("f"), None),
        "['user.other', 'user.overlay.note']"
    );
    fs::set_permissions(u.path("f"), fs::Permissions::from_mode(0o600)).unwrap();
    assert_eq!(
        get_xattr(&u.upper_path("f"), "user.overlay.note").as_deref(),
        Ok(&b"hello"[..])
    );
}

/// Access times of upper files, as kernel overlayfs keeps them: a read times the upper file
/// (relatime) unless the mount is `noatime` (which unionmount used to show in the mount's
/// options without effect), and an append through a descriptor that cannot read leaves it,
/// also on the page-cached path, where the kernel reads back the page a write covers in part
/// (the daemon's read used to time the file).
#[test]
fn access_times_of_upper_files_as_kernel_overlayfs() {
    let l = Layers::new(1);
    l.lower(0).file("lower", "l");
    let cases: [(&str, bool, &[&str]); 6] = [
        ("kernel", true, &[]),
        ("kernel-noatime", true, &["noatime"]),
        ("union", false, &[]),
        ("union-noatime", false, &["-o", "noatime"]),
        ("cached", false, &["--passthrough", "off"]),
        (
            "cached-noatime",
            false,
            &["--passthrough", "off", "-o", "noatime"],
        ),
    ];
    for (name, kernel, extra) in cases {
        let upper = l.mkdir(&format!("{name}/upper"));
        for f in ["read", "append"] {
            fs::write(upper.join(f), f).unwrap();
            set_times(&upper.join(f), 1000, 2000);
        }
        let m = mount_either(&l, name, kernel, extra);
        assert_eq!(fs::read(m.path("read")).unwrap(), b"read");
        let mut f = OpenOptions::new()
            .append(true)
            .open(m.path("append"))
            .unwrap();
        f.write_all(b"+").unwrap();
        f.sync_all().unwrap();
        drop(f);
        let timed = |f: &str| fs::metadata(upper.join(f)).unwrap().atime() != 1000;
        let noatime = name.ends_with("noatime");
        let row = (name, timed("read"), timed("append"));
        assert_eq!(
            row,
            (name, !noatime, false),
            "(mount, read timed, append timed)"
        );
        assert_eq!(fs::read(upper.join("append")).unwrap(), b"append+");
    }
}

/// chown(2) to -1, -1 changes nothing but the change time, which moves on ext4 and on kernel
/// overlayfs (after a copy-up); the kernel sends it to FUSE as a setattr of nothing, which
/// used to change no time at all.
#[test]
fn a_chown_to_no_owner_moves_the_change_time() {
    let l = Layers::new(1);
    l.lower(0).file("lower", "l").dir("ldir");
    age_all(&l);
    let lchown = |p: &Path| {
        // SAFETY: a valid NUL-terminated path.
        rc(unsafe { libc::lchown(cs(p).as_ptr(), u32::MAX, u32::MAX) })
    };
    let kinds: [(&str, bool, &[&str]); 3] = [
        ("kernel", true, &[]),
        ("union", false, &[]),
        ("cached", false, &["--passthrough", "off"]),
    ];
    for (name, kernel, extra) in kinds {
        let m = mount_either(&l, name, kernel, extra);
        fs::write(m.path("file"), "f").unwrap();
        fs::create_dir(m.path("dir")).unwrap();
        for p in ["file", "dir", "lower", "ldir"] {
            let before = fs::symlink_metadata(m.path(p)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            assert_eq!(lchown(&m.path(p)), Ok(()), "{name}: {p}");
            let after = fs::symlink_metadata(m.path(p)).unwrap();
            let moved =
                (after.ctime(), after.ctime_nsec()) != (before.ctime(), before.ctime_nsec());
            assert!(moved, "{name}: {p}: the change time did not move");
            assert_eq!(
                (after.uid(), after.gid(), after.mode()),
                (before.uid(), before.gid(), before.mode()),
                "{name}: {p}"
            );
        }
        assert!(m.upper_path("lower").exists(), "{name}: copied up");
    }
}

/// Truncates set mtime and ctime, also to a file's own size (ext4 and kernel overlayfs set
/// them for truncate(2) and ftruncate(2) alike), and a lower file keeps its mtime through
/// the copy-up of a truncate to its size only where the kernel does. On the page-cached path
/// the kernel keeps the times of a file it caches and moves them only for a new size (README,
/// Known limitations), so that path is not compared.
#[test]
fn truncates_set_times_as_on_kernel_overlayfs() {
    let l = Layers::new(1);
    l.lower(0).file("lower", "0123");
    age_all(&l);
    let kinds: [(&str, bool, &[&str]); 2] = [("kernel", true, &[]), ("union", false, &[])];
    let mut all = Vec::new();
    for (name, kernel, extra) in kinds {
        let m = mount_either(&l, name, kernel, extra);
        let mut rows = Vec::new();
        for (f, how, len) in [
            ("a", "truncate", 4),
            ("b", "truncate", 2),
            ("c", "ftruncate", 4),
            ("lower", "truncate", 4),
        ] {
            if f != "lower" {
                fs::write(m.path(f), "0123").unwrap();
                set_times(&m.path(f), 1000, 2000);
            }
            let before = fs::symlink_metadata(m.path(f)).unwrap();
            std::thread::sleep(std::time::Duration::from_millis(20));
            if how == "truncate" {
                // SAFETY: a valid NUL-terminated path.
                rc(unsafe { libc::truncate(cs(&m.path(f)).as_ptr(), len) }).unwrap();
            } else {
                let h = OpenOptions::new().write(true).open(m.path(f)).unwrap();
                h.set_len(len as u64).unwrap();
            }
            let after = fs::symlink_metadata(m.path(f)).unwrap();
            let moved = |a: (i64, i64), b: (i64, i64)| a != b;
            rows.push(format!(
                "{f} {how} to {len}: size {}, mtime moved {}, ctime moved {}",
                after.len(),
                moved(
                    (after.mtime(), after.mtime_nsec()),
                    (before.mtime(), before.mtime_nsec())
                ),
                moved(
                    (after.ctime(), after.ctime_nsec()),
                    (before.ctime(), before.ctime_nsec())
                ),
            ));
        }
        all.push((name, rows));
    }
    for (name, rows) in &all[1..] {
        assert_eq!(rows, &all[0].1, "{name} against kernel overlayfs");
    }
}

/// Redirects that lead nowhere or that the kernel refuses, written into an upper by hand:
/// each directory answers as on kernel overlayfs (a component too long is "not found", so
/// the directory shows its upper contents; `..` and a value that starts with NUL, an empty
/// name, are refused with EACCES, an empty component with EINVAL).
#[test]
fn odd_redirects_answer_as_on_kernel_overlayfs() {
    let l = Layers::new(1);
    l.lower(0).file("x/lower", "l");
    let long = format!("/x/{}", "n".repeat(300));
    let cases: [(&str, &[u8]); 7] = [
        ("long", long.as_bytes()),
        ("dotdot", b"/x/../x"),
        ("empty", b"/x//y"),
        ("missing", b"/nowhere"),
        ("slash", b"a/b"),
        ("nul", b"\0"),
        ("nulpath", b"\0/x"),
    ];
    let base = l.mkdir("x");
    let mut rows = Vec::new();
    for kernel in [true, false] {
        let side = if kernel { "k" } else { "u" };
        let upper = base.join(format!("{side}upper"));
        for (d, value) in cases {
            fs::create_dir_all(upper.join(d)).unwrap();
            fs::write(upper.join(d).join("u"), "u").unwrap();
            set_xattr(&upper.join(d), "trusted.overlay.redirect", value);
        }
        let (work, merged) = (
            base.join(format!("{side}work")),
            base.join(format!("{side}m")),
        );
        let m = if kernel {
            kernel_at(&l, &upper, &work, &merged)
        } else {
            union_at(&l, &upper, &work, &merged)
        };
        let mut seen = Vec::new();
        for (d, _) in cases {
            let listed = fs::read_dir(m.path(d)).map(|r| {
                let mut names: Vec<String> = r
                    .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                names
            });
            seen.push(format!("{d}: {:?}", listed.map_err(|e| e.raw_os_error())));
        }
        rows.push(seen);
    }
    assert_eq!(rows[1], rows[0], "unionmount against kernel overlayfs");
}

/// On an xfs upper, which takes no device minor of 2^18 or more, a character device 0/0 made
/// through the view is stored as the narrow stand-in (0:262143) and reads back as 0/0, also
/// after a remount; RENAME_WHITEOUT, which leaves such a device, works, so kernel overlayfs
/// nests on the mount (it refuses an upper without RENAME_WHITEOUT).
#[test]
fn an_xfs_upper_holds_device_0_0_and_nested_overlays() {
    let l = Layers::new(1);
    l.lower(0)
        .file("in/lo/b", "b")
        .file("in/lo/c", "c")
        .dir("in/up")
        .dir("in/wk")
        .dir("in/mnt");
    let img = l.root().join("upper.xfs");
    fs_image(&img, 300 << 20, &["mkfs.xfs", "-q", "-f"], "xfsprogs");
    let x = l.mkdir("xfs");
    let _x = scratch_mount(&["-o", "loop"], &img, &x);
    let (upper, work, merged) = (x.join("upper"), x.join("work"), l.root().join("merged"));
    let m = union_at(&l, &upper, &work, &merged);
    mknod(&m.path("z"), libc::S_IFCHR | 0o600, 0);
    let st = fs::symlink_metadata(m.path("z")).unwrap();
    assert!(std::os::unix::fs::FileTypeExt::is_char_device(
        &st.file_type()
    ));
    assert_eq!(st.rdev(), 0);
    let stored = fs::symlink_metadata(upper.join("z")).unwrap().rdev();
    assert_eq!((libc::major(stored), libc::minor(stored)), (0, 0x3ffff));
    {
        let lower = m.path("in/lo").display().to_string();
        let (up, wk, mnt) = (m.path("in/up"), m.path("in/wk"), m.path("in/mnt"));
        let n = Mount::kernel(&lower, &up, &wk, &mnt, &[]);
        fs::remove_file(n.path("b")).unwrap();
        fs::rename(n.path("c"), n.path("c2")).unwrap();
        assert_eq!(n.ls(""), vec!["c2"]);
        assert_eq!(n.read("c2"), "c");
    }
    drop(m);
    let m = union_at(&l, &upper, &work, &merged);
    assert_eq!(fs::symlink_metadata(m.path("z")).unwrap().rdev(), 0);
    assert!(
        !m.path("in/up/b")
            .symlink_metadata()
            .unwrap()
            .file_type()
            .is_file()
    );
}

/// An upper without extended attributes (ramfs): a directory made over a lower one or moved
/// into a merged one is marked opaque with the AUFS marker (which every layer is read for)
/// instead of failing with EOPNOTSUPP; kernel overlayfs answers EIO and EXDEV there. The view
/// stays the same across a remount.
#[test]
fn an_upper_without_xattrs_marks_opaque_directories_with_a_marker() {
    let l = Layers::new(1);
    l.lower(0).file("f", "f").file("ld/old", "o");
    let r = l.mkdir("ramfs");
    let _r = scratch_mount(&["-t", "ramfs"], "ramfs", &r);
    let (upper, work, merged) = (r.join("upper"), r.join("work"), l.root().join("merged"));
    let m = union_at(&l, &upper, &work, &merged);
    fs::create_dir(m.path("new")).unwrap();
    fs::rename(m.path("new"), m.path("new2")).unwrap();
    fs::remove_dir_all(m.path("ld")).unwrap();
    fs::create_dir(m.path("ld")).unwrap();
    fs::write(m.path("ld/x"), "x").unwrap();
    let check = |m: &Mount, what: &str| {
        assert_eq!(m.ls(""), vec!["f", "ld", "new2"], "{what}");
        assert_eq!(m.ls("ld"), vec!["x"], "{what}");
    };
    check(&m, "view");
    assert!(upper.join("ld/.wh..wh..opq").exists());
    drop(m);
    let m = union_at(&l, &upper, &work, &merged);
    check(&m, "after a remount");
    fs::remove_dir_all(m.path("ld")).unwrap();
    assert_eq!(m.ls(""), vec!["f", "new2"]);
}
