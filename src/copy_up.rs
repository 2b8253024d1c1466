//! Copy-up: giving an object that lives only in a lower layer a copy in the upper, before its
//! first change.
//!
//! The copy is built complete in the work directory — data, owner, mode, xattrs, times — and
//! only then renamed to its name in the upper, so a crash leaves either no copy or a whole one.
//! Missing parent directories are copied first, each with its own lower metadata. Two racing
//! copy-ups of one node are serialised on the node's copy lock (`Node::lock_copy`) and
//! produce one copy.

use std::ffi::CString;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::inode::{Node, RealId};
use crate::lookup::Loc;
use crate::sys::{self, Errno, Result, Stat};
use crate::union::Union;
use crate::whiteout;

/// How much file data a copy-up takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Data {
    All,
    /// None: the caller truncates to 0 anyway (O_TRUNC).
    Nothing,
    /// The first N bytes (a truncate to N follows).
    UpTo(u64),
}

/// The state of one copy-up in progress.
struct CopyUp<'a> {
    fs: &'a Union,
    node: &'a Arc<Node>,
    /// The lower object, `O_PATH`, and its layer.
    src: OwnedFd,
    lower: crate::layer::LowerIdx,
    st: Stat,
    /// Temporary name in the work directory.
    tmp: CString,
    /// The name the copy goes to: the node's first when the copy-up began. Another name of a
    /// lower hard link looked up meanwhile (an unlink of it waiting for this copy) becomes the
    /// first, and the copy must not land there.
    target: Option<(Arc<Node>, std::ffi::OsString)>,
    /// Set once the copy is at its name: until then, dropping the state (an error, or a
    /// panic unwinding) removes the half-built copy.
    installed: bool,
}

impl Union {
    /// Makes sure `node` has its object in the upper layer, copying it (and its missing
    /// parents) up if needed.
    pub fn copy_up(&self, node: &Arc<Node>) -> Result<()> {
        self.copy_up_with(node, Data::All)
    }

    pub fn copy_up_with(&self, node: &Arc<Node>, data: Data) -> Result<()> {
        let res = self.copy_up_chain(node, data);
        // The caller reached the node through a name of a lower hard link that a copy-up of
        // another name broke off meanwhile: the node is that name's copy, not the caller's
        // file, and the kernel walks to the caller's name again (see `hardlinks::Walks`).
        if self
            .walks
            .broken_off(node.serial, crate::fuse::longwork::caller())
        {
            return Err(Errno::ESTALE);
        }
        res
    }

    fn copy_up_chain(&self, node: &Arc<Node>, data: Data) -> Result<()> {
        if node.state().upper.is_some() {
            return Ok(());
        }
        self.layers.upper()?;
        // Parents first, top-down: collect the ancestors that lack an upper directory.
        let mut chain = Vec::new();
        let mut cur = node.clone();
        loop {
            let parent = {
                let st = cur.state();
                match st.links.first() {
                    Some(l) => l.parent.clone(),
                    None if cur.is_root() => break,
                    None if Arc::ptr_eq(&cur, node) => return Err(deleted_error(node)),
                    // Deleted, or a split node whose name moved (ESTALE: look it up again).
                    None => return Err(cur.nameless_error()),
                }
            };
            if parent.state().upper.is_some() {
                break;
            }
            chain.push(parent.clone());
            cur = parent;
        }
        for dir in chain.iter().rev() {
            self.copy_up_one(dir, Data::All)?;
        }
        self.copy_up_one(node, data)
    }

