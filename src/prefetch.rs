//! Reading ahead: while a program walks the merged tree, background threads read the
//! subdirectories of the directory it just listed, in the layers, and for a program that stats
//! what it lists (`find -printf`, `ls -lR`, `du`, rsync) also stats their entries, so that the
//! real filesystem's directory blocks (and inodes) are in memory when the walk gets there.
//!
//! On a cold cache a walk waits on the disk in every directory: the daemon reads and stats
//! one directory at a time, as the program's requests come. Reading ahead overlaps that wait
//! with the round trips of the directories before it. Nothing read ahead is kept here: the
//! real filesystem's caches hold it, and the daemon reads it again as usual, so what a program
//! sees never depends on this.
//!
//! The work is bounded: only a program's listings after its first trigger it
//! (`readdirplus=auto` follows each process, so a single `ls -l DIR` reads nothing ahead), and
//! only one that has shown it stats what it lists gets stats; one level down, at most
//! `SUBDIRS` subdirectories of a directory, `ENTRIES` entries of each and `BUDGET` of all (all
//! layers together), at most `JOBS` directories waiting (a newer listing pushes out the
//! oldest: the walk has moved on), and a directory read ahead for recently is not read ahead
//! for again.
//!
//! Files too: a program reading the files of a directory one after another (`git status`,
//! `grep -r`, a compiler's headers) waits on the disk for each file's data in turn. Once a
//! process opened `OPENS_IN_A_ROW` different files of one directory in a row, the
//! threads have the kernel read the first bytes of the directory's small files, in the layer
//! those files came from, into the page cache (`readahead(2)`: queued together, waited for by
//! nobody; bounds in `DATA_FILES`). Names are opened `O_PATH` first, refusing symlinks and
//! mount points, and only regular files are opened for reading.

use std::collections::VecDeque;
use std::ffi::{CStr, CString};
use std::num::NonZeroUsize;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};

use lru::LruCache;

use crate::fdcache::CachedDir;
use crate::sys;

/// Directories whose subdirectories wait to be read.
const JOBS: usize = 16;
/// Threads reading ahead: a walk's own requests reach the disk one at a time, so reading
/// ahead one at a time barely keeps ahead of a walk that does not stat (`find`). Statting is
/// done by one of them at a time: a walk that stats leaves the reader time to keep ahead,
/// and more of them would take the CPUs from it.
const THREADS: usize = 4;
/// Subdirectories read per listed directory.
const SUBDIRS: usize = 256;
/// Listed directories remembered as read ahead for.
const RECENT: usize = 64;
/// Entries read (and statted) per subdirectory.
const ENTRIES: usize = 4096;
/// Entries read (and statted) per listed directory, all its subdirectories together.
const BUDGET: usize = 16384;
/// Reading files ahead, per directory: at most this many files among the first `ENTRIES`
/// entries, only files of up to `DATA_FILE_MAX` bytes, the first `DATA_READ` bytes of each,
/// `DATA_BYTES` in all.
const DATA_FILES: usize = 256;
const DATA_FILE_MAX: u64 = 1 << 20;
const DATA_READ: u64 = 128 << 10;
const DATA_BYTES: u64 = 4 << 20;

/// Different files opened for reading in a row in one directory that show a process reading
/// the directory's files (`git status`, `grep -r`): more than a program opening a couple of
/// libraries or configuration files does.
pub const OPENS_IN_A_ROW: u32 = 4;
/// Processes whose opens are followed at once (the least recently seen are forgotten).
const OPENERS: NonZeroUsize = NonZeroUsize::new(256).unwrap();

/// What a process opened for reading last.
#[derive(Clone, Copy, Debug)]
struct Opener {
    dir: u64,
    file: u64,
    /// Different files opened in `dir` in a row.
    files: u32,
}

/// What a job reads ahead.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The listings of subdirectories.
    List,
    /// The listings of subdirectories, and the attributes of their entries.
    Stat,
    /// The data of the directory's own files.
    Data,
}

