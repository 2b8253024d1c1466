//! Permissions for other users (SPEC §2 `allow_other`/`default_permissions`, §3 "Ownership",
//! §6): a user who is not the mount's owner gets exactly the access a local filesystem gives.
//!
//! The oracle is the host filesystem itself: the same tree (names, modes, owners, groups) is
//! built once as a plain directory and once as a unionmount (half of it in a lower layer, half
//! in the upper), the same script runs as two unprivileged users against both, and the two
//! transcripts (results and errno names, op by op) and the final trees must be identical.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// First test user (also created by the rootless tests) and a second one.
const USER_A: &str = "umtest";
const USER_B: &str = "umtest2";
/// A group that `USER_A` is a supplementary member of and `USER_B` is not.
const GROUP: &str = "umtestg";

#[derive(Clone, Copy, Debug)]
struct Ids {
    a: u32,
    b: u32,
    g: u32,
}

fn id_of(args: &[&str]) -> Option<u32> {
    let out = Command::new("id").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout).trim().parse().ok()
}

fn gid_of(group: &str) -> Option<u32> {
    let out = Command::new("getent")
        .args(["group", group])
        .output()
        .ok()?;
    let line = String::from_utf8_lossy(&out.stdout).into_owned();
    line.split(':').nth(2)?.trim().parse().ok()
}

fn in_group(user: &str, group: &str) -> bool {
    let out = Command::new("id").args(["-Gn", user]).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .any(|g| g == group)
}

/// The two test users and the group, created if missing. /dev/fuse is not needed by them.
fn ids() -> Ids {
    static IDS: OnceLock<Ids> = OnceLock::new();
    *IDS.get_or_init(|| {
        for u in [USER_A, USER_B] {
            account_tool("useradd", &["-M", "-s", "/usr/sbin/nologin", u], || {
                id_of(&["-u", u]).is_some()
            });
        }
        account_tool("groupadd", &[GROUP], || gid_of(GROUP).is_some());
        account_tool("usermod", &["-a", "-G", GROUP, USER_A], || {
            in_group(USER_A, GROUP)
        });
        assert!(!in_group(USER_B, GROUP));
        Ids {
            a: id_of(&["-u", USER_A]).unwrap(),
            b: id_of(&["-u", USER_B]).unwrap(),
            g: gid_of(GROUP).unwrap(),
        }
    })
}

/// Runs `python3 SCRIPT ARGS` as `user` with its primary and supplementary groups.
fn as_user(user: &str, script: &Path, args: &[&str]) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", user, "--regid", user, "--init-groups", "--"])
        .args(["/usr/bin/python3", "-I"])
        .arg(script)
        .args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "as {user}: {}\nstdout: {}\nstderr: {}",
        script.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// One object of the test tree: path, mode (with type bit for directories), owner, group.
struct Entry {
    path: &'static str,
    dir: bool,
    mode: u32,
    uid: u32,
    gid: u32,
    content: &'static str,
}

const SCRIPT: &str = "#!/bin/sh\necho ran\n";