    fn copy_up_one(&self, node: &Arc<Node>, data: Data) -> Result<()> {
        let _guard = wait_copy_lock(node);
        let lower = {
            let st = node.state();
            if st.upper.is_some() {
                return Ok(());
            }
            st.top_lower().ok_or(LAYERLESS)?
        };
        // The name the caller walked to, if it is a name of a lower hard link the node still
        // has (see `hardlinks::Walks`); else the first.
        let walked = self
            .walks
            .name_of(node.serial, crate::fuse::longwork::caller());
        let target = {
            let st = node.state();
            walked
                .and_then(|(dir, name)| {
                    st.links
                        .iter()
                        .find(|l| l.parent.ino == dir && *l.name == *name)
                })
                .or_else(|| st.links.first())
                .map(|l| (l.parent.clone(), l.name.to_os_string()))
        };
        let src = self.open_in(node, Loc::Lower(lower), libc::O_PATH)?;
        let st = sys::fstat(src.as_fd())?;
        // The lower object must still be of the kind the view shows (a regular file stands in
        // for another kind under `xattr_permissions`): one put at its name behind the daemon's
        // back, say a device in place of a file, is not copied.
        let on_disk = sys::file_type(st.st_mode);
        if on_disk != node.kind() && !(on_disk == libc::S_IFREG && self.override_xattr().is_some())
        {
            return Err(Errno::ESTALE);
        }
        let work = self.layers.work()?;
        let mut c = CopyUp {
            fs: self,
            node,
            src,
            lower,
            st,
            tmp: work.temp_name(),
            target,
            installed: false,
        };
        let made = c.build(data);
        let res = made.and_then(|fd| c.install(fd.as_fd()));
        c.installed = res.is_ok();
        res
    }
}

