//! Rootless use and the fuse-overlayfs options of SPEC §2/§4: the upper format an
//! unprivileged mount writes, uid/gid mapping, squashing, `xattr_permissions`, `static_nlink`
//! and `noacl`.

mod common;

use std::fs;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// Runs what follows as the namespace's user 1000.
const AS_1000: &str = "setpriv --reuid=1000 --regid=1000 --clear-groups";

/// A mount as an unprivileged user writes kernel overlayfs's `userxattr` format: char 0/0
/// whiteouts (mknod 0/0 is allowed unprivileged) and `user.overlay.opaque=y`, never
/// `trusted.*`; kernel overlayfs with `userxattr` then shows the same tree.
#[test]
fn unprivileged_upper_is_in_userxattr_format() {
    let uid = test_user();
    let l = Layers::new(2);
    l.lower(0)
        .file("gone", "x")
        .dir("merged")
        .file("merged/a", "a")
        .dir("moveto")
        .file("moveto/k", "k");
    l.lower(1).file("merged/b", "b").file("keep", "keep");
    let base = user_dirs(&l, uid);
    let listing = as_user_in_namespace(&format!(
        r#"
        {bin} --lower {lowers} --upper {b}/upper --work {b}/work {b}/merged
        trap 'fusermount3 -u {b}/merged 2>/dev/null || umount -l {b}/merged' EXIT
        cd {b}/merged
        rm gone
        rm -r merged && mkdir merged && echo new > merged/n
        mkdir fresh && mv fresh moveto/fresh
        echo more >> keep
        find . -printf '%P %y %s\n' | sort
        before=$(stat -c %i keep)
        cd / && fusermount3 -u {b}/merged
        {bin} --lower {lowers} --upper {b}/upper --work {b}/work {b}/merged
        echo "keep $before $(stat -c %i {b}/merged/keep)"
        "#,
        bin = BIN,
        lowers = l.lowerdir_opt(),
        b = base.display()
    ));
    let (listing, numbers) = listing.trim_end().rsplit_once('\n').unwrap();
    let listing = format!("{listing}\n");
    let numbers: Vec<&str> = numbers.split(' ').collect();
    assert_eq!(
        numbers[1], numbers[2],
        "a copied-up file keeps its number across a remount"
    );
    let upper = base.join("upper");
    assert_eq!(
        get_xattr(&upper.join("keep"), "user.overlay.origin").map(|v| v[..2].to_vec()),
        Ok(vec![0, 0xfb]),
        "the copy records its origin as kernel overlayfs does"
    );
    let gone = fs::symlink_metadata(upper.join("gone")).unwrap();
    assert!(
        gone.file_type().is_char_device() && gone.rdev() == 0,
        "char 0/0 whiteout"
    );
    assert_eq!(
        get_xattr(&upper.join("merged"), "user.overlay.opaque"),
        Ok(b"y".to_vec())
    );
    assert_eq!(
        get_xattr(&upper.join("moveto/fresh"), "user.overlay.opaque"),
        Ok(b"y".to_vec()),
        "a directory moved into a merged one is opaque, as the kernel makes it"
    );
    for (path, kind, _, xattrs) in raw_tree(&upper).iter().map(|(p, (k, r, x))| (p, k, r, x)) {
        assert!(
            xattrs.iter().all(|x| !x.starts_with("trusted.")),
            "{path} ({kind}): {xattrs:?}"
        );
    }
    // Kernel overlayfs, in userxattr mode, over the same lowers and this upper.
    let kbase = l.mkdir("k");
    let kmerged = kbase.join("merged");
    let kwork = kbase.join("work");
    fs::create_dir_all(&kmerged).unwrap();
    fs::create_dir_all(&kwork).unwrap();
    let k = Mount::kernel(&l.lowerdir_opt(), &upper, &kwork, &kmerged, &["userxattr"]);
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . -printf '%P %y %s\\n' | sort",
            k.merged.display()
        ))
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        listing,
        "kernel (userxattr) vs unionmount"
    );
    assert!(listing.contains("merged/n f 4") && !listing.contains("merged/a"));
    assert!(!listing.lines().any(|l| l.starts_with("gone ")));
}

/// The root of a user namespace mounts for every user of that namespace, as kernel overlayfs
/// and fuse-overlayfs do: a rootless container's processes that run as another of its users
/// reach its files, with the kernel checking their permissions; `-o allow_root` or an
/// unprivileged mounter keeps the mount to its owner.
#[test]
fn namespace_root_mounts_for_every_user_of_the_namespace() {
    let user = test_user();
    let l = Layers::new(1);
    l.lower(0)
        .file("open", "o")
        .file("mine", "m")
        .file("closed", "c")
        .dir("home");
    // Owned by the namespace's root (0) and its user 1000, mode 0600 for two of the files.
    let base = namespace_dirs(&l);
    let lower = l.lower(0);
    lower
        .chmod("open", 0o644)
        .chmod("mine", 0o600)
        .chmod("closed", 0o600)
        .chmod("home", 0o755)
        .chown("mine", NS_BASE + 1000, NS_BASE + 1000)
        .chown("home", NS_BASE + 1000, NS_BASE + 1000);
    let stdout = run_on_mount(
        user,
        &l,
        &base,
        &format!(
            r#"
        {AS_1000} cat $b/merged/open $b/merged/mine
        echo
        {AS_1000} cat $b/merged/closed 2>&1 || true
        {AS_1000} sh -c "echo new > $b/merged/home/f"
        grep -w $b/merged /proc/self/mounts | grep -o allow_other
        umount $b/merged
        {bin} --lower {lowers} --upper $b/upper --work $b/work -o allow_root $b/merged
        {AS_1000} cat $b/merged/open 2>&1 || true
        "#,
            bin = BIN,
            lowers = l.lowerdir_opt(),
        ),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], "om", "user 1000 reads what it may: {stdout}");
    assert!(
        lines[1].contains("closed: Permission denied"),
        "and not what it may not: {stdout}"
    );
    assert_eq!(lines[2], "allow_other", "{stdout}");
    assert!(
        lines[3].contains("open: Permission denied"),
        "allow_root keeps the mount to its owner: {stdout}"
    );
    let f = fs::symlink_metadata(base.join("upper/home/f")).unwrap();
    assert_eq!(
        (f.uid(), f.gid()),
        (NS_BASE + 1000, NS_BASE + 1000),
        "user 1000's new file"
    );
    assert_eq!(
        fs::read_to_string(base.join("upper/home/f")).unwrap(),
        "new\n"
    );
}

