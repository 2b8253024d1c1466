//! podman end to end (SPEC §1, §2, §4): unionmount as containers-storage's `mount_program`,
//! driven by the real podman, as root and rootless, against podman's own overlay driver on
//! kernel overlayfs as the oracle.
//!
//! Each storage imports the same busybox root filesystem, builds the same image of several
//! layers (deletions, a directory deleted and made again, a file replaced by a directory, a
//! lower directory moved, hard links), runs a container that changes it further, commits that
//! container and runs the result. What the containers see must match the kernel's, and the
//! image's own layers must come out of every run unchanged.
//!
//! The container options below suit a restricted host: the runtime is runc (crun refuses a
//! hybrid cgroup hierarchy), and the containers get resource limits no higher than the
//! caller's, which the runtime can set without CAP_SYS_RESOURCE.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;

const USER: &str = TEST_USER;

/// The static busybox the image is built from.
const BUSYBOX: &str = "/bin/busybox";

/// Every container option: no network, limits any caller may set.
const RUN_OPTS: &[&str] = &[
    "--network",
    "none",
    "--ulimit",
    "nofile=1024:1024",
    "--ulimit",
    "nproc=4096:4096",
];

/// Layers on top of the imported base: each RUN is one layer of the image.
const CONTAINERFILE: &str = r#"FROM localhost/base
RUN mkdir -p /data/keep /data/gone/sub /data/opq /data/mv && echo a > /data/keep/a && echo b > /data/gone/sub/b && echo c > /data/opq/c && echo old > /data/opq/old && echo f > /data/file && echo m > /data/mv/m && ln -s keep/a /data/link && ln /data/keep/a /data/hard && echo e > /etc/extra && chmod 4755 /data/file
RUN rm -r /data/gone && rm -r /data/opq && mkdir /data/opq && echo n > /data/opq/new && rm /data/file && mkdir /data/file && echo in > /data/file/in && chmod 700 /data/keep && mv /data/mv /data/moved && rm /etc/extra
RUN echo late > /data/opq/late && ln -s /data/opq/new /data/abs && mkdir -p /deep/a/b/c && echo d > /deep/a/b/c/d
"#;

/// Changes a container makes to the built image (copy-up of a file with two names, deletion
/// of one of them, a directory deleted and made again, renames of lower objects).
const CHANGES: &str = "set -e
echo more >> /data/keep/a
rm /data/hard
rm -r /data/opq
mkdir /data/opq
echo again > /data/opq/again
mv /data/link /data/link2
mv /data/moved /data/moved2
chmod 750 /data/file
mkfifo /data/fifo
su user -c 'echo own > /tmp/own && ln /tmp/own /tmp/own2 && chmod 600 /tmp/own'
echo root2:x:0:0::/:/bin/sh > /etc/passwd.new
mv /etc/passwd.new /etc/passwd
ln /deep/a/b/c/d /deep/hl
rm -r /deep/a/b
touch /deep/a/b
echo 012345678901234567890 > /data/t && truncate -s 7 /data/t
chown 1000:1000 /data/t && ln /data/t /data/t2
";

/// Prints the whole tree the container sees, sorted: type and mode, owner, and for what is not
/// a directory the link count, size and content hash or link target. Directories' link counts
/// and sizes are left out (kernel overlayfs gives a merged directory a link count of 1; what
/// a directory's size is depends on the layers' filesystem).
const LISTING: &str = r#"cd /
find / -xdev \( -path /proc -o -path /sys -o -path /dev -o -path /etc/hosts -o -path /etc/hostname -o -path /etc/resolv.conf -o -path /run/.containerenv \) -prune -o -print | sort | while read -r f; do
  if [ -d "$f" ] && [ ! -L "$f" ]; then
    s=$(stat -c '%A %u:%g' "$f")
  else
    s=$(stat -c '%A %u:%g %h %s' "$f")
  fi
  if [ -L "$f" ]; then s="$s -> $(readlink "$f")"; elif [ -f "$f" ]; then s="$s $(md5sum < "$f" | cut -c1-12)"; fi
  echo "$f $s"
done
"#;

/// One podman storage: its own storage root, run root and temp dir, run as root or as the
/// test user.
struct Podman {
    dir: PathBuf,
    rootless: bool,
    mount_program: Option<PathBuf>,
    /// More `--storage-opt` options.
    storage_opts: Vec<String>,
}

