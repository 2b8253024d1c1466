//! Container engines end to end (SPEC §1, §2, §4): a rootless container root filesystem built
//! from busybox image layers in the AUFS/OCI format (`.wh.NAME` whiteouts, `.wh..wh..opq`
//! opaque directories), entered with chroot and changed with busybox; two containers on the
//! same image; containers-storage's `mount_program` invocation (500 symlinked layers, root and
//! rootless); and containerd's fuse-overlayfs snapshotter path through `mount.fuse3` with the
//! binary installed under the name `fuse-overlayfs`.

mod common;

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;

const USER: &str = TEST_USER;

/// The static busybox every image here is built from.
const BUSYBOX: &str = "/bin/busybox";

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn out_text(out: &Output) -> String {
    format!(
        "status {}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The unionmount binary as the test user can run it: the built one when the user can reach
/// it, else a copy in `dir` (a copy, never a link, so nothing is ever written to the build).
fn user_binary(dir: &Path) -> PathBuf {
    let ok = Command::new("setpriv")
        .args(["--reuid", USER, "--regid", USER, "--clear-groups", "--"])
        .args(["test", "-x", BIN])
        .status()
        .unwrap();
    if ok.success() {
        return PathBuf::from(BIN);
    }
    let copy = dir.join("unionmount");
    fs::copy(BIN, &copy).unwrap();
    fs::set_permissions(&copy, fs::Permissions::from_mode(0o755)).unwrap();
    copy
}

/// Makes the temporary root reachable by the test user and hands it the whole tree.
fn give_to_user(l: &Layers, uid: u32) {
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    chown_tree(l.root(), uid);
}

fn is_whiteout(p: &Path) -> bool {
    fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_char_device() && m.rdev() == 0)
}

fn read(p: &Path) -> String {
    fs::read_to_string(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Every relative path in a real directory tree (not through a mount), with the markers.
fn all_paths(root: &Path) -> Vec<String> {
    raw_tree(root)
        .into_keys()
        .filter(|k| !k.is_empty())
        .collect()
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("lstat {}: {e}", p.display()));
    (m.uid(), m.gid())
}

/// The mount of `target` in the given mount table: (source, fstype, options).
fn mount_entry_in(table: &str, target: &Path) -> Option<(String, String, Vec<String>)> {
    let want = target.to_string_lossy().replace(' ', "\\040");
    table.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        (f.len() >= 4 && f[1] == want).then(|| {
            (
                f[0].to_string(),
                f[2].to_string(),
                f[3].split(',').map(str::to_string).collect(),
            )
        })
    })
}

// ---------------------------------------------------------------------------------------------
// A busybox image
// ---------------------------------------------------------------------------------------------

const APPLET_SYMLINKS: &[&str] = &[
    "sh", "ls", "echo", "mv", "rm", "mkdir", "find", "sort", "stat",
];
const APPLET_HARDLINKS: &[&str] = &["cat", "test"];

/// What the container runs: reads, writes, deletes and renames with busybox, printing the
/// view before and after.
const CONTAINER_SCRIPT: &str = r#"set -e
echo "hostname: $(cat /etc/hostname)"
echo "motd: $(cat /etc/motd)"
echo data: $(ls -A /data)
echo opaq: $(ls -A /opaq)
echo links: $(stat -c '%i %h' /bin/busybox) $(stat -c '%i %h' /bin/cat)
test ! -e /data/old
test ! -e /data/sub
test ! -e /opaq/a
echo hello > /tmp/new
echo more >> /etc/hostname
rm /data/keep
rm -r /srv
mkdir /srv
echo fresh > /srv/only
mv /data/replaced /data/renamed
mv /data/tree /moved
echo r > /tmp/r1
mv /tmp/r1 /tmp/r2
echo ---
find / -xdev
echo ---
cat /etc/hostname /tmp/new /data/renamed /moved/a /srv/only /tmp/r2
"#;

/// Whether `p` is an ELF64 executable without a program interpreter (PT_INTERP).
fn is_static_elf(p: &Path) -> bool {
    let Ok(b) = fs::read(p) else {
        return false;
    };
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]) as usize;
    if b.len() < 64 || &b[..4] != b"\x7fELF" || b[4] != 2 {
        return false;
    }
    let phoff = u64::from_le_bytes(b[0x20..0x28].try_into().unwrap()) as usize;
    let (phentsize, phnum) = (u16_at(0x36), u16_at(0x38));
    (0..phnum).all(|i| {
        let o = phoff + i * phentsize;
        o + 4 <= b.len() && u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) != 3
    })
}

