//! A process that ends the FUSE connection when the daemon dies.
//!
//! The kernel ends a FUSE connection (every waiting request fails, the mount answers
//! `ENOTCONN`) once the daemon's last descriptor of it closes. A thread of the daemon that
//! sleeps uninterruptibly in the kernel keeps its descriptors open after a `SIGKILL`: an
//! entry invalidation waits for the directory's lock, which a request the daemon had read but
//! not answered may hold. The daemon then never ends, nor the request, nor the invalidation:
//! the mount and every process that touches it hang for good. A watcher started with the
//! mount aborts the connection (`/sys/fs/fuse/connections/N/abort`) as soon as the daemon's
//! main thread ends without dismissing it, which is what the kernel does anyway once the
//! daemon's descriptors close. The kernel gives that file to the user who mounted, so root
//! and rootless daemons may write it where the control directory is visible; where it is
//! not, there is no watcher.
//!
//! The watcher is this program run again (`/proc/self/exe`) under the name `WATCHER_NAME`,
//! with what it watches in `WATCH_ENV`; it holds no descriptor of the daemon's and waits
//! for the parent-death signal, so an idle mount wakes nobody.

use std::ffi::{CString, OsString};
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, Ordering};

use crate::sys;

/// `argv[0]` of a watcher.
pub const WATCHER_NAME: &str = "unionmount-watcher";
/// "DAEMON_PID CONNECTION MAJOR:MINOR", and the mountpoint in `WATCH_AT_ENV`.
const WATCH_ENV: &str = "UNIONMOUNT_WATCH";
const WATCH_AT_ENV: &str = "UNIONMOUNT_WATCH_AT";

/// The watcher's pid, or 0.
static WATCHER: AtomicI32 = AtomicI32::new(0);

/// Dismisses the watcher when dropped (the daemon ends as it means to).
pub struct Guard(());

impl Drop for Guard {
    fn drop(&mut self) {
        dismiss();
    }
}

/// Ends the watcher (and reaps it) before the daemon ends on purpose: the mount is gone, and
/// a new mount may already have its connection number.
pub fn dismiss() {
    let pid = WATCHER.swap(0, Ordering::SeqCst);
    if pid > 0 {
        sys::kill_child(pid);
    }
}

/// The connection's number in the FUSE control filesystem, from the mount's device
/// (`major:minor`; FUSE mounts have major 0).
fn connection(dev: &str) -> Option<u64> {
    let (major, minor) = dev.split_once(':')?;
    (major == "0").then_some(())?;
    minor.parse().ok()
}

fn abort_file(conn: u64) -> String {
    format!("/sys/fs/fuse/connections/{conn}/abort")
}

/// Starts a watcher for the mount at `mountpoint` whose device is `dev`, if this process
/// may abort its connection. Called from the main thread, which lives as long as the
/// daemon serves: its end is what the watcher is told of.
pub fn start(dev: &str, mountpoint: &std::path::Path) -> Option<Guard> {
    let conn = connection(dev)?;
    let abort = CString::new(abort_file(conn)).ok()?;
    if sys::access(&abort, libc::W_OK).is_err() {
        return None;
    }
    let mut cmd = std::process::Command::new("/proc/self/exe");
    std::os::unix::process::CommandExt::arg0(&mut cmd, WATCHER_NAME);
    cmd.env(WATCH_ENV, format!("{} {conn} {dev}", std::process::id()))
        .env(WATCH_AT_ENV, mountpoint)
        .env_remove("RUST_LOG")
        .current_dir("/")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null());
    match sys::spawn_bare(&mut cmd) {
        Ok(child) => {
            WATCHER.store(child.id() as i32, Ordering::SeqCst);
            Some(Guard(()))
        }
        Err(e) => {
            log::warn!("no watcher for the connection: {e}");
            None
        }
    }
}

/// Runs as the watcher if this process was started as one (never returns then).
pub fn run_if_asked() {
    if std::env::args_os().next().as_deref() != Some(std::ffi::OsStr::new(WATCHER_NAME)) {
        return;
    }
    let (Some(what), Some(at)) = (std::env::var_os(WATCH_ENV), std::env::var_os(WATCH_AT_ENV))
    else {
        return;
    };
    let code = match parse(&what) {
        Some((daemon, conn, dev)) => {
            watch(daemon, conn, &dev, PathBuf::from(at));
            0
        }
        None => 2,
    };
    std::process::exit(code);
}

fn parse(what: &OsString) -> Option<(u32, u64, String)> {
    let what = what.to_str()?;
    let mut it = what.split(' ');
    let daemon = it.next()?.parse().ok()?;
    let conn = it.next()?.parse().ok()?;
    let dev = it.next()?.to_string();
    Some((daemon, conn, dev))
}

fn watch(daemon: u32, conn: u64, dev: &str, at: PathBuf) {
    // Shown by ps instead of the name of the file run (`exe`).
    sys::set_thread_name(c"um-watcher");
    let sig = libc::SIGUSR1;
    let set = sys::block_all_signals(sig);
    if sys::set_parent_death_signal(sig).is_err() {
        return;
    }
    // The daemon may have ended before the signal was asked for.
    if std::os::unix::process::parent_id() == daemon {
        while sys::sigwait(&set) != sig {}
    }
    // Dismissed daemons kill the watcher first; this one ended otherwise. Its mount must
    // still be there, with its device: a number of a connection that is gone may be a new
    // mount's.
    let ours = crate::mountinfo::read()
        .iter()
        .any(|m| m.at == at && m.dev == dev);
    if ours {
        let _ = std::fs::write(abort_file(conn), "1");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_numbers() {
        assert_eq!(connection("0:57"), Some(57));
        assert_eq!(connection("8:1"), None);
        assert_eq!(connection("0:x"), None);
        assert_eq!(
            parse(&OsString::from("12 57 0:57")),
            Some((12, 57, "0:57".to_string()))
        );
        assert_eq!(parse(&OsString::from("12 57")), None);
    }
}
