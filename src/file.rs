//! Open files: open/read/write/fsync/release and the handle tables.
//!
//! A handle opened read-only on a lower file notices when the file is copied up (the node's
//! `data_gen` moves) and switches to the upper copy, so it sees writes made through other
//! handles, as on a local filesystem (kernel overlayfs keeps showing the old lower data).

use std::cell::RefCell;
use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use crate::copy_up::Data;
use crate::inode::Node;
use crate::lookup::Loc;
use crate::readdir::DirHandle;
use crate::sys::{self, Errno, Result};
use crate::union::Union;

pub struct FileHandle {
    pub node: Arc<Node>,
    fd: RwLock<Arc<OwnedFd>>,
    /// The node's `data_gen` when `fd` was opened.
    opened_gen: AtomicU64,
    pub writable: bool,
    /// Opened to run the program (counted in the node's `exec_opens` until released).
    exec: bool,
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if self.exec {
            self.node.exec_opens.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// The kernel's `__FMODE_EXEC`, set in the flags of the open that execve makes.
const FMODE_EXEC: i32 = 0x20;

impl FileHandle {
    pub fn new(node: Arc<Node>, fd: OwnedFd, writable: bool) -> FileHandle {
        let opened_gen = node.data_gen.load(Ordering::SeqCst);
        FileHandle {
            node,
            fd: RwLock::new(Arc::new(fd)),
            opened_gen: AtomicU64::new(opened_gen),
            writable,
            exec: false,
        }
    }

    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const SHARDS: usize = 16;

struct HandleMap<T> {
    shards: Vec<Mutex<HashMap<u64, Arc<T>>>>,
}

impl<T> Default for HandleMap<T> {
    fn default() -> Self {
        HandleMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl<T> HandleMap<T> {
    fn shard(&self, fh: u64) -> MutexGuard<'_, HashMap<u64, Arc<T>>> {
        self.shards[fh as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub struct Handles {
    files: HandleMap<FileHandle>,
    dirs: HandleMap<DirHandle>,
    next: AtomicU64,
}

impl Handles {
    pub fn add_file(&self, h: FileHandle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.files.shard(fh).insert(fh, Arc::new(h));
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.files.shard(fh).get(&fh).cloned()
    }

    pub fn remove_file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.files.shard(fh).remove(&fh)
    }

    /// Any open handle of a node (for nodes that have lost their last name).
    pub fn any_file_of(&self, ino: u64) -> Option<Arc<FileHandle>> {
        self.files.shards.iter().find_map(|s| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .find(|h| h.node.ino == ino)
                .cloned()
        })
    }

    pub fn add_dir(&self, h: DirHandle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        self.dirs.shard(fh).insert(fh, Arc::new(h));
        fh
    }

    pub fn dir(&self, fh: u64) -> Option<Arc<DirHandle>> {
        self.dirs.shard(fh).get(&fh).cloned()
    }

    pub fn remove_dir(&self, fh: u64) -> Option<Arc<DirHandle>> {
        self.dirs.shard(fh).remove(&fh)
    }
}

thread_local! {
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Flags kept on the real fd; the rest are the kernel's business (O_APPEND included: writes
/// arrive with their offsets).
fn real_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_TRUNC)
}

impl Union {
    /// Opens a file; returns the handle id.
    pub fn open(&self, node: &Arc<Node>, flags: i32) -> Result<u64> {
        if node.is_dir() {
            return Err(Errno::EISDIR);
        }
        let acc = flags & libc::O_ACCMODE;
        let trunc = flags & libc::O_TRUNC != 0;
        let writable = acc != libc::O_RDONLY;
        // The kernel checks for a running program only after this open has truncated (it
        // lets the filesystem do O_TRUNC itself), so a truncating open of one is refused here,
        // before any data is lost.
        if trunc && node.exec_opens.load(Ordering::SeqCst) > 0 {
            return Err(Errno::ETXTBSY);
        }
        let fd = if writable || trunc {
            if self.layers.read_only() {
                return Err(Errno::EROFS);
            }
            self.copy_up_with(node, if trunc { Data::Nothing } else { Data::All })?;
            self.open_in(node, Loc::Upper, real_flags(flags))?
        } else {
            match self.top_loc(node) {
                Loc::Upper => self.open_in(node, Loc::Upper, real_flags(flags))?,
                Loc::Lower(_) => self.open_lower_data(node)?,
            }
        };
        let mut h = FileHandle::new(node.clone(), fd, writable);
        if flags & FMODE_EXEC != 0 {
            node.exec_opens.fetch_add(1, Ordering::SeqCst);
            h.exec = true;
        }
        Ok(self.handles.add_file(h))
    }

    fn handle(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.handles.file(fh).ok_or(Errno::EBADF)
    }

    /// The fd to read through, switching a read-only handle to the upper copy once the file
    /// has been copied up.
    fn read_fd(&self, h: &FileHandle) -> Arc<OwnedFd> {
        let now = h.node.data_gen.load(Ordering::SeqCst);
        if h.writable || h.opened_gen.load(Ordering::SeqCst) == now {
            return h.fd();
        }
        if let Ok(fd) = self.open_in(&h.node, Loc::Upper, libc::O_RDONLY) {
            *h.fd.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fd);
            h.opened_gen.store(now, Ordering::SeqCst);
        }
        h.fd()
    }

    /// Reads up to `size` bytes at `off` and hands them to `reply`.
    pub fn read(&self, fh: u64, off: u64, size: u32, reply: impl FnOnce(&[u8])) -> Result<()> {
        let h = self.handle(fh)?;
        let fd = self.read_fd(&h);
        READ_BUF.with(|b| {
            let mut buf = b.borrow_mut();
            if buf.len() < size as usize {
                buf.resize(size as usize, 0);
            }
            let mut n = 0;
            while n < size as usize {
                let got = sys::pread(fd.as_fd(), &mut buf[n..size as usize], off + n as u64)?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            reply(&buf[..n]);
            Ok(())
        })
    }

    pub fn write(&self, fh: u64, off: u64, data: &[u8]) -> Result<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        let fd = h.fd();
        let mut n = 0;
        while n < data.len() {
            match sys::pwrite(fd.as_fd(), &data[n..], off + n as u64) {
                Ok(0) => break,
                Ok(w) => n += w,
                Err(e) if n == 0 => return Err(e),
                Err(_) => break,
            }
        }
        Ok(n as u32)
    }

    pub fn release(&self, fh: u64) {
        self.handles.remove_file(fh);
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        if !self.opts.fsync {
            return Ok(());
        }
        sys::fsync(h.fd().as_fd(), datasync)
    }

    pub fn fsyncdir(&self, node: &Node, datasync: bool) -> Result<()> {
        if !self.opts.fsync || node.state().upper.is_none() {
            return Ok(());
        }
        let fd = self.open_in(node, Loc::Upper, libc::O_RDONLY | libc::O_DIRECTORY)?;
        sys::fsync(fd.as_fd(), datasync)
    }

    pub fn fallocate(&self, fh: u64, off: u64, len: u64, mode: i32) -> Result<()> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        sys::fallocate(h.fd().as_fd(), mode, off, len)
    }

    pub fn lseek(&self, fh: u64, off: i64, whence: i32) -> Result<i64> {
        let h = self.handle(fh)?;
        let fd = self.read_fd(&h);
        sys::lseek(fd.as_fd(), off, whence)
    }

    pub fn copy_file_range(
        &self,
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    ) -> Result<u32> {
        let hi = self.handle(fh_in)?;
        let ho = self.handle(fh_out)?;
        if !ho.writable {
            return Err(Errno::EBADF);
        }
        let fi = self.read_fd(&hi);
        let fo = ho.fd();
        let mut oi = off_in as i64;
        let mut oo = off_out as i64;
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        let n = sys::copy_file_range(fi.as_fd(), &mut oi, fo.as_fd(), &mut oo, len)?;
        Ok(n as u32)
    }
}