/// Three image layers, top-most first: `lowers[0]` makes `opaq` opaque with `.wh..wh..opq`
/// and carries the container's script; `lowers[1]` deletes `data/old` and the directory
/// `data/sub` with `.wh.` files and replaces `data/replaced` and `etc/hostname`; `lowers[2]` is
/// the base: busybox with applet symlinks and hard links, etc, tmp and data.
fn busybox_image() -> Layers {
    assert!(
        is_static_elf(Path::new(BUSYBOX)),
        "{BUSYBOX} must be a static busybox (Debian package busybox-static): it runs in a chroot"
    );
    let l = Layers::new(3);
    let base = l.lower(2);
    base.dir("bin");
    fs::copy(BUSYBOX, base.path("bin/busybox")).unwrap();
    base.chmod("bin/busybox", 0o755);
    for a in APPLET_SYMLINKS {
        base.symlink(&format!("bin/{a}"), "busybox");
    }
    for a in APPLET_HARDLINKS {
        base.hardlink("bin/busybox", &format!("bin/{a}"));
    }
    base.file("etc/hostname", "base\n")
        .file("etc/motd", "welcome\n")
        .file("etc/passwd", "root:x:0:0:root:/:/bin/sh\n")
        .dir("tmp")
        .chmod("tmp", 0o1777)
        .file("data/keep", "keep\n")
        .file("data/old", "old\n")
        .file("data/replaced", "v1\n")
        .file("data/sub/deep", "deep\n")
        .file("data/tree/a", "a\n")
        .file("srv/x", "x\n")
        .file("srv/y", "y\n")
        .file("opaq/a", "a\n")
        .file("opaq/b", "b\n");
    l.lower(1)
        .aufs_whiteout("data/old")
        .aufs_whiteout("data/sub")
        .file("data/replaced", "v2\n")
        .file("data/added", "added\n")
        .file("etc/hostname", "layer1\n");
    l.lower(0)
        .opaque_marker("opaq")
        .file("opaq/c", "c\n")
        .file("etc/motd", "top\n")
        .file("run.sh", CONTAINER_SCRIPT)
        .chmod("run.sh", 0o755);
    l
}

