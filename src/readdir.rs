//! Merged directory listings.
//!
//! A listing is the union of the names of every layer of the directory, higher layers winning,
//! with whiteouts, the names they hide and the layer formats' private names removed. Types come
//! from the layers' `d_type`; only character devices (whiteout or not), `.wh.` names and
//! unknown types cost a stat. `d_ino` is the number lookup would give, asked of the table when
//! the entry is sent; an object removed since the listing was read keeps the number it had.
//!
//! Listings are kept in a bounded cache shared by readdir, the link count of merged
//! directories and rmdir's emptiness check; every change to a directory bumps its version and
//! so retires its cached listing. An open directory keeps the listing it read at offset 0;
//! reading from offset 0 again (rewinddir) takes a fresh one. Offsets come from the names (see
//! `Listing`), so they keep their place in any listing of the directory.

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStringExt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::inode::{NOT_COUNTED, Node, RealId};
use crate::lookup::{Loc, Origin};
use crate::sys::{self, Result};
use crate::union::Union;
use crate::whiteout;

pub struct Entry {
    pub name: OsString,
    /// `DT_*` type.
    pub dtype: u8,
    /// The real object the name shows (its number comes from the table).
    pub id: RealId,
    /// The entry's directory offset (see `Listing`).
    pub pos: u64,
}

/// The merged entries of one directory (without `.` and `..`), in the order of their
/// offsets. An entry's offset comes from its name (a keyed hash, as ext4's come from its
/// hashed names), not from its place in one listing: the kernel keeps listings in its cache
/// across opens and continues a directory stream read from its cache with the daemon when the
/// cache is dropped (another open lists the directory after a change), so an offset must
/// mean the same place in any listing of the directory. Entries not removed or added
/// meanwhile are then read exactly once, whatever changed around them.
pub struct Listing {
    pub entries: Vec<Entry>,
    pub subdirs: u64,
    /// `Table::departures` when the layers were read: entries whose object was removed
    /// since keep its number (`Table::ino_for_listed`).
    pub built: u64,
}

/// Cached listings, bounded by their total number of entries.
pub struct ListingCache {
    inner: Mutex<ListingLru>,
}

struct ListingLru {
    map: LruCache<u64, (u64, Arc<Listing>)>,
    entries: usize,
    /// Listings too large to cache, while open directories hold them: every stream of a
    /// large directory shares one (each used to build its own, 26 MiB for 100,000 long names).
    large: std::collections::HashMap<u64, (u64, std::sync::Weak<Listing>)>,
}

/// Entries kept in all cached listings together (about 80 bytes each). The kernel keeps
/// plain listings in its own cache (`FOPEN_CACHE_DIR`); this one serves listings with
/// attributes, listings after the kernel dropped its copy, directory link counts and the
/// emptiness check of rmdir.
const MAX_CACHED_ENTRIES: usize = 24_000;
/// The largest listing cached.
const MAX_CACHED_LISTING: usize = 16_000;

/// What a listing counts against `MAX_CACHED_ENTRIES`: its entries, and one for itself, so
/// that listings of empty directories (every `rmdir` asks for one) are bounded too.
fn weight(l: &Listing) -> usize {
    l.entries.len() + 1
}

impl Default for ListingCache {
    fn default() -> Self {
        ListingCache {
            inner: Mutex::new(ListingLru {
                map: LruCache::unbounded(),
                entries: 0,
                large: std::collections::HashMap::new(),
            }),
        }
    }
}

impl ListingCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, ListingLru> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, serial: u64, version: u64) -> Option<Arc<Listing>> {
        let mut c = self.lock();
        if let Some((v, l)) = c.map.get(&serial)
            && *v == version
        {
            return Some(l.clone());
        }
        match c.large.get(&serial) {
            Some((v, l)) if *v == version => l.upgrade(),
            _ => None,
        }
    }

    fn put(&self, serial: u64, version: u64, l: Arc<Listing>) {
        if l.entries.len() > MAX_CACHED_LISTING {
            let mut c = self.lock();
            if c.large.len() >= 64 {
                c.large.retain(|_, (_, w)| w.strong_count() > 0);
            }
            c.large.insert(serial, (version, Arc::downgrade(&l)));
            return;
        }
        let mut c = self.lock();
        c.entries += weight(&l);
        if let Some((_, old)) = c.map.put(serial, (version, l)) {
            c.entries -= weight(&old);
        }
        while c.entries > MAX_CACHED_ENTRIES {
            match c.map.pop_lru() {
                Some((_, (_, old))) => c.entries -= weight(&old),
                None => break,
            }
        }
    }

    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub struct DirHandle {
    pub node: Arc<Node>,
    listing: Mutex<Option<Arc<Listing>>>,
    /// The listing generation (`Table::listing_gen`) when this handle last sent numbers;
    /// `NO_LISTING` before the first.
    listing_gen: std::sync::atomic::AtomicU64,
}

