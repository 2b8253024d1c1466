//! From a checked configuration to a live mount: open the layers, prepare the work directory,
//! mount through /dev/fuse (or fusermount3 when mount(2) is not allowed), answer the kernel's
//! INIT, then detach into the background and serve until unmounted.

use std::ffi::{CString, OsStr};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;

use crate::fuse::{Access, Session};

use crate::config::{Config, Paths};
use crate::dir::remove_tree;
use crate::fs::UnionFs;
use crate::layer::{Layer, Layers, WorkDir};
use crate::mountinfo;
use crate::notify::Invalidator;
use crate::sys;
use crate::union::Union;
use crate::whiteout::Format;

/// What was created on disk, removed again if the mount fails.
#[derive(Default)]
struct Created {
    work_root: Option<PathBuf>,
    work_sub: Option<PathBuf>,
    /// The upper and work directories marked as this daemon's (`claim`), for its life.
    claims: Vec<OwnedFd>,
    /// Another daemon holds the upper (warned of).
    upper_busy: bool,
}

impl Created {
    fn undo(&self) {
        if let Some(p) = &self.work_sub {
            let _ = std::fs::remove_dir_all(p);
        }
        if let Some(p) = &self.work_root {
            let _ = std::fs::remove_dir(p);
        }
    }
}

fn io_err(what: &str, p: &Path, e: impl std::fmt::Display) -> String {
    format!("{what} {}: {e}", p.display())
}

fn errno_str(e: sys::Errno) -> String {
    std::io::Error::from_raw_os_error(e.code()).to_string()
}

/// How long a mount waits for an upper or work directory another daemon holds before it
/// warns: one whose mount was just unmounted lets go as it exits.
const CLAIM_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Marks `dir` (the upper or the work directory, `what`) as this daemon's for its life, with
/// an exclusive `flock` on a descriptor it keeps. Where another daemon holds it, that mount
/// is still live (or its daemon still serves a copy of it another mount namespace took):
/// the mount goes ahead, with a warning, as kernel overlayfs does without `index` (changes
/// through both can conflict; the start-up cleaning leaves the other daemon's temporary
/// objects, see `of_a_live_daemon`). A directory the daemon may not open for reading is
/// left unmarked.
/// `quiet`: one warning was given already (for the upper): no wait, no second warning.
fn claim(dir: BorrowedFd<'_>, path: &Path, what: &str, quiet: bool) -> Claim {
    let fd = match sys::openat(dir, c".", libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        Ok(fd) => fd,
        Err(e) => {
            log::debug!("{what} {} not marked in use: {e:?}", path.display());
            return Claim::Unmarked;
        }
    };
    let deadline = std::time::Instant::now() + CLAIM_WAIT;
    loop {
        match sys::flock(fd.as_fd(), libc::LOCK_EX | libc::LOCK_NB) {
            Ok(()) => return Claim::Held(fd),
            Err(e)
                if e.code() == libc::EWOULDBLOCK
                    && !quiet
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) if e.code() == libc::EWOULDBLOCK => {
                if !quiet {
                    eprintln!(
                        "unionmount: warning: {what} {} is in use by another unionmount mount \
                         (changes through both can conflict)",
                        path.display()
                    );
                }
                return Claim::Busy;
            }
            Err(e) => {
                log::debug!("{what} {} not marked in use: {e:?}", path.display());
                return Claim::Unmarked;
            }
        }
    }
}

enum Claim {
    Held(OwnedFd),
    /// Another daemon holds it.
    Busy,
    Unmarked,
}

/// Whether a work directory entry is a temporary object of a daemon still running (its
/// name is `#um<pid>.<n>`, see `WorkDir::temp_name`): one serving a copy of its mount that
/// another mount namespace holds after it was unmounted here, or a second mount on the
/// same directories (see `claim`). Asked only when another daemon holds the work directory
/// (or it cannot be marked): otherwise nothing in it is live.
fn of_a_live_daemon(name: &[u8], me: Option<&str>) -> bool {
    let (Some(pid), Some(me)) = (WorkDir::owner_of(name), me) else {
        return false;
    };
    pid != std::process::id()
        && running_program(pid).is_some_and(|(comm, zombie)| comm == me && !zombie)
}

/// The program name of process `pid` and whether it exited without being reaped (state Z),
/// from `/proc/PID/stat` ("pid (comm) state ...").
fn running_program(pid: u32) -> Option<(String, bool)> {
    let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (head, rest) = st.rsplit_once(')')?;
    let (_, comm) = head.split_once('(')?;
    Some((comm.to_string(), rest.trim_start().starts_with('Z')))
}