/// Every path the container sees after its script ran.
fn expected_container_paths() -> BTreeSet<String> {
    let mut v: BTreeSet<String> = [
        "/",
        "/bin",
        "/bin/busybox",
        "/data",
        "/data/added",
        "/data/renamed",
        "/etc",
        "/etc/hostname",
        "/etc/motd",
        "/etc/passwd",
        "/moved",
        "/moved/a",
        "/opaq",
        "/opaq/c",
        "/run.sh",
        "/srv",
        "/srv/only",
        "/tmp",
        "/tmp/new",
        "/tmp/r2",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for a in APPLET_SYMLINKS.iter().chain(APPLET_HARDLINKS) {
        v.insert(format!("/bin/{a}"));
    }
    v
}

/// The shell line that enters a container on `merged` as its root: a new user namespace
/// mapping the caller to root, new mount and PID namespaces, chroot.
fn enter(merged: &Path, cmd: &str) -> String {
    format!(
        "unshare --user --map-root-user --mount --pid --fork chroot {} {cmd}",
        merged.display()
    )
}

// ---------------------------------------------------------------------------------------------
// 1. A rootless container root filesystem
// ---------------------------------------------------------------------------------------------

/// As an unprivileged user in `unshare -Urm`: mount the busybox image with an upper, enter it
/// (own user, mount and PID namespaces, chroot) and run busybox commands that read, write,
/// delete and rename; the view honours the AUFS whiteouts and the opaque marker and never
/// shows a marker; after unmounting, the upper holds the changes in the unprivileged format
/// (char 0/0 whiteouts, `user.overlay.opaque`), owned by the user, and the layers are
/// untouched.
#[test]
fn rootless_busybox_container() {
    let uid = test_user();
    let l = busybox_image();
    let _reaper = Reaper(l.root().to_path_buf());
    let before: Vec<_> = l
        .lowers
        .iter()
        .map(|p| tree(p, &TreeOpts::default()))
        .collect();
    let c = l.mkdir("c");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(c.join(d)).unwrap();
    }
    let bin = user_binary(&l.mkdir("bin"));
    give_to_user(&l, uid);
    let merged = c.join("merged");
    let out = as_user_in_namespace(&format!(
        r#"
        {bin} --lower {lowers} --upper {c}/upper --work {c}/work {m}
        trap 'fusermount3 -u {m} 2>/dev/null || umount -l {m}' EXIT
        {enter}
        "#,
        bin = bin.display(),
        lowers = l.lowerdir_opt(),
        c = c.display(),
        m = merged.display(),
        enter = enter(&merged, "/bin/sh /run.sh"),
    ));
    assert_no_daemons(l.root(), "after the script");

    // What the container saw.
    let parts: Vec<&str> = out.split("---\n").collect();
    assert_eq!(parts.len(), 3, "container output:\n{out}");
    let head: Vec<&str> = parts[0].lines().collect();
    assert_eq!(
        &head[..4],
        &[
            "hostname: layer1",
            "motd: top",
            "data: added keep replaced tree",
            "opaq: c"
        ],
        "the image as the container sees it:\n{out}"
    );
    let links: Vec<&str> = head[4].trim_start_matches("links: ").split(' ').collect();
    assert_eq!(links.len(), 4, "{}", head[4]);
    assert_eq!(links[0], links[2], "hard links share st_ino: {}", head[4]);
    assert_eq!(
        (links[1], links[3]),
        ("3", "3"),
        "st_nlink of busybox and its two hard links"
    );
    let found: BTreeSet<String> = parts[1].lines().map(str::to_string).collect();
    assert_eq!(found, expected_container_paths(), "the container's tree");
    assert!(
        !out.contains(".wh."),
        "a marker leaked into the view:\n{out}"
    );
    assert_eq!(parts[2], "layer1\nmore\nhello\nv2\na\nfresh\nr\n");

    // The upper on disk.
    let up = c.join("upper");
    assert_eq!(read(&up.join("tmp/new")), "hello\n");
    assert_eq!(read(&up.join("tmp/r2")), "r\n");
    assert!(!up.join("tmp/r1").exists());
    assert_eq!(read(&up.join("etc/hostname")), "layer1\nmore\n");
    assert_eq!(read(&up.join("data/renamed")), "v2\n");
    assert_eq!(read(&up.join("moved/a")), "a\n");
    for w in ["data/keep", "data/replaced", "data/tree"] {
        assert!(is_whiteout(&up.join(w)), "{w}: a char 0/0 whiteout");
    }
    assert_eq!(names(&up.join("srv")), strs(&["only"]));
    assert_eq!(
        get_xattr(&up.join("srv"), "user.overlay.opaque"),
        Ok(b"y".to_vec()),
        "a directory made where a lower one was deleted is opaque"
    );
    for (path, (_, _, xattrs)) in raw_tree(&up) {
        assert!(
            xattrs.iter().all(|x| !x.starts_with("trusted.")),
            "{path}: {xattrs:?}"
        );
        assert!(
            !path.contains(".wh."),
            "{path}: mknod 0/0 works, no .wh. files"
        );
    }
    for p in ["tmp/new", "srv/only", "moved/a", "etc/hostname"] {
        assert_eq!(owner(&up.join(p)), (uid, uid), "{p} belongs to the user");
    }
    // The image layers are unchanged (apart from the owner the test gave them).
    for (i, p) in l.lowers.iter().enumerate() {
        let mut now = tree(p, &TreeOpts::default());
        let mut was = before[i].clone();
        for o in now.values_mut().chain(was.values_mut()) {
            o.uid = 0;
            o.gid = 0;
        }
        assert_same_tree(&was, &now, &format!("lower {i}"));
    }
}