const NO_LISTING: u64 = u64::MAX;

impl DirHandle {
    pub fn new(node: Arc<Node>) -> DirHandle {
        DirHandle {
            node,
            listing: Mutex::new(None),
            listing_gen: std::sync::atomic::AtomicU64::new(NO_LISTING),
        }
    }
}

/// One entry as readdir sends it.
pub struct DirEntry<'a> {
    pub name: &'a std::ffi::OsStr,
    pub dtype: u8,
    pub ino: u64,
    /// Offset of the next entry.
    pub next: u64,
}

/// Offsets 0 and 1 are `.` and `..`; reading from 2 starts at the first entry.
const FIRST_ENTRY: u64 = 2;

/// The offset of an entry named `name`: a hash keyed per daemon (so a layer's names cannot
/// be made to collide), above `FIRST_ENTRY`, and below 2^62 + 3 so that the next offset
/// (`pos + 1`) and any made unique after a collision stay positive as an `off_t`.
fn name_offset(name: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    static KEY: std::sync::OnceLock<std::hash::RandomState> = std::sync::OnceLock::new();
    let h = KEY.get_or_init(std::hash::RandomState::new).hash_one(name);
    FIRST_ENTRY + 1 + (h >> 2)
}

/// Sorts entries by offset and makes offsets unique (two names with one hash: the later
/// name, by bytes, takes the next free offset).
fn order_by_offset(entries: &mut [Entry]) {
    entries.sort_unstable_by(|a, b| {
        (a.pos, a.name.as_encoded_bytes()).cmp(&(b.pos, b.name.as_encoded_bytes()))
    });
    for i in 1..entries.len() {
        if entries[i].pos <= entries[i - 1].pos {
            entries[i].pos = entries[i - 1].pos + 1;
        }
    }
}

pub fn dtype_of_mode(mode: u32) -> u8 {
    match sys::file_type(mode) {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }
}

impl Union {
    /// The merged listing of a directory, from the cache when it is current.
    pub fn listing(&self, dir: &Node) -> Result<Arc<Listing>> {
        let version = dir.extra().version.load(Ordering::SeqCst);
        if let Some(l) = self.listings.get(dir.serial, version) {
            return Ok(l);
        }
        // One build at a time: listings asked for at the same moment (four `ls` of one
        // large directory, say) share the first one built, while it is current.
        let _building = dir.lock_listing();
        let version = dir.extra().version.load(Ordering::SeqCst);
        if let Some(l) = self.listings.get(dir.serial, version) {
            return Ok(l);
        }
        let built = self.table.departures();
        let mut entries = self.merged_entries(dir)?;
        log::debug!("listing of {} built: {} entries", dir.ino, entries.len());
        order_by_offset(&mut entries);
        let subdirs = entries.iter().filter(|e| e.dtype == libc::DT_DIR).count() as u64;
        let l = Arc::new(Listing {
            entries,
            subdirs,
            built,
        });
        // Cached only if the directory did not change while it was read.
        if dir.extra().version.load(Ordering::SeqCst) == version {
            self.listings.put(dir.serial, version, l.clone());
        }
        Ok(l)
    }

    /// Records a change to the entries of `dir`: its cached listing is no longer current.
    pub fn dir_changed(&self, dir: &Node) {
        let e = dir.extra();
        e.version.fetch_add(1, Ordering::SeqCst);
        // A listing the kernel keeps from before the change may be completed after it (by a
        // stream opened before), and be served from its cache after the change.
        e.listing_outdated();
    }

