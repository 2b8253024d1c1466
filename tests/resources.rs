//! Resource bounds of the daemon (SPEC §5, §6): walking a large tree and opening files many
//! times leaves its open file count and its resident memory bounded, and a second identical
//! pass does not grow them.
//!
//! The daemon's figures come from `/proc/PID/fd` and `/proc/PID/status` (VmRSS) of the one
//! process serving the test's mount. The bounds:
//!
//! * open fds after the work <= fds at start + the directory-fd cache (`fdcache`: a quarter of
//!   the daemon's soft `RLIMIT_NOFILE`, clamped to 32..16384, in 16 LRU shards) + a small
//!   slack for releases the kernel has not sent yet;
//! * VmRSS < 64 MiB (`UNIONMOUNT_RES_RSS_MIB` changes it), and the second pass ends at most
//!   8 MiB above the first;
//! * the second pass, made after the kernel was told to drop its dentry and inode caches (so
//!   it forgets the mount's inodes and looks them up again), ends with at most 32 more fds
//!   than the first.
//!
//! The default is the short form (60,000 files, 20,000 open/close cycles). The long form, one
//! million files and 100,000 cycles:
//!
//! ```text
//! UNIONMOUNT_RES_FILES=1000000 UNIONMOUNT_RES_CYCLES=100000 cargo test --release --test resources -- --nocapture
//! ```

mod common;

use common::*;

use std::fs;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Files per directory of the generated tree.
const PER_DIR: usize = 500;

/// The one live unionmount process serving `merged`: its executable is the built binary and
/// one of its arguments is the (unique, temporary) mountpoint.
fn daemon_pid(merged: &Path) -> i32 {
    let bin = fs::canonicalize(BIN).unwrap();
    let want = merged.as_os_str().as_encoded_bytes();
    let mut found = Vec::new();
    for e in fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let base = e.path();
        if fs::read_link(base.join("exe")).ok().as_ref() != Some(&bin) {
            continue;
        }
        let Ok(cmd) = fs::read(base.join("cmdline")) else {
            continue;
        };
        if !cmd.split(|&b| b == 0).any(|a| a == want) {
            continue;
        }
        let stat = fs::read_to_string(base.join("stat")).unwrap_or_default();
        let state = stat.rsplit_once(") ").and_then(|(_, r)| r.chars().next());
        if matches!(state, Some('Z' | 'X') | None) {
            continue;
        }
        found.push(pid);
    }
    assert_eq!(
        found.len(),
        1,
        "one daemon serves {}: {found:?}",
        merged.display()
    );
    found[0]
}

/// The paths a process holds open more than `max` times each, most duplicated first.
fn duplicated_fds(pid: i32, max: usize) -> Vec<(usize, String)> {
    let mut count = std::collections::BTreeMap::<String, usize>::new();
    for e in fs::read_dir(format!("/proc/{pid}/fd")).unwrap().flatten() {
        if let Ok(t) = fs::read_link(e.path()) {
            *count.entry(t.to_string_lossy().into_owned()).or_default() += 1;
        }
    }
    let mut v: Vec<(usize, String)> = count
        .into_iter()
        .filter(|(p, n)| *n > max && p.starts_with('/') && !p.starts_with("/dev/"))
        .map(|(p, n)| (n, p))
        .collect();
    v.sort_by(|a, b| b.cmp(a));
    v.truncate(5);
    v
}

/// Makes the kernel drop its unused dentries and inodes, so that it forgets the mount's
/// inodes and the next pass looks everything up afresh (as it does on a busy machine).
fn drop_kernel_caches() {
    match fs::write("/proc/sys/vm/drop_caches", "2") {
        Ok(()) => eprintln!("resources: dropped the kernel's dentry and inode caches"),
        Err(e) => {
            eprintln!("resources: cannot drop the kernel's caches ({e}); not forcing forgets")
        }
    }
}

/// Open fds and VmRSS (KiB) of a process.
fn measure(pid: i32) -> (usize, u64) {
    let fds = fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap_or_else(|e| panic!("the daemon {pid} is gone: {e}"))
        .count();
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    (fds, rss)
}