impl CopyUp<'_> {
    fn work(&self) -> BorrowedFd<'_> {
        self.fs.layers.work.as_ref().expect("checked").fd()
    }

    /// Builds the complete copy in the work directory; returns an fd of it.
    fn build(&mut self, data: Data) -> Result<OwnedFd> {
        // The copy is made with the modes given here, not masked by the umask a caller's
        // create left on this worker (an owner-masking one kept an unprivileged daemon from
        // opening the directory it had just made); its own mode is set at the end.
        crate::dir::set_thread_umask(0)?;
        let work = self.work();
        let kind = sys::file_type(self.st.st_mode);
        // The lower object's append-only and immutable flags.
        let mut prot = 0;
        let fd = match kind {
            libc::S_IFDIR => {
                sys::mkdirat(work, &self.tmp, 0o700)?;
                let fd = sys::openat(work, &self.tmp, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
                // An unreadable lower directory keeps its flags to itself.
                let dir = libc::O_RDONLY | libc::O_DIRECTORY;
                if let Ok(src) = sys::openat(self.src.as_fd(), c".", dir, 0) {
                    prot = carry_inode_flags(src.as_fd(), fd.as_fd())?;
                }
                fd
            }
            libc::S_IFREG => {
                let fd = sys::openat(
                    work,
                    &self.tmp,
                    libc::O_CREAT | libc::O_EXCL | libc::O_RDWR,
                    0o600,
                )?;
                let len = match data {
                    Data::All => self.st.st_size as u64,
                    Data::Nothing => 0,
                    Data::UpTo(n) => n.min(self.st.st_size as u64),
                };
                let src = if len > 0 {
                    Some(self.fs.open_lower_data(self.node)?)
                } else {
                    // Only for the flags: an unreadable lower file keeps them to itself.
                    self.fs.open_lower_data(self.node).ok()
                };
                if let Some(src) = src {
                    if len > 0 {
                        whiteout::refuse_metacopy(src.as_fd(), c"", self.fs.layers.format)?;
                        // A large copy keeps its request thread: another one is made free
                        // to serve meanwhile.
                        if len >= LONG_COPY {
                            crate::fuse::longwork::long_work(|cancelled| {
                                let _slot = LARGE_COPIES.enter(cancelled)?;
                                copy_data(src.as_fd(), fd.as_fd(), len, cancelled)
                            })?;
                        } else {
                            copy_data(src.as_fd(), fd.as_fd(), len, &|| false)?;
                        }
                    }
                    // After the data: synchronous updates would slow the copy down.
                    prot = carry_inode_flags(src.as_fd(), fd.as_fd())?;
                }
                fd
            }
            libc::S_IFLNK => {
                let target = sys::readlinkat(self.src.as_fd(), c"")?;
                let target = CString::new(target).map_err(|_| Errno::EIO)?;
                sys::symlinkat(&target, work, &self.tmp)?;
                sys::openat(work, &self.tmp, libc::O_PATH, 0)?
            }
            _ => {
                whiteout::mknod_at(work, &self.tmp, kind | 0o600, self.st.st_rdev)?;
                sys::openat(work, &self.tmp, libc::O_PATH, 0)?
            }
        };
        // Owner first (chown clears set-ID bits and security.capability), then xattrs, then
        // the mode (a read-only mode would keep a daemon without CAP_DAC_OVERRIDE from
        // setting xattrs), times last (everything before touches them).
        let fdb = fd.as_fd();
        sys::fchown(fdb, self.st.st_uid, self.st.st_gid).or_else(ignore_rootless_chown)?;
        copy_xattrs(
            self.src.as_fd(),
            fdb,
            self.fs.layers.format,
            self.fs.isolates_security(),
        )?;
        if kind != libc::S_IFDIR {
            self.record_origin(fdb);
        }
        if prot != 0 {
            // Kept in the xattr, as kernel overlayfs keeps them (see `protect`).
            let name = self.fs.layers.format.protattr_xattr();
            if let Err(e) = sys::setxattr(fdb, name, crate::protect::format(prot), 0) {
                log::warn!("copy-up: cannot keep append-only or immutable flags: {e:?}");
                self.node.set_prot(None);
            }
        }
        let mode = self.real_mode(kind);
        self.keep_owner_in_override(fdb, kind, mode)?;
        if kind != libc::S_IFLNK {
            sys::fchmod_path(fdb, mode)?;
        }
        let times = [
            ts(self.st.st_atime, self.st.st_atime_nsec),
            ts(self.st.st_mtime, self.st.st_mtime_nsec),
        ];
        sys::utimensat(fdb, c"", &times, libc::AT_EMPTY_PATH)?;
        if kind == libc::S_IFREG && self.fs.opts.fsync {
            // Writing a large copy out takes as long as copying it: long work too.
            if self.st.st_size as u64 >= LONG_COPY {
                crate::fuse::longwork::long_work(|_| sys::fsync(fdb, false))?;
            } else {
                sys::fsync(fdb, false)?;
            }
        }
        Ok(fd)
    }

    /// Gives the copy kernel overlayfs's `overlay.origin` (the lower object's file handle and
    /// its filesystem's UUID), which keeps its number across a remount
    /// (`Union::origin_below`), here and on kernel overlayfs. Left out where the lower
    /// filesystem gives no handles or the copy cannot carry it (user xattrs on a symlink or
    /// a device).
    fn record_origin(&self, copy: BorrowedFd<'_>) {
        let uuid = self.fs.layers.lower(self.lower).uuid;
        let r = sys::file_handle(self.src.as_fd(), c"").and_then(|(kind, fid)| {
            let v = whiteout::origin_value(kind, &fid, &uuid).ok_or(Errno::EOVERFLOW)?;
            sys::setxattr(copy, self.fs.layers.format.origin_xattr(), &v, 0)
        });
        if let Err(e) = r {
            log::debug!("copy-up: no origin recorded: {e:?}");
        }
    }

    /// The mode the copy gets: the lower one, but with `xattr_permissions` never without the
    /// owner's bits (see `override_stat::real_mode`; the override then keeps the mode).
    fn real_mode(&self, kind: u32) -> u32 {
        let mode = self.st.st_mode & 0o7777;
        if self.fs.override_xattr().is_some() && matches!(kind, libc::S_IFREG | libc::S_IFDIR) {
            crate::override_stat::real_mode(kind, mode)
        } else {
            mode
        }
    }

    /// With `xattr_permissions`, a copy the daemon could not give the lower owner or mode
    /// (`real_mode`, about to be set) records them in the override xattr (unless the lower
    /// object already carried one).
    fn keep_owner_in_override(&self, copy: BorrowedFd<'_>, kind: u32, mode: u32) -> Result<()> {
        let Some(xattr) = self.fs.override_xattr() else {
            return Ok(());
        };
        if !matches!(kind, libc::S_IFREG | libc::S_IFDIR)
            || sys::getxattr_vec(copy, xattr)?.is_some()
        {
            return Ok(());
        }
        let mut now = crate::override_stat::Override::of(&sys::fstat(copy)?);
        now.perm = mode;
        let lower = crate::override_stat::Override::of(&self.st);
        if now == lower {
            return Ok(());
        }
        sys::setxattr(copy, xattr, lower.format().as_bytes(), 0)
    }

    /// Moves the copy to its name in the upper and records it on the node.
    fn install(&self, made: BorrowedFd<'_>) -> Result<()> {
        let fs = self.fs;
        // The name the copy-up began with, if the node still has it (made its first name
        // again under its directory's lock); else its first name now.
        let (parent, name) = {
            let st = self.node.state();
            let has = |p: &Node, n: &std::ffi::OsStr| st.links.contains(p.ino, n);
            match &self.target {
                Some((p, n)) if has(p, n) => (p.clone(), n.clone()),
                _ => {
                    let l = st.links.first().ok_or_else(|| deleted_error(self.node))?;
                    (l.parent.clone(), l.name.to_os_string())
                }
            }
        };
        let cname = sys::cstr(&name)?;
        let _dir = parent.lock_dir();
        // Re-check under the directory lock: the node may have been unlinked or moved. (Not
        // by its first name: a lookup of another name of a lower hard link, which takes no
        // directory lock, makes that one first at any moment.)
        let still_there = self.node.touch_link(parent.ino, &name);
        if !still_there {
            return Err(deleted_error(self.node));
        }
        let dir = fs.dir_fd(&parent, Loc::Upper)?;
        // Linking the copy changes the parent's times; the parent's view must not change.
        let pst = sys::fstat(dir.as_fd())?;
        // A daemon without privileges may need its owner's bits: a directory changes parent
        // only with write access to it, a parent takes a name only with write and search.
        let place = || {
            let dir = dir.as_fd();
            let tmp = &self.tmp;
            let rename = || sys::renameat2(self.work(), tmp, dir, &cname, libc::RENAME_NOREPLACE);
            crate::grant::with_owner_bits(dir, 0o300, rename, Some((fs, &parent)))
        };
        if self.node.is_dir() {
            crate::grant::with_owner_bits(made, 0o200, place, Some((fs, self.node)))?;
        } else {
            place()?;
        }
        fs.mark_impure(&parent, dir.as_fd());
        let ptimes = [
            ts(pst.st_atime, pst.st_atime_nsec),
            ts(pst.st_mtime, pst.st_mtime_nsec),
        ];
        if let Err(e) = sys::utimensat(dir.as_fd(), c"", &ptimes, libc::AT_EMPTY_PATH) {
            log::debug!("restoring parent times after copy-up: {e:?}");
        }
        let id = RealId::of(&sys::fstat(made)?);
        let hardlinked = !self.node.is_dir() && self.st.st_nlink > 1;
        if hardlinked {
            // The other names leave this node: a lookup that found it through one of them
            // meanwhile must look again (see `lookup_stat`).
            fs.tree_change(|| self.record(id, true, &parent, &name));
        } else {
            self.record(id, false, &parent, &name);
        }
        Ok(())
    }

    /// Records the installed copy `id` at `name` in `parent` on the node; the other names of
    /// a lower hard link (`hardlinked`) keep the lower file and leave the node.
    fn record(&self, id: RealId, hardlinked: bool, parent: &Node, name: &std::ffi::OsStr) {
        let fs = self.fs;
        let other = |l: &&crate::links::Link| !(l.parent.ino == parent.ino && *l.name == *name);
        if hardlinked {
            // Before the copy shows: a request that sees it finds the names it breaks off
            // marked (see `hardlinks::Walks`).
            let st = self.node.state();
            for l in st.links.iter().filter(other) {
                fs.walks.break_off(self.node.serial, l.parent.ino, &l.name);
            }
        }
        let others: Vec<(u64, std::ffi::OsString)> = {
            let mut st = self.node.state();
            st.upper = Some(id);
            if !self.node.is_dir() {
                // The data now lives in the upper; the lower object is no longer this node's.
                let lower_ids: Vec<RealId> = std::mem::take(&mut st.lowers)
                    .iter()
                    .map(|(_, id)| *id)
                    .collect();
                drop(st);
                if hardlinked {
                    for lid in lower_ids {
                        fs.table.remove_id(self.node, lid);
                    }
                }
                let st = self.node.state();
                st.links
                    .iter()
                    .filter(other)
                    .map(|l| (l.parent.ino, l.name.to_os_string()))
                    .collect()
            } else {
                Vec::new()
            }
        };
        fs.table.add_id(self.node, id);
        fs.dir_changed(parent);
        // The parent's times are put back, but its change time (and on some filesystems its
        // size) moved with the new entry, as on kernel overlayfs.
        fs.invalidate_attrs(parent.ino);
        // The copy has its own ctime and blocks, and a broken hard link its own link count.
        fs.invalidate_attrs(self.node.ino);
        self.node.extra().data_gen.fetch_add(1, Ordering::SeqCst);
        // Other names of a lower hard link still show the lower file (copy-up breaks the
        // link, as in kernel overlayfs): drop them from this node and from the kernel cache.
        if hardlinked {
            for (pino, n) in others {
                if let Some(p) = fs.table.get(pino) {
                    fs.table.unlink(self.node, &p, &n);
                }
                fs.invalidate_entry(pino, &n);
            }
        }
    }
}

