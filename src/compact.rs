//! Compact storage for inode-table nodes, which are many (one per object the kernel knows):
//! [`Few`], a list that keeps a single item inline, and [`Name`], a file name that keeps a
//! short one inline.
//!
//! Nearly every node has one name, one lower object and one identity, and most names are
//! short. In a `Vec` and an `OsString` each of those would sit in an allocation of its own
//! (48, 32, 32 and 32 bytes with the allocator's header).

use std::ffi::OsStr;
use std::ops::{Deref, DerefMut};
use std::os::unix::ffi::OsStrExt;

/// A list of `T` that holds one item without allocating. It reads as a slice.
#[derive(Clone, Debug)]
pub enum Few<T> {
    One(T),
    /// Zero items, or more than one.
    Many(Vec<T>),
}

impl<T> Few<T> {
    pub const fn new() -> Few<T> {
        Few::Many(Vec::new())
    }

    pub fn push(&mut self, x: T) {
        let n = self.len();
        self.insert(n, x);
    }

    /// Inserts `x` at `i`, shifting the items after it; panics if `i > len`, as `Vec` does
    /// (before changing anything).
    pub fn insert(&mut self, i: usize, x: T) {
        assert!(i <= self.len(), "insert index {i} past the end of the list");
        match std::mem::take(self) {
            Few::Many(v) if v.is_empty() => *self = Few::One(x),
            Few::One(first) => {
                let mut v = Vec::with_capacity(2);
                v.push(first);
                v.insert(i, x);
                *self = Few::Many(v);
            }
            Few::Many(mut v) => {
                v.insert(i, x);
                *self = Few::Many(v);
            }
        }
    }

    /// Removes and returns the item at `i`; panics if `i >= len`, as `Vec` does (before
    /// changing anything).
    pub fn remove(&mut self, i: usize) -> T {
        assert!(i < self.len(), "remove index {i} past the end of the list");
        match std::mem::take(self) {
            Few::One(x) => x,
            Few::Many(mut v) => {
                let x = v.remove(i);
                *self = Few::from(v);
                x
            }
        }
    }

    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        match self {
            Few::One(x) => {
                if !keep(x) {
                    *self = Few::new();
                }
            }
            Few::Many(v) => {
                let before = v.len();
                v.retain(keep);
                if v.len() != before {
                    *self = Few::from(std::mem::take(v));
                }
            }
        }
    }
}

impl<T> Default for Few<T> {
    fn default() -> Few<T> {
        Few::new()
    }
}

impl<T> From<Vec<T>> for Few<T> {
    /// A single item moves inline (and the vector's allocation is freed).
    fn from(mut v: Vec<T>) -> Few<T> {
        if v.len() == 1 {
            Few::One(v.pop().expect("one item"))
        } else {
            v.shrink_to_fit();
            Few::Many(v)
        }
    }
}

impl<T> From<Few<T>> for Vec<T> {
    fn from(f: Few<T>) -> Vec<T> {
        match f {
            Few::One(x) => vec![x],
            Few::Many(v) => v,
        }
    }
}

impl<T> Deref for Few<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        match self {
            Few::One(x) => std::slice::from_ref(x),
            Few::Many(v) => v,
        }
    }
}

impl<T> DerefMut for Few<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        match self {
            Few::One(x) => std::slice::from_mut(x),
            Few::Many(v) => v,
        }
    }
}

impl<T> IntoIterator for Few<T> {
    type Item = T;
    type IntoIter = FewIntoIter<T>;
    /// Without allocating (a forgotten node's one name goes through this).
    fn into_iter(self) -> FewIntoIter<T> {
        match self {
            Few::One(x) => FewIntoIter::One(Some(x).into_iter()),
            Few::Many(v) => FewIntoIter::Many(v.into_iter()),
        }
    }
}

/// The items of a [`Few`], by value.
pub enum FewIntoIter<T> {
    One(std::option::IntoIter<T>),
    Many(std::vec::IntoIter<T>),
}

impl<T> Iterator for FewIntoIter<T> {
    type Item = T;
    fn next(&mut self) -> Option<T> {
        match self {
            FewIntoIter::One(i) => i.next(),
            FewIntoIter::Many(i) => i.next(),
        }
    }
}

/// Longest name held inline.
const INLINE: usize = 22;

/// A file name that holds up to 22 bytes inline, in the space of an `OsString`'s header. It
/// reads as an `OsStr`.
#[derive(Clone)]
pub struct Name(NameRepr);

