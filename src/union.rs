//! The merged filesystem itself, independent of FUSE: layers, inode table, open handles and the
//! options that change behaviour. Its operations live in the modules named after them
//! (`lookup`, `readdir`, `copy_up`, `dir`, `attr`, `file`); `fs` adapts it to fuser.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use crate::compact::Few;
use crate::fdcache::FdCache;
use crate::file::{Backings, Handles};
use crate::idmap::IdMap;
use crate::inode::{RealId, State, Table};
use crate::layer::Layers;
use crate::notify::Invalidator;
use crate::sys::{self, Result};

/// Behaviour switches that come from the command line.
#[derive(Clone, Debug)]
pub struct Options {
    /// Kernel cache timeout for entries and attributes.
    pub ttl: Duration,
    /// `fsync=0`/`volatile`: skip every fsync, copy-up's included.
    pub fsync: bool,
    /// Report directories with nlink 1 instead of counting merged subdirectories.
    pub static_nlink: bool,
    /// Passthrough of open files to the kernel (decided at mount).
    pub passthrough: bool,
    pub idmap: IdMap,
    /// `xattr_permissions`: 0 off, 1 or 2 as fuse-overlayfs.
    pub xattr_permissions: u8,
    pub posix_acl: bool,
    /// Whether listings carry every entry's attributes (see `ReaddirPlus`).
    pub readdirplus: ReaddirPlus,
    /// `noatime`: reads through the view leave the upper files' access times alone (the
    /// kernel keeps no times of FUSE files itself; the lower layers are read without them
    /// whatever the option).
    pub noatime: bool,
    /// Listings time an access of the upper directory: not on a `noatime`, `nodiratime` or
    /// read-only mount (see `Union::time_listing`).
    pub dir_atime: bool,
    /// `noxattrs=1` (fuse-overlayfs's): the view has no xattrs (and so no ACLs); every
    /// xattr request through it fails with ENOTSUP.
    pub no_xattrs: bool,
}

/// `readdirplus=`: listings with every entry's attributes save a lookup per entry for
/// programs that stat what they list (ls -l, du, rsync), and cost a stat per entry for those
/// that do not (find). `Auto` gives them to the processes that looked up names in the last
/// directory they listed (see `walkers`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReaddirPlus {
    Off,
    #[default]
    Auto,
    On,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            ttl: Duration::from_secs(86400),
            fsync: true,
            static_nlink: false,
            passthrough: false,
            idmap: IdMap::default(),
            xattr_permissions: 0,
            posix_acl: true,
            readdirplus: ReaddirPlus::Auto,
            noatime: false,
            dir_atime: true,
            no_xattrs: false,
        }
    }
}

pub struct Union {
    pub layers: Layers,
    pub table: Table,
    pub opts: Options,
    pub handles: Handles,
    /// Backing ids of nodes with passthrough opens.
    pub backings: Arc<Backings>,
    /// Directory fds per (node, layer).
    pub fds: FdCache,
    /// Merged directory listings.
    pub listings: crate::readdir::ListingCache,
    /// Reads ahead the subdirectories of what statting walkers list.
    pub prefetch: Arc<crate::prefetch::Prefetcher>,
    /// Streams lower files ahead of sequential readers (page-cached path).
    pub streams: Arc<crate::stream::Streams>,
    /// Sends cache invalidations to the kernel, once the session is up.
    pub invalidator: OnceLock<Invalidator>,
    /// The mount's device (`major:minor`), which names its write-back settings in
    /// `/sys/class/bdi`; set once mounted.
    pub bdi: OnceLock<String>,
    /// See `Union::cache_window`.
    pub cache_window: OnceLock<u64>,
    /// Held shared by every write-back of cached data while it writes, and alone by
    /// `cached_write_failed` while it extends a file, so that it never cuts off bytes a
    /// write-back of a later range stored in the meantime.
    pub cached_writes: std::sync::RwLock<()>,
    /// Brackets changes that move or remove names in the upper (see `lookup::open_in`).
    tree_begun: AtomicU64,
    tree_ended: AtomicU64,
    /// Serialises whole-mount operations that must not interleave (none on hot paths).
    pub mount_lock: Mutex<()>,
    /// Passthrough was offered and the kernel accepted it at INIT.
    passthrough: std::sync::atomic::AtomicBool,
    /// The kernel caches writes and sends them later (page-cached path only).
    writeback: std::sync::atomic::AtomicBool,
    /// The kernel leaves dropping set-ID bits to the daemon (`killpriv`).
    killpriv: std::sync::atomic::AtomicBool,
    /// Mode changes of one inode, serialised (64 stripes): dropping set-ID bits reads the
    /// mode and writes it back, which must not undo a chmod made in between.
    mode_locks: [Mutex<()>; 64],
    /// A file's set-ID bits and capability against the upper's own dropping of them (64
    /// stripes): data changes hold it shared, and a write-back of cached pages that must put
    /// back what its write drops (`killpriv::Kept`) holds it alone, as does every change that
    /// drops or sets them through the view (`privs_lock`).
    privs_locks: [std::sync::RwLock<()>; 64],
    /// Names an open met a removed file at (see `lookup::Strikes`).
    pub strikes: crate::lookup::Strikes,
    /// The names of lower hard links callers walked to (see `hardlinks::Walks`).
    pub walks: crate::hardlinks::Walks,
}

