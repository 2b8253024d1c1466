//! Which name of a lower hard link each caller walked to ([`Walks`]). The names of a lower
//! hard link share one node until a copy-up breaks the link, and FUSE names no name in an
//! OPEN or a SETATTR: what a caller looked up last tells which name it acts on.

use crate::compact::Name;
use crate::inode::clock_ms;
use lru::LruCache;
use std::ffi::OsStr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// How long a name broken off a node keeps answering the callers that walked to it (see
/// `Walks`), counted from the copy-up that broke it (a caller's request may have waited for
/// that copy-up all along); and how long after the last walk or break noted walks are
/// consulted at all.
const WALK_MS: u64 = 2000;
/// Longest a caller walking again to a broken name holds the node it finds (see
/// `Walks::note`).
const RESERVE_MS: u64 = 500;

/// What `Walks::note` made of a lookup.
#[derive(Debug, PartialEq, Eq)]
pub enum Noted {
    Yes,
    /// Look up again: the name is being broken off the node found.
    Again,
    /// Look up again in a moment: another caller holds the node for its request.
    Wait,
}

/// Most walks remembered at once (the oldest go first): about 80 bytes each.
const MAX_WALKS: usize = 4096;

/// One caller's last walk to a node: the name, and when a copy-up of another name broke it
/// off the node since, if one did.
struct Walk {
    dir: u64,
    name: Name,
    broken_at: Option<u64>,
}

impl Walk {
    fn broken_now(&self, now: u64) -> bool {
        self.broken_at.is_some_and(|t| now < t + WALK_MS)
    }
}

/// Which name of a lower hard link each caller (the kernel's thread id, as FUSE requests
/// carry it) reached the node through last. The names of a lower hard link share one node
/// until a copy-up breaks the link, and an OPEN or SETATTR names no name: the copy-up goes to
/// the name the caller walked to, and a caller whose name a copy-up of another name broke
/// off the node between its LOOKUP and its request is told ESTALE, so that the kernel walks
/// again and finds the lower file that name still shows (each name of a lower hard link is
/// an inode of its own on kernel overlayfs).
///
/// A copy-up marks the names it breaks off (`break_off`) before it records the copy on the
/// node, and a walk noted after that finds the mark: a request that saw the copy finds its
/// caller's walk broken when it checks after its work (`broken_off`).
#[derive(Default)]
pub struct Walks {
    /// The latest `clock_ms` a walk or a break was noted at; 0 when none ever was: walks are
    /// consulted only within `WALK_MS` of it (one load per OPEN).
    last: AtomicU64,
    inner: Mutex<WalksInner>,
}

#[derive(Default)]
struct WalksInner {
    /// Keyed by (node serial, caller); the least recently noted first out.
    walks: Option<LruCache<(u64, u32), Walk>>,
    /// Names broken off nodes in the last `WALK_MS`: (node serial, dir, name, when).
    broken: Vec<(u64, u64, Name, u64)>,
    /// Nodes a caller walking again to a name broken off a node holds for its request (see
    /// `note`): (node serial, caller, when).
    reserved: Vec<(u64, u32, u64)>,
}

impl WalksInner {
    /// The nodes `name` in `dir` was broken off lately.
    fn broken_off(&self, dir: u64, name: &OsStr) -> Vec<u64> {
        let of_name = |b: &&(u64, u64, Name, u64)| b.1 == dir && *b.2 == *name;
        self.broken.iter().filter(of_name).map(|b| b.0).collect()
    }
}

impl Walks {
    fn inner(&self) -> std::sync::MutexGuard<'_, WalksInner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Caller `pid` looked up the node `serial` at `name` in `dir`. `Again` (nothing noted)
    /// if a copy-up broke that name off the node and the lookup may have seen the name before
    /// it left (`settled()` false: a change of names began since the lookup began): the name
    /// leads to the lower file's own node now. A lookup that ran after the copy-up found the
    /// name given to the node anew (a link).
    ///
    /// A caller walking again to a name broken off a node lately (the kernel's retry after
    /// ESTALE) holds the node it finds, which the other names left still share, for its
    /// request (`RESERVE_MS` at most): another such caller walking to another name of it
    /// waits (`Wait`), and finds a node of its own once the first one's copy-up broke its
    /// name off; else each copy-up would break the names left again, and the kernel retries
    /// once only.
    pub fn note(
        &self,
        serial: u64,
        pid: u32,
        dir: u64,
        name: &OsStr,
        settled: impl Fn() -> bool,
    ) -> Noted {
        let at = clock_ms();
        let mut inner = self.inner();
        inner.broken.retain(|b| at < b.3 + WALK_MS);
        inner.reserved.retain(|r| at < r.2 + RESERVE_MS);
        let is = |b: &(u64, u64, Name, u64)| b.0 == serial && b.1 == dir && *b.2 == *name;
        if inner.broken.iter().any(is) {
            if !settled() {
                return Noted::Again;
            }
            inner.broken.retain(|b| !is(b));
        }
        // The caller's walks to this name that reached a node it was broken off: its entry
        // leads here now.
        let left = inner.broken_off(dir, name);
        if !left.is_empty() {
            match inner.reserved.iter().find(|r| r.0 == serial) {
                Some(r) if r.1 != pid => return Noted::Wait,
                Some(_) => {}
                None => inner.reserved.push((serial, pid, at)),
            }
        }
        let walks = inner.walks.get_or_insert_with(LruCache::unbounded);
        for s in left {
            walks.pop(&(s, pid));
        }
        walks.put(
            (serial, pid),
            Walk {
                dir,
                name: Name::new(name),
                broken_at: None,
            },
        );
        while walks.len() > MAX_WALKS {
            walks.pop_lru();
        }
        self.last.store(at, Ordering::SeqCst);
        Noted::Yes
    }