/// Two containers on the same image at once, each with its own upper: each sees its own
/// changes only, and each upper holds only its own.
#[test]
fn two_containers_share_an_image() {
    let uid = test_user();
    let l = busybox_image();
    let _reaper = Reaper(l.root().to_path_buf());
    let (a, b) = (l.mkdir("a"), l.mkdir("b"));
    for c in [&a, &b] {
        for d in ["upper", "work", "merged"] {
            fs::create_dir_all(c.join(d)).unwrap();
        }
    }
    let bin = user_binary(&l.mkdir("bin"));
    give_to_user(&l, uid);
    let (ma, mb) = (a.join("merged"), b.join("merged"));
    let show = |m: &Path| {
        format!(
            r#"echo "$(cat {m}/tmp/who) | $(ls {m}/data | tr '\n' ' ')| $(cat {m}/etc/motd) | $(test -e {m}/opaq && ls -A {m}/opaq | tr '\n' ' ' || echo none)""#,
            m = m.display()
        )
    };
    let out = as_user_in_namespace(&format!(
        r#"
        {bin} --lower {lowers} --upper {a}/upper --work {a}/work {ma}
        trap 'fusermount3 -u {ma} 2>/dev/null || umount -l {ma}' EXIT
        {bin} --lower {lowers} --upper {b}/upper --work {b}/work {mb}
        trap 'fusermount3 -u {ma} 2>/dev/null || umount -l {ma}; fusermount3 -u {mb} 2>/dev/null || umount -l {mb}' EXIT
        {enter_a} &
        pa=$!
        {enter_b} &
        pb=$!
        wait $pa
        wait $pb
        {show_a}
        {show_b}
        "#,
        bin = bin.display(),
        lowers = l.lowerdir_opt(),
        a = a.display(),
        b = b.display(),
        ma = ma.display(),
        mb = mb.display(),
        enter_a = enter(
            &ma,
            "/bin/sh -c 'echo A > /tmp/who && rm /data/keep && echo a-only > /etc/motd'"
        ),
        enter_b = enter(
            &mb,
            "/bin/sh -c 'echo B > /tmp/who && echo b-changed > /data/keep && rm -r /opaq'"
        ),
        show_a = show(&ma),
        show_b = show(&mb),
    ));
    assert_no_daemons(l.root(), "after the script");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        [
            "A | added replaced tree | a-only | c ",
            "B | added keep replaced tree | top | none",
        ],
        "the two views"
    );
    let (ua, ub) = (a.join("upper"), b.join("upper"));
    assert_eq!(read(&ua.join("tmp/who")), "A\n");
    assert!(is_whiteout(&ua.join("data/keep")));
    assert_eq!(read(&ua.join("etc/motd")), "a-only\n");
    assert!(!ua.join("opaq").exists());
    assert_eq!(read(&ub.join("tmp/who")), "B\n");
    assert_eq!(read(&ub.join("data/keep")), "b-changed\n");
    assert!(is_whiteout(&ub.join("opaq")));
    assert!(!ub.join("etc").exists());
    assert_eq!(
        all_paths(&ua),
        strs(&["data", "data/keep", "etc", "etc/motd", "tmp", "tmp/who"])
    );
    assert_eq!(
        all_paths(&ub),
        strs(&["data", "data/keep", "opaq", "tmp", "tmp/who"])
    );
}

// ---------------------------------------------------------------------------------------------
// 2. containers-storage's mount_program
// ---------------------------------------------------------------------------------------------

/// containers-storage's overlay driver layout: `home/<id>/diff` per layer and a short link
/// `home/l/<26 chars>` → `../<id>/diff`; the mount program gets the links, top-most first.
struct Storage {
    home: PathBuf,
    links: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    merged: PathBuf,
}

const MAPPING: &str = "0:1000:1:1:100000:65536";

/// Layers 5, 5 + `WHITEOUT_EVERY`, ... each hide, with a `.wh.` file, the `layers/NNN` of
/// the layer `HIDE_BELOW` further down.
const WHITEOUT_EVERY: usize = 50;
const HIDE_BELOW: usize = 20;

/// `n` layers (index 0 top-most): each has `layers/NNN`, `common` and `dir/subK/fNNN`; some
/// hide a lower layer's `layers/NNN` with `.wh.NNN`; `.wh.gone` hides a directory merged
/// from two layers below it; `opq` is opaque by `.wh..wh..opq`; `revived` is deleted and
/// created again further up; the bottom layer has files owned by container ids 0, 1, 5, 70000.
fn storage(l: &Layers, n: usize, chown: bool) -> Storage {
    assert!(n >= 40);
    let home = l.mkdir("storage/overlay");
    fs::create_dir_all(home.join("l")).unwrap();
    let mut links = Vec::new();
    for i in 0..n {
        let id = format!("{:064x}", (i as u128 + 1) * 0x9e37_79b9_7f4a_7c15);
        let short: String = format!("{:026}", (i as u64 + 7) * 2_654_435_761)
            .chars()
            .enumerate()
            .map(|(k, ch)| {
                if k % 3 == 0 {
                    (b'A' + (ch as u8 - b'0')) as char
                } else {
                    ch
                }
            })
            .collect();
        let diff = home.join(&id).join("diff");
        fs::create_dir_all(&diff).unwrap();
        fs::write(home.join(&id).join("link"), &short).unwrap();
        std::os::unix::fs::symlink(format!("../{id}/diff"), home.join("l").join(&short)).unwrap();
        links.push(home.join("l").join(&short));
        let b = LayerBuilder { root: diff };
        b.file(&format!("layers/{i:03}"), &format!("{i}"))
            .file("common", &format!("layer {i}"))
            .file(&format!("dir/sub{}/f{i:03}", i % 10), "");
        if i % WHITEOUT_EVERY == 5 && i + HIDE_BELOW < n {
            b.aufs_whiteout(&format!("layers/{:03}", i + HIDE_BELOW));
        }
        let mark = |k: usize| i == n * k / 40;
        if mark(4) {
            b.aufs_whiteout("gone");
        }
        if mark(32) || mark(36) {
            b.file(&format!("gone/f{i}"), "");
        }
        if i == 3 {
            b.opaque_marker("opq").file("opq/top", "");
        }
        if mark(28) {
            b.file("opq/bottom", "");
        }
        if i == 20 {
            b.file("revived", "20");
        }
        if i == 30 {
            b.aufs_whiteout("revived");
        }
        if i == 35 {
            b.file("revived", "35");
        }
        if i == n - 1 {
            b.file("owned/root", "")
                .file("owned/one", "")
                .file("owned/five", "")
                .file("owned/stray", "");
            if chown {
                b.chown("owned/root", 0, 0)
                    .chown("owned/one", 1, 1)
                    .chown("owned/five", 5, 7)
                    .chown("owned/stray", 70000, 70000);
            }
        }
    }
    let c = home.join(format!("{:064x}", 0xc0ffee_u64));
    let s = Storage {
        upper: c.join("diff"),
        work: c.join("work"),
        merged: c.join("merged"),
        home,
        links,
    };
    for d in [&s.upper, &s.work, &s.merged] {
        fs::create_dir_all(d).unwrap();
    }
    s
}

