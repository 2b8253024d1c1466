//! The fuser glue: decode each request, call the [`Union`] operation, reply in one place.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    AccessFlags, BsdFileFlags, CopyFileRangeFlags, Errno, FileAttr, FileHandle, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, IoctlFlags, KernelConfig, LockOwner, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyIoctl, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    TimeOrNow, WriteFlags,
};

use crate::attr::{SetAttr, XattrReply};
use crate::dir::{Caller, Created, Make};
use crate::file::IoMode;
use crate::inode::Node;
use crate::readdir::DirHandle;
use crate::sys::{self, Result};
use crate::union::{ReaddirPlus, Union};
use crate::walkers::{Decision, Walkers};

/// Largest request the kernel may send us, and read-ahead.
pub const MAX_IO: u32 = 1 << 20;

pub struct UnionFs {
    pub u: Arc<Union>,
    /// Who stats what it lists (`readdirplus=auto`).
    pub walkers: Walkers,
}

impl UnionFs {
    pub fn new(u: Arc<Union>) -> UnionFs {
        UnionFs {
            u,
            walkers: Walkers::default(),
        }
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
        pid: req.pid(),
    }
}

fn log_unexpected(op: &str, e: Errno) -> Errno {
    if e.code() == libc::EIO {
        log::warn!("{op}: I/O error");
    }
    e
}

impl UnionFs {
    fn node(&self, ino: INodeNo) -> Result<Arc<Node>> {
        self.u.table.get_used(ino.0).ok_or(Errno::ESTALE)
    }

    /// Before an access ACL is set or removed: the set-group-ID bit the caller loses by it.
    fn acl_change_by(&self, req: &Request, node: &Arc<Node>, name: &OsStr) -> Result<()> {
        if !self.u.opts.posix_acl
            || std::os::unix::ffi::OsStrExt::as_bytes(name) != crate::acl::ACCESS.to_bytes()
        {
            return Ok(());
        }
        self.u.drop_set_ids_for_acl(node, req.pid())
    }

    fn ttl(&self) -> Duration {
        self.u.opts.ttl
    }

    /// How long the kernel may keep an entry. Names of a lower hard link are not cached: the
    /// kernel then looks each one up before every use, so the daemon knows which name a
    /// change that copies the file up comes through (FUSE requests carry only the inode).
    fn entry_ttl(&self, node: &Node, attr: &FileAttr) -> Duration {
        if attr.nlink > 1 && !node.is_dir() && node.state().upper.is_none() {
            Duration::ZERO
        } else {
            self.ttl()
        }
    }