#[derive(Clone)]
enum NameRepr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Box<[u8]>),
}

impl Name {
    pub fn new(name: &OsStr) -> Name {
        let b = name.as_bytes();
        if b.len() <= INLINE {
            let mut bytes = [0; INLINE];
            bytes[..b.len()].copy_from_slice(b);
            Name(NameRepr::Inline {
                len: b.len() as u8,
                bytes,
            })
        } else {
            Name(NameRepr::Heap(b.into()))
        }
    }
}

impl Deref for Name {
    type Target = OsStr;
    fn deref(&self) -> &OsStr {
        OsStr::from_bytes(match &self.0 {
            NameRepr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            NameRepr::Heap(b) => b,
        })
    }
}

impl AsRef<OsStr> for Name {
    fn as_ref(&self) -> &OsStr {
        self
    }
}

impl PartialEq for Name {
    fn eq(&self, other: &Name) -> bool {
        **self == **other
    }
}

impl Eq for Name {}

impl std::hash::Hash for Name {
    fn hash<H: std::hash::Hasher>(&self, h: &mut H) {
        (**self).hash(h)
    }
}

impl PartialEq<OsStr> for Name {
    fn eq(&self, other: &OsStr) -> bool {
        **self == *other
    }
}

impl PartialEq<&OsStr> for Name {
    fn eq(&self, other: &&OsStr) -> bool {
        **self == **other
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::{Few, Name, NameRepr};
    use std::ffi::OsStr;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn short_names_are_held_inline_and_long_ones_on_the_heap() {
        for len in [0, 1, 21, 22, 23, 255] {
            let bytes: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let os = OsStr::from_bytes(&bytes);
            let n = Name::new(os);
            assert_eq!(&*n, os, "{len} bytes");
            assert!(n == os);
            assert_eq!(
                matches!(n.0, NameRepr::Inline { .. }),
                len <= 22,
                "{len} bytes"
            );
        }
        let odd = OsStr::from_bytes(b"\xff\xfe not UTF-8");
        assert_eq!(&*Name::new(odd).clone(), odd);
        assert!(Name::new(OsStr::new("ab")) != OsStr::new("abc"));
    }

    #[test]
    fn one_item_is_held_inline_and_more_in_a_vector() {
        let mut f = Few::new();
        assert!(f.is_empty());
        f.push(1);
        assert!(matches!(f, Few::One(1)));
        f.push(3);
        f.insert(1, 2);
        f.insert(0, 0);
        assert_eq!(&f[..], &[0, 1, 2, 3]);
        assert_eq!(f.remove(0), 0);
        f.retain(|&x| x != 2);
        assert_eq!(&f[..], &[1, 3]);
        assert_eq!(f.remove(1), 3);
        assert!(
            matches!(f, Few::One(1)),
            "back inline once one item is left"
        );
        assert_eq!(f.remove(0), 1);
        assert!(f.is_empty());
        f.insert(0, 7);
        f[0] += 1;
        assert_eq!(f.first(), Some(&8));
        assert_eq!(f.into_iter().collect::<Vec<_>>(), vec![8]);
        assert_eq!(
            Few::from(vec![1, 2]).into_iter().collect::<Vec<_>>(),
            vec![1, 2]
        );
        assert_eq!(Few::<u8>::new().into_iter().count(), 0);
    }

    #[test]
    fn vectors_convert_both_ways() {
        assert!(matches!(Few::from(vec![5]), Few::One(5)));
        assert!(matches!(Few::<u8>::from(vec![]), Few::Many(ref v) if v.is_empty()));
        assert_eq!(Vec::from(Few::from(vec![1, 2])), vec![1, 2]);
        assert_eq!(Vec::from(Few::One(4)), vec![4]);
        let mut f = Few::from(vec![1, 2]);
        f.retain(|&x| x == 2);
        assert!(matches!(f, Few::One(2)));
    }

    #[test]
    fn a_bad_index_panics_as_a_vectors_does_and_changes_nothing() {
        for (items, insert) in [(vec![], true), (vec![1], true), (vec![1], false)] {
            let mut f = Few::from(items.clone());
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if insert {
                    f.insert(2, 9);
                } else {
                    f.remove(1);
                }
            }));
            assert!(caught.is_err());
            assert_eq!(&f[..], &items[..], "unchanged after the panic");
        }
    }
}
