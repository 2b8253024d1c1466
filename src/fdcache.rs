//! A bounded cache of `O_PATH` directory fds, one per (node, layer).
//!
//! Resolving a name in a layer is then one `*at` call on the parent's cached fd instead of a
//! walk from the layer root. A cached fd stays right across renames (it follows the directory);
//! it is dropped when the node's directory in that layer is removed or replaced. Sharded, so
//! that threads do not meet on one lock; each shard is an LRU.

use std::hash::{BuildHasher, RandomState};
use std::num::NonZeroUsize;
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use lru::LruCache;

use crate::lookup::Loc;

const SHARDS: usize = 16;

#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    serial: u64,
    loc: Loc,
}

pub struct FdCache {
    shards: Vec<Mutex<LruCache<Key, Arc<OwnedFd>>>>,
    hasher: RandomState,
}

impl FdCache {
    /// A cache holding at most `capacity` fds.
    pub fn new(capacity: usize) -> FdCache {
        let per = NonZeroUsize::new((capacity / SHARDS).max(4)).expect("non-zero");
        FdCache {
            shards: (0..SHARDS)
                .map(|_| Mutex::new(LruCache::new(per)))
                .collect(),
            hasher: RandomState::new(),
        }
    }

    /// A size that leaves most of the process's fd limit to open files.
    pub fn default_capacity() -> usize {
        let limit = crate::sys::nofile_limit();
        (limit / 4).clamp(256, 16384) as usize
    }

    fn shard(&self, serial: u64) -> std::sync::MutexGuard<'_, LruCache<Key, Arc<OwnedFd>>> {
        let i = self.hasher.hash_one(serial) as usize % SHARDS;
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, serial: u64, loc: Loc) -> Option<Arc<OwnedFd>> {
        self.shard(serial).get(&Key { serial, loc }).cloned()
    }

    pub fn insert(&self, serial: u64, loc: Loc, fd: Arc<OwnedFd>) {
        self.shard(serial).put(Key { serial, loc }, fd);
    }

    /// Drops the cached fd of one node in one layer.
    pub fn remove(&self, serial: u64, loc: Loc) {
        self.shard(serial).pop(&Key { serial, loc });
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
