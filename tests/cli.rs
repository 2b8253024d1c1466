//! The command line (SPEC §2) and the refusals at startup (SPEC §6), with real mounts: both
//! forms, `mount -t fuse.unionmount`, the name fuse-overlayfs, the default work directory,
//! read-only mounts, unmounting every way, and bad input that must leave everything as it was.

mod common;
use common::*;

use std::ffi::OsString;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Local helpers
// ---------------------------------------------------------------------------------------------

fn os(p: &Path) -> OsString {
    p.as_os_str().to_owned()
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// One line of a mounts table.
#[derive(Debug, Clone)]
struct MountEntry {
    source: String,
    fstype: String,
    opts: Vec<String>,
}

/// The entry for `target` in a mounts table (`/proc/self/mounts` or `/proc/PID/mounts`).
fn mount_entry_in(table: &str, target: &Path) -> Option<MountEntry> {
    let want = mounts_escape(target);
    // The last entry is the top one when several are stacked.
    fs::read_to_string(table)
        .unwrap_or_default()
        .lines()
        .rev()
        .find_map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            (f.len() >= 4 && f[1] == want).then(|| MountEntry {
                source: f[0].to_string(),
                fstype: f[2].to_string(),
                opts: f[3].split(',').map(String::from).collect(),
            })
        })
}

fn mount_entry(target: &Path) -> Option<MountEntry> {
    mount_entry_in("/proc/self/mounts", target)
}

fn bin_path() -> PathBuf {
    fs::canonicalize(BIN).unwrap()
}

/// Live (not zombie) unionmount processes serving `merged`: their executable is the built
/// binary and one of their arguments is the mountpoint.
fn daemon_pids(merged: &Path) -> Vec<i32> {
    let bin = bin_path();
    let want = s(merged);
    processes(|exe, args| exe == Some(bin.as_path()) && args.contains(&want))
}

fn assert_daemon_gone(merged: &Path, how: &str) {
    assert!(
        wait_until(Duration::from_secs(20), || daemon_pids(merged).is_empty()),
        "{how}: the daemon for {} is still running: pids {:?}",
        merged.display(),
        daemon_pids(merged)
    );
}

fn stderr_of(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs a unionmount command that must mount at `merged`: the mount is adopted at once (so
/// it is removed even if an assertion fails), the exit status must be 0, and the merged
/// directory must list `want` immediately after the command returned — no sleep, no retry.
fn mount_ok(
    cmd: &mut Command,
    merged: &Path,
    upper: Option<&Path>,
    work: Option<&Path>,
    want: &[&str],
) -> (Mount, Output) {
    let out = cmd.stdin(Stdio::null()).output().expect("run unionmount");
    // First thing after the command returned: the view must be there.
    let listed = fs::read_dir(merged).map(|d| {
        let mut v: Vec<String> = d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    });
    let m = Mount::adopt(
        merged.to_path_buf(),
        upper.map(Path::to_path_buf),
        work.map(Path::to_path_buf),
        Kind::Union,
    );
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}",
        out.status,
        stderr_of(&out)
    );
    assert!(
        is_mounted(merged),
        "{cmd:?} exited 0 but {} is not mounted",
        merged.display()
    );
    let listed = listed.unwrap_or_else(|e| panic!("readdir right after exit 0: {e}"));
    assert_eq!(
        listed,
        strs(want),
        "merged listing right after {cmd:?} returned"
    );
    (m, out)
}

/// Mounts `l` in the fuse-overlayfs form on `name`'s directories (see `uwm`) with `extra`
/// added to its `-o` options, expecting `root` at the top; returns the mount, the command's
/// output, and the upper and merged directories.
fn mount_o_with(
    l: &Layers,
    name: &str,
    extra: &str,
    root: &[&str],
) -> (Mount, Output, PathBuf, PathBuf) {
    let (upper, work, merged) = uwm(l, name);
    let mut args = overlay_args(None, &l.lower_paths(), Some(&upper), Some(&work), &merged);
    args[2].push(format!(",{extra}"));
    let (m, out) = mount_ok(&mut um(&args), &merged, Some(&upper), Some(&work), root);
    (m, out, upper, merged)
}

fn um(args: &[OsString]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args);
    c
}

/// Two lowers: lower0 (top) has `a` and `d/x`, lower1 has `b` and a shadowed `a`.
fn two_layers() -> Layers {
    let l = Layers::new(2);
    l.lower(0).file("a", "from lower0").file("d/x", "x0");
    l.lower(1)
        .file("a", "hidden")
        .file("b", "from lower1")
        .file("d/y", "y1");
    l
}

const TWO_LAYER_ROOT: &[&str] = &["a", "b", "d"];

/// `upper`, `work` and `merged` under `root/name`.
fn uwm(l: &Layers, name: &str) -> (PathBuf, PathBuf, PathBuf) {
    (
        l.mkdir(&format!("{name}/upper")),
        l.mkdir(&format!("{name}/work")),
        l.mkdir(&format!("{name}/merged")),
    )
}

/// Checks the merged view of `two_layers()` and that a write lands in the upper layer.
fn check_two_layer_view(merged: &Path, upper: Option<&Path>) {
    assert_eq!(fs::read_to_string(merged.join("a")).unwrap(), "from lower0");
    assert_eq!(fs::read_to_string(merged.join("b")).unwrap(), "from lower1");
    assert_eq!(names(&merged.join("d")), strs(&["x", "y"]));
    if let Some(u) = upper {
        fs::write(merged.join("new"), "written").unwrap();
        assert_eq!(fs::read_to_string(u.join("new")).unwrap(), "written");
    }
}