/// The most directory fds the daemon's cache may hold, from its own soft fd limit (the rule
/// of `FdCache::default_capacity` and `FdCache::new`).
fn fd_cache_bound(pid: i32) -> usize {
    let limits = fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let soft: u64 = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .and_then(|v| v.parse().ok())
        .expect("Max open files in /proc/PID/limits");
    let capacity = (soft / 4).clamp(256, 16384) as usize;
    (capacity / 16).max(4) * 16
}

/// Creates `n` files in `root/t/dNNNN/fNNN`, `PER_DIR` per directory; every tenth holds a
/// few bytes, the rest are empty.
fn generate(root: &Path, n: usize) -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for i in 0..n {
        let (d, f) = (i / PER_DIR, i % PER_DIR);
        if f == 0 {
            let dir = root.join(format!("t/d{d:04}"));
            fs::create_dir_all(&dir).unwrap();
            dirs.push(dir);
        }
        let p = root.join(format!("t/d{d:04}/f{f:03}"));
        let mut file = fs::File::create(&p).unwrap();
        if f % 10 == 0 {
            file.write_all(b"lower content").unwrap();
        }
    }
    dirs
}

/// lstat of every entry and a readdir of every directory, through the mount; returns the
/// number of entries seen.
fn walk(p: &Path) -> usize {
    let mut n = 0;
    let mut stack = vec![p.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).unwrap_or_else(|e| panic!("readdir {}: {e}", d.display())) {
            let e = e.unwrap();
            let m = fs::symlink_metadata(e.path())
                .unwrap_or_else(|err| panic!("lstat {}: {err}", e.path().display()));
            n += 1;
            if m.is_dir() {
                stack.push(e.path());
            }
        }
    }
    n
}

