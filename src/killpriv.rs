//! Dropping the set-user-ID and set-group-ID bits when a file's data or owner changes.
//!
//! FUSE mounts never get the kernel's "nothing to drop here" shortcut (`SB_NOSEC`), so before
//! every write(2) the kernel asks the daemon for `security.capability`: one round trip per
//! write. With `FUSE_HANDLE_KILLPRIV_V2` the kernel sets `SB_NOSEC`, skips that question once
//! it has seen a file without set-ID bits or capabilities, and leaves dropping the bits to the
//! daemon. What reaches the daemon then:
//! - truncate(2), a truncating open and a change of owner: the daemon sees the operation and
//!   drops the bits itself;
//! - write(2), fallocate and copy_file_range to a file that has bits to drop: the kernel still
//!   works out that something must go and asks with a SETATTR that sets nothing, from the
//!   writer, before the change (also before a passthrough write, which goes from the kernel
//!   to the backing file under the daemon's credentials and so would keep them); page-cached
//!   writes of such files also come with `FUSE_WRITE_KILL_SUIDGID`. So does chown(f, -1, -1),
//!   told apart by the call the process is in.
//!
//! The rules are the kernel's own (`setattr_should_drop_suidgid`, `setattr_should_drop_sgid`),
//! applied with the credentials of the process that made the change, read from /proc.

use std::sync::{Arc, OnceLock};

use fuser::{FileAttr, FileType};

use crate::attr::SetAttr;
use crate::inode::Node;
use crate::sys::{Errno, Result};
use crate::union::Union;

/// What the upper's own write path drops from a file (its capabilities always, its set-ID
/// bits unless the daemon has CAP_FSETID over it), which a write-back of cached pages must
/// leave in place (see `Union::write`): read before such a write, put back after it.
pub struct Kept {
    set_ids: u32,
    capability: Option<Vec<u8>>,
}

const CAPABILITY: &std::ffi::CStr = c"security.capability";

impl Kept {
    /// What the file of `fd` has to lose, if anything. `capability`: whether its real
    /// capability is the view's (not where `xattr_permissions=2` keeps the view's apart: the
    /// hidden real one is let go with the write, as the kernel never asks to drop it).
    pub fn of(fd: std::os::fd::BorrowedFd<'_>, capability: bool) -> Option<Kept> {
        let set_ids = crate::sys::fstat(fd).ok()?.st_mode & (libc::S_ISUID | libc::S_ISGID);
        let capability = capability
            .then(|| crate::sys::getxattr_vec(fd, CAPABILITY).ok().flatten())
            .flatten();
        (set_ids != 0 || capability.is_some()).then_some(Kept {
            set_ids,
            capability,
        })
    }

    /// Puts back what the write took. Only what went missing is set: the rest of the mode is
    /// the file's own now (a grant of owner bits may be under way; see `grant`).
    pub fn restore(&self, fd: std::os::fd::BorrowedFd<'_>) {
        if self.set_ids != 0
            && let Ok(st) = crate::sys::fstat(fd)
            && st.st_mode & self.set_ids != self.set_ids
            && let Err(e) = crate::sys::fchmod_path(fd, (st.st_mode & 0o7777) | self.set_ids)
        {
            log::warn!("set-ID bits dropped by a write-back could not be set again: {e:?}");
        }
        if let Some(cap) = &self.capability
            && matches!(crate::sys::getxattr_vec(fd, CAPABILITY), Ok(None))
            && let Err(e) = crate::sys::setxattr(fd, CAPABILITY, cap, libc::XATTR_CREATE)
        {
            log::warn!("capabilities dropped by a write-back could not be set again: {e:?}");
        }
    }
}

const S_ISUID: u16 = 0o4000;
const S_ISGID: u16 = 0o2000;
const S_IXGRP: u16 = 0o0010;
const CAP_FOWNER: u32 = 3;
const CAP_FSETID: u32 = 4;
const CAP_SYS_ADMIN: u32 = 21;

/// What the bit rules need to know about the process behind a request.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Caller {
    /// CAP_FSETID in the daemon's user namespace.
    pub fsetid: bool,
    /// CAP_FOWNER in the daemon's user namespace.
    pub fowner: bool,
    /// That capability counts for data changes too: the kernel asks `capable(CAP_FSETID)`
    /// there, which only a process of the initial user namespace can pass.
    pub initial_ns: bool,
    /// CAP_SYS_ADMIN in the initial user namespace (what `trusted.*` xattrs need).
    pub sys_admin: bool,
    pub fsgid: u32,
    pub groups: Vec<u32>,
}

