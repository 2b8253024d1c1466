//! A bounded cache of `O_PATH` directory fds, one per (node, layer).
//!
//! Resolving a name in a layer is then one `*at` call on the parent's cached fd instead of a
//! walk from the layer root. A cached fd stays right across renames (it follows the directory);
//! it is dropped when the node's directory in that layer is removed or replaced. Sharded, so
//! that threads do not meet on one lock; each shard is an LRU.

use std::collections::HashSet;
use std::ffi::CStr;
use std::hash::{BuildHasher, RandomState};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, OnceLock};

use lru::LruCache;

use crate::lookup::Loc;
use crate::sys::{self, Result};
use crate::whiteout;

/// Directories larger than this are not scanned for `.wh.` names; each name is checked
/// with a stat instead.
const SCAN_LIMIT: i64 = 1 << 20;

/// A directory of one layer, as the cache holds it.
pub struct CachedDir {
    fd: OwnedFd,
    /// Lower layers only (they never change): the names `NAME` for which the directory holds
    /// `.wh.NAME`, once scanned; `None` when the directory is too large to scan.
    aufs_whiteouts: OnceLock<Option<HashSet<Box<[u8]>>>>,
    /// Lower layers only: whether the directory may hold xattr whiteouts, once asked.
    xwhiteouts: OnceLock<bool>,
}

impl AsFd for CachedDir {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl CachedDir {
    pub fn new(fd: OwnedFd) -> CachedDir {
        CachedDir {
            fd,
            aufs_whiteouts: OnceLock::new(),
            xwhiteouts: OnceLock::new(),
        }
    }

    /// Whether this lower directory may hold xattr whiteouts (`whiteout::has_xwhiteouts`),
    /// asked once.
    pub fn has_xwhiteouts(&self) -> bool {
        *self
            .xwhiteouts
            .get_or_init(|| whiteout::has_xwhiteouts(self.fd.as_fd()))
    }

    /// Whether `name`, of stat `st`, in this lower directory is an xattr whiteout. Costs
    /// nothing but for an empty regular file, and then the directory's mark is asked once.
    pub fn is_xwhiteout(&self, name: &CStr, st: &sys::Stat) -> bool {
        whiteout::may_be_xwhiteout(st)
            && self.has_xwhiteouts()
            && whiteout::is_xwhiteout(self.fd.as_fd(), name, st)
    }

    /// Whether the directory holds `.wh.NAME`. In a lower layer one scan of the directory
    /// answers for every name; a miss would otherwise cost a full directory search in the
    /// layer's filesystem for each name looked up.
    pub fn has_aufs_whiteout(&self, name: &[u8], immutable: bool) -> Result<bool> {
        if immutable
            && let Some(set) = self
                .aufs_whiteouts
                .get_or_init(|| self.scan().ok().flatten())
        {
            return Ok(set.contains(name));
        }
        let mut wh = whiteout::WH_PREFIX.to_vec();
        wh.extend_from_slice(name);
        let wh = std::ffi::CString::new(wh).map_err(|_| sys::Errno::EINVAL)?;
        match sys::fstatat(self.fd.as_fd(), &wh, 0) {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.code(), libc::ENOENT | libc::ENAMETOOLONG) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn scan(&self) -> Result<Option<HashSet<Box<[u8]>>>> {
        if sys::fstat(self.fd.as_fd())?.st_size > SCAN_LIMIT {
            return Ok(None);
        }
        let dir = sys::open_dir_noatime(self.fd.as_fd(), c".")?;
        let mut set = HashSet::new();
        sys::for_each_dirent(dir.as_fd(), |d| {
            if let Some(n) = whiteout::whited_out_name(d.name) {
                set.insert(n.into());
            }
        })?;
        Ok(Some(set))
    }
}

const SHARDS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    serial: u64,
    loc: Loc,
}

pub struct FdCache {
    /// Unbounded maps that grow with use (a bounded `LruCache` allocates its full size at
    /// once), each kept to `per_shard` entries.
    shards: Vec<Mutex<LruCache<Key, Arc<CachedDir>>>>,
    per_shard: usize,
    hasher: RandomState,
}

impl FdCache {
    /// A cache holding at most `capacity` fds.
    pub fn new(capacity: usize) -> FdCache {
        FdCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::unbounded()))
                .collect(),
            per_shard: (capacity / SHARDS).max(2),
            hasher: RandomState::new(),
        }
    }

    /// A size that leaves most of the process's fd limit to open files, also under a low
    /// hard limit (a floor of 256 filled a limit of 256 with directories alone).
    pub fn default_capacity() -> usize {
        let limit = crate::sys::nofile_limit();
        (limit / 4).clamp(32, 16384) as usize
    }

    /// The shard of one (directory, layer): the layers of one directory spread over all
    /// shards, so a deep stack does not evict itself from one.
    fn shard(&self, key: &Key) -> std::sync::MutexGuard<'_, LruCache<Key, Arc<CachedDir>>> {
        let i = self.hasher.hash_one(key) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, serial: u64, loc: Loc) -> Option<Arc<CachedDir>> {
        let key = Key { serial, loc };
        self.shard(&key).get(&key).cloned()
    }

    pub fn insert(&self, serial: u64, loc: Loc, fd: Arc<CachedDir>) {
        let key = Key { serial, loc };
        let mut shard = self.shard(&key);
        shard.put(key, fd);
        if shard.len() > self.per_shard {
            shard.pop_lru();
        }
    }

    /// Drops the cached fd of one node in one layer.
    pub fn remove(&self, serial: u64, loc: Loc) {
        let key = Key { serial, loc };
        self.shard(&key).pop(&key);
    }

    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