/// What the upper filesystem allows, as probed in the work directory.
struct UpperCaps {
    format: Format,
    rename_whiteout: bool,
    acls: bool,
}

/// Creates (if needed) and cleans `WORK/work`, and probes what the upper filesystem allows.
fn prepare_work(
    paths: &Paths,
    created: &mut Created,
) -> Result<Option<(WorkDir, UpperCaps)>, String> {
    let Some((work, create)) = &paths.work else {
        return Ok(None);
    };
    if *create {
        std::fs::create_dir(work).map_err(|e| io_err("cannot create work directory", work, e))?;
        created.work_root = Some(work.clone());
    }
    let sub = work.join("work");
    match std::fs::symlink_metadata(&sub) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} exists and is not a directory", sub.display())),
        Err(_) => {
            std::fs::create_dir(&sub).map_err(|e| io_err("cannot create", &sub, e))?;
            created.work_sub = Some(sub.clone());
        }
    }
    let root = Layer::open_root(work).map_err(|e| io_err("cannot open work directory", work, e))?;
    // Before anything in it is cleaned.
    // Held, no other daemon uses the work directory: everything in it is stale.
    let shared = match claim(root.root(), work, "work directory", created.upper_busy) {
        Claim::Held(fd) => {
            created.claims.push(fd);
            false
        }
        Claim::Busy | Claim::Unmarked => true,
    };
    let fd = sys::openat(root.root(), c"work", libc::O_RDONLY | libc::O_DIRECTORY, 0)
        .map_err(|e| io_err("cannot open", &sub, errno_str(e)))?;
    // Copies are built in it: nothing of it may pass on to them. A default ACL (inherited
    // by mkdir from the work directory's parent) would give every copy its entries, and a
    // set-group-ID bit its group; kernel overlayfs strips both ACLs and the mode as well.
    for acl in [c"system.posix_acl_default", c"system.posix_acl_access"] {
        match sys::removexattr(fd.as_fd(), acl) {
            Ok(()) => {}
            Err(e) if matches!(e.code(), libc::ENODATA | libc::EOPNOTSUPP) => {}
            Err(e) => log::warn!(
                "cannot remove {acl:?} of {}: {}",
                sub.display(),
                errno_str(e)
            ),
        }
    }
    if let Err(e) = sys::fchmod(fd.as_fd(), 0o700) {
        log::warn!("cannot set the mode of {}: {}", sub.display(), errno_str(e));
    }
    // Stale entries of an earlier mount that was killed: half-built copies and objects
    // waiting to be deleted. None of them is visible in the view.
    let mut stale = Vec::new();
    // This program's name, to tell its running daemons (`of_a_live_daemon`); none asked
    // where the work directory is this daemon's alone.
    let me = shared
        .then(|| running_program(std::process::id()).map(|(comm, _)| comm))
        .flatten();
    let me = me.as_deref();
    let _ = sys::for_each_dirent(fd.as_fd(), |d| {
        if d.name != b"." && d.name != b".." && !of_a_live_daemon(d.name, me) {
            stale.push(CString::new(d.name).expect("no NUL in a dirent"));
        }
    });
    for name in stale {
        if let Err(e) = remove_tree(fd.as_fd(), &name) {
            log::warn!("cannot clean stale work entry {name:?}: {}", errno_str(e));
        }
    }
    let work = WorkDir::new(fd);
    // Whiteouts: a char device 0/0 where mknod allows it (root; Linux >= 5.8 unprivileged).
    let probe = work.temp_name();
    let char_whiteouts = sys::mknodat(work.fd(), &probe, libc::S_IFCHR, 0).is_ok();
    let _ = sys::unlinkat(work.fd(), &probe, 0);
    let trusted = {
        let d = work.temp_name();
        let ok = sys::mkdirat(work.fd(), &d, 0o700).is_ok()
            && sys::openat(work.fd(), &d, libc::O_RDONLY | libc::O_DIRECTORY, 0)
                .and_then(|f| sys::setxattr(f.as_fd(), c"trusted.overlay.opaque", b"y", 0))
                .is_ok();
        let _ = sys::unlinkat(work.fd(), &d, libc::AT_REMOVEDIR);
        ok
    };
    let format = match (char_whiteouts, trusted) {
        (true, true) => Format::Trusted,
        (true, false) => Format::UserXattr,
        (false, _) => Format::Aufs,
    };
    let rename_whiteout = char_whiteouts && {
        let a = work.temp_name();
        let b = work.temp_name();
        let ok = sys::openat(work.fd(), &a, libc::O_CREAT | libc::O_WRONLY, 0o600).is_ok()
            && sys::renameat2(work.fd(), &a, work.fd(), &b, libc::RENAME_WHITEOUT).is_ok();
        let _ = sys::unlinkat(work.fd(), &a, 0);
        let _ = sys::unlinkat(work.fd(), &b, 0);
        ok
    };
    // The work directory is on the upper's filesystem: one without POSIX ACLs answers
    // EOPNOTSUPP for them.
    let acls = !matches!(
        sys::getxattr_at(work.fd(), c"", crate::acl::ACCESS, &mut []),
        Err(e) if e.code() == libc::EOPNOTSUPP
    );
    let caps = UpperCaps {
        format,
        rename_whiteout,
        acls,
    };
    Ok(Some((work, caps)))
}