impl Caller {
    /// The thread `pid` (as FUSE reports it, in the daemon's pid namespace), or None if /proc
    /// cannot tell. The caller is blocked in the request being served, so the pid is its own.
    /// /proc shows a thread's own credentials, not ones the kernel lends it for a call (as
    /// nfsd's threads borrow their clients'), so kernel threads count as unknown.
    pub fn of(pid: u32) -> Option<Caller> {
        let status = thread_status(pid)?;
        let mut c = Caller::parse(&status)?;
        if c.fsetid || c.fowner || c.sys_admin {
            // Capabilities held in a user namespace of their own do not count here.
            let theirs = std::fs::read_link(format!("/proc/{pid}/ns/user")).ok();
            let ours = std::fs::read_link("/proc/self/ns/user").ok();
            let here = theirs.is_some() && theirs == ours;
            c.fsetid &= here;
            c.fowner &= here;
            c.sys_admin &= here;
        }
        let initial = !crate::union::in_user_namespace();
        c.initial_ns = c.fsetid && initial;
        c.sys_admin &= initial;
        Some(c)
    }

    /// The same caller, known to lack CAP_FSETID (the kernel said so).
    pub fn without_fsetid(mut self) -> Caller {
        self.fsetid = false;
        self.initial_ns = false;
        self
    }

    /// The fields of a /proc/PID/status text.
    fn parse(status: &str) -> Option<Caller> {
        let field = |name: &str| status_field(status, name);
        if field("Kthread:") == Some("1") {
            return None;
        }
        let cap_eff = u64::from_str_radix(field("CapEff:")?, 16).ok()?;
        // Gid: real, effective, saved, filesystem.
        let fsgid = field("Gid:")?.split_whitespace().nth(3)?.parse().ok()?;
        let groups = field("Groups:")
            .unwrap_or("")
            .split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect();
        Some(Caller {
            fsetid: cap_eff & (1 << CAP_FSETID) != 0,
            fowner: cap_eff & (1 << CAP_FOWNER) != 0,
            initial_ns: false,
            sys_admin: cap_eff & (1 << CAP_SYS_ADMIN) != 0,
            fsgid,
            groups,
        })
    }

    /// Membership of group `gid`; the overflow group (what an unmapped id reads as) is
    /// nobody's.
    fn in_group(&self, gid: u32) -> bool {
        gid != overflow_gid() && (self.fsgid == gid || self.groups.contains(&gid))
    }

    /// Whether this caller, with filesystem uid `fsuid`, may change the mode of a file owned
    /// by `owner` (`inode_owner_or_capable`).
    pub fn owns(&self, fsuid: u32, owner: u32) -> bool {
        (fsuid == owner && owner != overflow_uid()) || self.fowner
    }
}

/// The value of field `name` (with its colon) of a /proc/PID/status text.
pub(crate) fn status_field<'a>(status: &'a str, name: &str) -> Option<&'a str> {
    status
        .lines()
        .find_map(|l| l.strip_prefix(name))
        .map(str::trim)
}

fn overflow_id(file: &str) -> u32 {
    std::fs::read_to_string(file)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(65534)
}

fn overflow_gid() -> u32 {
    static G: OnceLock<u32> = OnceLock::new();
    *G.get_or_init(|| overflow_id("/proc/sys/kernel/overflowgid"))
}

fn overflow_uid() -> u32 {
    static U: OnceLock<u32> = OnceLock::new();
    *U.get_or_init(|| overflow_id("/proc/sys/kernel/overflowuid"))
}

/// Whether the thread `pid` is in chown(2) or a relative now; None if /proc cannot tell
/// (reading a process's current call needs the right to trace it). A SETATTR that sets
/// nothing comes from a change of data that must drop set-ID bits or capabilities, or from a
/// chown that keeps owner and group (-1, -1); the two follow different rules.
pub fn in_chown(pid: u32) -> Option<bool> {
    chown_in_syscall_line(&syscall_line(pid)?)
}

/// Whether a change of owner (`chown`) or size (`truncate`) by the thread `pid` can only be
/// the kernel's own (kernel overlayfs copying up): the thread is surely in no call that makes
/// it. False when /proc cannot tell. Both tables of calls count whatever the thread's
/// addresses: a 64-bit program can make 32-bit calls (`int $0x80`), which /proc shows by
/// their 32-bit numbers.
pub fn surely_internal(pid: u32, chown: bool, truncate: bool) -> bool {
    syscall_line(pid).is_some_and(|l| surely_internal_line(&l, chown, truncate) == Some(true))
}