/// A rootless mount streams a lower file read in order ahead of its reader (the kernel gives
/// an unprivileged FUSE mount 128 KiB of read-ahead): after 2 MiB read, the kernel's page
/// cache holds the next windows too, and the file reads back exactly.
#[test]
fn rootless_reads_in_order_are_streamed_ahead() {
    let user = test_user();
    let l = Layers::new(1);
    let data: Vec<u8> = (0..20u64 << 20).map(|i| (i * 7 + i / 4096) as u8).collect();
    l.lower(0).file_bytes("big", &data);
    let base = namespace_dirs(&l);
    let stdout = run_on_mount(
        user,
        &l,
        &base,
        &format!(
            r#"
        dd if=$b/merged/big of=/dev/null bs=128k count=16 status=none
        for i in $(seq 100); do
            pages=$(fincore -n -o PAGES $b/merged/big)
            [ "$pages" -ge 2048 ] && break
            sleep 0.05
        done
        echo "resident $pages"
        cmp $b/merged/big {lower}/big && echo same
        "#,
            lower = l.lowers[0].display(),
        ),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    let pages: u64 = lines[0]
        .strip_prefix("resident ")
        .and_then(|p| p.trim().parse().ok())
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        pages >= 2048,
        "8 MiB or more cached after a 2 MiB read (the reader's own read-ahead reaches 2.25 MiB): {pages} pages"
    );
    assert_eq!(lines[1], "same", "{stdout}");
}

/// Deliberate difference: an xattr the namespace may not set (a `security.*` one set by the
/// host's root) is left out of a rootless copy-up, which goes on; kernel overlayfs with
/// `userxattr` refuses the change (EPERM), so such a file could not be changed at all.
#[test]
fn rootless_copy_up_leaves_out_xattrs_the_namespace_may_not_set() {
    let user = test_user();
    let l = Layers::new(1);
    l.lower(0).file("labelled", "data").file("other", "o");
    let base = namespace_dirs(&l);
    set_xattr(
        &l.lower(0).path("labelled"),
        "security.unionmount-test",
        b"x",
    );
    let stdout = run_on_mount(
        user,
        &l,
        &base,
        &format!(
            r#"
        mkdir $b/kupper $b/kwork $b/kmerged
        mount -t overlay overlay -o userxattr,lowerdir={lower},upperdir=$b/kupper,workdir=$b/kwork $b/kmerged
        chmod 600 $b/kmerged/other
        chmod 600 $b/kmerged/labelled 2>/dev/null && echo "kernel: changed" || echo "kernel: refused"
        umount $b/kmerged
        chmod 600 $b/merged/labelled && echo "unionmount: changed"
        getfattr -n security.unionmount-test $b/upper/labelled >/dev/null 2>&1 && echo "copied" || echo "left out"
        stat -c %a $b/merged/labelled
        cat $b/merged/labelled
        "#,
            lower = l.lowers[0].display(),
        ),
    );
    assert_eq!(
        stdout, "kernel: refused\nunionmount: changed\nleft out\n600\ndata",
        "{stdout}"
    );
    assert_eq!(
        get_xattr(&l.lower(0).path("labelled"), "security.unionmount-test"),
        Ok(b"x".to_vec()),
        "the lower file keeps it"
    );
}

/// A file capability as setfattr takes it: VFS_CAP_REVISION_2 with the effective flag,
/// permitted CAP_NET_RAW.
const CAP_NET_RAW: &str = "0x0100000200200000000000000000000000000000";

/// `CAP_NET_RAW` as the bytes of the xattr.
fn cap_net_raw_bytes() -> Vec<u8> {
    (2..CAP_NET_RAW.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&CAP_NET_RAW[i..i + 2], 16).unwrap())
        .collect()
}

/// A rootless daemon puts back the set-ID bits and capability its upper's write path drops
/// when the kernel writes back pages stored through a shared mapping, which drop nothing on
/// ext4 or kernel overlayfs.
#[test]
fn rootless_write_backs_keep_set_id_bits_and_capabilities() {
    let user = test_user();
    let l = Layers::new(1);
    l.lower(0)
        .file("suid", "data")
        .file("sgid", "data")
        .file("cap", "data");
    let cap = CAP_NET_RAW;
    let base = namespace_dirs(&l);
    // After the layers' change of owner, which drops them.
    for (name, mode) in [("suid", 0o4777), ("sgid", 0o2777)] {
        let p = l.lower(0).path(name);
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let stdout = run_on_mount(
        user,
        &l,
        &base,
        &format!(
            r#"
        setfattr -n security.capability -v {cap} $b/merged/cap
        for f in suid sgid cap; do
            /usr/bin/python3 -c "
import mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDWR)
m = mmap.mmap(fd, 4)
m[0:1] = b'Q'
m.flush()
m.close()
os.close(fd)" $b/merged/$f
        done
        stat -c %a $b/merged/suid $b/merged/sgid
        getfattr -e hex --only-values -n security.capability $b/merged/cap | od -An -tx1 | tr -d ' \n'
        echo
        head -c 4 $b/merged/cap
        "#
        ),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[..2], ["4777", "2777"], "{stdout}");
    assert_eq!(format!("0x{}", lines[2]), cap, "{stdout}");
    assert_eq!(lines[3], "Qata", "{stdout}");
}

/// With `uidmapping`/`gidmapping`, the users and groups an ACL names are translated as
/// owners are: shown as host ids (so the kernel's permission checks match the right users),
/// stored as container ids, and a host id without a mapping is refused (EINVAL).
#[test]
fn acl_ids_follow_the_mapping() {
    let l = Layers::new(1);
    l.lower(0).file("secret", "s").chmod("secret", 0o600);
    let lower = l.lower(0).path("secret");
    let set = Command::new("setfacl")
        .args(["-m", "u:5:r,g:7:r"])
        .arg(&lower)
        .status()
        .unwrap();
    assert!(set.success(), "setfacl on the lower file");
    let map = "uidmapping=0:1000:1:1:110000:65536,gidmapping=0:1000:1:1:110000:65536";
    let m = l.mount_with("u", &["-o", map]);
    let entries = |p: &Path| {
        let out = Command::new("getfacl")
            .args(["-n", "-c"])
            .arg(p)
            .output()
            .unwrap();
        assert!(out.status.success(), "getfacl {}", p.display());
        String::from_utf8(out.stdout).unwrap()
    };
    let named = |acl: &str| -> Vec<String> {
        acl.lines()
            .filter(|l| {
                l.starts_with("user:") && !l.starts_with("user::")
                    || l.starts_with("group:") && !l.starts_with("group::")
            })
            .map(String::from)
            .collect()
    };
    assert_eq!(
        named(&entries(&m.path("secret"))),
        ["user:110004:r--", "group:110006:r--"]
    );
    let read_as = |uid: &str| {
        Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                "--regid=110000",
                "--clear-groups",
                "cat",
            ])
            .arg(m.path("secret"))
            .output()
            .unwrap()
            .status
            .success()
    };
    assert!(
        read_as("110004"),
        "the user the ACL names (container 5) reads"
    );
    assert!(!read_as("5"), "host uid 5 is not the user the ACL names");
    let set = Command::new("setfacl")
        .args(["-m", "u:110009:rw"])
        .arg(m.path("secret"))
        .status()
        .unwrap();
    assert!(set.success(), "setfacl through the mount");
    assert_eq!(
        named(&entries(&m.upper_path("secret"))),
        ["user:5:r--", "user:10:rw-", "group:7:r--"],
        "container ids on disk"
    );
    let unmapped = Command::new("setfacl")
        .args(["-m", "u:5:r"])
        .arg(m.path("secret"))
        .output()
        .unwrap();
    assert!(
        !unmapped.status.success(),
        "an ACL naming an unmapped host id"
    );
    let err = String::from_utf8_lossy(&unmapped.stderr);
    assert!(err.contains("Invalid argument"), "{err}");
}