fn layout(ids: Ids) -> Vec<Entry> {
    let (a, b, g) = (ids.a, ids.b, ids.g);
    let f = |path, mode, uid, gid| Entry {
        path,
        dir: false,
        mode,
        uid,
        gid,
        content: "data\n",
    };
    let x = |path, mode, uid, gid| Entry {
        path,
        dir: false,
        mode,
        uid,
        gid,
        content: SCRIPT,
    };
    let d = |path, mode, uid, gid| Entry {
        path,
        dir: true,
        mode,
        uid,
        gid,
        content: "",
    };
    vec![
        f("r644", 0o644, 0, 0),
        f("r640", 0o640, 0, 0),
        f("r604g", 0o604, 0, g),
        f("w666", 0o666, 0, 0),
        f("w664g", 0o664, 0, g),
        f("w644", 0o644, 0, 0),
        f("w666t", 0o666, 0, 0),
        f("w644t", 0o644, 0, 0),
        f("suid", 0o6777, 0, 0),
        // Set-ID bits dropped by truncate, a truncating open, fallocate and a change of group.
        f("suid_tr", 0o6777, 0, 0),
        f("suid_ot", 0o6777, 0, 0),
        f("suid_fa", 0o6777, 0, 0),
        f("sgid_nx", 0o2666, 0, 0),
        f("sgid_nxg", 0o2666, 0, g),
        f("sgid_xg", 0o2676, 0, g),
        f("sgid_nxa", 0o2666, 0, 0),
        f("mine_sx", 0o6755, a, a),
        f("mine_snx", 0o2745, a, a),
        f("mine_same", 0o6755, a, a),
        f("suid_ch", 0o4755, 0, 0),
        x("x755.sh", 0o755, 0, 0),
        x("x644.sh", 0o644, 0, 0),
        x("x750g.sh", 0o750, 0, g),
        x("x700a.sh", 0o700, a, a),
        f("mine", 0o644, a, a),
        f("mine_fg", 0o644, a, 0),
        f("theirs", 0o666, b, b),
        f("theirs_ro", 0o644, b, b),
        d("noread", 0o711, 0, 0),
        f("noread/f", 0o644, 0, 0),
        d("nosearch", 0o744, 0, 0),
        f("nosearch/f", 0o644, 0, 0),
        d("nowrite", 0o755, 0, 0),
        f("nowrite/f", 0o666, 0, 0),
        d("sticky", 0o1777, 0, 0),
        f("sticky/a_file", 0o644, a, a),
        f("sticky/b_file", 0o644, b, b),
        f("sticky/a_keep", 0o666, a, a),
        f("sticky/b_keep", 0o666, b, b),
        f("sticky/root_file", 0o666, 0, 0),
        d("sticky/a_dir", 0o755, a, a),
        d("sticky/b_dir", 0o755, b, b),
        d("sticky/a_keepdir", 0o755, a, a),
        d("sticky/b_keepdir", 0o755, b, b),
        d("sticky_own", 0o1777, a, a),
        f("sticky_own/a_file", 0o644, a, a),
        f("sticky_own/b_file", 0o644, b, b),
        d("sgid", 0o2775, 0, g),
        d("sgid_open", 0o2777, 0, g),
        d("open", 0o777, 0, 0),
    ]
}

/// Builds `layout` under `root/prefix`.
fn build(root: &Path, prefix: &str, entries: &[Entry]) {
    let top = root.join(prefix);
    fs::create_dir_all(&top).unwrap();
    for e in entries {
        let p = top.join(e.path);
        if e.dir {
            fs::create_dir(&p).unwrap();
        } else {
            fs::write(&p, e.content).unwrap();
        }
    }
    // Owners first (chown clears set-id bits), then modes; children before parents.
    for e in entries.iter().rev() {
        let p = top.join(e.path);
        std::os::unix::fs::lchown(&p, Some(e.uid), Some(e.gid)).unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(e.mode)).unwrap();
    }
    fs::set_permissions(&top, fs::Permissions::from_mode(0o755)).unwrap();
}

/// The operations, in Python so that every result is an errno name. Arguments: the tree
/// root, the caller's tag (`a` or `b`), the other user's tag, the other user's uid, the
/// shared group's gid.
const OPS: &str = r#"
import errno, os, subprocess, sys
root, me, other = sys.argv[1], sys.argv[2], sys.argv[3]
other_uid, grp = int(sys.argv[4]), int(sys.argv[5])
os.chdir(root)
os.umask(0o022)

def r(label, f):
    try:
        v = f()
        print(f"{label}: OK" + ("" if v is None else f" {v}"))
    except OSError as e:
        print(f"{label}: {errno.errorcode.get(e.errno, e.errno)}")

def read(p):
    with open(p, "rb") as f:
        return repr(f.read().decode())

def append(p):
    fd = os.open(p, os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, f"+{me}\n".encode())
    finally:
        os.close(fd)

def fallocate(p):
    fd = os.open(p, os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, 8192)
    finally:
        os.close(fd)

def create(p, mode=0o644):
    os.close(os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode))
    st = os.stat(p)
    return f"{oct(st.st_mode)} gid={'grp' if st.st_gid == grp else 'own' if st.st_gid == os.getgid() else st.st_gid}"

