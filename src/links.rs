//! The names of a node ([`Links`]). Nearly every node has one, held inline. A file with many
//! names known to the kernel (a lower file hard-linked 60,000 times in one directory, say)
//! gets an index, so that looking up, touching or removing one of its names costs what it
//! costs for a file with one, instead of a scan of all of them.

use crate::compact::{Few, FewIntoIter, Name};
use crate::inode::{Node, clock_ms};
use lru::LruCache;
use std::ffi::OsStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// One name of a node in the merged tree.
#[derive(Clone)]
pub struct Link {
    pub parent: Arc<Node>,
    pub name: Name,
}

impl Link {
    fn is(&self, parent: u64, name: &OsStr) -> bool {
        self.parent.ino == parent && *self.name == *name
    }
}

/// A node with more names than this keeps them indexed...
const INDEX_ABOVE: usize = 32;
/// ...until it is down to this many.
const LIST_AT: usize = 8;

type Key = (u64, Name);

fn key(parent: u64, name: &OsStr) -> Key {
    (parent, Name::new(name))
}

/// The names of a node, each (parent, name) once, the most recently used first: the first is
/// the one paths are built from and the one copy-up installs a copy at.
pub enum Links {
    /// In order, first first.
    List(Few<Link>),
    /// Keyed by (parent's number, name); the most recently used is the first.
    Indexed(Box<LruCache<Key, Link>>),
}

impl Links {
    pub const fn new() -> Links {
        Links::List(Few::new())
    }