/// `uidmapping`/`gidmapping` as fuse-overlayfs (man page example): files carry container
/// ids on disk and the mount shows host ids; chown through the mount stores container ids.
#[test]
fn uid_and_gid_mapping() {
    let l = Layers::new(1);
    l.lower(0)
        .file("root", "r")
        .file("one", "1")
        .file("five", "5")
        .file("stray", "s")
        .dir("pub");
    l.lower(0).chmod("pub", 0o777);
    l.lower(0)
        .chown("root", 0, 0)
        .chown("one", 1, 1)
        .chown("five", 5, 7)
        .chown("stray", 70000, 70000);
    let m = l.mount_with(
        "u",
        &[
            "-o",
            "uidmapping=0:1000:1:1:110000:65536,gidmapping=0:1000:1:1:110000:65536",
        ],
    );
    let owner = |p: &str| {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        (md.uid(), md.gid())
    };
    assert_eq!(owner("root"), (1000, 1000));
    assert_eq!(owner("one"), (110000, 110000));
    assert_eq!(owner("five"), (110004, 110006));
    assert_eq!(
        owner("stray"),
        (65534, 65534),
        "unmapped ids show as the overflow id"
    );
    // chown to host ids stores the container ids.
    std::os::unix::fs::lchown(m.path("root"), Some(110009), Some(1000)).unwrap();
    let up = fs::symlink_metadata(m.upper_path("root")).unwrap();
    assert_eq!((up.uid(), up.gid()), (10, 0));
    assert_eq!(owner("root"), (110009, 1000));
    // A host id outside every range cannot be stored.
    assert_eq!(
        errno(std::os::unix::fs::lchown(m.path("one"), Some(5), None)),
        libc::EINVAL
    );
    // A caller whose id has no mapping (host root here) creates objects owned by the
    // overflow id on disk, as fuse-overlayfs does (before: EOVERFLOW).
    fs::create_dir(m.path("byroot")).unwrap();
    fs::write(m.path("byroot/f"), "x").unwrap();
    for p in ["byroot", "byroot/f"] {
        let up = fs::symlink_metadata(m.upper_path(p)).unwrap();
        assert_eq!((up.uid(), up.gid()), (65534, 65534), "{p} on disk");
        assert_eq!(owner(p), (110000 + 65533, 110000 + 65533), "{p} shown");
    }
    // A file created by host uid 1000 belongs to container root on disk.
    let st = Command::new("setpriv")
        .args(["--reuid=1000", "--regid=1000", "--clear-groups", "touch"])
        .arg(m.path("pub/mine"))
        .status()
        .unwrap();
    assert!(st.success());
    let up = fs::symlink_metadata(m.upper_path("pub/mine")).unwrap();
    assert_eq!((up.uid(), up.gid()), (0, 0), "stored as container root");
    assert_eq!(owner("pub/mine"), (1000, 1000));
}

/// `squash_to_root`, `squash_to_uid`, `squash_to_gid`: every object shows the fixed owner.
#[test]
fn squashing_owners() {
    let l = Layers::new(1);
    l.lower(0)
        .file("a", "a")
        .dir("d")
        .chown("a", 1234, 4321)
        .chown("d", 99, 98);
    let m = l.mount_with("root", &["-o", "squash_to_root"]);
    for p in ["", "a", "d"] {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (0, 0), "{p}");
    }
    drop(m);
    let m = l.mount_with("ids", &["-o", "squash_to_uid=7,squash_to_gid=8"]);
    for p in ["a", "d"] {
        let md = fs::symlink_metadata(m.path(p)).unwrap();
        assert_eq!((md.uid(), md.gid()), (7, 8), "{p}");
    }
    // chown does not fail (what it can do, it does; the view stays squashed).
    std::os::unix::fs::lchown(m.path("a"), Some(555), Some(556)).unwrap();
    let md = fs::symlink_metadata(m.path("a")).unwrap();
    assert_eq!((md.uid(), md.gid()), (7, 8));
}

/// `xattr_permissions=2`: owner, mode and type come from `user.containers.override_stat`
/// (as containers-storage writes it into layers), changes are recorded there, and the
/// attribute itself is not visible through the mount.
#[test]
fn xattr_permissions_override_stat() {
    let l = Layers::new(1);
    l.lower(0).file("f", "data").dir("d").file("dev", "");
    l.lower(0)
        .xattr("f", "user.containers.override_stat", b"1000:2000:0751")
        .xattr("d", "user.containers.override_stat", b"5:6:0700:dir")
        .xattr("dev", "user.containers.override_stat", b"0:0:0660:char-1-3");
    let m = l.mount_with("u", &["-o", "xattr_permissions=2"]);
    let md = fs::symlink_metadata(m.path("f")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777),
        (1000, 2000, 0o751)
    );
    let md = fs::symlink_metadata(m.path("d")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (5, 6, 0o700));
    let md = fs::symlink_metadata(m.path("dev")).unwrap();
    assert!(
        md.file_type().is_char_device(),
        "a regular file carrying a device type"
    );
    assert_eq!((libc::major(md.rdev()), libc::minor(md.rdev())), (1, 3));
    assert!(
        !list_xattrs(&m.path("f"))
            .iter()
            .any(|x| x.contains("override_stat"))
    );
    assert!(get_xattr(&m.path("f"), "user.containers.override_stat").is_err());

    // chmod/chown through the mount are recorded in the override; the real file keeps the
    // daemon's owner.
    let recorded = |want: &[u8]| {
        assert_eq!(
            get_xattr(&m.upper_path("f"), "user.containers.override_stat"),
            Ok(want.to_vec())
        );
        let up = fs::symlink_metadata(m.upper_path("f")).unwrap();
        assert_eq!((up.uid(), up.gid()), (0, 0), "real owner unchanged");
    };
    fs::set_permissions(m.path("f"), fs::Permissions::from_mode(0o640)).unwrap();
    std::os::unix::fs::lchown(m.path("f"), Some(42), Some(43)).unwrap();
    let md = fs::symlink_metadata(m.path("f")).unwrap();
    assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (42, 43, 0o640));
    recorded(b"42:43:640");
    assert_eq!(fs::read_to_string(m.path("f")).unwrap(), "data");
    // The same through a descriptor open for writing (the daemon works on the open file).
    {
        use std::os::fd::AsRawFd;
        let w = fs::OpenOptions::new()
            .append(true)
            .open(m.path("f"))
            .unwrap();
        // SAFETY: plain syscalls on an open fd.
        let (chmod, chown) = unsafe {
            (
                libc::fchmod(w.as_raw_fd(), 0o604),
                libc::fchown(w.as_raw_fd(), 7, 8),
            )
        };
        assert_eq!((chmod, chown), (0, 0));
        let md = w.metadata().unwrap();
        assert_eq!((md.uid(), md.gid(), md.mode() & 0o7777), (7, 8, 0o604));
    }
    recorded(b"7:8:604");
    // A new name of it shows the same (the link's reply too: the kernel caches it).
    fs::hard_link(m.path("f"), m.path("f2")).unwrap();
    let md = fs::symlink_metadata(m.path("f2")).unwrap();
    assert_eq!(
        (md.uid(), md.gid(), md.mode() & 0o7777, md.nlink()),
        (7, 8, 0o604, 2)
    );

    // A device made through the mount is a regular file carrying its type.
    mknod(
        &m.path("newdev"),
        libc::S_IFBLK | 0o600,
        libc::makedev(7, 9),
    );
    let md = fs::symlink_metadata(m.path("newdev")).unwrap();
    assert!(md.file_type().is_block_device());
    assert_eq!((libc::major(md.rdev()), libc::minor(md.rdev())), (7, 9));
    let up = fs::symlink_metadata(m.upper_path("newdev")).unwrap();
    assert!(up.file_type().is_file(), "stored as a regular file");
    // readdir's d_type agrees with stat (find -type relies on it).
    let kinds: Vec<(String, bool, bool, bool)> = {
        let mut v: Vec<_> = fs::read_dir(&m.merged)
            .unwrap()
            .map(|e| {
                let e = e.unwrap();
                let t = e.file_type().unwrap();
                let name = e.file_name().to_string_lossy().into_owned();
                (name, t.is_char_device(), t.is_block_device(), t.is_file())
            })
            .collect();
        v.sort();
        v
    };
    assert_eq!(
        kinds,
        [
            ("d".to_string(), false, false, false),
            ("dev".to_string(), true, false, false),
            ("f".to_string(), false, false, true),
            ("f2".to_string(), false, false, true),
            ("newdev".to_string(), false, true, false),
        ]
    );
    assert_eq!(
        get_xattr(&m.upper_path("newdev"), "user.containers.override_stat"),
        Ok(b"0:0:600:block-7-9".to_vec())
    );
    // Without the option, the attribute is an ordinary one.
    drop(m);
    let plain = l.mount("plain");
    let md = fs::symlink_metadata(plain.path("f")).unwrap();
    assert_eq!((md.uid(), md.mode() & 0o7777), (0, 0o644));
    assert_eq!(
        get_xattr(&plain.path("f"), "user.containers.override_stat"),
        Ok(b"1000:2000:0751".to_vec())
    );
}