impl Union {
    pub fn new(layers: Layers, opts: Options) -> Result<Union> {
        let mut devs = Vec::new();
        for l in layers.upper.iter().chain(layers.lowers.iter()) {
            if !devs.contains(&l.dev) {
                devs.push(l.dev);
            }
        }
        // The root merges the upper root with every lower root.
        let mut root = State {
            links: crate::inode::Links::new(),
            upper: None,
            lowers: Few::new(),
            ids: Few::new(),
            redirects: None,
        };
        if let Some(u) = &layers.upper {
            let st = sys::fstat(u.root())?;
            root.upper = Some(RealId::of(&st));
            root.ids.push(RealId::of(&st));
        }
        // The root merges every lower root; as in kernel overlayfs, opaque markers on layer
        // roots are not consulted.
        for (i, l) in layers.lowers.iter().enumerate() {
            let st = sys::fstat(l.root())?;
            root.lowers.push((i as u16, RealId::of(&st)));
            if root.upper.is_none() && i == 0 {
                root.ids.push(RealId::of(&st));
            }
        }
        Ok(Union {
            table: Table::new(devs, root),
            layers,
            opts,
            handles: Handles::default(),
            backings: Arc::default(),
            fds: FdCache::new(FdCache::default_capacity()),
            listings: Default::default(),
            prefetch: Arc::default(),
            streams: Arc::default(),
            invalidator: OnceLock::new(),
            bdi: OnceLock::new(),
            cache_window: OnceLock::new(),
            cached_writes: std::sync::RwLock::new(()),
            tree_begun: AtomicU64::new(0),
            tree_ended: AtomicU64::new(0),
            mount_lock: Mutex::new(()),
            passthrough: std::sync::atomic::AtomicBool::new(false),
            writeback: std::sync::atomic::AtomicBool::new(false),
            killpriv: std::sync::atomic::AtomicBool::new(false),
            mode_locks: std::array::from_fn(|_| Mutex::new(())),
            privs_locks: std::array::from_fn(|_| std::sync::RwLock::new(())),
            strikes: Default::default(),
            walks: Default::default(),
        })
    }

    /// Runs `f`, which moves or removes names in the upper, so that concurrent path
    /// resolution notices and re-checks what it opened.
    pub fn tree_change<T>(&self, f: impl FnOnce() -> T) -> T {
        self.tree_begun.fetch_add(1, Ordering::SeqCst);
        let r = f();
        self.tree_ended.fetch_add(1, Ordering::SeqCst);
        r
    }

    /// A snapshot of the tree-change counters: `Some(gen)` when no change is in progress.
    pub fn tree_snapshot(&self) -> Option<u64> {
        let b = self.tree_begun.load(Ordering::SeqCst);
        let e = self.tree_ended.load(Ordering::SeqCst);
        (b == e).then_some(b)
    }

    pub fn tree_unchanged_since(&self, snap: Option<u64>) -> bool {
        snap.is_some_and(|g| self.tree_begun.load(Ordering::SeqCst) == g)
    }