    pub fn len(&self) -> usize {
        match self {
            Links::List(l) => l.len(),
            Links::Indexed(m) => m.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn first(&self) -> Option<&Link> {
        match self {
            Links::List(l) => l.first(),
            Links::Indexed(m) => m.peek_mru().map(|(_, l)| l),
        }
    }

    /// All names, the first first.
    pub fn iter(&self) -> Iter<'_> {
        match self {
            Links::List(l) => Iter::List(l.iter()),
            Links::Indexed(m) => Iter::Indexed(m.iter()),
        }
    }

    pub fn contains(&self, parent: u64, name: &OsStr) -> bool {
        match self {
            Links::List(l) => l.iter().any(|l| l.is(parent, name)),
            Links::Indexed(m) => m.contains(&key(parent, name)),
        }
    }

    /// Makes (parent, name) the first name, if the node has it. Returns whether it has.
    pub fn touch(&mut self, parent: u64, name: &OsStr) -> bool {
        match self {
            Links::List(l) => match l.iter().position(|l| l.is(parent, name)) {
                Some(i) => {
                    l[..=i].rotate_right(1);
                    true
                }
                None => false,
            },
            Links::Indexed(m) => m.promote(&key(parent, name)),
        }
    }

    /// Adds `l` as the first name. A name equal to it that was there already is taken out
    /// and returned (its parent's pin is the caller's to drop).
    pub fn push_first(&mut self, l: Link) -> Option<Link> {
        let old = self.remove(l.parent.ino, &l.name);
        match self {
            Links::List(list) if list.len() < INDEX_ABOVE => list.insert(0, l),
            Links::List(list) => {
                let mut m = Box::new(LruCache::unbounded());
                // Least recently used first, so that the list's first ends up the newest.
                for old in Vec::from(std::mem::take(list)).into_iter().rev() {
                    m.push((old.parent.ino, old.name.clone()), old);
                }
                m.push((l.parent.ino, l.name.clone()), l);
                *self = Links::Indexed(m);
            }
            Links::Indexed(m) => {
                m.push((l.parent.ino, l.name.clone()), l);
            }
        }
        old
    }

    /// Takes the name (parent, name) out, if the node has it.
    pub fn remove(&mut self, parent: u64, name: &OsStr) -> Option<Link> {
        match self {
            Links::List(l) => {
                let i = l.iter().position(|l| l.is(parent, name))?;
                Some(l.remove(i))
            }
            Links::Indexed(m) => {
                let gone = m.pop(&key(parent, name))?;
                if m.len() <= LIST_AT {
                    let list: Vec<Link> = m.iter().map(|(_, l)| l.clone()).collect();
                    *self = Links::List(Few::from(list));
                }
                Some(gone)
            }
        }
    }
}

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

impl Default for Links {
    fn default() -> Links {
        Links::new()
    }
}

/// The names of a [`Links`], by reference, the first first.
pub enum Iter<'a> {
    List(std::slice::Iter<'a, Link>),
    Indexed(lru::Iter<'a, Key, Link>),
}

impl<'a> Iterator for Iter<'a> {
    type Item = &'a Link;
    fn next(&mut self) -> Option<&'a Link> {
        match self {
            Iter::List(i) => i.next(),
            Iter::Indexed(i) => i.next().map(|(_, l)| l),
        }
    }
}

impl IntoIterator for Links {
    type Item = Link;
    type IntoIter = IntoIter;
    /// In no particular order; without allocating for a list (a forgotten node's one name
    /// goes through this).
    fn into_iter(self) -> IntoIter {
        match self {
            Links::List(l) => IntoIter::List(l.into_iter()),
            Links::Indexed(m) => IntoIter::Indexed(m.into_iter()),
        }
    }
}

/// The names of a [`Links`], by value.
pub enum IntoIter {
    List(FewIntoIter<Link>),
    Indexed(lru::IntoIter<Key, Link>),
}

impl Iterator for IntoIter {
    type Item = Link;
    fn next(&mut self) -> Option<Link> {
        match self {
            IntoIter::List(i) => i.next(),
            IntoIter::Indexed(i) => i.next().map(|(_, l)| l),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::inode::{RealId, State, Table};
    use std::sync::atomic::Ordering;

    fn node(t: &Table, ino: u64, kind: u32) -> Arc<Node> {
        t.get_or_insert(RealId { dev: 7, ino }, kind, State::empty)
            .0
    }

    fn names(l: &Links) -> Vec<(u64, String)> {
        l.iter()
            .map(|l| (l.parent.ino, l.name.to_string_lossy().into_owned()))
            .collect()
    }

    #[test]
    fn names_keep_their_order_and_pins_in_both_forms() {
        let t = Table::new(vec![7], State::empty());
        let dirs = [node(&t, 10, libc::S_IFDIR), node(&t, 11, libc::S_IFDIR)];
        let file = node(&t, 12, libc::S_IFREG);
        let refs = |d: &Arc<Node>| d.refs.load(Ordering::Relaxed);
        let base = [refs(&dirs[0]), refs(&dirs[1])];
        // Past the index bound and back, names alternating between two directories.
        let n = INDEX_ABOVE * 3;
        for i in 0..n {
            t.link(&file, &dirs[i % 2], OsStr::new(&format!("f{i}")));
            let st = file.state();
            assert_eq!(st.links.len(), i + 1);
            assert_eq!(
                *st.links.first().unwrap().name,
                *format!("f{i}"),
                "newest first"
            );
            assert_eq!(matches!(st.links, Links::Indexed(_)), i + 1 > INDEX_ABOVE);
        }
        let dir_of = |i: usize| dirs[i % 2].ino;
        let expect: Vec<(u64, String)> =
            (0..n).rev().map(|i| (dir_of(i), format!("f{i}"))).collect();
        assert_eq!(
            names(&file.state().links),
            expect,
            "the list's order survives indexing"
        );
        assert_eq!(refs(&dirs[0]) - base[0], (n / 2) as u64);
        // A name given twice is held once, and its parent pinned once.
        t.link(&file, &dirs[0], OsStr::new("f0"));
        assert_eq!(file.state().links.len(), n);
        assert_eq!(refs(&dirs[0]) - base[0], (n / 2) as u64);
        assert_eq!(*file.state().links.first().unwrap().name, *"f0");
        // Touching moves a name first; a name of the wrong directory is not touched.
        assert!(file.touch_link(dir_of(7), OsStr::new("f7")));
        assert!(!file.touch_link(dir_of(8), OsStr::new("f7")));
        assert!(!file.touch_link(dir_of(7), OsStr::new("nothing")));
        assert_eq!(*file.state().links.first().unwrap().name, *"f7");
        assert!(file.state().links.contains(dir_of(5), OsStr::new("f5")));
        assert!(!file.state().links.contains(dir_of(6), OsStr::new("f5")));
        // Removing all but a few goes back to a list, in the same order.
        for i in (0..n).filter(|i| ![0, 7, 9].contains(i)) {
            assert!(t.unlink(&file, &dirs[i % 2], OsStr::new(&format!("f{i}"))));
            assert!(!t.unlink(&file, &dirs[i % 2], OsStr::new(&format!("f{i}"))));
        }
        {
            let st = file.state();
            assert!(matches!(st.links, Links::List(_)));
            let order = [(dir_of(7), "f7"), (dir_of(0), "f0"), (dir_of(9), "f9")];
            let order: Vec<_> = order.iter().map(|(d, n)| (*d, n.to_string())).collect();
            assert_eq!(names(&st.links), order);
        }
        assert_eq!(refs(&dirs[0]) - base[0], 1);
        assert_eq!(refs(&dirs[1]) - base[1], 2);
        let mut all: Vec<_> = std::mem::take(&mut file.state().links)
            .into_iter()
            .map(|l| l.name.to_string_lossy().into_owned())
            .collect();
        all.sort();
        assert_eq!(all, ["f0", "f7", "f9"]);
    }

    #[test]
    fn the_index_costs_a_node_nothing() {
        // Every node holds its names; one million nodes is a usual walk.
        assert_eq!(
            std::mem::size_of::<Links>(),
            std::mem::size_of::<Few<Link>>()
        );
    }

    #[test]
    fn an_indexed_node_gives_all_names_by_value() {
        let t = Table::new(vec![7], State::empty());
        let dir = node(&t, 10, libc::S_IFDIR);
        let mut links = Links::new();
        for i in 0..INDEX_ABOVE + 5 {
            let l = Link {
                parent: dir.clone(),
                name: Name::new(OsStr::new(&i.to_string())),
            };
            assert!(links.push_first(l).is_none());
        }
        assert!(matches!(links, Links::Indexed(_)));
        assert_eq!(links.into_iter().count(), INDEX_ABOVE + 5);
    }
}
