//! The inode table: one [`Node`] per object of the merged view that the kernel knows about.
//!
//! A node's number is both its FUSE node id and the `st_ino` it reports, and it never changes
//! for the life of the node, copy-up included. Numbers come from the real inode of the top-most
//! object (kernel overlayfs's `xino` scheme: the real number when every layer is on one
//! filesystem, otherwise the real number with a per-filesystem tag in the high bits), so they
//! match readdir's `d_ino` without a stat and mostly survive a remount. Numbers that would
//! collide are allocated from a reserved range instead, and copied-up objects keep theirs for
//! the rest of the mount.
//!
//! Locking: the table is sharded; a shard lock is held only for hash-map work. A node's state
//! has its own short mutex. A node is referenced by the kernel's lookup count and by the links
//! of its children (a child pins its parent), so the path of any live node can always be built
//! by following parents.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::hash::{BuildHasher, Hash, RandomState};
use std::sync::atomic::{
    AtomicBool, AtomicI32, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering,
};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use crate::compact::{Few, Name};
use crate::layer::LowerIdx;
pub use crate::links::{Link, Links};

pub type Ino = u64;
pub const ROOT_INO: Ino = 1;

/// Whether a registered identity's number is remembered beyond its node's life.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Remember {
    Never,
    /// Where the identity would not derive the node's number by itself.
    UnlessDerived,
    Always,
}

/// Real identity of an object in a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RealId {
    pub dev: u64,
    pub ino: u64,
}

impl RealId {
    pub fn of(st: &libc::stat) -> RealId {
        RealId {
            dev: st.st_dev,
            ino: st.st_ino,
        }
    }
}

pub struct State {
    /// Names of the node; the first is the one used to build paths. Empty for the root and for
    /// a node whose last name was removed.
    pub links: Links,
    /// The object in the upper layer, if there is one.
    pub upper: Option<RealId>,
    /// Directories: the lower directories merged below, top-most first. Other objects: the
    /// lower object that holds the data until copy-up (at most one).
    pub lowers: Few<(LowerIdx, RealId)>,
    /// Identities registered for this node in the table.
    pub ids: Few<RealId>,
    /// Directories: the lower layers whose directory a layer above redirects (kernel
    /// overlayfs's `overlay.redirect`), and how each is reached. None for almost all.
    pub redirects: Option<Box<[(LowerIdx, Redirect)]>>,
}

/// How a directory's object in a lower layer is reached when a layer above it redirects the
/// directory (a rename made by kernel overlayfs with `redirect_dir=on`).
#[derive(Clone)]
pub enum Redirect {
    /// By this name in the parent's directory in that layer.
    Name(Name),
    /// By this path from the layer's root.
    Path(Box<[Name]>),
}

impl State {
    /// A state with nothing in it (unit tests' nodes).
    #[cfg(test)]
    pub(crate) fn empty() -> State {
        State {
            links: Links::new(),
            upper: None,
            lowers: Few::new(),
            ids: Few::new(),
            redirects: None,
        }
    }

    pub fn is_unlinked(&self) -> bool {
        self.links.is_empty()
    }

    /// The top-most lower layer holding the object.
    pub fn top_lower(&self) -> Option<LowerIdx> {
        self.lowers.first().map(|(l, _)| *l)
    }

    /// Whether the object exists in a lower layer (merged or lower-only).
    pub fn has_lower(&self) -> bool {
        !self.lowers.is_empty()
    }

    pub fn top_id(&self) -> Option<RealId> {
        self.upper.or(self.lowers.first().map(|(_, id)| *id))
    }

    /// How the directory's object in lower layer `l` is reached, if a layer above redirects
    /// it (else by its name in its parent's directory there).
    pub fn redirect(&self, l: LowerIdx) -> Option<&Redirect> {
        self.redirects
            .as_ref()?
            .iter()
            .find(|(x, _)| *x == l)
            .map(|(_, r)| r)
    }
}

pub struct Node {
    pub ino: Ino,
    /// Unique for the life of the mount, unlike `ino`.
    pub serial: u64,
    /// `S_IFMT` bits; a node never changes type.
    kind: u16,
    /// Its name moved to a new node (passthrough copy-up, see `file::split_node`): requests
    /// that resolve it by name get ESTALE, so the kernel looks the name up again.
    pub split: AtomicBool,
    /// `REMOVED`, and the node's protection flags once read (`PROT_KNOWN` and the flags
    /// shifted by `PROT_SHIFT`; see `Union::prot`).
    bits: AtomicU8,
    /// The table's clock when a request last used the node (see `Table::coldest`).
    last_used: AtomicU32,
    /// Kernel lookups plus pins by children; the node leaves the table when it drops to 0.
    pub(crate) refs: AtomicU64,
    state: Mutex<State>,
    /// Made on first use (see `Extra`).
    extra: OnceLock<Box<Extra>>,
}

/// `Extra::shown_mode`: a mode is recorded (in the low 12 bits).
const SHOWN: u32 = 1 << 31;
/// `Extra::shown_mode`: each grant's start and end add this (the bits between the mode's
/// and `SHOWN` count grants), so a read can tell that a grant began or ended meanwhile.
const GRANT_STEP: u32 = 1 << 12;

/// What only directories and files that were changed or run need. Most nodes are files that
/// were only looked up or read, and every node would pay for these fields (56 bytes).
pub struct Extra {
    /// Serialises copy-up of this node (`Node::lock_copy`).
    copy_lock: Mutex<()>,
    /// Directories: serialises changes to the entries (`Node::lock_dir`).
    dir_lock: Mutex<()>,
    /// Directories: serialises building the merged listing (`Node::lock_listing`).
    listing_lock: Mutex<()>,
    /// Bumped by copy-up, so read-only handles opened on the lower object reopen the upper.
    pub data_gen: AtomicU64,
    /// Open handles of a running program (opened for exec).
    pub exec_opens: AtomicU64,
    /// Passthrough mounts: open handles served by the daemon (direct I/O), which keep new
    /// opens of the node off passthrough (see `Union::backing_for`).
    pub direct_opens: AtomicU32,
    /// Open handles that may write.
    pub writable_opens: AtomicU32,
    /// The modification time in the attributes last sent for the node (`time_key`).
    sent_mtime: AtomicU64,
    /// Directories: bumped by every change to the entries (retires cached listings).
    pub version: AtomicU64,
    /// Directories: number of subdirectories in the merged view, once counted
    /// (`NOT_COUNTED` before).
    pub subdirs: AtomicU64,
    /// Directories: a listing was served that the kernel may keep (`Table::mark_listings_stale`).
    pub listed: AtomicBool,
    /// Directories: the listing the kernel may keep shows numbers that changed since; the next
    /// open drops it.
    pub stale_listing: AtomicBool,
    /// Directories: its upper directory is marked `overlay.impure` (see
    /// `Union::mark_impure`).
    pub impure: AtomicBool,
    /// A split node (see `Node::split`): the daemon's own open file of the upper copy its
    /// name moved to, which its fsync syncs.
    moved_to: Mutex<Option<Arc<std::os::fd::OwnedFd>>>,
    /// The directory its last name was in, once it was deleted (see `copy_up::deleted_error`);
    /// set for every removed node (`Node::was_removed`). Weak: it keeps no directory alive.
    last_parent: Mutex<Option<std::sync::Weak<Node>>>,
    /// What the node showed when its last name went (see `Union::hold_object`): the kernel
    /// may still hold the node (a working directory, an `O_PATH` file, an open FIFO or
    /// device) and ask about it.
    held: Mutex<Option<Held>>,
    /// See `Node::shown_mode`: `SHOWN` and the mode while a grant is under way, and a count
    /// of grant starts and ends (`GRANT_STEP`).
    shown_mode: AtomicU32,
    /// The errno (ENOSPC) the upper gave the kernel's write-back of this file's cached data,
    /// while writes through the kernel's cache are refused (see `Union::cached_write_refusal`);
    /// 0 if none.
    write_error: AtomicI32,
    /// Until when (`clock_ms`) a name of this file was being removed while it has others (see
    /// `Extra::mark_link_drop`); 0 if never.
    link_drop_until: AtomicU64,
    /// The table's count of removals (`Table::departures`) when the object's last name went
    /// and its identities left the node; 0 while it has a name.
    departed_at: AtomicU64,
    /// A hash of the last name (`name_hash`), once it was deleted (see `last_parent`).
    last_name: AtomicU64,
    /// The kernel's second walk to a name whose file went under an open reached this node
    /// (see `lookup::Strikes`): its removal holds the object, whatever it is.
    hold_if_removed: AtomicBool,
}