/// `xattr_permissions=2` keeps the view's `security.*` xattrs apart from the real ones, as
/// fuse-overlayfs does (1.14 and later): stored as `user.containers.override_security.*`,
/// while the layers' real `security.*` xattrs are not shown. So a user namespace sets a file
/// capability where the upper would refuse a real one, and a change of owner drops it (the
/// kernel removes it through the view) where the daemon could not remove a real one (it has
/// no CAP_SETFCAP over the file): before, that chgrp failed with EPERM.
#[test]
fn xattr_permissions_keeps_security_xattrs_apart() {
    let user = test_user();
    let l = Layers::new(1);
    let cap = CAP_NET_RAW;
    let cap_bytes = cap_net_raw_bytes();
    l.lower(0)
        .file("real", "r")
        .file("kept", "k")
        .file("set", "s")
        .xattr("real", "security.capability", &cap_bytes)
        .xattr(
            "kept",
            "user.containers.override_security.capability",
            &cap_bytes,
        );
    let base = namespace_dirs(&l);
    let stdout = run_on_mount_with(
        user,
        &l,
        &base,
        "-o xattr_permissions=2",
        &format!(
            r#"
        cd $b/merged
        caps() {{
            getfattr --only-values -n security.capability $1 2>/dev/null | od -An -tx1 \
                | tr -d ' \n' | grep . || echo none
        }}
        echo "real $(caps real) $(getfattr -d -m - real 2>/dev/null | grep -c capability || true)"
        echo "kept $(caps kept) $(getfattr -d -m - kept 2>/dev/null | grep -c security.capability)"
        setfattr -n security.capability -v {cap} set
        echo "set $(caps set)"
        chgrp 1 set kept
        echo "chgrp $(caps set) $(caps kept) $(stat -c %g set)"
        setfattr -n security.capability -v {cap} real
        echo "real-set $(caps real)"
        ! setfattr -n user.containers.override_security.capability -v 0x00 real 2>/dev/null
        "#
        ),
    );
    let hex = &cap[2..];
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "real none 0",
            &format!("kept {hex} 1"),
            &format!("set {hex}"),
            "chgrp none none 1",
            &format!("real-set {hex}"),
        ],
        "{stdout}"
    );
    // The upper holds the view's capability in the user xattr; none was set for real.
    let upper = base.join("upper");
    assert!(
        get_xattr(
            &upper.join("real"),
            "user.containers.override_security.capability"
        )
        .is_ok()
    );
    assert!(get_xattr(&upper.join("set"), "security.capability").is_err());

    // A daemon without privileges (fusermount3 mounts): a capability set through the view
    // from a user namespace, then a change of group there, which drops it.
    test_user();
    let l = Layers::new(1);
    l.lower(0).file("f", "f");
    let base = user_dirs(&l, uid_of(TEST_USER).unwrap());
    let stdout = on_unprivileged_mount(
        &l,
        &base,
        "-o xattr_permissions=2",
        &format!(
            r#"
        unshare -r setfattr -n security.capability -v {cap} f
        unshare -r getfattr --only-values -n security.capability f | od -An -tx1 | tr -d ' \n'
        echo
        unshare -r chgrp 0 f
        unshare -r getfattr -n security.capability f 2>/dev/null || echo dropped
        "#
        ),
    );
    assert_eq!(stdout, format!("{hex}\ndropped\n"));
}

/// `xattr_permissions=2` hides the layers' real `security.*` xattrs, so none reaches the
/// upper: a copy-up leaves them out (a chmod alone copies up), and the upper's own drop of a
/// real capability at a write-back is not undone. Before, a lower program's hidden
/// capability stayed on the copy whatever was written into it, for whoever runs the upper
/// directly, commits it as a layer or mounts it otherwise.
#[test]
fn xattr_permissions_copies_no_hidden_security_xattrs() {
    let cap = cap_net_raw_bytes();
    for extra in [&["--passthrough", "off"][..], &[]] {
        let l = Layers::new(1);
        l.lower(0)
            .file("chmodded", "c")
            .file("written", "w")
            .xattr("chmodded", "security.capability", &cap)
            .xattr("written", "security.capability", &cap);
        let mut args = extra.to_vec();
        args.extend(["-o", "xattr_permissions=2"]);
        let m = l.mount_with("u", &args);
        fs::set_permissions(m.path("chmodded"), fs::Permissions::from_mode(0o755)).unwrap();
        // In place, as a program is rewritten, then through the page cache's write-back.
        let mut f = fs::OpenOptions::new()
            .write(true)
            .open(m.path("written"))
            .unwrap();
        std::io::Write::write_all(&mut f, b"W").unwrap();
        f.sync_all().unwrap();
        drop(f);
        let upper = m.upper_path("");
        drop(m);
        for name in ["chmodded", "written"] {
            assert!(
                get_xattr(&upper.join(name), "security.capability").is_err(),
                "{extra:?}: {name} keeps a hidden capability in the upper"
            );
        }
    }
}