impl Drop for CopyUp<'_> {
    /// Removes a half-built copy.
    fn drop(&mut self) {
        if self.installed {
            return;
        }
        let flags = if sys::file_type(self.st.st_mode) == libc::S_IFDIR {
            libc::AT_REMOVEDIR
        } else {
            0
        };
        let _ = sys::unlinkat(self.work(), &self.tmp, flags);
    }
}

impl Union {
    /// A readable fd of the lower object holding a node's data.
    pub fn open_lower_data(&self, node: &Node) -> Result<OwnedFd> {
        let lower = node.state().top_lower().ok_or(LAYERLESS)?;
        let open = |flags| match self.open_in(node, Loc::Lower(lower), flags) {
            // Deleted, and reopened through /proc: the object held since (`Node::held`).
            Err(e) => sys::reopen(self.nameless_fd(node, None, false, e)?.as_fd(), flags),
            r => r,
        };
        match open(libc::O_RDONLY | libc::O_NOATIME) {
            Err(e) if e.code() == libc::EPERM => open(libc::O_RDONLY),
            r => r,
        }
    }
}

/// Copy-up of a node whose name is gone. A file deleted while open on a lower layer: a change
/// through an open file of it fails with EEXIST, as on kernel overlayfs (whose copy-up links
/// the copy over the whiteout at the name the file had), or ENOENT once the directory it was
/// in is gone too (there is no directory left to link it into). Otherwise
/// `Node::nameless_error` (ESTALE for a split node, ENOENT for a deleted directory: the
/// kernel's ENOTDIR there, from renaming a directory over the whiteout, is not copied).
fn deleted_error(node: &Node) -> Errno {
    if node.is_dir() || node.is_split() {
        return node.nameless_error();
    }
    match node.last_parent() {
        Some(dir) if dir.is_root() || !dir.state().links.is_empty() => Errno::EEXIST,
        _ => Errno::ENOENT,
    }
}

