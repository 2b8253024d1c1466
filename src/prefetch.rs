//! Stat-ahead: while a program walks the merged tree statting what it lists (`find -printf`,
//! `ls -lR`, `du`, rsync), a background thread reads the subdirectories of the directory it
//! just listed, in the layers, and stats their entries, so that the real filesystem's inodes
//! and directory blocks are in memory when the walk gets there.
//!
//! On a cold cache a walk waits on the disk in every directory: the daemon's stats run one
//! directory at a time, as the program's requests come. Reading ahead overlaps that wait with
//! the round trips of the directories before it. Nothing read ahead is kept here: the real
//! filesystem's caches hold it, and the daemon reads it again as usual, so what a program
//! sees never depends on this.
//!
//! The work is bounded: only listings for a program known to stat what it lists trigger it
//! (`readdirplus=auto` learns that from the directories it listed after its first, so a single
//! `ls -l DIR` reads nothing ahead), one level down, at most `SUBDIRS` subdirectories of a
//! directory, `ENTRIES` entries of each and `BUDGET` of all (all layers together), at most
//! `JOBS` directories waiting (a newer listing pushes out the oldest: the walk has moved on),
//! and a directory read ahead for recently is not read ahead for again.

use std::collections::VecDeque;
use std::ffi::CString;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use crate::fdcache::CachedDir;
use crate::sys;

/// Directories whose subdirectories wait to be read.
const JOBS: usize = 16;
/// Subdirectories read per listed directory.
const SUBDIRS: usize = 256;
/// Listed directories remembered as read ahead for.
const RECENT: usize = 64;
/// Entries statted per subdirectory.
const ENTRIES: usize = 4096;
/// Entries statted per listed directory, all its subdirectories together.
const BUDGET: usize = 16384;

/// One listed directory: its directories in the layers, and the names of its subdirectories
/// in the merged view (a name missing from a layer is skipped there).
struct Job {
    dirs: Vec<Arc<CachedDir>>,
    subdirs: Arc<[CString]>,
}

#[derive(Default)]
pub struct Prefetcher {
    queue: Mutex<VecDeque<Job>>,
    /// Serials of the directories read ahead for last.
    recent: Mutex<VecDeque<u64>>,
    wake: Condvar,
    /// Whether the thread started (with the first job).
    thread: OnceLock<bool>,
    /// Subdirectories read ahead so far.
    read: AtomicU64,
}