/// `xattr_permissions=2`: setting an access ACL sets the mode shown, as on ext4 (`cp -a` and
/// `cp -p` set a copy's mode by setting an ACL with the bits alone), and an ACL read back
/// shows the mode; ext4 in a plain directory beside the mount is the oracle.
/// `xattr_permissions=2` over untrusted layers: only a regular file shows the type its
/// override records (a device, FIFO or socket stored as a file). A directory recorded as a
/// socket used to show as one, and a rename then copied up the "socket" alone: its contents
/// were gone from the view.
#[test]
fn xattr_permissions_types_change_only_regular_files() {
    let l = Layers::new(1);
    l.lower(0)
        .file("sockdir/in", "kept")
        .file("dirfile", "plain")
        .xattr(
            "sockdir",
            "user.containers.override_stat",
            b"0:0:0755:socket",
        )
        .xattr("dirfile", "user.containers.override_stat", b"0:0:0644:dir");
    let m = l.mount_with("u", &["-o", "xattr_permissions=2"]);
    let md = fs::symlink_metadata(m.path("sockdir")).unwrap();
    assert!(md.is_dir(), "a directory recorded as a socket: {md:?}");
    assert!(fs::symlink_metadata(m.path("dirfile")).unwrap().is_file());
    let types: Vec<_> = fs::read_dir(m.path(""))
        .unwrap()
        .map(|e| e.unwrap())
        .filter(|e| e.file_name() == "sockdir" || e.file_name() == "dirfile")
        .map(|e| (e.file_name(), e.file_type().unwrap().is_dir()))
        .collect();
    assert_eq!(types.len(), 2);
    for (name, is_dir) in types {
        assert_eq!(is_dir, name == "sockdir", "listing's type of {name:?}");
    }
    // A lower directory cannot be renamed (EXDEV), and its contents stay.
    assert_eq!(
        errno(fs::rename(m.path("sockdir"), m.path("sockdir2"))),
        libc::EXDEV
    );
    assert_eq!(m.read("sockdir/in"), "kept");
}

