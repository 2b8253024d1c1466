//! Which processes stat what they list, for `readdirplus=auto`.
//!
//! A listing with attributes (READDIRPLUS) saves a program that stats every entry (`ls -l`,
//! `du`, `find -printf %s`, rsync) one LOOKUP per entry, and costs a program that does not
//! (`find`, `ls`) a stat and an inode per entry. The kernel's own heuristic asks for attributes
//! in the first batch of every listing, which is most of a small directory. Each request
//! carries the caller's pid, so the daemon tells the two kinds apart by what a process did
//! with the last directory it listed: if it looked names up there, it is given whole listings
//! with attributes; otherwise the first batch holds a single entry, and the kernel reads the
//! rest as a plain listing.
//!
//! A process's first directory gets a whole first batch, as the kernel's own heuristic would
//! give it: most programs list one small directory (`ls -l DIR`, `stat *`), which then needs
//! no lookups at all, and one that does not stat pays for one batch. What a process does is
//! learned from its second directory on.

use std::num::NonZeroUsize;
use std::sync::Mutex;

use lru::LruCache;

/// Processes followed at once (the least recently seen are forgotten).
const TRACKED: NonZeroUsize = NonZeroUsize::new(256).unwrap();

/// A process given whole listings is tried with a single entry again every so many
/// directories, in case it stopped looking names up.
const RECHECK_EVERY: u32 = 64;

#[derive(Clone, Copy, Debug)]
struct Walker {
    /// The directory it listed last.
    dir: u64,
    /// Whether that listing was given as a single entry (and so shows what the process does).
    probing: bool,
    /// Whether it looked up a name other than a directory's there since (walkers that do not
    /// stat look up only the directories they enter).
    looked_up: bool,
    /// Whether it is given whole listings with attributes.
    stats: bool,
    /// Directories listed since it was last probed.
    since_probe: u32,
    /// Still in the first directory it listed, which gets a whole first batch.
    first: bool,
}

pub struct Walkers {
    map: Mutex<LruCache<u32, Walker>>,
}

impl Default for Walkers {
    fn default() -> Self {
        Walkers {
            map: Mutex::new(LruCache::new(TRACKED)),
        }
    }
}

/// What to give a process reading a listing with attributes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Decision {
    /// The whole listing that way (else a single entry).
    pub whole: bool,
    /// The process is known to stat what it lists: learned from the directories it listed
    /// after its first (which gets whole listings before anything is known).
    pub stats: bool,
    /// The process listed another directory before this one: it walks a tree, or lists
    /// several directories.
    pub walking: bool,
}

impl Walkers {
    /// `decide(..).whole`, for the tests.
    #[cfg(test)]
    fn listing(&self, pid: u32, dir: u64) -> bool {
        self.decide(pid, dir).whole
    }

    /// Process `pid` reads the listing of directory `dir` with attributes: whether to give it
    /// the whole listing that way (else a single entry), whether it is known to stat what it
    /// lists, and whether it listed another directory before.
    pub fn decide(&self, pid: u32, dir: u64) -> Decision {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let w = map.get_or_insert_mut(pid, || Walker {
            dir,
            probing: false,
            looked_up: false,
            stats: false,
            since_probe: 0,
            first: true,
        });
        if w.dir == dir {
            return Decision {
                whole: w.stats || w.first,
                stats: w.stats,
                walking: !w.first,
            };
        }
        // Leaving its first directory (not a probe: the next one is).
        w.first = false;
        if w.probing {
            w.stats = w.looked_up;
        }
        w.since_probe += 1;
        w.probing = !w.stats || w.since_probe >= RECHECK_EVERY;
        if w.probing {
            w.since_probe = 0;
        }
        w.dir = dir;
        w.looked_up = false;
        Decision {
            whole: !w.probing,
            stats: w.stats,
            walking: true,
        }
    }

    /// Process `pid` looks up a name other than a directory's in directory `parent`.
    pub fn lookup(&self, pid: u32, parent: u64) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(w) = map.peek_mut(&pid)
            && w.dir == parent
        {
            w.looked_up = true;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_first_directory_gets_a_whole_batch_and_the_second_probes() {
        let w = Walkers::default();
        assert!(w.listing(7, 99), "unknown: a whole first batch");
        assert!(w.listing(7, 99), "same directory, same answer");
        w.lookup(7, 99);
        assert!(!w.listing(7, 100), "the second directory probes");
        assert!(!w.listing(7, 100), "same directory, same answer");
    }

    #[test]
    fn a_process_that_looks_up_what_it_lists_gets_whole_listings() {
        let w = Walkers::default();
        assert!(w.listing(7, 99));
        assert!(!w.listing(7, 100), "probe");
        w.lookup(7, 100);
        assert!(w.listing(7, 101));
        // Given whole listings, it sends no lookups; that says nothing.
        assert!(w.listing(7, 102));
        assert!(w.listing(7, 103));
    }

    #[test]
    fn only_a_process_that_showed_it_stats_counts_as_statting() {
        let w = Walkers::default();
        let d = w.decide(7, 99);
        assert!(d.whole);
        assert!(!d.stats, "a first directory says nothing");
        assert!(!d.walking);
        assert!(!w.decide(7, 99).walking, "still the first directory");
        let d = w.decide(7, 100);
        assert!(!d.whole);
        assert!(!d.stats, "probing");
        assert!(d.walking, "a second directory");
        w.lookup(7, 100);
        let d = w.decide(7, 101);
        assert!(d.whole);
        assert!(d.stats);
        assert!(d.walking);
        let d = w.decide(8, 5);
        assert!(!d.stats && !d.walking, "unknown");
    }

    #[test]
    fn a_process_that_only_lists_gets_single_entries() {
        let w = Walkers::default();
        assert!(w.listing(9, 99));
        for d in 100..110 {
            assert!(!w.listing(9, d));
            // A lookup elsewhere does not count.
            w.lookup(9, 5);
        }
    }

    #[test]
    fn whole_listings_are_rechecked() {
        let w = Walkers::default();
        assert!(w.listing(7, 0));
        assert!(!w.listing(7, 1));
        w.lookup(7, 1);
        let mut probes = 0;
        for d in 2..(2 + 2 * RECHECK_EVERY as u64) {
            if !w.listing(7, d) {
                probes += 1;
                w.lookup(7, d);
            }
        }
        assert_eq!(probes, 2);
        // Once it stops looking up, the next probe ends whole listings.
        let mut d = 1000;
        while w.listing(7, d) {
            d += 1;
        }
        assert!(!w.listing(7, d + 1));
    }

    #[test]
    fn processes_are_told_apart() {
        let w = Walkers::default();
        w.listing(1, 9);
        w.listing(2, 9);
        w.listing(1, 10);
        w.listing(2, 10);
        w.lookup(1, 10);
        assert!(w.listing(1, 11));
        assert!(!w.listing(2, 11));
    }
}