/// For a node with neither an upper nor a lower object: its name has moved to a new node
/// (see `file::split_node`) while the request was on its way. ESTALE makes the kernel look
/// the name up again and retry once.
const LAYERLESS: Errno = Errno::ESTALE;

/// Inode flags a copy-up carries to the copy, as kernel overlayfs does: synchronous updates
/// and no access times (FS_SYNC_FL, FS_NOATIME_FL). Append-only and immutable go into the
/// copy's `overlay.protattr` instead (the copy could not be put in place with them, nor
/// take a copy-up into it or a whiteout; see `protect`).
const CARRIED_FLAGS: u32 = 0x0000_0008 | 0x0000_0080;

/// Gives a copy the carried inode flags of its lower object, and returns the lower object's
/// protection flags (`protect`). Where either filesystem has no inode flags (ENOTTY, EINVAL,
/// EOPNOTSUPP) or the daemon may not set them (EPERM), the copy goes without.
fn carry_inode_flags(src: BorrowedFd<'_>, copy: BorrowedFd<'_>) -> Result<u8> {
    let absent = |e: Errno| {
        matches!(
            e.code(),
            libc::ENOTTY | libc::EINVAL | libc::EOPNOTSUPP | libc::EPERM
        )
    };
    let (carried, prot) = match sys::get_inode_flags(src) {
        Ok(flags) => (flags & CARRIED_FLAGS, crate::protect::INODE.of(flags)),
        Err(e) if absent(e) => return Ok(0),
        Err(e) => return Err(e),
    };
    if carried == 0 {
        return Ok(prot);
    }
    match sys::get_inode_flags(copy).and_then(|f| sys::set_inode_flags(copy, f | carried)) {
        Err(e) if absent(e) => Ok(prot),
        r => r.map(|()| prot),
    }
}