/// `cycles` open/close cycles over a spread of files: lower files read-only, upper files
/// read-write, lower files opened for writing (a copy-up the first time), and directories.
fn cycles(m: &Mount, n_files: usize, cycles: u64) {
    let ndirs = n_files.div_ceil(PER_DIR);
    let mut buf = [0u8; 64];
    for i in 0..cycles as usize {
        let spread = i.wrapping_mul(7919) % n_files;
        let lower_rel = format!("t/d{:04}/f{:03}", spread / PER_DIR, spread % PER_DIR);
        match i % 5 {
            0 | 1 => {
                let mut f = fs::File::open(m.path(&lower_rel)).unwrap();
                let _ = f.read(&mut buf).unwrap();
            }
            2 => {
                let rel = format!("up/u{:03}", i % 200);
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.path(&rel))
                    .unwrap();
                f.seek(SeekFrom::Start((i % 64) as u64)).unwrap();
                f.write_all(b"w").unwrap();
            }
            3 => {
                // Copy-up of at most 500 distinct lower files, then writes to the copies.
                let k = (i / 5) % 500;
                let rel = format!("t/d{:04}/f{:03}", k % ndirs, (k * 13) % PER_DIR);
                let mut f = fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(m.path(&rel))
                    .unwrap_or_else(|e| panic!("open {rel} for writing: {e}"));
                f.write_all(b"x").unwrap();
            }
            _ => {
                let d = format!("t/d{:04}", spread / PER_DIR);
                let mut it = fs::read_dir(m.path(&d)).unwrap();
                assert!(it.next().is_some());
            }
        }
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

#[test]
fn fds_and_memory_stay_bounded_over_a_large_tree() {
    let n_files = (env_num("UNIONMOUNT_RES_FILES", 60_000) as usize)
        .div_ceil(PER_DIR)
        .max(1)
        * PER_DIR;
    let n_cycles = env_num("UNIONMOUNT_RES_CYCLES", 20_000);
    let rss_limit_mib = env_num("UNIONMOUNT_RES_RSS_MIB", 64);

    let l = Layers::new(2);
    let t0 = Instant::now();
    let dirs = generate(&l.lowers[0], n_files);
    eprintln!(
        "resources: generated {n_files} files in {} directories in {:.1?}",
        dirs.len(),
        t0.elapsed()
    );
    l.lower(1).file("t/below", "from lower1").dir("t/d0000");
    // Upper files (read-write targets), made before the mount.
    let upper_up = l.root().join("m/upper/up");
    fs::create_dir_all(&upper_up).unwrap();
    for i in 0..200 {
        fs::write(upper_up.join(format!("u{i:03}")), "upper content").unwrap();
    }

    let m = l.mount("m");
    let pid = daemon_pid(&m.merged);
    let cache_bound = fd_cache_bound(pid);
    let (fd0, rss0) = measure(pid);
    eprintln!(
        "resources: daemon {pid}: start: {fd0} fds, VmRSS {:.1} MiB (fd cache bound {cache_bound})",
        mib(rss0)
    );
    let fd_limit = fd0 + cache_bound + 64;
    // The walk then starts with the daemon's housekeeping asleep: passing the table's bound
    // must wake it.
    assert!(
        settles(pid, Duration::from_millis(1500), Duration::from_secs(20)),
        "the daemon of an unused mount never stayed asleep"
    );

    let mut after = Vec::new();
    for pass in 1..=2 {
        if pass == 2 {
            drop_kernel_caches();
        }
        let t = Instant::now();
        let seen = walk(&m.merged);
        // Files, their directories, t/, t/below, up/ and its files.
        assert_eq!(
            seen,
            n_files + dirs.len() + 1 + 1 + 1 + 200,
            "pass {pass}: entries seen by the walk"
        );
        let (fdw, rssw) = measure(pid);
        eprintln!(
            "resources: pass {pass}: after walking {seen} entries ({:.1?}): {fdw} fds, VmRSS {:.1} MiB",
            t.elapsed(),
            mib(rssw)
        );
        let t = Instant::now();
        cycles(&m, n_files, n_cycles);
        // The kernel sends RELEASE asynchronously: give the last ones a moment to arrive
        // (a deadline against a stuck daemon, not a timing assertion).
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut fdc, mut rssc) = measure(pid);
        while fdc > fd_limit && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            (fdc, rssc) = measure(pid);
        }
        eprintln!(
            "resources: pass {pass}: after {n_cycles} open/close cycles ({:.1?}): {fdc} fds, VmRSS {:.1} MiB",
            t.elapsed(),
            mib(rssc)
        );
        assert!(
            fdw <= fd_limit && fdc <= fd_limit,
            "pass {pass}: the daemon holds {fdw} fds after the walk and {fdc} after the cycles; \
             at most {fd0} at start + {cache_bound} cached directories + 64"
        );
        for (what, rss) in [("walk", rssw), ("cycles", rssc)] {
            assert!(
                rss < rss_limit_mib * 1024,
                "pass {pass}: VmRSS {:.1} MiB after the {what}, over {rss_limit_mib} MiB",
                mib(rss)
            );
        }
        after.push((fdc, rssc));
    }
    let ((fd1, rss1), (fd2, rss2)) = (after[0], after[1]);
    assert!(
        rss2 <= rss1 + 8 * 1024,
        "VmRSS grew on an identical second pass: {:.1} MiB -> {:.1} MiB",
        mib(rss1),
        mib(rss2)
    );
    // A directory the kernel has forgotten is looked up again as a new node; the fds cached
    // for the old node must not stay behind, so the second pass holds no more than the first.
    assert!(
        fd2 <= fd1 + 32,
        "open fds grew on an identical second pass: {fd1} -> {fd2}; held open more than twice: {:?}",
        duplicated_fds(pid, 2)
    );
    // The copies made by the cycles are in the upper layer, and the mount still answers.
    assert!(m.upper_path("t").is_dir());
    assert_eq!(m.read("t/below"), "from lower1");
    assert!(fs::metadata(&m.merged).unwrap().ino() > 0);
    eprintln!(
        "resources: summary: fds {fd0} -> {fd1} -> {fd2}, VmRSS {:.1} -> {:.1} -> {:.1} MiB",
        mib(rss0),
        mib(rss1),
        mib(rss2)
    );
}

/// Context switches so far of every thread of a process: how often its threads woke up.
fn wakeups(pid: i32) -> u64 {
    let mut sum = 0;
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let status = fs::read_to_string(t.path().join("status")).unwrap_or_default();
        sum += status
            .lines()
            .filter(|l| l.contains("ctxt_switches:"))
            .filter_map(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .sum::<u64>();
    }
    sum
}

/// Waits, for at most `bound`, until none of the process's threads wakes up for a whole
/// `quiet` (the daemon's housekeeping ticks every half second while there is work).
fn settles(pid: i32, quiet: Duration, bound: Duration) -> bool {
    let end = Instant::now() + bound;
    while Instant::now() < end {
        let before = wakeups(pid);
        std::thread::sleep(quiet);
        if wakeups(pid) == before {
            return true;
        }
    }
    false
}