def mkdir(p, mode=0o755):
    os.mkdir(p, mode)
    st = os.stat(p)
    return f"{oct(st.st_mode)} gid={'grp' if st.st_gid == grp else 'own' if st.st_gid == os.getgid() else st.st_gid}"

def run(p):
    return subprocess.run(["./" + p], capture_output=True, env={}).stdout.decode().strip()

def mode(p):
    return oct(os.stat(p).st_mode)

def times(p, t):
    os.utime(p, t)
    st = os.stat(p)
    return st.st_mtime_ns if t is not None else None

for P in ["lo", "up"]:
    for f in ["r644", "r640", "r604g", "w666", "w644", "x755.sh", "x644.sh", "x750g.sh", "x700a.sh"]:
        for bit, name in [(os.R_OK, "R"), (os.W_OK, "W"), (os.X_OK, "X")]:
            r(f"{P} access {f} {name}", lambda: os.access(f"{P}/{f}", bit))
    for f in ["r644", "r640", "r604g", "w666", "noread/f", "nosearch/f"]:
        r(f"{P} read {f}", lambda: read(f"{P}/{f}"))
    for f in ["w666", "w664g", "w644", "theirs", "theirs_ro", "suid"]:
        r(f"{P} append {f}", lambda: append(f"{P}/{f}"))
    r(f"{P} mode suid after write", lambda: mode(f"{P}/suid"))
    for f in ["suid_tr", "sgid_nx", "sgid_nxg"]:
        r(f"{P} truncate {f}", lambda: (os.truncate(f"{P}/{f}", 1), mode(f"{P}/{f}"))[1])
    r(f"{P} append sgid_xg", lambda: (append(f"{P}/sgid_xg"), mode(f"{P}/sgid_xg"))[1])
    r(f"{P} append sgid_nxa", lambda: (append(f"{P}/sgid_nxa"), mode(f"{P}/sgid_nxa"))[1])
    r(f"{P} open-trunc suid_ot", lambda: (os.close(os.open(f"{P}/suid_ot", os.O_WRONLY | os.O_TRUNC)), mode(f"{P}/suid_ot"))[1])
    r(f"{P} fallocate suid_fa", lambda: (fallocate(f"{P}/suid_fa"), mode(f"{P}/suid_fa"))[1])
    r(f"{P} chgrp mine_sx", lambda: (os.chown(f"{P}/mine_sx", -1, grp), mode(f"{P}/mine_sx"))[1])
    r(f"{P} chgrp mine_snx", lambda: (os.chown(f"{P}/mine_snx", -1, grp), mode(f"{P}/mine_snx"))[1])
    r(f"{P} chown -1 -1 suid_ch", lambda: (os.chown(f"{P}/suid_ch", -1, -1), mode(f"{P}/suid_ch"))[1])
    r(f"{P} chown -1 -1 mine_same", lambda: (os.chown(f"{P}/mine_same", -1, -1), mode(f"{P}/mine_same"))[1])
    r(f"{P} truncate w666t", lambda: os.truncate(f"{P}/w666t", 2))
    r(f"{P} truncate w644t", lambda: os.truncate(f"{P}/w644t", 2))
    r(f"{P} open-trunc w644t", lambda: os.close(os.open(f"{P}/w644t", os.O_WRONLY | os.O_TRUNC)))
    for f in ["x755.sh", "x644.sh", "x750g.sh", "x700a.sh"]:
        r(f"{P} exec {f}", lambda: run(f"{P}/{f}"))
    for d in ["noread", "nosearch", "nowrite", "sticky"]:
        r(f"{P} list {d}", lambda: sorted(os.listdir(f"{P}/{d}")))
    r(f"{P} stat noread/f", lambda: mode(f"{P}/noread/f"))
    r(f"{P} stat nosearch/f", lambda: mode(f"{P}/nosearch/f"))
    r(f"{P} chdir nosearch", lambda: (os.chdir(f"{P}/nosearch"), os.chdir(root))[1])
    r(f"{P} create nowrite/new_{me}", lambda: create(f"{P}/nowrite/new_{me}"))
    r(f"{P} mkdir nowrite/d_{me}", lambda: mkdir(f"{P}/nowrite/d_{me}"))
    r(f"{P} symlink nowrite/s_{me}", lambda: os.symlink("f", f"{P}/nowrite/s_{me}"))
    r(f"{P} unlink nowrite/f", lambda: os.unlink(f"{P}/nowrite/f"))
    r(f"{P} rename nowrite/f", lambda: os.rename(f"{P}/nowrite/f", f"{P}/nowrite/g"))
    r(f"{P} rename nowrite/f out", lambda: os.rename(f"{P}/nowrite/f", f"{P}/open/f_{me}"))
    r(f"{P} write nowrite/f", lambda: append(f"{P}/nowrite/f"))
    # Sticky directories.
    r(f"{P} sticky rename other's", lambda: os.rename(f"{P}/sticky/{other}_keep", f"{P}/sticky/stolen_{me}"))
    r(f"{P} sticky unlink other's", lambda: os.unlink(f"{P}/sticky/{other}_keep"))
    r(f"{P} sticky rmdir other's", lambda: os.rmdir(f"{P}/sticky/{other}_keepdir"))
    r(f"{P} sticky write other's", lambda: append(f"{P}/sticky/{other}_keep"))
    r(f"{P} sticky unlink root's", lambda: os.unlink(f"{P}/sticky/root_file"))
    r(f"{P} sticky write root's", lambda: append(f"{P}/sticky/root_file"))
    r(f"{P} sticky create", lambda: create(f"{P}/sticky/new_{me}"))
    r(f"{P} sticky replace other's", lambda: os.rename(f"{P}/sticky/new_{me}", f"{P}/sticky/{other}_keep"))
    r(f"{P} sticky rename own", lambda: os.rename(f"{P}/sticky/{me}_file", f"{P}/sticky/{me}_moved"))
    r(f"{P} sticky unlink own", lambda: os.unlink(f"{P}/sticky/{me}_moved"))
    r(f"{P} sticky rmdir own", lambda: os.rmdir(f"{P}/sticky/{me}_dir"))
    r(f"{P} sticky_own unlink other's", lambda: os.unlink(f"{P}/sticky_own/{other}_file"))
    r(f"{P} list sticky after", lambda: sorted(os.listdir(f"{P}/sticky")))
    # Set-group-ID directories.
    r(f"{P} sgid create", lambda: create(f"{P}/sgid/f_{me}"))
    r(f"{P} sgid mkdir", lambda: mkdir(f"{P}/sgid/d_{me}"))
    r(f"{P} sgid_open create 2755", lambda: create(f"{P}/sgid_open/f_{me}", 0o2755))
    r(f"{P} sgid_open create 644", lambda: create(f"{P}/sgid_open/g_{me}"))
    r(f"{P} sgid_open mkdir", lambda: mkdir(f"{P}/sgid_open/d_{me}"))
    r(f"{P} sgid_open mkdir nested", lambda: mkdir(f"{P}/sgid_open/d_{me}/e"))
    r(f"{P} open create", lambda: create(f"{P}/open/f_{me}_new"))
    r(f"{P} open mkdir", lambda: mkdir(f"{P}/open/d_{me}"))
    r(f"{P} open hardlink r644", lambda: os.link(f"{P}/r644", f"{P}/open/hl_r644_{me}"))
    r(f"{P} open hardlink w666", lambda: os.link(f"{P}/w666", f"{P}/open/hl_w666_{me}"))
    # Owner-only attribute changes.
    r(f"{P} chmod mine", lambda: os.chmod(f"{P}/mine", 0o664))
    r(f"{P} chgrp mine to shared group", lambda: os.chown(f"{P}/mine", -1, grp))
    r(f"{P} chgrp mine to root", lambda: os.chown(f"{P}/mine", -1, 0))
    r(f"{P} chown mine to other", lambda: os.chown(f"{P}/mine", other_uid, -1))
    r(f"{P} chown mine to self", lambda: os.chown(f"{P}/mine", os.getuid(), -1))
    r(f"{P} chmod g+s mine_fg", lambda: (os.chmod(f"{P}/mine_fg", 0o2644), mode(f"{P}/mine_fg"))[1])
    r(f"{P} chmod theirs", lambda: os.chmod(f"{P}/theirs", 0o600))
    r(f"{P} chown theirs", lambda: os.chown(f"{P}/theirs", os.getuid(), -1))
    r(f"{P} chmod r644", lambda: os.chmod(f"{P}/r644", 0o666))
    r(f"{P} utime set mine", lambda: times(f"{P}/mine", (1000000, 2000000)))
    r(f"{P} utime set theirs", lambda: times(f"{P}/theirs", (1000000, 3000000)))
    r(f"{P} utime now theirs", lambda: times(f"{P}/theirs", None))
    r(f"{P} utime now theirs_ro", lambda: times(f"{P}/theirs_ro", None))
    r(f"{P} utime now r644", lambda: times(f"{P}/r644", None))
    r(f"{P} utime set r644", lambda: times(f"{P}/r644", (5, 6)))
    r(f"{P} mode mine", lambda: mode(f"{P}/mine"))
    # Extended attributes: user.* needs write permission, trusted.* needs privilege.
    r(f"{P} setxattr user w666", lambda: os.setxattr(f"{P}/w666", f"user.{me}", b"v"))
    r(f"{P} setxattr user r644", lambda: os.setxattr(f"{P}/r644", f"user.{me}", b"v"))
    r(f"{P} setxattr trusted w666", lambda: os.setxattr(f"{P}/w666", f"trusted.{me}", b"v"))
    r(f"{P} getxattr w666", lambda: os.getxattr(f"{P}/w666", "user.a"))
    r(f"{P} listxattr w666", lambda: sorted(os.listxattr(f"{P}/w666")))
    r(f"{P} removexattr r644", lambda: os.removexattr(f"{P}/r644", "user.a"))
    r(f"{P} owner mine", lambda: (lambda s: (s.st_uid == os.getuid(), s.st_gid == grp))(os.stat(f"{P}/mine")))