/// A hash of a name, for keys that need not be exact (a collision costs only a little work).
pub fn name_hash(name: &std::ffi::OsStr) -> u64 {
    use std::hash::BuildHasher;
    static KEY: OnceLock<std::hash::RandomState> = OnceLock::new();
    KEY.get_or_init(std::hash::RandomState::new)
        .hash_one(name.as_encoded_bytes())
}

/// Milliseconds since the daemon's first call (a monotonic clock for deadlines).
pub(crate) fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    START
        .get_or_init(std::time::Instant::now)
        .elapsed()
        .as_millis() as u64
        + 1
}

/// How long after a name of a file with other names is removed its attributes are sent as
/// stale to the kernel (see `Extra::mark_link_drop`).
const LINK_DROP_GRACE_MS: u64 = 200;

impl Extra {
    /// A name of this file (it has others) is being removed. The kernel drops its cached link
    /// count by one once the removal's reply is in; attributes sent for a request served
    /// meanwhile, computed after the removal, may land just before that, and the count then
    /// reaches 0, after which the kernel refuses every link of the file (ENOENT, without
    /// asking the daemon) until it asks for the attributes again. Attributes sent for the
    /// file until a while after this are preceded by an invalidation of its attributes (see
    /// `Union::attr`), which makes the kernel take them for stale ones (the invalidation moves
    /// the inode's attribute version past the request's): it keeps its own count, and drops
    /// that by one.
    pub fn mark_link_drop(&self) {
        self.link_drop_until
            .store(clock_ms() + LINK_DROP_GRACE_MS, Ordering::SeqCst);
    }

    /// Whether a removal marked by `mark_link_drop` is recent.
    pub fn link_drop_pending(&self) -> bool {
        let until = self.link_drop_until.load(Ordering::SeqCst);
        until != 0 && clock_ms() < until
    }
}

/// `Extra::held`.
#[derive(Clone)]
pub enum Held {
    /// An `O_PATH` fd of the object.
    Object(Arc<std::os::fd::OwnedFd>),
    /// Its attributes as its last name went, for an upper object with no other link, which
    /// the removal frees (see `Union::hold_object`).
    Stat(Box<crate::sys::Stat>),
}

/// `Node::bits`: the node left the table.
const REMOVED: u8 = 1;
/// `Node::bits`: the protection flags that follow were read.
const PROT_KNOWN: u8 = 2;
const PROT_SHIFT: u32 = 2;
/// `Node::bits`: a count of the times protection flags were set (`Node::set_prot`), so that a
/// read from before one of them is never cached after it (`Node::cache_prot`).
const PROT_GEN: u8 = 0x10;
const PROT_GEN_MASK: u8 = 0xf0;

/// `Extra::subdirs` before the subdirectories were counted.
pub const NOT_COUNTED: u64 = u64::MAX;

/// A time (seconds, nanoseconds) as one number, to compare in an atomic.
fn time_key(st: &crate::sys::Stat) -> u64 {
    ((st.st_mtime as u64) << 30) ^ (st.st_mtime_nsec as u64)
}

impl Extra {
    /// Directories: a listing the kernel may keep is out of date; the next open drops it.
    pub fn listing_outdated(&self) {
        if self.listed.load(Ordering::SeqCst) && self.listed.swap(false, Ordering::SeqCst) {
            self.stale_listing.store(true, Ordering::SeqCst);
        }
    }

    pub fn has_writable_opens(&self) -> bool {
        self.writable_opens.load(Ordering::Relaxed) > 0
    }

    /// Records the modification time of attributes sent for the node.
    pub fn note_sent_mtime(&self, st: &crate::sys::Stat) {
        self.sent_mtime.store(time_key(st), Ordering::Relaxed);
    }

    /// Whether `st` has the modification time last sent.
    pub fn sent_mtime_is(&self, st: &crate::sys::Stat) -> bool {
        self.sent_mtime.load(Ordering::Relaxed) == time_key(st)
    }
}

impl Node {
    fn new(ino: Ino, serial: u64, kind: u32, state: State) -> Node {
        Node {
            ino,
            serial,
            kind: kind as u16,
            split: AtomicBool::new(false),
            bits: AtomicU8::new(0),
            last_used: AtomicU32::new(0),
            refs: AtomicU64::new(1),
            state: Mutex::new(state),
            extra: OnceLock::new(),
        }
    }

    /// `S_IFMT` bits.
    pub fn kind(&self) -> u32 {
        u32::from(self.kind)
    }

    /// The node's rarely used fields, made now if they were not yet.
    pub fn extra(&self) -> &Extra {
        self.extra.get_or_init(|| {
            Box::new(Extra {
                copy_lock: Mutex::new(()),
                dir_lock: Mutex::new(()),
                listing_lock: Mutex::new(()),
                data_gen: AtomicU64::new(0),
                exec_opens: AtomicU64::new(0),
                direct_opens: AtomicU32::new(0),
                writable_opens: AtomicU32::new(0),
                sent_mtime: AtomicU64::new(0),
                version: AtomicU64::new(0),
                subdirs: AtomicU64::new(NOT_COUNTED),
                listed: AtomicBool::new(false),
                stale_listing: AtomicBool::new(false),
                impure: AtomicBool::new(false),
                moved_to: Mutex::new(None),
                last_parent: Mutex::new(None),
                held: Mutex::new(None),
                shown_mode: AtomicU32::new(0),
                write_error: AtomicI32::new(0),
                link_drop_until: AtomicU64::new(0),
                departed_at: AtomicU64::new(0),
                last_name: AtomicU64::new(0),
                hold_if_removed: AtomicBool::new(false),
            })
        })
    }

    /// The node's rarely used fields if they were made: for readers to whom a field's initial
    /// value means the same as no `Extra` at all.
    pub fn extra_if_made(&self) -> Option<&Extra> {
        self.extra.get().map(|b| &**b)
    }

    /// While the daemon has granted itself its owner's bits on the real object for a moment
    /// (see `grant`): the mode from before, which the view keeps showing.
    pub fn shown_mode(&self) -> Option<u32> {
        let m = self.grant_record();
        (m & SHOWN != 0).then_some(m & 0o7777)
    }

    /// See `shown_mode`; `None` at the end of the grant.
    pub fn set_shown_mode(&self, mode: Option<u32>) {
        let shown = mode.map_or(0, |m| SHOWN | (m & 0o7777));
        let step = |r: u32| {
            let count = (r & !(SHOWN | 0o7777)).wrapping_add(GRANT_STEP) & !SHOWN;
            Some(count | shown)
        };
        let record = &self.extra().shown_mode;
        let _ = record.fetch_update(Ordering::SeqCst, Ordering::SeqCst, step);
    }

    fn grant_record(&self) -> u32 {
        self.extra_if_made()
            .map_or(0, |e| e.shown_mode.load(Ordering::SeqCst))
    }

    /// Runs `read` (of the real object's mode, by a stat or its access ACL) and returns what
    /// it read, with the mode the view shows if a grant is under way (`shown_mode`). A read
    /// made while a grant began and ended is made again (it may hold the granted bits), up
    /// to four reads in all.
    pub fn read_outside_grants<T>(
        &self,
        read: impl Fn() -> crate::sys::Result<T>,
    ) -> crate::sys::Result<(T, Option<u32>)> {
        let mut tries = 0;
        loop {
            let before = self.grant_record();
            let r = read()?;
            let after = self.grant_record();
            if after & SHOWN != 0 {
                return Ok((r, Some(after & 0o7777)));
            }
            tries += 1;
            if after == before || tries == 4 {
                return Ok((r, None));
            }
        }
    }

    /// Records an open file of the upper copy a split node's name moved to.
    pub fn set_moved_to(&self, copy: Arc<std::os::fd::OwnedFd>) {
        *lock(&self.extra().moved_to) = Some(copy);
    }

