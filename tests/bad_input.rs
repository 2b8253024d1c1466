//! Startup refusals (SPEC §2, §6) beyond the ones the command-line tests cover: malformed
//! option values, overlapping layers in the remaining directions, filesystem boundaries,
//! symlinked and dangling paths, odd characters in paths.
//!
//! Every case asserts the same four things: exactly one stderr line, starting with
//! `unionmount:` and naming the offending option or path; a non-zero exit; nothing mounted
//! at the mountpoint (nor anywhere under the test's temporary root); and nothing changed on
//! disk — the whole temporary tree (layers, work directory, mountpoint) has the same names,
//! kinds, modes, inode numbers, sizes, contents and mtimes before and after.

mod common;

use common::*;

use std::ffi::OsString;
use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

// ---------------------------------------------------------------------------------------------
// The refusal check
// ---------------------------------------------------------------------------------------------

/// Runs unionmount with `args` and checks that it refused: one `unionmount:` line containing
/// every one of `words` (case-insensitive), non-zero exit, nothing mounted at `merged` or
/// under the root, the tree under the root unchanged. Returns the problems found.
fn refused(
    root: &Path,
    what: &str,
    args: &[OsString],
    merged: &Path,
    words: &[&str],
) -> Vec<String> {
    refusal(root, what, Command::new(BIN).args(args), merged, words)
}