"#;

/// Runs the script as both users against `root`; returns the combined transcript.
fn transcript(root: &Path, script: &Path, ids: Ids) -> String {
    let r = root.to_str().unwrap();
    let mut out = String::new();
    for (user, me, other, other_uid) in [(USER_A, "a", "b", ids.b), (USER_B, "b", "a", ids.a)] {
        out.push_str(&format!("== {user}\n"));
        out.push_str(&as_user(
            user,
            script,
            &[r, me, other, &other_uid.to_string(), &ids.g.to_string()],
        ));
    }
    out
}

fn chmod(p: &Path, mode: u32) {
    fs::set_permissions(p, fs::Permissions::from_mode(mode)).unwrap();
}

/// Every check of the script, as two users, on a plain tree and on a unionmount with the same
/// tree half in a lower layer (`lo/`) and half in the upper (`up/`), mounted with
/// `-o allow_other,default_permissions`: identical transcripts and identical final trees.
#[test]
fn other_users_get_local_filesystem_access() {
    local_filesystem_access(&[]);
}

/// The same on the page-cached path, where the daemon drops set-ID bits itself (the kernel
/// leaves it to the daemon there).
#[test]
fn other_users_get_local_filesystem_access_page_cached() {
    local_filesystem_access(&["--passthrough", "off"]);
}