fn mount_data(fd: i32, allow_other: bool) -> String {
    let mut data = format!(
        "fd={fd},rootmode=40000,user_id={},group_id={},default_permissions",
        sys::geteuid(),
        sys::getegid()
    );
    if allow_other {
        data.push_str(",allow_other");
    }
    data
}

fn mount_flags(cfg: &Config) -> u64 {
    let f = &cfg.flags;
    let mut flags = 0u64;
    if f.read_only {
        flags |= libc::MS_RDONLY;
    }
    if !f.dev {
        flags |= libc::MS_NODEV;
    }
    if !f.suid {
        flags |= libc::MS_NOSUID;
    }
    if f.noexec {
        flags |= libc::MS_NOEXEC;
    }
    if f.noatime {
        flags |= libc::MS_NOATIME;
    }
    if f.nodiratime {
        flags |= libc::MS_NODIRATIME;
    }
    flags
}

/// Mounts and returns the /dev/fuse fd of the new connection.
fn mount_fuse(cfg: &Config, mountpoint: &Path, allow_other: bool) -> Result<OwnedFd, String> {
    let target = CString::new(mountpoint.as_os_str().as_bytes()).map_err(|_| "bad path")?;
    let dev =
        sys::open_dev_fuse().map_err(|e| format!("cannot open /dev/fuse: {}", errno_str(e)))?;
    let data = mount_data(dev.as_raw_fd(), allow_other);
    let source = CString::new(cfg.fsname.as_str()).map_err(|_| "bad source name")?;
    let data_c = CString::new(data).expect("no NUL");
    match sys::mount(
        &source,
        &target,
        c"fuse.unionmount",
        mount_flags(cfg),
        &data_c,
    ) {
        Ok(()) => return Ok(dev),
        Err(e) if e.code() == libc::EPERM => {}
        Err(e) => {
            return Err(format!(
                "cannot mount on {}: {}",
                mountpoint.display(),
                errno_str(e)
            ));
        }
    }
    drop(dev);
    mount_with_fusermount(cfg, mountpoint, allow_other)
}

/// The unprivileged path: fusermount3 mounts and hands the fd back over a socket.
fn mount_with_fusermount(
    cfg: &Config,
    mountpoint: &Path,
    allow_other: bool,
) -> Result<OwnedFd, String> {
    let f = &cfg.flags;
    let mut opts = vec![
        if f.read_only { "ro" } else { "rw" }.to_string(),
        "default_permissions".into(),
        format!("fsname={}", cfg.fsname),
        "subtype=unionmount".into(),
    ];
    opts.push(if f.dev { "dev" } else { "nodev" }.into());
    opts.push(if f.suid { "suid" } else { "nosuid" }.into());
    if f.noexec {
        opts.push("noexec".into());
    }
    if f.noatime {
        opts.push("noatime".into());
    }
    if f.nodiratime {
        opts.push("nodiratime".into());
    }
    if allow_other {
        opts.push("allow_other".into());
    }
    let (ours, theirs) = sys::socketpair().map_err(|e| format!("socketpair: {}", errno_str(e)))?;
    sys::clear_cloexec(theirs.as_fd()).map_err(|e| format!("fcntl: {}", errno_str(e)))?;
    let child = Command::new("fusermount3")
        .arg("-o")
        .arg(opts.join(","))
        .arg("--")
        .arg(mountpoint)
        .env("_FUSE_COMMFD", theirs.as_raw_fd().to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("mount(2) is not permitted and fusermount3 could not run: {e}"))?;
    drop(theirs);
    let fd = sys::recv_fd(ours.as_fd());
    let out = child
        .wait_with_output()
        .map_err(|e| format!("fusermount3: {e}"))?;
    match fd {
        Ok(fd) => Ok(fd),
        Err(_) => {
            let msg = String::from_utf8_lossy(&out.stderr);
            let msg = msg.lines().next().unwrap_or("failed").trim().to_string();
            Err(format!(
                "cannot mount on {} with fusermount3: {msg}",
                mountpoint.display()
            ))
        }
    }
}