fn assert_none(fails: Vec<String>) {
    assert!(
        fails.is_empty(),
        "{} problem(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

fn os<P: AsRef<Path>>(p: P) -> OsString {
    p.as_ref().as_os_str().to_owned()
}

fn s<P: AsRef<Path>>(p: P) -> String {
    p.as_ref().to_string_lossy().into_owned()
}

/// The test's layers: lower0 (a, d/x), lower1 (b, d/y), and `m/{upper,work,merged}` with a
/// file in the upper and a stale entry in the work directory, so a change to either shows.
struct Fixture {
    l: Layers,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let l = Layers::new(2);
        l.lower(0).file("a", "from lower0").file("d/x", "x");
        l.lower(1).file("b", "from lower1").file("d/y", "y");
        let upper = l.mkdir("m/upper");
        let work = l.mkdir("m/work");
        let merged = l.mkdir("m/merged");
        fs::write(upper.join("u"), "upper file").unwrap();
        fs::create_dir_all(work.join("work/stale")).unwrap();
        fs::write(l.root().join("afile"), "not a directory").unwrap();
        Fixture {
            l,
            upper,
            work,
            merged,
        }
    }

    fn root(&self) -> &Path {
        self.l.root()
    }

    /// The usual good layers plus `extra` options, as the native and the -o form.
    fn with_opts(&self, opt: &str) -> [Vec<OsString>; 2] {
        let mut n = native_args(
            &self.l.lower_paths(),
            Some(&self.upper),
            Some(&self.work),
            &self.merged,
        );
        n.insert(0, os(opt));
        n.insert(0, os("-o"));
        let mut o = overlay_args(
            Some("badinput"),
            &self.l.lower_paths(),
            Some(&self.upper),
            Some(&self.work),
            &self.merged,
        );
        let last = o.len() - 1;
        let mut v = o[last].clone();
        v.push(",");
        v.push(opt);
        o[last] = v;
        [n, o]
    }

    /// One layer configuration, tried in both forms.
    fn both_forms(
        &self,
        what: &str,
        lowers: &[&Path],
        upper: Option<&Path>,
        work: Option<&Path>,
        merged: &Path,
        words: &[&str],
    ) -> Vec<String> {
        let mut fails = refused(
            self.root(),
            &format!("{what} (native)"),
            &native_args(lowers, upper, work, merged),
            merged,
            words,
        );
        fails.extend(refused(
            self.root(),
            &format!("{what} (-o)"),
            &overlay_args(Some("badinput"), lowers, upper, work, merged),
            merged,
            words,
        ));
        fails
    }
}

// ---------------------------------------------------------------------------------------------
// Option values
// ---------------------------------------------------------------------------------------------

/// A known option with a bad value is an error naming the option (SPEC §2), in both forms.
#[test]
fn malformed_option_values() {
    let f = Fixture::new();
    let mut fails = Vec::new();
    for (opt, word) in [
        ("uidmapping=garbage", "uidmapping"),
        ("uidmapping=0:1000:0", "uidmapping"),
        ("uidmapping=4294967295:0:2", "uidmapping"),
        ("uidmapping=0:1000:1:5", "uidmapping"),
        ("uidmapping=", "uidmapping"),
        ("gidmapping=0:0:99999999999", "gidmapping"),
        ("gidmapping=-1:0:1", "gidmapping"),
        ("timeout=abc", "timeout"),
        ("timeout=-1", "timeout"),
        ("timeout=nan", "timeout"),
        ("timeout=inf", "timeout"),
        ("timeout=1e10", "timeout"),
        ("timeout=", "timeout"),
        ("xattr_permissions=7", "xattr_permissions"),
        ("xattr_permissions=", "xattr_permissions"),
        ("xattr_permissions=one", "xattr_permissions"),
        ("squash_to_uid=x", "squash_to_uid"),
        ("squash_to_uid=4294967296", "squash_to_uid"),
        ("squash_to_uid=", "squash_to_uid"),
        ("squash_to_gid=1.5", "squash_to_gid"),
        ("fsync=maybe", "fsync"),
        ("fsync=", "fsync"),
        ("threaded=", "threaded"),
        ("threaded=-1", "threaded"),
        ("fsname=", "fsname"),
    ] {
        let [n, o] = f.with_opts(opt);
        fails.extend(refused(
            f.root(),
            &format!("{opt} (native)"),
            &n,
            &f.merged,
            &[word],
        ));
        fails.extend(refused(
            f.root(),
            &format!("{opt} (-o)"),
            &o,
            &f.merged,
            &[word],
        ));
    }
    assert_none(fails);
}

/// Bad values of the daemon's own flags, and layer options given twice or emptied.
#[test]
fn malformed_flags_and_layer_options() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let good = native_args(&lo, Some(&f.upper), Some(&f.work), &f.merged);
    let mut fails = Vec::new();
    for (flag, value, word) in [
        ("--passthrough", "maybe", "passthrough"),
        ("--log-level", "loud", "log-level"),
        ("--threads", "2000", "threads"),
        ("--threads", "abc", "threads"),
        ("--threads", "-1", "-1"),
        ("--threads", "", "threads"),
        ("--spin-us", "20000", "spin-us"),
        ("--spin-us", "-5", "-5"),
    ] {
        let mut a = vec![os(flag), os(value)];
        a.extend(good.iter().cloned());
        fails.extend(refused(
            f.root(),
            &format!("{flag} {value:?}"),
            &a,
            &f.merged,
            &[word],
        ));
    }
    let u = esc_layer(&f.upper);
    let w = esc_layer(&f.work);
    let l0 = esc_layer(lo[0]);
    let l1 = esc_layer(lo[1]);
    for (what, o, words) in [
        (
            "upperdir twice",
            format!("lowerdir={l0},upperdir={u},upperdir={u},workdir={w}"),
            &["upper", "twice"][..],
        ),
        (
            "workdir twice",
            format!("lowerdir={l0},upperdir={u},workdir={w},workdir={w}"),
            &["work", "twice"],
        ),
        (
            "lowerdir twice",
            format!("lowerdir={l0},lowerdir={l1},upperdir={u},workdir={w}"),
            &["lower", "twice"],
        ),
        (
            "empty upperdir=",
            format!("lowerdir={l0},upperdir=,workdir={w}"),
            &["upperdir"],
        ),
        (
            "empty workdir=",
            format!("lowerdir={l0},upperdir={u},workdir="),
            &["workdir"],
        ),
        (
            "an empty layer in the middle",
            format!("lowerdir={l0}::{l1}"),
            &["empty layer"],
        ),
        (
            "an empty first layer",
            format!("lowerdir=:{l0}"),
            &["empty layer"],
        ),
        (
            "workdir= without upperdir=",
            format!("lowerdir={l0},workdir={w}"),
            &["work", "upper"],
        ),
    ] {
        fails.extend(refused(
            f.root(),
            what,
            &[os("src"), os(&f.merged), os("-o"), o.into()],
            &f.merged,
            words,
        ));
    }
    // --work without --upper, native form.
    fails.extend(refused(
        f.root(),
        "--work without --upper",
        &native_args(&lo, None, Some(&f.work), &f.merged),
        &f.merged,
        &["work", "upper"],
    ));
    // A source name that cannot be a FUSE fsname.
    let o = format!("lowerdir={l0}");
    fails.extend(refused(
        f.root(),
        "a source with a comma",
        &[os("a,b"), os(&f.merged), os("-o"), o.clone().into()],
        &f.merged,
        &["source", "a,b"],
    ));
    fails.extend(refused(
        f.root(),
        "fsname= with an escaped comma",
        &[os(&f.merged), os("-o"), format!("{o},fsname=x\\,y").into()],
        &f.merged,
        &["source"],
    ));
    assert_none(fails);
}