    /// The merged entries of a directory, without `.` and `..`, read from the layers.
    fn merged_entries(&self, dir: &Node) -> Result<Vec<Entry>> {
        let layers = self.dir_layers(dir);
        let single = layers.len() == 1;
        let mut out: Vec<Entry> = Vec::new();
        // Names decided by a higher layer (present or whited out).
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        // Upper objects (their places in `out`) whose name no lower layer has shown yet, and
        // those a lower object of the same name is first below: a copied-up object is
        // numbered by its lower one, as its lookup does (`Found::key_id`).
        let mut upper_names: HashMap<Vec<u8>, usize> = HashMap::new();
        let mut over_lower_dirs: Vec<(usize, RealId)> = Vec::new();
        let mut over_lower_files: Vec<usize> = Vec::new();
        for (i, &loc) in layers.iter().enumerate() {
            let last = i + 1 == layers.len();
            // Regular files of a marked lower directory may be xattr whiteouts (`whiteout`).
            let (fd, xwhiteouts) = match self.dir_fd(dir, loc).and_then(|d| {
                let fd = sys::open_dir_noatime(d.as_fd(), c".")?;
                Ok((fd, loc != Loc::Upper && d.has_xwhiteouts()))
            }) {
                Ok(v) => v,
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) && i > 0 => break,
                Err(e) => return Err(e),
            };
            let dev = match loc {
                Loc::Upper => self.layers.upper()?.dev,
                Loc::Lower(l) => self.layers.lower(l).dev,
            };
            // `.wh.NAME` hides NAME in the layers below, not in its own.
            let mut hidden_below: Vec<Vec<u8>> = Vec::new();
            let mut err = None;
            sys::for_each_dirent(fd.as_fd(), |d| {
                if err.is_some() || d.name == b"." || d.name == b".." {
                    return;
                }
                if whiteout::is_private_name(d.name) {
                    if !last && let Some(n) = whiteout::whited_out_name(d.name) {
                        hidden_below.push(n.to_vec());
                    }
                    return;
                }
                if !single && seen.contains(d.name) {
                    if let Some(at) = upper_names.remove(d.name) {
                        if out[at].dtype != libc::DT_DIR {
                            over_lower_files.push(at);
                            return;
                        }
                        let is_dir = match d.kind {
                            libc::DT_DIR => true,
                            libc::DT_UNKNOWN => std::ffi::CString::new(d.name)
                                .ok()
                                .and_then(|c| sys::fstatat(fd.as_fd(), &c, 0).ok())
                                .is_some_and(|st| sys::is_dir(&st)),
                            _ => false,
                        };
                        if is_dir {
                            over_lower_dirs.push((at, RealId { dev, ino: d.ino }));
                        }
                    }
                    return;
                }
                let mut dtype = d.kind;
                let mut ino = d.ino;
                if dtype == libc::DT_CHR || dtype == libc::DT_UNKNOWN {
                    let Ok(cname) = std::ffi::CString::new(d.name) else {
                        return;
                    };
                    match sys::fstatat(fd.as_fd(), &cname, 0) {
                        Ok(st) => {
                            if whiteout::is_whiteout(&st) {
                                if !single {
                                    seen.insert(d.name.to_vec());
                                }
                                return;
                            }
                            dtype = dtype_of_mode(st.st_mode);
                            ino = st.st_ino;
                        }
                        // Gone since getdents: skip it.
                        Err(e) if e.code() == libc::ENOENT => return,
                        Err(e) => {
                            err = Some(e);
                            return;
                        }
                    }
                }
                if xwhiteouts
                    && dtype == libc::DT_REG
                    && let Ok(cname) = std::ffi::CString::new(d.name)
                    && let Ok(st) = sys::fstatat(fd.as_fd(), &cname, 0)
                    && whiteout::is_xwhiteout(fd.as_fd(), &cname, &st)
                {
                    if !single {
                        seen.insert(d.name.to_vec());
                    }
                    return;
                }
                if dtype == libc::DT_REG
                    && let Some(xattr) = self.override_xattr()
                    && let Ok(cname) = std::ffi::CString::new(d.name)
                    && let Ok(Some(v)) = sys::getxattr_vec_at(fd.as_fd(), &cname, xattr)
                    && let Some((kind, _)) = crate::override_stat::Override::parse(&v)
                        .and_then(|o| o.shown_kind(libc::S_IFREG))
                {
                    // xattr_permissions: a regular file standing in for a device or a fifo.
                    dtype = dtype_of_mode(kind);
                }
                if !single {
                    seen.insert(d.name.to_vec());
                    if loc == Loc::Upper {
                        upper_names.insert(d.name.to_vec(), out.len());
                    }
                }
                out.push(Entry {
                    pos: name_offset(d.name),
                    name: OsString::from_vec(d.name.to_vec()),
                    dtype,
                    id: RealId { dev, ino },
                });
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            for n in &hidden_below {
                upper_names.remove(n);
            }
            seen.extend(hidden_below);
        }
        if !over_lower_files.is_empty() {
            let upper = self.dir_fd(dir, Loc::Upper)?;
            for at in over_lower_files {
                let e = &mut out[at];
                // A copy the mount numbered already keeps that number (`copy_key`): no need
                // to read its origin.
                if self.table.numbered(e.id) {
                    continue;
                }
                let Ok(name) = std::ffi::CString::new(e.name.as_encoded_bytes()) else {
                    continue;
                };
                if let Ok(st) = sys::fstatat(upper.as_fd(), &name, 0) {
                    // Not numbered (checked above): the origin decides (`copy_key`).
                    if let Origin::Here(lower) =
                        self.origin_below(dir, &layers[1..], &upper, &name, &st)
                    {
                        e.id = lower;
                    }
                }
            }
        }
        if !over_lower_dirs.is_empty() {
            let upper = self.dir_fd(dir, Loc::Upper)?;
            for (at, lower) in over_lower_dirs {
                let e = &mut out[at];
                let Ok(name) = std::ffi::CString::new(e.name.as_encoded_bytes()) else {
                    continue;
                };
                if self
                    .merges_at_own_name(upper.as_fd(), &name)
                    .unwrap_or(false)
                {
                    e.id = lower;
                }
            }
        }
        Ok(out)
    }

    /// Has the subdirectories of the directory listed through `h` read ahead in its layers,
    /// their entries statted if `stats` (see `prefetch`), from the listing `h` holds.
    pub fn read_ahead(&self, h: &DirHandle, stats: bool) {
        let Some(listing) = h.listing.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return;
        };
        let dir = &h.node;
        if listing.subdirs == 0 || !self.prefetch.fresh(dir.serial, false) {
            return;
        }
        let names = listing
            .entries
            .iter()
            .filter(|e| e.dtype == libc::DT_DIR)
            .filter_map(|e| std::ffi::CString::new(e.name.as_encoded_bytes()).ok());
        let dirs = self
            .dir_layers(dir)
            .into_iter()
            .filter_map(|loc| self.dir_fd(dir, loc).ok())
            .collect();
        self.prefetch.ahead(dirs, names, stats);
    }