impl Storage {
    /// The `-o` argument containers-storage passes: lowers, upper, work, `mountopt`, the
    /// SELinux label, then the id mappings.
    fn mount_data(&self, mapping: &str) -> String {
        let lowers: Vec<String> = self
            .links
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        format!(
            "lowerdir={},upperdir={},workdir={},nodev,context=\"system_u:object_r:container_file_t:s0:c1,c2\",uidmapping={mapping},gidmapping={mapping}",
            lowers.join(":"),
            self.upper.display(),
            self.work.display()
        )
    }

    /// The names the image should show in `layers/`.
    fn expected_layer_names(&self) -> Vec<String> {
        let n = self.links.len();
        (0..n)
            .filter(|j| !(*j >= HIDE_BELOW && (j - HIDE_BELOW) % WHITEOUT_EVERY == 5))
            .map(|j| format!("{j:03}"))
            .collect()
    }

    /// The merged view of the image, as read through `m`.
    fn check_view(&self, m: &Path) {
        let n = self.links.len();
        assert_eq!(read(&m.join("common")), "layer 0", "top-most wins");
        assert_eq!(
            names(&m.join("layers")),
            self.expected_layer_names(),
            ".wh. files hide lower names"
        );
        assert_eq!(
            read(&m.join(format!("layers/{:03}", n - 1))),
            format!("{}", n - 1)
        );
        assert!(
            !m.join("gone").exists(),
            ".wh.gone hides a merged directory"
        );
        assert_eq!(names(&m.join("opq")), strs(&["top"]), ".wh..wh..opq");
        assert_eq!(read(&m.join("revived")), "20");
        let sub3: Vec<String> = (0..n)
            .filter(|i| i % 10 == 3)
            .map(|i| format!("f{i:03}"))
            .collect();
        assert_eq!(
            names(&m.join("dir/sub3")),
            sub3,
            "a directory merged from many layers"
        );
        let root = names(m);
        assert!(root.iter().all(|n| !n.starts_with(".wh.")), "{root:?}");
    }
}