/// `-o remount` on a directory that is not mounted: refused, nothing changed.
#[test]
fn remount_of_something_not_mounted() {
    let f = Fixture::new();
    let mut fails = refused(
        f.root(),
        "remount of a plain directory",
        &[os("src"), os(&f.merged), os("-o"), os("remount,ro")],
        &f.merged,
        &[],
    );
    let missing = f.root().join("m/nomerged");
    fails.extend(refused(
        f.root(),
        "remount of a missing directory",
        &[os("src"), os(&missing), os("-o"), os("remount,rw")],
        &missing,
        &["nomerged"],
    ));
    assert_none(fails);
}

// ---------------------------------------------------------------------------------------------
// Layer paths
// ---------------------------------------------------------------------------------------------

/// Overlaps the command-line tests do not try: the upper or a lower inside the work
/// directory, one lower inside another, the work directory or the mountpoint inside the
/// other, and overlaps spelled through symlinks.
#[test]
fn nested_layers_in_the_remaining_directions() {
    let f = Fixture::new();
    let r = f.root().to_path_buf();
    let lo = f.l.lower_paths();
    let in_work = f.l.mkdir("m/work/inner");
    let in_l0 = f.l.mkdir("lower0/inner");
    let in_merged = f.l.mkdir("m/merged/inner");
    let other_upper = f.l.mkdir("m2/upper");
    let other_work = f.l.mkdir("m2/work");
    symlink(&f.upper, r.join("upper-link")).unwrap();
    symlink(lo[0], r.join("lower0-link")).unwrap();
    let mut fails = Vec::new();
    let c = &mut fails;
    c.extend(f.both_forms(
        "upper inside work",
        &lo,
        Some(&in_work),
        Some(&f.work),
        &f.merged,
        &["inside", "work"],
    ));
    c.extend(f.both_forms(
        "lower inside work",
        &[lo[0], &in_work],
        Some(&f.upper),
        Some(&f.work),
        &f.merged,
        &["inside", "work"],
    ));
    c.extend(f.both_forms(
        "a lower inside another lower",
        &[lo[0], &in_l0],
        None,
        None,
        &f.merged,
        &["inside", "lower"],
    ));
    c.extend(f.both_forms(
        "a lower inside the next lower",
        &[&in_l0, lo[0]],
        None,
        None,
        &f.merged,
        &["inside", "lower"],
    ));
    c.extend(f.both_forms(
        "work inside the mountpoint",
        &lo,
        Some(&other_upper),
        Some(&in_merged),
        &f.merged,
        &["inside", "mountpoint"],
    ));
    c.extend(f.both_forms(
        "upper inside the mountpoint",
        &lo,
        Some(&in_merged),
        Some(&other_work),
        &f.merged,
        &["inside", "mountpoint"],
    ));
    c.extend(f.both_forms(
        "mountpoint inside work",
        &lo,
        Some(&f.upper),
        Some(&f.work),
        &in_work,
        &["inside", "work"],
    ));
    c.extend(f.both_forms(
        "mountpoint equal to upper via a symlink",
        &lo,
        Some(&f.upper),
        Some(&f.work),
        &r.join("upper-link"),
        &["mountpoint", "layer"],
    ));
    c.extend(f.both_forms(
        "upper equal to a lower via a symlink",
        &lo,
        Some(&r.join("lower0-link")),
        Some(&f.work),
        &f.merged,
        &["same"],
    ));
    c.extend(f.both_forms(
        "mountpoint inside a lower via a symlink",
        &lo,
        Some(&f.upper),
        Some(&f.work),
        &r.join("lower0-link/inner"),
        &["mountpoint", "inside"],
    ));
    assert_none(fails);
}