/// `surely_internal` of a line of `/proc/PID/syscall`; None when it cannot tell. An open(2) or
/// openat(2) truncates only with O_TRUNC in its flags (its second or third argument);
/// openat2(2) keeps them in memory, so it counts as one that does.
fn surely_internal_line(line: &str, chown: bool, truncate: bool) -> Option<bool> {
    let Call::In(nr, f) = Call::of(line)? else {
        return Some(true);
    };
    let native = nr & !X32_BIT;
    if chown && is_chown(nr) {
        return Some(false);
    }
    if !truncate {
        return Some(true);
    }
    if COMPAT_TRUNCATES.contains(&nr) {
        return Some(false);
    }
    let arg = |i: usize| u64::from_str_radix(f.get(i + 1)?.strip_prefix("0x")?, 16).ok();
    let flags = match native {
        n if Some(n) == OPEN => arg(1)?,
        n if n == OPENAT => arg(2)?,
        n => return Some(!TRUNCATES.contains(&n)),
    };
    Some(flags & libc::O_TRUNC as u64 == 0)
}

#[cfg(target_arch = "x86_64")]
const OPEN: Option<i64> = Some(libc::SYS_open);
#[cfg(not(target_arch = "x86_64"))]
const OPEN: Option<i64> = None;
const OPENAT: i64 = libc::SYS_openat;

/// What a line of `/proc/PID/syscall` ("NR ARG1 .. ARG6 SP PC", "-1 SP PC" outside a call,
/// "running") shows: a call's number and the line's fields, or no call.
enum Call<'a> {
    In(i64, Vec<&'a str>),
    Outside,
}

impl<'a> Call<'a> {
    /// None when the line tells nothing: running, or an io_uring worker or a kernel thread
    /// (no stack or program counter: the number shown is its creator's, or none).
    fn of(line: &'a str) -> Option<Call<'a>> {
        let f: Vec<&str> = line.split_whitespace().collect();
        let nr: i64 = f.first()?.parse().ok()?;
        if nr < 0 {
            return Some(Call::Outside);
        }
        let [_, _, _, _, _, _, _, sp, pc] = f[..] else {
            return None;
        };
        if sp == "0x0" && pc == "0x0" {
            return None;
        }
        Some(Call::In(nr, f))
    }
}

/// `/proc/PID/syscall` of the thread `pid` of a request, if /proc shows it.
fn syscall_line(pid: u32) -> Option<String> {
    if pid == 0 || !proc_is_ours() {
        return None;
    }
    std::fs::read_to_string(format!("/proc/{pid}/syscall")).ok()
}

/// Whether a line of `/proc/PID/syscall` ("NR ARG1 .. ARG6 SP PC", "-1 SP PC" outside a
/// call, "running") shows a call of the chown(2) family; None when it cannot tell.
///
/// A 32-bit call carries the number of the 32-bit table, whether a 32-bit program makes it or
/// a 64-bit one (`int $0x80`): a number counts as a chown if it is one in either table. Of the
/// calls that send the daemon a SETATTR that sets nothing (writes and the like), only one has
/// a number that is a chown in the other table: the 64-bit ioctl(2), which can allocate space
/// (FS_IOC_RESVSP), is the 32-bit lchown(2). That number tells nothing.
fn chown_in_syscall_line(line: &str) -> Option<bool> {
    let Call::In(nr, _) = Call::of(line)? else {
        return Some(false);
    };
    if nr == NATIVE_IOCTL_IS_COMPAT_LCHOWN {
        return None;
    }
    Some(is_chown(nr))
}

/// Whether call number `nr` is of the chown(2) family in either table (a 64-bit program's
/// `int $0x80` calls show 32-bit numbers).
fn is_chown(nr: i64) -> bool {
    CHOWNS.contains(&(nr & !X32_BIT)) || COMPAT_CHOWNS.contains(&nr)
}

/// The calls that may truncate a file in this architecture's system call table.
#[cfg(target_arch = "x86_64")]
const TRUNCATES: &[i64] = &[
    libc::SYS_truncate,
    libc::SYS_ftruncate,
    libc::SYS_open,
    libc::SYS_openat,
    libc::SYS_openat2,
    libc::SYS_creat,
];
#[cfg(not(target_arch = "x86_64"))]
const TRUNCATES: &[i64] = &[
    libc::SYS_truncate as i64,
    libc::SYS_ftruncate as i64,
    libc::SYS_openat as i64,
    libc::SYS_openat2 as i64,
];

/// The same in the table of 32-bit programs: open, creat, truncate, ftruncate, truncate64,
/// ftruncate64, openat, openat2. (A 64-bit call with one of these numbers counts as one
/// too: a change is then dropped as for the caller's own, the safe side.)
#[cfg(target_arch = "x86_64")]
const COMPAT_TRUNCATES: &[i64] = &[5, 8, 92, 93, 193, 194, 295, 437];
#[cfg(not(target_arch = "x86_64"))]
const COMPAT_TRUNCATES: &[i64] = &[];

/// The chown(2) family in this architecture's system call table.
#[cfg(target_arch = "x86_64")]
const CHOWNS: &[i64] = &[
    libc::SYS_chown,
    libc::SYS_fchown,
    libc::SYS_lchown,
    libc::SYS_fchownat,
];
#[cfg(not(target_arch = "x86_64"))]
const CHOWNS: &[i64] = &[libc::SYS_fchown as i64, libc::SYS_fchownat as i64];

/// The same family in the table of 32-bit programs (`arch/x86/entry/syscalls/syscall_32.tbl`:
/// lchown, fchown and chown with 16-bit ids; lchown32, fchown32, chown32; fchownat). Elsewhere
/// a 32-bit program's calls are not recognised.
#[cfg(target_arch = "x86_64")]
const COMPAT_CHOWNS: &[i64] = &[16, 95, 182, 198, 207, 212, 298];
#[cfg(not(target_arch = "x86_64"))]
const COMPAT_CHOWNS: &[i64] = &[];

/// The 64-bit ioctl(2), whose number is the 32-bit lchown(2)'s (-1 where none is).
#[cfg(target_arch = "x86_64")]
const NATIVE_IOCTL_IS_COMPAT_LCHOWN: i64 = libc::SYS_ioctl;
#[cfg(not(target_arch = "x86_64"))]
const NATIVE_IOCTL_IS_COMPAT_LCHOWN: i64 = -1;

/// x32 programs call the 64-bit table's numbers with this bit set.
#[cfg(target_arch = "x86_64")]
const X32_BIT: i64 = 0x4000_0000;
#[cfg(not(target_arch = "x86_64"))]
const X32_BIT: i64 = 0;

/// /proc shows this daemon's pid namespace, so request pids name the right processes there.
/// `/proc/PID/status` of the thread `pid` of a request (as FUSE reports it, in the daemon's
/// pid namespace); None for the kernel's own requests (pid 0), where /proc is another pid
/// namespace's, or once the thread is gone.
pub(crate) fn thread_status(pid: u32) -> Option<String> {
    if pid == 0 || !proc_is_ours() {
        return None;
    }
    std::fs::read_to_string(format!("/proc/{pid}/status")).ok()
}

fn proc_is_ours() -> bool {
    static OURS: OnceLock<bool> = OnceLock::new();
    *OURS.get_or_init(|| {
        std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str()?.parse::<u32>().ok())
            == Some(std::process::id())
    })
}