#[test]
fn an_idle_daemon_sleeps_and_still_does_the_work_requests_leave() {
    let l = Layers::new(1);
    let big = "x".repeat(300 * 1024);
    for i in 0..20 {
        l.lower(0).file(&format!("d{i:02}/f"), &big);
    }
    // The page-cached path: reads go through the daemon's pooled buffers.
    let m = l.mount_with("m", &["--passthrough", "off"]);
    let pid = daemon_pid(&m.merged);
    let quiet = Duration::from_millis(1500);
    let bound = Duration::from_secs(20);
    assert!(
        settles(pid, quiet, bound),
        "a fresh mount's daemon never stayed asleep for {quiet:?}"
    );
    let fds0 = measure(pid).0;
    for i in 0..20 {
        assert_eq!(m.ls(&format!("d{i:02}")), ["f"]);
        assert_eq!(m.read(&format!("d{i:02}/f")).len(), big.len());
    }
    let listed = measure(pid).0;
    assert!(
        listed >= fds0 + 20,
        "listing 20 directories left {listed} fds open, from {fds0}: the test needs their fds cached"
    );
    assert!(
        settles(pid, quiet, bound),
        "after reads and listings the daemon never stayed asleep for {quiet:?}"
    );
    // Forgotten directories' fds are closed by the housekeeping thread, which sleeps now:
    // the kernel's forgets must wake it.
    drop_kernel_caches();
    assert!(
        wait_until(Duration::from_secs(10), || measure(pid).0 <= fds0 + 4),
        "the daemon still holds {} fds after the kernel forgot the directories it listed ({fds0} before, {listed} after listing)",
        measure(pid).0
    );
    assert!(
        settles(pid, quiet, bound),
        "after the forgets the daemon never stayed asleep for {quiet:?}"
    );
    assert_eq!(m.read("d00/f").len(), big.len());
}