/// One listed directory: its directories in the layers, and the names of its subdirectories
/// in the merged view (a name missing from a layer is skipped there); or, for `Kind::Data`,
/// the directory of the layer whose files are read.
struct Job {
    /// Numbers jobs in the order they were queued (a task finds its job again by it).
    id: u64,
    dirs: Vec<Arc<CachedDir>>,
    /// Empty for `Kind::Data`.
    subdirs: Arc<[CString]>,
    kind: Kind,
    /// The next subdirectory and layer to read, as `subdir * dirs.len() + layer`: one
    /// subdirectory in every layer, then the next, in the order the walk goes.
    next: usize,
    /// Entries left to read, all subdirectories together: spent as they are read, so the
    /// tasks running when it runs out may read up to `ENTRIES` more each.
    budget: usize,
}

impl Job {
    /// Tasks in all: one per subdirectory and layer, or one per layer for `Kind::Data`.
    fn tasks(&self) -> usize {
        match self.kind {
            Kind::Data => self.dirs.len(),
            _ => self.subdirs.len() * self.dirs.len(),
        }
    }

    /// Whether every task was taken, or the budget is spent.
    fn finished(&self) -> bool {
        self.next >= self.tasks() || self.budget == 0
    }
}

/// One subdirectory in one layer (or one directory's files in one layer), taken from a job.
struct Task {
    job: u64,
    dir: Arc<CachedDir>,
    subdirs: Arc<[CString]>,
    index: usize,
    kind: Kind,
    want: usize,
}

#[derive(Default)]
struct Queue {
    jobs: VecDeque<Job>,
    /// The next job's `id`.
    next_id: u64,
    /// Whether a thread is statting (see `THREADS`).
    statting: bool,
}

pub struct Prefetcher {
    queue: Mutex<Queue>,
    /// What each process opened for reading last (see `opened`).
    openers: Mutex<LruCache<u32, Opener>>,
    /// Serials of the directories whose subdirectories, and of those whose files, were read
    /// ahead last.
    recent: Mutex<[VecDeque<u64>; 2]>,
    wake: Condvar,
    /// Whether the threads started (with the first job).
    threads: OnceLock<bool>,
    /// Subdirectories read ahead so far (for the tests).
    read: AtomicU64,
    /// Files read ahead so far (for the tests).
    files: AtomicU64,
}

impl Default for Prefetcher {
    fn default() -> Self {
        Prefetcher {
            queue: Mutex::default(),
            openers: Mutex::new(LruCache::new(OPENERS)),
            recent: Mutex::default(),
            wake: Condvar::new(),
            threads: OnceLock::new(),
            read: AtomicU64::new(0),
            files: AtomicU64::new(0),
        }
    }
}

impl Prefetcher {
    /// Process `pid` opens the file `file` of directory `dir` for reading: true when it is
    /// the `OPENS_IN_A_ROW`th different file in a row there.
    pub fn opened(&self, pid: u32, dir: u64, file: u64) -> bool {
        let mut map = self.openers.lock().unwrap_or_else(|p| p.into_inner());
        let o = map.get_or_insert_mut(pid, || Opener {
            dir,
            file,
            files: 0,
        });
        if o.dir != dir {
            *o = Opener {
                dir,
                file,
                files: 1,
            };
        } else if o.file != file || o.files == 0 {
            o.file = file;
            o.files = o.files.saturating_add(1);
        }
        o.files == OPENS_IN_A_ROW
    }