fn user_ids(name: &str) -> (u32, u32) {
    let out = Command::new("id").arg("-u").arg(name).output().unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id").arg("-g").arg(name).output().unwrap();
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

fn chown(p: &Path, uid: u32, gid: u32) {
    std::os::unix::fs::chown(p, Some(uid), Some(gid)).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

/// One bad layer configuration, tried in both forms.
struct Case<'a> {
    what: &'a str,
    lowers: Vec<PathBuf>,
    upper: Option<PathBuf>,
    work: Option<PathBuf>,
    merged: PathBuf,
    words: Vec<&'a str>,
}

fn run_cases(l: &Layers, cases: &[Case]) {
    let mut fails = Vec::new();
    for c in cases {
        let lowers: Vec<&Path> = c.lowers.iter().map(PathBuf::as_path).collect();
        let n = native_args(&lowers, c.upper.as_deref(), c.work.as_deref(), &c.merged);
        fails.extend(refusal(
            l.root(),
            &format!("{} (native form)", c.what),
            &mut um(&n),
            &c.merged,
            &c.words,
        ));
        let o = overlay_args(
            Some("umtest"),
            &lowers,
            c.upper.as_deref(),
            c.work.as_deref(),
            &c.merged,
        );
        fails.extend(refusal(
            l.root(),
            &format!("{} (-o form)", c.what),
            &mut um(&o),
            &c.merged,
            &c.words,
        ));
    }
    assert!(
        fails.is_empty(),
        "{} problem(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

fn p(base: &Path, rel: &str) -> PathBuf {
    base.join(rel)
}

// ---------------------------------------------------------------------------------------------
// Both forms
// ---------------------------------------------------------------------------------------------

#[test]
fn native_form_with_work_dir() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let args = native_args(
        &[&l.lowers[0], &l.lowers[1]],
        Some(&upper),
        Some(&work),
        &merged,
    );
    let (_m, out) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
    check_two_layer_view(&merged, Some(&upper));
    let e = mount_entry(&merged).expect("in /proc/self/mounts");
    assert_eq!(e.fstype, "fuse.unionmount");
    assert_eq!(e.source, "unionmount", "default source");
    assert!(e.opts.contains(&"rw".to_string()), "{:?}", e.opts);
    assert!(
        work.join("work").is_dir(),
        "work/ inside the given work directory"
    );
}

/// `-o remount,...` (as `mount -o remount` runs it) changes what it names, read-only and
/// the generic flags, and keeps the rest; `noatime,nodiratime` at mount keeps both.
#[test]
fn remount_changes_the_flags_it_names() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let mut args = native_args(
        &[&l.lowers[0], &l.lowers[1]],
        Some(&upper),
        Some(&work),
        &merged,
    );
    args.extend([OsString::from("-o"), OsString::from("noatime,nodiratime")]);
    let (_m, _) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    let has = |flags: &[&str], not: &[&str]| {
        let opts = mount_entry(&merged).expect("mounted").opts;
        for f in flags {
            assert!(opts.iter().any(|o| o == f), "{f} missing: {opts:?}");
        }
        for f in not {
            assert!(!opts.iter().any(|o| o == f), "{f} present: {opts:?}");
        }
    };
    has(&["rw", "noatime", "nodiratime"], &["noexec", "relatime"]);
    let remount = |opts: &str| {
        let out = um(&[os(Path::new("src")), os(&merged), "-o".into(), opts.into()])
            .output()
            .unwrap();
        assert!(out.status.success(), "remount {opts}: {}", stderr_of(&out));
    };
    remount("remount,noexec");
    has(&["rw", "noexec", "noatime", "nodiratime"], &[]);
    remount("remount,ro,exec,relatime,diratime");
    has(&["ro", "relatime"], &["noexec", "noatime", "nodiratime"]);
    let e = fs::write(merged.join("new"), "x").unwrap_err();
    assert_eq!(
        e.raw_os_error(),
        Some(libc::EROFS),
        "write after remount,ro"
    );
    remount("remount,rw");
    has(&["rw", "relatime"], &["noexec"]);
    fs::write(merged.join("new"), "x").unwrap();
}

#[test]
fn native_form_default_work_dir_is_created_beside_upper() {
    let l = two_layers();
    let base = l.mkdir("m");
    let upper = l.mkdir("m/upper");
    let merged = l.mkdir("m/merged");
    let default_work = base.join(".upper.work");
    assert!(!default_work.exists());
    let args = native_args(&[&l.lowers[0], &l.lowers[1]], Some(&upper), None, &merged);
    let (mut m, _) = mount_ok(&mut um(&args), &merged, Some(&upper), None, TWO_LAYER_ROOT);
    assert!(
        default_work.is_dir(),
        "{} not created",
        default_work.display()
    );
    assert!(
        default_work.join("work").is_dir(),
        "{} holds {:?}, no work/",
        default_work.display(),
        names(&default_work)
    );
    assert_eq!(
        fs::metadata(&default_work).unwrap().dev(),
        fs::metadata(&upper).unwrap().dev()
    );
    check_two_layer_view(&merged, Some(&upper));
    // The work dir is really used: deleting a lower file makes a whiteout in the upper.
    fs::remove_file(merged.join("b")).unwrap();
    assert!(!merged.join("b").exists());
    assert!(
        fs::symlink_metadata(upper.join("b")).is_ok(),
        "no whiteout for b in the upper"
    );
    // Nothing besides the upper, the default work dir and the mountpoint in the base.
    assert_eq!(names(&base), strs(&[".upper.work", "merged", "upper"]));
    m.unmount();
    assert!(!is_mounted(&merged));
    // A second mount reuses it.
    let (_m2, _) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        None,
        &["a", "d", "new"],
    );
    assert!(default_work.join("work").is_dir());
}

#[test]
fn overlayfs_form_with_source() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let args = overlay_args(
        Some("umtest-src"),
        &[&l.lowers[0], &l.lowers[1]],
        Some(&upper),
        Some(&work),
        &merged,
    );
    let (_m, out) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
    check_two_layer_view(&merged, Some(&upper));
    let e = mount_entry(&merged).expect("in /proc/self/mounts");
    assert_eq!(e.fstype, "fuse.unionmount");
    assert_eq!(e.source, "umtest-src");
}

#[test]
fn overlayfs_form_repeated_o_without_source() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let args: Vec<OsString> = vec![
        os(&merged),
        "-o".into(),
        format!("lowerdir={}", l.lowerdir_opt()).into(),
        "-o".into(),
        format!("upperdir={}", s(&upper)).into(),
        "-o".into(),
        format!("workdir={},rw,nodev", s(&work)).into(),
    ];
    let (_m, out) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
    check_two_layer_view(&merged, Some(&upper));
    let e = mount_entry(&merged).expect("in /proc/self/mounts");
    assert_eq!(e.fstype, "fuse.unionmount");
    assert_eq!(e.source, "unionmount", "default source without SOURCE");
    assert!(e.opts.contains(&"nodev".to_string()), "{:?}", e.opts);
}

/// Exit status 0 means the mount is live: several rounds, each listing the view the instant
/// the command returns.
#[test]
fn exit_zero_only_once_the_mount_is_live() {
    let l = two_layers();
    for round in 0..5 {
        let (upper, work, merged) = uwm(&l, &format!("r{round}"));
        let args = if round % 2 == 0 {
            native_args(
                &[&l.lowers[0], &l.lowers[1]],
                Some(&upper),
                Some(&work),
                &merged,
            )
        } else {
            overlay_args(
                None,
                &[&l.lowers[0], &l.lowers[1]],
                Some(&upper),
                Some(&work),
                &merged,
            )
        };
        let (mut m, _) = mount_ok(
            &mut um(&args),
            &merged,
            Some(&upper),
            Some(&work),
            TWO_LAYER_ROOT,
        );
        assert_eq!(fs::read_to_string(merged.join("d/x")).unwrap(), "x0");
        m.unmount();
        assert!(!is_mounted(&merged));
    }
}