/// The set-group-ID bit goes where group execute is set, or where the caller is neither in
/// the file's group `gid` nor has CAP_FSETID (`setattr_should_drop_sgid`).
fn drops_sgid(perm: u16, gid: u32, caller: Option<&Caller>) -> bool {
    perm & S_ISGID != 0
        && (perm & S_IXGRP != 0 || caller.is_none_or(|c| !c.in_group(gid) && !c.fsetid))
}

/// The permission bits after a change of data (write, truncate, fallocate, copy_file_range)
/// to a regular file with bits `perm` and group `gid`, or None if they stay. An unknown
/// caller loses them.
pub fn after_data_change(perm: u16, gid: u32, caller: Option<&Caller>) -> Option<u16> {
    if caller.is_some_and(|c| c.fsetid && c.initial_ns) {
        return None;
    }
    let mut p = perm & !S_ISUID;
    if drops_sgid(perm, gid, caller) {
        p &= !S_ISGID;
    }
    (p != perm).then_some(p)
}

/// The permission bits after a change of owner or group of a non-directory whose group was
/// `old_gid`: set-user-ID always goes (`chown_common`).
pub fn after_chown(perm: u16, old_gid: u32, caller: Option<&Caller>) -> Option<u16> {
    let mut p = perm & !S_ISUID;
    if drops_sgid(perm, old_gid, caller) {
        p &= !S_ISGID;
    }
    (p != perm).then_some(p)
}