/// As root, containers-storage runs `mount_program -o lowerdir=...,upperdir=...,workdir=...,
/// nodev,context="...",uidmapping=...,gidmapping=... MERGED` from its home directory with 500
/// lower layers given as `l/` symlinks: it returns 0 with the mount live, the view honours
/// `.wh.` whiteouts and opaque markers, owners are mapped from container ids on disk to host
/// ids in the view, and what a container (host uid 1000 = container root) writes is stored
/// with container ids and kernel overlayfs's whiteouts.
#[test]
fn containers_storage_mount_program_as_root() {
    let l = Layers::new(0);
    let _reaper = Reaper(l.root().to_path_buf());
    let s = storage(&l, 500, true);
    // The container's root (host uid 1000) must reach the mount.
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(BIN)
        .current_dir(&s.home)
        .arg("-o")
        .arg(s.mount_data(MAPPING))
        .arg(&s.merged)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let live = is_mounted(&s.merged);
    let mut m = Mount::adopt(
        s.merged.clone(),
        Some(s.upper.clone()),
        Some(s.work.clone()),
        Kind::Union,
    );
    assert!(out.status.success(), "mount program: {}", out_text(&out));
    assert!(live, "exit 0 but not mounted");
    assert!(out.stderr.is_empty(), "{}", out_text(&out));
    let table = fs::read_to_string("/proc/self/mounts").unwrap();
    let (_, fstype, opts) = mount_entry_in(&table, &s.merged).unwrap();
    assert!(fstype.starts_with("fuse"), "{fstype}");
    assert!(opts.contains(&"nodev".to_string()), "{opts:?}");

    s.check_view(&s.merged);
    let o = |p: &str| owner(&s.merged.join(p));
    assert_eq!(o(""), (1000, 1000), "container root on disk is host 1000");
    assert_eq!(o("owned/root"), (1000, 1000));
    assert_eq!(o("owned/one"), (100000, 100000));
    assert_eq!(o("owned/five"), (100004, 100006));
    assert_eq!(o("owned/stray"), (65534, 65534), "unmapped: overflow id");

    // The container's root (host 1000) writes and deletes.
    let st = Command::new("setpriv")
        .args([
            "--reuid=1000",
            "--regid=1000",
            "--clear-groups",
            "sh",
            "-euc",
        ])
        .arg(format!(
            "cd {} && echo c > created && rm common && rm -r dir/sub3 && echo 7 >> layers/007",
            s.merged.display()
        ))
        .output()
        .unwrap();
    assert!(st.status.success(), "{}", out_text(&st));
    assert_eq!(o("created"), (1000, 1000));
    assert!(!s.merged.join("common").exists());
    assert!(!s.merged.join("dir/sub3").exists());
    assert_eq!(read(&s.merged.join("layers/007")), "77\n");

    m.unmount();
    assert!(!is_mounted(&s.merged));
    assert_no_daemons(l.root(), "after unmounting");
    let u = &s.upper;
    assert_eq!(
        owner(&u.join("created")),
        (0, 0),
        "stored as container root"
    );
    assert_eq!(read(&u.join("created")), "c\n");
    assert!(is_whiteout(&u.join("common")));
    assert!(is_whiteout(&u.join("dir/sub3")));
    assert_eq!(owner(&u.join("layers/007")), (0, 0));
    assert_eq!(
        all_paths(u),
        strs(&[
            "common",
            "created",
            "dir",
            "dir/sub3",
            "layers",
            "layers/007"
        ])
    );
    for (path, (_, _, xattrs)) in raw_tree(u) {
        assert!(
            xattrs.iter().all(|x| !x.starts_with("user.")),
            "{path}: {xattrs:?}"
        );
    }
}

/// containers-storage writes the mappings as `uidmapping=` followed by `:` before every
/// range, so the first range comes after an empty field (`uidmapping=:0:1000:1:...`);
/// fuse-overlayfs skips empty fields (strtok), and the mount program must accept it.
#[test]
fn containers_storage_mapping_with_leading_colon() {
    let l = Layers::new(0);
    let _reaper = Reaper(l.root().to_path_buf());
    let s = storage(&l, 40, true);
    let out = Command::new(BIN)
        .current_dir(&s.home)
        .arg("-o")
        .arg(s.mount_data(&format!(":{MAPPING}")))
        .arg(&s.merged)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let live = is_mounted(&s.merged);
    let _m = Mount::adopt(s.merged.clone(), None, None, Kind::Union);
    assert!(out.status.success(), "mount program: {}", out_text(&out));
    assert!(live, "exit 0 but not mounted");
    s.check_view(&s.merged);
    assert_eq!(owner(&s.merged.join("owned/one")), (100000, 100000));
}

/// The same invocation rootless (fewer layers): the test user in `unshare -Urm`, as podman
/// runs its mount program, with the mapping identity for the namespace's root.
#[test]
fn containers_storage_mount_program_rootless() {
    let uid = test_user();
    let l = Layers::new(0);
    let _reaper = Reaper(l.root().to_path_buf());
    let s = storage(&l, 40, false);
    let bin = user_binary(&l.mkdir("bin"));
    give_to_user(&l, uid);
    let mapping = "0:0:1:1:100000:65536";
    let out = as_user_in_namespace(&format!(
        r#"
        cd {home}
        {bin} -o '{data}' {m}
        trap 'fusermount3 -u {m} 2>/dev/null || umount -l {m}' EXIT
        grep -q ' {m} fuse' /proc/self/mounts || {{ echo not mounted; exit 1; }}
        cd {m}
        echo "$(cat common) | $(ls layers | wc -l) | $(ls opq) | $(cat revived) | $(stat -c %u:%g owned/one)"
        ls -A
        echo c > created
        rm common
        rm -r dir/sub3
        cd /
        "#,
        home = s.home.display(),
        bin = bin.display(),
        data = s.mount_data(mapping),
        m = s.merged.display(),
    ));
    assert_no_daemons(l.root(), "after the script");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines[0],
        format!(
            "layer 0 | {} | top | 20 | 0:0",
            s.expected_layer_names().len()
        )
    );
    assert_eq!(
        &lines[1..],
        &["common", "dir", "layers", "opq", "owned", "revived"]
    );
    let u = &s.upper;
    assert_eq!(read(&u.join("created")), "c\n");
    assert_eq!(owner(&u.join("created")), (uid, uid));
    assert!(is_whiteout(&u.join("common")));
    assert!(is_whiteout(&u.join("dir/sub3")));
    assert_eq!(
        all_paths(u),
        strs(&["common", "created", "dir", "dir/sub3"])
    );
}

