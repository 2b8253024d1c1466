//! The names of a node ([`Links`]). Nearly every node has one, held inline. A file with many
//! names known to the kernel (a lower file hard-linked 60,000 times in one directory, say)
//! gets an index, so that looking up, touching or removing one of its names costs what it
//! costs for a file with one, instead of a scan of all of them.

use crate::compact::{Few, FewIntoIter, Name};
use crate::inode::Node;
use lru::LruCache;
use std::ffi::OsStr;
use std::sync::Arc;

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