/// Paths that do not lead to a usable directory: a dangling symlink (as a layer or as a
/// component), a symlink loop, a regular file as a component, a name longer than PATH_MAX.
#[test]
fn dangling_and_unusable_layer_paths() {
    let f = Fixture::new();
    let r = f.root().to_path_buf();
    let lo = f.l.lower_paths();
    symlink(r.join("nowhere"), r.join("dangling")).unwrap();
    symlink(r.join("loop-b"), r.join("loop-a")).unwrap();
    symlink(r.join("loop-a"), r.join("loop-b")).unwrap();
    symlink(r.join("afile"), r.join("file-link")).unwrap();
    let long = r
        .join("x".repeat(200))
        .join("y".repeat(200))
        .join("z".repeat(4000));
    let mut fails = Vec::new();
    let c = &mut fails;
    let (u, w, m) = (
        Some(f.upper.as_path()),
        Some(f.work.as_path()),
        f.merged.as_path(),
    );
    c.extend(f.both_forms(
        "lower is a dangling symlink",
        &[lo[0], &r.join("dangling")],
        u,
        w,
        m,
        &["lower", "dangling"],
    ));
    c.extend(f.both_forms(
        "lower under a dangling symlink",
        &[&r.join("dangling/sub"), lo[1]],
        u,
        w,
        m,
        &["lower", "dangling/sub"],
    ));
    c.extend(f.both_forms(
        "lower is a symlink loop",
        &[lo[0], &r.join("loop-a")],
        u,
        w,
        m,
        &["lower", "loop-a"],
    ));
    c.extend(f.both_forms(
        "lower under a regular file",
        &[&r.join("afile/sub")],
        u,
        w,
        m,
        &["lower", "afile/sub"],
    ));
    c.extend(f.both_forms(
        "lower is a symlink to a file",
        &[&r.join("file-link")],
        u,
        w,
        m,
        &["lower", "file-link", "not a directory"],
    ));
    c.extend(f.both_forms(
        "lower path longer than PATH_MAX",
        &[lo[0], &long],
        u,
        w,
        m,
        &["lower"],
    ));
    c.extend(f.both_forms(
        "upper is a dangling symlink",
        &lo,
        Some(&r.join("dangling")),
        w,
        m,
        &["upper", "dangling"],
    ));
    c.extend(f.both_forms(
        "upper is a symlink loop",
        &lo,
        Some(&r.join("loop-b")),
        w,
        m,
        &["upper", "loop-b"],
    ));
    c.extend(f.both_forms(
        "work under a dangling symlink",
        &lo,
        u,
        Some(&r.join("dangling/w")),
        m,
        &["work", "dangling/w"],
    ));
    c.extend(f.both_forms(
        "work is a symlink to a file",
        &lo,
        u,
        Some(&r.join("file-link")),
        m,
        &["work", "file-link"],
    ));
    c.extend(f.both_forms(
        "mountpoint is a dangling symlink",
        &lo,
        u,
        w,
        &r.join("dangling"),
        &["mountpoint", "dangling"],
    ));
    c.extend(f.both_forms(
        "mountpoint under a regular file",
        &lo,
        u,
        w,
        &r.join("afile/m"),
        &["mountpoint", "afile/m"],
    ));
    assert_none(fails);
}

/// The default work directory (`.NAME.work` beside the upper): in the way as a file, or
/// itself the mountpoint.
#[test]
fn default_work_directory_refusals() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let mut fails = Vec::new();
    let default_work = f.root().join("m/.upper.work");
    fs::write(&default_work, "a file where the work directory goes").unwrap();
    fails.extend(refused(
        f.root(),
        "the default work directory is a file",
        &native_args(&lo, Some(&f.upper), None, &f.merged),
        &f.merged,
        &["work", ".upper.work", "not a directory"],
    ));
    fs::remove_file(&default_work).unwrap();
    fs::create_dir(&default_work).unwrap();
    fails.extend(refused(
        f.root(),
        "the mountpoint is the default work directory",
        &native_args(&lo, Some(&f.upper), None, &default_work),
        &default_work,
        &["mountpoint", ".upper.work"],
    ));
    assert_none(fails);
}

