//! Attributes: getattr/setattr, readlink, xattrs, inode flags and statfs of the merged view.

use std::borrow::Cow;
use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{FileAttr, FileType, INodeNo, TimeOrNow};

use crate::copy_up::{Data, ts};
use crate::inode::Node;
use crate::lookup::Loc;
use crate::protect;
use crate::sys::{self, Errno, Result, Stat};
use crate::union::Union;
use crate::whiteout;

/// A setattr request, already decoded.
#[derive(Debug, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<TimeOrNow>,
    pub mtime: Option<TimeOrNow>,
    /// The change time the kernel sends along (writeback caching): the time of the change.
    pub ctime: Option<SystemTime>,
    pub fh: Option<u64>,
}

/// An xattr answer: the size asked for, or the bytes.
pub enum XattrReply {
    Size(u32),
    Data(Vec<u8>),
}

fn xattr_reply(data: Vec<u8>, size: u32) -> Result<XattrReply> {
    if size == 0 {
        Ok(XattrReply::Size(data.len() as u32))
    } else if data.len() > size as usize {
        Err(Errno::ERANGE)
    } else {
        Ok(XattrReply::Data(data))
    }
}

/// A layer's time (a stat's seconds and nanoseconds). Nanoseconds outside 0..1e9, which a
/// filesystem image can hold (btrfs passes its on-disk ones on), are clamped into it.
pub fn system_time(sec: i64, nsec: i64) -> SystemTime {
    let nsec = Duration::from_nanos(nsec.clamp(0, 999_999_999) as u64);
    let t = if sec >= 0 {
        UNIX_EPOCH.checked_add(Duration::from_secs(sec as u64))
    } else {
        UNIX_EPOCH.checked_sub(Duration::from_secs(sec.unsigned_abs()))
    };
    // Every i64 second with nanoseconds below 1e9 is a SystemTime: the fallback is not reached.
    t.and_then(|t| t.checked_add(nsec)).unwrap_or(UNIX_EPOCH)
}

/// A time from a setattr request, as the kernel gave it.
fn request_time(t: &TimeOrNow) -> libc::timespec {
    match t {
        TimeOrNow::Now => ts(0, sys::UTIME_NOW),
        TimeOrNow::SpecificTime(t) => {
            let (sec, nsec) = crate::fuse::reply::unix_time(*t);
            ts(sec, i64::from(nsec))
        }
    }
}

pub fn file_type(kind: u32) -> FileType {
    match kind {
        libc::S_IFDIR => FileType::Directory,
        libc::S_IFLNK => FileType::Symlink,
        libc::S_IFCHR => FileType::CharDevice,
        libc::S_IFBLK => FileType::BlockDevice,
        libc::S_IFIFO => FileType::NamedPipe,
        libc::S_IFSOCK => FileType::Socket,
        _ => FileType::RegularFile,
    }
}