fn local_filesystem_access(extra: &[&str]) {
    let ids = ids();
    let l = Layers::new(1);
    chmod(l.root(), 0o755);
    let entries = layout(ids);
    let script = l.root().join("ops.py");
    fs::write(&script, OPS).unwrap();
    chmod(&script, 0o644);

    let plain = l.mkdir("plain");
    chmod(&plain, 0o755);
    build(&plain, "lo", &entries);
    build(&plain, "up", &entries);

    build(&l.lowers[0], "lo", &entries);
    let base = l.mkdir("u");
    chmod(&base, 0o755);
    let upper = base.join("upper");
    fs::create_dir(&upper).unwrap();
    chmod(&upper, 0o755);
    build(&upper, "up", &entries);
    let mut args = vec!["-o", "allow_other,default_permissions"];
    args.extend_from_slice(extra);
    let m = l.mount_with("u", &args);
    chmod(&m.merged, 0o755);

    let want = transcript(&plain, &script, ids);
    let got = transcript(&m.merged, &script, ids);
    // Sanity: the script did exercise both outcomes.
    assert!(want.contains(": EACCES") && want.contains(": EPERM") && want.contains(": OK"));
    let (w, g): (Vec<_>, Vec<_>) = (want.lines().collect(), got.lines().collect());
    let diffs: Vec<String> = w
        .iter()
        .zip(g.iter())
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("  local: {a}\n  union: {b}"))
        .collect();
    assert!(
        diffs.is_empty() && w.len() == g.len(),
        "unionmount differs from the local filesystem in {} of {} results:\n{}",
        diffs.len(),
        w.len(),
        diffs.join("\n")
    );

    let opts = TreeOpts {
        dir_nlink: true,
        mtime: false,
        xattr_prefix: "user.",
    };
    let mut local = tree(&plain, &opts);
    let mut union = tree(&m.merged, &opts);
    // Roots differ only by where they are.
    local.remove("");
    union.remove("");
    assert_same_tree(&local, &union, "final tree, local vs unionmount");
    // Failed or read-only accesses did not copy anything up.
    for f in [
        "r640",
        "r604g",
        "x755.sh",
        "noread/f",
        "nosearch/f",
        "suid_ch",
    ] {
        assert!(
            !m.upper_path("lo").join(f).exists(),
            "lo/{f} was copied up by a read or a refused change"
        );
    }
}