    fn reply_entry(&self, res: Result<(Arc<Node>, FileAttr)>, reply: ReplyEntry) {
        match res {
            Ok((n, attr)) => reply.entry(&self.entry_ttl(&n, &attr), &attr, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    /// An entry for a node on which the operation took a kernel reference; the reference is
    /// given back if no reply can be built.
    fn entry_of(&self, node: Arc<Node>, st: Option<sys::Stat>) -> Result<(Arc<Node>, FileAttr)> {
        let attr = match st {
            Some(st) => self.u.attr(&node, &st),
            None => self.u.getattr(&node, None),
        };
        match attr {
            Ok(a) => Ok((node, a)),
            Err(e) => {
                self.u.table.unpin(&node, 1);
                Err(e)
            }
        }
    }

    fn created(&self, c: Result<Created>) -> Result<(Arc<Node>, FileAttr)> {
        let c = c?;
        self.entry_of(c.node, Some(c.st))
    }

    fn make(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        what: Make<'_>,
        reply: ReplyEntry,
    ) {
        let res = self
            .node(parent)
            .and_then(|p| self.created(self.u.create(&p, name, what, &caller(req))));
        self.reply_entry(res, reply);
    }
}

impl Filesystem for UnionFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut want = InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_BIG_WRITES
            | InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_MAX_PAGES;
        if self.u.opts.posix_acl {
            want |= InitFlags::FUSE_POSIX_ACL;
        }
        match self.u.opts.readdirplus {
            ReaddirPlus::Off => {}
            ReaddirPlus::Auto => {
                want |= InitFlags::FUSE_DO_READDIRPLUS | InitFlags::FUSE_READDIRPLUS_AUTO
            }
            ReaddirPlus::On => want |= InitFlags::FUSE_DO_READDIRPLUS,
        }
        for flag in want.iter() {
            if config.add_capabilities(flag).is_err() {
                log::debug!("kernel lacks {flag:?}");
            }
        }
        if self.u.opts.passthrough {
            // Backing files are on ordinary filesystems (depth 0), so this mount is depth 1.
            let ok = config.set_max_stack_depth(1).is_ok()
                && config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok();
            self.u.set_passthrough_active(ok);
            if !ok {
                log::info!(
                    "the kernel does not offer passthrough; open files go through the daemon"
                );
            }
        }
        if !self.u.passthrough_active() && !self.u.layers.read_only() {
            // Without passthrough, writes gather in the kernel's page cache and reach the
            // daemon in large pieces, as on a local filesystem.
            let ok = config
                .add_capabilities(InitFlags::FUSE_WRITEBACK_CACHE)
                .is_ok();
            self.u.set_writeback_active(ok);
        }
        if !self.u.layers.read_only() {
            // The daemon drops set-ID bits itself, and the kernel stops asking for
            // security.capability before each write (see `killpriv`).
            let ok = config
                .add_capabilities(InitFlags::FUSE_HANDLE_KILLPRIV_V2)
                .is_ok();
            self.u.set_killpriv_active(ok);
        }
        let _ = config.add_capabilities(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        let _ = config.set_max_write(MAX_IO);
        let _ = config.set_max_readahead(MAX_IO);
        let _ = config.set_max_background(64);
        let _ = config.set_congestion_threshold(48);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let res = self.node(parent).and_then(|p| {
            if name == "." || name == ".." {
                return self.u.lookup(&p, name).and_then(|n| self.entry_of(n, None));
            }
            let (n, st) = self.u.lookup_stat(&p, name)?;
            self.entry_of(n, Some(st))
        });
        if let Ok((n, _)) = &res
            && !n.is_dir()
            && self.u.opts.readdirplus == ReaddirPlus::Auto
        {
            // Walkers look up directories to enter them; only other names show a stat.
            self.walkers.lookup(req.pid(), parent.0);
        }
        match res {
            Ok((n, attr)) => reply.entry(&self.entry_ttl(&n, &attr), &attr, Generation(0)),
            // A negative entry the kernel may cache: every change comes through us.
            Err(e) if e.code() == libc::ENOENT => {
                let mut attr = crate::attr::empty_attr();
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl(), &attr, Generation(0));
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        if let Some(n) = self.u.table.get(ino.0) {
            self.u.table.unpin(&n, nlookup);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        match self
            .node(ino)
            .and_then(|n| self.u.getattr(&n, fh.map(|f| f.0)))
        {
            Ok(attr) => reply.attr(&self.ttl(), &attr),
            Err(e) => reply.error(log_unexpected("getattr", e)),
        }
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (pid, fsuid) = (req.pid(), req.uid());
        let req = SetAttr {
            mode,
            uid,
            gid,
            size,
            atime,
            mtime,
            fh: fh.map(|f| f.0),
        };
        let truncates = req.size.is_some();
        let res = self
            .node(ino)
            .and_then(|n| self.u.setattr_by(&n, req, pid, fsuid));
        let ttl = self.ttl();
        let send = move || match res {
            Ok(attr) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(log_unexpected("setattr", e)),
        };
        if truncates {
            // The kernel cuts its cache after the reply: no page stored ahead may land later.
            self.u.streams.after_stop(ino.0, Box::new(send));
        } else {
            send();
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.node(ino).and_then(|n| self.u.readlink(&n)) {
            Ok(t) => reply.data(&t),
            Err(e) => reply.error(e),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let rdev = sys::decode_dev_u32(rdev);
        let what = if sys::file_type(mode) == libc::S_IFREG || sys::file_type(mode) == 0 {
            Make::File {
                mode,
                umask,
                flags: libc::O_RDONLY,
            }
        } else {
            Make::Node { mode, umask, rdev }
        };
        self.make(req, parent, name, what, reply);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        reply: ReplyEntry,
    ) {
        self.make(req, parent, name, Make::Dir { mode, umask }, reply);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .node(parent)
            .and_then(|p| self.u.remove(&p, name, false))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("unlink", e)),
        }
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self
            .node(parent)
            .and_then(|p| self.u.remove(&p, name, true))
        {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("rmdir", e)),
        }
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        match sys::cstr(target.as_os_str()) {
            Ok(t) => self.make(req, parent, link_name, Make::Symlink { target: &t }, reply),
            Err(e) => reply.error(e),
        }
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let res = self.node(parent).and_then(|p| {
            let np = self.node(newparent)?;
            self.u
                .rename(&p, name, &np, newname, flags.bits(), &caller(req))
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("rename", e)),
        }
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        let res = self.node(ino).and_then(|n| {
            let np = self.node(newparent)?;
            self.created(self.u.link(&n, &np, newname))
        });
        self.reply_entry(res, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let mut data_ahead = None;
        let res = self.node(ino).and_then(|n| {
            let opened = self.u.open(&n, flags.0, &|fd| reply.open_backing(fd))?;
            // Read ahead once the reply is sent.
            data_ahead = self.u.opened_for_data_ahead(&n, req.pid(), flags.0);
            if flags.0 & libc::O_TRUNC != 0 {
                // A truncating open is a change of data; the kernel drops nothing for it.
                let dropped = self.u.drop_set_ids_for_data(&n, opened.0, req.pid(), false);
                if let Err(e) = dropped {
                    self.u.release(opened.0);
                    return Err(e);
                }
            }
            Ok(opened)
        });
        let send = move || match res {
            Ok((fh, IoMode::Passthrough(b))) => {
                reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &b.id)
            }
            Ok((fh, IoMode::Direct)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO),
            Ok((fh, IoMode::Cached)) => reply.opened(FileHandle(fh), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(log_unexpected("open", e)),
        };
        let changes_data =
            flags.0 & libc::O_ACCMODE != libc::O_RDONLY || flags.0 & libc::O_TRUNC != 0;
        if changes_data {
            // Writes may follow the reply: no page stored ahead of a reader may land after it.
            self.u.streams.after_stop(ino.0, Box::new(send));
        } else {
            send();
        }
        if let Some((dir, loc)) = data_ahead {
            self.u.data_ahead(&dir, loc);
        }
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut reply = Some(reply);
        let cached = flags.0 & libc::O_DIRECT == 0;
        let res = self.u.read(fh.0, offset, size, cached, |data| {
            if let Some(r) = reply.take() {
                r.data(data)
            }
        });
        if let (Err(e), Some(r)) = (res, reply) {
            r.error(log_unexpected("read", e));
        }
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        // The kernel flags writes of callers without CAP_FSETID to files with set-ID bits.
        let res = match write_flags.contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID) {
            true => self
                .node(ino)
                .and_then(|n| self.u.drop_set_ids_for_data(&n, fh.0, req.pid(), true)),
            false => Ok(()),
        };
        match res.and_then(|()| self.u.write(fh.0, offset, data)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(log_unexpected("write", e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Locks are the kernel's own (no POSIX_LOCKS/FLOCK_LOCKS), and nothing is buffered
        // here: ENOSYS tells the kernel to stop sending FLUSH on every close.
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.u.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.u.fsync(fh.0, datasync) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("fsync", e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.node(ino) {
            Ok(n) if n.is_dir() => {
                // The kernel may keep listings in its cache across opens: every change to a
                // directory comes through the kernel, which drops the cache when it does one.
                // A listing whose numbers changed otherwise is dropped now, by this open.
                let keep = if n.extra_if_made().is_some_and(|e| {
                    e.stale_listing
                        .swap(false, std::sync::atomic::Ordering::SeqCst)
                }) {
                    FopenFlags::empty()
                } else {
                    FopenFlags::FOPEN_KEEP_CACHE
                };
                let fh = self.u.handles.add_dir(DirHandle::new(n));
                reply.opened(FileHandle(fh), FopenFlags::FOPEN_CACHE_DIR | keep);
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        let res = self.u.handles.dir(fh.0).ok_or(Errno::EBADF).and_then(|h| {
            if h.node.ino != ino.0 {
                return Err(Errno::EBADF);
            }
            self.u.read_dir(&h, offset, |e| {
                let kind = crate::attr::file_type(crate::attr::kind_of_dtype(e.dtype));
                reply.add(INodeNo(e.ino), e.next, kind, e.name)
            })
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("readdir", e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        // A process that does not look up what it lists gets one entry here (after `.` and
        // `..`, which cost nothing); the kernel (readdirplus=auto) reads the rest as a plain
        // listing. One real entry it must get: some readers in the kernel take a single
        // batch (overlayfs, checking that its upper layer reports file types, ignores `.` and
        // `..` and refuses a layer whose first batch holds nothing else).
        let decision = match self.u.opts.readdirplus {
            ReaddirPlus::Auto => self.walkers.decide(req.pid(), ino.0),
            _ => Decision {
                whole: true,
                stats: false,
                walking: false,
            },
        };
        let mut quota = if decision.whole { usize::MAX } else { 1 };
        // The first batch for a process that lists one directory after another: the
        // subdirectories are read ahead once it is sent (see `prefetch`).
        let ahead = offset == 0 && decision.walking;
        let mut listed = None;
        let res = self.u.handles.dir(fh.0).ok_or(Errno::EBADF).and_then(|h| {
            if h.node.ino != ino.0 {
                return Err(Errno::EBADF);
            }
            let dir = h.node.clone();
            self.u.read_dir(&h, offset, |e| {
                // Only entries sent count against the quota: a reply left empty by a vanished
                // entry would read as the end of the directory.
                if quota == 0 {
                    return true;
                }
                if e.name == "." || e.name == ".." {
                    // Only the name and number: the kernel links no dentry for these.
                    let mut attr = crate::attr::empty_attr();
                    attr.ino = INodeNo(e.ino);
                    attr.kind = fuser::FileType::Directory;
                    let full = reply.add(
                        INodeNo(e.ino),
                        e.next,
                        e.name,
                        &Duration::ZERO,
                        &attr,
                        Generation(0),
                    );
                    return full;
                }
                // Every entry sent counts as a lookup; one that does not fit is given back,
                // one that vanished since the listing was read is left out.
                let Ok((node, st)) = self.u.lookup_stat(&dir, e.name) else {
                    return false;
                };
                let Ok((node, attr)) = self.entry_of(node, Some(st)) else {
                    return false;
                };
                let full = reply.add(
                    INodeNo(node.ino),
                    e.next,
                    e.name,
                    &self.entry_ttl(&node, &attr),
                    &attr,
                    Generation(0),
                );
                if full {
                    self.u.table.unpin(&node, 1);
                } else {
                    quota -= 1;
                }
                full
            })?;
            listed = Some(h);
            Ok(())
        });
        match res {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected("readdirplus", e)),
        }
        if ahead && let Some(h) = listed {
            self.u.read_ahead(&h, decision.stats);
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        if let Some(h) = self.u.handles.remove_dir(fh.0) {
            self.u.recheck_listing(&h, false);
        }
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        match self.node(ino).and_then(|n| self.u.fsyncdir(&n, datasync)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        match self.u.statfs() {
            Ok(s) => reply.statfs(
                s.f_blocks,
                s.f_bfree,
                s.f_bavail,
                s.f_files,
                s.f_ffree,
                s.f_bsize as u32,
                s.f_namemax as u32,
                s.f_frsize as u32,
            ),
            Err(e) => reply.error(e),
        }
    }

    fn setxattr(
        &self,
        req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        match self.node(ino).and_then(|n| {
            self.acl_change_by(req, &n, name)?;
            self.u.setxattr(&n, name, value, flags)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        match self.node(ino).and_then(|n| self.u.getxattr(&n, name, size)) {
            Ok(XattrReply::Size(s)) => reply.size(s),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.node(ino).and_then(|n| self.u.listxattr(&n, size)) {
            Ok(XattrReply::Size(s)) => reply.size(s),
            Ok(XattrReply::Data(d)) => reply.data(&d),
            Err(e) => reply.error(e),
        }
    }

    fn removexattr(&self, req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        match self.node(ino).and_then(|n| {
            self.acl_change_by(req, &n, name)?;
            self.u.removexattr(&n, name)
        }) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: AccessFlags, reply: ReplyEmpty) {
        // The kernel checks permissions itself (default_permissions).
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let what = Make::File { mode, umask, flags };
        let res = self.node(parent).and_then(|p| {
            let c = self.u.create(&p, name, what, &caller(req))?;
            let fd = c.fd.ok_or(Errno::EIO)?;
            let node = c.node.clone();
            let done = self.u.attr(&node, &c.st).and_then(|attr| {
                let (fh, io) = self
                    .u
                    .add_handle(&node, fd, flags, &|fd| reply.open_backing(fd))?;
                Ok((attr, fh, io))
            });
            if done.is_err() {
                self.u.table.unpin(&node, 1);
            }
            done
        });
        let ttl = self.ttl();
        match res {
            Ok((attr, fh, IoMode::Passthrough(b))) => reply.created_passthrough(
                &ttl,
                &attr,
                Generation(0),
                FileHandle(fh),
                FopenFlags::empty(),
                &b.id,
            ),
            Ok((attr, fh, io)) => {
                let flags = match io {
                    IoMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
                    _ => FopenFlags::FOPEN_KEEP_CACHE,
                };
                reply.created(&ttl, &attr, Generation(0), FileHandle(fh), flags)
            }
            Err(e) => reply.error(log_unexpected("create", e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        match self.u.fallocate(fh.0, offset, length, mode) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(e),
        }
    }

    fn lseek(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        if self.u.writeback_active() {
            // The kernel holds written data the upper file does not have yet, so only the
            // kernel's own answer (from its file size) is right: ENOSYS makes it answer
            // SEEK_DATA/SEEK_HOLE itself from now on.
            reply.error(Errno::ENOSYS);
            return;
        }
        match self.u.lseek(fh.0, offset, whence) {
            Ok(o) => reply.offset(o),
            Err(e) => reply.error(e),
        }
    }

    fn copy_file_range(
        &self,
        _req: &Request,
        _ino_in: INodeNo,
        fh_in: FileHandle,
        offset_in: u64,
        _ino_out: INodeNo,
        fh_out: FileHandle,
        offset_out: u64,
        len: u64,
        _flags: CopyFileRangeFlags,
        reply: ReplyWrite,
    ) {
        match self
            .u
            .copy_file_range(fh_in.0, offset_in, fh_out.0, offset_out, len)
        {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(e),
        }
    }

    fn ioctl(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _flags: IoctlFlags,
        cmd: u32,
        in_data: &[u8],
        out_size: u32,
        reply: ReplyIoctl,
    ) {
        let res = self
            .node(ino)
            .and_then(|n| self.u.inode_flags_ioctl(&n, cmd, in_data));
        match res {
            Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
            Ok(_) => reply.error(Errno::EINVAL),
            Err(e) => reply.error(log_unexpected("ioctl", e)),
        }
    }
}