// ---------------------------------------------------------------------------------------------
// 3. containerd's fuse-overlayfs snapshotter
// ---------------------------------------------------------------------------------------------

/// A directory holding a copy of the binary named `fuse-overlayfs`, for PATH.
fn fuse_overlayfs_dir(l: &Layers) -> PathBuf {
    let dir = l.mkdir("fobin");
    fs::copy(BIN, dir.join("fuse-overlayfs")).unwrap();
    fs::set_permissions(
        dir.join("fuse-overlayfs"),
        fs::Permissions::from_mode(0o755),
    )
    .unwrap();
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
    dir
}

/// Two layers and upper/work/merged for the snapshotter tests.
fn snapshot_layers(l: &Layers) -> (PathBuf, PathBuf, PathBuf) {
    l.lower(0)
        .file("top", "top")
        .file("d/shared", "from 0")
        .aufs_whiteout("d/gone");
    l.lower(1)
        .file("bottom", "bottom")
        .file("d/shared", "from 1")
        .file("d/gone", "gone")
        .file("d/low", "low");
    let s = l.mkdir("snap");
    let dirs = (s.join("fs"), s.join("work"), s.join("merged"));
    for d in [&dirs.0, &dirs.1, &dirs.2] {
        fs::create_dir_all(d).unwrap();
    }
    dirs
}

/// The arguments containerd's mount helper path gives `mount.fuse3` for the snapshotter's
/// mount (type `fuse3.fuse-overlayfs`, source `overlay`, one `-o` per option).
fn containerd_args(l: &Layers, upper: &Path, work: &Path, merged: &Path) -> Vec<String> {
    vec![
        "overlay".into(),
        merged.to_string_lossy().into_owned(),
        "-o".into(),
        format!("workdir={}", work.display()),
        "-o".into(),
        format!("upperdir={}", upper.display()),
        "-o".into(),
        format!("lowerdir={}", l.lowerdir_opt()),
        "-t".into(),
        "fuse-overlayfs".into(),
    ]
}