    /// An open file of the upper copy a split node's name moved to, if it is one.
    pub fn moved_to(&self) -> Option<Arc<std::os::fd::OwnedFd>> {
        lock(&self.extra_if_made()?.moved_to).clone()
    }

    /// The directory its last name was in, if it was deleted and that directory is still in
    /// the table.
    pub fn last_parent(&self) -> Option<Arc<Node>> {
        lock(&self.extra_if_made()?.last_parent).as_ref()?.upgrade()
    }

    /// Records the directory its last name was deleted from, and the name.
    pub fn set_last_parent(&self, dir: &Arc<Node>, name: &std::ffi::OsStr) {
        let e = self.extra();
        e.last_name.store(name_hash(name), Ordering::Relaxed);
        *lock(&e.last_parent) = Some(Arc::downgrade(dir));
    }

    /// The directory its last name was deleted from, if it is still in the table, and a hash
    /// of the name (`name_hash`).
    pub fn last_name(&self) -> Option<(Arc<Node>, u64)> {
        let e = self.extra_if_made()?;
        let dir = lock(&e.last_parent).as_ref()?.upgrade()?;
        Some((dir, e.last_name.load(Ordering::Relaxed)))
    }

    /// Makes a removal of the node keep its object (see `Extra::hold_if_removed`).
    pub fn hold_if_removed(&self) {
        self.extra().hold_if_removed.store(true, Ordering::SeqCst);
    }

    /// See `hold_if_removed`.
    pub fn holds_if_removed(&self) -> bool {
        self.extra_if_made()
            .is_some_and(|e| e.hold_if_removed.load(Ordering::SeqCst))
    }

    /// Records what the node showed when its last name went (see `Extra::held`).
    pub fn set_held(&self, held: Held) {
        *lock(&self.extra().held) = Some(held);
    }

    /// Drops what was set to be kept of the object (a removal that failed).
    pub fn clear_held(&self) {
        if let Some(e) = self.extra_if_made() {
            *lock(&e.held) = None;
        }
    }

    /// Updates the attributes kept of a removed upper object (`Held::Stat`), if that is
    /// what is kept.
    pub fn update_held_stat(&self, st: crate::sys::Stat) {
        if let Some(e) = self.extra_if_made()
            && let Some(Held::Stat(kept)) = lock(&e.held).as_mut()
        {
            **kept = st;
        }
    }

    /// The object held since the node's last name went (see `Extra::held`).
    pub fn held(&self) -> Option<Arc<std::os::fd::OwnedFd>> {
        match lock(&self.extra_if_made()?.held).as_ref()? {
            Held::Object(fd) => Some(fd.clone()),
            Held::Stat(_) => None,
        }
    }

    /// The attributes a deleted upper file had when its last name went.
    pub fn held_stat(&self) -> Option<crate::sys::Stat> {
        match lock(&self.extra_if_made()?.held).as_ref()? {
            Held::Stat(st) => Some(**st),
            Held::Object(_) => None,
        }
    }

    /// Whether the node's last name went while the daemon was running (its last directory
    /// is recorded then, whatever else is kept).
    pub fn was_removed(&self) -> bool {
        self.extra_if_made()
            .is_some_and(|e| lock(&e.last_parent).is_some())
    }