// ---------------------------------------------------------------------------------------------
// mount(8) and the fuse-overlayfs name
// ---------------------------------------------------------------------------------------------

/// A process in a private mount namespace (`unshare --mount`), for commands run with
/// `nsenter`. Drop unmounts whatever is left at `merged` in it and kills it.
struct Namespace {
    child: Child,
    merged: PathBuf,
}

impl Namespace {
    fn new(merged: &Path) -> Namespace {
        let child = Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sleep", "600"])
            .stdin(Stdio::null())
            .spawn()
            .expect("run unshare");
        let ns = Namespace {
            child,
            merged: merged.to_path_buf(),
        };
        let me = fs::read_link("/proc/self/ns/mnt").unwrap();
        let pid = ns.pid();
        // unshare has made the namespace once it has exec'd sleep.
        assert!(
            wait_until(Duration::from_secs(20), || {
                fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
                    && fs::read_link(format!("/proc/{pid}/ns/mnt")).is_ok_and(|n| n != me)
            }),
            "unshare did not set up a mount namespace"
        );
        ns
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn cmd(&self) -> Command {
        let mut c = Command::new("nsenter");
        c.arg("-t").arg(self.pid().to_string()).arg("-m").arg("--");
        c.stdin(Stdio::null());
        c
    }

    fn mounts(&self) -> String {
        format!("/proc/{}/mounts", self.pid())
    }

    /// A path as seen inside the namespace.
    fn path(&self, p: &Path) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root", self.pid())).join(p.strip_prefix("/").unwrap())
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if mount_entry_in(&self.mounts(), &self.merged).is_some() {
            let _ = self
                .cmd()
                .arg("umount")
                .arg("-l")
                .arg(&self.merged)
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `mount -t fuse.unionmount SOURCE MERGED -o ...`: mount(8) finds no
/// /sbin/mount.fuse.unionmount and runs /sbin/mount.fuse (mount.fuse3) with
/// `-t fuse.unionmount`; mount.fuse3 runs `/bin/sh -c "'unionmount' SOURCE MERGED -o rw,...,dev,suid"`.
/// mount(8) removes PATH from the helper's environment (util-linux sanitize_env), so the shell
/// searches its built-in default PATH, which starts with /usr/local/sbin. To stay hermetic the
/// test runs in a private mount namespace where a temp dir holding a `unionmount` symlink to
/// the built binary is bind-mounted over /usr/local/sbin.
#[test]
fn mount_t_fuse_unionmount() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let bindir = l.mkdir("bin");
    std::os::unix::fs::symlink(bin_path(), bindir.join("unionmount")).unwrap();
    let helper_dir = ["/usr/local/sbin", "/usr/local/bin"]
        .into_iter()
        .map(Path::new)
        .find(|d| d.is_dir())
        .expect("/usr/local/sbin or /usr/local/bin");

    let ns = Namespace::new(&merged);
    let out = ns
        .cmd()
        .arg("mount")
        .arg("--bind")
        .arg(&bindir)
        .arg(helper_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "bind mount: {}", stderr_of(&out));
    assert!(
        mount_entry(helper_dir).is_none(),
        "the bind mount leaked out of the private namespace"
    );

    let opts = format!(
        "lowerdir={},upperdir={},workdir={}",
        l.lowerdir_opt(),
        s(&upper),
        s(&work)
    );
    let out = ns
        .cmd()
        .args(["mount", "-t", "fuse.unionmount", "umtest-mount-src"])
        .arg(&merged)
        .arg("-o")
        .arg(&opts)
        .output()
        .unwrap();
    // Read the view first thing after mount(8) returned.
    let inside = ns.path(&merged);
    let listed = fs::read_dir(&inside).map(|d| {
        let mut v: Vec<String> = d
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    });
    assert!(
        out.status.success(),
        "mount -t fuse.unionmount failed ({}): {}",
        out.status,
        stderr_of(&out)
    );
    let e = mount_entry_in(&ns.mounts(), &merged).expect("mounted in the namespace");
    assert_eq!(e.fstype, "fuse.unionmount");
    assert_eq!(e.source, "umtest-mount-src");
    assert!(e.opts.contains(&"rw".to_string()), "{:?}", e.opts);
    assert_eq!(
        listed.expect("readdir right after mount returned"),
        strs(TWO_LAYER_ROOT)
    );
    check_two_layer_view(&inside, Some(&upper));
    assert!(
        !is_mounted(&merged),
        "the FUSE mount leaked out of the namespace"
    );
    assert_eq!(daemon_pids(&merged).len(), 1, "one daemon serves the mount");

    let out = ns.cmd().arg("umount").arg(&merged).output().unwrap();
    assert!(out.status.success(), "umount: {}", stderr_of(&out));
    assert!(mount_entry_in(&ns.mounts(), &merged).is_none());
    assert_daemon_gone(&merged, "umount in the namespace");
    // The write went to the upper layer on disk.
    assert_eq!(fs::read_to_string(upper.join("new")).unwrap(), "written");
}

/// Installed under the name fuse-overlayfs (containerd, podman's mount_program), the binary
/// takes the same `-o` form.
#[test]
fn invoked_through_a_symlink_named_fuse_overlayfs() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let bindir = l.mkdir("bin");
    let link = bindir.join("fuse-overlayfs");
    std::os::unix::fs::symlink(bin_path(), &link).unwrap();
    let args = overlay_args(
        None,
        &[&l.lowers[0], &l.lowers[1]],
        Some(&upper),
        Some(&work),
        &merged,
    );
    let mut cmd = Command::new(&link);
    cmd.args(&args);
    let (_m, out) = mount_ok(&mut cmd, &merged, Some(&upper), Some(&work), TWO_LAYER_ROOT);
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
    check_two_layer_view(&merged, Some(&upper));
    assert!(mount_entry(&merged).is_some_and(|e| e.fstype.starts_with("fuse")));

    // Podman's form: SOURCE first, several -o, extra engine flags.
    let (upper2, work2, merged2) = uwm(&l, "m2");
    let mut cmd = Command::new(&link);
    cmd.arg("overlay")
        .arg(&merged2)
        .arg("-o")
        .arg(format!(
            "lowerdir={},upperdir={},workdir={}",
            l.lowerdir_opt(),
            s(&upper2),
            s(&work2)
        ))
        .arg("-o")
        .arg("context=\"system_u:object_r:container_file_t:s0:c1,c2\",nodev");
    let (_m2, out) = mount_ok(
        &mut cmd,
        &merged2,
        Some(&upper2),
        Some(&work2),
        TWO_LAYER_ROOT,
    );
    assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
    assert_eq!(mount_entry(&merged2).unwrap().source, "overlay");
}

// ---------------------------------------------------------------------------------------------
// Unmounting
// ---------------------------------------------------------------------------------------------

fn unmount_with(tool: &str, args: &[&str]) {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let a = native_args(
        &[&l.lowers[0], &l.lowers[1]],
        Some(&upper),
        Some(&work),
        &merged,
    );
    let (_m, _) = mount_ok(
        &mut um(&a),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    check_two_layer_view(&merged, Some(&upper));
    let pids = daemon_pids(&merged);
    assert_eq!(pids.len(), 1, "one background daemon: {pids:?}");
    let out = Command::new(tool).args(args).arg(&merged).output().unwrap();
    assert!(out.status.success(), "{tool} {args:?}: {}", stderr_of(&out));
    assert!(!is_mounted(&merged), "still mounted after {tool}");
    assert_daemon_gone(&merged, tool);
    assert_eq!(
        names(&merged),
        Vec::<String>::new(),
        "the mountpoint is an empty directory again"
    );
    assert_eq!(fs::read_to_string(upper.join("new")).unwrap(), "written");
}

#[test]
fn unmount_with_fusermount3() {
    unmount_with("fusermount3", &["-u"]);
}

#[test]
fn unmount_with_umount() {
    unmount_with("umount", &[]);
}

/// A foreground daemon; Drop kills and reaps it and removes a mount it left.
struct Foreground {
    child: Option<Child>,
    merged: PathBuf,
}

impl Foreground {
    /// Waits for the child to exit; `None` if it is still running after the deadline.
    fn wait(&mut self) -> Option<(ExitStatus, String)> {
        let child = self.child.as_mut().unwrap();
        let mut status = None;
        wait_until(Duration::from_secs(30), || {
            status = child.try_wait().unwrap();
            status.is_some()
        });
        let status = status?;
        let mut err = String::new();
        if let Some(mut e) = child.stderr.take() {
            let _ = e.read_to_string(&mut err);
        }
        self.child = None;
        Some((status, err))
    }
}

impl Drop for Foreground {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if is_mounted(&self.merged) {
            let _ = Command::new("umount").arg("-l").arg(&self.merged).status();
        }
    }
}

impl Foreground {
    /// Starts `unionmount FLAGS` over the two layers of `l` on `name`'s directories (see
    /// `uwm`), stderr piped; returns it, its pid, and its upper and merged directories.
    fn start(l: &Layers, name: &str, flags: &[&str]) -> (Foreground, i32, PathBuf, PathBuf) {
        let (upper, work, merged) = uwm(l, name);
        let mut a: Vec<OsString> = flags.iter().map(OsString::from).collect();
        a.extend(native_args(
            &[&l.lowers[0], &l.lowers[1]],
            Some(&upper),
            Some(&work),
            &merged,
        ));
        let child = Command::new(BIN)
            .args(&a)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn unionmount");
        let pid = child.id() as i32;
        let fg = Foreground {
            child: Some(child),
            merged: merged.clone(),
        };
        (fg, pid, upper, merged)
    }
}

fn foreground_signal(sig: libc::c_int) {
    let l = two_layers();
    let (mut fg, pid, upper, merged) = Foreground::start(&l, "m", &["-f"]);
    let mut exited_early = None;
    let up = wait_until(Duration::from_secs(30), || {
        if let Ok(Some(st)) = fg.child.as_mut().unwrap().try_wait() {
            exited_early = Some(st);
            return true;
        }
        is_mounted(&merged)
    });
    assert!(
        exited_early.is_none(),
        "unionmount -f exited before mounting: {exited_early:?}"
    );
    assert!(up, "unionmount -f did not mount");
    // Served (this also means the daemon is past its start-up).
    check_two_layer_view(&merged, Some(&upper));
    assert_eq!(
        daemon_pids(&merged),
        vec![pid],
        "-f serves from the process itself"
    );

    // SAFETY: kill(2) on our own child's pid.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
    let (status, err) = fg
        .wait()
        .expect("unionmount -f still running after the signal");
    assert_eq!(
        status.code(),
        Some(0),
        "exit after signal {sig}: {status}; stderr {err:?}"
    );
    assert!(!is_mounted(&merged), "still mounted after signal {sig}");
    assert_daemon_gone(&merged, "signal");
    assert_eq!(fs::read_to_string(upper.join("new")).unwrap(), "written");
}

#[test]
fn foreground_sigterm_unmounts_and_exits_0() {
    foreground_signal(libc::SIGTERM);
}

#[test]
fn foreground_sigint_unmounts_and_exits_0() {
    foreground_signal(libc::SIGINT);
}

/// fuse-overlayfs's debugging mode, `-d`, `--debug` or `-o debug`: the daemon stays in the
/// foreground and logs every request to stderr. It also serves on once its stderr is gone (a
/// closed pipe): before, the first log line after that panicked in the logger and its panic
/// hook, and the connection was aborted.
#[test]
fn debug_mode_stays_in_the_foreground_and_logs_requests() {
    let l = two_layers();
    for (i, flag) in [&["-d"][..], &["--debug"], &["-o", "debug"]]
        .iter()
        .enumerate()
    {
        let (mut fg, pid, upper, merged) = Foreground::start(&l, &format!("m{i}"), flag);
        assert!(
            wait_until(Duration::from_secs(30), || is_mounted(&merged)),
            "{flag:?}: not mounted"
        );
        assert_eq!(
            daemon_pids(&merged),
            vec![pid],
            "{flag:?}: in the foreground"
        );
        if i == 2 {
            // Its log goes nowhere from here on.
            drop(fg.child.as_mut().unwrap().stderr.take());
        }
        check_two_layer_view(&merged, Some(&upper));
        assert!(
            Command::new("umount")
                .arg(&merged)
                .status()
                .unwrap()
                .success()
        );
        let (status, err) = fg.wait().expect("still running after the unmount");
        assert_eq!(status.code(), Some(0), "{flag:?}: {status}; stderr {err:?}");
        if i < 2 {
            assert!(err.contains("debug: request"), "{flag:?}: {err:?}");
        }
    }
}

/// `-o noxattrs=1` (fuse-overlayfs's): the view has no xattrs; every xattr request fails
/// with ENOTSUP, while the data and attributes are served as ever. `noxattrs=0` changes
/// nothing.
#[test]
fn noxattrs_refuses_every_xattr_request() {
    let l = two_layers();
    for (i, value) in ["1", "0"].iter().enumerate() {
        let (_m, out, upper, merged) = mount_o_with(
            &l,
            &format!("m{i}"),
            &format!("noxattrs={value}"),
            TWO_LAYER_ROOT,
        );
        assert_eq!(stderr_of(&out), "", "no warning");
        check_two_layer_view(&merged, Some(&upper));
        let f = merged.join("new");
        let set = Command::new("setfattr")
            .args(["-n", "user.x", "-v", "1"])
            .arg(&f)
            .output()
            .unwrap();
        let get = Command::new("getfattr").arg("-d").arg(&f).output().unwrap();
        // A non-owner reads and lists as ever (the kernel checks no ACLs then).
        let other = Command::new("setpriv")
            .args([
                "--reuid",
                "nobody",
                "--regid",
                "nogroup",
                "--clear-groups",
                "ls",
            ])
            .arg(&merged)
            .output()
            .unwrap();
        assert!(other.status.success(), "ls as nobody: {other:?}");
        if *value == "1" {
            for (what, o) in [("setfattr", &set), ("getfattr", &get)] {
                assert!(
                    !o.status.success() && stderr_of(o).contains("Operation not supported"),
                    "{what}: {o:?}"
                );
            }
        } else {
            assert!(set.status.success(), "{set:?}");
            assert!(
                String::from_utf8_lossy(&get.stdout).contains("user.x"),
                "{get:?}"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Read-only mounts and layer paths
// ---------------------------------------------------------------------------------------------

#[test]
fn read_only_without_upper() {
    let l = two_layers();
    let merged = l.mkdir("m/merged");
    for (i, args) in [
        native_args(&[&l.lowers[0], &l.lowers[1]], None, None, &merged),
        overlay_args(None, &[&l.lowers[0], &l.lowers[1]], None, None, &merged),
    ]
    .into_iter()
    .enumerate()
    {
        let before = disk_snapshot(l.root());
        let (mut m, _) = mount_ok(&mut um(&args), &merged, None, None, TWO_LAYER_ROOT);
        let e = mount_entry(&merged).unwrap();
        assert!(
            e.opts.contains(&"ro".to_string()),
            "form {i}: options {:?}",
            e.opts
        );
        check_two_layer_view(&merged, None);
        assert_eq!(
            errno(fs::write(merged.join("new"), "x")),
            libc::EROFS,
            "create"
        );
        assert_eq!(
            errno(fs::OpenOptions::new().write(true).open(merged.join("a"))),
            libc::EROFS,
            "open for writing"
        );
        assert_eq!(
            errno(fs::create_dir(merged.join("nd"))),
            libc::EROFS,
            "mkdir"
        );
        assert_eq!(
            errno(fs::remove_file(merged.join("b"))),
            libc::EROFS,
            "unlink"
        );
        assert_eq!(
            errno(fs::rename(merged.join("a"), merged.join("c"))),
            libc::EROFS,
            "rename"
        );
        assert_eq!(
            errno(fs::set_permissions(
                merged.join("a"),
                fs::Permissions::from_mode(0o600)
            )),
            libc::EROFS,
            "chmod"
        );
        m.unmount();
        assert!(!is_mounted(&merged));
        let d = snapshot_changes(&before, &disk_snapshot(l.root()));
        // The merged directory itself may get a new atime only; nothing else may change.
        assert!(
            d.is_empty(),
            "form {i}: a read-only mount changed the tree: {d:?}"
        );
    }
}

#[test]
fn lower_layers_given_as_symlinks_to_directories() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let links = l.mkdir("links");
    let l0 = links.join("top");
    let l1 = links.join("bottom");
    std::os::unix::fs::symlink(&l.lowers[0], &l0).unwrap();
    // A relative symlink too.
    std::os::unix::fs::symlink("../lower1", &l1).unwrap();
    let args = native_args(&[&l0, &l1], Some(&upper), Some(&work), &merged);
    let (mut m, _) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    check_two_layer_view(&merged, Some(&upper));
    m.unmount();
    let (upper2, work2, merged2) = uwm(&l, "m2");
    let args = overlay_args(None, &[&l0, &l1], Some(&upper2), Some(&work2), &merged2);
    let (_m, _) = mount_ok(
        &mut um(&args),
        &merged2,
        Some(&upper2),
        Some(&work2),
        TWO_LAYER_ROOT,
    );
    check_two_layer_view(&merged2, Some(&upper2));
}

#[test]
fn escaped_colon_in_a_lower_path() {
    let l = two_layers();
    let colon = l.mkdir("col:on");
    fs::write(colon.join("c"), "from col:on").unwrap();
    fs::write(colon.join("a"), "col:on wins").unwrap();
    let lowers = [colon.as_path(), l.lowers[1].as_path()];
    let (upper, work, merged) = uwm(&l, "m");
    let args = native_args(&lowers, Some(&upper), Some(&work), &merged);
    assert!(args[1].to_string_lossy().contains("\\:"), "{args:?}");
    let (mut m, _) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        &["a", "b", "c", "d"],
    );
    assert_eq!(fs::read_to_string(merged.join("c")).unwrap(), "from col:on");
    assert_eq!(fs::read_to_string(merged.join("a")).unwrap(), "col:on wins");
    assert_eq!(fs::read_to_string(merged.join("b")).unwrap(), "from lower1");
    m.unmount();
    let (upper2, work2, merged2) = uwm(&l, "m2");
    let args = overlay_args(Some("src"), &lowers, Some(&upper2), Some(&work2), &merged2);
    assert!(args[3].to_string_lossy().contains("\\:"), "{args:?}");
    let (_m, _) = mount_ok(
        &mut um(&args),
        &merged2,
        Some(&upper2),
        Some(&work2),
        &["a", "b", "c", "d"],
    );
    assert_eq!(
        fs::read_to_string(merged2.join("c")).unwrap(),
        "from col:on"
    );
    assert_eq!(
        fs::read_to_string(merged2.join("b")).unwrap(),
        "from lower1"
    );
}

fn many_layers_o_form(n: usize) {
    let l = Layers::new(n);
    for i in 0..n {
        l.lower(i)
            .file(&format!("f{i}"), &format!("{i}"))
            .file("shadow", &format!("layer {i}"))
            .file(&format!("dir/g{i}"), "");
    }
    let (upper, work, merged) = uwm(&l, "m");
    let lowers: Vec<&Path> = l.lowers.iter().map(PathBuf::as_path).collect();
    let args = overlay_args(Some("many"), &lowers, Some(&upper), Some(&work), &merged);
    let mut want: Vec<String> = (0..n).map(|i| format!("f{i}")).collect();
    want.push("dir".into());
    want.push("shadow".into());
    want.sort();
    let want_ref: Vec<&str> = want.iter().map(String::as_str).collect();
    let (_m, _) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        &want_ref,
    );
    assert_eq!(
        fs::read_to_string(merged.join("shadow")).unwrap(),
        "layer 0",
        "the first lowerdir is on top"
    );
    assert_eq!(
        fs::read_to_string(merged.join(format!("f{}", n - 1))).unwrap(),
        format!("{}", n - 1)
    );
    let mut g: Vec<String> = (0..n).map(|i| format!("g{i}")).collect();
    g.sort();
    assert_eq!(names(&merged.join("dir")), g);
    fs::write(merged.join(format!("f{}", n - 1)), "changed").unwrap();
    assert_eq!(
        fs::read_to_string(upper.join(format!("f{}", n - 1))).unwrap(),
        "changed"
    );
}

#[test]
fn two_lower_layers_o_form() {
    many_layers_o_form(2);
}

#[test]
fn fifty_lower_layers_o_form() {
    many_layers_o_form(50);
}

#[test]
fn unknown_o_option_warns_once_and_mounts() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let mut args = overlay_args(None, &l.lower_paths(), Some(&upper), Some(&work), &merged);
    args[2].push(",frobnicate");
    let (_m, out) = mount_ok(
        &mut um(&args),
        &merged,
        Some(&upper),
        Some(&work),
        TWO_LAYER_ROOT,
    );
    let err = stderr_of(&out);
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "one warning line: {err:?}");
    assert!(lines[0].starts_with("unionmount:"), "{err:?}");
    assert!(lines[0].contains("frobnicate"), "{err:?}");
    check_two_layer_view(&merged, Some(&upper));
}