    /// Caller `pid`'s request on node `serial` checked its walk: a node it held (see
    /// `note`) is free again.
    fn release(inner: &mut WalksInner, serial: u64, pid: u32) {
        inner.reserved.retain(|r| !(r.0 == serial && r.1 == pid));
    }

    fn recent(&self) -> bool {
        let last = self.last.load(Ordering::SeqCst);
        last != 0 && clock_ms() < last + WALK_MS
    }

    /// The name caller `pid` last reached node `serial` through, unless a copy-up broke it off
    /// since.
    pub fn name_of(&self, serial: u64, pid: u32) -> Option<(u64, Name)> {
        if !self.recent() {
            return None;
        }
        let inner = self.inner();
        let w = inner.walks.as_ref()?.peek(&(serial, pid))?;
        w.broken_at.is_none().then(|| (w.dir, w.name.clone()))
    }

    /// Like `broken_off`, but the walk stays broken: for a read, which the kernel also makes
    /// on its own before a change (the capability xattr, with the caller's id) and may not
    /// pass on; the change that follows is told then.
    pub fn is_broken_off(&self, serial: u64, pid: u32) -> bool {
        if !self.recent() {
            return false;
        }
        let inner = self.inner();
        let now = clock_ms();
        inner
            .walks
            .as_ref()
            .and_then(|w| w.peek(&(serial, pid)))
            .is_some_and(|w| w.broken_now(now))
    }

    /// Whether caller `pid` last reached node `serial` through a name that a copy-up of
    /// another name broke off since, in the last `WALK_MS` (forgotten once told).
    pub fn broken_off(&self, serial: u64, pid: u32) -> bool {
        if !self.recent() {
            return false;
        }
        let mut inner = self.inner();
        Self::release(&mut inner, serial, pid);
        let Some(walks) = inner.walks.as_mut() else {
            return false;
        };
        match walks.peek(&(serial, pid)) {
            Some(w) if w.broken_now(clock_ms()) => {
                walks.pop(&(serial, pid));
                true
            }
            _ => false,
        }
    }

    /// Whether caller `pid` walked to `name` in `dir` and found there a node that a copy-up
    /// of another name then broke that name off, in the last `WALK_MS` (forgotten once told):
    /// the kernel's entry for the name still leads to that node, and a request on the name
    /// (an unlink, a rename) would act on another file than the one the kernel takes it for.
    pub fn broken_walk_to(&self, pid: u32, dir: u64, name: &OsStr) -> bool {
        if !self.recent() {
            return false;
        }
        let now = clock_ms();
        let mut inner = self.inner();
        inner.broken.retain(|b| now < b.3 + WALK_MS);
        // Only the nodes the name was broken off lately: a walk is broken with its name.
        let nodes = inner.broken_off(dir, name);
        let Some(walks) = inner.walks.as_mut() else {
            return false;
        };
        for serial in nodes {
            let key = (serial, pid);
            if walks
                .peek(&key)
                .is_some_and(|w| w.dir == dir && *w.name == *name && w.broken_now(now))
            {
                walks.pop(&key);
                return true;
            }
        }
        false
    }

    /// A copy-up of node `serial` breaks the name `name` in `dir` off it.
    pub fn break_off(&self, serial: u64, dir: u64, name: &OsStr) {
        let now = clock_ms();
        let mut inner = self.inner();
        inner.broken.retain(|b| now < b.3 + WALK_MS);
        if inner.broken.len() >= MAX_WALKS {
            inner.broken.remove(0);
        }
        inner.broken.push((serial, dir, Name::new(name), now));
        if let Some(walks) = inner.walks.as_mut() {
            for ((s, _), w) in walks.iter_mut() {
                if *s == serial && w.dir == dir && *w.name == *name && w.broken_at.is_none() {
                    w.broken_at = Some(now);
                }
            }
        }
        self.last.store(now, Ordering::SeqCst);
    }
}