    /// Holds `Extra::dir_lock` (changes to a directory's entries).
    pub fn lock_dir(&self) -> MutexGuard<'_, ()> {
        lock(&self.extra().dir_lock)
    }

    /// Holds `Extra::listing_lock` (building a directory's merged listing). Nothing is
    /// locked while it is held but the caches' own short locks.
    pub fn lock_listing(&self) -> MutexGuard<'_, ()> {
        lock(&self.extra().listing_lock)
    }

    /// Holds `Extra::copy_lock` (copy-up of this node).
    pub fn lock_copy(&self) -> MutexGuard<'_, ()> {
        lock(&self.extra().copy_lock)
    }

    /// `lock_copy` if nobody holds it now.
    pub fn try_lock_copy(&self) -> Option<MutexGuard<'_, ()>> {
        match self.extra().copy_lock.try_lock() {
            Ok(g) => Some(g),
            Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
            Err(std::sync::TryLockError::WouldBlock) => None,
        }
    }

    /// See `Extra::write_error`.
    pub fn write_error(&self) -> i32 {
        self.extra
            .get()
            .map_or(0, |x| x.write_error.load(Ordering::Relaxed))
    }

    pub fn set_write_error(&self, errno: i32) {
        self.extra().write_error.store(errno, Ordering::Relaxed);
    }

    /// Clears `Extra::write_error` if it is still `errno`.
    pub fn clear_write_error(&self, errno: i32) {
        if let Some(x) = self.extra.get() {
            let _ = x
                .write_error
                .compare_exchange(errno, 0, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// See `Extra::data_gen` (0 until a copy-up).
    pub fn data_gen(&self) -> u64 {
        self.extra_if_made()
            .map_or(0, |e| e.data_gen.load(Ordering::SeqCst))
    }

    /// See `Extra::exec_opens`.
    pub fn exec_opens(&self) -> u64 {
        self.extra_if_made()
            .map_or(0, |e| e.exec_opens.load(Ordering::SeqCst))
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Its protection flags (`protect`) if they were read, else `Err` with what to hand
    /// `cache_prot` once they are.
    pub fn cached_prot(&self) -> std::result::Result<u8, u8> {
        let bits = self.bits.load(Ordering::SeqCst);
        if bits & PROT_KNOWN != 0 {
            Ok((bits >> PROT_SHIFT) & crate::protect::BOTH)
        } else {
            Err(bits)
        }
    }

    /// Records protection flags read after `cached_prot` gave `seen`, unless they were set
    /// (or the node left the table) in between.
    pub fn cache_prot(&self, seen: u8, prot: u8) {
        let new = seen | PROT_KNOWN | (prot & crate::protect::BOTH) << PROT_SHIFT;
        let _ = self
            .bits
            .compare_exchange(seen, new, Ordering::SeqCst, Ordering::SeqCst);
    }

    /// Records protection flags just set (`None`: to be read again).
    pub fn set_prot(&self, prot: Option<u8>) {
        let new = prot.map_or(0, |p| PROT_KNOWN | (p & crate::protect::BOTH) << PROT_SHIFT);
        let _ = self
            .bits
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |b| {
                let generation = b.wrapping_add(PROT_GEN) & PROT_GEN_MASK;
                Some(b & REMOVED | generation | new)
            });
    }

    /// Whether its name moved to a new node (see `split`).
    pub fn is_split(&self) -> bool {
        self.split.load(Ordering::SeqCst)
    }

    /// The error for a request that needs the node's name when it has none: ESTALE once its
    /// name moved to a new node (the kernel then looks the name up again), else ENOENT.
    pub fn nameless_error(&self) -> crate::sys::Errno {
        if self.is_split() {
            crate::sys::Errno::ESTALE
        } else {
            crate::sys::Errno::ENOENT
        }
    }

    /// Names of a lower hard link share one node: the name looked up last goes first, as the
    /// one a change that follows is most likely made through (FUSE requests carry only the
    /// inode, and copy-up installs the copy at the first name).
    pub fn touch_link(&self, parent: u64, name: &OsStr) -> bool {
        self.state().links.touch(parent, name)
    }

    pub fn is_dir(&self) -> bool {
        self.kind() == libc::S_IFDIR
    }

    pub fn is_root(&self) -> bool {
        self.ino == ROOT_INO
    }

    /// The generation the kernel gets with the node's number: its serial (the kernel keeps
    /// 32 bits), 0 for the root (the kernel makes the root inode with 0). A number that comes
    /// back on a new node after the old one was forgotten comes with another generation, so
    /// a file handle of the old object answers ESTALE instead of opening the new one.
    pub fn generation(&self) -> u64 {
        if self.is_root() {
            0
        } else {
            self.serial & 0xffff_ffff
        }
    }
}

const SHARDS: usize = 64;

/// States of `Table::quiet`.
const BUSY: u8 = 0;
const QUIET: u8 = 1;
const ASLEEP: u8 = 2;
/// Allocated numbers live at and above this; real-derived numbers stay below.
const ALLOC_BASE: u64 = 1 << 63;

struct IdEntry {
    ino: Ino,
    serial: u64,
}

#[derive(Default)]
struct IdShard {
    /// The node of each identity the table holds a node for, except a node at the identity's
    /// derived number (most nodes): that one is found at that number, holding the identity in
    /// its `ids` (see `Table::derived_node`), and needs no entry.
    live: HashMap<RealId, IdEntry>,
    /// Numbers kept for identities that no longer derive their own (copied-up objects and
    /// collisions), for the rest of the mount.
    remembered: HashMap<RealId, Ino>,
}

pub struct Table {
    nodes: Vec<Mutex<HashMap<Ino, Arc<Node>>>>,
    ids: Vec<Mutex<IdShard>>,
    hasher: RandomState,
    next_alloc: AtomicU64,
    next_serial: AtomicU64,
    /// Devices in layer order; the position tags numbers in the high bits.
    devs: Vec<u64>,
    /// Devices met later (filesystems mounted inside a layer).
    extra_devs: Mutex<Vec<u64>>,
    /// Bits of tag; 0 when every layer is on one filesystem.
    xino_bits: u32,
    /// Set once any number was allocated or remembered: readdir must then ask the table.
    remaps: AtomicBool,
    /// Coarse clock for `last_used`.
    clock: AtomicU32,
    /// Whether requests used the table since the trimmer's last tick (`BUSY`), not
    /// (`QUIET`), or not since it went to sleep (`ASLEEP`; see `stir`, `doze`).
    quiet: AtomicU8,
    /// Directories forgotten since the last `take_dead_dirs`: their serial and layers (their
    /// cached fds are to be closed).
    dead_dirs: Mutex<Vec<(u64, Vec<crate::lookup::Loc>)>>,
    /// Nodes in the table.
    live: AtomicUsize,
    /// Bumped each time listings already sent may show numbers that changed.
    listing_gen: AtomicU64,
    /// Objects gone with their last name so far (`mark_departed`); a listing records the
    /// count it was built at (see `ino_for_listed`).
    departures: AtomicU64,
    /// The thread that trims the table, woken as soon as it holds more than the bound
    /// (a fast walk adds tens of thousands of nodes between two of its ticks).
    trimmer: OnceLock<Trimmer>,
    /// A wake-up was sent: set when the table passes the bound, cleared once the kernel's
    /// forgets bring it back down to the re-arm level (or the trimmer finds it within).
    trim_asked: AtomicBool,
}

struct Trimmer {
    thread: std::thread::Thread,
    /// Wake it when the table holds more nodes than this.
    above: usize,
    /// Wake it again only after the table came back down to this many.
    rearm: usize,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Table {
    /// `devs`: the distinct devices of the layer roots, upper first.
    pub fn new(devs: Vec<u64>, root_state: State) -> Table {
        let xino_bits = if devs.len() <= 1 {
            0
        } else {
            // Room for every device plus one spare tag value.
            64 - (devs.len() as u64).leading_zeros()
        };
        let t = Table {
            nodes: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            ids: (0..SHARDS)
                .map(|_| Mutex::new(IdShard::default()))
                .collect(),
            hasher: RandomState::new(),
            next_alloc: AtomicU64::new(ALLOC_BASE + 2),
            next_serial: AtomicU64::new(1),
            devs,
            extra_devs: Mutex::new(Vec::new()),
            xino_bits,
            remaps: AtomicBool::new(false),
            clock: AtomicU32::new(1),
            quiet: AtomicU8::new(BUSY),
            dead_dirs: Mutex::new(Vec::new()),
            live: AtomicUsize::new(1),
            listing_gen: AtomicU64::new(0),
            departures: AtomicU64::new(0),
            trimmer: OnceLock::new(),
            trim_asked: AtomicBool::new(false),
        };
        let root_ids = root_state.ids.clone();
        // Never forgotten: its one reference is never dropped.
        let root = Arc::new(Node::new(ROOT_INO, 0, libc::S_IFDIR, root_state));
        lock(t.node_shard(ROOT_INO)).insert(ROOT_INO, root);
        for id in root_ids {
            lock(t.id_shard(&id)).live.insert(
                id,
                IdEntry {
                    ino: ROOT_INO,
                    serial: 0,
                },
            );
        }
        t
    }

    fn node_shard(&self, ino: Ino) -> &Mutex<HashMap<Ino, Arc<Node>>> {
        &self.nodes[(ino as usize ^ (ino >> 17) as usize) % SHARDS]
    }

    fn id_shard(&self, id: &RealId) -> &Mutex<IdShard> {
        &self.ids[(self.hasher.hash_one(id) as usize) % SHARDS]
    }

    pub fn get(&self, ino: Ino) -> Option<Arc<Node>> {
        lock(self.node_shard(ino)).get(&ino).cloned()
    }

    /// The node a request names, marked as used now.
    pub fn get_used(&self, ino: Ino) -> Option<Arc<Node>> {
        let n = self.get(ino)?;
        n.last_used
            .store(self.clock.load(Ordering::Relaxed), Ordering::Relaxed);
        self.stir();
        Some(n)
    }

    /// Notes that a request used the mount, waking the trimmer if it sleeps. Called by every
    /// request that names a node (`get_used`) and by those that leave the trimmer work without
    /// naming one (reads into pooled buffers, forgets of directories). Costs one load while
    /// the mount is busy.
    pub fn stir(&self) {
        if self.quiet.load(Ordering::SeqCst) != BUSY
            && self.quiet.swap(BUSY, Ordering::SeqCst) == ASLEEP
            && let Some(t) = self.trimmer.get()
        {
            t.thread.unpark();
        }
    }

    /// Advances the clock that `get_used` stamps nodes with. Returns whether no request used
    /// the table since the last tick.
    pub fn tick(&self) -> bool {
        self.clock.fetch_add(1, Ordering::Relaxed);
        self.quiet.swap(QUIET, Ordering::SeqCst) == QUIET
    }

    /// Lets the trimmer sleep until the next `stir`: false if a request came since the last
    /// tick. After a true answer the caller looks once more for work left to it (a request
    /// that left some before this call either made it fail or is seen then; one after it
    /// sees `ASLEEP` and wakes the trimmer).
    pub fn doze(&self) -> bool {
        self.quiet
            .compare_exchange(QUIET, ASLEEP, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
    }

    /// Counts `mark_listings_stale` calls (see `Union::recheck_listing`).
    pub fn listing_gen(&self) -> u64 {
        self.listing_gen.load(Ordering::SeqCst)
    }

    /// A number that listings already sent may show changed (`remove_id`: the names of a
    /// lower hard link that keep the lower file when another name is copied up, or a name
    /// moved to a new node). Which directories hold such a name is not known (some were only
    /// listed), so every directory whose listing the kernel may keep (one was served since
    /// the last call) is marked stale: its next open drops that listing (`fs::opendir`).
    /// Rare, and only directories listed since the last time are marked.
    ///
    /// Not dropped at once with a notification: that would wait for the kernel's lock on a
    /// cached listing page, which a reader holds while it copies entries out, through page
    /// faults that can need this daemon.
    fn mark_listings_stale(&self) {
        self.listing_gen.fetch_add(1, Ordering::SeqCst);
        for shard in &self.nodes {
            for n in lock(shard).values() {
                if let Some(e) = n.extra_if_made() {
                    e.listing_outdated();
                }
            }
        }
    }

    /// The names of the `n` least recently used nodes (not the root), coldest first.
    pub fn coldest(&self, n: usize) -> Vec<(Ino, std::ffi::OsString)> {
        let mut all: Vec<(u32, Arc<Node>)> = Vec::new();
        for shard in &self.nodes {
            let shard = lock(shard);
            all.extend(
                shard
                    .values()
                    .filter(|node| !node.is_root())
                    .map(|node| (node.last_used.load(Ordering::Relaxed), node.clone())),
            );
        }
        if n < all.len() {
            all.select_nth_unstable_by_key(n, |(t, _)| *t);
            all.truncate(n);
        }
        all.sort_by_key(|(t, _)| *t);
        let mut out = Vec::with_capacity(all.len());
        for (_, node) in all {
            let st = node.state();
            out.extend(
                st.links
                    .iter()
                    .map(|l| (l.parent.ino, l.name.to_os_string())),
            );
        }
        out
    }

    pub fn root(&self) -> Arc<Node> {
        self.get(ROOT_INO).expect("root is never removed")
    }

    fn alloc(&self) -> Ino {
        self.remaps.store(true, Ordering::Relaxed);
        self.next_alloc.fetch_add(1, Ordering::Relaxed)
    }

    /// The number an identity derives by itself, if it fits.
    fn derived(&self, id: RealId) -> Option<Ino> {
        let idx = match self.devs.iter().position(|&d| d == id.dev) {
            Some(i) => i as u64,
            None => {
                // A filesystem mounted inside a layer: tag it if a tag is free.
                let max = if self.xino_bits == 0 {
                    0
                } else {
                    (1u64 << self.xino_bits) - 1
                };
                let mut extra = lock(&self.extra_devs);
                match extra.iter().position(|&d| d == id.dev) {
                    Some(i) => (self.devs.len() + i) as u64,
                    None if ((self.devs.len() + extra.len()) as u64) < max => {
                        extra.push(id.dev);
                        (self.devs.len() + extra.len() - 1) as u64
                    }
                    None => return None,
                }
            }
        };
        if self.xino_bits == 0 {
            return (idx == 0 && id.ino > ROOT_INO && id.ino < ALLOC_BASE).then_some(id.ino);
        }
        let shift = 63 - self.xino_bits;
        if id.ino >= 1 << shift {
            return None;
        }
        let ino = (idx << shift) | id.ino;
        (ino > ROOT_INO).then_some(ino)
    }

    /// The number readdir reports for an identity: the live node's, a remembered one, or the
    /// derived one (allocating and remembering when the derived one is taken).
    pub fn ino_for(&self, id: RealId) -> Ino {
        if !self.remaps.load(Ordering::Relaxed)
            && let Some((ino, _)) = self.derived_slot(id)
        {
            return ino;
        }
        let mut shard = lock(self.id_shard(&id));
        self.ino_for_locked(&mut shard, id)
    }

    /// Records that the object of `node` is gone with its last name (it had no other link:
    /// another name of it may be in a listing the kernel or a stream keeps, and must show the
    /// number the object gets from now on). Called before its identities leave the node
    /// (`forget_ids`), so that a listing reading them afterwards sees the mark.
    pub fn mark_departed(&self, node: &Node) {
        let n = self.departures.fetch_add(1, Ordering::SeqCst) + 1;
        node.extra().departed_at.store(n, Ordering::SeqCst);
    }

    /// The count of objects removed so far, which a listing records when it is built (see
    /// `ino_for_listed`).
    pub fn departures(&self) -> u64 {
        self.departures.load(Ordering::SeqCst)
    }

    /// The number to list for `id` in a listing built when `departures` was `built`. An
    /// entry whose object was removed since keeps the number the object had: the node made
    /// for `id` at its derived number, which lost its identities when the last name went,
    /// is still in the table while the kernel holds it, and `ino_for` would give the entry a
    /// new number (and keep that for whatever object reuses the real inode). Only a listing
    /// built before the removal can show that object under `id`; one built after it shows a
    /// new object reusing the real inode, which gets a number of its own (`ino_for`).
    pub fn ino_for_listed(&self, id: RealId, built: u64) -> Ino {
        if self.departures.load(Ordering::SeqCst) > built
            && let Some(ino) = self.derived(id)
            && let Some(n) = self.get(ino)
            && n.extra_if_made()
                .is_some_and(|e| e.departed_at.load(Ordering::SeqCst) > built)
        {
            return ino;
        }
        self.ino_for(id)
    }

    /// `id`'s derived number if it is free or its node holds `id` (with that node), else
    /// `None` (no derived number, or another object's node has it).
    fn derived_slot(&self, id: RealId) -> Option<(Ino, Option<Arc<Node>>)> {
        let ino = self.derived(id)?;
        match self.get(ino) {
            None => Some((ino, None)),
            Some(n) if n.state().ids.contains(&id) => Some((ino, Some(n))),
            Some(_) => None,
        }
    }

    fn ino_for_locked(&self, shard: &mut IdShard, id: RealId) -> Ino {
        if let Some(e) = shard.live.get(&id) {
            return e.ino;
        }
        if let Some(&ino) = shard.remembered.get(&id) {
            return ino;
        }
        if let Some((ino, _)) = self.derived_slot(id) {
            return ino;
        }
        let ino = self.alloc();
        shard.remembered.insert(id, ino);
        ino
    }

    /// Finds the node of the object `id` (taking one lookup reference on it), or creates one with
    /// `make()`'s state. Returns the node and whether it already existed.
    pub fn get_or_insert(
        &self,
        id: RealId,
        kind: u32,
        make: impl FnOnce() -> State,
    ) -> (Arc<Node>, bool) {
        let mut idsh = lock(self.id_shard(&id));
        if let Some(e) = idsh.live.get(&id) {
            let shard = lock(self.node_shard(e.ino));
            if let Some(node) = shard.get(&e.ino).cloned()
                && node.serial == e.serial
                && node.kind() == kind
                && !node.is_split()
            {
                node.refs.fetch_add(1, Ordering::Relaxed);
                return (node, true);
            }
            drop(shard);
            idsh.live.remove(&id);
        } else if let Some(node) = self.derived_node(&idsh, id, kind) {
            return (node, true);
        }
        (self.insert_locked(&mut idsh, id, kind, make), false)
    }

    /// The node of an object just made (a real inode fresh from its filesystem), created
    /// with `make()`'s state and one lookup reference. A node that still claims `id` stands
    /// for an earlier object that had the same real inode, which its removal freed (that
    /// removal may still be under way, holding only its own directory's lock): it keeps its
    /// number but loses `id`, so that it never stands for the new object, nor the new
    /// object's node for its removal.
    pub fn insert_new(&self, id: RealId, kind: u32, make: impl FnOnce() -> State) -> Arc<Node> {
        let mut idsh = lock(self.id_shard(&id));
        let stale = match idsh.live.remove(&id) {
            Some(e) => lock(self.node_shard(e.ino))
                .get(&e.ino)
                .filter(|n| n.serial == e.serial)
                .cloned(),
            None if idsh.remembered.contains_key(&id) => None,
            None => self.derived_slot(id).and_then(|(_, n)| n),
        };
        if let Some(old) = stale {
            old.state().ids.retain(|x| *x != id);
        }
        self.insert_locked(&mut idsh, id, kind, make)
    }

    /// A new node for `id` (none holds it), with one lookup reference.
    fn insert_locked(
        &self,
        idsh: &mut IdShard,
        id: RealId,
        kind: u32,
        make: impl FnOnce() -> State,
    ) -> Arc<Node> {
        let mut ino = self.ino_for_locked(idsh, id);
        if lock(self.node_shard(ino)).contains_key(&ino) {
            ino = self.alloc();
            idsh.remembered.insert(id, ino);
        }
        let mut state = make();
        if !state.ids.contains(&id) {
            state.ids.push(id);
        }
        let serial = self.next_serial.fetch_add(1, Ordering::Relaxed);
        let node = Arc::new(Node::new(ino, serial, kind, state));
        if lock(self.node_shard(ino))
            .insert(ino, node.clone())
            .is_none()
        {
            self.added_node();
        }
        if !self.at_derived(idsh, id, ino) {
            idsh.live.insert(
                id,
                IdEntry {
                    ino,
                    serial: node.serial,
                },
            );
        }
        node
    }

    /// Whether `ino` is the number `id` derives and keeps (none remembered for it): a node
    /// there holding `id` is found without an entry in `live`.
    fn at_derived(&self, idsh: &IdShard, id: RealId, ino: Ino) -> bool {
        self.derived(id) == Some(ino) && !idsh.remembered.contains_key(&id)
    }

    /// The node at `id`'s derived number, if it holds `id` and may serve it (same kind, not
    /// split), with one lookup reference taken. Called with `id`'s shard held and no entry
    /// for it in `live`. The node's `ids` decide: an identity that moves to another number
    /// has that recorded in its shard first (`remove_id` remembers the new number, which
    /// turns this off), and one that merely leaves (`forget_ids`, for an object whose last
    /// name went) is no longer in `ids`.
    fn derived_node(&self, idsh: &IdShard, id: RealId, kind: u32) -> Option<Arc<Node>> {
        if idsh.remembered.contains_key(&id) {
            return None;
        }
        let (ino, node) = self.derived_slot(id)?;
        let node = node?;
        if node.kind() != kind || node.is_split() {
            return None;
        }
        // Taken only if the node is still in the table (the table's lock orders this against
        // the last reference's release).
        let shard = lock(self.node_shard(ino));
        if !shard.get(&ino).is_some_and(|n| Arc::ptr_eq(n, &node)) {
            return None;
        }
        node.refs.fetch_add(1, Ordering::Relaxed);
        Some(node)
    }

    /// The number of the live node that holds the identity `id`, if one does.
    pub fn ino_holding(&self, id: RealId) -> Option<Ino> {
        let idsh = lock(self.id_shard(&id));
        if let Some(e) = idsh.live.get(&id) {
            return Some(e.ino);
        }
        if idsh.remembered.contains_key(&id) {
            return None;
        }
        let (ino, node) = self.derived_slot(id)?;
        node.map(|_| ino)
    }

    /// Whether `id` has a number in this mount already: a live node holds it, or one was
    /// remembered for it.
    pub fn numbered(&self, id: RealId) -> bool {
        let idsh = lock(self.id_shard(&id));
        idsh.live.contains_key(&id)
            || idsh.remembered.contains_key(&id)
            || self.derived_slot(id).is_some_and(|(_, n)| n.is_some())
    }

    /// Makes `id`, one of `node`'s identities, keep the node's number for the rest of the
    /// mount (also once the node is gone: see `numbered`).
    pub fn keep_number(&self, node: &Node, id: RealId) {
        self.register(node, id, Remember::Always);
    }

    /// Registers one more identity for a live node, for the node's life only (a copy
    /// numbered by its origin: its number comes back from the origin without a remembered
    /// one, which would cost memory for every copy a walk looks up).
    pub fn add_live_id(&self, node: &Node, id: RealId) {
        self.register(node, id, Remember::Never);
    }

    /// Registers one more identity for a node (the upper object after copy-up), and remembers
    /// the node's number for it for the rest of the mount.
    pub fn add_id(&self, node: &Node, id: RealId) {
        self.register(node, id, Remember::UnlessDerived);
    }

    /// Registers `id` as one of `node`'s identities, remembering its number as `remember`
    /// says.
    fn register(&self, node: &Node, id: RealId, remember: Remember) {
        let mut idsh = lock(self.id_shard(&id));
        idsh.live.insert(
            id,
            IdEntry {
                ino: node.ino,
                serial: node.serial,
            },
        );
        let remembered = match remember {
            Remember::Never => false,
            Remember::UnlessDerived => self.derived(id) != Some(node.ino),
            Remember::Always => true,
        };
        if remembered {
            idsh.remembered.insert(id, node.ino);
        }
        // A live identity whose number is not the derived one sends readdir's numbers down
        // the slow path, which reads `live` and `remembered`.
        if remembered || remember == Remember::Never {
            self.remaps.store(true, Ordering::Relaxed);
        }
        drop(idsh);
        let mut st = node.state();
        if !st.ids.contains(&id) {
            st.ids.push(id);
        }
    }

    /// The object of `node` lives on under names the table does not know (other names of a
    /// hard link) as the last name the node had goes: the node keeps its number while the
    /// kernel holds it, so the object gets numbers of its own now, as `remove_id` gives one,
    /// and listings the kernel keeps are marked stale (one may show another name of it).
    pub fn renumber_survivor(&self, node: &Node) {
        let ids = node.state().ids.clone();
        let mut renumbered = false;
        for id in ids {
            let mut idsh = lock(self.id_shard(&id));
            let current = idsh
                .remembered
                .get(&id)
                .copied()
                .or_else(|| self.derived(id));
            if current == Some(node.ino) {
                let ino = self.alloc();
                idsh.remembered.insert(id, ino);
                renumbered = true;
            }
        }
        if renumbered {
            self.mark_listings_stale();
        }
    }

    /// Unregisters an identity of a node (the object is gone, or no longer the node's).
    pub fn remove_id(&self, node: &Node, id: RealId) {
        let mut idsh = lock(self.id_shard(&id));
        if idsh.live.get(&id).is_some_and(|e| e.serial == node.serial) {
            idsh.live.remove(&id);
        }
        // The node keeps its number; the object leaving it gets one of its own now, so that
        // readdir shows the number its next lookup will give, also once the node is gone (a
        // derived number would then come back to it, beside the node's remembered ones).
        let current = idsh
            .remembered
            .get(&id)
            .copied()
            .or_else(|| self.derived(id));
        let renumbered = current == Some(node.ino);
        if renumbered {
            let ino = self.alloc();
            idsh.remembered.insert(id, ino);
        }
        drop(idsh);
        node.state().ids.retain(|x| *x != id);
        if renumbered {
            self.mark_listings_stale();
        }
    }

    /// Unregisters every identity of a node that leaves the table or whose last name is gone
    /// (`removed`), so that a new object reusing a real inode number gets a node of its own.
    /// For a removed object, the number remembered for its upper object goes too: a new upper
    /// object reusing that real inode derives its own, as it will after a remount. (Its lower
    /// ones stay: a lower object may have other names. A node that merely leaves the table
    /// keeps every remembered number: its object's next node takes it again.)
    pub fn forget_ids(&self, node: &Node, removed: bool) {
        let (ids, upper) = {
            let mut st = node.state();
            (std::mem::take(&mut st.ids), st.upper)
        };
        for id in ids {
            let mut idsh = lock(self.id_shard(&id));
            if idsh.live.get(&id).is_some_and(|e| e.serial == node.serial) {
                idsh.live.remove(&id);
            }
            if removed && Some(id) == upper && idsh.remembered.get(&id) == Some(&node.ino) {
                idsh.remembered.remove(&id);
            }
        }
    }

    /// Takes `n` more references on a live node.
    pub fn pin(&self, node: &Node, n: u64) {
        let _shard = lock(self.node_shard(node.ino));
        node.refs.fetch_add(n, Ordering::Relaxed);
    }

    /// Drops `n` references; a node that reaches 0 leaves the table and unpins its parents.
    pub fn unpin(&self, node: &Arc<Node>, n: u64) {
        let mut pending = vec![(node.clone(), n)];
        while let Some((node, n)) = pending.pop() {
            if node.is_root() {
                continue;
            }
            {
                let mut shard = lock(self.node_shard(node.ino));
                let old = node.refs.load(Ordering::Relaxed);
                let new = old.saturating_sub(n);
                node.refs.store(new, Ordering::Relaxed);
                if new > 0 || node.bits.load(Ordering::Relaxed) & REMOVED != 0 {
                    continue;
                }
                if shard
                    .get(&node.ino)
                    .is_some_and(|n| n.serial == node.serial)
                {
                    shard.remove(&node.ino);
                    self.removed_node();
                }
                node.bits.fetch_or(REMOVED, Ordering::Relaxed);
            }
            self.forget_ids(&node, false);
            if node.is_dir() {
                let locs = {
                    let st = node.state();
                    let upper = st.upper.map(|_| crate::lookup::Loc::Upper);
                    upper
                        .into_iter()
                        .chain(st.lowers.iter().map(|(l, _)| crate::lookup::Loc::Lower(*l)))
                        .collect()
                };
                lock(&self.dead_dirs).push((node.serial, locs));
                self.stir();
            }
            let links = std::mem::take(&mut node.state().links);
            for l in links {
                pending.push((l.parent, 1));
            }
        }
    }

    /// The directories forgotten since the last call (see `dead_dirs`).
    pub fn take_dead_dirs(&self) -> Vec<(u64, Vec<crate::lookup::Loc>)> {
        std::mem::take(&mut *lock(&self.dead_dirs))
    }

    /// Whether directories were forgotten since the last `take_dead_dirs`.
    pub fn has_dead_dirs(&self) -> bool {
        !lock(&self.dead_dirs).is_empty()
    }

    /// Adds a name to a node, pinning the parent. The newest name goes first: it is the one
    /// copy-up installs a copy at (see `Node::touch_link`).
    pub fn link(&self, node: &Node, parent: &Arc<Node>, name: &OsStr) {
        self.pin(parent, 1);
        let twice = node.state().links.push_first(Link {
            parent: parent.clone(),
            name: Name::new(name),
        });
        if let Some(l) = twice {
            self.unpin(&l.parent, 1);
        }
    }

    /// Moves a node's name (parent, name) to (newparent, newname) in one change of its state
    /// (a rename): a request reading its names meanwhile finds the old name or the new one,
    /// never none (it would wait for the rename, and answer ENOENT if it seemed to last).
    pub fn relink(
        &self,
        node: &Node,
        parent: &Node,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
    ) {
        self.pin(newparent, 1);
        let (old, twice) = {
            let mut st = node.state();
            let old = st.links.remove(parent.ino, name);
            let twice = st.links.push_first(Link {
                parent: newparent.clone(),
                name: Name::new(newname),
            });
            (old, twice)
        };
        for l in old.into_iter().chain(twice) {
            self.unpin(&l.parent, 1);
        }
    }

    /// Removes the name (parent, name) from a node, unpinning the parent. Returns whether the
    /// node had that name.
    pub fn unlink(&self, node: &Node, parent: &Node, name: &OsStr) -> bool {
        let removed = node.state().links.remove(parent.ino, name);
        match removed {
            Some(l) => {
                self.unpin(&l.parent, 1);
                true
            }
            None => false,
        }
    }

    /// Whether readdir must map identities through the table (numbers were remapped).
    pub fn has_remaps(&self) -> bool {
        self.remaps.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.live.load(Ordering::Relaxed)
    }

    /// Names the thread to wake once the table holds more than `above` nodes; after a
    /// wake-up, the next one waits until the table came back down to `rearm` nodes.
    pub fn set_trimmer(&self, thread: std::thread::Thread, above: usize, rearm: usize) {
        let _ = self.trimmer.set(Trimmer {
            thread,
            above,
            rearm,
        });
    }

    /// Called by the trimmer when it finds the table within the bound: the next pass over
    /// it wakes the trimmer again.
    pub fn trimmed(&self) {
        self.trim_asked.store(false, Ordering::Relaxed);
    }

    fn removed_node(&self) {
        let n = self.live.fetch_sub(1, Ordering::Relaxed) - 1;
        // Most of what the trimmer handed back is forgotten: the next pass over the bound
        // wakes it at once. Before that, entries handed back but not yet forgotten would only
        // be handed back again (its regular tick still trims, as when the kernel holds on to
        // them).
        if self.trimmer.get().is_some_and(|t| n == t.rearm) {
            self.trimmed();
        }
    }

    fn added_node(&self) {
        let n = self.live.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(t) = self.trimmer.get()
            && n > t.above
            && !self.trim_asked.swap(true, Ordering::Relaxed)
        {
            t.thread.unpark();
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passing_the_bound_wakes_the_trimmer_once_until_back_down() {
        let t = Table::new(vec![7], State::empty());
        t.set_trimmer(std::thread::current(), 3, 2);
        let nodes: Vec<_> = (10..14)
            .map(|i| {
                let id = RealId { dev: 7, ino: i };
                t.get_or_insert(id, libc::S_IFREG, State::empty).0
            })
            .collect();
        // The root and four nodes: past the bound of 3 twice, one wake-up asked.
        assert_eq!(t.len(), 5);
        assert!(t.trim_asked.load(Ordering::Relaxed));
        // Handed back and forgotten down to the re-arm level: armed again.
        t.unpin(&nodes[0], 1);
        assert!(
            t.trim_asked.load(Ordering::Relaxed),
            "4 nodes: past the bound"
        );
        t.unpin(&nodes[1], 1);
        assert!(
            t.trim_asked.load(Ordering::Relaxed),
            "3 nodes: not down yet"
        );
        t.unpin(&nodes[2], 1);
        assert_eq!(t.len(), 2);
        assert!(!t.trim_asked.load(Ordering::Relaxed));
    }

    #[test]
    fn same_fs_uses_real_numbers() {
        let t = Table::new(vec![7], State::empty());
        let id = RealId { dev: 7, ino: 1234 };
        assert_eq!(t.ino_for(id), 1234);
        let (n, existed) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert!(!existed);
        assert_eq!(n.ino, 1234);
        let (n2, existed) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert!(existed);
        assert_eq!(n2.serial, n.serial);
    }

    #[test]
    fn a_new_object_never_takes_the_node_of_an_earlier_one_at_its_inode() {
        let t = Table::new(vec![7], State::empty());
        let id = RealId { dev: 7, ino: 1234 };
        // The earlier object's node, at the derived number and with a remembered one.
        let (old, _) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        let new = t.insert_new(id, libc::S_IFREG, State::empty);
        assert_ne!(new.serial, old.serial);
        assert_ne!(new.ino, old.ino, "the earlier node keeps its number");
        assert!(
            !old.state().ids.contains(&id),
            "the earlier node lost the identity"
        );
        let (found, existed) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert!(existed);
        assert_eq!(found.serial, new.serial, "lookups find the new node");
        // The earlier node's removal, finishing now, leaves the new node's identity alone.
        t.forget_ids(&old, true);
        let (found, _) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert_eq!(found.serial, new.serial);
        // Through the live map as well as at a derived number.
        let id2 = RealId { dev: 7, ino: 99 };
        let (a, _) = t.get_or_insert(id2, libc::S_IFREG, State::empty);
        let other = RealId { dev: 7, ino: 5000 };
        t.add_id(&a, other);
        let b = t.insert_new(other, libc::S_IFREG, State::empty);
        assert_ne!(b.serial, a.serial);
        assert_eq!(
            t.get_or_insert(other, libc::S_IFREG, State::empty).0.serial,
            b.serial
        );
    }

    #[test]
    fn real_ino_one_is_not_the_root() {
        let t = Table::new(vec![7], State::empty());
        let id = RealId { dev: 7, ino: 1 };
        let (n, _) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert_ne!(n.ino, ROOT_INO);
        assert_eq!(t.ino_for(id), n.ino);
    }

    #[test]
    fn an_identity_leaving_a_node_gets_its_own_number_at_once() {
        let t = Table::new(vec![7], State::empty());
        let lower = RealId { dev: 7, ino: 50 };
        // A node with an allocated, remembered number (its real one was taken).
        let (old, _) = t.get_or_insert(lower, libc::S_IFREG, State::empty);
        t.forget_ids(&old, true);
        let (n, _) = t.get_or_insert(lower, libc::S_IFREG, State::empty);
        assert!(n.ino >= ALLOC_BASE);
        // Copy-up of one name of a lower hard link: the node becomes the upper copy, and the
        // other names keep the lower file.
        t.add_id(&n, RealId { dev: 7, ino: 60 });
        t.remove_id(&n, lower);
        let listed = t.ino_for(lower);
        assert_ne!(listed, n.ino, "readdir must not show the copy's number");
        let (m, existed) = t.get_or_insert(lower, libc::S_IFREG, State::empty);
        assert!(!existed);
        assert_eq!(m.ino, listed, "lookup gives the number readdir showed");
    }

    #[test]
    fn a_derived_number_leaving_a_node_stays_away_after_the_node_goes() {
        let t = Table::new(vec![7], State::empty());
        let lower = RealId { dev: 7, ino: 50 };
        let upper = RealId { dev: 7, ino: 60 };
        let (n, _) = t.get_or_insert(lower, libc::S_IFREG, State::empty);
        assert_eq!(n.ino, 50, "the lower object's own number");
        // Copy-up of one name of a lower hard link, then the kernel forgets the copy.
        t.add_id(&n, upper);
        t.remove_id(&n, lower);
        t.unpin(&n, 1);
        assert!(t.get(50).is_none());
        // The other names must not take the copy's number back: it stays the copy's.
        let listed = t.ino_for(lower);
        assert_ne!(listed, 50);
        assert_eq!(
            t.get_or_insert(lower, libc::S_IFREG, State::empty).0.ino,
            listed
        );
        assert_eq!(
            t.get_or_insert(upper, libc::S_IFREG, State::empty).0.ino,
            50
        );
    }

    #[test]
    fn a_changed_number_marks_the_listings_the_kernel_may_keep() {
        let t = Table::new(vec![7], State::empty());
        let (dir, _) = t.get_or_insert(RealId { dev: 7, ino: 10 }, libc::S_IFDIR, State::empty);
        let (other, _) = t.get_or_insert(RealId { dev: 7, ino: 11 }, libc::S_IFDIR, State::empty);
        let (file, _) = t.get_or_insert(RealId { dev: 7, ino: 50 }, libc::S_IFREG, State::empty);
        dir.extra().listed.store(true, Ordering::SeqCst);
        // An identity leaving a node that keeps no number for it: nothing changes.
        t.remove_id(&file, RealId { dev: 7, ino: 99 });
        assert_eq!(t.listing_gen(), 0);
        assert!(!dir.extra().stale_listing.load(Ordering::SeqCst));
        // The lower object of a copied-up hard link gets a new number.
        t.add_id(&file, RealId { dev: 7, ino: 60 });
        t.remove_id(&file, RealId { dev: 7, ino: 50 });
        assert_eq!(t.listing_gen(), 1);
        assert!(
            dir.extra().stale_listing.load(Ordering::SeqCst),
            "listed: marked"
        );
        assert!(!dir.extra().listed.load(Ordering::SeqCst));
        assert!(
            !other.extra().stale_listing.load(Ordering::SeqCst),
            "never listed"
        );
    }

    #[test]
    fn several_filesystems_are_tagged() {
        let t = Table::new(vec![7, 9], State::empty());
        let a = t.ino_for(RealId { dev: 7, ino: 5 });
        let b = t.ino_for(RealId { dev: 9, ino: 5 });
        assert_ne!(a, b);
        assert!(a < ALLOC_BASE && b < ALLOC_BASE);
    }

    #[test]
    fn a_node_at_its_derived_number_is_found_without_an_entry() {
        let t = Table::new(vec![7], State::empty());
        let id = RealId { dev: 7, ino: 50 };
        let (n, existed) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert!(!existed);
        assert_eq!(n.ino, 50);
        assert!(
            lock(t.id_shard(&id)).live.is_empty(),
            "no entry for a derived number"
        );
        let (again, existed) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        assert!(existed && Arc::ptr_eq(&n, &again), "found at its number");
        assert_eq!(n.refs.load(Ordering::Relaxed), 2);
        // Another type at the same identity (a reused inode while the kernel still holds the
        // node): a node of its own, at a number of its own, found through its entry.
        let (dir, existed) = t.get_or_insert(id, libc::S_IFDIR, State::empty);
        assert!(!existed && dir.ino != 50);
        assert!(Arc::ptr_eq(
            &t.get_or_insert(id, libc::S_IFDIR, State::empty).0,
            &dir
        ));
        // A split node is not handed out again.
        let other = RealId { dev: 7, ino: 51 };
        let (s, _) = t.get_or_insert(other, libc::S_IFREG, State::empty);
        s.split.store(true, Ordering::SeqCst);
        let (fresh, existed) = t.get_or_insert(other, libc::S_IFREG, State::empty);
        assert!(!existed && !Arc::ptr_eq(&s, &fresh));
        // Gone from the table: a new node at the derived number again.
        let third = RealId { dev: 7, ino: 52 };
        let (g, _) = t.get_or_insert(third, libc::S_IFREG, State::empty);
        t.unpin(&g, 1);
        let (h, existed) = t.get_or_insert(third, libc::S_IFREG, State::empty);
        assert!(!existed && !Arc::ptr_eq(&g, &h));
        assert_eq!(h.ino, 52);
    }

    #[test]
    fn forgotten_node_leaves_and_collisions_allocate() {
        let t = Table::new(vec![7], State::empty());
        let id = RealId { dev: 7, ino: 50 };
        let (n, _) = t.get_or_insert(id, libc::S_IFREG, State::empty);
        // The object is deleted but the kernel still holds the node; a new object reuses the
        // real number and must get a number of its own.
        t.forget_ids(&n, true);
        let (m, existed) = t.get_or_insert(id, libc::S_IFDIR, State::empty);
        assert!(!existed);
        assert_ne!(m.ino, n.ino);
        assert_eq!(t.ino_for(id), m.ino);
        t.unpin(&n, 1);
        assert!(t.get(n.ino).is_none());
        assert!(t.get(m.ino).is_some());
    }

    #[test]
    fn children_pin_parents() {
        let t = Table::new(vec![7], State::empty());
        let (dir, _) = t.get_or_insert(RealId { dev: 7, ino: 10 }, libc::S_IFDIR, State::empty);
        let (file, _) = t.get_or_insert(RealId { dev: 7, ino: 11 }, libc::S_IFREG, State::empty);
        t.link(&file, &dir, OsStr::new("f"));
        t.unpin(&dir, 1);
        assert!(t.get(10).is_some(), "pinned by its child");
        t.unpin(&file, 1);
        assert!(t.get(11).is_none());
        assert!(t.get(10).is_none(), "released with its last child");
    }

    #[test]
    fn a_moved_name_is_never_missing_and_moves_its_pin() {
        let t = Table::new(vec![7], State::empty());
        let (d1, _) = t.get_or_insert(RealId { dev: 7, ino: 10 }, libc::S_IFDIR, State::empty);
        let (d2, _) = t.get_or_insert(RealId { dev: 7, ino: 12 }, libc::S_IFDIR, State::empty);
        let (file, _) = t.get_or_insert(RealId { dev: 7, ino: 11 }, libc::S_IFREG, State::empty);
        t.link(&file, &d1, OsStr::new("a"));
        let stop = std::sync::atomic::AtomicBool::new(false);
        let nameless = std::thread::scope(|s| {
            let reader = s.spawn(|| {
                let mut nameless = 0;
                while !stop.load(Ordering::Relaxed) {
                    nameless += usize::from(file.state().links.is_empty());
                }
                nameless
            });
            for _ in 0..20_000 {
                t.relink(&file, &d1, OsStr::new("a"), &d2, OsStr::new("b"));
                t.relink(&file, &d2, OsStr::new("b"), &d1, OsStr::new("a"));
            }
            t.relink(&file, &d1, OsStr::new("a"), &d2, OsStr::new("b"));
            stop.store(true, Ordering::Relaxed);
            reader.join().unwrap()
        });
        assert_eq!(nameless, 0, "times the file was seen without a name");
        assert_eq!(file.state().links.len(), 1);
        // The old directory is pinned by nothing but its own lookup now, the new one by the
        // file too.
        t.unpin(&d1, 1);
        assert!(t.get(10).is_none());
        t.unpin(&d2, 1);
        assert!(t.get(12).is_some(), "pinned by its child");
        t.unpin(&file, 1);
        assert!(t.get(12).is_none());
    }

    #[test]
    fn the_trimmer_dozes_only_after_a_quiet_tick_and_the_next_use_wakes_it() {
        let t = Table::new(vec![7], State::empty());
        t.set_trimmer(std::thread::current(), usize::MAX, 0);
        assert!(!t.tick(), "a new table counts as used");
        assert!(t.tick(), "nothing used it since");
        assert!(t.get_used(ROOT_INO).is_some());
        assert!(!t.doze(), "used since the tick");
        assert!(!t.tick());
        assert!(t.tick());
        assert!(t.doze());
        assert_eq!(t.quiet.load(Ordering::SeqCst), ASLEEP);
        // Clear a wake-up token left by an earlier unpark, then check that a use unparks.
        std::thread::park_timeout(std::time::Duration::ZERO);
        t.stir();
        assert_eq!(t.quiet.load(Ordering::SeqCst), BUSY);
        let start = std::time::Instant::now();
        std::thread::park_timeout(std::time::Duration::from_secs(10));
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "the use did not unpark the sleeping trimmer"
        );
        assert!(!t.tick(), "the use counts for the next tick");
    }
}