// ---------------------------------------------------------------------------------------------
// Refusals
// ---------------------------------------------------------------------------------------------

#[test]
fn refuses_missing_layers_and_files_as_layers() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let r = l.root().to_path_buf();
    fs::write(r.join("afile"), "not a dir").unwrap();
    let l0 = l.lowers[0].clone();
    let l1 = l.lowers[1].clone();
    let cases = vec![
        Case {
            what: "missing lower dir",
            lowers: vec![l0.clone(), p(&r, "nope")],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["lower", "nope", "not exist"],
        },
        Case {
            what: "lower is a file",
            lowers: vec![p(&r, "afile"), l1.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["lower", "afile", "not a directory"],
        },
        Case {
            what: "missing upper",
            lowers: vec![l0.clone()],
            upper: Some(p(&r, "m/noupper")),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["upper", "noupper", "not exist"],
        },
        Case {
            what: "upper is a file",
            lowers: vec![l0.clone()],
            upper: Some(p(&r, "afile")),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["upper", "afile", "not a directory"],
        },
        Case {
            what: "missing work",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(p(&r, "m/nowork")),
            merged: merged.clone(),
            words: vec!["work", "nowork", "not exist"],
        },
        Case {
            what: "work is a file",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(p(&r, "afile")),
            merged: merged.clone(),
            words: vec!["work", "afile", "not a directory"],
        },
    ];
    run_cases(&l, &cases);
}