/// A copy-up made on behalf of an unprivileged caller keeps the lower owner, mode and group
/// (of the file and of its parent directories); what that caller creates is theirs.
#[test]
fn copy_up_for_another_user_keeps_the_owner() {
    let ids = ids();
    let l = Layers::new(1);
    chmod(l.root(), 0o755);
    l.lower(0)
        .dir("pub/sub")
        .file("pub/sub/shared", "lower\n")
        .chown("pub", 1234, 4321)
        .chown("pub/sub", 1235, 4322)
        .chown("pub/sub/shared", 1234, 4321)
        .chmod("pub", 0o1777)
        .chmod("pub/sub", 0o2777)
        .chmod("pub/sub/shared", 0o666);
    let m = l.mount_with("u", &["-o", "allow_other,default_permissions"]);
    chmod(m.merged.parent().unwrap(), 0o755);
    let script = l.root().join("w.py");
    fs::write(
        &script,
        r#"
import os, sys
m = sys.argv[1]
with open(f"{m}/pub/sub/shared", "a") as f:
    f.write("by user\n")
with open(f"{m}/pub/mine", "w") as f:
    f.write("new\n")
os.mkdir(f"{m}/pub/sub/newdir")
with open(f"{m}/pub/sub/newdir/deep", "w") as f:
    f.write("deep\n")
print("done")
"#,
    )
    .unwrap();
    chmod(&script, 0o644);
    assert_eq!(
        as_user(USER_A, &script, &[m.merged.to_str().unwrap()]).trim(),
        "done"
    );
    let meta = |p: &Path| {
        let md = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        (md.uid(), md.gid(), md.mode() & 0o7777)
    };
    for (rel, want) in [
        ("pub", (1234, 4321, 0o1777)),
        ("pub/sub", (1235, 4322, 0o2777)),
        ("pub/sub/shared", (1234, 4321, 0o666)),
        ("pub/mine", (ids.a, ids.a, 0o644)),
        ("pub/sub/newdir", (ids.a, 4322, 0o2755)),
        ("pub/sub/newdir/deep", (ids.a, 4322, 0o644)),
    ] {
        assert_eq!(
            meta(&m.upper_path(rel)),
            want,
            "upper {rel} (uid, gid, mode)"
        );
        assert_eq!(meta(&m.path(rel)), want, "merged {rel} (uid, gid, mode)");
    }
    assert_eq!(
        fs::read_to_string(m.upper_path("pub/sub/shared")).unwrap(),
        "lower\nby user\n"
    );
    assert_eq!(
        fs::read_to_string(l.lower(0).path("pub/sub/shared")).unwrap(),
        "lower\n",
        "lower unchanged"
    );
}