    /// Notes that process `pid` opened `node` with `flags`. A process reading one file after
    /// another of a directory has the rest of its files read ahead (see `prefetch`): for the
    /// `OPENS_IN_A_ROW`th different file of one directory opened for reading in a row (not by
    /// execve, for a program's own file), the directory and the layer the file came from, for
    /// `data_ahead`.
    pub fn opened_for_data_ahead(
        &self,
        node: &Node,
        pid: u32,
        flags: i32,
    ) -> Option<(Arc<Node>, Loc)> {
        if flags & libc::O_ACCMODE != libc::O_RDONLY || flags & crate::file::FMODE_EXEC != 0 {
            return None;
        }
        let parent = crate::lookup::first_parent(node)?;
        self.prefetch
            .opened(pid, parent.ino, node.ino)
            .then(|| (parent, self.top_loc(node)))
    }

    /// Has the small files of `dir` in the layer `loc` read into the page cache (see
    /// `prefetch`), unless that was done recently.
    pub fn data_ahead(&self, dir: &Node, loc: Loc) {
        if !self.prefetch.fresh(dir.serial, true) {
            return;
        }
        if let Ok(fd) = self.dir_fd(dir, loc) {
            self.prefetch.data_ahead(fd);
        }
    }

    /// Number of subdirectories in the merged view (cached on the node).
    pub fn subdir_count(&self, dir: &Node) -> Result<u64> {
        let counted = &dir.extra().subdirs;
        let n = counted.load(Ordering::SeqCst);
        if n != NOT_COUNTED {
            return Ok(n);
        }
        let n = self.listing(dir)?.subdirs;
        counted.store(n, Ordering::SeqCst);
        Ok(n)
    }