/// The permission bits after an access ACL of a file or directory with bits `perm` and group
/// `gid` is set or removed: set-group-ID goes unless the caller is in the group or has
/// CAP_FSETID (`posix_acl_update_mode`; kernel overlayfs applies it to removals too, in
/// `ovl_set_or_remove_acl`).
pub fn after_acl_change(perm: u16, gid: u32, caller: Option<&Caller>) -> Option<u16> {
    (perm & S_ISGID != 0 && caller.is_none_or(|c| !c.in_group(gid) && !c.fsetid))
        .then_some(perm & !S_ISGID)
}

/// Whether `perm` has a bit either rule could drop (the cheap test before reading /proc).
pub fn has_set_ids(perm: u16) -> bool {
    perm & (S_ISUID | S_ISGID) != 0
}

/// How a change takes set-ID bits away.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Change {
    Data,
    /// A change of owner or group; the group the file had decides set-group-ID.
    Owner {
        old_gid: u32,
    },
    /// An access ACL set or removed (directories included).
    Acl,
}

/// The set-ID bits a SETATTR will take.
struct Loss {
    change: Change,
    caller: Option<Caller>,
}

impl Union {
    /// What the upper file of `fd` has to lose at a write (see `Kept`): its real capability
    /// is the view's unless `xattr_permissions=2` keeps the view's apart.
    pub(crate) fn kept_of(&self, fd: std::os::fd::BorrowedFd<'_>) -> Option<Kept> {
        Kept::of(fd, !self.isolates_security())
    }

    /// A SETATTR from the process `pid` (filesystem uid `fsuid`), with the set-ID bits it
    /// takes away: a truncate's, a chown's (the kernel leaves them to the daemon with
    /// killpriv), and those of a SETATTR that sets nothing, which the kernel sends before a
    /// write, fallocate or chown(f, -1, -1) that drops them (without killpriv it still
    /// keeps a set-group-ID bit without group execute that a non-member's write drops).
    pub fn setattr_by(
        &self,
        node: &Arc<Node>,
        req: SetAttr,
        pid: u32,
        fsuid: u32,
    ) -> Result<FileAttr> {
        if let Some(done) = self.setattr_removed(node, &req) {
            return done;
        }
        let chown = req.uid.is_some() || req.gid.is_some();
        let bare = req.mode.is_none()
            && !chown
            && req.size.is_none()
            && req.atime.is_none()
            && req.mtime.is_none();
        let fh = req.fh;
        let truncate_only = req.size.is_some() && !chown;
        // A chown is judged on the group the file had, and a refusal comes before anything
        // is copied up; a truncate alone changes neither mode nor group, so the attributes
        // after it serve (no stat before).
        let judged_before = chown && (self.killpriv_active() || req.size.is_some()) || bare;
        // A change of owner or size that is no chown(2) or truncate(2) of the caller's:
        // kernel overlayfs copying a file up onto this mount sets the copy's size and owner
        // so (after its capability and mode), which drops nothing on ext4. The daemon's own
        // fchown and ftruncate drop set-ID bits and capability all the same: they are put
        // back. (A caller /proc cannot tell about counts as making the call itself.)
        let internal = !node.is_dir()
            && (chown || req.size.is_some())
            && surely_internal(pid, chown, req.size.is_some());
        let loss = if judged_before && !node.is_dir() && !internal {
            let before = self.getattr(node, fh)?;
            self.set_id_loss(node, &before, pid, fsuid, chown, bare)?
        } else {
            None
        };
        let kept = match internal {
            true => {
                self.copy_up(node)?;
                let fd = self.upper_object(node, fh)?;
                self.kept_of(std::os::fd::AsFd::as_fd(&*fd))
                    .map(|k| (k, fd))
            }
            false => None,
        };
        let attr = self.setattr(node, req)?;
        let attr = match kept {
            Some((k, fd)) => {
                k.restore(std::os::fd::AsFd::as_fd(&*fd));
                self.getattr(node, fh)?
            }
            None => attr,
        };
        let loss = match truncate_only && !internal {
            true => self.set_id_loss(node, &attr, pid, fsuid, false, false)?,
            false => loss,
        };
        match loss {
            Some(l) => self.drop_set_ids(node, fh, l.caller.as_ref(), attr, l.change),
            None => Ok(attr),
        }
    }