/// As root: `mount.fuse3 overlay MERGED -o workdir=... -o upperdir=... -o lowerdir=... -t
/// fuse-overlayfs`, as containerd runs it for the snapshotter, finds the copy named
/// fuse-overlayfs on PATH; the mount is live when the helper returns, its source is `overlay`,
/// the view is right, and `umount` (containerd unmounts with umount(2)) ends the daemon.
#[test]
fn containerd_mount_helper_as_root() {
    let l = Layers::new(2);
    let _reaper = Reaper(l.root().to_path_buf());
    let (upper, work, merged) = snapshot_layers(&l);
    let dir = fuse_overlayfs_dir(&l);
    let path = format!(
        "{}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        dir.display()
    );
    let out = Command::new("mount.fuse3")
        .args(containerd_args(&l, &upper, &work, &merged))
        .env("PATH", &path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let live = is_mounted(&merged);
    let mut m = Mount::adopt(
        merged.clone(),
        Some(upper.clone()),
        Some(work.clone()),
        Kind::Union,
    );
    assert!(out.status.success(), "mount.fuse3: {}", out_text(&out));
    assert!(live, "mount.fuse3 returned 0 but nothing is mounted");
    let table = fs::read_to_string("/proc/self/mounts").unwrap();
    let (source, fstype, _) = mount_entry_in(&table, &merged).unwrap();
    assert_eq!(source, "overlay");
    assert_eq!(
        fstype, "fuse.unionmount",
        "served by unionmount, not another fuse-overlayfs"
    );
    let pids = daemons_under(l.root());
    assert_eq!(pids.len(), 1, "{pids:?}");
    assert_eq!(
        fs::read_link(format!("/proc/{}/exe", pids[0])).unwrap(),
        dir.join("fuse-overlayfs")
    );
    assert_eq!(names(&merged), strs(&["bottom", "d", "top"]));
    assert_eq!(names(&merged.join("d")), strs(&["low", "shared"]));
    assert_eq!(read(&merged.join("d/shared")), "from 0");
    fs::write(merged.join("new"), "written").unwrap();
    fs::remove_file(merged.join("d/low")).unwrap();

    let st = Command::new("umount").arg(&merged).output().unwrap();
    assert!(st.status.success(), "umount: {}", out_text(&st));
    m.unmount();
    assert_no_daemons(l.root(), "after umount");
    assert_eq!(read(&upper.join("new")), "written");
    assert!(is_whiteout(&upper.join("d/low")));
}

/// Rootless containerd (the snapshotter runs in the user's namespace): the same
/// `mount.fuse3` command as the test user in `unshare -Urm`, and `mount -t
/// fuse.fuse-overlayfs` (mount(8) runs mount.fuse3, whose shell finds `fuse-overlayfs` on
/// its default PATH, here a bind mount of the copy's directory over /usr/local/sbin in the
/// private mount namespace). mount.fuse3 strips only `fuse.`/`fuseblk.` from a type, so
/// `mount -t fuse3.fuse-overlayfs` cannot work; containerd strips `fuse3.` itself and
/// passes `-t fuse-overlayfs`.
#[test]
fn containerd_mount_helper_rootless() {
    let uid = test_user();
    let l = Layers::new(2);
    let _reaper = Reaper(l.root().to_path_buf());
    let (upper, work, merged) = snapshot_layers(&l);
    let dir = fuse_overlayfs_dir(&l);
    let b = l.mkdir("snap2");
    let (upper2, work2, merged2) = (b.join("fs"), b.join("work"), b.join("merged"));
    for d in [&upper2, &work2, &merged2] {
        fs::create_dir_all(d).unwrap();
    }
    give_to_user(&l, uid);
    let args = containerd_args(&l, &upper, &work, &merged).join(" ");
    let out = as_user_in_namespace(&format!(
        r#"
        PATH={dir}:$PATH mount.fuse3 {args}
        trap 'umount {m} 2>/dev/null || umount -l {m}' EXIT
        grep ' {m} ' /proc/self/mounts | cut -d' ' -f1,3
        ls {m} | tr '\n' ' '; echo
        echo written > {m}/new
        rm {m}/d/low
        umount {m}
        trap - EXIT
        mount --bind {dir} /usr/local/sbin
        mount -t fuse.fuse-overlayfs overlay {m2} -o lowerdir={lowers},upperdir={u2},workdir={w2}
        trap 'umount {m2} 2>/dev/null || umount -l {m2}' EXIT
        grep ' {m2} ' /proc/self/mounts | cut -d' ' -f1,3
        ls {m2}/d | tr '\n' ' '; echo
        echo two > {m2}/new
        umount {m2}
        trap - EXIT
        "#,
        dir = dir.display(),
        m = merged.display(),
        m2 = merged2.display(),
        lowers = l.lowerdir_opt(),
        u2 = upper2.display(),
        w2 = work2.display(),
    ));
    assert_no_daemons(l.root(), "after the script");
    assert_eq!(
        out,
        "overlay fuse.unionmount\nbottom d top \noverlay fuse.unionmount\nlow shared \n"
    );
    assert_eq!(read(&upper.join("new")), "written\n");
    assert!(is_whiteout(&upper.join("d/low")));
    assert_eq!(owner(&upper.join("new")), (uid, uid));
    assert_eq!(read(&upper2.join("new")), "two\n");
}

// ---------------------------------------------------------------------------------------------
// The OCI layer format
// ---------------------------------------------------------------------------------------------

/// The OCI image spec allows a layer to hold both `.wh.NAME` and a new `NAME`: the whiteout
/// applies to the layers below only ("files that are present in the same layer as a whiteout
/// file can only be hidden by whiteout files in subsequent layers"), and SPEC §3 says a
/// whiteout hides the name in all layers below it. So a directory replaced this way shows
/// only the new layer's contents, not those of the directory it replaced.
#[test]
fn oci_whiteout_beside_its_replacement_in_one_layer() {
    let l = Layers::new(2);
    l.lower(0)
        .aufs_whiteout("d")
        .file("d/new", "new")
        .aufs_whiteout("f")
        .file("f", "new");
    l.lower(1).file("d/old", "old").file("f", "old");
    let m = l.mount("m");
    assert_eq!(m.ls(""), strs(&["d", "f"]));
    assert_eq!(m.read("f"), "new");
    assert_eq!(
        m.ls("d"),
        strs(&["new"]),
        "the replaced lower directory must not merge into the new one"
    );
}
