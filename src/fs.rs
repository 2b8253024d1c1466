//! The request glue: each decoded request calls the [`Union`] operation and replies in one
//! place.

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::Duration;

use fuser::{Errno, FileAttr, FopenFlags, INodeNo, InitFlags, WriteFlags};

use crate::attr::{SetAttr, XattrReply};
use crate::dir::{Caller, Created, Make};
use crate::file::{IoMode, ReadData};
use crate::fuse::{DirBuf, Header, InitConfig, Op, Reply};
use crate::hardlinks::Noted;
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

fn caller(h: &Header) -> Caller {
    Caller {
        uid: h.uid,
        gid: h.gid,
        pid: h.pid,
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
    fn acl_change_by(&self, pid: u32, node: &Arc<Node>, name: &OsStr) -> Result<()> {
        if !self.u.opts.posix_acl
            || std::os::unix::ffi::OsStrExt::as_bytes(name) != crate::acl::ACCESS.to_bytes()
        {
            return Ok(());
        }
        self.u.drop_set_ids_for_acl(node, pid)
    }

    /// A failed request on `node` whose caller reached it through a name of a lower hard
    /// link that another name's copy-up broke off meanwhile answers ESTALE instead: what it
    /// met was the other name's copy, and the kernel walks to the caller's name again (a
    /// request that succeeded made the same check in its copy-up, `Union::copy_up_with`).
    fn unless_broken_off<T>(&self, node: &Node, pid: u32, res: Result<T>) -> Result<T> {
        match res {
            Err(_) if self.u.walks.broken_off(node.serial, pid) => Err(Errno::ESTALE),
            r => r,
        }
    }

    /// A read of `node`'s xattrs whose caller reached it through a name of a lower hard
    /// link that another name's copy-up broke off meanwhile answers ESTALE: it read the other
    /// name's copy, and the kernel walks to the caller's name again.
    fn read_unless_broken_off<T>(&self, node: &Node, pid: u32, res: Result<T>) -> Result<T> {
        match self.u.walks.is_broken_off(node.serial, pid) {
            true => Err(Errno::ESTALE),
            false => res,
        }
    }

    fn ttl(&self) -> Duration {
        self.u.opts.ttl
    }

    /// How long the kernel may keep a node's attributes. Never for a split node (see
    /// `Node::split`), nor for a removed one holding an upper object (`Node::held`, one with
    /// other links): the object it shows changes through another node too.
    fn attr_ttl(&self, node: &Node) -> Duration {
        // A file whose cached writes are refused (`Union::cached_write_refusal`): the kernel
        // must ask again before each write.
        if node.is_split() || node.write_error() != 0 || self.u.held_upper(node).is_some() {
            Duration::ZERO
        } else {
            self.ttl()
        }
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

    fn reply_entry(&self, res: Result<(Arc<Node>, FileAttr)>, reply: Reply) {
        match res {
            Ok((n, attr)) => reply.entry(
                &self.entry_ttl(&n, &attr),
                &self.attr_ttl(&n),
                &attr,
                n.generation(),
            ),
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

    fn make(&self, h: &Header, parent: INodeNo, name: &OsStr, what: Make<'_>, reply: Reply) {
        let res = self
            .node(parent)
            .and_then(|p| self.created(self.u.create(&p, name, what, &caller(h))));
        self.reply_entry(res, reply);
    }
}

impl UnionFs {
    /// Serves one decoded request. `reply` is None for the requests that get none (FORGET,
    /// BATCH_FORGET, INTERRUPT).
    pub fn dispatch(&self, h: &Header, op: Op<'_>, reply: Option<Reply>) {
        let ino = INodeNo(h.nodeid);
        let Some(reply) = reply else {
            match op {
                Op::Forget { nlookup } => self.forget(h.nodeid, nlookup),
                Op::BatchForget { items } => {
                    for (ino, nlookup) in items {
                        self.forget(ino, nlookup);
                    }
                }
                // The kernel waits for the reply to the request itself.
                _ => {}
            }
            return;
        };
        match op {
            Op::Lookup { name } => self.lookup(h, ino, name, reply),
            Op::Getattr { fh } => self.getattr(ino, fh, reply),
            Op::Statx { fh } => {
                let res = self.node(ino).and_then(|n| {
                    let attr = self.u.getattr(&n, fh)?;
                    Ok((attr, self.u.btime(&n, fh), self.attr_ttl(&n)))
                });
                match res {
                    Ok((attr, btime, ttl)) => reply.statx(&ttl, &attr, btime),
                    Err(e) => reply.error(log_unexpected("statx", e)),
                }
            }
            Op::Setattr(s) => self.setattr(h, ino, s, reply),
            Op::Readlink => match self.node(ino).and_then(|n| self.u.readlink(&n)) {
                Ok(t) => reply.data(&t),
                Err(e) => reply.error(e),
            },
            Op::Mknod {
                name,
                mode,
                umask,
                rdev,
            } => self.mknod(h, ino, name, mode, umask, rdev, reply),
            Op::Mkdir { name, mode, umask } => {
                self.make(h, ino, name, Make::Dir { mode, umask }, reply)
            }
            Op::Unlink { name } => self.remove(ino, name, false, reply),
            Op::Rmdir { name } => self.remove(ino, name, true, reply),
            Op::Symlink { name, target } => match sys::cstr(target) {
                Ok(t) => self.make(h, ino, name, Make::Symlink { target: &t }, reply),
                Err(e) => reply.error(e),
            },
            Op::Rename {
                name,
                newdir,
                newname,
                flags,
            } => {
                let res = self.node(ino).and_then(|p| {
                    let np = self.node(INodeNo(newdir))?;
                    self.u.rename(&p, name, &np, newname, flags, &caller(h))
                });
                match res {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(log_unexpected("rename", e)),
                }
            }
            Op::Link { ino: from, newname } => {
                let res = self.node(INodeNo(from)).and_then(|n| {
                    let np = self.node(ino)?;
                    let made = self.u.link(&n, &np, newname);
                    self.created(self.unless_broken_off(&n, h.pid, made))
                });
                self.reply_entry(res, reply);
            }
            Op::Open { flags } => self.open(h, ino, flags, reply),
            Op::Read {
                fh,
                offset,
                size,
                flags,
            } => self.read(fh, offset, size, flags, reply),
            Op::Write {
                fh,
                offset,
                data,
                write_flags,
            } => self.write(h, ino, fh, offset, data, write_flags, reply),
            // Locks are the kernel's own (no POSIX_LOCKS/FLOCK_LOCKS), and nothing is buffered
            // here: ENOSYS tells the kernel to stop sending FLUSH on every close.
            Op::Flush => reply.error(Errno::ENOSYS),
            Op::Release { fh } => {
                self.u.release(fh);
                reply.ok();
            }
            Op::Fsync { fh, datasync } => match self.u.fsync(fh, datasync) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(log_unexpected("fsync", e)),
            },
            Op::Opendir => self.opendir(ino, reply),
            Op::Readdir { fh, offset, size } => self.readdir(ino, fh, offset, size, reply),
            Op::Readdirplus { fh, offset, size } => {
                self.readdirplus(h, ino, fh, offset, size, reply)
            }
            Op::Releasedir { fh } => {
                if let Some(d) = self.u.handles.remove_dir(fh) {
                    self.u.recheck_listing(&d, false);
                }
                reply.ok();
            }
            Op::Fsyncdir { datasync } => {
                match self.node(ino).and_then(|n| self.u.fsyncdir(&n, datasync)) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                }
            }
            Op::Statfs => match self.u.statfs() {
                Ok(s) => reply.statfs(&s),
                Err(e) => reply.error(e),
            },
            Op::Setxattr { .. }
            | Op::Getxattr { .. }
            | Op::Listxattr { .. }
            | Op::Removexattr { .. }
                if self.u.opts.no_xattrs =>
            {
                reply.error(Errno::ENOTSUP)
            }
            Op::Setxattr { name, value, flags } => {
                match self.node(ino).and_then(|n| {
                    let res = (|| {
                        let _privs = self.u.privs_changing(&n);
                        self.u.check_change_prot(&n)?;
                        self.u.check_acl_settable(&n, name)?;
                        self.acl_change_by(h.pid, &n, name)?;
                        self.u.setxattr(&n, name, value, flags)
                    })();
                    self.unless_broken_off(&n, h.pid, res)
                }) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                }
            }
            Op::Getxattr { name, size } => {
                let res = self.node(ino).and_then(|n| {
                    let got = self.u.getxattr(&n, name, size);
                    self.read_unless_broken_off(&n, h.pid, got)
                });
                xattr_reply(res, reply);
            }
            Op::Listxattr { size } => {
                xattr_reply(
                    self.node(ino).and_then(|n| {
                        let got = self.u.listxattr(&n, size, || {
                            crate::killpriv::Caller::of(h.pid).is_some_and(|c| c.sys_admin)
                        });
                        self.read_unless_broken_off(&n, h.pid, got)
                    }),
                    reply,
                );
            }
            Op::Removexattr { name } => {
                match self.node(ino).and_then(|n| {
                    let res = (|| {
                        let _privs = self.u.privs_changing(&n);
                        self.u.check_change_prot(&n)?;
                        self.u.check_acl_settable(&n, name)?;
                        self.acl_change_by(h.pid, &n, name)?;
                        self.u.removexattr(&n, name)
                    })();
                    self.unless_broken_off(&n, h.pid, res)
                }) {
                    Ok(()) => reply.ok(),
                    Err(e) => reply.error(e),
                }
            }
            // The kernel checks permissions itself (default_permissions).
            Op::Access => reply.ok(),
            Op::Create {
                name,
                mode,
                umask,
                flags,
            } => self.create(h, ino, Some(name), mode, umask, flags, reply),
            Op::Tmpfile { mode, umask, flags } => {
                self.create(h, ino, None, mode, umask, flags, reply)
            }
            Op::Ioctl {
                cmd,
                in_data,
                out_size,
            } => {
                let res = self
                    .node(ino)
                    .and_then(|n| self.u.inode_flags_ioctl(&n, cmd, in_data));
                match res {
                    Ok(out) if out.len() <= out_size as usize => reply.ioctl(0, &out),
                    Ok(_) => reply.error(Errno::EINVAL),
                    Err(e) => reply.error(log_unexpected("ioctl", e)),
                }
            }
            Op::Fallocate {
                fh,
                offset,
                length,
                mode,
            } => match self.u.fallocate(fh, offset, length, mode) {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(e),
            },
            Op::Lseek { fh, offset, whence } => {
                if self.u.writeback_active() {
                    // The kernel holds written data the upper file does not have yet, so only
                    // the kernel's own answer (from its file size) is right: ENOSYS makes it
                    // answer SEEK_DATA/SEEK_HOLE itself from now on.
                    reply.error(Errno::ENOSYS);
                    return;
                }
                match self.u.lseek(fh, offset, whence) {
                    Ok(o) => reply.offset(o),
                    Err(e) => reply.error(e),
                }
            }
            Op::CopyFileRange {
                fh_in,
                off_in,
                fh_out,
                off_out,
                len,
            } => match self.u.copy_file_range(fh_in, off_in, fh_out, off_out, len) {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(e),
            },
            Op::Init { .. } | Op::Destroy => reply.error(Errno::EIO),
            Op::Forget { .. } | Op::BatchForget { .. } | Op::Interrupt | Op::Unknown(_) => {
                reply.error(Errno::ENOSYS)
            }
        }
    }

    pub fn init(&mut self, config: &mut InitConfig) {
        let mut want = InitFlags::FUSE_ASYNC_READ
            | InitFlags::FUSE_ATOMIC_O_TRUNC
            | InitFlags::FUSE_DONT_MASK
            | InitFlags::FUSE_PARALLEL_DIROPS
            | InitFlags::FUSE_CACHE_SYMLINKS
            | InitFlags::FUSE_BIG_WRITES
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
            if !config.add(flag) {
                log::debug!("kernel lacks {flag:?}");
            }
        }
        if self.u.opts.passthrough {
            // Backing files are on ordinary filesystems (depth 0), so this mount is depth 1.
            config.max_stack_depth = 1;
            let ok = config.add(InitFlags::FUSE_PASSTHROUGH);
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
            let ok = config.add(InitFlags::FUSE_WRITEBACK_CACHE);
            self.u.set_writeback_active(ok);
        }
        if !self.u.layers.read_only() {
            // The daemon drops set-ID bits itself, and the kernel stops asking for
            // security.capability before each write (see `killpriv`).
            let ok = config.add(InitFlags::FUSE_HANDLE_KILLPRIV_V2);
            self.u.set_killpriv_active(ok);
        }
        config.add(InitFlags::FUSE_DIRECT_IO_ALLOW_MMAP);
        config.max_write = MAX_IO;
        config.max_readahead = config.max_readahead.min(MAX_IO);
        config.max_background = 64;
        config.congestion_threshold = 48;
    }

    fn lookup(&self, h: &Header, parent: INodeNo, name: &OsStr, reply: Reply) {
        let res = self.node(parent).and_then(|p| {
            if name == "." || name == ".." {
                return self.u.lookup(&p, name).and_then(|n| self.entry_of(n, None));
            }
            let mut waits = 0;
            let (n, st) = loop {
                let snap = self.u.tree_snapshot();
                let (n, st) = self.u.lookup_stat(&p, name)?;
                if !self.u.looked_up(&p, name, &n) {
                    self.u.table.unpin(&n, 1);
                    return Err(Errno::ENOENT);
                }
                // Which name of a hard link this caller uses (see `hardlinks::Walks`); found
                // through a name a copy-up of another name is breaking off the node, it is
                // looked up again once the copy-up has.
                let settled = || self.u.tree_unchanged_since(snap);
                let noted = match st.st_nlink > 1 && !n.is_dir() {
                    true => self.u.walks.note(n.serial, h.pid, p.ino, name, settled),
                    false => Noted::Yes,
                };
                if noted != Noted::Yes {
                    self.u.table.unpin(&n, 1);
                    waits += 1;
                    if waits > 1000 {
                        return Err(Errno::ESTALE);
                    }
                    let pause = match noted {
                        Noted::Wait => Duration::from_millis(1),
                        _ => Duration::from_micros(50),
                    };
                    std::thread::sleep(pause);
                    continue;
                }
                break (n, st);
            };
            self.entry_of(n, Some(st))
        });
        if let Ok((n, _)) = &res
            && !n.is_dir()
            && self.u.opts.readdirplus == ReaddirPlus::Auto
        {
            // Walkers look up directories to enter them; only other names show a stat.
            self.walkers.lookup(h.pid, parent.0);
        }
        match res {
            Ok(found) => self.reply_entry(Ok(found), reply),
            // A negative entry the kernel may cache: every change comes through us.
            Err(e) if e.code() == libc::ENOENT => {
                let mut attr = crate::attr::empty_attr();
                attr.ino = INodeNo(0);
                reply.entry(&self.ttl(), &self.ttl(), &attr, 0);
            }
            Err(e) => reply.error(e),
        }
    }

    fn forget(&self, ino: u64, nlookup: u64) {
        if let Some(n) = self.u.table.get(ino) {
            self.u.table.unpin(&n, nlookup);
        }
    }

    fn getattr(&self, ino: INodeNo, fh: Option<u64>, reply: Reply) {
        match self.node(ino).and_then(|n| {
            if let Some(fh) = fh {
                self.u.cached_write_refusal(&n, fh)?;
            }
            Ok((self.u.getattr(&n, fh)?, self.attr_ttl(&n)))
        }) {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(log_unexpected("getattr", e)),
        }
    }

    fn setattr(&self, h: &Header, ino: INodeNo, req: SetAttr, reply: Reply) {
        let truncates = req.size.is_some();
        // Times alone change no set-ID bit or capability.
        let privs = req.mode.is_some()
            || req.uid.is_some()
            || req.gid.is_some()
            || req.size.is_some()
            || (req.atime.is_none() && req.mtime.is_none());
        let res = self.node(ino).and_then(|n| {
            let _privs = privs.then(|| self.u.privs_changing(&n));
            let set = self.u.setattr_by(&n, req, h.pid, h.uid);
            Ok((self.unless_broken_off(&n, h.pid, set)?, self.attr_ttl(&n)))
        });
        let send = move || match res {
            Ok((attr, ttl)) => reply.attr(&ttl, &attr),
            Err(e) => reply.error(log_unexpected("setattr", e)),
        };
        if truncates {
            // The kernel cuts its cache after the reply: no page stored ahead may land later.
            self.u.streams.after_stop(ino.0, Box::new(send));
        } else {
            send();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn mknod(
        &self,
        h: &Header,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
        reply: Reply,
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
        self.make(h, parent, name, what, reply);
    }

    fn remove(&self, parent: INodeNo, name: &OsStr, dir: bool, reply: Reply) {
        match self.node(parent).and_then(|p| self.u.remove(&p, name, dir)) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(log_unexpected(if dir { "rmdir" } else { "unlink" }, e)),
        }
    }

    fn open(&self, h: &Header, ino: INodeNo, flags: i32, reply: Reply) {
        let mut data_ahead = None;
        let res = self.node(ino).and_then(|n| {
            // A truncating open drops set-ID bits and capabilities (see `privs_lock`).
            let _privs = (flags & libc::O_TRUNC != 0).then(|| self.u.privs_changing(&n));
            let opened = self.u.open(&n, flags, &|fd| reply.open_backing(fd));
            // Reached through a name of a lower hard link that another name's copy-up broke
            // off this node meanwhile (whatever the open met then): the kernel walks to that
            // name again.
            if self.u.walks.broken_off(n.serial, h.pid) {
                if let Ok(o) = &opened {
                    self.u.release(o.0);
                }
                return Err(Errno::ESTALE);
            }
            let opened = opened?;
            // Read ahead once the reply is sent.
            data_ahead = self.u.opened_for_data_ahead(&n, h.pid, flags);
            if flags & libc::O_TRUNC != 0 {
                // A truncating open is a change of data; the kernel drops nothing for it.
                let dropped = self.u.drop_set_ids_for_data(&n, opened.0, h.pid, false);
                if let Err(e) = dropped {
                    self.u.release(opened.0);
                    return Err(e);
                }
            }
            Ok(opened)
        });
        let send = move || match res {
            Ok((fh, IoMode::Passthrough(b))) => {
                reply.opened(fh, FopenFlags::empty(), Some(&b.value))
            }
            Ok((fh, IoMode::Direct)) => reply.opened(fh, FopenFlags::FOPEN_DIRECT_IO, None),
            Ok((fh, IoMode::Cached)) => reply.opened(fh, FopenFlags::FOPEN_KEEP_CACHE, None),
            Err(e) => reply.error(log_unexpected("open", e)),
        };
        let changes_data = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
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

    fn read(&self, fh: u64, offset: u64, size: u32, flags: i32, reply: Reply) {
        let mut reply = Some(reply);
        let cached = flags & libc::O_DIRECT == 0;
        let res = self.u.read(fh, offset, size, cached, |data| {
            let r = reply.take()?;
            match data {
                ReadData::File {
                    pipe,
                    fd,
                    off,
                    size,
                } => r
                    .data_spliced(pipe, fd, off, size)
                    .map_err(|r| reply = Some(r))
                    .ok(),
                ReadData::Copied(d) => {
                    r.data(d);
                    Some(d.len())
                }
            }
        });
        if let (Err(e), Some(r)) = (res, reply) {
            r.error(log_unexpected("read", e));
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        h: &Header,
        ino: INodeNo,
        fh: u64,
        offset: u64,
        data: &[u8],
        write_flags: u32,
        reply: Reply,
    ) {
        // The kernel flags writes of callers without CAP_FSETID to files with set-ID bits.
        let kill =
            WriteFlags::from_bits_retain(write_flags).contains(WriteFlags::FUSE_WRITE_KILL_SUIDGID);
        let res = match kill {
            true => self.node(ino).and_then(|n| {
                let _privs = self.u.privs_changing(&n);
                self.u.drop_set_ids_for_data(&n, fh, h.pid, true)
            }),
            false => Ok(()),
        };
        let from_cache =
            WriteFlags::from_bits_retain(write_flags).contains(WriteFlags::FUSE_WRITE_CACHE);
        match res.and_then(|()| self.u.write(fh, offset, data, from_cache)) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(log_unexpected("write", e)),
        }
    }

    fn opendir(&self, ino: INodeNo, reply: Reply) {
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
                reply.opened(fh, FopenFlags::FOPEN_CACHE_DIR | keep, None);
            }
            Ok(_) => reply.error(Errno::ENOTDIR),
            Err(e) => reply.error(e),
        }
    }

    fn readdir(&self, ino: INodeNo, fh: u64, offset: u64, size: u32, reply: Reply) {
        let mut buf = DirBuf::new(size);
        let res = self.u.handles.dir(fh).ok_or(Errno::EBADF).and_then(|d| {
            if d.node.ino != ino.0 {
                return Err(Errno::EBADF);
            }
            self.u.read_dir(&d, offset, true, |e| {
                let kind = crate::attr::file_type(crate::attr::kind_of_dtype(e.dtype));
                buf.add(e.ino, e.next, kind, e.name)
            })
        });
        match res {
            Ok(()) => reply.dir(buf),
            Err(e) => reply.error(log_unexpected("readdir", e)),
        }
    }

    fn readdirplus(&self, h: &Header, ino: INodeNo, fh: u64, offset: u64, size: u32, reply: Reply) {
        // A process that does not look up what it lists gets one entry here (after `.` and
        // `..`, which cost nothing); the kernel (readdirplus=auto) reads the rest as a plain
        // listing. One real entry it must get: some readers in the kernel take a single
        // batch (overlayfs, checking that its upper layer reports file types, ignores `.` and
        // `..` and refuses a layer whose first batch holds nothing else).
        let decision = match self.u.opts.readdirplus {
            ReaddirPlus::Auto => self.walkers.decide(h.pid, ino.0),
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
        let mut buf = DirBuf::new(size);
        let res = self.u.handles.dir(fh).ok_or(Errno::EBADF).and_then(|d| {
            if d.node.ino != ino.0 {
                return Err(Errno::EBADF);
            }
            let dir = d.node.clone();
            // Each entry is numbered by its lookup below.
            self.u.read_dir(&d, offset, false, |e| {
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
                    let ttls = (&Duration::ZERO, &Duration::ZERO);
                    return buf.add_plus(e.next, e.name, ttls, &attr, 0);
                }
                // Every entry sent counts as a lookup; one that does not fit is given back,
                // one that vanished since the listing was read is left out.
                let Ok((node, st)) = self.u.lookup_stat(&dir, e.name) else {
                    return false;
                };
                let Ok((node, attr)) = self.entry_of(node, Some(st)) else {
                    return false;
                };
                let ttls = (&self.entry_ttl(&node, &attr), &self.attr_ttl(&node));
                let full = buf.add_plus(e.next, e.name, ttls, &attr, node.generation());
                if full {
                    self.u.table.unpin(&node, 1);
                } else {
                    quota -= 1;
                }
                full
            })?;
            listed = Some(d);
            Ok(())
        });
        match res {
            Ok(()) => reply.dir(buf),
            Err(e) => reply.error(log_unexpected("readdirplus", e)),
        }
        if ahead && let Some(d) = listed {
            self.u.read_ahead(&d, decision.stats);
        }
    }

    #[allow(clippy::too_many_arguments)]
    /// CREATE, or TMPFILE without a name.
    fn create(
        &self,
        h: &Header,
        parent: INodeNo,
        name: Option<&OsStr>,
        mode: u32,
        umask: u32,
        flags: i32,
        reply: Reply,
    ) {
        let what = Make::File { mode, umask, flags };
        let res = self.node(parent).and_then(|p| {
            let c = match name {
                Some(name) => self.u.create(&p, name, what, &caller(h))?,
                None => self.u.tmpfile(&p, mode, umask, flags, &caller(h))?,
            };
            let fd = c.fd.ok_or(Errno::EIO)?;
            let node = c.node.clone();
            // The handle first: the attributes count its writable open (`Union::attr`).
            let done = self
                .u
                .add_handle(&node, fd, flags, &|fd| reply.open_backing(fd))
                .and_then(|(fh, io)| match self.u.attr(&node, &c.st) {
                    Ok(attr) => Ok((attr, node.generation(), fh, io)),
                    Err(e) => {
                        self.u.release(fh);
                        Err(e)
                    }
                });
            if done.is_err() {
                self.u.table.unpin(&node, 1);
            }
            done
        });
        let ttl = self.ttl();
        // The kernel names an unnamed file's entry "/": it must never ask about it again.
        let entry = match name {
            Some(_) => ttl,
            None => Duration::from_secs(u64::from(u32::MAX)),
        };
        match res {
            Ok((attr, generation, fh, IoMode::Passthrough(b))) => {
                let flags = FopenFlags::empty();
                reply.created(&entry, &ttl, &attr, generation, fh, flags, Some(&b.value))
            }
            Ok((attr, generation, fh, io)) => {
                let flags = match io {
                    IoMode::Direct => FopenFlags::FOPEN_DIRECT_IO,
                    _ => FopenFlags::FOPEN_KEEP_CACHE,
                };
                reply.created(&entry, &ttl, &attr, generation, fh, flags, None)
            }
            Err(e) => reply.error(log_unexpected("create", e)),
        }
    }
}

fn xattr_reply(res: Result<XattrReply>, reply: Reply) {
    match res {
        Ok(XattrReply::Size(s)) => reply.size(s),
        Ok(XattrReply::Data(d)) => reply.data(&d),
        Err(e) => reply.error(e),
    }
}
