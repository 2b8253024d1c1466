//! Open files: open/read/write/fsync/release and the handle tables.
//!
//! A handle opened read-only on a lower file notices when the file is copied up (the node's
//! `data_gen` moves) and switches to the upper copy, so it sees writes made through other
//! handles, as on a local filesystem (kernel overlayfs keeps showing the old lower data).

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock, Weak};

use crate::copy_up::Data;
use crate::inode::{Node, RealId};
use crate::lookup::Loc;
use crate::readdir::DirHandle;
use crate::sys::{self, Errno, Result};
use crate::union::Union;

/// How the kernel does the I/O of an open file.
pub enum IoMode {
    /// Through the page cache, with reads and writes sent to the daemon.
    Cached,
    /// Straight from the backing file in the kernel.
    Passthrough(Arc<SharedBacking>),
    /// Every read and write sent to the daemon, no page cache: for an open whose file the
    /// kernel refused to take as a backing file.
    Direct,
}

/// What the opens of a node share, by node serial, with the real object it is of: the
/// passthrough backing id (`Backings`: the kernel passes every open of an inode through to
/// one file) and the daemon's read-only fd (`FdShares`, see `Union::open_shared`). An entry
/// lives while anything holds its value, so nodes that were opened once keep nothing.
/// (Generic over the value, also for tests: a real backing id needs the kernel.)
pub struct Backings<B = crate::fuse::BackingId> {
    by_serial: ShardedMap<Backing<B>>,
}

/// The real object a node's opens reach, and what they share of it.
type Backing<B> = (RealId, Weak<SharedBacking<B>>);

/// A value shared by the opens of one node. Whoever drops the last hold on it (the last
/// open's release, or a reply still being sent) takes its entry out of the table.
pub struct SharedBacking<B = crate::fuse::BackingId> {
    pub value: B,
    serial: u64,
    table: Arc<Backings<B>>,
}

/// A node's file opened once for all its read-only opens that share it while any is open:
/// every process that maps a library or runs a program holds an open of it for as long, and
/// without sharing each of them would hold a descriptor of the daemon. Shared: lower files,
/// and the upper files the kernel opens to run (no one can fsync through those). Every other
/// open of an upper file has a descriptor of its own, as kernel overlayfs gives each open its
/// own file of the upper, so that each reports the write errors since its open at `fsync` (a
/// shared descriptor would report an error to one of them, and to later opens that should
/// not see it).
pub type SharedFd = SharedBacking<Arc<OwnedFd>>;

/// The shared read-only fds of the nodes (see `SharedFd`).
pub type FdShares = Backings<Arc<OwnedFd>>;

impl<B> Drop for SharedBacking<B> {
    fn drop(&mut self) {
        self.table.release(self.serial);
    }
}

impl<B> Default for Backings<B> {
    fn default() -> Backings<B> {
        Backings {
            by_serial: ShardedMap::default(),
        }
    }
}

impl<B> Backings<B> {
    /// The entries of the shard of the node with this serial.
    fn shard(&self, serial: u64) -> MutexGuard<'_, HashMap<u64, Backing<B>>> {
        self.by_serial.shard(serial)
    }

    /// The node's live shared value if it is of the object `id`.
    fn get(&self, serial: u64, id: RealId) -> Option<Arc<SharedBacking<B>>> {
        let shard = self.shard(serial);
        let (of, weak) = shard.get(&serial)?;
        if *of == id { weak.upgrade() } else { None }
    }

    /// Makes `value` (of the object `id`) the node's shared value in `shard`, the node's shard
    /// of this table, held by the caller (the holders of an earlier one keep it).
    fn insert(
        self: &Arc<Self>,
        shard: &mut HashMap<u64, Backing<B>>,
        serial: u64,
        id: RealId,
        value: B,
    ) -> Arc<SharedBacking<B>> {
        let shared = Arc::new(SharedBacking {
            value,
            serial,
            table: self.clone(),
        });
        shard.insert(serial, (id, Arc::downgrade(&shared)));
        shared
    }

    /// Drops the node's entry if nothing holds its value any more. Never called with the
    /// shard held: `backing_for` and `get` let go of it before a hold they took can be dropped.
    fn release(&self, serial: u64) {
        let mut shard = self.shard(serial);
        if shard
            .get(&serial)
            .is_some_and(|(_, weak)| weak.strong_count() == 0)
        {
            shard.remove(&serial);
        }
    }
}

/// What a passthrough open does, from the file the kernel already passes the node's opens
/// through to (`shared`, if any), the file the open got (`fd`) and the node's upper copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Choice {
    /// Use the shared backing: the same file.
    Share,
    /// Open the upper copy instead: `fd` is the lower file, opened just before a copy-up of
    /// the node finished (read-only opens choose their file without the copy lock).
    Reopen,
    /// Move the name to a new node: `fd` is the upper copy and the kernel passes the node's
    /// other opens through to the lower file (opened before the copy-up), and it accepts no
    /// other kind of open on the inode.
    Split,
    /// Register `fd` as the node's backing.
    New,
}

impl Choice {
    fn of(shared: Option<RealId>, fd: RealId, upper: Option<RealId>) -> Choice {
        match shared {
            Some(s) if s == fd => Choice::Share,
            _ if upper.is_some_and(|u| u != fd) => Choice::Reopen,
            Some(_) => Choice::Split,
            None => Choice::New,
        }
    }
}

pub struct FileHandle {
    pub node: Arc<Node>,
    /// Keeps the shared backing id alive while this open uses it.
    backing: Option<Arc<SharedBacking>>,
    fd: RwLock<Arc<OwnedFd>>,
    /// `fd`'s entry in the table of shared fds, while `fd` is the shared one.
    share: Mutex<Option<Arc<SharedFd>>>,
    /// The node's `data_gen` when `fd` was opened.
    opened_gen: AtomicU64,
    pub writable: bool,
    /// Opened to run the program (counted in the node's `exec_opens` until released).
    exec: bool,
    /// Opened for writing an append-only file (see `Union::open`).
    append_only: bool,
    /// Served by the daemon on a passthrough mount (counted in the node's `direct_opens`).
    direct: bool,
    /// Opened with O_DIRECT (a later `fcntl` that sets or clears it is not seen).
    o_direct: bool,
}

impl Drop for FileHandle {
    fn drop(&mut self) {
        if self.exec {
            self.node.extra().exec_opens.fetch_sub(1, Ordering::SeqCst);
        }
        if self.direct {
            self.node
                .extra()
                .direct_opens
                .fetch_sub(1, Ordering::SeqCst);
        }
        if self.writable {
            self.node
                .extra()
                .writable_opens
                .fetch_sub(1, Ordering::SeqCst);
        }
    }
}

/// Attempts to read a node's name and lock its directory before its split gives up.
const SPLIT_TRIES: usize = 8;

/// The kernel's `__FMODE_EXEC`, set in the flags of the open that execve makes.
pub const FMODE_EXEC: i32 = 0x20;