    /// The override xattr in use (`xattr_permissions`), if any.
    pub fn override_xattr(&self) -> Option<&'static std::ffi::CStr> {
        match self.opts.xattr_permissions {
            1 => Some(crate::override_stat::PRIVILEGED_XATTR),
            2 => Some(crate::override_stat::USER_XATTR),
            _ => None,
        }
    }

    /// Whether the view's `security.*` xattrs are kept apart from the real ones
    /// (`xattr_permissions=2`, see `override_stat::isolated_name`).
    pub fn isolates_security(&self) -> bool {
        self.opts.xattr_permissions == 2
    }

    /// Where `security.*` is kept apart: the name the view's xattr `view` is stored under;
    /// None for any other name or mode (see `override_stat::isolated_name`).
    pub fn isolated_name(&self, view: &[u8]) -> Option<Vec<u8>> {
        self.isolates_security()
            .then(|| crate::override_stat::isolated_name(view))
            .flatten()
    }

    /// The reverse of `isolated_name`: the view's name of a stored one.
    pub fn isolated_view_name<'a>(&self, real: &'a [u8]) -> Option<&'a [u8]> {
        self.isolates_security()
            .then(|| crate::override_stat::isolated_view_name(real))
            .flatten()
    }

    /// Whether an xattr name is the daemon's own (hidden, and not settable through the view):
    /// also, where `security.*` is kept apart, the real `security.*` names and the names
    /// the view's are stored under.
    pub fn is_private_xattr(&self, name: &[u8]) -> bool {
        crate::whiteout::is_private_xattr(name, self.layers.format)
            || self.override_xattr().is_some_and(|x| x.to_bytes() == name)
            || (self.isolates_security()
                && (crate::override_stat::is_security(name)
                    || crate::override_stat::isolated_view_name(name).is_some()))
    }

    pub fn set_passthrough_active(&self, on: bool) {
        self.passthrough.store(on, Ordering::Relaxed);
    }

    pub fn passthrough_active(&self) -> bool {
        self.passthrough.load(Ordering::Relaxed)
    }

    pub fn set_writeback_active(&self, on: bool) {
        self.writeback.store(on, Ordering::Relaxed);
    }

    pub fn writeback_active(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    pub fn set_killpriv_active(&self, on: bool) {
        self.killpriv.store(on, Ordering::Relaxed);
    }

    pub fn killpriv_active(&self) -> bool {
        self.killpriv.load(Ordering::Relaxed)
    }

    /// Serializes the changes of a file's mode that read it first (set-ID drops). A split
    /// node's object is the copy its name moved to, whose node's lock it takes.
    pub(crate) fn mode_lock(&self, node: &crate::inode::Node) -> std::sync::MutexGuard<'_, ()> {
        let ino = self.split_copy_ino(node).unwrap_or(node.ino);
        self.mode_locks[(ino % 64) as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
    }

    /// See `privs_locks`: shared for a change of data, alone for a change of set-ID bits or
    /// capability (chmod, chown, truncate, xattrs, the drops of killpriv) and for a
    /// write-back that must put back what its write drops.
    pub(crate) fn privs_lock(&self, node: &crate::inode::Node) -> &std::sync::RwLock<()> {
        let ino = self.split_copy_ino(node).unwrap_or(node.ino);
        &self.privs_locks[(ino % 64) as usize]
    }

    /// `privs_lock` held alone, for a regular file in the upper: write-backs are of regular
    /// files only, and of copied-up ones (a writable open copies up first). A file still only
    /// in a lower layer has none to be ordered against, and the copy-up the change makes
    /// (seconds for a large file) must not hold up the writes of the other files of its stripe.
    pub(crate) fn privs_changing(
        &self,
        node: &crate::inode::Node,
    ) -> Option<std::sync::RwLockWriteGuard<'_, ()>> {
        let upper = node.state().upper.is_some();
        (node.kind() == libc::S_IFREG && upper).then(|| {
            self.privs_lock(node)
                .write()
                .unwrap_or_else(|p| p.into_inner())
        })
    }

    /// `privs_lock` held shared (a change of data, which drops what the upper's rules drop).
    pub(crate) fn privs_kept(
        &self,
        node: &crate::inode::Node,
    ) -> std::sync::RwLockReadGuard<'_, ()> {
        self.privs_lock(node)
            .read()
            .unwrap_or_else(|p| p.into_inner())
    }

    pub fn invalidate_entry(&self, parent: u64, name: &std::ffi::OsStr) {
        if let Some(inv) = self.invalidator.get() {
            inv.entry(parent, name);
        }
    }

    pub fn invalidate_inode(&self, ino: u64) {
        if let Some(inv) = self.invalidator.get() {
            inv.inode(ino);
        }
    }

    /// The kernel's cached attributes of `ino` are wrong now (a copy-up changed them).
    pub fn invalidate_attrs(&self, ino: u64) {
        if let Some(inv) = self.invalidator.get() {
            inv.attrs_now(ino);
        }
    }
}

/// Whether this process runs in a user namespace other than the initial one (rootless).
pub fn in_user_namespace() -> bool {
    static CACHE: OnceLock<bool> = OnceLock::new();
    *CACHE.get_or_init(|| match std::fs::read_to_string("/proc/self/uid_map") {
        Ok(map) => {
            let f: Vec<&str> = map.split_whitespace().collect();
            f != ["0", "0", "4294967295"]
        }
        Err(_) => false,
    })
}