    /// What a SETATTR from the process `pid` (filesystem uid `fsuid`) that sets an owner
    /// (`chown`), a size or nothing at all (`bare`) takes from the set-ID bits of `node`,
    /// whose attributes are `before`. EPERM for a chown(f, -1, -1) that would change the mode
    /// of a file the caller may not chmod (ext4 refuses it so; with KILLPRIV_V2 the kernel
    /// leaves out the mode change that makes it check).
    fn set_id_loss(
        &self,
        node: &Node,
        before: &FileAttr,
        pid: u32,
        fsuid: u32,
        chown: bool,
        bare: bool,
    ) -> Result<Option<Loss>> {
        // A chown takes the bits of every kind but directories (`chown_common`), a change of
        // data those of regular files.
        if before.kind == FileType::Directory || !has_set_ids(before.perm) {
            return Ok(None);
        }
        let caller = Caller::of(pid);
        // A change of data needs a file open for writing; a chown does not.
        let is_chown = chown
            || bare
                && (before.kind != FileType::RegularFile
                    || in_chown(pid)
                        .unwrap_or_else(|| !self.handles.any_writable_file_of(node.ino)));
        if !is_chown {
            return Ok(Some(Loss {
                change: Change::Data,
                caller,
            }));
        }
        if !chown
            && after_chown(before.perm, before.gid, caller.as_ref()).is_some()
            && !caller.as_ref().is_some_and(|c| c.owns(fsuid, before.uid))
        {
            return Err(Errno::EPERM);
        }
        let change = Change::Owner {
            old_gid: before.gid,
        };
        Ok(Some(Loss { change, caller }))
    }

    /// An access ACL of `node` about to be set or removed by the process `pid`: drops the
    /// set-group-ID bit that takes away, first, as kernel overlayfs does (the daemon's own
    /// change of the ACL would keep it: the daemon has CAP_FSETID).
    pub fn drop_set_ids_for_acl(&self, node: &Arc<Node>, pid: u32) -> Result<()> {
        let attr = self.getattr(node, None)?;
        if !has_set_ids(attr.perm) {
            return Ok(());
        }
        let caller = Caller::of(pid);
        self.drop_set_ids(node, None, caller.as_ref(), attr, Change::Acl)?;
        Ok(())
    }

    /// A change of data by the process `pid` through handle `fh` (a write the kernel flagged,
    /// `unprivileged`: from a caller without CAP_FSETID; or a truncating open): drops the
    /// set-ID bits it takes away, and makes the kernel forget the mode it cached.
    pub fn drop_set_ids_for_data(
        &self,
        node: &Arc<Node>,
        fh: u64,
        pid: u32,
        unprivileged: bool,
    ) -> Result<()> {
        let attr = self.getattr(node, Some(fh))?;
        if !has_set_ids(attr.perm) {
            return Ok(());
        }
        let mut caller = Caller::of(pid);
        if unprivileged {
            caller = caller.map(Caller::without_fsetid);
        }
        let after = self.drop_set_ids(node, Some(fh), caller.as_ref(), attr, Change::Data)?;
        if after.perm != attr.perm {
            self.invalidate_attrs(node.ino);
        }
        Ok(())
    }