impl Prefetcher {
    /// Whether the directory with this serial was not read ahead for recently; it counts as
    /// read ahead for from now on.
    pub fn fresh(&self, serial: u64) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        if recent.contains(&serial) {
            return false;
        }
        if recent.len() >= RECENT {
            recent.pop_front();
        }
        recent.push_back(serial);
        true
    }

    /// Queues the subdirectories `subdirs` (the first `SUBDIRS`) of a directory whose
    /// directories in the layers are `dirs`, to be read ahead.
    pub fn ahead(
        self: &Arc<Self>,
        dirs: Vec<Arc<CachedDir>>,
        subdirs: impl IntoIterator<Item = CString>,
    ) {
        let subdirs: Arc<[CString]> = subdirs.into_iter().take(SUBDIRS).collect();
        if subdirs.is_empty() || dirs.is_empty() {
            return;
        }
        let started = *self.thread.get_or_init(|| {
            let me = self.clone();
            std::thread::Builder::new()
                .name("stat-ahead".into())
                .spawn(move || me.run())
                .map_err(|e| log::debug!("stat-ahead thread not started: {e}"))
                .is_ok()
        });
        if !started {
            return;
        }
        self.enqueue(Job { dirs, subdirs });
        self.wake.notify_one();
    }

    /// Queues a job, pushing out the oldest when `JOBS` wait.
    fn enqueue(&self, job: Job) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.len() >= JOBS {
            q.pop_front();
        }
        q.push_back(job);
    }

    fn run(&self) {
        loop {
            let job = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(j) = q.pop_front() {
                        break j;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            let mut budget = BUDGET;
            'job: for dir in &job.dirs {
                for name in job.subdirs.iter() {
                    if budget == 0 {
                        break 'job;
                    }
                    if read_ahead(dir, name, &mut budget) {
                        self.read.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }
    }
}

/// Lists the subdirectory `name` of `dir` and stats up to `ENTRIES` of its entries, taken
/// from `budget`; false if it could not be opened (gone, or not a directory in this layer).
fn read_ahead(dir: &CachedDir, name: &CString, budget: &mut usize) -> bool {
    // `sys::openat` adds O_NOFOLLOW: a name that became a symlink is not followed.
    let Ok(sub) = sys::open_dir_noatime(dir.as_fd(), name) else {
        return false;
    };
    let want = ENTRIES.min(*budget);
    let mut names = Vec::new();
    let _ = sys::for_each_dirent_while(sub.as_fd(), |d| {
        if d.name != b"."
            && d.name != b".."
            && let Ok(n) = CString::new(d.name)
        {
            names.push(n);
        }
        names.len() < want
    });
    *budget -= names.len();
    for n in &names {
        // Listable but not searchable (a directory of another user, rootless): stop.
        if let Err(e) = sys::fstatat(sub.as_fd(), n, 0)
            && e.code() == libc::EACCES
        {
            break;
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn read(p: &Prefetcher) -> u64 {
        p.read.load(Ordering::Relaxed)
    }

    /// Waits until `n` subdirectories were read (a deadline against a stuck thread, not a
    /// timing assertion).
    fn wait_for(p: &Prefetcher, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while read(p) < n {
            assert!(Instant::now() < deadline, "read {} of {n}", read(p));
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[test]
    fn subdirectories_are_read_in_the_background_and_the_rest_skipped() {
        let base = std::env::temp_dir().join(format!("um-prefetch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        for d in ["a", "b"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
            std::fs::write(base.join(d).join("f"), "x").unwrap();
        }
        std::fs::write(base.join("file"), "x").unwrap();
        std::os::unix::fs::symlink("a", base.join("link")).unwrap();
        let dir = Arc::new(CachedDir::new(open_dir(&base)));
        // Directly, without the thread's timing: only real subdirectories are read.
        let mut budget = 100;
        for (name, read) in [
            ("a", true),
            ("link", false),
            ("file", false),
            ("gone", false),
        ] {
            let name = CString::new(name).unwrap();
            assert_eq!(read_ahead(&dir, &name, &mut budget), read, "{name:?}");
        }
        let p = Arc::new(Prefetcher::default());
        let names = ["a", "gone", "file", "link", "b"].map(|n| CString::new(n).unwrap());
        p.ahead(vec![dir.clone()], names);
        wait_for(&p, 2);
        // A second job after the first, over two layers: the thread keeps serving.
        p.ahead(vec![dir.clone(), dir.clone()], [CString::new("a").unwrap()]);
        wait_for(&p, 4);
        // Nothing queued, nothing read (the symlink to a directory is not followed).
        p.ahead(vec![dir], []);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read(&p), 4);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_subdirectory_takes_what_is_left_of_the_budget() {
        let base = std::env::temp_dir().join(format!("um-prefetch-b-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("s")).unwrap();
        for i in 0..10 {
            std::fs::write(base.join("s").join(i.to_string()), "").unwrap();
        }
        let dir = CachedDir::new(open_dir(&base));
        let s = CString::new("s").unwrap();
        let mut budget = 3;
        assert!(read_ahead(&dir, &s, &mut budget));
        assert_eq!(budget, 0, "stopped at the budget");
        let mut budget = 100;
        assert!(read_ahead(&dir, &s, &mut budget));
        assert_eq!(budget, 90, "all ten entries");
        assert!(!read_ahead(
            &dir,
            &CString::new("none").unwrap(),
            &mut budget
        ));
        assert_eq!(budget, 90);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_directory_is_read_ahead_for_once_while_recent() {
        let p = Prefetcher::default();
        assert!(p.fresh(1));
        assert!(!p.fresh(1));
        for s in 2..(2 + RECENT as u64) {
            assert!(p.fresh(s));
        }
        assert!(p.fresh(1), "forgotten after RECENT others");
    }

    #[test]
    fn the_queue_keeps_the_newest_jobs() {
        // No thread: only the queue is exercised.
        let p = Prefetcher::default();
        let dir = Arc::new(CachedDir::new(open_dir(&std::env::temp_dir())));
        for i in 0..(JOBS + 3) {
            p.enqueue(Job {
                dirs: vec![dir.clone()],
                subdirs: [CString::new(format!("d{i}")).unwrap()].into(),
            });
        }
        let q = p.queue.lock().unwrap();
        assert_eq!(q.len(), JOBS);
        assert_eq!(q.front().unwrap().subdirs[0].to_str().unwrap(), "d3");
        assert_eq!(
            q.back().unwrap().subdirs[0].to_str().unwrap(),
            format!("d{}", JOBS + 2)
        );
    }

    fn open_dir(p: &std::path::Path) -> std::os::fd::OwnedFd {
        std::fs::File::open(p).unwrap().into()
    }
}