impl Union {
    /// Stat of a node's visible object (through an open handle when the node has no name).
    pub fn stat_node(&self, node: &Node, fh: Option<u64>) -> Result<Stat> {
        if let Some(copy) = node.moved_to() {
            return self.stat_split(node, fh, &copy);
        }
        match self.stat_in(node, self.top_loc(node)) {
            Ok(st) => Ok(st),
            // No name left (deleted while open, or a split node whose name moved): its open
            // files answer; with none, ESTALE makes the kernel look a split node's name up again.
            Err(e) if matches!(e.code(), libc::ENOENT | libc::ESTALE) => {
                let nameless = || match self.fd_of_nameless(node, fh) {
                    Some(fd) => Some(self.stat_fd(fd.as_fd())),
                    None => node.held_stat().map(Ok),
                };
                if let Some(r) = nameless() {
                    return r;
                }
                // A removal under way (the name gone, what it keeps not recorded yet): a
                // caller whose path walk reached the file before gets its attributes, as on
                // ext4, not ENOENT (a permission check of an open reads them, and the open
                // failed).
                if e.code() == libc::ENOENT
                    && !node.is_dir()
                    && self.await_removal(node)
                    && let Some(r) = nameless()
                {
                    return r;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    /// Stat of a split node (see `Node::split`): its upper copy's, as on kernel overlayfs,
    /// except for the size, which stays that of the lower file its open files read (the
    /// kernel passes them through to it): a reader of one never finds less data than the
    /// size it was told.
    fn stat_split(&self, node: &Node, fh: Option<u64>, copy: &OwnedFd) -> Result<Stat> {
        let mut st = self.stat_fd(copy.as_fd())?;
        let named = fh
            .and_then(|fh| self.handles.file(fh))
            .filter(|h| std::ptr::eq(&*h.node, node));
        if let Some(h) = named.or_else(|| self.handles.any_file_of(node.ino))
            && let Ok(read) = sys::fstat(h.fd().as_fd())
        {
            st.st_size = read.st_size;
            st.st_blocks = read.st_blocks;
        }
        Ok(st)
    }

    /// Stat of an object by an fd of it, as the view shows it (`apply_override`).
    pub(crate) fn stat_fd(&self, fd: std::os::fd::BorrowedFd<'_>) -> Result<Stat> {
        let mut st = sys::fstat(fd)?;
        if self.override_xattr().is_some() {
            self.apply_override(fd, c"", &mut st);
        }
        Ok(st)
    }

    /// An fd of a node that has no name left: an open file's of the upper object, else any
    /// open file's, else the object it showed when its name went (`Node::held`).
    pub(crate) fn fd_of_nameless(&self, node: &Node, fh: Option<u64>) -> Option<Arc<OwnedFd>> {
        self.upper_fd_of_open(node, fh)
            .or_else(|| {
                fh.and_then(|fh| self.handles.file(fh))
                    .or_else(|| self.handles.any_file_of(node.ino))
                    .map(|h| h.fd())
            })
            .or_else(|| node.held())
    }

    /// The upper object a node with no name left was removed with, if it had one then.
    pub(crate) fn held_upper(&self, node: &Node) -> Option<Arc<OwnedFd>> {
        let held = node.held()?;
        // A removed node is never copied up: an upper object now was the one held.
        node.state().upper?;
        Some(held)
    }

    /// A setattr of the times alone of a file whose last name went and whose object nothing
    /// reaches any more (no open file of it, only its attributes kept: `Held::Stat`). The
    /// kernel sends these itself: under the write-back cache it keeps a file's times and
    /// writes them back, also of a file unlinked meanwhile (the unlink moves its ctime), at
    /// the close of a descriptor opened on it before; failing it would fail that close. The
    /// object is gone: the times go to the attributes kept of it, as ext4 changes an
    /// unlinked inode. None for any other node or change (which fail as before: README).
    pub(crate) fn setattr_removed(&self, node: &Node, req: &SetAttr) -> Option<Result<FileAttr>> {
        let times_only = req.mode.is_none()
            && req.uid.is_none()
            && req.gid.is_none()
            && req.size.is_none()
            && (req.atime.is_some() || req.mtime.is_some() || req.ctime.is_some());
        if !times_only || node.is_dir() || !node.state().is_unlinked() {
            return None;
        }
        let mut st = node.held_stat()?;
        if self.upper_fd_of_open(node, req.fh).is_some() {
            return None;
        }
        let now = crate::fuse::reply::unix_time(SystemTime::now());
        let time = |t: &TimeOrNow| match t {
            TimeOrNow::Now => now,
            TimeOrNow::SpecificTime(t) => crate::fuse::reply::unix_time(*t),
        };
        if let Some(t) = &req.atime {
            (st.st_atime, st.st_atime_nsec) = (time(t).0, i64::from(time(t).1));
        }
        if let Some(t) = &req.mtime {
            (st.st_mtime, st.st_mtime_nsec) = (time(t).0, i64::from(time(t).1));
        }
        let ctime = req.ctime.map_or(now, crate::fuse::reply::unix_time);
        (st.st_ctime, st.st_ctime_nsec) = (ctime.0, i64::from(ctime.1));
        node.update_held_stat(st);
        Some(self.attr(node, &st))
    }

    /// After reaching `node`'s object by name failed with `e`: if the node has no name left
    /// (an unnamed temporary file, or an object deleted while in use), an fd of it; for a
    /// `change` only the upper object's, since a read-only handle may still be on a lower
    /// file. Otherwise `e`.
    pub(crate) fn nameless_fd(
        &self,
        node: &Node,
        fh: Option<u64>,
        change: bool,
        e: Errno,
    ) -> Result<Arc<OwnedFd>> {
        if !matches!(e.code(), libc::ENOENT | libc::ESTALE) || !node.state().links.is_empty() {
            return Err(e);
        }
        match (node.is_dir(), change) {
            (true, true) => self.held_upper(node),
            (true, false) => node.held(),
            (false, true) => self
                .upper_fd_of_open(node, fh)
                .or_else(|| self.held_upper(node)),
            (false, false) => self.fd_of_nameless(node, fh),
        }
        .ok_or(e)
    }

    /// `with_object`, also for a node with no name left: through `nameless_fd` (`f` then
    /// gets the object's fd and an empty name).
    pub(crate) fn with_object_or_fd<T>(
        &self,
        node: &Node,
        loc: Loc,
        fh: Option<u64>,
        change: bool,
        mut f: impl FnMut(std::os::fd::BorrowedFd<'_>, &std::ffi::CStr) -> Result<T>,
    ) -> Result<T> {
        match self.with_object(node, loc, &mut f) {
            Err(e) => f(self.nameless_fd(node, fh, change, e)?.as_fd(), c""),
            r => r,
        }
    }

    /// The birth time of the object the view shows for `node`, where its layer records one.
    pub fn btime(&self, node: &Node, fh: Option<u64>) -> Option<(i64, u32)> {
        self.with_object_or_fd(node, self.top_loc(node), fh, false, sys::btime_at)
            .ok()
            .flatten()
    }

    /// The attributes the merged view reports for `node` whose object has stat `st`.
    pub fn attr(&self, node: &Node, st: &Stat) -> Result<FileAttr> {
        if node.extra_if_made().is_some_and(|e| e.link_drop_pending()) {
            self.invalidate_attrs(node.ino);
        }
        // Owner bits granted for a moment (`grant`): the view shows the mode from before.
        let mut shown = *st;
        if let Some(mode) = node.shown_mode() {
            shown.st_mode = (st.st_mode & libc::S_IFMT) | mode;
        }
        let st = &shown;
        let mut nlink = st.st_nlink as u32;
        if node.is_dir() {
            if self.opts.static_nlink {
                nlink = 1;
            } else {
                // A removed directory shows the link count of the object it was (0 for a
                // removed upper directory, as on ext4).
                let merged = {
                    let s = node.state();
                    s.lowers.len() + usize::from(s.upper.is_some()) > 1
                        && (!s.is_unlinked() || node.is_root())
                };
                if merged {
                    nlink = match self.subdir_count(node) {
                        Ok(n) => 2 + n as u32,
                        // A lower directory the daemon may not read (without privileges, see
                        // `grant`): the object's own count.
                        Err(e) if e.code() == libc::EACCES => nlink,
                        Err(e) => return Err(e),
                    };
                }
            }
        }
        let mut blocks = st.st_blocks as u64;
        if let Some(e) = node.extra_if_made() {
            // With the write-back cache, data the kernel holds for a file open for writing is
            // on no disk yet, and programs take a file of no blocks at all for one hole (GNU
            // tar --sparse archived such a file as zeros). ext4 counts the blocks it reserved
            // for cached data; the daemon cannot see that data, so it shows one block.
            if blocks == 0
                && self.writeback_active()
                && node.kind() == libc::S_IFREG
                && e.has_writable_opens()
            {
                blocks = 1;
            }
            e.note_sent_mtime(st);
        }
        let map = &self.opts.idmap;
        Ok(FileAttr {
            ino: INodeNo(node.ino),
            size: st.st_size as u64,
            blocks,
            atime: system_time(st.st_atime, st.st_atime_nsec),
            mtime: system_time(st.st_mtime, st.st_mtime_nsec),
            ctime: system_time(st.st_ctime, st.st_ctime_nsec),
            crtime: UNIX_EPOCH,
            kind: file_type(node.kind()),
            perm: (st.st_mode & 0o7777) as u16,
            nlink,
            uid: map.uid_to_view(st.st_uid),
            gid: map.gid_to_view(st.st_gid),
            rdev: sys::encode_dev_u32(whiteout::view_rdev(st)),
            blksize: st.st_blksize as u32,
            flags: 0,
        })
    }

    pub fn getattr(&self, node: &Node, fh: Option<u64>) -> Result<FileAttr> {
        self.attr_outside_grants(node, || self.stat_node(node, fh))
    }

    /// The attributes of `node` from `stat`, made outside any grant of owner bits on it
    /// (`Node::read_outside_grants`).
    fn attr_outside_grants(
        &self,
        node: &Node,
        stat: impl Fn() -> Result<Stat>,
    ) -> Result<FileAttr> {
        let (mut st, shown) = node.read_outside_grants(stat)?;
        if let Some(mode) = shown {
            st.st_mode = (st.st_mode & libc::S_IFMT) | mode;
        }
        self.attr(node, &st)
    }

    pub fn setattr(&self, node: &Arc<Node>, req: SetAttr) -> Result<FileAttr> {
        self.check_setattr_prot(node, &req)?;
        let _mode = req.mode.map(|_| self.mode_lock(node));
        self.set_attributes(node, req)
    }

    /// What append-only and immutable flags refuse of a setattr (see `protect`): a change of
    /// owner, mode, size or times, except both times to now (`touch`), which only an
    /// immutable object refuses.
    fn check_setattr_prot(&self, node: &Node, req: &SetAttr) -> Result<()> {
        let now = |t: &Option<TimeOrNow>| matches!(t, Some(TimeOrNow::Now));
        let times = req.atime.is_some() || req.mtime.is_some();
        let others = req.mode.is_some() || req.uid.is_some() || req.gid.is_some();
        if !times && !others && req.size.is_none() {
            return Ok(());
        }
        // With writeback caching the kernel sends a touch's mtime as a time, not as "now":
        // the time of the change, which it sends as the ctime too. It also flushes the mtime
        // it kept of a file written through it with the file's handle (a caller's utimes
        // never carries one): writes to an append-only file go on.
        let touch = now(&req.atime)
            && match (&req.mtime, req.ctime) {
                (Some(TimeOrNow::Now), _) => true,
                (Some(TimeOrNow::SpecificTime(m)), Some(c)) => *m == c,
                _ => false,
            };
        let flush = req.fh.is_some()
            && !others
            && req.size.is_none()
            && req.atime.is_none()
            && matches!(req.mtime, Some(TimeOrNow::SpecificTime(_)));
        if flush {
            return Ok(());
        }
        let p = self.prot(node)?;
        // ftruncate(2) through a file open for writing (with writeback caching the kernel
        // sends the mtime along): refused for an append-only file only. Kernel overlayfs lets
        // it through for an immutable file opened before the flag was set, as writes.
        if req.size.is_some() && req.fh.is_some() && !others && req.atime.is_none() {
            return protect::check_ftruncate(p);
        }
        if others || req.size.is_some() || (times && !touch) {
            protect::check_change(p)
        } else {
            protect::check_touch(p)
        }
    }

    /// `setattr` for a caller that holds the node's mode lock when it changes the mode.
    pub(crate) fn set_attributes(&self, node: &Arc<Node>, req: SetAttr) -> Result<FileAttr> {
        if self.layers.read_only() {
            return Err(Errno::EROFS);
        }
        // The writeback cache flushes the kernel's cached times (mtime alone) when it touches an
        // inode's ctime, e.g. after unlinking another name of a lower hard link. A flush that
        // changes nothing must not copy the object up.
        if let (None, None, None, None, None, Some(TimeOrNow::SpecificTime(mtime))) =
            (req.mode, req.uid, req.gid, req.size, req.atime, req.mtime)
            && node.state().upper.is_none()
        {
            let cur = self.getattr(node, req.fh)?;
            if cur.mtime == mtime {
                return Ok(cur);
            }
        }
        let data = match req.size {
            Some(0) => Data::Nothing,
            Some(n) => Data::UpTo(n),
            None => Data::All,
        };
        self.copy_up_with(node, data)?;
        // A file open for writing (tar, cp -p and install set owner, mode and times of the file
        // they have just written, through its fd) is reached through its handle: no path walk,
        // and the object is a regular file.
        let handle = self.writable_handle(node, req.fh);
        let via_handle = handle.is_some();
        let fd: Arc<OwnedFd> = match handle {
            Some(h) => h.fd(),
            None => self.upper_object(node, req.fh)?,
        };
        let f = fd.as_fd();
        // A copy-up into this directory may grant its owner access for a moment (see
        // `grant`): the directory lock keeps the two apart.
        let _dir = (req.mode.is_some() && node.is_dir()).then(|| node.lock_dir());
        let changed = self.apply_changes(f, via_handle, &req);
        if node.is_split() {
            // Also after a failure part way: an earlier change may have landed.
            self.changed_through_split(node);
            changed?;
            return self.getattr(node, req.fh);
        }
        changed?;
        self.attr_outside_grants(node, || self.stat_fd(f))
    }

    /// The node's upper object (copied up), as an `O_PATH` fd. With no name left (deleted
    /// while in use, or a split node): an open file of the upper object (a handle still on
    /// the lower object it was copied from must not change that), or the upper object it was
    /// removed with.
    pub(crate) fn upper_object(&self, node: &Arc<Node>, fh: Option<u64>) -> Result<Arc<OwnedFd>> {
        match self.open_in(node, Loc::Upper, libc::O_PATH) {
            Ok(fd) => Ok(Arc::new(fd)),
            Err(e) if matches!(e.code(), libc::ENOENT | libc::ESTALE) => self
                .upper_fd_of_open(node, fh)
                .or_else(|| self.held_upper(node))
                .ok_or(e),
            Err(e) => Err(e),
        }
    }

    /// The changes `req` asks for, made on `f` (the node's upper object; a writable handle's
    /// file when `via_handle`).
    fn apply_changes(
        &self,
        f: std::os::fd::BorrowedFd<'_>,
        via_handle: bool,
        req: &SetAttr,
    ) -> Result<()> {
        let real_kind = if via_handle {
            libc::S_IFREG
        } else {
            sys::file_type(sys::fstat(f)?.st_mode)
        };
        let overridden = self.override_xattr().is_some()
            && matches!(real_kind, libc::S_IFREG | libc::S_IFDIR)
            && (req.uid.is_some() || req.gid.is_some() || req.mode.is_some());
        if overridden {
            self.set_override(f, real_kind, req)?;
        } else if req.uid.is_some() || req.gid.is_some() {
            let map = &self.opts.idmap;
            let uid = match req.uid {
                Some(u) => map.uid_to_disk(u).ok_or(Errno::EINVAL)?,
                None => u32::MAX,
            };
            let gid = match req.gid {
                Some(g) => map.gid_to_disk(g).ok_or(Errno::EINVAL)?,
                None => u32::MAX,
            };
            match sys::fchown(f, uid, gid) {
                Err(e) if e.code() == libc::EPERM && map.squashes() => {}
                r => r?,
            }
        }
        if let (Some(mode), false) = (req.mode, overridden) {
            if via_handle {
                sys::fchmod(f, mode & 0o7777)?;
            } else {
                sys::fchmod_path(f, mode & 0o7777)?;
            }
        }
        if let Some(size) = req.size {
            if via_handle {
                sys::ftruncate(f, size)?;
            } else {
                let w = sys::reopen(f, libc::O_WRONLY)?;
                sys::ftruncate(w.as_fd(), size)?;
            }
        }
        if req.atime.is_some() || req.mtime.is_some() {
            let omit = ts(0, sys::UTIME_OMIT);
            let times = [
                req.atime.as_ref().map(request_time).unwrap_or(omit),
                req.mtime.as_ref().map(request_time).unwrap_or(omit),
            ];
            sys::utimensat(f, c"", &times, libc::AT_EMPTY_PATH)?;
        }
        let nothing = req.uid.is_none()
            && req.gid.is_none()
            && req.mode.is_none()
            && req.size.is_none()
            && req.atime.is_none()
            && req.mtime.is_none();
        if nothing {
            // chown(2) to -1, -1, which the kernel sends as nothing to change: the change time
            // still moves, as on ext4 and kernel overlayfs.
            sys::fchown(f, u32::MAX, u32::MAX)?;
        }
        Ok(())
    }

    /// chown/chmod with `xattr_permissions`: the new owner and mode go into the override
    /// xattr; the real object keeps the daemon's owner and stays usable by it.
    fn set_override(
        &self,
        f: std::os::fd::BorrowedFd<'_>,
        real_kind: u32,
        req: &SetAttr,
    ) -> Result<()> {
        let xattr = self.override_xattr().ok_or(Errno::EIO)?;
        let mut o = self.current_override(f, xattr)?;
        let map = &self.opts.idmap;
        if let Some(u) = req.uid {
            o.uid = map.uid_to_disk(u).ok_or(Errno::EINVAL)?;
        }
        if let Some(g) = req.gid {
            o.gid = map.gid_to_disk(g).ok_or(Errno::EINVAL)?;
        }
        if let Some(mode) = req.mode {
            o.perm = mode & 0o7777;
            crate::override_stat::chmod_real(f, real_kind, mode)?;
        }
        sys::setxattr(f, xattr, o.format().as_bytes(), 0)
    }

    /// The override of the real object `f` that shows what it shows now (its stat with the
    /// override xattr `xattr` applied, if it has one).
    pub(crate) fn current_override(
        &self,
        f: std::os::fd::BorrowedFd<'_>,
        xattr: &std::ffi::CStr,
    ) -> Result<crate::override_stat::Override> {
        use crate::override_stat::Override;
        let mut view = sys::fstat(f)?;
        let current = sys::getxattr_vec(f, xattr)?.and_then(|v| Override::parse(&v));
        if let Some(o) = current {
            o.apply(&mut view);
        }
        let mut o = Override::of(&view);
        o.kind = current.and_then(|c| c.kind);
        Ok(o)
    }

    /// An access ACL set with `xattr_permissions`, where the mode shown is the override's: the
    /// permission bits the ACL gives go there, as a filesystem's `posix_acl_update_mode` puts
    /// them in the inode's mode (`cp -a` and `cp -p` set a file's mode this way), keeping the
    /// set-ID and sticky bits. An ACL that the bits say all of is not stored, as on ext4.
    fn set_access_acl_under_override(
        &self,
        node: &Arc<Node>,
        xattr: &std::ffi::CStr,
        value: &[u8],
    ) -> Result<()> {
        let (bits, bits_say_all) = crate::acl::access_mode(value).ok_or(Errno::EINVAL)?;
        self.copy_up(node)?;
        let _mode = self.mode_lock(node);
        let _dir = node.is_dir().then(|| node.lock_dir());
        let fd = self.upper_object(node, None)?;
        let f = fd.as_fd();
        let real_kind = sys::file_type(sys::fstat(f)?.st_mode);
        if !matches!(real_kind, libc::S_IFREG | libc::S_IFDIR) {
            // The real object's own mode is the one shown (see `apply_changes`).
            return sys::setxattr(f, crate::acl::ACCESS, value, 0);
        }
        let mut o = self.current_override(f, xattr)?;
        o.perm = (o.perm & 0o7000) | bits;
        if bits_say_all {
            match sys::removexattr(f, crate::acl::ACCESS) {
                Err(e) if e.code() == libc::ENODATA => {}
                r => r?,
            }
        } else {
            sys::setxattr(f, crate::acl::ACCESS, value, 0)?;
        }
        crate::override_stat::chmod_real(f, real_kind, bits)?;
        sys::setxattr(f, xattr, o.format().as_bytes(), 0)?;
        self.changed_through_split(node);
        Ok(())
    }

    pub fn readlink(&self, node: &Node) -> Result<Vec<u8>> {
        if node.kind() != libc::S_IFLNK {
            return Err(Errno::EINVAL);
        }
        self.with_object_or_fd(node, self.top_loc(node), None, false, sys::readlinkat)
            .map_err(|e| self.stale_if_removed(node, e))
    }

    /// The name a view's xattr is stored under (see `whiteout::escape_xattr` and
    /// `override_stat::isolated_name`); ENOTSUP for a name private to the daemon.
    fn stored_xattr_name(&self, name: &OsStr) -> Result<std::ffi::CString> {
        if let Some(real) = self
            .isolated_name(name.as_bytes())
            .or_else(|| whiteout::escape_xattr(name.as_bytes(), self.layers.format))
        {
            // A name the escape makes too long for the layers is refused, as kernel
            // overlayfs refuses it (XATTR_NAME_MAX is 255).
            if real.len() > 255 {
                return Err(Errno::ENOTSUP);
            }
            return sys::cstr(OsStr::from_bytes(&real));
        }
        if self.is_private_xattr(name.as_bytes()) {
            return Err(Errno::ENOTSUP);
        }
        sys::cstr(name)
    }

    pub fn getxattr(&self, node: &Node, name: &OsStr, size: u32) -> Result<XattrReply> {
        let cname = self.stored_xattr_name(name)?;
        let access_acl = *cname == *crate::acl::ACCESS;
        // With `xattr_permissions` the mode shown is the override's, and an access ACL shows
        // it, as a chmod puts it into the ACL (`acl::set_mode`).
        let override_xattr = self.override_xattr().filter(|_| access_acl);
        let read = || {
            self.with_object_or_fd(node, self.top_loc(node), None, false, |d, p| {
                let value = sys::getxattr_vec_at(d, p, &cname)?;
                match (value, override_xattr) {
                    (Some(mut acl), Some(xattr)) => {
                        let o = sys::getxattr_vec_at(d, p, xattr)?
                            .and_then(|v| crate::override_stat::Override::parse(&v));
                        if let Some(o) = o {
                            crate::acl::set_mode(&mut acl, o.perm);
                        }
                        Ok(Some(acl))
                    }
                    (v, _) => Ok(v),
                }
            })
        };
        // Otherwise owner bits granted for a moment (`grant`) would show in the access ACL's
        // owner entry: it shows the mode from before, as a stat does.
        let value = if access_acl && override_xattr.is_none() {
            node.read_outside_grants(read).map(|read| match read {
                (Some(mut acl), Some(mode)) => {
                    crate::acl::set_mode(&mut acl, mode);
                    Some(acl)
                }
                (v, _) => v,
            })
        } else {
            read()
        };
        let value = match value {
            // A layer without POSIX ACLs (squashfs) holds none: "not supported" there is "no
            // ACL", as the kernel's own ACL code (and kernel overlayfs) takes it. Passed on,
            // it would fail every permission check that consults the ACL.
            Err(e) if e.code() == libc::EOPNOTSUPP && crate::acl::is_acl_name(cname.to_bytes()) => {
                None
            }
            r => r?,
        }
        .ok_or(Errno::ENODATA)?;
        let value = self.acl_ids_to_view(&cname, value);
        xattr_reply(value, size)
    }

    /// With `uidmapping`/`gidmapping`, the ids an ACL names are shown as the view's ids, as
    /// owners are (an id without a mapping as the overflow id).
    fn acl_ids_to_view(&self, name: &CStr, mut value: Vec<u8>) -> Vec<u8> {
        if !crate::acl::is_acl_name(name.to_bytes()) {
            return value;
        }
        if let Some(v) = crate::acl::without_unmapped(&value) {
            value = v;
        }
        let map = &self.opts.idmap;
        if map.maps_ranges() {
            let user = |id| Some(map.acl_uid_to_view(id));
            let group = |id| Some(map.acl_gid_to_view(id));
            crate::acl::map_ids(&mut value, user, group);
        }
        value
    }

    /// The ACL `value` set through the view, with the ids it names stored as on-disk ids;
    /// EINVAL for an id without a mapping (as for a chown to one).
    fn acl_ids_to_disk<'a>(&self, name: &CStr, value: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        let map = &self.opts.idmap;
        if !map.maps_ranges() || !crate::acl::is_acl_name(name.to_bytes()) {
            return Ok(Cow::Borrowed(value));
        }
        let mut v = value.to_vec();
        let user = |id| map.uid_to_disk(id);
        let group = |id| map.gid_to_disk(id);
        match crate::acl::map_ids(&mut v, user, group) {
            true => Ok(Cow::Owned(v)),
            false => Err(Errno::EINVAL),
        }
    }

    /// The names of a node's xattrs, less the private ones. `trusted.*` names are listed
    /// only when `may_list_trusted` says the caller has CAP_SYS_ADMIN (asked only when there
    /// is one), as ext4 and kernel overlayfs list them: the daemon itself reads them all.
    pub fn listxattr(
        &self,
        node: &Node,
        size: u32,
        may_list_trusted: impl FnOnce() -> bool,
    ) -> Result<XattrReply> {
        let names =
            self.with_object_or_fd(node, self.top_loc(node), None, false, sys::listxattr_vec_at)?;
        let mut may_list_trusted = Some(may_list_trusted);
        let mut trusted = None;
        let mut out = Vec::new();
        for n in names {
            let view = match self
                .isolated_view_name(n.as_bytes())
                .map(<[u8]>::to_vec)
                .or_else(|| whiteout::unescape_xattr(n.as_bytes(), self.layers.format))
            {
                Some(view) => view,
                None if self.is_private_xattr(n.as_bytes()) => continue,
                None => n.into_encoded_bytes(),
            };
            if view.starts_with(b"trusted.")
                && !*trusted.get_or_insert_with(|| may_list_trusted.take().is_some_and(|f| f()))
            {
                continue;
            }
            out.extend_from_slice(&view);
            out.push(0);
        }
        xattr_reply(out, size)
    }

    /// As kernel overlayfs: an ACL is set or removed only where the upper holds ACLs and,
    /// on a file not yet copied up, where its layer's filesystem can set one (squashfs and
    /// erofs cannot, see `acl::fs_takes_acls`); otherwise EOPNOTSUPP, before the file is
    /// copied up. The request handlers check this before anything changes, set-ID bits
    /// included. (ACL names are stored as they are: no escape applies to them.)
    pub fn check_acl_settable(&self, node: &Node, name: &OsStr) -> Result<()> {
        if !crate::acl::is_acl_name(name.as_bytes()) || self.layers.read_only() {
            return Ok(());
        }
        let settable = self.layers.upper_acls
            && match self.top_loc(node) {
                Loc::Lower(i) => self.layers.lower(i).takes_acls,
                Loc::Upper => true,
            };
        if settable {
            Ok(())
        } else {
            Err(Errno::EOPNOTSUPP)
        }
    }

    pub fn setxattr(&self, node: &Arc<Node>, name: &OsStr, value: &[u8], flags: i32) -> Result<()> {
        if self.layers.read_only() {
            return Err(Errno::EROFS);
        }
        let cname = self.stored_xattr_name(name)?;
        let value = &*self.acl_ids_to_disk(&cname, value)?;
        if let Some(xattr) = self.override_xattr()
            && *cname == *crate::acl::ACCESS
        {
            // (The kernel's own ACL code takes no XATTR_CREATE or XATTR_REPLACE either.)
            return self.set_access_acl_under_override(node, xattr, value);
        }
        self.copy_up(node)?;
        // An access ACL sets the mode (see `set_attributes`).
        let _dir = (node.is_dir() && *cname == *crate::acl::ACCESS).then(|| node.lock_dir());
        self.with_object_or_fd(node, Loc::Upper, None, true, |d, p| {
            sys::setxattr_at(d, p, &cname, value, flags)
        })?;
        self.changed_through_split(node);
        Ok(())
    }

    pub fn removexattr(&self, node: &Arc<Node>, name: &OsStr) -> Result<()> {
        if self.layers.read_only() {
            return Err(Errno::EROFS);
        }
        let cname = self.stored_xattr_name(name)?;
        if node.state().upper.is_none() {
            // Nothing to remove: no copy-up, as kernel overlayfs.
            self.with_object_or_fd(node, self.top_loc(node), None, false, |d, p| {
                sys::getxattr_at(d, p, &cname, &mut [])
            })?;
        }
        self.copy_up(node)?;
        self.with_object_or_fd(node, Loc::Upper, None, true, |d, p| {
            sys::removexattr_at(d, p, &cname)
        })?;
        self.changed_through_split(node);
        Ok(())
    }

    /// The inode-flag ioctls (`lsattr`, `chattr`: FS_IOC_GETFLAGS, FS_IOC_SETFLAGS,
    /// FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR), which the kernel forwards for regular files and
    /// directories. Flags are read from the object the view shows and set on its upper copy
    /// (made first), except append-only and immutable: those are kept in the copy's
    /// `overlay.protattr` and enforced by the daemon, as kernel overlayfs does (`protect`).
    /// The kernel has checked that the caller may change them (CAP_LINUX_IMMUTABLE) against
    /// the flags this reports. Any other ioctl is ENOTTY, as in kernel overlayfs. Returns the
    /// bytes the ioctl hands back.
    pub fn inode_flags_ioctl(&self, node: &Arc<Node>, cmd: u32, input: &[u8]) -> Result<Vec<u8>> {
        match cmd {
            sys::FS_IOC_GETFLAGS => {
                let fd = self.open_for_ioctl(node, self.top_loc(node))?;
                let flags = sys::get_inode_flags(fd.as_fd())?;
                let flags = flags | protect::INODE.to(self.prot(node)?);
                Ok(flags.to_ne_bytes().to_vec())
            }
            sys::FS_IOC_FSGETXATTR => {
                let fd = self.open_for_ioctl(node, self.top_loc(node))?;
                let mut fsx = sys::get_fsxattr(fd.as_fd())?;
                let xflags = xflags_of(&fsx) | protect::XFLAGS.to(self.prot(node)?);
                fsx[..4].copy_from_slice(&xflags.to_ne_bytes());
                Ok(fsx.to_vec())
            }
            sys::FS_IOC_SETFLAGS | sys::FS_IOC_FSSETXATTR => {
                if self.layers.read_only() {
                    return Err(Errno::EROFS);
                }
                let fsx: Option<[u8; sys::FSXATTR_SIZE]> = if cmd == sys::FS_IOC_FSSETXATTR {
                    let fsx = input.get(..sys::FSXATTR_SIZE).ok_or(Errno::EINVAL)?;
                    Some(fsx.try_into().map_err(|_| Errno::EINVAL)?)
                } else {
                    None
                };
                let flags = match fsx {
                    Some(_) => 0,
                    None => {
                        let flags = input.get(..4).ok_or(Errno::EINVAL)?;
                        u32::from_ne_bytes(flags.try_into().map_err(|_| Errno::EINVAL)?)
                    }
                };
                self.copy_up(node)?;
                let fd = self.open_for_ioctl(node, Loc::Upper)?;
                let f = fd.as_fd();
                match fsx {
                    None => {
                        self.write_prot(node, f, protect::INODE.of(flags))?;
                        // Real flags are set only where they change, so that protection
                        // flags work on an upper filesystem without inode flags too.
                        let real = protect::INODE.strip(flags);
                        if sys::get_inode_flags(f).ok() != Some(real) {
                            sys::set_inode_flags(f, real)?;
                        }
                    }
                    Some(mut fsx) => {
                        let xflags = xflags_of(&fsx);
                        self.write_prot(node, f, protect::XFLAGS.of(xflags))?;
                        fsx[..4].copy_from_slice(&protect::XFLAGS.strip(xflags).to_ne_bytes());
                        if sys::get_fsxattr(f).ok() != Some(fsx) {
                            sys::set_fsxattr(f, &fsx)?;
                        }
                    }
                }
                // The change time moved.
                self.invalidate_attrs(node.ino);
                Ok(Vec::new())
            }
            _ => Err(Errno::ENOTTY),
        }
    }

    /// An fd of a node's object in one layer that the flag ioctls accept (not O_PATH).
    pub(crate) fn open_for_ioctl(&self, node: &Node, loc: Loc) -> Result<OwnedFd> {
        let flags = if node.is_dir() {
            libc::O_RDONLY | libc::O_DIRECTORY
        } else {
            libc::O_RDONLY | libc::O_NONBLOCK
        };
        match self.open_in(node, loc, flags) {
            // No name left (deleted while open, or a split node): through an open file of it.
            Err(e) => {
                let fd = self.nameless_fd(node, None, loc == Loc::Upper, e)?;
                sys::reopen(fd.as_fd(), flags)
            }
            r => r,
        }
    }

    pub fn statfs(&self) -> Result<libc::statvfs> {
        let root = match &self.layers.upper {
            Some(u) => u.root(),
            None => self.layers.lowers[0].root(),
        };
        sys::fstatvfs(root)
    }
}

/// `fsx_xflags` of a `struct fsxattr`.
fn xflags_of(fsx: &[u8; sys::FSXATTR_SIZE]) -> u32 {
    u32::from_ne_bytes([fsx[0], fsx[1], fsx[2], fsx[3]])
}

/// Attributes with nothing set (for negative entries and `.`/`..` in readdirplus).
pub fn empty_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(0),
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

/// `DT_*` -> `S_IF*`.
pub fn kind_of_dtype(dtype: u8) -> u32 {
    match dtype {
        libc::DT_DIR => libc::S_IFDIR,
        libc::DT_LNK => libc::S_IFLNK,
        libc::DT_CHR => libc::S_IFCHR,
        libc::DT_BLK => libc::S_IFBLK,
        libc::DT_FIFO => libc::S_IFIFO,
        libc::DT_SOCK => libc::S_IFSOCK,
        _ => libc::S_IFREG,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuse::reply::unix_time;

    #[test]
    fn layer_times_round_trip_and_never_panic() {
        for (sec, nsec) in [
            (0, 0),
            (5, 7),
            (-1, 500_000_000),
            (-5, 3),
            (i64::MAX, 999_999_999),
            (i64::MIN, 0),
            (i64::MIN, 999_999_999),
        ] {
            assert_eq!(unix_time(system_time(sec, nsec)), (sec, nsec as u32));
        }
        // Nanoseconds a crafted image holds out of range are clamped.
        assert_eq!(
            unix_time(system_time(i64::MAX, 2_000_000_000)),
            (i64::MAX, 999_999_999)
        );
        assert_eq!(unix_time(system_time(-3, -1)), (-3, 0));
    }

    #[test]
    fn setattr_times_before_1970_keep_their_nanoseconds() {
        let before = UNIX_EPOCH - Duration::from_millis(500);
        let t = request_time(&TimeOrNow::SpecificTime(before));
        assert_eq!((t.tv_sec, t.tv_nsec), (-1, 500_000_000));
        let t = request_time(&TimeOrNow::SpecificTime(
            UNIX_EPOCH - Duration::from_secs(4),
        ));
        assert_eq!((t.tv_sec, t.tv_nsec), (-4, 0));
    }
}