fn mount_tmpfs(p: &Path, opts: &str) -> ScratchMount {
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs on {}", p.display());
    ScratchMount(p.to_path_buf())
}

/// Filesystem boundaries: an upper that is the root of a filesystem without --work (the
/// default work directory would be on another filesystem), and an upper or work directory
/// on a read-only filesystem.
#[test]
fn upper_at_a_filesystem_root_or_read_only() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let t = f.l.mkdir("tmpfs-upper");
    let ro = f.l.mkdir("ro");
    let mut fails = Vec::new();
    {
        let _t = mount_tmpfs(&t, "mode=0755");
        fails.extend(refused(
            f.root(),
            "upper at a filesystem root, no --work",
            &native_args(&lo, Some(&t), None, &f.merged),
            &f.merged,
            &["upper", "filesystem", "--work"],
        ));
        // The -o form takes the same default when workdir= is missing.
        fails.extend(refused(
            f.root(),
            "upperdir at a filesystem root, no workdir",
            &[
                os(&f.merged),
                os("-o"),
                format!("lowerdir={},upperdir={}", esc_layer(lo[0]), esc_layer(&t)).into(),
            ],
            &f.merged,
            &["upper", "filesystem"],
        ));
    }
    {
        let _r = mount_tmpfs(&ro, "mode=0755");
        fs::create_dir(ro.join("upper")).unwrap();
        fs::create_dir(ro.join("work")).unwrap();
        let st = Command::new("mount")
            .args(["-o", "remount,ro"])
            .arg(&ro)
            .status()
            .unwrap();
        assert!(st.success(), "remount the scratch tmpfs read-only");
        fails.extend(f.both_forms(
            "upper and work on a read-only filesystem",
            &lo,
            Some(&ro.join("upper")),
            Some(&ro.join("work")),
            &f.merged,
            &["upper", "writable"],
        ));
    }
    assert_none(fails);
}

/// A work directory under another mount of the upper's filesystem (a bind mount): renaming
/// a copy-up from one into the other fails (EXDEV), so the mount is refused, as kernel
/// overlayfs refuses it. So is an upper at the root of a bind mount without --work: the
/// default work directory would be under the parent's mount.
#[test]
fn work_under_another_mount_of_the_upper_filesystem() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let src = f.l.mkdir("bind-src");
    fs::create_dir(src.join("work")).unwrap();
    fs::create_dir(src.join("upper")).unwrap();
    let b = f.l.mkdir("bind");
    let _b = scratch_mount(&["--bind"], &src, &b);
    let mut fails = f.both_forms(
        "work through a bind mount",
        &lo,
        Some(&f.upper),
        Some(&b.join("work")),
        &f.merged,
        &["work", "another mount"],
    );
    let ub = f.l.mkdir("upper-bind");
    let _u = scratch_mount(&["--bind"], src.join("upper"), &ub);
    fails.extend(refused(
        f.root(),
        "upper at the root of a bind mount, no --work",
        &native_args(&lo, Some(&ub), None, &f.merged),
        &f.merged,
        &["upper", "mount", "--work"],
    ));
    assert_none(fails);
}

/// A work directory on another btrfs subvolume than the upper (one mount, two devices:
/// renames between them fail with EXDEV) is refused, and the message names the subvolume.
#[test]
fn work_on_another_btrfs_subvolume() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let img = f.root().join("subvolumes.btrfs");
    fs_image(&img, 128 << 20, &["mkfs.btrfs", "-q"], "btrfs-progs");
    let b = f.l.mkdir("btrfs");
    let _b = scratch_mount(&["-o", "loop"], &img, &b);
    let out = Command::new("btrfs")
        .args(["subvolume", "create"])
        .arg(b.join("sub"))
        .output()
        .unwrap();
    assert!(out.status.success(), "btrfs subvolume create: {out:?}");
    fs::create_dir(b.join("upper")).unwrap();
    fs::create_dir(b.join("sub/work")).unwrap();
    let fails = f.both_forms(
        "work on another btrfs subvolume",
        &lo,
        Some(&b.join("upper")),
        Some(&b.join("sub/work")),
        &f.merged,
        &["work", "btrfs subvolume", "upper"],
    );
    assert_none(fails);
}