impl Podman {
    fn new(l: &Layers, name: &str, rootless: bool, mount_program: Option<PathBuf>) -> Podman {
        let dir = l.mkdir(name);
        for sub in ["home", "run", "tmp"] {
            fs::create_dir(dir.join(sub)).unwrap();
        }
        fs::set_permissions(dir.join("run"), fs::Permissions::from_mode(0o700)).unwrap();
        if rootless {
            chown_tree(&dir, test_user());
        }
        Podman {
            dir,
            rootless,
            mount_program,
            storage_opts: Vec::new(),
        }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = if self.rootless {
            let mut c = Command::new("setpriv");
            c.args(["--reuid", USER, "--regid", USER, "--init-groups", "--"]);
            c.arg("podman");
            c
        } else {
            Command::new("podman")
        };
        c.env("HOME", self.dir.join("home"))
            .env("XDG_RUNTIME_DIR", self.dir.join("run"))
            .env("TMPDIR", self.dir.join("tmp"))
            .arg("--root")
            .arg(self.dir.join("storage"))
            .arg("--runroot")
            .arg(self.dir.join("run/storage"))
            .arg("--tmpdir")
            .arg(self.dir.join("run/libpod"))
            .args(["--storage-driver", "overlay"])
            .args(["--cgroup-manager", "cgroupfs", "--events-backend", "none"])
            .args(["--runtime", "runc"]);
        if let Some(p) = &self.mount_program {
            c.arg("--storage-opt")
                .arg(format!("overlay.mount_program={}", p.display()));
        }
        for o in &self.storage_opts {
            c.arg("--storage-opt").arg(o);
        }
        c.args(args).stdin(Stdio::null());
        c
    }