#[test]
fn refuses_work_on_another_filesystem_than_upper() {
    let l = two_layers();
    let (upper, _work, merged) = uwm(&l, "m");
    let t = l.mkdir("tmpfs");
    let st = Command::new("mount")
        .args(["-t", "tmpfs", "tmpfs"])
        .arg(&t)
        .status()
        .unwrap();
    assert!(st.success(), "mount tmpfs");
    let _tmpfs = ScratchMount(t.clone());
    let other_work = t.join("work");
    fs::create_dir(&other_work).unwrap();
    let other_upper = t.join("upper");
    fs::create_dir(&other_upper).unwrap();
    let same_fs_work = l.mkdir("m/work2");
    assert_ne!(
        fs::metadata(&upper).unwrap().dev(),
        fs::metadata(&other_work).unwrap().dev()
    );
    let cases = vec![
        Case {
            what: "work on tmpfs, upper not",
            lowers: vec![l.lowers[0].clone()],
            upper: Some(upper.clone()),
            work: Some(other_work.clone()),
            merged: merged.clone(),
            words: vec!["filesystem"],
        },
        Case {
            what: "upper on tmpfs, work not",
            lowers: vec![l.lowers[0].clone()],
            upper: Some(other_upper.clone()),
            work: Some(same_fs_work.clone()),
            merged: merged.clone(),
            words: vec!["filesystem"],
        },
    ];
    run_cases(&l, &cases);
}