/// A path with a newline is still reported on one line (the message quotes or escapes it).
#[test]
fn a_path_with_a_newline_is_reported_on_one_line() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let odd = f.root().join("new\nline");
    let mut fails = Vec::new();
    fails.extend(f.both_forms(
        "missing lower with a newline",
        &[lo[0], &odd],
        None,
        None,
        &f.merged,
        &["lower", "new"],
    ));
    fails.extend(f.both_forms(
        "missing mountpoint with a newline",
        &lo,
        None,
        None,
        &odd,
        &["mountpoint", "new"],
    ));
    assert_none(fails);
}

/// `-o remount` only changes unionmount's own mounts: pointed at another filesystem (here a
/// tmpfs), it refuses and leaves that filesystem's flags alone.
#[test]
fn remount_refuses_a_filesystem_that_is_not_unionmount() {
    let f = Fixture::new();
    let t = f.l.mkdir("m/foreign");
    let _t = mount_tmpfs(&t, "mode=0755");
    let flags = |p: &Path| {
        let want = s(p);
        fs::read_to_string("/proc/self/mounts")
            .unwrap()
            .lines()
            .filter(|l| l.split(' ').nth(1) == Some(want.as_str()))
            .filter_map(|l| l.split(' ').nth(3).map(String::from))
            .next_back()
            .unwrap_or_default()
    };
    let before = flags(&t);
    assert!(before.starts_with("rw"), "{before}");
    let out = Command::new(BIN)
        .args([os("src"), os(&t), os("-o"), os("remount,ro")])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let after = flags(&t);
    if after != before {
        // Put it back before failing.
        let _ = Command::new("mount")
            .args(["-o", "remount,rw"])
            .arg(&t)
            .status();
    }
    assert_eq!(after, before, "the tmpfs's flags changed (stderr {err:?})");
    assert!(!out.status.success(), "exit status 0 remounting a tmpfs");
    assert_eq!(err.lines().count(), 1, "{err:?}");
    assert!(err.contains(&s(&t)), "{err:?}");
}

/// Overlaps only a bind mount shows: a lower that is a bind mount of a directory inside the
/// upper, a work directory that is a bind mount of the upper itself (its stale entries would
/// be cleaned out of the upper), and a mountpoint inside a lower through such an alias.
/// Kernel overlayfs refuses all three too.
#[test]
fn overlaps_through_bind_mounts() {
    let f = Fixture::new();
    let r = f.root().to_path_buf();
    let lo = f.l.lower_paths();
    let sub = f.l.mkdir("m/upper/sub");
    let alias = f.l.mkdir("alias");
    let bind = |from: &Path| {
        let st = Command::new("mount")
            .arg("--bind")
            .arg(from)
            .arg(&alias)
            .status()
            .unwrap();
        assert!(st.success(), "bind mount of {}", from.display());
        ScratchMount(alias.clone())
    };
    let mut fails = Vec::new();
    {
        let _b = bind(&sub);
        fails.extend(f.both_forms(
            "a lower that is a bind mount of a directory in the upper",
            &[&alias, lo[1]],
            Some(&f.upper),
            Some(&f.work),
            &f.merged,
            &["inside", "upper", "bind mount"],
        ));
    }
    {
        let _b = bind(&f.upper);
        fails.extend(f.both_forms(
            "a work directory that is a bind mount of the upper",
            &lo,
            Some(&f.upper),
            Some(&alias),
            &f.merged,
            &["same directory", "bind mount"],
        ));
    }
    {
        let _b = bind(lo[0]);
        fails.extend(f.both_forms(
            "a mountpoint inside a lower through a bind mount of it",
            &lo,
            Some(&f.upper),
            Some(&f.work),
            &r.join("alias/d"),
            &["mountpoint", "inside", "bind mount"],
        ));
    }
    assert_none(fails);
}