/// Rootless, chown to an unmapped owner fails; the copy keeps the daemon's owner then.
fn ignore_rootless_chown(e: Errno) -> Result<()> {
    if e.code() == libc::EPERM || e.code() == libc::EINVAL {
        if sys::geteuid() == 0 && !crate::union::in_user_namespace() {
            return Err(e);
        }
        log::debug!("copy-up: cannot keep the owner: {e:?}");
        return Ok(());
    }
    Err(e)
}

/// The node's copy lock. Waiting for it (another request copies the node up, maybe a
/// large file) counts as long work: other requests are served meanwhile (see
/// `longwork::long_work`).
pub(crate) fn wait_copy_lock(node: &Node) -> std::sync::MutexGuard<'_, ()> {
    match node.try_lock_copy() {
        Some(g) => g,
        None => crate::fuse::longwork::long_work(|_| node.lock_copy()),
    }
}

/// The most a copy-up moves in one call (a killed caller's copy stops between two).
const CHUNK: u64 = 64 << 20;

/// Copies of at least this many bytes may take long (see `longwork::long_work`).
const LONG_COPY: u64 = 8 << 20;

/// The large copies under way at once (`LONG_COPY` or more), at most twice the CPUs; the
/// others wait their turn asleep. A burst of copy-ups, each of a thread kept busy copying,
/// would otherwise leave the threads that serve other requests one runnable thread among
/// dozens (a lookup waited seconds for its turn on the CPUs); together they copy no faster.
static LARGE_COPIES: Slots = Slots {
    used: Mutex::new(0),
    freed: Condvar::new(),
};

struct Slots {
    used: Mutex<usize>,
    freed: Condvar,
}

/// A place taken in `Slots`, given back when dropped.
struct Slot<'a>(&'a Slots);

impl Slots {
    fn max() -> usize {
        static MAX: OnceLock<usize> = OnceLock::new();
        *MAX.get_or_init(|| std::thread::available_parallelism().map_or(2, |n| n.get()) * 2)
    }

    /// Waits for a free place; EINTR once `cancelled` says so.
    fn enter(&self, cancelled: &dyn Fn() -> bool) -> Result<Slot<'_>> {
        let mut used = self.used.lock().unwrap_or_else(|e| e.into_inner());
        while *used >= Self::max() {
            if cancelled() {
                return Err(Errno::EINTR);
            }
            used = self
                .freed
                .wait_timeout(used, std::time::Duration::from_millis(100))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        *used += 1;
        Ok(Slot(self))
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.used.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
        self.0.freed.notify_one();
    }
}

pub fn ts(sec: i64, nsec: i64) -> libc::timespec {
    libc::timespec {
        tv_sec: sec,
        tv_nsec: nsec,
    }
}