    /// Whether the subdirectories (or, if `files`, the files) of the directory with this
    /// serial were not read ahead recently; they count as read ahead from now on.
    pub fn fresh(&self, serial: u64, files: bool) -> bool {
        let mut recent = self.recent.lock().unwrap_or_else(|p| p.into_inner());
        let recent = &mut recent[usize::from(files)];
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
    /// directories in the layers are `dirs`, to be read ahead, their entries statted if
    /// `stats`.
    pub fn ahead(
        self: &Arc<Self>,
        dirs: Vec<Arc<CachedDir>>,
        subdirs: impl IntoIterator<Item = CString>,
        stats: bool,
    ) {
        let subdirs: Arc<[CString]> = subdirs.into_iter().take(SUBDIRS).collect();
        if subdirs.is_empty() {
            return;
        }
        let kind = if stats { Kind::Stat } else { Kind::List };
        self.submit(dirs, subdirs, kind);
    }

    /// Queues the files of the directory `dir` (in one layer), to have their first bytes
    /// read into the page cache.
    pub fn data_ahead(self: &Arc<Self>, dir: Arc<CachedDir>) {
        self.submit(vec![dir], Arc::new([]), Kind::Data);
    }

    fn submit(self: &Arc<Self>, dirs: Vec<Arc<CachedDir>>, subdirs: Arc<[CString]>, kind: Kind) {
        if dirs.is_empty() || !self.started() {
            return;
        }
        let job = Job {
            id: 0,
            dirs,
            subdirs,
            kind,
            next: 0,
            budget: match kind {
                Kind::Data => usize::MAX,
                _ => BUDGET,
            },
        };
        let tasks = match kind {
            // One thread stats at a time.
            Kind::Stat => 1,
            _ => job.tasks().min(THREADS),
        };
        self.enqueue(job);
        for _ in 0..tasks {
            self.wake.notify_one();
        }
    }

    /// Starts the threads with the first job; false if none could be started.
    fn started(self: &Arc<Self>) -> bool {
        *self.threads.get_or_init(|| {
            let mut any = false;
            for _ in 0..THREADS {
                let me = self.clone();
                match std::thread::Builder::new()
                    .name("read-ahead".into())
                    .spawn(move || me.run())
                {
                    Ok(_) => any = true,
                    Err(e) => log::debug!("read-ahead thread not started: {e}"),
                }
            }
            any
        })
    }

    /// Queues a job (numbering it), pushing out the oldest when `JOBS` wait.
    fn enqueue(&self, mut job: Job) {
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if q.jobs.len() >= JOBS {
            q.jobs.pop_front();
        }
        job.id = q.next_id;
        q.next_id += 1;
        q.jobs.push_back(job);
    }

    /// The next subdirectory to read, from the oldest job that may run (a job that stats
    /// waits while another thread stats); finished jobs leave the queue.
    fn take(q: &mut Queue) -> Option<Task> {
        q.jobs.retain(|j| !j.finished());
        let statting = q.statting;
        let job = q
            .jobs
            .iter_mut()
            .find(|j| !(j.kind == Kind::Stat && statting))?;
        let k = job.next;
        job.next += 1;
        let task = Task {
            job: job.id,
            dir: job.dirs[k % job.dirs.len()].clone(),
            subdirs: job.subdirs.clone(),
            index: k / job.dirs.len(),
            kind: job.kind,
            want: match job.kind {
                Kind::Data => DATA_FILES,
                _ => ENTRIES.min(job.budget),
            },
        };
        q.statting |= task.kind == Kind::Stat;
        Some(task)
    }

    /// Ends a task that read `seen` entries (None: the subdirectory could not be opened; a
    /// `Kind::Data` task reports the files it read): they are spent from its job's budget, if
    /// the job still waits, and a statting task lets the next one start. The thread that ends
    /// it takes the next task itself, so no other thread needs waking.
    fn done(&self, task: &Task, seen: Option<usize>) {
        match (task.kind, seen) {
            (Kind::Data, Some(n)) => {
                self.files.fetch_add(n as u64, Ordering::Relaxed);
            }
            (_, Some(_)) => {
                self.read.fetch_add(1, Ordering::Relaxed);
            }
            (_, None) => {}
        }
        let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(job) = q.jobs.iter_mut().find(|j| j.id == task.job) {
            job.budget = job.budget.saturating_sub(seen.unwrap_or(0));
        }
        if task.kind == Kind::Stat {
            q.statting = false;
        }
    }

    fn run(&self) {
        loop {
            let task = {
                let mut q = self.queue.lock().unwrap_or_else(|p| p.into_inner());
                loop {
                    if let Some(t) = Self::take(&mut q) {
                        break t;
                    }
                    q = self.wake.wait(q).unwrap_or_else(|p| p.into_inner());
                }
            };
            // Ended by the guard also if reading panics, so that statting resumes.
            let mut running = Running {
                p: self,
                task,
                seen: None,
            };
            let t = &running.task;
            running.seen = match t.kind {
                Kind::Data => Some(read_data_ahead(&t.dir, t.want)),
                k => read_ahead(&t.dir, &t.subdirs[t.index], t.want, k == Kind::Stat),
            };
        }
    }
}

/// A task being read; ends it (`Prefetcher::done`) when dropped.
struct Running<'a> {
    p: &'a Prefetcher,
    task: Task,
    seen: Option<usize>,
}