/// A second mount on the upper and work directory of a live one goes ahead with one warning
/// line naming the upper, as kernel overlayfs without `index` goes ahead (warning in its
/// log). Its start-up cleaning leaves the first daemon's temporary objects (removing them
/// made the first mount's copy-ups fail) and removes a dead daemon's. Once the first mount is
/// unmounted, the same directories mount again without a warning (its daemon lets go as it
/// exits).
#[test]
fn a_second_mount_on_a_live_upper_is_warned_of() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let args = |merged: &Path| native_args(&lo, Some(&f.upper), Some(&f.work), merged);
    let first = Mount::union(
        &args(&f.merged),
        f.merged.clone(),
        Some(f.upper.clone()),
        Some(f.work.clone()),
    );
    let daemon = daemons_under(f.root());
    assert_eq!(daemon.len(), 1, "the first mount's daemon: {daemon:?}");
    let live = f.work.join(format!("work/#um{:x}.7", daemon[0]));
    let dead = f.work.join(format!("work/#um{:x}.7", u32::MAX >> 1));
    // A daemon that exited and was not reaped yet (a zombie of the same program).
    let mut zombie = Command::new(BIN)
        .arg("--version")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let zombie_entry = f.work.join(format!("work/#um{:x}.7", zombie.id()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !fs::read_to_string(format!("/proc/{}/stat", zombie.id())).is_ok_and(|st| {
        st.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    }) {
        assert!(std::time::Instant::now() < deadline, "no zombie");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    for p in [&live, &dead, &zombie_entry] {
        fs::write(p, "").unwrap();
    }

    let other = f.l.mkdir("m2/merged");
    let out = run_unionmount(&args(&other));
    let second = is_mounted(&other).then(|| Mount::adopt(other.clone(), None, None, Kind::Union));
    assert!(out.status.success(), "second mount: {out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one warning line: {err:?}");
    assert!(
        lines[0].starts_with("unionmount: warning: upper directory")
            && lines[0].contains(&s(&f.upper))
            && lines[0].contains("in use"),
        "{err:?}"
    );
    assert!(
        live.exists(),
        "a live daemon's temporary object was cleaned"
    );
    assert!(!dead.exists(), "a dead daemon's temporary object was kept");
    assert!(
        !zombie_entry.exists(),
        "an unreaped daemon's temporary object was kept"
    );
    zombie.wait().unwrap();
    for m in [&f.merged, &other] {
        assert_eq!(fs::read_to_string(m.join("u")).unwrap(), "upper file");
    }
    drop(second);
    drop(first);

    let out = run_unionmount(&args(&f.merged));
    let _again =
        is_mounted(&f.merged).then(|| Mount::adopt(f.merged.clone(), None, None, Kind::Union));
    assert!(out.status.success(), "mount after the unmount: {out:?}");
    assert_eq!(
        String::from_utf8_lossy(&out.stderr),
        "",
        "no warning once unmounted"
    );
}

/// Clears the immutable flag it set, also when an assertion fails.
struct Immutable(PathBuf);

impl Immutable {
    fn set(p: &Path) -> Immutable {
        let st = Command::new("chattr").arg("+i").arg(p).status().unwrap();
        assert!(st.success(), "chattr +i {}", p.display());
        Immutable(p.to_path_buf())
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = Command::new("chattr").arg("-i").arg(&self.0).status();
    }
}

/// A work directory that cannot be written (immutable) refuses the mount, changing nothing;
/// kernel overlayfs mounts such layers read-only instead (checked here: a deliberate
/// difference, README).
#[test]
fn unwritable_work_directory() {
    let f = Fixture::new();
    let lo = f.l.lower_paths();
    let _i = Immutable::set(&f.work);
    assert_none(refused(
        f.root(),
        "an immutable work directory",
        &native_args(&lo, Some(&f.upper), Some(&f.work), &f.merged),
        &f.merged,
        &["work directory", "not writable"],
    ));
    let k = Mount::kernel(&f.l.lowerdir_opt(), &f.upper, &f.work, &f.merged, &[]);
    assert_eq!(
        errno(fs::write(k.path("new"), "n")),
        libc::EROFS,
        "kernel overlayfs mounts read-only"
    );
}