/// Copies every non-private xattr of `src` to `dst`; no real `security.*` one where
/// `isolated` (`xattr_permissions=2` keeps the view's apart and hides the real ones: a hidden
/// capability copied would stay on the copy whatever is written into it).
pub fn copy_xattrs(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    format: whiteout::Format,
    isolated: bool,
) -> Result<()> {
    let names = match sys::listxattr_vec(src) {
        Ok(n) => n,
        Err(e) if matches!(e.code(), libc::ENOTSUP | libc::EPERM | libc::EACCES) => return Ok(()),
        Err(e) => return Err(e),
    };
    for name in names {
        use std::os::unix::ffi::OsStrExt;
        #[cfg(debug_assertions)]
        crate::fuse::session::panic_for_tests(name.as_bytes());
        if whiteout::is_private_xattr(name.as_bytes(), format)
            || (isolated && crate::override_stat::is_security(name.as_bytes()))
        {
            continue;
        }
        let cname = sys::cstr(&name)?;
        let value = match sys::getxattr_vec(src, &cname) {
            Ok(Some(v)) => v,
            Ok(None) => continue,
            Err(e) if matches!(e.code(), libc::ENOTSUP | libc::EPERM | libc::EACCES) => continue,
            Err(e) => return Err(e),
        };
        // A daemon in a user namespace can set no ACL entry for an id it cannot map (the
        // kernel shows it as -1): the copy keeps the others (README).
        let value = match crate::acl::is_acl_name(cname.to_bytes()) {
            true => match crate::acl::without_unmapped(&value) {
                Some(v) => {
                    log::info!("copy-up: ACL entries of ids outside the namespace left out");
                    v
                }
                None => value,
            },
            false => value,
        };
        match sys::setxattr(dst, &cname, &value, 0) {
            Ok(()) => {}
            // What the upper cannot hold (trusted.* rootless, say) is left behind, as kernel
            // overlayfs does for EOPNOTSUPP.
            Err(e) if matches!(e.code(), libc::ENOTSUP | libc::EPERM | libc::EACCES) => {
                log::debug!("copy-up: xattr {name:?} not copied: {e:?}");
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Copies the first `len` bytes of `src` into the empty `dst`, sharing extents where the
/// filesystem can and keeping holes otherwise.
/// `cancelled` is asked between chunks: the copy stops with EINTR once it says so (its
/// caller was killed).
pub fn copy_data(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    len: u64,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let src_len = sys::fstat(src)?.st_size as u64;
    if len >= src_len && sys::ficlone(dst, src).is_ok() {
        return Ok(());
    }
    let mut off = 0u64;
    // Found once per copy: the way that works for the first extent works for the others.
    let mut by = CopyBy::CopyFileRange;
    let seek = |at: u64, whence| sys::lseek(src, at as i64, whence).map(|v| v as u64);
    while let Some((data, hole)) = next_extent(off, len, seek) {
        copy_range(src, dst, data, hole - data, &mut by, cancelled)?;
        off = hole;
    }
    sys::ftruncate(dst, len)
}

/// The next extent of data at or after `off` and before `len`, as (start, end), found with
/// `seek` (lseek's SEEK_DATA and SEEK_HOLE); None when only a hole is left. Always past `off`:
/// where the filesystem's answers do not move forward (a FUSE or network lower layer
/// answering wrong), the rest is data.
fn next_extent(
    off: u64,
    len: u64,
    seek: impl Fn(u64, libc::c_int) -> Result<u64>,
) -> Option<(u64, u64)> {
    if off >= len {
        return None;
    }
    let data = match seek(off, libc::SEEK_DATA) {
        Ok(d) if d >= off => d,
        Err(e) if e.code() == libc::ENXIO => return None,
        _ => off,
    };
    if data >= len {
        return None;
    }
    let hole = match seek(data, libc::SEEK_HOLE) {
        Ok(h) if h > data => h.min(len),
        _ => len,
    };
    Some((data, hole))
}

/// How `copy_range` moves data, best first: shared or copied within the filesystem
/// (copy_file_range), copied by the kernel from one page cache to the other (sendfile,
/// across filesystems), or read and written through a buffer.
#[derive(Clone, Copy, PartialEq)]
enum CopyBy {
    CopyFileRange,
    Sendfile,
    Buffer,
}

/// Errors that mean "not this way", not "this copy failed".
fn unsupported(e: Errno) -> bool {
    matches!(
        e.code(),
        libc::EXDEV | libc::EINVAL | libc::ENOSYS | libc::EOPNOTSUPP
    )
}

/// Copies `len` bytes at `start`, the way `by` says, or a lesser one (which `by` then keeps).
fn copy_range(
    src: BorrowedFd<'_>,
    dst: BorrowedFd<'_>,
    start: u64,
    len: u64,
    by: &mut CopyBy,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let mut done = 0u64;
    let mut buf = Vec::new();
    while done < len {
        if cancelled() {
            return Err(Errno::EINTR);
        }
        let chunk = (len - done).min(CHUNK) as usize;
        let at = (start + done) as i64;
        let res = match *by {
            CopyBy::CopyFileRange => {
                let (mut oi, mut oo) = (at, at);
                sys::copy_file_range(src, &mut oi, dst, &mut oo, chunk)
            }
            CopyBy::Sendfile => {
                let mut oi = at;
                sys::lseek(dst, at, libc::SEEK_SET)
                    .and_then(|_| sys::sendfile(dst, src, &mut oi, chunk))
            }
            CopyBy::Buffer => {
                if buf.is_empty() {
                    buf = vec![0u8; 1 << 20];
                }
                let want = chunk.min(buf.len());
                let n = sys::pread(src, &mut buf[..want], at as u64)?;
                let mut w = 0;
                while w < n {
                    match sys::pwrite(dst, &buf[w..n], at as u64 + w as u64)? {
                        0 => return Err(Errno::EIO),
                        k => w += k,
                    }
                }
                Ok(n)
            }
        };
        match res {
            // The source is shorter than it was: nothing more to copy is an error.
            Ok(0) => return Err(Errno::EIO),
            Ok(n) => done += n as u64,
            Err(e) if unsupported(e) && *by == CopyBy::CopyFileRange => *by = CopyBy::Sendfile,
            Err(e) if unsupported(e) && *by == CopyBy::Sendfile => *by = CopyBy::Buffer,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The extents `next_extent` walks for a file of `len` bytes whose lseek answers `seek`.
    fn extents(len: u64, seek: impl Fn(u64, libc::c_int) -> Result<u64> + Copy) -> Vec<(u64, u64)> {
        let (mut off, mut out) = (0, Vec::new());
        while let Some((data, hole)) = next_extent(off, len, seek) {
            assert!(
                hole > off && hole > data,
                "no progress at {off}: {data}..{hole}"
            );
            out.push((data, hole));
            off = hole;
            assert!(out.len() < 100, "endless: {out:?}");
        }
        out
    }

    #[test]
    fn large_copies_take_turns_and_waiting_ones_can_be_cancelled() {
        use std::sync::atomic::AtomicUsize;
        let slots = Slots {
            used: Mutex::new(0),
            freed: Condvar::new(),
        };
        let (inside, most) = (AtomicUsize::new(0), AtomicUsize::new(0));
        std::thread::scope(|s| {
            for _ in 0..Slots::max() * 3 {
                s.spawn(|| {
                    let _slot = slots.enter(&|| false).unwrap();
                    let now = inside.fetch_add(1, Ordering::SeqCst) + 1;
                    most.fetch_max(now, Ordering::SeqCst);
                    std::thread::sleep(std::time::Duration::from_millis(20));
                    inside.fetch_sub(1, Ordering::SeqCst);
                });
            }
        });
        let most = most.load(Ordering::SeqCst);
        assert!(most > 0 && most <= Slots::max(), "{most} copies at once");
        assert_eq!(*slots.used.lock().unwrap(), 0);
        // All taken: a cancelled copy stops waiting.
        let held: Vec<_> = (0..Slots::max())
            .map(|_| slots.enter(&|| false).unwrap())
            .collect();
        assert_eq!(slots.enter(&|| true).err(), Some(Errno::EINTR));
        drop(held);
        assert!(slots.enter(&|| true).is_ok());
    }

    #[test]
    fn extents_follow_holes_and_always_move_forward() {
        // Data at 0..10 and 20..30 of 40 bytes.
        let sparse = |at: u64, whence| match whence {
            libc::SEEK_DATA if at < 10 => Ok(at),
            libc::SEEK_DATA if at < 30 => Ok(at.max(20)),
            libc::SEEK_DATA => Err(Errno::ENXIO),
            _ if at < 10 => Ok(10),
            _ if at < 30 => Ok(30),
            _ => Ok(40),
        };
        assert_eq!(extents(40, sparse), [(0, 10), (20, 30)]);
        // Answers that never move forward, go backwards or put the hole before the data:
        // the rest is copied whole.
        assert_eq!(extents(40, |_, _| Ok(0)), [(0, 40)]);
        let backwards = |at: u64, whence| match whence {
            libc::SEEK_DATA => Ok(at.saturating_sub(5)),
            _ => Ok(at + 10),
        };
        assert_eq!(
            extents(40, backwards),
            [(0, 10), (10, 20), (20, 30), (30, 40)]
        );
        let hole_first = |at: u64, whence| match whence {
            libc::SEEK_DATA => Ok(at + 5),
            _ => Ok(at),
        };
        assert_eq!(extents(40, hole_first), [(5, 40)]);
        // No SEEK_DATA at all: one extent.
        assert_eq!(extents(40, |_, _| Err(Errno::EINVAL)), [(0, 40)]);
        assert_eq!(extents(0, |_, _| Ok(0)), []);
    }
}