impl Drop for Running<'_> {
    fn drop(&mut self) {
        self.p.done(&self.task, self.seen);
    }
}

/// Lists up to `want` entries of the subdirectory `name` of `dir` and stats them if
/// `stats`: the number listed, or None if it could not be opened (gone, or not a directory
/// in this layer).
fn read_ahead(dir: &CachedDir, name: &CString, want: usize, stats: bool) -> Option<usize> {
    // `sys::openat` adds O_NOFOLLOW: a name that became a symlink is not followed.
    let sub = sys::open_dir_noatime(dir.as_fd(), name).ok()?;
    let mut seen = 0;
    let mut names = Vec::new();
    let _ = sys::for_each_dirent_while(sub.as_fd(), |d| {
        if d.name != b"." && d.name != b".." {
            seen += 1;
            if stats && let Ok(n) = CString::new(d.name) {
                names.push(n);
            }
        }
        seen < want
    });
    for n in &names {
        // Listable but not searchable (a directory of another user, rootless): stop.
        if let Err(e) = sys::fstatat(sub.as_fd(), n, 0)
            && e.code() == libc::EACCES
        {
            break;
        }
    }
    Some(seen)
}

/// Has the kernel read the first bytes of up to `want` small regular files of `dir` into
/// the page cache (see `DATA_FILES`), without waiting for the data; the number of files.
fn read_data_ahead(dir: &CachedDir, want: usize) -> usize {
    let Ok(d) = sys::open_dir_noatime(dir.as_fd(), c".") else {
        return 0;
    };
    let mut seen = 0;
    let mut names = Vec::new();
    let _ = sys::for_each_dirent_while(d.as_fd(), |e| {
        seen += 1;
        // A filesystem that does not give types (DT_UNKNOWN) is checked by `fstat` below.
        if matches!(e.kind, libc::DT_REG | libc::DT_UNKNOWN)
            && let Ok(n) = CString::new(e.name)
        {
            names.push(n);
        }
        names.len() < want && seen < ENTRIES
    });
    let mut bytes = 0;
    let mut files = 0;
    for n in &names {
        if let Some(len) = data_ahead_of(&d, n, DATA_BYTES - bytes) {
            bytes += len;
            files += 1;
        }
    }
    files
}