impl FileHandle {
    /// `opened_gen`: the node's `data_gen` read before `fd` was opened (a copy-up finishing
    /// in between then moves the handle to the copy on its first read).
    pub fn new(node: Arc<Node>, fd: Arc<OwnedFd>, opened_gen: u64, writable: bool) -> FileHandle {
        if writable {
            node.extra().writable_opens.fetch_add(1, Ordering::SeqCst);
        }
        FileHandle {
            node,
            fd: RwLock::new(fd),
            share: Mutex::new(None),
            opened_gen: AtomicU64::new(opened_gen),
            writable,
            exec: false,
            append_only: false,
            direct: false,
            o_direct: false,
            backing: None,
        }
    }

    pub fn fd(&self) -> Arc<OwnedFd> {
        self.fd.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

const SHARDS: usize = 16;

/// A map from handle numbers or node serials, sharded so that requests on different keys
/// rarely wait for each other.
struct ShardedMap<V> {
    shards: Vec<Mutex<HashMap<u64, V>>>,
}

impl<V> Default for ShardedMap<V> {
    fn default() -> Self {
        ShardedMap {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }
}

impl<V> ShardedMap<V> {
    fn shard(&self, key: u64) -> MutexGuard<'_, HashMap<u64, V>> {
        self.shards[key as usize % SHARDS]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
pub struct Handles {
    files: ShardedMap<Arc<FileHandle>>,
    /// The fds shared by read-only opens (see `SharedFd`).
    shares: Arc<FdShares>,
    /// Node number -> the handle number of its latest writable open, while that is open.
    writers: ShardedMap<u64>,
    dirs: ShardedMap<Arc<DirHandle>>,
    next: AtomicU64,
    pub read_bufs: ReadBufs,
}

impl Handles {
    pub fn add_file(&self, h: FileHandle) -> u64 {
        let fh = self.next.fetch_add(1, Ordering::Relaxed) + 1;
        let writer = h.writable.then_some(h.node.ino);
        self.files.shard(fh).insert(fh, Arc::new(h));
        if let Some(ino) = writer {
            self.writers.shard(ino).insert(ino, fh);
        }
        fh
    }

    pub fn file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        self.files.shard(fh).get(&fh).cloned()
    }

    pub fn remove_file(&self, fh: u64) -> Option<Arc<FileHandle>> {
        let h = self.files.shard(fh).remove(&fh)?;
        if h.writable {
            let ino = h.node.ino;
            let mut w = self.writers.shard(ino);
            if w.get(&ino) == Some(&fh) {
                w.remove(&ino);
            }
        }
        Some(h)
    }

    /// The latest writable open of node `ino`, while it is open.
    fn latest_writer(&self, ino: u64) -> Option<Arc<FileHandle>> {
        let fh = *self.writers.shard(ino).get(&ino)?;
        self.file(fh)
    }

    /// Every open handle of node `ino`.
    fn files_of(&self, ino: u64) -> Vec<Arc<FileHandle>> {
        self.files
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .values()
                    .filter(|h| h.node.ino == ino)
                    .cloned()
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Any open handle of a node (for nodes that have lost their last name).
    pub fn any_file_of(&self, ino: u64) -> Option<Arc<FileHandle>> {
        self.file_of(ino, |_| true)
    }

    /// Whether some open handle of a node can write.
    pub fn any_writable_file_of(&self, ino: u64) -> bool {
        self.file_of(ino, |h| h.writable).is_some()
    }

    fn file_of(&self, ino: u64, want: impl Fn(&FileHandle) -> bool) -> Option<Arc<FileHandle>> {
        self.files.shards.iter().find_map(|s| {
            s.lock()
                .unwrap_or_else(|p| p.into_inner())
                .values()
                .find(|h| h.node.ino == ino && want(h))
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

/// The data of a READ's answer (see `Union::read`).
pub enum ReadData<'a> {
    /// `size` bytes (at most) of `fd` at `off`, to be spliced through `pipe`
    /// (`Reply::data_spliced`).
    File {
        pipe: &'a mut Option<sys::Pipe>,
        fd: BorrowedFd<'a>,
        off: u64,
        size: usize,
    },
    /// Bytes read into the daemon's buffer.
    Copied(&'a [u8]),
}

/// Buffers and pipes for the data of READ replies (the page-cached path), shared by the
/// serving threads. They are dropped once reads stop, so a mount that once read a large file
/// does not keep a megabyte per thread for the rest of its life.
#[derive(Default)]
pub struct ReadBufs {
    free: Mutex<Vec<Vec<u8>>>,
    /// Pipes for answers spliced from the file (see `Reply::data_spliced`).
    pipes: Mutex<Vec<sys::Pipe>>,
    /// Pipes lent or pooled (at most `read_pipes()`).
    live_pipes: AtomicUsize,
    /// Whether a read took a buffer or a pipe since the last `release_idle`.
    used: AtomicBool,
}

/// Pipes for spliced READ answers (see `Reply::data_spliced`) hold this much where the daemon
/// may pass the default limit of 1 MiB a pipe (`CAP_SYS_RESOURCE`): the largest READ (1 MiB),
/// its header and an unaligned start...
const READ_PIPE_WANT: usize = 2 << 20;
/// ...else this much, for READs of up to 508 KiB (a rootless mount's read-ahead asks for 128
/// or 256 KiB at a time; larger READs are copied). The pipes of an unprivileged daemon count
/// against its user's pipe budget (`pipe-user-pages-soft`, 16,384 pages by default; past it
/// the user's new pipes get two pages each), so they are kept small and few, and the pool is
/// emptied once reads stop.
const READ_PIPE_MIN: usize = 512 << 10;
/// Most pipes the pool lends at once; further READs at the same moment are copied.
const READ_PIPES: usize = 4;

/// `READ_PIPES`, or fewer under a low limit on open files: each pipe takes two, and the fd
/// cache is sized from the limit without them (one pipe per 128 files it allows).
fn read_pipes() -> usize {
    static MAX: OnceLock<usize> = OnceLock::new();
    *MAX.get_or_init(|| READ_PIPES.min((sys::nofile_limit() / 128) as usize))
}

impl ReadBufs {
    fn free(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Vec<u8> {
        self.used.store(true, Ordering::Relaxed);
        self.free().pop().unwrap_or_default()
    }

    fn give(&self, buf: Vec<u8>) {
        self.free().push(buf);
    }

    fn pipes(&self) -> MutexGuard<'_, Vec<sys::Pipe>> {
        self.pipes.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A pipe from the pool, or a new one; None if `read_pipes()` are lent already or none
    /// can be made.
    fn take_pipe(&self) -> Option<sys::Pipe> {
        self.used.store(true, Ordering::Relaxed);
        if let Some(p) = self.pipes().pop() {
            return Some(p);
        }
        let lent = self.live_pipes.fetch_add(1, Ordering::SeqCst);
        let made = (lent < read_pipes())
            .then(|| sys::Pipe::new(READ_PIPE_MIN, READ_PIPE_WANT))
            .flatten();
        if made.is_none() {
            self.live_pipes.fetch_sub(1, Ordering::SeqCst);
        }
        made
    }

    /// Gives back a pipe `take_pipe` lent; None when it was dropped (a failure left bytes in
    /// it).
    fn give_pipe(&self, pipe: Option<sys::Pipe>) {
        match pipe {
            Some(p) => self.pipes().push(p),
            None => {
                self.live_pipes.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Frees the pooled buffers and pipes if no read needed one since the last call.
    pub fn release_idle(&self) {
        if !self.used.swap(false, Ordering::Relaxed) {
            let idle = std::mem::take(&mut *self.free());
            drop(idle);
            let idle = std::mem::take(&mut *self.pipes());
            self.live_pipes.fetch_sub(idle.len(), Ordering::SeqCst);
            drop(idle);
        }
    }

    /// Whether buffers or pipes wait in the pool (to be freed once reads stop).
    pub fn any_pooled(&self) -> bool {
        !self.free().is_empty() || !self.pipes().is_empty()
    }

    #[cfg(test)]
    fn pooled(&self) -> usize {
        self.free().len()
    }

    #[cfg(test)]
    fn pooled_pipes(&self) -> usize {
        self.pipes().len()
    }
}

/// Writes of at least this many bytes start the upper file's writeback (see `Union::write`).
const START_WRITEBACK: usize = 512 * 1024;

/// Flags kept on the real fd; the rest are the kernel's business (O_APPEND included: writes
/// arrive with their offsets). O_NOATIME reaches the upper file (the kernel has checked that
/// the caller may use it).
fn real_flags(flags: i32) -> i32 {
    flags & (libc::O_ACCMODE | libc::O_SYNC | libc::O_DSYNC | libc::O_TRUNC | libc::O_NOATIME)
}

impl Union {
    /// `real_flags` for an open of an upper file, with O_NOATIME on a `noatime` mount: the
    /// upper's own mount would otherwise time the reads the kernel sends (`open_upper` drops
    /// it where the daemon may not use it).
    fn upper_flags(&self, flags: i32) -> i32 {
        real_flags(flags)
            | if self.opts.noatime {
                libc::O_NOATIME
            } else {
                0
            }
    }

    /// Opens a file; returns the handle id and how the kernel is to do its I/O.
    /// `make_backing` registers an fd as a passthrough backing file with the kernel.
    pub fn open(
        &self,
        node: &Arc<Node>,
        flags: i32,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> Result<(u64, IoMode)> {
        self.open_file(node, flags, make_backing)
            .map_err(|e| self.stale_if_removed(node, e))
    }

    fn open_file(
        &self,
        node: &Arc<Node>,
        flags: i32,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> Result<(u64, IoMode)> {
        if node.is_dir() {
            return Err(Errno::EISDIR);
        }
        let acc = flags & libc::O_ACCMODE;
        let trunc = flags & libc::O_TRUNC != 0;
        let writable = acc != libc::O_RDONLY;
        // Read before the layer is chosen: a lower fd belongs to the data of this moment.
        let mut generation = node.data_gen();
        // Append-only and immutable flags refuse the open first, as the kernel's may_open.
        // A writable open of an append-only file on the page-cached path is served by the
        // daemon (direct I/O), which refuses writes below its end (after an fcntl cleared
        // O_APPEND, or with RWF_NOAPPEND; see `write`). With passthrough the kernel opens the
        // backing file with this open's flags, O_APPEND included, and writes through it (it
        // takes no open of another kind on an inode open for passthrough).
        let mut append_only = false;
        if (writable || trunc) && !self.layers.read_only() {
            let prot = self.prot(node)?;
            crate::protect::check_open(prot, flags)?;
            append_only =
                writable && prot & crate::protect::APPEND != 0 && !self.passthrough_active();
        }
        // The kernel checks for a running program only after this open has truncated (it
        // lets the filesystem do O_TRUNC itself), so a truncating open of one is refused here,
        // before any data is lost.
        if trunc && node.exec_opens() > 0 {
            return Err(Errno::ETXTBSY);
        }
        let (fd, share) = if writable || trunc {
            if self.layers.read_only() {
                return Err(Errno::EROFS);
            }
            // A metadata-only copy in the upper: writing it (truncated or not) would leave a
            // file whose mark still refuses it, or data around zeros. (One in a lower layer
            // is refused by the copy-up.)
            // A file replaced by a rename (held since, see `Extra::held`) is checked through
            // its held object, as it is opened through it.
            if self.top_loc(node) == Loc::Upper {
                let format = self.layers.format;
                self.with_object_or_fd(node, Loc::Upper, None, true, |d, name| {
                    crate::whiteout::refuse_metacopy(d, name, format)
                })?;
            }
            // A writable open of a node split already (through /proc/PID/fd of one of its
            // files): the kernel takes no open on it but one passed through to the lower
            // file while its others are open (a limit the README states). Refused before the
            // copy is opened, which O_TRUNC would empty.
            if self.split_file(node).is_some() {
                return Err(Errno::ESTALE);
            }
            self.copy_up_with(node, if trunc { Data::Nothing } else { Data::All })?;
            generation = node.data_gen();
            let real = self.upper_flags(flags);
            let fd = if append_only {
                self.open_upper(node, real)?
            } else if self.writeback_active() && acc == libc::O_WRONLY {
                // With writeback caching the kernel reads back pages that a write covers
                // only in part, through whichever writable handle it holds. Those reads are
                // no access by the caller, who cannot read: they leave the access time alone,
                // as the write does on a local filesystem.
                let rw = (real & !libc::O_ACCMODE) | libc::O_RDWR | libc::O_NOATIME;
                match self.open_upper(node, rw) {
                    Err(e) if e.code() == libc::EACCES => self.open_upper(node, real)?,
                    r => r?,
                }
            } else {
                match self.open_upper(node, real) {
                    // An append-only file (the flag set through the view) opens for writing
                    // only with O_APPEND: the caller asked for appends, so its writes all land
                    // at the end, where the kernel sends them. Not with writeback caching
                    // above (its page writes must land where they are sent).
                    Err(e) if e.code() == libc::EPERM && flags & libc::O_APPEND != 0 => {
                        self.open_upper(node, real | libc::O_APPEND)?
                    }
                    r => r?,
                }
            };
            (Arc::new(fd), None)
        } else if let Some(h) = self.split_file(node) {
            // A split node's files pass through to the lower file, and the kernel takes no
            // other kind of open on it while they last: a new read-only one (through
            // /proc/PID/fd) shares it, and the daemon's fd of it.
            (h.fd(), None)
        } else if let upper = self.top_loc(node) == Loc::Upper
            && (!upper || flags & FMODE_EXEC != 0)
        {
            let share = self.open_shared(node, upper, flags)?;
            (share.value.clone(), Some(share))
        } else {
            let fd = self.open_upper(node, self.upper_flags(flags))?;
            crate::whiteout::refuse_metacopy(fd.as_fd(), c"", self.layers.format)?;
            (Arc::new(fd), None)
        };
        self.add_handle_at(
            node,
            fd,
            share,
            generation,
            flags,
            append_only,
            make_backing,
        )
    }

    /// The node's upper or top lower file for a read-only open that shares it (see
    /// `SharedFd`): the fd the node's other such opens share, else a new one, shared from now
    /// on. Keyed by the object, so the opens of the lower file and those of its copy share
    /// nothing.
    fn open_shared(&self, node: &Node, upper: bool, flags: i32) -> Result<Arc<SharedFd>> {
        let id = {
            let st = node.state();
            match upper {
                true => st.upper,
                false => st.lowers.first().map(|(_, id)| *id),
            }
        };
        let shares = &self.handles.shares;
        if let Some(share) = id.and_then(|id| shares.get(node.serial, id)) {
            return Ok(share);
        }
        let fd = match upper {
            true => self.open_upper(node, self.upper_flags(flags))?,
            false => self.open_lower_data(node)?,
        };
        crate::whiteout::refuse_metacopy(fd.as_fd(), c"", self.layers.format)?;
        // The node's object in that layer is what was opened (lower layers do not change; the
        // upper object is the node's own).
        let id = match id {
            Some(id) => id,
            None => RealId::of(&sys::fstat(fd.as_fd())?),
        };
        let mut shard = shares.shard(node.serial);
        Ok(shares.insert(&mut shard, node.serial, id, Arc::new(fd)))
    }

    /// Opens the node's upper object with `flags`, dropping an O_NOATIME the daemon may not
    /// use on it (it neither owns the file nor has CAP_FOWNER over it).
    fn open_upper(&self, node: &Node, flags: i32) -> Result<OwnedFd> {
        match self.open_in(node, Loc::Upper, flags) {
            Err(e) if e.code() == libc::EPERM && flags & libc::O_NOATIME != 0 => {
                self.open_in(node, Loc::Upper, flags & !libc::O_NOATIME)
            }
            // No name (an unnamed temporary file, or one deleted while open, reopened through
            // /proc/self/fd): through its upper object's open fd.
            Err(e) => {
                let fd = self.nameless_fd(node, None, true, e)?;
                sys::reopen(fd.as_fd(), flags & !libc::O_NOATIME)
            }
            r => r,
        }
    }

    /// Registers an open file of `node` (opened with `flags`) and decides its I/O mode.
    pub fn add_handle(
        &self,
        node: &Arc<Node>,
        fd: OwnedFd,
        flags: i32,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> Result<(u64, IoMode)> {
        let generation = node.data_gen();
        self.add_handle_at(
            node,
            Arc::new(fd),
            None,
            generation,
            flags,
            false,
            make_backing,
        )
    }

    /// `add_handle` for an fd opened after the node's `data_gen` was `generation`, shared
    /// through `share` if that is given; `append_only`: a writable open of an append-only file
    /// served by the daemon (see `open`), whose writes from the page cache are checked (see
    /// `write`).
    #[allow(clippy::too_many_arguments)]
    fn add_handle_at(
        &self,
        node: &Arc<Node>,
        fd: Arc<OwnedFd>,
        share: Option<Arc<SharedFd>>,
        generation: u64,
        flags: i32,
        append_only: bool,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> Result<(u64, IoMode)> {
        let (mut fd, mut share) = (fd, share);
        let passthrough = self.passthrough_active();
        let mode = if append_only {
            if passthrough {
                node.extra().direct_opens.fetch_add(1, Ordering::SeqCst);
            }
            IoMode::Direct
        } else if passthrough {
            match self.backing_for(node, fd.as_fd(), make_backing)? {
                Some(mode) => mode,
                None => {
                    // A read-only open that reached the lower file just before a copy-up of
                    // the node finished: it opens the copy instead.
                    fd = Arc::new(self.open_upper(node, self.upper_flags(flags))?);
                    share = None;
                    self.backing_for(node, fd.as_fd(), make_backing)?
                        .ok_or(Errno::ESTALE)?
                }
            }
        } else if flags & libc::O_ACCMODE != libc::O_RDONLY
            && self.writeback_active()
            && self.short_of_room()
        {
            // The kernel's write-back cache would take writes the upper has no room for,
            // and report them only at fsync or close: with little room left, writes go to
            // the upper at once and fail there (ENOSPC), as on ext4.
            IoMode::Direct
        } else {
            IoMode::Cached
        };
        let writable = flags & libc::O_ACCMODE != libc::O_RDONLY;
        let mut h = FileHandle::new(node.clone(), fd, generation, writable);
        h.share = Mutex::new(share);
        h.append_only = append_only;
        h.o_direct = flags & libc::O_DIRECT != 0;
        if let IoMode::Passthrough(b) = &mode {
            h.backing = Some(b.clone());
        }
        if flags & FMODE_EXEC != 0 {
            node.extra().exec_opens.fetch_add(1, Ordering::SeqCst);
            h.exec = true;
        }
        // Counted in the node's `direct_opens` already (by `backing_for`, under the lock
        // that orders it against a new backing).
        h.direct = matches!(mode, IoMode::Direct) && passthrough;
        Ok((self.handles.add_file(h), mode))
    }

    /// An open handle writing `node`'s upper object, which reaches it without a path walk:
    /// the handle a request names, else the node's latest writable open while it is open.
    pub fn writable_handle(&self, node: &Arc<Node>, fh: Option<u64>) -> Option<Arc<FileHandle>> {
        fh.and_then(|fh| self.handles.file(fh))
            .into_iter()
            .chain(self.handles.latest_writer(node.ino))
            .find(|h| h.writable && Arc::ptr_eq(&h.node, node))
    }

    /// An fd of `node`'s upper object held by one of its open handles (preferring `fh`),
    /// for a node whose upper object has no name left. Never one of a lower object.
    pub fn upper_fd_of_open(&self, node: &Node, fh: Option<u64>) -> Option<Arc<OwnedFd>> {
        let upper = node.state().upper?;
        // A split node's handles are all on the lower file; the daemon holds the copy.
        if let Some(copy) = node.moved_to() {
            return Some(copy);
        }
        let named = fh.and_then(|fh| self.handles.file(fh));
        named
            .into_iter()
            .chain(self.handles.files_of(node.ino))
            .filter(|h| h.node.ino == node.ino)
            .map(|h| h.fd())
            .find(|fd| sys::fstat(fd.as_fd()).is_ok_and(|st| RealId::of(&st) == upper))
    }

    /// Moves the read-only handles of `node` that still read the lower object it was copied
    /// up from (see `read_fd`) to the upper copy, while a name reaches it: called before a
    /// name of the copy goes, after which they could not follow it (kernel overlayfs keeps
    /// its inode's upper object for them).
    pub fn follow_copy_up(&self, node: &Node) {
        if node.is_dir() || node.data_gen() == 0 {
            return;
        }
        for h in self.handles.files_of(node.ino) {
            self.read_fd(&h);
        }
    }

    /// The passthrough backing for an open of `node` on `fd` (see `Choice`): the node's
    /// shared one, a new one (direct I/O if the kernel refuses it), ESTALE after moving the
    /// name to a new node, or None if `fd` is a lower file the node no longer shows. A direct
    /// I/O answer is counted in the node's `direct_opens` before the backings' lock is let
    /// go, so that an open racing with it cannot make a backing for the node meanwhile.
    fn backing_for(
        &self,
        node: &Node,
        fd: BorrowedFd<'_>,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> Result<Option<IoMode>> {
        let id = RealId::of(&sys::fstat(fd)?);
        let mut backings = self.backings.shard(node.serial);
        let shared = backings
            .get(&node.serial)
            .and_then(|(bid, weak)| Some((*bid, weak.upgrade()?)));
        let upper = node.state().upper;
        match Choice::of(shared.as_ref().map(|s| s.0), id, upper) {
            Choice::Share => Ok(shared.map(|(_, b)| IoMode::Passthrough(b))),
            Choice::Reopen => {
                // The shard is let go before the hold on the shared id, whose drop may take it.
                drop(backings);
                drop(shared);
                Ok(None)
            }
            Choice::Split => {
                drop(backings);
                drop(shared);
                Err(self.split_node(node, id, fd))
            }
            // The kernel refuses passthrough on an inode whose direct-I/O file was mapped
            // (the open fails with EIO), and a mapping of one while passthrough opens exist
            // (ENODEV): while the daemon serves an open of the node (its lower file could not
            // be a backing file, say), it serves the new ones too.
            Choice::New
                if node
                    .extra_if_made()
                    .is_some_and(|e| e.direct_opens.load(Ordering::SeqCst) > 0) =>
            {
                node.extra().direct_opens.fetch_add(1, Ordering::SeqCst);
                Ok(Some(IoMode::Direct))
            }
            Choice::New => match self.backing_file(fd, upper == Some(id), make_backing) {
                Ok(b) => {
                    let b = self.backings.insert(&mut backings, node.serial, id, b);
                    Ok(Some(IoMode::Passthrough(b)))
                }
                Err(e) => {
                    // Served by the daemon; direct I/O can share the inode with passthrough
                    // opens.
                    log::debug!("passthrough backing refused: {e}");
                    node.extra().direct_opens.fetch_add(1, Ordering::SeqCst);
                    Ok(Some(IoMode::Direct))
                }
            },
        }
    }

    /// Registers `fd` as a backing file; on a `noatime` mount, an upper file is registered
    /// as opened on the copy of the upper's mount that times no access (as the lower layers'
    /// copies do), where the kernel can open it so.
    fn backing_file(
        &self,
        fd: BorrowedFd<'_>,
        is_upper: bool,
        make_backing: &dyn Fn(BorrowedFd<'_>) -> std::io::Result<crate::fuse::BackingId>,
    ) -> std::io::Result<crate::fuse::BackingId> {
        if is_upper && let Some(mount) = &self.layers.upper_noatime {
            // The backing file's own flags do not matter (the kernel opens it again with the
            // open's flags), only its mount.
            match sys::reopen_on_mount(fd, mount.as_fd(), libc::O_RDONLY) {
                Ok(f) => return make_backing(f.as_fd()),
                Err(e) => log::debug!("noatime: upper file not reopened on its copy: {e:?}"),
            }
        }
        make_backing(fd)
    }

    /// Moves the name of `node` to a fresh node for the object `id`, so that the kernel gets a
    /// new inode for it, and returns ESTALE: the kernel then looks the name up again and retries
    /// the open once, on the new inode. The old inode keeps serving the files already open on
    /// it (with the data they had, as in kernel overlayfs).
    fn split_node(&self, node: &Node, id: RealId, copy: BorrowedFd<'_>) -> Errno {
        // The old inode's files sync the copy (as kernel overlayfs's do) through a file of
        // the daemon's own: not the new open's, whose write errors that would report.
        let copy = match sys::reopen(copy, libc::O_RDONLY) {
            Ok(f) => Some(Arc::new(f)),
            Err(e) => {
                log::debug!("passthrough: no file to sync the copy through: {e:?}");
                None
            }
        };
        // The name is read, then its directory locked: a rename in between moves it, and the
        // name is read again.
        for _ in 0..SPLIT_TRIES {
            let Some((parent, name)) = node
                .state()
                .links
                .first()
                .map(|l| (l.parent.clone(), l.name.to_os_string()))
            else {
                // A racing open split it first: the name is on the new node already.
                return node.nameless_error();
            };
            {
                let _dir = parent.lock_dir();
                let named = node.state().links.contains(parent.ino, &name);
                if !named {
                    continue;
                }
                if node.split.swap(true, Ordering::SeqCst) {
                    // Two opens found the node to split at once; the other one did it.
                    return node.nameless_error();
                }
                // The node keeps the copy as its upper object, reached through the daemon's
                // file of it: its attributes and changes through its files are the copy's,
                // as on kernel overlayfs (only its passthrough reads stay on the lower file).
                self.tree_change(|| {
                    self.table.remove_id(node, id);
                    self.table.unlink(node, &parent, &name);
                    if let Some(copy) = copy.clone() {
                        node.set_moved_to(copy);
                    }
                });
            }
            self.dir_changed(&parent);
            // Its attributes are the copy's from now on, and are never kept (see `attr_ttl`).
            self.invalidate_attrs(node.ino);
            log::debug!("passthrough: {name:?} moves to a new inode after copy-up");
            self.invalidate_entry(parent.ino, &name);
            // Its other names that are the copy (links made since the copy-up) go too: looked
            // up again, they find the new node, so that every name of the copy shows one
            // inode. (Other names of a lower hard link still show the lower file.)
            let others: Vec<_> = node
                .state()
                .links
                .iter()
                .map(|l| (l.parent.clone(), l.name.to_os_string()))
                .collect();
            for (parent, name) in others {
                {
                    let _dir = parent.lock_dir();
                    let is_copy = sys::cstr(&name).ok().is_some_and(|cname| {
                        self.dir_fd(&parent, Loc::Upper)
                            .and_then(|d| sys::fstatat(d.as_fd(), &cname, 0))
                            .is_ok_and(|st| RealId::of(&st) == id)
                    });
                    if !is_copy {
                        continue;
                    }
                    self.tree_change(|| {
                        self.table.unlink(node, &parent, &name);
                    });
                }
                self.dir_changed(&parent);
                self.invalidate_entry(parent.ino, &name);
            }
            return Errno::ESTALE;
        }
        // Renamed again and again meanwhile: the kernel retries the open, which tries again.
        Errno::ESTALE
    }

    /// An open file of `node` if it is a split node.
    fn split_file(&self, node: &Arc<Node>) -> Option<Arc<FileHandle>> {
        if !node.is_split() {
            return None;
        }
        self.handles
            .file_of(node.ino, |h| Arc::ptr_eq(&h.node, node))
    }

    /// After a change through a split node's files: the node its name moved to shows the
    /// same object, and the kernel's attributes of it are out of date.
    /// (A lookup making the new node that stats the copy before such a change and registers
    /// the node after this ran lets the kernel keep the older attributes for the TTL.)
    pub(crate) fn changed_through_split(&self, node: &Node) {
        if let Some(ino) = self.split_copy_ino(node) {
            self.invalidate_attrs(ino);
        }
    }

    /// For a split node: the number of the node its name moved to, which shows its copy.
    pub(crate) fn split_copy_ino(&self, node: &Node) -> Option<u64> {
        if !node.is_split() {
            return None;
        }
        let copy = node.state().upper?;
        self.table.ino_holding(copy)
    }

    fn handle(&self, fh: u64) -> Result<Arc<FileHandle>> {
        self.handles.file(fh).ok_or(Errno::EBADF)
    }

    /// The fd to read through, switching a read-only handle to the upper copy once the file
    /// has been copied up.
    fn read_fd(&self, h: &FileHandle) -> Arc<OwnedFd> {
        let now = h.node.data_gen();
        // A passthrough open stays on its backing file, which the kernel reads: what the
        // daemon answers for it (seeks for data and holes, copies from it, its size) comes
        // from the same file.
        if h.writable || h.backing.is_some() || h.opened_gen.load(Ordering::SeqCst) == now {
            return h.fd();
        }
        if let Ok(fd) = self.open_upper(&h.node, self.upper_flags(libc::O_RDONLY)) {
            *h.fd.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(fd);
            // The lower file it shared is no longer its file.
            *h.share.lock().unwrap_or_else(|p| p.into_inner()) = None;
            h.opened_gen.store(now, Ordering::SeqCst);
        }
        h.fd()
    }

    /// Reads up to `size` bytes at `off` and hands them to `reply`, which answers the READ
    /// and returns the bytes it sent, or None where it could not send `ReadData::File` (the
    /// data is then read and handed over as `ReadData::Copied`).
    /// `cached`: the kernel reads through its page cache (no passthrough, no `O_DIRECT`).
    pub fn read(
        &self,
        fh: u64,
        off: u64,
        size: u32,
        cached: bool,
        mut reply: impl FnMut(ReadData<'_>) -> Option<usize>,
    ) -> Result<()> {
        let h = self.handle(fh)?;
        // The data generation the fd belongs to, read before the fd (see `stream`).
        let generation = h.node.data_gen();
        let fd = self.read_fd(&h);
        let mut spliced = None;
        if size as usize >= crate::fuse::reply::SPLICE_MIN {
            if let Some(p) = self.handles.read_bufs.take_pipe() {
                let mut pipe = Some(p);
                spliced = reply(ReadData::File {
                    pipe: &mut pipe,
                    fd: fd.as_fd(),
                    off,
                    size: size as usize,
                });
                self.handles.read_bufs.give_pipe(pipe);
            }
        }
        let res = match spliced {
            Some(n) => Ok(n),
            None => self.read_copied(&fd, off, size, &mut reply),
        };
        // The trimmer frees the pools once reads stop (and sleeps only while they are empty).
        self.table.stir();
        let n = res?;
        // Stream a lower file ahead of a sequential reader: only full reads of the lower data
        // the handle was opened on, at the generation read before the fd.
        if cached
            && n == size as usize
            && !h.writable
            && h.opened_gen.load(Ordering::SeqCst) == generation
            && matches!(self.top_loc(&h.node), Loc::Lower(_))
            && !self.passthrough_active()
        {
            self.streams.read(&h.node, &fd, generation, off, n as u64);
        }
        Ok(())
    }

    /// Reads up to `size` bytes at `off` into a pooled buffer and hands them to `reply`.
    fn read_copied(
        &self,
        fd: &OwnedFd,
        off: u64,
        size: u32,
        reply: &mut impl FnMut(ReadData<'_>) -> Option<usize>,
    ) -> Result<usize> {
        let mut buf = self.handles.read_bufs.take();
        if buf.len() < size as usize {
            buf.resize(size as usize, 0);
        }
        let res: Result<usize> = (|| {
            let mut n = 0;
            while n < size as usize {
                let got = sys::pread(fd.as_fd(), &mut buf[n..size as usize], off + n as u64)?;
                if got == 0 {
                    break;
                }
                n += got;
            }
            reply(ReadData::Copied(&buf[..n]));
            Ok(n)
        })();
        self.handles.read_bufs.give(buf);
        res
    }

    /// A WRITE; `from_cache`: the kernel writes back pages it caches (FUSE_WRITE_CACHE).
    pub fn write(&self, fh: u64, off: u64, data: &[u8], from_cache: bool) -> Result<u32> {
        let h = self.handle(fh)?;
        if !h.writable {
            return Err(Errno::EBADF);
        }
        let fd = h.fd();
        if h.append_only && !from_cache {
            // A write below the end of an append-only file (the kernel sends appends at the
            // end it knows): refused, as kernel overlayfs refuses the fcntl or the
            // RWF_NOAPPEND that lets one be made.
            let appending = self.prot(&h.node)? & crate::protect::APPEND != 0;
            if appending && off < sys::fstat(fd.as_fd())?.st_size as u64 {
                return Err(Errno::EPERM);
            }
        }
        if h.append_only && from_cache {
            // The kernel writes pages back through any writable file of the inode. Pages of
            // a file opened before the flag was set (which writes in place, as on kernel
            // overlayfs), or written after it was cleared, go where they lie. Others come from
            // a shared mapping of this file, which kernel overlayfs refuses: they are refused,
            // and dropped from the kernel's cache so that readers see the file as it is.
            let node = &h.node;
            let in_place = self.prot(node)? & crate::protect::APPEND == 0
                || self
                    .handles
                    .file_of(node.ino, |o| o.writable && !o.append_only)
                    .is_some();
            if !in_place {
                if let Some(inv) = self.invalidator.get() {
                    inv.inode(node.ino);
                }
                return Err(Errno::EPERM);
            }
        }
        // A write-back of cached pages is no write(2): what a write(2) drops (set-ID bits,
        // capabilities) the kernel had dropped when it took the write, and a store through a
        // shared mapping drops nothing, as on ext4. The upper's own write path would drop them
        // all the same: they are put back, with the file's privileges lock held alone from
        // before the write to after, so that no other write sees them missing meanwhile and
        // no change through the view (a removexattr, a chmod, a write(2) that drops them) is
        // undone. Other writes hold it shared.
        let privs = self.privs_lock(&h.node);
        let mut shared = Some(privs.read().unwrap_or_else(|p| p.into_inner()));
        let mut alone = None;
        if from_cache && self.kept_of(fd.as_fd()).is_some() {
            shared = None;
            alone = Some(privs.write().unwrap_or_else(|p| p.into_inner()));
        }
        // Read again alone: another write-back may have put them back meanwhile.
        let kept = alone.as_ref().and_then(|_| self.kept_of(fd.as_fd()));
        let mut n = 0;
        let mut failed = None;
        {
            // See `Union::cached_writes`.
            let _writing =
                from_cache.then(|| self.cached_writes.read().unwrap_or_else(|p| p.into_inner()));
            while n < data.len() {
                match sys::pwrite(fd.as_fd(), &data[n..], off + n as u64) {
                    Ok(0) => break,
                    Ok(w) => n += w,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
        }
        if let Some(k) = kept {
            k.restore(fd.as_fd());
        }
        drop((shared, alone));
        if let Some(e) = failed {
            if !from_cache && n > 0 {
                // The caller learns of the rest from its next write.
                return Ok(n as u32);
            }
            // The kernel takes no count of a write-back: a part written is an error.
            if from_cache && e.code() == libc::ENOSPC {
                self.cached_write_failed(&h, off + n as u64, off + data.len() as u64, e.code());
            }
            return Err(e);
        }
        // With the kernel's writeback cache, large writes are its writeback of that cache: the
        // data is on its way to the disk, and the upper's writeback starts now instead of at
        // the fsync or 30 seconds later, overlapping the disk with the copies. Not with
        // `fsync=0` (`volatile`), which asks for no more disk writes than the upper's own.
        if n >= START_WRITEBACK && self.writeback_active() && self.opts.fsync {
            if let Err(e) = sys::start_writeback(fd.as_fd(), off, n as u64) {
                log::debug!("starting the upper's writeback: {e:?}");
            }
        }
        Ok(n as u32)
    }

    /// The kernel's write-back of cached bytes `from..end` of `h`'s file failed with `errno`
    /// (ENOSPC): the caller's write(2) succeeded long ago, and only an fsync or close will
    /// report it, so a program writing on and on would never learn. From here on, writes to
    /// the file through the cache are refused while the upper is short of room
    /// (`cached_write_refusal`): the kernel asks for the file's attributes before it caches a
    /// write, and that question is made to come at once. The kernel's cache drops the bytes
    /// (readers see what the upper holds), and the upper's file takes the size the kernel
    /// keeps for it (its own, under write-back caching), with a hole where the bytes failed.
    fn cached_write_failed(&self, h: &FileHandle, from: u64, end: u64, errno: i32) {
        let node = &h.node;
        if node.write_error() == 0 {
            let e = std::io::Error::from_raw_os_error(errno);
            log::warn!("writing back cached data of inode {}: {e}", node.ino);
        }
        node.set_write_error(errno);
        // The invalidation (of the pages and the attributes) goes through the queue: the
        // kernel waits for this reply, and nothing here may wait for the kernel.
        if let Some(inv) = self.invalidator.get() {
            inv.pages(node.ino, from, end - from);
        }
        // No write-back is under way meanwhile: one past `end` could end up cut off.
        let _alone = self
            .cached_writes
            .write()
            .unwrap_or_else(|p| p.into_inner());
        let fd = h.fd();
        if sys::fstat(fd.as_fd()).is_ok_and(|st| (st.st_size as u64) < end)
            && let Err(e) = sys::ftruncate(fd.as_fd(), end)
        {
            log::debug!("cannot give the upper file the cached size: {e:?}");
        }
    }

    /// Answers the error of a failed write-back (see `cached_write_failed`) to the kernel's
    /// question for the attributes of `node` through its open file `fh` before it caches a
    /// write (also asked before a read past the end it knows, or a seek from the end), while
    /// the upper is short of room. Read-only files are never refused; once there is room
    /// again, nothing is.
    pub fn cached_write_refusal(&self, node: &Node, fh: u64) -> Result<()> {
        let errno = node.write_error();
        if errno == 0 || !self.handles.file(fh).is_some_and(|h| h.writable) {
            return Ok(());
        }
        if !self.short_of_room() {
            // Unless another write-back failed since.
            node.clear_write_error(errno);
            return Ok(());
        }
        Err(Errno::from_i32(errno))
    }

    /// Whether the upper has less room than the kernel may cache for this mount's files
    /// before it writes them back (twice `cache_window`, for writes already on their way).
    pub fn short_of_room(&self) -> bool {
        let Some(upper) = &self.layers.upper else {
            return false;
        };
        match sys::fstatvfs(upper.root()) {
            // A filesystem that gives no size (tmpfs with `size=0`, ramfs, some network
            // and FUSE ones): its room is not known, so it is not taken to be short.
            Ok(st) if st.f_blocks == 0 => false,
            Ok(st) => {
                let room = st.f_bavail.saturating_mul(st.f_frsize);
                room < 2 * self.cache_window()
            }
            Err(_) => false,
        }
    }

    /// How many bytes of written data the kernel may hold in its cache for this mount: the
    /// dirty-page limit of its backing device info (FUSE mounts get 1% of the system's), read
    /// once; else that 1% worked out from the memory size and `vm.dirty_*`.
    fn cache_window(&self) -> u64 {
        *self.cache_window.get_or_init(|| {
            let read = |p: &str| std::fs::read_to_string(p).ok();
            let num = |s: Option<String>| s.and_then(|s| s.trim().parse::<u64>().ok());
            if let Some(dev) = self.bdi.get()
                && let Some(v) = num(read(&format!("/sys/class/bdi/{dev}/max_bytes")))
                && v > 0
            {
                return v;
            }
            let dirty = match num(read("/proc/sys/vm/dirty_bytes")) {
                Some(b) if b > 0 => b,
                _ => {
                    let total = read("/proc/meminfo")
                        .and_then(|m| {
                            let l = m.lines().find(|l| l.starts_with("MemTotal:"))?.to_string();
                            l.split_whitespace().nth(1)?.parse::<u64>().ok()
                        })
                        .map_or(8 << 30, |kib| kib * 1024);
                    let ratio = num(read("/proc/sys/vm/dirty_ratio")).unwrap_or(20);
                    total / 100 * ratio
                }
            };
            (dirty / 100).max(16 << 20)
        })
    }

    pub fn release(&self, fh: u64) {
        let Some(h) = self.handles.remove_file(fh) else {
            return;
        };
        if h.writable && h.backing.is_some() {
            // Writes through a shared mapping of a passthrough file change its times without
            // the kernel's FUSE inode knowing (a write(2) drops its cached attributes; a
            // mapping's page faults do not). Its last user is gone now: if its time is not
            // the one last sent, a stat must ask again.
            let e = h.node.extra();
            if !sys::fstat(h.fd().as_fd()).is_ok_and(|st| e.sent_mtime_is(&st)) {
                self.invalidate_attrs(h.node.ino);
            }
        }
        // A deleted upper file keeps the attributes it has as its open files close (see
        // `Node::held_stat`): they may have changed it since its last name went.
        if h.node.held_stat().is_some()
            && let Ok(st) = self.stat_fd(h.fd().as_fd())
            && h.node.state().upper == Some(RealId::of(&st))
        {
            h.node.update_held_stat(st);
        }
    }

    /// fsync(2) of an open file: of its upper object, as on kernel overlayfs, never of a lower
    /// file (a read-only layer may refuse it: squashfs and erofs answer EINVAL). Through the
    /// handle if it is on the upper object, else through a new open file of it (reopened from
    /// another open file, or by name), so no other open's write error is reported here. A
    /// read-only open of a file copied up since syncs the copy, also when a passthrough
    /// copy-up moved the name to a new node (a split node).
    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<()> {
        let h = self.handle(fh)?;
        if h.writable && self.writeback_active() {
            // The kernel wrote back its cached data before this request: the block count it
            // keeps from before is stale, and would stay so until the file is closed.
            self.invalidate_attrs(h.node.ino);
        }
        if !self.opts.fsync {
            return Ok(());
        }
        let Some(upper) = h.node.state().upper else {
            return Ok(());
        };
        let fd = h.fd();
        // A writable open is on the upper object (it was copied up first).
        let fd = if h.writable || sys::fstat(fd.as_fd()).is_ok_and(|st| RealId::of(&st) == upper) {
            fd
        } else {
            let other = self
                .upper_fd_of_open(&h.node, None)
                .and_then(|fd| sys::reopen(fd.as_fd(), libc::O_RDONLY).ok());
            match other {
                Some(f) => Arc::new(f),
                None => match self.open_in(&h.node, Loc::Upper, libc::O_RDONLY) {
                    Ok(f) => Arc::new(f),
                    // No name and no open fd reach the copy: nothing of it is left to sync.
                    Err(e) if matches!(e.code(), libc::ENOENT | libc::ESTALE) => return Ok(()),
                    Err(e) => return Err(e),
                },
            }
        };
        sys::fsync(fd.as_fd(), datasync)
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
        crate::protect::check_fallocate(self.prot(&h.node)?, mode)?;
        let _data = self.privs_kept(&h.node);
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
        crate::protect::check_copy_into(self.prot(&ho.node)?)?;
        let fi = self.read_fd(&hi);
        let fo = ho.fd();
        // Direct I/O keeps its alignment through a copy, as the kernel's copy reads or
        // writes such a file directly (the daemon's own fds are not O_DIRECT): EINVAL for an
        // offset or a length off the file's alignment, as on ext4.
        for (h, fd, off) in [(&hi, &fi, off_in), (&ho, &fo, off_out)] {
            if h.o_direct {
                let align = u64::from(sys::dio_offset_align(fd.as_fd()).unwrap_or(512));
                if off % align != 0 || len % align != 0 {
                    return Err(Errno::EINVAL);
                }
            }
        }
        let mut oi = off_in as i64;
        let mut oo = off_out as i64;
        let len = len.min(u32::MAX as u64 & !0xfff) as usize;
        let _data = self.privs_kept(&ho.node);
        let n = sys::copy_file_range(fi.as_fd(), &mut oi, fo.as_fd(), &mut oo, len)?;
        Ok(n as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn a_shared_value_is_found_for_its_object_and_leaves_with_its_last_holder() {
        let table: Arc<Backings<u32>> = Arc::default();
        let (lower, upper) = (RealId { dev: 1, ino: 10 }, RealId { dev: 1, ino: 20 });
        let a = table.insert(&mut table.shard(7), 7, lower, 1);
        let got = table.get(7, lower).unwrap();
        assert!(Arc::ptr_eq(&got, &a));
        // Another object (the copy a copy-up made since), another node: nothing.
        assert!(table.get(7, upper).is_none());
        assert!(table.get(8, lower).is_none());
        // The entry stays while a holder is left, and goes with the last one.
        drop(a);
        assert!(table.get(7, lower).is_some());
        drop(got);
        assert!(table.get(7, lower).is_none());
        assert!(table.shard(7).is_empty());
    }

    #[test]
    fn a_passthrough_open_shares_reopens_splits_or_registers() {
        let (lower, upper, other) = (
            RealId { dev: 1, ino: 10 },
            RealId { dev: 1, ino: 20 },
            RealId { dev: 1, ino: 30 },
        );
        // Not copied up: the lower file is shared, or registered by the first open.
        assert_eq!(Choice::of(Some(lower), lower, None), Choice::Share);
        assert_eq!(Choice::of(None, lower, None), Choice::New);
        // Copied up: opens of the copy share it, or register it.
        assert_eq!(Choice::of(Some(upper), upper, Some(upper)), Choice::Share);
        assert_eq!(Choice::of(None, upper, Some(upper)), Choice::New);
        // The copy while the kernel passes opens through to the lower file: a new node.
        assert_eq!(Choice::of(Some(lower), upper, Some(upper)), Choice::Split);
        // The lower file, opened just before the copy-up finished: the copy instead, whether
        // or not an open of the copy registered it yet.
        assert_eq!(Choice::of(Some(upper), lower, Some(upper)), Choice::Reopen);
        assert_eq!(Choice::of(None, lower, Some(upper)), Choice::Reopen);
        // Readers of the lower file from before the copy-up keep sharing it.
        assert_eq!(Choice::of(Some(lower), lower, Some(upper)), Choice::Share);
        // Another copy while the kernel passes opens through to the lower file (a node
        // split already, its copy replaced since): a new node too.
        assert_eq!(Choice::of(Some(lower), other, Some(other)), Choice::Split);
    }

    #[test]
    fn a_backing_entry_goes_with_the_last_hold_on_its_id() {
        let table: Arc<Backings<u32>> = Arc::default();
        let shared = |serial, id| {
            Arc::new(SharedBacking {
                value: id,
                serial,
                table: table.clone(),
            })
        };
        let real = RealId { dev: 1, ino: 2 };
        let first = shared(5, 7);
        table.shard(5).insert(5, (real, Arc::downgrade(&first)));
        let second = table.shard(5)[&5].1.upgrade().expect("shared while held");
        assert_eq!(second.value, 7);
        drop(first);
        assert!(table.shard(5).contains_key(&5), "still held");
        // Another node's id going leaves the entry alone.
        drop(shared(21, 8));
        assert!(table.shard(5).contains_key(&5));
        drop(second);
        assert!(table.shard(5).is_empty(), "the last hold took the entry");
        // A newer entry for the node stays when an older id goes.
        let old = shared(5, 9);
        let new = shared(5, 10);
        table.shard(5).insert(5, (real, Arc::downgrade(&new)));
        drop(old);
        assert_eq!(table.shard(5).len(), 1);
    }

    #[test]
    fn read_pipes_are_reused_bounded_and_freed_once_reads_stop() {
        let bufs = ReadBufs::default();
        let a = bufs.take_pipe().expect("a pipe");
        assert!(a.capacity >= READ_PIPE_MIN, "{}", a.capacity);
        let a_fd = a.w.as_raw_fd();
        let mut lent: Vec<_> = (1..read_pipes()).map(|_| bufs.take_pipe()).collect();
        assert!(lent.iter().all(Option::is_some));
        assert!(bufs.take_pipe().is_none(), "at most {} lent", read_pipes());
        // One dropped (a failure left bytes in it) makes room for a new one.
        bufs.give_pipe(None);
        lent.pop();
        lent.push(bufs.take_pipe());
        assert!(lent.iter().all(Option::is_some));
        for p in lent {
            bufs.give_pipe(p);
        }
        bufs.give_pipe(Some(a));
        assert_eq!(bufs.pooled_pipes(), read_pipes());
        // Reads happened since the last check: the pipes stay.
        bufs.release_idle();
        assert_eq!(bufs.pooled_pipes(), read_pipes());
        let a = bufs.take_pipe().expect("a pipe");
        assert_eq!(
            a.w.as_raw_fd(),
            a_fd,
            "the last pipe given back is reused first"
        );
        bufs.give_pipe(Some(a));
        assert!(bufs.any_pooled());
        bufs.release_idle();
        bufs.release_idle();
        assert_eq!(bufs.pooled_pipes(), 0);
        assert!(!bufs.any_pooled());
        // All were closed: as many can be lent again.
        let again: Vec<_> = (0..read_pipes()).map(|_| bufs.take_pipe()).collect();
        assert!(again.iter().all(Option::is_some));
        assert!(bufs.take_pipe().is_none());
    }

    #[test]
    fn read_buffers_are_reused_and_freed_once_reads_stop() {
        let bufs = ReadBufs::default();
        let mut a = bufs.take();
        a.resize(1 << 20, 0);
        let b = bufs.take();
        bufs.give(b);
        bufs.give(a);
        assert_eq!(bufs.pooled(), 2);
        // Reads happened since the last check: the buffers stay.
        bufs.release_idle();
        assert_eq!(bufs.pooled(), 2);
        let a = bufs.take();
        assert_eq!(
            a.len(),
            1 << 20,
            "the last buffer given back is reused first"
        );
        bufs.give(a);
        bufs.release_idle();
        assert_eq!(bufs.pooled(), 2);
        // A whole period without reads frees them.
        bufs.release_idle();
        assert_eq!(bufs.pooled(), 0);
    }
}