#[test]
fn xattr_permissions_acls_set_the_mode() {
    let l = Layers::new(1);
    l.lower(0)
        .file("src", "data")
        .chmod("src", 0o644)
        .file("suid", "x")
        .xattr("suid", "user.containers.override_stat", b"0:0:04751")
        .dir("dir")
        .xattr("dir", "user.containers.override_stat", b"0:0:01777")
        .file("m/old", "o");
    let m = l.mount_with("u", &["-o", "xattr_permissions=2"]);
    let plain = l.mkdir("plain");
    fs::create_dir(plain.join("m")).unwrap();
    fs::write(plain.join("m/old"), "o").unwrap();
    for (name, mode) in [("src", 0o644), ("suid", 0o4751), ("dir", 0o1777)] {
        let p = plain.join(name);
        if name == "dir" {
            fs::create_dir(&p).unwrap();
        } else {
            fs::write(&p, if name == "src" { "data" } else { "x" }).unwrap();
        }
        fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    }
    let state = |dir: &Path| -> String {
        let out = Command::new("sh")
            .arg("-c")
            .arg("for f in $(find . -mindepth 1 | sort); do stat -c '%n %a %u:%g' $f; getfacl -n -p -c $f; done")
            .current_dir(dir)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let steps = [
        "cp -a src copy",
        "cp -p src copy2 && chmod 600 src && cp -a src copy3",
        "setfacl -m u:1000:rwx,m::r-x copy",
        "chmod 604 copy",
        "setfacl -b copy",
        "setfacl -m u::r,g::r,o::r suid",
        "setfacl -m u:7:rwx dir",
        "chmod 1750 dir",
        "setfacl -k dir && setfacl -m g:9:r dir && setfacl -x g:9 dir",
        // New objects under a default ACL, and an ACL set through a descriptor.
        "mkdir dd && setfacl -d -m u::rwx,g::r-x,o::---,u:7:rwx dd && touch dd/new && mkdir dd/sub",
        "cp -a dd/new dd/copy && cp -a dd/sub dd/subcopy",
        // A set-group-ID directory (its bit and group are in the override) passes them on.
        "mkdir sg && chgrp 1000 sg && chmod 2775 sg && mkdir sg/sub && touch sg/f",
        // Objects made where a whiteout stands (built in the work directory) under a default
        // ACL of a merged directory.
        "setfacl -d -m u::rwx,g::r-x,o::---,u:7:rw m && rm m/old && mkdir m/old && touch m/old/f",
        "rm -r m/old && touch m/old",
    ];
    for step in steps {
        for dir in [&plain, &m.merged] {
            let st = Command::new("sh")
                .arg("-c")
                .arg(step)
                .current_dir(dir)
                .status()
                .unwrap();
            assert!(st.success(), "{step} in {}", dir.display());
        }
        assert_eq!(state(&m.merged), state(&plain), "after `{step}`");
    }
    // The mode shown is in the override; an ACL the bits say all of is not stored.
    assert_eq!(
        get_xattr(&m.upper_path("copy3"), "user.containers.override_stat"),
        Ok(b"0:0:600".to_vec())
    );
    assert!(get_xattr(&m.upper_path("copy3"), "system.posix_acl_access").is_err());
    assert_eq!(
        get_xattr(&m.upper_path("suid"), "user.containers.override_stat"),
        Ok(b"0:0:4444".to_vec())
    );
}

/// `xattr_permissions=2` with a daemon without privileges of any kind (no user namespace:
/// fusermount3 mounts, no CAP_DAC_OVERRIDE): objects made or left read-only (by the mode
/// asked for, the umask or a default ACL) stay writable for the daemon for real, which must
/// still write their override; the view matches ext4 in a plain directory beside the mount.
#[test]
fn xattr_permissions_without_privileges() {
    let uid = test_user();
    let l = Layers::new(1);
    // The same starting tree in the lower layer and in the plain directory.
    let setup = "mkdir rodir m && echo f > rodir/f && echo r > rofile && echo o > m/old \
                 && chmod 444 rodir/f && chmod 555 rodir && chmod 400 rofile \
                 && setfacl -d -m u::r-x,g::r-x,o::--- m";
    let steps = [
        "umask 0222 && : > ro && mkdir -m 555 rd && ! (echo x >> ro) 2>/dev/null",
        "umask 0277 && : > only-w && mkdir nothing",
        "chmod 644 rofile && echo x >> rofile",
        "chmod 755 rodir && chmod 644 rodir/f && echo y >> rodir/f && : > rodir/new \
         && chmod 555 rodir",
        "mkdir ld && setfacl -d -m u::r-x,g::r-x,o::--- ld && mkdir ld/x && : > ld/y",
        // Built in the work directory: a whiteout stands at the name.
        "rm m/old && mkdir m/old && rmdir m/old && : > m/old",
        "setfacl -m u::---,g::---,o::--- ro && chmod 640 ro && echo z > ro",
        "chmod 000 rd && chmod 755 rd && touch rd/z && chmod 500 rd",
    ];
    let base = unprivileged_steps_against_ext4(&l, setup, "-o xattr_permissions=2", &steps);
    // The real objects stay the daemon's to write; the modes shown are in the overrides.
    let upper = base.join("upper");
    for (name, owner) in [
        ("ro", 0o600),
        ("rd", 0o700),
        ("nothing", 0o700),
        ("ld/x", 0o700),
    ] {
        let mode = fs::symlink_metadata(upper.join(name)).unwrap().mode();
        assert_eq!(mode & owner, owner, "{name}: {mode:o}");
    }
    assert_eq!(
        get_xattr(&upper.join("rd"), "user.containers.override_stat"),
        Ok(format!("{uid}:{uid}:500").into_bytes())
    );
}

/// A daemon without privileges in directories whose owner may not write (a Go module cache, a
/// tree unpacked read-only), with and without `xattr_permissions`: what the caller may do
/// there on ext4 works (copy-up into them, a move over a deleted lower directory, which makes
/// the moved directory opaque, rmdir of one holding whiteouts, a move over one), as ext4 in a
/// plain directory shows it.
#[test]
fn unprivileged_daemon_in_read_only_directories() {
    let setup = "mkdir ro x v w y && echo f > ro/f && chmod 666 ro/f && mkdir ro/sub \
                 && echo g > ro/sub/g && setfattr -n user.kept -v yes ro/sub/g \
                 && chmod 444 ro/sub/g && chmod 555 ro/sub ro \
                 && for d in x v w y; do echo s > $d/old; done";
    let steps = [
        "echo more >> ro/f",
        "chmod 640 ro/sub/g && echo g >> ro/sub/g",
        "mkdir -m 555 a && rm -r x && mv a x",
        "mkdir -m 111 a2 && mv a2 x2",
        "rm -r w && mkdir -m 111 w",
        "rm y/old && chmod 555 y && rmdir y",
        "rm v/old && chmod 555 v && mkdir -m 555 z && mv -T z v",
        "chmod 755 ro && mkdir -m 500 ro/new && chmod 555 ro",
    ];
    for opts in ["", "-o xattr_permissions=2"] {
        test_user();
        let l = Layers::new(1);
        unprivileged_steps_against_ext4(&l, setup, opts, &steps);
    }
}

/// Runs `setup` in the lower layer of `l` and in a plain directory beside it, mounts the layers
/// as the test user without a user namespace (fusermount3 mounts) with `opts`, then runs each
/// of `steps` as that user in the plain directory and in the mount, comparing after each what
/// the two show (type, mode, owner, size, ACL, user xattrs). Returns the mount's base
/// directory (`upper`, `work`, `merged`).
fn unprivileged_steps_against_ext4(
    l: &Layers,
    setup: &str,
    opts: &str,
    steps: &[&str],
) -> std::path::PathBuf {
    let plain = l.mkdir("plain");
    for dir in [l.lower(0).path(""), plain.clone()] {
        let st = Command::new("sh")
            .arg("-euc")
            .arg(setup)
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(st.success(), "setup in {}", dir.display());
    }
    let base = user_dirs(l, uid_of(TEST_USER).unwrap());
    let state = "for f in $(find . -mindepth 1 | sort); do \
                 stat -c '%n %F %a %u:%g %s' $f; getfacl -n -p -c $f; \
                 getfattr -h -d -m '^user\\.' $f 2>/dev/null; done";
    let mut script = String::new();
    for (i, step) in steps.iter().enumerate() {
        for d in ["plain", "merged"] {
            script.push_str(&format!(
                "cd $b/{d}; ( {step} ) || {{ echo 'step {i} failed in {d}' >&2; exit 1; }}\n"
            ));
        }
        for d in ["plain", "merged"] {
            script.push_str(&format!("echo '@@ {i} {d}'; cd $b/{d}; {state}\n"));
        }
    }
    let root = l.root().display();
    let body = format!("b={root}; ln -s $PWD $b/merged\n{script}");
    let stdout = on_unprivileged_mount(l, &base, opts, &body);
    let mut shown = std::collections::BTreeMap::new();
    for part in stdout.split("@@ ").skip(1) {
        let (head, body) = part.split_once('\n').unwrap();
        let (i, d) = head.split_once(' ').unwrap();
        shown.insert(
            (i.parse::<usize>().unwrap(), d.to_string()),
            body.to_string(),
        );
    }
    assert_eq!(shown.len(), 2 * steps.len(), "{stdout}");
    for (i, step) in steps.iter().enumerate() {
        let view = &shown[&(i, "merged".to_string())];
        assert_eq!(
            view,
            &shown[&(i, "plain".to_string())],
            "{opts}: after `{step}`"
        );
    }
    base
}

/// `static_nlink`: directories report a link count of 1 instead of counting subdirectories.
#[test]
fn static_nlink() {
    let l = Layers::new(2);
    l.lower(0).dir("m/a").dir("m/b");
    l.lower(1).dir("m/c");
    let m = l.mount("counted");
    assert_eq!(
        fs::metadata(m.path("m")).unwrap().nlink(),
        5,
        "2 + three subdirectories"
    );
    drop(m);
    let m = l.mount_with("static", &["-o", "static_nlink"]);
    assert_eq!(fs::metadata(m.path("m")).unwrap().nlink(), 1);
}

/// POSIX ACLs are enforced by default and not with `noacl`.
#[test]
fn acls_and_noacl() {
    let l = Layers::new(1);
    l.lower(0).file("secret", "s").chmod("secret", 0o600);
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    for (name, extra, readable) in [
        ("acl", &[][..], true),
        ("noacl", &["-o", "noacl"][..], false),
    ] {
        let m = l.mount_with(name, extra);
        fs::set_permissions(
            m.merged.parent().unwrap(),
            fs::Permissions::from_mode(0o755),
        )
        .unwrap();
        let st = Command::new("setfacl")
            .args(["-m", "u:1234:r"])
            .arg(m.path("secret"))
            .status()
            .unwrap();
        assert!(st.success(), "setfacl");
        let got = Command::new("setpriv")
            .args(["--reuid=1234", "--regid=1234", "--clear-groups", "cat"])
            .arg(m.path("secret"))
            .output()
            .unwrap();
        assert_eq!(got.status.success(), readable, "{name}: {:?}", got);
    }
}

/// `u/upper`, `u/work` and `u/merged` beside the layers, the whole tree owned by `uid` (the
/// test user, as `as_user_in_namespace` runs); returns `u`.
fn user_dirs(l: &Layers, uid: u32) -> std::path::PathBuf {
    let base = l.mkdir("u");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    chown_tree(l.root(), uid);
    base
}

/// `u/upper`, `u/work` and `u/merged` beside the layers, all owned by the root of the
/// namespace `in_mapped_user_namespace` makes; returns `u`.
fn namespace_dirs(l: &Layers) -> std::path::PathBuf {
    let base = l.mkdir("u");
    for d in ["upper", "work", "merged"] {
        fs::create_dir_all(base.join(d)).unwrap();
    }
    chown_tree(l.root(), NS_BASE);
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    base
}

/// Runs `body` in bash as the root of a user namespace made by `user`, with the layers
/// mounted on `$b/merged` (`$b` is `base`, see `namespace_dirs`) and unmounted on exit;
/// returns its output, which must be a success.
fn run_on_mount(user: u32, l: &Layers, base: &std::path::Path, body: &str) -> String {
    run_on_mount_with(user, l, base, "", body)
}

/// `run_on_mount` with the mount options `opts`.
fn run_on_mount_with(
    user: u32,
    l: &Layers,
    base: &std::path::Path,
    opts: &str,
    body: &str,
) -> String {
    let mut sh = Command::new("bash");
    sh.arg("-euc").arg(format!(
        r#"
        b={b}
        {bin} {opts} --lower {lowers} --upper $b/upper --work $b/work $b/merged
        trap 'cd /; umount $b/merged' EXIT
        {body}
        "#,
        b = base.display(),
        bin = BIN,
        lowers = l.lowerdir_opt(),
    ));
    succeeded(in_mapped_user_namespace(user, sh))
}

/// Runs `body` with bash as the test user, with no user namespace, in the layers of `l`
/// mounted with `opts` on `base/merged` (see `user_dirs`; fusermount3 mounts, the daemon has
/// no privileges) and unmounted afterwards (lazily if it is still busy, so that a failing
/// test leaves no mount behind); returns its output, which must be a success.
fn on_unprivileged_mount(l: &Layers, base: &Path, opts: &str, body: &str) -> String {
    as_user_without_namespace(&format!(
        r#"
        {bin} {opts} --lower {lowers} --upper {b}/upper --work {b}/work {b}/merged
        trap 'cd /; fusermount3 -u {b}/merged || fusermount3 -uz {b}/merged' EXIT
        cd {b}/merged
        {body}
        "#,
        bin = BIN,
        lowers = l.lowerdir_opt(),
        b = base.display()
    ))
}

/// The permission bits of `paths` in the upper of a mount made in `base` (see `user_dirs`).
fn upper_modes(base: &Path, paths: &[&str]) -> Vec<u32> {
    let upper = base.join("upper");
    let mode = |p: &&str| fs::metadata(upper.join(p)).unwrap().permissions().mode() & 0o7777;
    paths.iter().map(mode).collect()
}

/// Runs `script` with bash as the test user, with no user namespace (so a mount it makes
/// goes through fusermount3 and its daemon has no privileges); returns its output, which must
/// be a success.
fn as_user_without_namespace(script: &str) -> String {
    let out = Command::new("setpriv")
        .args(["--reuid", TEST_USER, "--regid", TEST_USER, "--clear-groups"])
        .args(["--", "bash", "-euc", script])
        .output()
        .unwrap();
    succeeded(out)
}

/// The stdout of a script that must have succeeded.
fn succeeded(out: std::process::Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}\nstdout: {stdout}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// lsattr/chattr through an unprivileged mount: flags read, ordinary flags set on the upper
/// copy and carried by a copy-up; the protection flags refused (EPERM), as for kernel
/// overlayfs in a user namespace (they need CAP_LINUX_IMMUTABLE in the initial one).
#[test]
fn inode_flags_through_an_unprivileged_mount() {
    test_user();
    let l = Layers::new(1);
    l.lower(0).file("noatime", "a").file("plain", "p");
    add_flags(&l.lower(0).path("noatime"), FS_NOATIME_FL).unwrap();
    let base = user_dirs(&l, uid_of(TEST_USER).unwrap());
    let out = as_user_in_namespace(&format!(
        r#"
        {bin} --lower {lowers} --upper {b}/upper --work {b}/work {b}/merged
        trap 'fusermount3 -u {b}/merged 2>/dev/null || umount -l {b}/merged' EXIT
        /usr/bin/python3 - {b}/merged <<'PY'
import errno, fcntl, os, struct, sys
m = sys.argv[1]
def flags(p):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        return struct.unpack("i", fcntl.ioctl(fd, 0x80086601, b"\0" * 4))[0]
    finally:
        os.close(fd)
def setflags(p, f):
    fd = os.open(p, os.O_RDONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(fd, 0x40086602, struct.pack("i", f))
        return "ok"
    except OSError as e:
        return errno.errorcode[e.errno]
    finally:
        os.close(fd)
print("noatime", flags(m + "/noatime") & 0xff)
print("nodump", setflags(m + "/plain", flags(m + "/plain") | 0x40), flags(m + "/plain") & 0xff)
print("immutable", setflags(m + "/plain", flags(m + "/plain") | 0x10), flags(m + "/plain") & 0xff)
os.chmod(m + "/noatime", 0o600)
print("copied", flags(m + "/noatime") & 0xff)
PY
        "#,
        bin = BIN,
        lowers = l.lowerdir_opt(),
        b = base.display()
    ));
    assert_eq!(
        out,
        format!(
            "noatime {FS_NOATIME_FL}\nnodump ok {FS_NODUMP_FL}\nimmutable EPERM {FS_NODUMP_FL}\ncopied {FS_NOATIME_FL}\n"
        )
    );
    let upper = base.join("upper");
    for (name, want) in [("plain", FS_NODUMP_FL), ("noatime", FS_NOATIME_FL)] {
        let flags = get_flags(&upper.join(name)).unwrap();
        assert_eq!(flags & 0xff, want, "{name} in the upper");
    }
}

/// A daemon without privileges of any kind (no user namespace: fusermount3 mounts) copies up
/// with the modes it chooses, whatever umask a caller's create left on its one worker: a
/// umask that masks the owner's bits made the copy of a directory unopenable to it.
#[test]
fn copy_up_ignores_the_umask_a_create_left() {
    let uid = test_user();
    let l = Layers::new(1);
    l.lower(0).file("d/f", "x");
    let base = user_dirs(&l, uid);
    let out = on_unprivileged_mount(
        &l,
        &base,
        "--threads 1",
        "umask 0577
        : > new
        chmod 600 d/f && echo chmod ok
        mkdir d/sub && echo mkdir ok
        stat -c '%n %a' new d d/f d/sub",
    );
    assert_eq!(
        out,
        "chmod ok\nmkdir ok\nnew 200\nd 755\nd/f 600\nd/sub 200\n"
    );
    assert_eq!(
        upper_modes(&base, &["d", "d/f", "d/sub"]),
        [0o755, 0o600, 0o200]
    );
}

/// A daemon without privileges of any kind copies up into directories whose owner may not
/// write (a Go module cache, a tree unpacked read-only): the caller may change a writable
/// file there, or chmod its own, as on ext4, and the copies keep the lower modes and xattrs.
/// The lower layers stay read with the daemon's own permissions.
#[test]
fn unprivileged_copy_up_into_read_only_directories() {
    let uid = test_user();
    let l = Layers::new(1);
    l.lower(0)
        .file("ro/sub/f", "f")
        .chmod("ro/sub/f", 0o666)
        .file("ro/g", "g")
        .xattr("ro/g", "user.kept", b"yes")
        .chmod("ro/g", 0o444)
        .chmod("ro/sub", 0o555)
        .chmod("ro", 0o555)
        .file("closed/x", "x")
        .chmod("closed", 0);
    let base = user_dirs(&l, uid);
    let out = on_unprivileged_mount(
        &l,
        &base,
        "",
        "echo more >> ro/sub/f
        chmod 640 ro/g
        ! : > ro/new 2>/dev/null
        getfattr --only-values -n user.kept ro/g; echo
        stat -c '%n %a' ro ro/sub ro/sub/f ro/g
        # A lower directory the daemon may not read: its chmod lands, its listing stays
        # refused (README).
        chmod 755 closed && stat -c '%n %a' closed
        ! ls closed 2>/dev/null",
    );
    assert_eq!(
        out,
        "yes\nro 555\nro/sub 555\nro/sub/f 666\nro/g 640\nclosed 755\n"
    );
    assert_eq!(
        upper_modes(&base, &["ro", "ro/sub", "ro/sub/f", "ro/g"]),
        [0o555, 0o555, 0o666, 0o640]
    );
    let upper = base.join("upper");
    assert_eq!(
        fs::read_to_string(upper.join("ro/sub/f")).unwrap(),
        "fmore\n"
    );
    assert_eq!(
        get_xattr(&upper.join("ro/g"), "user.kept"),
        Ok(b"yes".to_vec())
    );
}

/// While a daemon without privileges grants itself its owner's bits on a read-only directory
/// for a moment (a copy-up into it), the view keeps showing the directory's own mode: a
/// program that reads the mode and sets it again (`chmod g+w`) must not make the granted bits
/// permanent. Writers copy up files into a 0555 directory while its group write bit is
/// turned on and off; it must end at 0555, and neither `stat` nor the owner entry of its
/// access ACL may show the owner's write bit meanwhile.
#[test]
fn unprivileged_grants_stay_out_of_sight() {
    let uid = test_user();
    let l = Layers::new(1);
    for i in 0..400 {
        l.lower(0)
            .file(&format!("ro/f{i}"), "")
            .chmod(&format!("ro/f{i}"), 0o666);
    }
    l.lower(0).chmod("ro", 0o555);
    let base = user_dirs(&l, uid);
    // A real access ACL: its owner entry is the mode's owner bits (`chmod` changes both).
    let acl = Command::new("setfacl")
        .args(["-m", "u:65534:rx"])
        .arg(l.lower(0).path("ro"))
        .status()
        .unwrap();
    assert!(acl.success(), "setfacl");
    let out = on_unprivileged_mount(
        &l,
        &base,
        "",
        "for w in 0 1 2 3; do
            ( for i in $(seq $((w * 100)) $((w * 100 + 99))); do echo x >> ro/f$i; done ) &
        done
        ( for k in $(seq 200); do chmod g+w ro; chmod g-w ro; done ) &
        ( for k in $(seq 400); do getfacl -c ro | grep '^user::'; done | sort -u > ../owner ) &
        ( for k in $(seq 400); do stat -c %a ro; done | sort -u > ../modes ) &
        wait
        stat -c %a ro; echo --; cat ../owner; echo --; cat ../modes",
    );
    let parts: Vec<&str> = out.split("--\n").collect();
    assert_eq!(parts.len(), 3, "{out}");
    assert_eq!(parts[0], "555\n", "the mode at the end");
    assert_eq!(
        parts[1], "user::r-x\n",
        "every owner entry the ACL showed meanwhile"
    );
    for mode in parts[2].lines() {
        assert!(
            ["555", "575"].contains(&mode),
            "a mode shown meanwhile: {mode}"
        );
    }
    assert_eq!(upper_modes(&base, &["ro"]), [0o555]);
    assert_eq!(fs::read_dir(base.join("upper/ro")).unwrap().count(), 400);
}

/// Lower objects whose ACLs name an id without a mapping in the daemon's user namespace (the
/// kernel shows it as -1; kernel overlayfs shows `user:4294967295`): FUSE takes no ACL naming
/// -1, so reading the ACL, reading the file as another user, a chmod (copy-up), listing a
/// directory and creating in one with such a default ACL all failed with EINVAL. The entries
/// for such ids are left out (no process in the namespace can match them), the copy keeps the
/// others, and everything works as on kernel overlayfs.
#[test]
fn acls_naming_ids_outside_the_namespace() {
    let user = test_user();
    let l = Layers::new(1);
    l.lower(0).file("f", "secret").dir("d");
    let base = namespace_dirs(&l);
    l.lower(0).chmod("f", 0o640).chmod("d", 0o755);
    let lower = l.lower(0);
    // Namespace user 1000 is NS_BASE + 1000 on the host; host uid 7 has no mapping.
    for (args, p) in [
        (
            format!("-m u:{}:r,u:7:rw,g:7:r", NS_BASE + 1000),
            lower.path("f"),
        ),
        (
            format!("-m u:7:rx,d:u:7:rwx,d:u:{}:rx", NS_BASE + 1000),
            lower.path("d"),
        ),
    ] {
        let st = Command::new("setfacl")
            .args(args.split(' '))
            .arg(&p)
            .status()
            .unwrap();
        assert!(st.success(), "setfacl {args} {}", p.display());
    }
    let stdout = run_on_mount(
        user,
        &l,
        &base,
        &format!(
            r#"
        m=$b/merged
        echo "acl: $(getfacl -cn $m/f | grep -v '::' | xargs)"
        echo "read as 1000: $({AS_1000} cat $m/f)"
        ls $m/d >/dev/null && echo listed
        touch $m/d/new && mkdir $m/d/sub && echo made
        echo "inherited: $(getfacl -cn $m/d/new | grep -v '::' | xargs)"
        chmod 600 $m/f && echo chmod
        echo "copy: $(getfacl -cn $b/upper/f | grep -v '::' | xargs)"
        "#
        ),
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines,
        [
            "acl: user:1000:r--",
            "read as 1000: secret",
            "listed",
            "made",
            "inherited: user:1000:r-x #effective:r--",
            "chmod",
            "copy: user:1000:r-- #effective:---",
        ],
        "{stdout}"
    );
}

/// A daemon without privileges marks `user.overlay.impure` the read-only directory it copies a
/// file up into, as kernel overlayfs marks a copy-up's parent, through a grant of its owner's
/// write bit (a `user.` xattr of a directory needs write access), and the mode stays. Before,
/// the mark was refused (EACCES), and kernel overlayfs on that upper listed the copy under
/// the upper file's number.
#[test]
fn unprivileged_copy_up_marks_a_read_only_parent_impure() {
    let uid = test_user();
    let l = Layers::new(1);
    l.lower(0).file("ro/f", "f").chmod("ro", 0o555);
    let base = user_dirs(&l, uid);
    on_unprivileged_mount(&l, &base, "", "chmod 600 ro/f");
    assert_eq!(
        get_xattr(&base.join("upper/ro"), "user.overlay.impure"),
        Ok(b"y".to_vec())
    );
    assert_eq!(upper_modes(&base, &["ro"]), [0o555]);
}