    /// Adjusts a directory's cached subdirectory count by `delta`.
    pub fn adjust_subdirs(&self, dir: &Node, delta: i64) {
        // Not made yet: not counted yet.
        if let Some(e) = dir.extra_if_made() {
            let _ = e
                .subdirs
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                    (n != NOT_COUNTED).then(|| n.saturating_add_signed(delta).min(NOT_COUNTED - 1))
                });
        }
    }

    /// Whether a directory is empty in the merged view.
    pub fn is_empty_dir(&self, dir: &Node) -> Result<bool> {
        Ok(self.listing(dir)?.entries.is_empty())
    }

    /// At each READDIR of a handle (`reading`) and at its release: if numbers changed since
    /// the handle last sent some, the kernel may have cached those after the change marked
    /// the directory's listing stale and an open consumed the mark (it adds a reply's entries
    /// to its cache after the daemon answered, but before the handle's next request). The
    /// listing is marked stale again.
    pub fn recheck_listing(&self, h: &DirHandle, reading: bool) {
        let now = self.table.listing_gen();
        let sent = if reading {
            h.listing_gen.swap(now, Ordering::SeqCst)
        } else {
            h.listing_gen.load(Ordering::SeqCst)
        };
        if sent != NO_LISTING && sent != now {
            h.node.extra().stale_listing.store(true, Ordering::SeqCst);
        }
    }

    /// A listing sent from its start is an access of the directory's upper object, which
    /// kernel overlayfs times through the upper's mount (so by its `relatime` or `noatime`);
    /// a directory only in lower layers keeps its times. The daemon's own reads of layers
    /// take no access times.
    fn time_listing(&self, node: &Node) {
        if !self.opts.dir_atime || self.top_loc(node) != Loc::Upper {
            return;
        }
        let res = self
            .dir_fd(node, Loc::Upper)
            .and_then(|d| sys::read_dir_timed(d.as_fd(), c"."));
        if let Err(e) = res {
            log::debug!(
                "listing of {}: upper access time not updated: {e:?}",
                node.ino
            );
        }
    }

    /// Sends the entries of an open directory from `offset` on (`.` and `..` first) to
    /// `add`, until it reports the reply full. Without `numbered`, entries other than `.`
    /// and `..` come with number 0 (a listing with attributes numbers each by its lookup).
    pub fn read_dir(
        &self,
        h: &DirHandle,
        offset: u64,
        numbered: bool,
        mut add: impl FnMut(DirEntry<'_>) -> bool,
    ) -> Result<()> {
        if offset == 0 {
            self.time_listing(&h.node);
        }
        let listing = {
            let mut cur = h.listing.lock().unwrap_or_else(|p| p.into_inner());
            if offset == 0 || cur.is_none() {
                *cur = Some(self.listing(&h.node)?);
            }
            cur.clone().expect("filled above")
        };
        let node = &h.node;
        self.recheck_listing(h, true);
        // The kernel may keep what it gets (`FOPEN_CACHE_DIR`). Marked before the numbers are
        // read, so that a change of numbers after this reads the mark.
        let e = node.extra();
        if !e.listed.load(Ordering::SeqCst) {
            e.listed.store(true, Ordering::SeqCst);
        }
        let parent_ino = node
            .state()
            .links
            .first()
            .map(|l| l.parent.ino)
            .unwrap_or(node.ino);
        let dots = [
            (std::ffi::OsStr::new("."), node.ino),
            (std::ffi::OsStr::new(".."), parent_ino),
        ];
        for (i, (name, ino)) in dots.into_iter().enumerate().skip(offset as usize) {
            let next = i as u64 + 1;
            if add(DirEntry {
                name,
                dtype: libc::DT_DIR,
                ino,
                next,
            }) {
                return Ok(());
            }
        }
        let first = listing.entries.partition_point(|e| e.pos < offset);
        for e in &listing.entries[first..] {
            if add(DirEntry {
                name: e.name.as_os_str(),
                dtype: e.dtype,
                ino: if numbered {
                    self.table.ino_for_listed(e.id, listing.built)
                } else {
                    0
                },
                next: e.pos + 1,
            }) {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_listings_are_bounded() {
        let cache = ListingCache::default();
        for serial in 0..100_000 {
            let empty = Listing {
                entries: Vec::new(),
                subdirs: 0,
                built: 0,
            };
            cache.put(serial, 1, Arc::new(empty));
        }
        assert!(
            cache.len() <= MAX_CACHED_ENTRIES,
            "{} listings kept",
            cache.len()
        );
        assert!(cache.get(99_999, 1).is_some(), "the newest is kept");
        assert!(cache.get(0, 1).is_none(), "the oldest went");
    }
}