/// Has the kernel read the first bytes of the file `name` of `dir` (at most `DATA_READ`, and
/// only if that fits in `room`): the number of bytes asked for, or None if it is not a
/// regular file of at most `DATA_FILE_MAX` bytes in `dir`'s filesystem, or does not fit.
fn data_ahead_of(dir: &OwnedFd, name: &CStr, room: u64) -> Option<u64> {
    let path = sys::open_path_here(dir.as_fd(), name).ok()?;
    let st = sys::fstat(path.as_fd()).ok()?;
    let size = st.st_size as u64;
    if st.st_mode & libc::S_IFMT != libc::S_IFREG || size == 0 || size > DATA_FILE_MAX {
        return None;
    }
    let len = size.min(DATA_READ);
    if len > room {
        return None;
    }
    // The same file: a regular file, so opening it has no effect of its own.
    let f = sys::reopen(
        path.as_fd(),
        libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY,
    )
    .ok()?;
    sys::readahead(f.as_fd(), len).ok()?;
    Some(len)
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

    fn job(dirs: Vec<Arc<CachedDir>>, names: &[&str], stats: bool) -> Job {
        Job {
            id: 0,
            dirs,
            subdirs: names.iter().map(|n| CString::new(*n).unwrap()).collect(),
            kind: if stats { Kind::Stat } else { Kind::List },
            next: 0,
            budget: BUDGET,
        }
    }

    #[test]
    fn subdirectories_are_read_in_the_background_and_the_rest_skipped() {
        let base = scratch("a");
        for d in ["a", "b"] {
            std::fs::create_dir_all(base.join(d)).unwrap();
            std::fs::write(base.join(d).join("f"), "x").unwrap();
        }
        std::fs::write(base.join("file"), "x").unwrap();
        std::os::unix::fs::symlink("a", base.join("link")).unwrap();
        let dir = Arc::new(CachedDir::new(open_dir(&base)));
        // Directly, without the threads' timing: only real subdirectories are read.
        for (name, read) in [
            ("a", Some(1)),
            ("link", None),
            ("file", None),
            ("gone", None),
        ] {
            let name = CString::new(name).unwrap();
            for stats in [true, false] {
                assert_eq!(read_ahead(&dir, &name, 100, stats), read, "{name:?}");
            }
        }
        let p = Arc::new(Prefetcher::default());
        let names = ["a", "gone", "file", "link", "b"].map(|n| CString::new(n).unwrap());
        p.ahead(vec![dir.clone()], names, true);
        wait_for(&p, 2);
        // A second job after the first, over two layers, listing only: the threads keep
        // serving.
        p.ahead(
            vec![dir.clone(), dir.clone()],
            [CString::new("a").unwrap()],
            false,
        );
        wait_for(&p, 4);
        // Nothing queued, nothing read (the symlink to a directory is not followed).
        p.ahead(vec![dir], [], true);
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(read(&p), 4);
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_subdirectory_is_read_up_to_what_is_wanted() {
        let base = scratch("b");
        std::fs::create_dir_all(base.join("s")).unwrap();
        for i in 0..10 {
            std::fs::write(base.join("s").join(i.to_string()), "").unwrap();
        }
        let dir = CachedDir::new(open_dir(&base));
        let s = CString::new("s").unwrap();
        // Listed only or statted too, entries count the same.
        for stats in [true, false] {
            assert_eq!(read_ahead(&dir, &s, 3, stats), Some(3), "stopped");
            assert_eq!(
                read_ahead(&dir, &s, 100, stats),
                Some(10),
                "all ten entries"
            );
            let none = CString::new("none").unwrap();
            assert_eq!(read_ahead(&dir, &none, 100, stats), None);
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn tasks_go_subdirectory_by_subdirectory_within_the_budget() {
        // No thread: only the queue is exercised.
        let p = Prefetcher::default();
        let (top, bottom) = (
            Arc::new(CachedDir::new(open_dir(&std::env::temp_dir()))),
            Arc::new(CachedDir::new(open_dir(&std::env::temp_dir()))),
        );
        let mut j = job(vec![top.clone(), bottom.clone()], &["x", "y"], false);
        j.budget = ENTRIES + 5;
        p.enqueue(j);
        let mut q = p.queue.lock().unwrap();
        let t = Prefetcher::take(&mut q).unwrap();
        assert_eq!((t.index, t.want), (0, ENTRIES));
        assert!(Arc::ptr_eq(&t.dir, &top), "x in every layer first");
        // Running tasks reserve nothing: the next one may read as much.
        let t2 = Prefetcher::take(&mut q).unwrap();
        assert_eq!((t2.index, t2.want), (0, ENTRIES));
        assert!(Arc::ptr_eq(&t2.dir, &bottom));
        drop(q);
        // What was read is spent.
        p.done(&t, Some(ENTRIES));
        p.done(&t2, None);
        let mut q = p.queue.lock().unwrap();
        let t3 = Prefetcher::take(&mut q).unwrap();
        assert_eq!((t3.index, t3.want), (1, 5), "what is left of the budget");
        drop(q);
        p.done(&t3, Some(5));
        let mut q = p.queue.lock().unwrap();
        assert!(
            Prefetcher::take(&mut q).is_none(),
            "budget spent: the job is done"
        );
        assert!(q.jobs.is_empty());
        drop(q);
        assert_eq!(
            read(&p),
            2,
            "the subdirectory that could not be opened is not counted"
        );
    }

    #[test]
    fn one_task_stats_at_a_time_and_listing_goes_on() {
        let p = Prefetcher::default();
        let dir = Arc::new(CachedDir::new(open_dir(&std::env::temp_dir())));
        p.enqueue(job(vec![dir.clone()], &["x", "y"], true));
        p.enqueue(job(vec![dir.clone()], &["a"], false));
        p.enqueue(job(vec![dir.clone()], &["z"], true));
        let mut q = p.queue.lock().unwrap();
        let t = Prefetcher::take(&mut q).unwrap();
        assert_eq!(t.kind, Kind::Stat);
        // Another thread passes the statting jobs by and lists.
        let l = Prefetcher::take(&mut q).unwrap();
        assert_eq!(l.kind, Kind::List);
        assert_eq!(&*l.subdirs[l.index], c"a");
        assert!(Prefetcher::take(&mut q).is_none(), "only statting left");
        drop(q);
        p.done(&l, Some(1));
        p.done(&t, Some(1));
        let mut q = p.queue.lock().unwrap();
        let t2 = Prefetcher::take(&mut q).unwrap();
        assert_eq!(t2.kind, Kind::Stat);
        assert_eq!(&*t2.subdirs[t2.index], c"y", "the oldest job first");
    }

    #[test]
    fn a_task_ended_by_a_panic_lets_statting_resume() {
        let p = Prefetcher::default();
        let dir = Arc::new(CachedDir::new(open_dir(&std::env::temp_dir())));
        p.enqueue(job(vec![dir], &["x", "y"], true));
        let task = Prefetcher::take(&mut p.queue.lock().unwrap()).unwrap();
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _running = Running {
                p: &p,
                task,
                seen: None,
            };
            panic!("reading failed");
        }));
        assert!(r.is_err());
        assert!(!p.queue.lock().unwrap().statting);
        assert!(Prefetcher::take(&mut p.queue.lock().unwrap()).is_some());
    }

    #[test]
    fn small_regular_files_are_read_ahead() {
        let base = scratch("d");
        std::fs::create_dir_all(base.join("sub")).unwrap();
        for i in 0..5 {
            std::fs::write(base.join(format!("f{i}")), "data").unwrap();
        }
        std::fs::write(base.join("empty"), "").unwrap();
        let big = std::fs::File::create(base.join("big")).unwrap();
        big.set_len(DATA_FILE_MAX + 1).unwrap();
        std::os::unix::fs::symlink("f0", base.join("link")).unwrap();
        let c = |p: &std::path::Path| CString::new(p.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: NUL-terminated paths.
        unsafe {
            assert_eq!(libc::mkfifo(c(&base.join("fifo")).as_ptr(), 0o600), 0);
            // /dev/null's numbers: an open would reach a driver.
            let null = libc::makedev(1, 3);
            assert_eq!(
                libc::mknod(c(&base.join("dev")).as_ptr(), libc::S_IFCHR | 0o600, null),
                0
            );
        }
        let dir = CachedDir::new(open_dir(&base));
        let fd = open_dir(&base);
        // Each name directly: only small regular files are read, and their read is started.
        for (name, read) in [
            ("f0", Some(4)),
            ("empty", None),
            ("big", None),
            ("link", None),
            ("fifo", None),
            ("dev", None),
            ("sub", None),
            ("gone", None),
        ] {
            let n = CString::new(name).unwrap();
            assert_eq!(data_ahead_of(&fd, &n, DATA_BYTES), read, "{name}");
        }
        assert_eq!(data_ahead_of(&fd, c"f0", 3), None, "no room left");
        // A whole directory: the five small files.
        assert_eq!(read_data_ahead(&dir, DATA_FILES), 5);
        for i in 0..4 {
            std::fs::write(base.join("sub").join(format!("g{i}")), "data").unwrap();
        }
        let sub = Arc::new(CachedDir::new(open_dir(&base.join("sub"))));
        assert_eq!(read_data_ahead(&sub, 2), 2, "bounded by the count wanted");
        assert_eq!(read_data_ahead(&sub, DATA_FILES), 4);
        // Through the queue.
        let p = Arc::new(Prefetcher::default());
        p.data_ahead(sub);
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.files.load(Ordering::Relaxed) < 4 {
            assert!(Instant::now() < deadline, "files read ahead by the threads");
            std::thread::sleep(Duration::from_millis(5));
        }
        std::fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn different_files_opened_in_a_row_in_a_directory_count() {
        let w = Prefetcher::default();
        let run = |pid, dir, files: std::ops::Range<u64>| {
            files.map(|f| w.opened(pid, dir, f)).collect::<Vec<_>>()
        };
        let n = OPENS_IN_A_ROW as usize;
        let mut want = vec![false; n + 2];
        want[n - 1] = true;
        assert_eq!(run(7, 10, 0..n as u64 + 2), want, "once, at the count");
        // The same file again and again is one file.
        assert!((0..2 * n).all(|_| !w.opened(8, 10, 1)));
        assert!(!w.opened(8, 10, 2), "the second");
        // Another directory starts a new run; other processes do not interfere.
        assert!(!w.opened(7, 11, 0));
        assert_eq!(run(9, 11, 0..n as u64), want[..n]);
        assert_eq!(
            run(7, 10, 0..n as u64),
            want[..n],
            "a new run after another directory"
        );
    }

    #[test]
    fn a_directory_is_read_ahead_for_once_while_recent() {
        let p = Prefetcher::default();
        assert!(p.fresh(1, false));
        assert!(!p.fresh(1, false));
        assert!(p.fresh(1, true), "its files apart from its subdirectories");
        assert!(!p.fresh(1, true));
        for s in 2..(2 + RECENT as u64) {
            assert!(p.fresh(s, false));
        }
        assert!(p.fresh(1, false), "forgotten after RECENT others");
        assert!(!p.fresh(1, true), "listings do not push out files");
    }

    #[test]
    fn the_queue_keeps_the_newest_jobs() {
        // No thread: only the queue is exercised.
        let p = Prefetcher::default();
        let dir = Arc::new(CachedDir::new(open_dir(&std::env::temp_dir())));
        for i in 0..(JOBS + 3) {
            p.enqueue(job(vec![dir.clone()], &[&format!("d{i}")], true));
        }
        let q = p.queue.lock().unwrap();
        assert_eq!(q.jobs.len(), JOBS);
        assert_eq!(q.jobs.front().unwrap().subdirs[0].to_str().unwrap(), "d3");
        assert_eq!(
            q.jobs.back().unwrap().subdirs[0].to_str().unwrap(),
            format!("d{}", JOBS + 2)
        );
    }

    /// A new empty directory of this test process.
    fn scratch(tag: &str) -> std::path::PathBuf {
        let base = std::env::temp_dir().join(format!("um-prefetch-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(&base).unwrap();
        base
    }

    fn open_dir(p: &std::path::Path) -> std::os::fd::OwnedFd {
        std::fs::File::open(p).unwrap().into()
    }
}