/// Makes `depth` nested directories `d` under `top` with `*at` calls (the paths outgrow
/// PATH_MAX) and returns an fd of the bottom one.
fn deep_chain(top: &Path, depth: usize) -> std::os::fd::OwnedFd {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    fs::create_dir(top).unwrap();
    let mut fd = OwnedFd::from(fs::File::open(top).unwrap());
    for level in 0..depth {
        // SAFETY: fd is open, the name is a NUL-terminated literal.
        let made = unsafe { libc::mkdirat(fd.as_raw_fd(), c"d".as_ptr(), 0o755) };
        assert_eq!(
            made,
            0,
            "mkdir at level {level}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: as above; the result is checked before it is owned.
        let next = unsafe {
            libc::openat(
                fd.as_raw_fd(),
                c"d".as_ptr(),
                libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC,
            )
        };
        assert!(
            next >= 0,
            "open at level {level}: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh fd nobody else owns.
        fd = unsafe { OwnedFd::from_raw_fd(next) };
    }
    fd
}

/// The daemon reopens the directory fds its cache dropped from the top down, not by one
/// nested call per level: a lookup and a create at the bottom of a chain of thousands of
/// directories, made after a walk down another chain evicted the first one's fds, used to
/// overflow the serving thread's stack and abort the daemon (the whole mount gone). Layer
/// content may nest that deep, and so may anyone who can write to the mount.
#[test]
fn a_request_below_thousands_of_evicted_directories_is_served() {
    use std::os::fd::AsRawFd;
    let l = Layers::new(1);
    // Declared before the mount, so dropped after it, also when an assertion fails.
    let trees = DeepTrees(vec![l.root().join("m/upper/a"), l.root().join("m/upper/b")]);
    let m = l.mount("m");
    let pid = daemon_pid(&m.merged);
    let depth = fd_cache_bound(pid) * 3 / 2;
    let a = deep_chain(&m.path("a"), depth);
    let b = deep_chain(&m.path("b"), depth);
    drop(b);
    // SAFETY: a stat buffer is plain data; all zeros is a valid value.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: a is an open directory fd, st is a valid out-buffer.
    let r = unsafe { libc::fstatat(a.as_raw_fd(), c"missing".as_ptr(), &mut st, 0) };
    let e = std::io::Error::last_os_error().raw_os_error();
    assert_eq!(
        (r, e),
        (-1, Some(libc::ENOENT)),
        "lookup at the bottom of {depth} levels"
    );
    // SAFETY: as above; the result is checked.
    let f = unsafe {
        libc::openat(
            a.as_raw_fd(),
            c"f".as_ptr(),
            libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(
        f >= 0,
        "create at the bottom: {}",
        std::io::Error::last_os_error()
    );
    // SAFETY: f was just opened by us.
    unsafe { libc::close(f) };
    assert!(m.path("").metadata().is_ok(), "the mount still answers");
    drop(a);
    drop(m);
    assert!(trees.remove(), "rm -rf of the deep trees");
}

/// Trees too deep for the temporary directory's removal (std's `remove_dir_all` recurses per
/// level), removed with `rm -rf` when dropped (once the mount over them is gone).
struct DeepTrees(Vec<PathBuf>);

impl DeepTrees {
    fn remove(&self) -> bool {
        self.0.iter().all(|t| {
            std::process::Command::new("rm")
                .arg("-rf")
                .arg(t)
                .status()
                .is_ok_and(|s| s.success())
        })
    }
}

impl Drop for DeepTrees {
    fn drop(&mut self) {
        self.remove();
    }
}

/// A lower directory `big` of `n` empty files with 106-byte names.
fn big_lower_dir(l: &Layers, n: usize) {
    let big = l.lower(0).path("big");
    fs::create_dir(&big).unwrap();
    let long = "n".repeat(100);
    for i in 0..n {
        fs::File::create(big.join(format!("{long}{i:06}"))).unwrap();
    }
}

/// Opens the directory `p` and reads its first entries (so that the daemon lists it).
fn stream(p: &Path) -> fs::File {
    use std::os::fd::AsRawFd;
    let d = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: one getdents64 into a buffer we own, on a directory fd we hold.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            d.as_raw_fd(),
            buf.as_mut_ptr(),
            buf.len(),
        )
    };
    assert!(n > 0, "getdents: {}", std::io::Error::last_os_error());
    d
}

/// Every open stream of a directory too large for the listing cache shares one listing: each
/// used to build and keep its own, so a user holding many streams of a large directory
/// could make the daemon's memory grow without bound (100 streams of 100,000 long names: 2.6
/// GB).
#[test]
fn streams_of_a_large_directory_share_one_listing() {
    let l = Layers::new(1);
    big_lower_dir(&l, 20_000);
    let m = l.mount("m");
    let pid = daemon_pid(&m.merged);
    let stream = || stream(&m.path("big"));
    let mut held = vec![stream()];
    let (_, one) = measure(pid);
    for _ in 0..40 {
        held.push(stream());
    }
    let (_, all) = measure(pid);
    eprintln!("resources: RSS with 1 stream {one} KiB, with 41: {all} KiB");
    assert!(
        all < one + 24 * 1024,
        "41 streams of a 20,000-entry directory took {} KiB more than one",
        all - one
    );
}

/// Streams of one directory opened at the same moment share one listing, built once: each
/// request thread used to build its own (four listers of a 300,000-entry directory peaked at
/// 125 MiB, one build at 33 MiB).
#[test]
fn listings_asked_for_at_once_are_built_once() {
    let l = Layers::new(1);
    big_lower_dir(&l, 50_000);
    let base = l.mkdir("fg");
    let mut d = ForegroundDaemon::start(&l, &base, &["--threads", "8", "--log-level", "debug"]);
    let big = d.merged.join("big");
    let start = std::sync::Barrier::new(8);
    let held: Vec<fs::File> = std::thread::scope(|s| {
        let streams: Vec<_> = (0..8)
            .map(|_| {
                s.spawn(|| {
                    start.wait();
                    stream(&big)
                })
            })
            .collect();
        streams.into_iter().map(|t| t.join().unwrap()).collect()
    });
    let log = d.log();
    let builds = log.matches("built: 50000 entries").count();
    assert_eq!(builds, 1, "listings built for 8 streams opened at once");
    drop(held);
    d.unmount().unwrap();
}

/// Under a low hard open-file limit the daemon's directory-fd cache leaves room for the files
/// its callers open: a walk that opens every directory and file of a tree wider than the
/// limit gets no EMFILE (with a cache floor of 256, a limit of 256 failed hundreds of opens).
#[test]
fn a_low_open_file_limit_leaves_room_for_callers() {
    let l = Layers::new(1);
    for i in 0..400 {
        l.lower(0).file(&format!("d{i:03}/f"), "x");
    }
    for limit in ["128", "256"] {
        // Without CAP_SYS_RESOURCE, so that the daemon keeps the hard limit it is given
        // (see `the_daemon_takes_the_most_open_files_it_may`).
        let (merged, _m) = mount_under(
            &l,
            &format!("m{limit}"),
            &[
                "setpriv",
                "--bounding-set",
                "-sys_resource",
                "--",
                "prlimit",
            ],
            &format!("--nofile={limit}:{limit}"),
            &[],
        );
        let mut failed = Vec::new();
        for i in 0..400 {
            let d = merged.join(format!("d{i:03}"));
            match fs::read_dir(&d).map(|r| r.count()) {
                Ok(1) => {}
                other => failed.push(format!("{}: {other:?}", d.display())),
            }
            if let Err(e) = fs::read_to_string(d.join("f")) {
                failed.push(format!("{}/f: {e}", d.display()));
            }
        }
        assert!(
            failed.is_empty(),
            "limit {limit}: {} failures: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
    }
}

/// Read-only opens of one lower file share one descriptor of the daemon (a library of the
/// image mapped by every process of a container holds an open of it in each): under a hard
/// limit of 128, a thousand read-only opens of a lower file held at once all succeed, the
/// daemon holds only a few more fds than before them, and other files still open and create
/// meanwhile; on both data paths. So do the kernel's opens of an upper program that 300
/// processes run at once. With passthrough, so do 300 reopens through
/// `/proc/self/fd` of an open made before the file's copy-up (its node split: they pass
/// through to the lower file). Before, each open held a descriptor: the 113th open failed
/// with EMFILE, and so did every open on the mount while they were held.
#[test]
fn read_only_opens_of_a_lower_file_and_runs_of_a_program_share_a_descriptor() {
    let l = Layers::new(1);
    l.lower(0).file("lib.so", "lower data");
    l.lower(0).file("split", "split data");
    let paths: [&[&str]; 2] = [&[], &["--passthrough", "off"]];
    for (i, extra) in paths.into_iter().enumerate() {
        let (merged, _m) = mount_under(
            &l,
            &format!("m{i}"),
            &[
                "setpriv",
                "--bounding-set",
                "-sys_resource",
                "--",
                "prlimit",
            ],
            "--nofile=128:128",
            extra,
        );
        let pid = daemon_pid(&merged);
        // The daemon's directory fds for the path are opened by the first open.
        assert_eq!(
            fs::read_to_string(merged.join("lib.so")).unwrap(),
            "lower data"
        );
        let (before, _) = measure(pid);
        let mut held = Vec::new();
        for n in 0..1000 {
            let mut f = fs::File::open(merged.join("lib.so"))
                .unwrap_or_else(|e| panic!("{extra:?}: open #{n}: {e}"));
            if n % 250 == 0 {
                let mut s = String::new();
                f.read_to_string(&mut s).unwrap();
                assert_eq!(s, "lower data", "{extra:?}: #{n}");
            }
            held.push(f);
        }
        let (during, _) = measure(pid);
        assert!(
            during <= before + 4,
            "{extra:?}: the daemon holds {during} fds with 1,000 opens of one file, {before} before"
        );
        for n in 0..50 {
            let f = merged.join(format!("other{n}"));
            fs::write(&f, "x").unwrap_or_else(|e| panic!("{extra:?}: create {n}: {e}"));
            assert_eq!(fs::read_to_string(&f).unwrap(), "x");
        }
        drop(held);
        // A program of the upper run by many processes: the kernel's opens to run it share.
        let prog = merged.join(format!("prog{i}"));
        fs::copy("/bin/sleep", &prog).unwrap();
        let mut running = Vec::new();
        for n in 0..300 {
            match std::process::Command::new(&prog).arg("30").spawn() {
                Ok(c) => running.push(KillOnDrop(c)),
                Err(e) => panic!("{extra:?}: run #{n} of {}: {e}", prog.display()),
            }
        }
        let (during, _) = measure(pid);
        drop(running);
        assert!(
            during <= before + 8,
            "{extra:?}: the daemon holds {during} fds with 300 runs of one program, {before} before"
        );
        if extra.is_empty() {
            let split = merged.join("split");
            let first = fs::File::open(&split).unwrap();
            fs::set_permissions(&split, fs::Permissions::from_mode(0o600)).unwrap();
            let _after = fs::File::open(&split).unwrap();
            let via = format!("/proc/self/fd/{}", first.as_raw_fd());
            let reopened: Vec<fs::File> = (0..300)
                .map(|n| {
                    fs::File::open(&via).unwrap_or_else(|e| panic!("reopen #{n} of {via}: {e}"))
                })
                .collect();
            let mut s = String::new();
            (&reopened[299]).read_to_string(&mut s).unwrap();
            assert_eq!(s, "split data");
        }
    }
}

/// Mounts the layers of `l` on `name`'s directories with the daemon started through
/// `wrapper` (a command and its arguments, `prlimit` last) given `limit`, with `extra`
/// options; returns the merged directory and the mount, which unmounts when dropped.
fn mount_under(
    l: &Layers,
    name: &str,
    wrapper: &[&str],
    limit: &str,
    extra: &[&str],
) -> (PathBuf, Mount) {
    let (upper, work, merged) = l.mount_dirs(name);
    let out = std::process::Command::new(wrapper[0])
        .args(&wrapper[1..])
        .arg(limit)
        .arg(BIN)
        .args(extra)
        .args(native_args(
            &l.lower_paths(),
            Some(&upper),
            Some(&work),
            &merged,
        ))
        .output()
        .unwrap();
    let m = is_mounted(&merged).then(|| Mount::adopt(merged.clone(), None, None, Kind::Union));
    assert!(out.status.success(), "mount under {limit}: {out:?}");
    (merged, m.expect("mounted"))
}

/// Every file open through the view holds one of the daemon's descriptors, so the daemon
/// takes the most open files it may: the kernel's ceiling (`fs.nr_open`) where it may raise
/// its hard limit (CAP_SYS_RESOURCE), else its hard limit. Started with a soft limit of 256,
/// it serves 1,000 files held open at once.
#[test]
fn the_daemon_takes_the_most_open_files_it_may() {
    let l = Layers::new(1);
    let (merged, _m) = mount_under(&l, "m", &["prlimit"], "--nofile=256:20000", &[]);
    let limits = fs::read_to_string(format!("/proc/{}/limits", daemon_pid(&merged))).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<u64> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    let nr_open: u64 = fs::read_to_string("/proc/sys/fs/nr_open")
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // CAP_SYS_RESOURCE is capability 24.
    let status = fs::read_to_string("/proc/self/status").unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let want = if eff & (1 << 24) != 0 { nr_open } else { 20000 };
    assert_eq!(nums, [want, want], "{line}");
    let files: Vec<fs::File> = (0..1000)
        .map(|i| {
            fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(merged.join(format!("f{i}")))
                .unwrap_or_else(|e| panic!("open #{i}: {e}"))
        })
        .collect();
    assert_eq!(files.len(), 1000);
}

/// Memory the daemon freed goes back to the system once it is idle: after twenty streams of
/// a large directory, each with a listing of its own (the directory changes between opens),
/// are closed, the idle daemon's resident memory is small again (the allocator kept half the
/// peak, 70-90 MiB, for good).
#[test]
fn an_idle_daemon_gives_back_what_it_freed() {
    let l = Layers::new(1);
    big_lower_dir(&l, 30_000);
    let m = l.mount("m");
    let pid = daemon_pid(&m.merged);
    let mut held = Vec::new();
    for i in 0..20 {
        let mut d = fs::read_dir(m.path("big")).unwrap();
        d.next().unwrap().unwrap();
        held.push(d);
        fs::write(m.path(&format!("big/x{i}")), "").unwrap();
    }
    let (_, peak) = measure(pid);
    drop(held);
    assert!(
        settles(pid, Duration::from_millis(1500), Duration::from_secs(20)),
        "the daemon never went idle"
    );
    let (_, idle) = measure(pid);
    eprintln!("resources: RSS with 20 listings {peak} KiB, idle after {idle} KiB");
    assert!(
        idle < 24 * 1024,
        "idle after 20 listings of 30,000 entries: {idle} KiB (peak {peak} KiB)"
    );
}