/// Unmounts `mountpoint`, lazily, by whichever means this process has.
pub fn unmount(mountpoint: &Path) {
    let Ok(target) = CString::new(mountpoint.as_os_str().as_bytes()) else {
        return;
    };
    match sys::umount_detach(&target) {
        Ok(()) => {}
        Err(e) if e.code() == libc::EPERM => {
            let _ = Command::new("fusermount3")
                .args([OsStr::new("-u"), OsStr::new("-z"), OsStr::new("--")])
                .arg(mountpoint)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        Err(e) => log::warn!("unmount {}: {}", mountpoint.display(), errno_str(e)),
    }
}

fn open_layers(paths: &Paths) -> Result<(Vec<Layer>, Option<Layer>), String> {
    let mut lowers = Vec::with_capacity(paths.lowers.len());
    for p in &paths.lowers {
        lowers.push(Layer::open_lower(p).map_err(|e| io_err("cannot open lower layer", p, e))?);
    }
    let upper = match &paths.upper {
        Some(p) => Some(Layer::open_root(p).map_err(|e| io_err("cannot open upper layer", p, e))?),
        None => None,
    };
    Ok((lowers, upper))
}

/// The new mount's device number (`major:minor`), which names its backing device info in
/// `/sys/class/bdi`. It comes from mountinfo: a stat of the mountpoint would wait for this
/// very daemon.
fn mount_dev(mountpoint: &Path) -> Option<String> {
    mountinfo::newest_at(&mountinfo::read(), mountpoint).map(|m| m.dev.clone())
}

/// Raises the readahead of the mount's backing device info (`dev`) to 1 MiB (the kernel
/// gives FUSE its 128 KiB default), so page-cached reads reach the daemon in large
/// requests. Only root may; elsewhere this quietly does nothing.
fn raise_readahead(dev: &str) {
    let path = format!("/sys/class/bdi/{dev}/read_ahead_kb");
    if let Err(e) = std::fs::write(&path, "1024") {
        log::debug!("cannot raise readahead ({path}): {e}");
    }
}

/// The filesystem type of the newest mount at `mountpoint` (a canonical path), from mountinfo.
fn newest_mount_type(mountpoint: &Path) -> Option<String> {
    mountinfo::newest_at(&mountinfo::read(), mountpoint).map(|m| m.fstype.clone())
}

/// Whether passthrough of open files can be offered: root in the initial namespace.
fn passthrough_possible() -> bool {
    sys::geteuid() == 0 && !crate::union::in_user_namespace()
}

/// `-o remount,...`: changes the read-only flag and the generic flags asked for (`noexec`,
/// `nosuid`, `noatime`, ...) of a live mount, keeping its other flags.
pub fn remount(r: &crate::config::Remount) -> Result<(), String> {
    let target = CString::new(r.mountpoint.as_os_str().as_bytes()).map_err(|_| "bad path")?;
    let real = std::fs::canonicalize(&r.mountpoint)
        .map_err(|e| format!("mountpoint {}: {e}", r.mountpoint.display()))?;
    match newest_mount_type(&real) {
        Some(t) if t == "fuse.unionmount" => {}
        Some(t) => {
            return Err(format!(
                "remount: {} is a {t} mount, not a unionmount one",
                r.mountpoint.display()
            ));
        }
        None => {
            return Err(format!(
                "remount: {} is not a mountpoint",
                r.mountpoint.display()
            ));
        }
    }
    let fd = Layer::open_root(&r.mountpoint)
        .map_err(|e| io_err("cannot open mountpoint", &r.mountpoint, e))?;
    let cur = sys::fstatvfs(fd.root())
        .map_err(|e| format!("mountpoint {}: {}", r.mountpoint.display(), errno_str(e)))?;
    drop(fd);
    let keep = [
        (libc::ST_NOSUID, libc::MS_NOSUID),
        (libc::ST_NODEV, libc::MS_NODEV),
        (libc::ST_NOEXEC, libc::MS_NOEXEC),
        (libc::ST_NOATIME, libc::MS_NOATIME),
        (libc::ST_NODIRATIME, libc::MS_NODIRATIME),
        (libc::ST_RELATIME, libc::MS_RELATIME),
    ];
    let mut flags = libc::MS_REMOUNT;
    for (st, ms) in keep {
        if cur.f_flag & st != 0 {
            flags |= ms;
        }
    }
    for &(ms, on) in &r.changes {
        if on {
            flags |= ms;
        } else {
            flags &= !ms;
        }
    }
    let ro = r.read_only.unwrap_or(cur.f_flag & libc::ST_RDONLY != 0);
    if ro {
        flags |= libc::MS_RDONLY;
    }
    // Going read-only is refused while an unlinked file is still referenced, and the
    // kernel holds a FUSE file's inode until the daemon has answered its (asynchronous)
    // release: give files closed just now a moment.
    let mut tries = 0;
    loop {
        match sys::mount(c"", &target, c"", flags, c"") {
            Err(e) if e.code() == libc::EBUSY && ro && tries < 40 => {
                tries += 1;
                std::thread::sleep(std::time::Duration::from_millis(25));
            }
            res => {
                return res.map_err(|e| {
                    format!(
                        "cannot remount {}: {}",
                        r.mountpoint.display(),
                        errno_str(e)
                    )
                });
            }
        }
    }
}

/// Mounts as configured and serves until unmounted. Returns only on failure, or after the
/// mount ends in the foreground.
pub fn run(cfg: Config) -> Result<(), String> {
    for w in &cfg.warnings {
        eprintln!("unionmount: warning: {w}");
    }
    // Termination signals wait from before the mount exists until the signal thread takes
    // them, so one that arrives in between unmounts cleanly instead of killing the daemon
    // and leaving a dead mount behind (the mask is inherited by the forked daemon).
    // Whatever the caller left open (a lock it holds, a pipe it reads to its end): the
    // daemon in the background lets go of it.
    let inherited = sys::open_fds_above_stdio();
    let set = sys::block_term_signals();
    sys::raise_nofile_limit();
    sys::limit_malloc_arenas(2);
    sys::fix_malloc_mmap_threshold(1 << 20);
    sys::ignore_sigpipe();
    let paths = crate::config::check_paths(&cfg)?;
    // Before anything on disk is touched (the work directory is prepared next).
    if cfg.passthrough == crate::config::Passthrough::On && !passthrough_possible() {
        return Err("--passthrough on needs root in the initial user namespace".into());
    }
    let (lowers, upper) = open_layers(&paths)?;
    let mut created = Created::default();
    if let (Some(u), Some(p)) = (&upper, &paths.upper) {
        match claim(u.root(), p, "upper directory", false) {
            Claim::Held(fd) => created.claims.push(fd),
            Claim::Busy => created.upper_busy = true,
            Claim::Unmarked => {}
        }
    }
    let prepared = match prepare_work(&paths, &mut created) {
        Ok(p) => p,
        Err(e) => {
            created.undo();
            return Err(e);
        }
    };
    let (work, caps) = match prepared {
        Some((w, caps)) => (Some(w), caps),
        None => (
            None,
            UpperCaps {
                format: Format::Trusted,
                rename_whiteout: false,
                acls: false,
            },
        ),
    };
    let upper_noatime = match &upper {
        Some(u)
            if cfg.opts.noatime
                && cfg.passthrough != crate::config::Passthrough::Off
                && passthrough_possible() =>
        {
            // Opened (not `O_PATH`): open_by_handle_at takes no `O_PATH` fd.
            sys::clone_mount(u.root(), false)
                .and_then(|c| sys::openat(c.as_fd(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0))
                .map_err(|e| log::debug!("noatime: no copy of the upper's mount: {e:?}"))
                .ok()
        }
        _ => None,
    };
    let layers = Layers {
        lowers,
        upper,
        work,
        format: caps.format,
        rename_whiteout: caps.rename_whiteout,
        upper_acls: caps.acls,
        upper_noatime,
    };
    let mut opts = cfg.opts.clone();
    opts.passthrough = match cfg.passthrough {
        crate::config::Passthrough::Off => false,
        _ => passthrough_possible(),
    };
    let union = match Union::new(layers, opts) {
        Ok(u) => Arc::new(u),
        Err(e) => {
            created.undo();
            return Err(format!("cannot read the layer roots: {}", errno_str(e)));
        }
    };
    // Root mounts are for everyone, as kernel overlayfs; permissions are the kernel's. That
    // includes the root of a user namespace, as a rootless container engine runs it: the
    // container's other users must reach its files (and only processes of that namespace can).
    // `-o allow_root` asks for the mount to be kept to root and its owner.
    let allow_other = cfg
        .flags
        .allow_other
        .unwrap_or(sys::geteuid() == 0 && !cfg.flags.allow_root);
    let acl = if !allow_other && cfg.flags.allow_root {
        Access::RootAndOwner(sys::geteuid())
    } else {
        Access::All
    };
    let dev = match mount_fuse(&cfg, &paths.mountpoint, allow_other || cfg.flags.allow_root) {
        Ok(d) => d,
        Err(e) => {
            created.undo();
            return Err(e);
        }
    };
    let fs = UnionFs::new(union.clone());
    // A second fd of the connection, for the notifications the daemon splices itself.
    let dev_splice = sys::dup(dev.as_fd()).ok();
    let session = match Session::new(fs, dev, cfg.threads, cfg.spin, acl) {
        Ok(s) => s,
        Err(e) => {
            unmount(&paths.mountpoint);
            created.undo();
            return Err(format!("the kernel did not start the FUSE session: {e}"));
        }
    };
    // The mount is live. From here on nothing is undone.
    if let Some(dev) = mount_dev(&paths.mountpoint) {
        raise_readahead(&dev);
        let _ = union.bdi.set(dev);
    }
    // Background mode: the caller's process ends once the daemon's watcher runs (when the
    // child closes its end), so that from then on one process shows the mount's command line.
    let mut started: Option<std::os::fd::OwnedFd> = None;
    if !cfg.foreground {
        // Before the fork: the caller, who sees this process end, must find them closed
        // already (the child would close its copies only after the parent's exit).
        sys::close_fds(&inherited);
        let ready = sys::pipe().ok();
        match sys::fork() {
            Ok(sys::Fork::Parent(_)) => {
                if let Some((r, w)) = ready {
                    drop(w);
                    let _ = sys::read_to_end(r.as_fd());
                }
                // Leave without running destructors: the child owns the session now.
                std::process::exit(0);
            }
            Ok(sys::Fork::Child) => {
                started = ready.map(|(_, w)| w);
                sys::setsid();
                let _ = std::env::set_current_dir("/");
                sys::detach_stdio();
                crate::logger::to_syslog();
            }
            Err(e) => {
                unmount(&paths.mountpoint);
                return Err(format!("cannot fork into the background: {}", errno_str(e)));
            }
        }
    }
    // A watcher ends the connection should the daemon die without ending it itself (see
    // `watcher`; where the FUSE control files are visible). Started from the main thread, whose end it is told of.
    let _watcher = union
        .bdi
        .get()
        .and_then(|dev| crate::watcher::start(dev, &paths.mountpoint));
    drop(started);
    // The mount is live: a helper thread that cannot start (a thread limit) takes it away
    // again, as a mount nobody serves would answer ENOTCONN.
    let helpers = || -> Result<(), String> {
        let mp = paths.mountpoint.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                let sig = sys::sigwait(&set);
                log::info!("signal {sig}: unmounting {}", mp.display());
                unmount(&mp);
            })
            .map_err(|e| format!("cannot start the signal thread: {e}"))?;
        let invalidator = Invalidator::start(session.notifier())
            .map_err(|e| format!("cannot start the invalidation thread: {e}"))?;
        let _ = union.invalidator.set(invalidator);
        crate::notify::start_trimmer(union.clone())
            .map_err(|e| format!("cannot start the housekeeping thread: {e}"))
    };
    if let Err(e) = helpers() {
        unmount(&paths.mountpoint);
        return Err(e);
    }
    if let Some(dev) = dev_splice {
        union.streams.start(dev);
    }
    match session.run() {
        Ok(()) => Ok(()),
        // The kernel ended the connection as the mount went away while requests were still
        // pending (an unmount racing a reply): the mount is gone, which is the normal end.
        Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => {
            log::info!("the kernel ended the FUSE connection: {e}");
            Ok(())
        }
        Err(e) => {
            // A mount nobody serves would answer ENOTCONN to everything: take it away.
            unmount(&paths.mountpoint);
            Err(format!("the FUSE session ended with an error: {e}"))
        }
    }
}