#[test]
fn refuses_overlapping_layers() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let l0 = l.lowers[0].clone();
    let l1 = l.lowers[1].clone();
    let in_l0 = l.mkdir("lower0/inner");
    let in_l1 = l.mkdir("lower1/inner");
    let in_upper = l.mkdir("m/upper/inner");
    let cases = vec![
        Case {
            what: "upper inside a lower",
            lowers: vec![l0.clone(), l1.clone()],
            upper: Some(in_l1.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["inside"],
        },
        Case {
            what: "lower inside upper",
            lowers: vec![l0.clone(), in_upper.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["inside"],
        },
        Case {
            what: "work inside upper",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(in_upper.clone()),
            merged: merged.clone(),
            words: vec!["inside"],
        },
        Case {
            what: "work inside a lower",
            lowers: vec![l0.clone(), l1.clone()],
            upper: Some(upper.clone()),
            work: Some(in_l0.clone()),
            merged: merged.clone(),
            words: vec!["inside"],
        },
        Case {
            what: "the same directory twice as two lowers",
            lowers: vec![l0.clone(), l1.clone(), l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["same"],
        },
        Case {
            what: "the same directory twice as two lowers, read-only",
            lowers: vec![l1.clone(), l1.clone()],
            upper: None,
            work: None,
            merged: merged.clone(),
            words: vec!["same"],
        },
        Case {
            what: "the same lower twice, once through a different spelling",
            lowers: vec![l0.clone(), l.root().join("lower1/../lower0")],
            upper: None,
            work: None,
            merged: merged.clone(),
            words: vec!["same"],
        },
        Case {
            what: "upper equal to a lower",
            lowers: vec![l0.clone(), l1.clone()],
            upper: Some(l1.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["same"],
        },
        Case {
            what: "work equal to upper",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(upper.clone()),
            merged: merged.clone(),
            words: vec!["same"],
        },
    ];
    run_cases(&l, &cases);
}

#[test]
fn refuses_bad_mountpoints() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let r = l.root().to_path_buf();
    fs::write(r.join("afile"), "not a dir").unwrap();
    let l0 = l.lowers[0].clone();
    let in_upper = l.mkdir("m/upper/mp");
    let in_lower = l.mkdir("lower1/mp");
    let in_merged = l.mkdir("m/merged/sub");
    let cases = vec![
        Case {
            what: "mountpoint missing",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: p(&r, "m/nomerged"),
            words: vec!["mountpoint", "nomerged", "not exist"],
        },
        Case {
            what: "mountpoint missing, read-only",
            lowers: vec![l0.clone()],
            upper: None,
            work: None,
            merged: p(&r, "m/nomerged"),
            words: vec!["mountpoint", "nomerged"],
        },
        Case {
            what: "mountpoint is a file",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: p(&r, "afile"),
            words: vec!["mountpoint", "afile", "not a directory"],
        },
        Case {
            what: "mountpoint equal to a lower",
            lowers: vec![l0.clone(), l.lowers[1].clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: l0.clone(),
            words: vec!["mountpoint", "layer"],
        },
        Case {
            what: "mountpoint equal to the upper",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: upper.clone(),
            words: vec!["mountpoint", "upper"],
        },
        Case {
            what: "mountpoint equal to the work dir",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: work.clone(),
            words: vec!["mountpoint", "work"],
        },
        Case {
            what: "mountpoint inside the upper",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: in_upper.clone(),
            words: vec!["mountpoint", "inside"],
        },
        Case {
            what: "mountpoint inside a lower",
            lowers: vec![l0.clone(), l.lowers[1].clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: in_lower.clone(),
            words: vec!["mountpoint", "inside"],
        },
        Case {
            what: "a lower inside the mountpoint",
            lowers: vec![l0.clone(), in_merged.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: merged.clone(),
            words: vec!["mountpoint", "inside"],
        },
        Case {
            what: "the mountpoint is the parent of upper and work",
            lowers: vec![l0.clone()],
            upper: Some(upper.clone()),
            work: Some(work.clone()),
            merged: p(&r, "m"),
            words: vec!["mountpoint", "inside"],
        },
    ];
    run_cases(&l, &cases);

    // Without --work: the default work directory must not be created when the mountpoint
    // is refused.
    let mut fails = Vec::new();
    let bad = p(&r, "m/nomerged");
    let args = native_args(&[&l0], Some(&upper), None, &bad);
    fails.extend(refusal(
        l.root(),
        "mountpoint missing, default work dir",
        &mut um(&args),
        &bad,
        &["mountpoint"],
    ));
    let args = native_args(&[&l0, &l.lowers[1]], Some(&upper), None, &in_lower);
    fails.extend(refusal(
        l.root(),
        "mountpoint inside a lower, default work dir",
        &mut um(&args),
        &in_lower,
        &["inside"],
    ));
    if p(&r, "m/.upper.work").exists() {
        fails.push("the default work directory m/.upper.work exists after the refusals".into());
    }
    assert!(fails.is_empty(), "{}", fails.join("\n"));
}

#[test]
fn refuses_more_than_500_lower_layers() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let many = l.mkdir("many");
    let dirs: Vec<PathBuf> = (0..501)
        .map(|i| {
            let d = many.join(format!("l{i}"));
            fs::create_dir(&d).unwrap();
            d
        })
        .collect();
    run_cases(
        &l,
        &[Case {
            what: "501 lower layers",
            lowers: dirs,
            upper: Some(upper),
            work: Some(work),
            merged,
            words: vec!["500"],
        }],
    );
}

#[test]
fn refuses_bad_command_lines() {
    let l = two_layers();
    let (upper, work, merged) = uwm(&l, "m");
    let lo = l.lowerdir_opt();
    let layers_o = format!("lowerdir={lo},upperdir={},workdir={}", s(&upper), s(&work));
    let mut fails = Vec::new();
    let mut check = |what: &str, args: Vec<OsString>, words: &[&str]| {
        fails.extend(refusal(l.root(), what, &mut um(&args), &merged, words));
    };
    check(
        "an unknown --flag",
        vec![
            "--lower".into(),
            lo.clone().into(),
            "--frobnicate".into(),
            os(&merged),
        ],
        &["--frobnicate"],
    );
    check(
        "an unknown --flag with a value",
        vec![
            "--frobnicate=3".into(),
            "--lower".into(),
            lo.clone().into(),
            os(&merged),
        ],
        &["--frobnicate"],
    );
    for (opt, word) in [
        ("squash_to_uid=x", "squash_to_uid"),
        ("squash_to_gid=-1", "squash_to_gid"),
        ("xattr_permissions=5", "xattr_permissions"),
        ("uidmapping=1:2", "uidmapping"),
        ("gidmapping=a:b:c", "gidmapping"),
        ("timeout=abc", "timeout"),
        ("fsync=2", "fsync"),
        ("threaded=yes", "threaded"),
    ] {
        check(
            &format!("bad option value {opt}"),
            vec![os(&merged), "-o".into(), format!("{layers_o},{opt}").into()],
            &[word],
        );
        check(
            &format!("bad option value {opt} with the native form"),
            vec![
                "--lower".into(),
                lo.clone().into(),
                "--upper".into(),
                os(&upper),
                "--work".into(),
                os(&work),
                "-o".into(),
                opt.into(),
                os(&merged),
            ],
            &[word],
        );
    }
    check(
        "no mountpoint (native)",
        vec![
            "--lower".into(),
            lo.clone().into(),
            "--upper".into(),
            os(&upper),
            "--work".into(),
            os(&work),
        ],
        &["mountpoint"],
    );
    check(
        "no mountpoint (-o)",
        vec!["-o".into(), layers_o.clone().into()],
        &["mountpoint"],
    );
    check("no lower, nothing else", vec![os(&merged)], &["lower"]);
    check(
        "no lower (native)",
        vec![
            "--upper".into(),
            os(&upper),
            "--work".into(),
            os(&work),
            os(&merged),
        ],
        &["lower"],
    );
    check(
        "no lower (-o)",
        vec![
            "src".into(),
            os(&merged),
            "-o".into(),
            format!("upperdir={},workdir={}", s(&upper), s(&work)).into(),
        ],
        &["lower"],
    );
    check(
        "empty lowerdir=",
        vec![os(&merged), "-o".into(), "lowerdir=".into()],
        &["lowerdir"],
    );
    check(
        "too many paths",
        vec![
            "--lower".into(),
            lo.clone().into(),
            "a".into(),
            "b".into(),
            os(&merged),
        ],
        &["argument"],
    );
    check(
        "--threads 0",
        vec![
            "--threads".into(),
            "0".into(),
            "--lower".into(),
            lo.clone().into(),
            os(&merged),
        ],
        &["threads"],
    );
    assert!(
        fails.is_empty(),
        "{} problem(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// An unprivileged user cannot read one lower layer (0700, root's): refused before anything
/// is mounted or created, naming that layer.
#[test]
fn refuses_an_unreadable_layer_for_an_unprivileged_user() {
    test_user();
    let (uid, gid) = user_ids("umtest");
    let l = two_layers();
    // The temp root is 0700: open it up so that only the one layer is unreadable.
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let secret = l.mkdir("secret");
    fs::write(secret.join("s"), "secret").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o700)).unwrap();
    let base = l.mkdir("m");
    let (upper, work, merged) = uwm(&l, "m");
    for d in [&base, &upper, &work, &merged] {
        chown(d, uid, gid);
    }
    let setpriv = |args: Vec<OsString>| {
        let mut c = Command::new("setpriv");
        c.args(["--reuid=umtest", "--regid=umtest", "--clear-groups", "--"])
            .arg(BIN)
            .args(args);
        c
    };
    // Sanity: the user can read the other layers but not this one.
    let probe = Command::new("setpriv")
        .args([
            "--reuid=umtest",
            "--regid=umtest",
            "--clear-groups",
            "--",
            "ls",
        ])
        .arg(&secret)
        .output()
        .unwrap();
    assert!(
        !probe.status.success(),
        "umtest can read {}",
        secret.display()
    );

    let l0 = l.lowers[0].clone();
    let mut fails = Vec::new();
    for (what, lowers, up) in [
        (
            "unreadable top lower, read-only",
            vec![secret.clone(), l0.clone()],
            false,
        ),
        (
            "unreadable second lower, read-only",
            vec![l0.clone(), secret.clone()],
            false,
        ),
        (
            "unreadable lower with an upper",
            vec![l0.clone(), secret.clone()],
            true,
        ),
    ] {
        let lw: Vec<&Path> = lowers.iter().map(PathBuf::as_path).collect();
        let (u, w) = if up {
            (Some(upper.as_path()), Some(work.as_path()))
        } else {
            (None, None)
        };
        fails.extend(refusal(
            l.root(),
            &format!("{what} (native)"),
            &mut setpriv(native_args(&lw, u, w, &merged)),
            &merged,
            &["lower", &s(&secret)],
        ));
        fails.extend(refusal(
            l.root(),
            &format!("{what} (-o)"),
            &mut setpriv(overlay_args(None, &lw, u, w, &merged)),
            &merged,
            &["lower", &s(&secret)],
        ));
    }
    assert!(
        fails.is_empty(),
        "{} problem(s):\n{}",
        fails.len(),
        fails.join("\n")
    );
}

/// The generic mount flags reach the mount and act: nosuid, noexec (a script cannot run),
/// nodev, noatime, and allow_root/allow_other/default_permissions are accepted; a root mount
/// is suid and nodev by default, and open to other users.
#[test]
fn generic_mount_flags_take_effect() {
    let l = Layers::new(1);
    l.lower(0)
        .file("run.sh", "#!/bin/sh\necho ran\n")
        .chmod("run.sh", 0o755);
    // Mounts with the given flags; returns the mount, its mount options and the mountpoint.
    let mount_flags = |name: &str, flags: &str| {
        let (m, out, _, merged) = mount_o_with(&l, name, flags, &["run.sh"]);
        assert!(out.stderr.is_empty(), "stderr: {}", stderr_of(&out));
        let opts = mount_entry(&merged).expect("in /proc/self/mounts").opts;
        (m, opts, merged)
    };

    let (m, opts, merged) = mount_flags(
        "flags",
        "nosuid,noexec,nodev,noatime,allow_root,default_permissions",
    );
    for f in [
        "nosuid",
        "noexec",
        "nodev",
        "noatime",
        "default_permissions",
    ] {
        assert!(opts.contains(&f.to_string()), "{f} missing: {opts:?}");
    }
    let run = Command::new(merged.join("run.sh")).output();
    assert_eq!(
        run.map_err(|e| e.raw_os_error()).err(),
        Some(Some(libc::EACCES)),
        "noexec"
    );
    drop(m);

    // By default a root mount runs set-user-ID programs (kernel overlayfs does, and
    // fuse-overlayfs mounts `suid` as root) and opens no devices (`nodev`, as fuse-overlayfs).
    let (m, opts, _) = mount_flags("default", "atime");
    assert!(!opts.contains(&"nosuid".to_string()), "{opts:?}");
    assert!(opts.contains(&"nodev".to_string()), "{opts:?}");
    drop(m);

    let (_m, opts, merged) = mount_flags("plain", "exec,suid,dev,atime");
    for f in ["nosuid", "noexec", "nodev"] {
        assert!(!opts.contains(&f.to_string()), "{f} present: {opts:?}");
    }
    assert!(opts.contains(&"allow_other".to_string()), "{opts:?}");
    let run = Command::new(merged.join("run.sh")).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&run.stdout), "ran\n");
}

/// The daemon in the background keeps nothing its caller left open: a pipe whose write end
/// the mount command inherited reaches its end once the caller closes its own copy (a script
/// reading the command's output to its end, or a lock it holds on a descriptor, is not held
/// up for the life of the mount).
#[test]
fn the_daemon_lets_go_of_inherited_descriptors() {
    let l = two_layers();
    let (upper, work, merged) = l.mount_dirs("m");
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array. Close-on-exec, so that only the mount
    // command below inherits the write end (not what other tests start meanwhile).
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    let mut cmd = um(&native_args(
        &l.lower_paths(),
        Some(&upper),
        Some(&work),
        &merged,
    ));
    let write_end = fds[1];
    // SAFETY: only fcntl, async-signal-safe, between fork and exec.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            libc::fcntl(write_end, libc::F_SETFD, 0);
            Ok(())
        });
    }
    let (_m, _) = mount_ok(
        &mut cmd,
        &merged,
        Some(&upper),
        Some(&work),
        &["a", "b", "d"],
    );
    // SAFETY: closing our own write end, then a non-blocking read of our read end into a
    // buffer we own.
    let got = unsafe {
        libc::close(fds[1]);
        libc::fcntl(fds[0], libc::F_SETFL, libc::O_NONBLOCK);
        let mut b = [0u8; 1];
        let n = libc::read(fds[0], b.as_mut_ptr().cast(), 1);
        let e = std::io::Error::last_os_error().raw_os_error();
        libc::close(fds[0]);
        (n, if n < 0 { e } else { None })
    };
    assert_eq!(
        got,
        (0, None),
        "the pipe's end (EAGAIN: the daemon holds its write end)"
    );
}