    /// Runs podman with `args`; returns stdout, failing the test on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.command(args).output().expect("podman runs");
        assert!(
            out.status.success(),
            "{}: podman {args:?}\nstatus {}\nstdout: {}\nstderr: {}",
            self.label(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `podman run` of `script` in a new container of `image`.
    fn run(&self, extra: &[&str], image: &str, script: &str) -> String {
        let mut args = vec!["run"];
        args.extend_from_slice(RUN_OPTS);
        args.extend_from_slice(extra);
        args.extend_from_slice(&[image, "sh", "-c", script]);
        self.ok(&args)
    }

    fn label(&self) -> String {
        match (&self.mount_program, self.rootless) {
            (None, _) => "kernel overlayfs".into(),
            (Some(_), false) => "unionmount as root".into(),
            (Some(_), true) if self.storage_opts.is_empty() => "unionmount rootless".into(),
            (Some(_), true) => format!("unionmount rootless with {:?}", self.storage_opts),
        }
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        // Containers first (their mounts and daemons), then whatever podman left mounted
        // under the storage (it bind-mounts its overlay directory on itself), deepest first.
        let _ = self.command(&["rm", "--all", "--force"]).output();
        let root = self.dir.to_string_lossy().into_owned();
        let mounts = fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut under: Vec<&str> = mounts
            .lines()
            .filter_map(|l| l.split(' ').nth(1))
            .filter(|m| m.starts_with(&root))
            .collect();
        under.sort_by_key(|m| std::cmp::Reverse(m.len()));
        for m in under {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
        // A rootless podman keeps a pause process holding its namespaces.
        for f in ["run/libpod/pause.pid", "run/libpod/tmp/pause.pid"] {
            let pid = fs::read_to_string(self.dir.join(f)).unwrap_or_default();
            if let Ok(pid) = pid.trim().parse::<i32>() {
                // SAFETY: plain syscall; the pid is the pause process of this test's podman.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// A tar of a minimal root filesystem: static busybox (its shell runs the applets without
/// links), /etc/passwd and /tmp.
fn base_tar(l: &Layers) -> PathBuf {
    let rootfs = l.mkdir("rootfs");
    for d in ["bin", "etc", "tmp", "data"] {
        fs::create_dir(rootfs.join(d)).unwrap();
    }
    fs::set_permissions(rootfs.join("tmp"), fs::Permissions::from_mode(0o1777)).unwrap();
    fs::copy(BUSYBOX, rootfs.join("bin/busybox")).unwrap();
    std::os::unix::fs::symlink("busybox", rootfs.join("bin/sh")).unwrap();
    fs::write(
        rootfs.join("etc/passwd"),
        "root:x:0:0:root:/:/bin/sh\nuser:x:1000:1000::/tmp:/bin/sh\n",
    )
    .unwrap();
    fs::write(rootfs.join("data/base"), "base\n").unwrap();
    let tar = l.root().join("base.tar");
    let st = Command::new("tar")
        .args(["--numeric-owner", "--owner=0", "--group=0", "-C"])
        .arg(&rootfs)
        .arg("-cf")
        .arg(&tar)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success(), "tar of the base");
    fs::set_permissions(&tar, fs::Permissions::from_mode(0o644)).unwrap();
    fs::write(l.root().join("Containerfile"), CONTAINERFILE).unwrap();
    fs::set_permissions(
        l.root().join("Containerfile"),
        fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    tar
}

/// What one storage's containers saw.
#[derive(Debug, PartialEq)]
struct Seen {
    /// The built image, in a fresh container.
    built: String,
    /// A container of it after its changes.
    changed: String,
    /// The committed container, in a fresh container.
    committed: String,
    /// The built image again, after all of that.
    built_after: String,
}

fn scenario(p: &Podman, l: &Layers, tar: &Path) -> Seen {
    scenario_with(p, l, tar, CHANGES)
}

/// `scenario` with the container making `changes`.
fn scenario_with(p: &Podman, l: &Layers, tar: &Path, changes: &str) -> Seen {
    p.ok(&[
        "import",
        "--quiet",
        &tar.to_string_lossy(),
        "localhost/base",
    ]);
    let mut build = vec!["build", "--quiet"];
    build.extend_from_slice(RUN_OPTS);
    let file = l.root().join("Containerfile");
    let file = file.to_string_lossy();
    let ctx = l.root().join("rootfs");
    let ctx = ctx.to_string_lossy();
    build.extend_from_slice(&["-t", "localhost/built", "-f", &file, &ctx]);
    p.ok(&build);
    let built = p.run(&["--rm"], "localhost/built", LISTING);
    let changed = p.run(
        &["--name", "changer"],
        "localhost/built",
        &format!("{changes}\n{LISTING}"),
    );
    p.ok(&["commit", "--quiet", "changer", "localhost/committed"]);
    p.ok(&["rm", "changer"]);
    let committed = p.run(&["--rm"], "localhost/committed", LISTING);
    let built_after = p.run(&["--rm"], "localhost/built", LISTING);
    Seen {
        built,
        changed,
        committed,
        built_after,
    }
}

/// Line-by-line difference of two listings, for a readable failure.
fn diff(a: &str, b: &str) -> String {
    let la: Vec<&str> = a.lines().collect();
    let lb: Vec<&str> = b.lines().collect();
    let mut out = String::new();
    for x in &la {
        if !lb.contains(x) {
            out += &format!("- {x}\n");
        }
    }
    for x in &lb {
        if !la.contains(x) {
            out += &format!("+ {x}\n");
        }
    }
    out
}

fn assert_same(kernel: &Seen, ours: &Seen, what: &str) {
    for (name, k, u) in [
        ("the built image", &kernel.built, &ours.built),
        ("the changed container", &kernel.changed, &ours.changed),
        ("the committed image", &kernel.committed, &ours.committed),
        (
            "the built image afterwards",
            &kernel.built_after,
            &ours.built_after,
        ),
    ] {
        assert!(
            k == u,
            "{what}: {name} differs from kernel overlayfs (- kernel, + unionmount):\n{}",
            diff(k, u)
        );
    }
}

/// Checks the kernel's own run, so that a listing that shows nothing cannot pass.
fn check_oracle(k: &Seen) {
    let has = |s: &str, line: &str| s.lines().any(|l| l.starts_with(line));
    let present = [
        (&k.built, "/data/opq/late "),
        (&k.built, "/data/file/in "),
        (&k.built, "/data/hard -rw-r--r-- 0:0 2 2 "),
        (&k.changed, "/data/opq/again "),
        (&k.changed, "/tmp/own2 -rw------- 1000:1000 2 4 "),
        (&k.changed, "/data/keep/a -rw-r--r-- 0:0 1 7 "),
        (&k.changed, "/data/fifo prw-"),
        (&k.changed, "/data/t2 -rw-r--r-- 1000:1000 2 7 "),
        (&k.changed, "/deep/hl -rw-r--r-- 0:0 1 2 "),
        (&k.changed, "/deep/a/b -rw-r--r-- 0:0 1 0 "),
    ];
    let absent = [
        (&k.built, "/data/opq/c "),
        (&k.built, "/data/gone"),
        (&k.changed, "/data/opq/late"),
    ];
    for (listing, line) in present {
        assert!(has(listing, line), "no {line:?} in:\n{listing}");
    }
    for (listing, line) in absent {
        assert!(!has(listing, line), "{line:?} in:\n{listing}");
    }
    assert_eq!(
        k.built, k.built_after,
        "kernel overlayfs: the image changed"
    );
    // Everything the container made is in the commit (the runtime's mount points are left
    // out of the listings).
    assert_eq!(
        k.changed, k.committed,
        "kernel overlayfs: the commit lost changes"
    );
}

#[test]
fn podman_as_root_matches_kernel_overlayfs() {
    let l = Layers::new(0);
    let _reaper = Reaper(l.root().to_path_buf());
    let tar = base_tar(&l);
    let kernel = {
        let p = Podman::new(&l, "kernel", false, None);
        scenario(&p, &l, &tar)
    };
    check_oracle(&kernel);
    let ours = {
        let p = Podman::new(&l, "union", false, Some(PathBuf::from(BIN)));
        scenario(&p, &l, &tar)
    };
    assert_same(&kernel, &ours, "unionmount as root");
    assert_no_daemons(l.root(), "after the containers");
}

#[test]
fn podman_rootless_matches_kernel_overlayfs() {
    test_user();
    let l = Layers::new(0);
    let _reaper = Reaper(l.root().to_path_buf());
    fs::set_permissions(l.root(), fs::Permissions::from_mode(0o755)).unwrap();
    let tar = base_tar(&l);
    let kernel = {
        let p = Podman::new(&l, "kernel", false, None);
        scenario(&p, &l, &tar)
    };
    check_oracle(&kernel);
    ensure_subids(USER);
    let bin = l.mkdir("bin").join("unionmount");
    fs::copy(BIN, &bin).unwrap();
    fs::set_permissions(&bin, fs::Permissions::from_mode(0o755)).unwrap();
    let ours = {
        let p = Podman::new(&l, "union", true, Some(bin.clone()));
        scenario(&p, &l, &tar)
    };
    assert_same(&kernel, &ours, "unionmount rootless");
    // With force_mask, containers-storage keeps owners and modes in the override xattr and
    // passes xattr_permissions=2. When it extracts a layer (podman 4.3) it drops the set-ID
    // and sticky bits from the modes it records and fails on a fifo (it cannot set a user
    // xattr on one), and it gives each layer's root directory mode 0755 instead of 0555: the
    // comparison leaves those out.
    let masked = {
        let mut p = Podman::new(&l, "masked", true, Some(bin));
        p.storage_opts.push("overlay.force_mask=shared".into());
        scenario_with(&p, &l, &tar, &CHANGES.replace("mkfifo /data/fifo\n", ""))
    };
    let leave_out = |s: &Seen| {
        let s = without_special_bits(s);
        let f = |t: &str| without_lines(&without_lines(t, "/data/fifo "), "/ ");
        Seen {
            built: f(&s.built),
            changed: f(&s.changed),
            committed: f(&s.committed),
            built_after: f(&s.built_after),
        }
    };
    assert_same(
        &leave_out(&kernel),
        &leave_out(&masked),
        "rootless with force_mask",
    );
    assert_no_daemons(l.root(), "after the containers");
}

/// A listing without the lines that start with `prefix`.
fn without_lines(listing: &str, prefix: &str) -> String {
    listing
        .lines()
        .filter(|l| !l.starts_with(prefix))
        .map(|l| format!("{l}\n"))
        .collect()
}

/// Listings with the set-ID and sticky bits taken out of every mode.
fn without_special_bits(s: &Seen) -> Seen {
    let strip = |t: &str| -> String {
        t.lines()
            .map(|l| {
                let mut parts: Vec<String> = l.split(' ').map(String::from).collect();
                if let Some(mode) = parts.get_mut(1) {
                    *mode = mode.replace(['s', 't'], "x").replace(['S', 'T'], "-");
                }
                parts.join(" ") + "\n"
            })
            .collect()
    };
    Seen {
        built: strip(&s.built),
        changed: strip(&s.changed),
        committed: strip(&s.committed),
        built_after: strip(&s.built_after),
    }
}