    /// Drops the set-ID bits that `change` by `caller` takes from an object with attributes
    /// `attr` (a directory only for an ACL change), and returns the attributes after. The
    /// mode is read again and written under the node's mode lock, so that a chmod in between
    /// is not undone.
    fn drop_set_ids(
        &self,
        node: &Arc<Node>,
        fh: Option<u64>,
        caller: Option<&Caller>,
        attr: FileAttr,
        change: Change,
    ) -> Result<FileAttr> {
        if (attr.kind == FileType::Directory && change != Change::Acl) || !has_set_ids(attr.perm) {
            return Ok(attr);
        }
        let _mode = self.mode_lock(node);
        let attr = self.getattr(node, fh)?;
        let perm = match change {
            Change::Owner { old_gid } => after_chown(attr.perm, old_gid, caller),
            Change::Data => after_data_change(attr.perm, attr.gid, caller),
            Change::Acl => after_acl_change(attr.perm, attr.gid, caller),
        };
        let Some(perm) = perm else {
            return Ok(attr);
        };
        let req = SetAttr {
            mode: Some(u32::from(perm)),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
            ctime: None,
            fh,
        };
        self.set_attributes(node, req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(fsetid: bool, initial_ns: bool, groups: &[u32]) -> Caller {
        Caller {
            fsetid,
            fowner: false,
            initial_ns,
            sys_admin: false,
            fsgid: 1000,
            groups: groups.to_vec(),
        }
    }

    #[test]
    fn status_fields_are_read() {
        let status = "Name:\tsh\nUid:\t1000\t1000\t1000\t1000\nGid:\t100\t101\t102\t103\n\
                      Groups:\t5 27 \nCapInh:\t0\nCapEff:\t0000000000000010\n";
        let c = Caller::parse(status).unwrap();
        assert_eq!(
            c,
            Caller {
                fsetid: true,
                fowner: false,
                initial_ns: false,
                sys_admin: false,
                fsgid: 103,
                groups: vec![5, 27]
            }
        );
        let c = Caller::parse(&status.replace("0000000000000010", "00000000000000ef")).unwrap();
        assert!(!c.fsetid && c.fowner && !c.sys_admin);
        let c = Caller::parse(&status.replace("0000000000000010", "0000000000200000")).unwrap();
        assert!(c.sys_admin && !c.fsetid);
        assert!(Caller::parse("Name:\tsh\n").is_none());
        // Kernel threads act with credentials /proc does not show.
        assert!(Caller::parse(&format!("{status}Kthread:\t1\n")).is_none());
        assert!(Caller::parse(&format!("{status}Kthread:\t0\n")).is_some());
    }

    #[test]
    fn syscall_lines_are_read() {
        let high: (u64, u64) = (0x7ffd_d049_92d8, 0x7f6b_edc9_12ad);
        let low: (u64, u64) = (0xffd3_c5a0, 0xf7f7_b579);
        let cases = [
            ("64-bit read(2)", 0_i64, high, Some(false)),
            ("64-bit chown(2)", 92, high, Some(true)),
            ("64-bit fchownat(2)", 260, high, Some(true)),
            (
                "64-bit ioctl(2) or an int $0x80 lchown(2): one number",
                16,
                high,
                None,
            ),
            (
                "int $0x80 fchown32(2) from a 64-bit program",
                207,
                high,
                Some(true),
            ),
            ("32-bit chown32(2)", 212, low, Some(true)),
            ("32-bit lchown32(2)", 198, low, Some(true)),
            (
                "32-bit lchown(2) or 64-bit ioctl(2) from low addresses",
                16,
                low,
                None,
            ),
            ("32-bit write(2)", 4, low, Some(false)),
            (
                "64-bit chown(2) from low addresses",
                92,
                (0x80_0000, 0x40_1000),
                Some(true),
            ),
            ("x32 fchownat(2)", 0x4000_0000 + 260, low, Some(true)),
            ("io_uring worker: its creator's call", 16, (0, 0), None),
        ];
        for (what, nr, (sp, pc), want) in cases {
            let line =
                format!("{nr} 0x3 0x7f6bedb15000 0x20000 0x0 0xffffffff 0x0 {sp:#x} {pc:#x}\n");
            assert_eq!(chown_in_syscall_line(&line), want, "{what}");
        }
        // Outside a system call, or running.
        let outside = "-1 0x7ffdd04992d8 0x7f6bedc912ad\n";
        assert_eq!(chown_in_syscall_line(outside), Some(false));
        assert_eq!(chown_in_syscall_line("running\n"), None);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn only_calls_that_change_no_owner_or_size_are_internal() {
        let high = "0x7ffc1f8e5a38 0x7f6bedc912ad";
        let line = |nr: i64, a: [u64; 3]| {
            format!(
                "{nr} {:#x} {:#x} {:#x} 0x0 0x0 0x0 {high}\n",
                a[0], a[1], a[2]
            )
        };
        let at = 0xffff_ff9c;
        let path = 0x5555_0000;
        let truncating = [
            ("ftruncate(2)", line(77, [3, 0, 0]), Some(false)),
            ("truncate(2)", line(76, [path, 1, 0]), Some(false)),
            ("creat(2)", line(85, [path, 0o644, 0]), Some(false)),
            // touch: O_WRONLY|O_CREAT|O_NOCTTY|O_NONBLOCK
            (
                "openat(2) without O_TRUNC",
                line(257, [at, path, 0x941]),
                Some(true),
            ),
            (
                "openat(2) with O_TRUNC",
                line(257, [at, path, 0x241]),
                Some(false),
            ),
            (
                "open(2) with O_TRUNC",
                line(2, [path, 0x241, 0o644]),
                Some(false),
            ),
            ("open(2) without", line(2, [path, 0x42, 0o644]), Some(true)),
            (
                "openat2(2): flags out of sight",
                line(437, [at, path, 0x1000]),
                Some(false),
            ),
            ("utimensat(2)", line(280, [at, path, 0]), Some(true)),
            // 32-bit calls from a 64-bit program (int $0x80) show 32-bit numbers.
            (
                "32-bit ftruncate(2) from high addresses",
                line(93, [3, 2, 0]),
                Some(false),
            ),
            ("32-bit truncate64(2)", line(193, [path, 2, 0]), Some(false)),
            (
                "a kernel thread",
                "0 0x0 0x0 0x0 0x0 0x0 0x0 0x0 0x0\n".into(),
                None,
            ),
        ];
        for (what, line, want) in truncating {
            assert_eq!(surely_internal_line(&line, false, true), want, "{what}");
        }
        let owning = [
            ("fchownat(2)", line(260, [at, path, 0]), Some(false)),
            (
                "32-bit fchown32(2) from high addresses",
                line(207, [3, 0, 0]),
                Some(false),
            ),
            (
                "32-bit lchown(2) or 64-bit ioctl(2)",
                line(16, [3, 0, 0]),
                Some(false),
            ),
            (
                "openat(2): a copy-up",
                line(257, [at, path, 0x241]),
                Some(true),
            ),
            (
                "utimensat(2): a copy-up",
                line(280, [at, path, 0]),
                Some(true),
            ),
        ];
        for (what, line, want) in owning {
            assert_eq!(surely_internal_line(&line, true, false), want, "{what}");
        }
        // Both asked: either call keeps it from being internal.
        assert_eq!(
            surely_internal_line(&line(77, [3, 0, 0]), true, true),
            Some(false)
        );
        let outside = "-1 0x7ffdd04992d8 0x7f6bedc912ad\n";
        assert_eq!(surely_internal_line(outside, true, true), Some(true));
        assert_eq!(surely_internal_line("running\n", true, true), None);
    }

    #[test]
    fn data_changes_follow_the_kernel() {
        let outsider = caller(false, false, &[]);
        let member = caller(false, false, &[50]);
        // Set-user-ID always goes; set-group-ID with group execute, or for an outsider.
        assert_eq!(after_data_change(0o6755, 50, Some(&member)), Some(0o0755));
        assert_eq!(after_data_change(0o6745, 50, Some(&member)), Some(0o2745));
        assert_eq!(after_data_change(0o6745, 50, Some(&outsider)), Some(0o0745));
        assert_eq!(after_data_change(0o2745, 50, Some(&member)), None);
        assert_eq!(after_data_change(0o0755, 50, Some(&outsider)), None);
        // CAP_FSETID keeps them, but only from the initial user namespace.
        assert_eq!(
            after_data_change(0o6755, 50, Some(&caller(true, true, &[]))),
            None
        );
        assert_eq!(
            after_data_change(0o6755, 50, Some(&caller(true, false, &[]))),
            Some(0o0755)
        );
        // Nothing known about the caller: both go.
        assert_eq!(after_data_change(0o6745, 50, None), Some(0o0745));
    }

    #[test]
    fn owner_changes_follow_the_kernel() {
        let root = caller(true, true, &[]);
        // Set-user-ID goes even for a privileged caller; set-group-ID with group execute.
        assert_eq!(after_chown(0o6755, 50, Some(&root)), Some(0o0755));
        assert_eq!(after_chown(0o6745, 50, Some(&root)), Some(0o2745));
        // Without group execute, only for a caller outside the group and without CAP_FSETID.
        assert_eq!(
            after_chown(0o2745, 50, Some(&caller(false, false, &[50]))),
            None
        );
        assert_eq!(
            after_chown(0o2745, 50, Some(&caller(false, false, &[]))),
            Some(0o0745)
        );
        assert_eq!(
            after_chown(0o2745, 50, Some(&caller(true, false, &[]))),
            None
        );
        assert_eq!(after_chown(0o0644, 50, None), None);
        // The overflow group (an unmapped one) is nobody's.
        let overflow = caller(false, false, &[65534]);
        assert_eq!(after_chown(0o2745, 65534, Some(&overflow)), Some(0o0745));
        assert!(overflow.owns(1000, 1000) && !overflow.owns(1000, 0));
        assert!(!overflow.owns(65534, 65534));
        assert!(has_set_ids(0o2000) && has_set_ids(0o4000) && !has_set_ids(0o1777));
    }

    #[test]
    fn acl_changes_follow_the_kernel() {
        // Set-group-ID goes for a caller outside the group without CAP_FSETID, group execute
        // or not; set-user-ID stays.
        let outsider = caller(false, false, &[]);
        assert_eq!(after_acl_change(0o6755, 50, Some(&outsider)), Some(0o4755));
        assert_eq!(after_acl_change(0o2745, 50, Some(&outsider)), Some(0o0745));
        assert_eq!(after_acl_change(0o2755, 50, None), Some(0o0755));
        assert_eq!(
            after_acl_change(0o2755, 50, Some(&caller(false, false, &[50]))),
            None
        );
        assert_eq!(
            after_acl_change(0o2755, 50, Some(&caller(true, false, &[]))),
            None
        );
        assert_eq!(after_acl_change(0o4755, 50, Some(&outsider)), None);
    }
}
