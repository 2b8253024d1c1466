//! Data integrity (SPEC §3, §5): a file's bytes through the mount always match a model of
//! what was written, on both I/O paths (passthrough and the page-cached path), whatever mix
//! of writes, reads, mappings, truncations, `fallocate`, `copy_file_range`, direct I/O,
//! dropped caches and reopenings leads there; after unmounting, the upper copy holds exactly
//! those bytes and the lower file is unchanged.
//!
//! Each seed starts from a file of random size and bytes in the lower layer and sends a
//! seeded random sequence of operations through up to three descriptors. After every
//! operation that changes the file the model changes with it; every read, of any kind,
//! compares. A mismatch prints the seed, the operations that led there and the first byte
//! that differs. The long form:
//!
//! ```text
//! UNIONMOUNT_FSX_SEEDS=1-200 UNIONMOUNT_FSX_OPS=5000 cargo test --release --test data_integrity -- --nocapture
//! ```
//!
//! `UNIONMOUNT_FSX_SEEDS` takes ranges and lists as the differential test's seeds (default
//! `1-3`), `UNIONMOUNT_FSX_OPS` the operations per seed (default 1500).

mod common;

use common::{Layers, Mount, Rng, Tmpfs, parse_seeds};
use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};

/// Largest offset an operation reaches (the file stays below it).
const SPAN: u64 = 1 << 21;
/// Descriptors open on the file at once.
const FDS: usize = 3;
const PAGE: u64 = 4096;

/// One operation; `usize` fields are descriptor slots.
#[derive(Clone, Debug)]
enum Op {
    /// slot, read-only, `O_TRUNC`, `O_DIRECT`
    Open(usize, bool, bool, bool),
    Close(usize),
    /// slot, offset, length, seed of the bytes
    Write(usize, u64, u64, u64),
    /// slot, length, seed: a write through a descriptor opened `O_APPEND` for it
    Append(u64, u64),
    Read(usize, u64, u64),
    /// offset, length: through a shared read-only mapping of a new descriptor
    MapRead(u64, u64),
    /// slot, offset, length, seed, `msync` before unmapping
    MapWrite(usize, u64, u64, u64, bool),
    Truncate(usize, u64),
    /// `truncate(2)` by the file's name
    TruncatePath(u64),
    /// slot, mode, offset, length
    Fallocate(usize, i32, u64, u64),
    /// slot, from the other lower file (else from this file), source offset, offset, length
    CopyRange(usize, bool, u64, u64, u64),
    /// slot, `fdatasync` instead of `fsync`
    Sync(usize, bool),
    /// slot: `POSIX_FADV_DONTNEED` over the whole file
    DropCache(usize),
    Stat(usize),
    /// The whole file, read through a new descriptor.
    ReadAll,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}

/// The bytes a write puts down: a function of its seed, so a report can be replayed.
fn pattern(seed: u64, len: u64) -> Vec<u8> {
    let mut r = Rng(seed);
    let mut v = Vec::with_capacity(len as usize);
    while (v.len() as u64) < len {
        v.extend_from_slice(&r.next().to_le_bytes());
    }
    v.truncate(len as usize);
    v
}

/// An offset or length: mostly small and unaligned, sometimes page-aligned, sometimes large.
fn amount(r: &mut Rng, max: u64) -> u64 {
    let v = match r.below(10) {
        0..=4 => r.below(300),
        5..=6 => r.below(3 * PAGE),
        7 => r.below(64) * PAGE,
        _ => r.below(max),
    };
    v.min(max)
}

/// An offset, near the end of the file half of the time.
fn offset(r: &mut Rng, size: u64) -> u64 {
    let o = if r.percent(50) && size > 0 {
        let back = amount(r, size);
        let fwd = if r.percent(30) {
            amount(r, 4 * PAGE)
        } else {
            0
        };
        size - back + fwd
    } else {
        r.below(size + 2 * PAGE)
    };
    o.min(SPAN - 1)
}

/// An open descriptor of the file.
struct Fd {
    file: File,
    read_only: bool,
    /// `O_DIRECT`: its reads and writes are aligned to pages, from page-aligned buffers
    /// (unaligned direct writes are refused, and ext4 may have stored part of one before
    /// it refuses the rest).
    direct: bool,
}

struct Case {
    seed: u64,
    /// `O_DIRECT` opens (alignment rules of the upper's filesystem)
    direct: bool,
    ops: Vec<Op>,
    model: Vec<u8>,
    /// the other lower file, a source for `copy_file_range`
    other: Vec<u8>,
    fds: [Option<Fd>; FDS],
    copied_up: bool,
    /// Whether descriptors opened before the copy-up read the copy after it.
    readers_across_copy_up: bool,
    /// what is mounted, for the report
    label: &'static str,
}

impl Case {
    fn fail(&self, what: String) -> ! {
        let from = self.ops.len().saturating_sub(25);
        let mut s = format!(
            "data_integrity seed {} ({}): {what}\nlast operations (from #{from}):\n",
            self.seed, self.label
        );
        for (i, op) in self.ops.iter().enumerate().skip(from) {
            s.push_str(&format!("  #{i} {op}\n"));
        }
        panic!("{s}");
    }

    /// Compares `got`, read at `off` after asking for `asked` bytes, with the model.
    fn compare(&self, what: &str, off: u64, asked: u64, got: &[u8]) {
        let size = self.model.len() as u64;
        let end = (off + asked).min(size).max(off.min(size));
        let want = &self.model[off.min(size) as usize..end as usize];
        if got != want {
            let at = got.iter().zip(want).position(|(a, b)| a != b);
            self.fail(format!(
                "{what} of {asked} bytes at {off}: {} bytes read, {} expected (file size \
                 {size}); first difference at byte {:?}",
                got.len(),
                want.len(),
                at.map(|a| off + a as u64)
            ));
        }
    }

    fn store(&mut self, off: u64, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let end = off as usize + data.len();
        if self.model.len() < end {
            self.model.resize(end, 0);
        }
        self.model[off as usize..end].copy_from_slice(data);
    }

    /// A slot with an open descriptor, writable if asked.
    fn open_slot(&self, r: &mut Rng, writable: bool) -> Option<usize> {
        let open: Vec<usize> = (0..FDS)
            .filter(|&s| matches!(&self.fds[s], Some(f) if !writable || !f.read_only))
            .collect();
        (!open.is_empty()).then(|| *r.pick(&open))
    }

    fn generate(&self, r: &mut Rng) -> Op {
        let size = self.model.len() as u64;
        let slot = r.index(FDS);
        if !self.copied_up {
            // Readers of the lower file first, which must read the copy once there is one:
            // not with passthrough, where a descriptor from before the copy-up keeps the
            // lower file (README), so there the copy-up comes first.
            if self.readers_across_copy_up && r.percent(60) {
                return match (r.below(4), self.open_slot(r, false)) {
                    (0, _) => Op::Open(1 + r.index(FDS - 1), true, false, false),
                    (1, Some(s)) => Op::Read(s, offset(r, size), amount(r, 1 << 18)),
                    (2, _) => Op::MapRead(offset(r, size), amount(r, 1 << 18)),
                    _ => Op::ReadAll,
                };
            }
            return match r.one_in(4) {
                true => Op::TruncatePath(offset(r, size)),
                false => Op::Open(0, false, r.one_in(8), false),
            };
        }
        loop {
            let w = self.open_slot(r, true);
            let any = self.open_slot(r, false);
            let op = match r.below(100) {
                0..=7 => Op::Open(slot, r.one_in(4), r.one_in(30), self.direct && r.one_in(4)),
                8..=10 => Op::Close(slot),
                11..=32 => match w {
                    Some(s) => {
                        let (off, len) = self.fit(s, offset(r, size), amount(r, 1 << 18));
                        Op::Write(s, off, len, r.next())
                    }
                    None => continue,
                },
                33..=35 => Op::Append(amount(r, 3 * PAGE), r.next()),
                36..=52 => match any {
                    Some(s) => {
                        let (off, len) = self.fit(s, offset(r, size), amount(r, 1 << 18));
                        Op::Read(s, off, len)
                    }
                    None => continue,
                },
                53..=57 => Op::MapRead(offset(r, size), amount(r, 1 << 18)),
                58..=63 => match w {
                    Some(s) if size > 0 => {
                        let off = r.below(size);
                        Op::MapWrite(s, off, amount(r, size - off), r.next(), r.percent(50))
                    }
                    _ => continue,
                },
                64..=69 => match w {
                    Some(s) => Op::Truncate(s, offset(r, size)),
                    None => continue,
                },
                70..=76 => match w {
                    Some(s) => {
                        let mode = *r.pick(&[
                            0,
                            libc::FALLOC_FL_KEEP_SIZE,
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            libc::FALLOC_FL_ZERO_RANGE,
                            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE,
                        ]);
                        Op::Fallocate(s, mode, offset(r, size), amount(r, 1 << 18).max(1))
                    }
                    None => continue,
                },
                // Direct I/O refuses unaligned copies (EINVAL) on ext4 and kernel
                // overlayfs; unionmount copies between its own descriptors.
                77..=82 => match w {
                    Some(s) if !self.fd(s).direct => {
                        let other = r.percent(50);
                        let from = if other {
                            r.below(self.other.len() as u64 + PAGE)
                        } else {
                            offset(r, size)
                        };
                        Op::CopyRange(s, other, from, offset(r, size), amount(r, 1 << 17))
                    }
                    _ => continue,
                },
                83..=86 => match any {
                    Some(s) => Op::Sync(s, r.percent(50)),
                    None => continue,
                },
                87..=90 => match any {
                    Some(s) => Op::DropCache(s),
                    None => continue,
                },
                91..=93 => match any {
                    Some(s) => Op::Stat(s),
                    None => continue,
                },
                94..=95 => Op::TruncatePath(offset(r, size)),
                _ => Op::ReadAll,
            };
            return op;
        }
    }

    /// The offset and length of a read or write through `slot`: as drawn, or whole pages
    /// for a direct descriptor.
    fn fit(&self, slot: usize, off: u64, len: u64) -> (u64, u64) {
        match self.fd(slot).direct {
            true => (off / PAGE * PAGE, len.div_ceil(PAGE) * PAGE),
            false => (off, len),
        }
    }

    fn file(&self, slot: usize) -> &File {
        &self.fd(slot).file
    }

    fn fd(&self, slot: usize) -> &Fd {
        self.fds[slot].as_ref().expect("an open slot")
    }

    fn apply(&mut self, m: &Mount, op: &Op) {
        let path = m.path("f");
        let check = |c: &Case, r: std::io::Result<()>, what: &str| {
            if let Err(e) = r {
                c.fail(format!("{what}: {e}"));
            }
        };
        match *op {
            Op::Open(slot, ro, trunc, direct) => {
                let mut o = OpenOptions::new();
                o.read(true).write(!ro).truncate(trunc && !ro);
                if direct {
                    o.custom_flags(libc::O_DIRECT);
                }
                match o.open(&path) {
                    Ok(f) => {
                        self.fds[slot] = Some(Fd {
                            file: f,
                            read_only: ro,
                            direct,
                        });
                        if trunc && !ro {
                            self.model.clear();
                        }
                        self.copied_up |= !ro;
                    }
                    Err(e) => self.fail(format!("open: {e}")),
                }
            }
            Op::Close(slot) => self.fds[slot] = None,
            Op::Write(slot, off, len, seed) => {
                let data = pattern(seed, len);
                let buf = Aligned::from(&data);
                let r = self.file(slot).write_all_at(buf.get(), off);
                check(self, r, "pwrite");
                self.store(off, &data);
            }
            Op::Append(len, seed) => {
                let data = pattern(seed, len);
                let f = OpenOptions::new().append(true).open(&path);
                let r = f.and_then(|mut f| std::io::Write::write_all(&mut f, &data));
                check(self, r, "append");
                let end = self.model.len() as u64;
                self.store(end, &data);
            }
            Op::Read(slot, off, len) => {
                let mut buf = Aligned::new(len as usize);
                let mut got = 0;
                while got < len as usize {
                    match self
                        .file(slot)
                        .read_at(&mut buf.get_mut()[got..], off + got as u64)
                    {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => self.fail(format!("pread: {e}")),
                    }
                }
                self.compare("pread", off, len, &buf.get()[..got]);
            }
            Op::MapRead(off, len) => {
                let size = self.model.len() as u64;
                let f = File::open(&path).unwrap_or_else(|e| self.fail(format!("open: {e}")));
                if off >= size || len == 0 {
                    return;
                }
                let len = len.min(size - off);
                let got = with_mapping(&f, off, len, false, |s| s.to_vec())
                    .unwrap_or_else(|e| self.fail(format!("mmap: {e}")));
                self.compare("mapped read", off, len, &got);
            }
            Op::MapWrite(slot, off, len, seed, sync) => {
                if len == 0 {
                    return;
                }
                let data = pattern(seed, len);
                let r = with_mapping(self.file(slot), off, len, true, |s| {
                    s.copy_from_slice(&data);
                    sync
                });
                check(self, r.map(|_| ()), "mapped write");
                self.store(off, &data);
            }
            Op::Truncate(slot, size) => {
                check(self, self.file(slot).set_len(size), "ftruncate");
                self.model.resize(size as usize, 0);
            }
            Op::TruncatePath(size) => {
                let p = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
                // SAFETY: p is a valid C string.
                if unsafe { libc::truncate(p.as_ptr(), size as i64) } != 0 {
                    self.fail(format!("truncate: {}", std::io::Error::last_os_error()));
                }
                self.model.resize(size as usize, 0);
                self.copied_up = true;
            }
            Op::Fallocate(slot, mode, off, len) => {
                let fd = self.file(slot).as_raw_fd();
                // SAFETY: fd is open for the duration of the call.
                let rc = unsafe { libc::fallocate(fd, mode, off as i64, len as i64) };
                if rc != 0 {
                    self.fail(format!(
                        "fallocate mode {mode:#x}: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                let size = self.model.len() as u64;
                let keep = mode & libc::FALLOC_FL_KEEP_SIZE != 0;
                let zero = mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0;
                let end = off + len;
                if zero {
                    let z = end.min(size).max(off.min(size));
                    self.model[off.min(size) as usize..z as usize].fill(0);
                }
                if !keep && end > size {
                    self.model.resize(end as usize, 0);
                }
            }
            Op::CopyRange(slot, other, from, to, len) => {
                let src_file;
                let (src_fd, src): (i32, &[u8]) = if other {
                    src_file = File::open(m.path("other"))
                        .unwrap_or_else(|e| self.fail(format!("open other: {e}")));
                    (src_file.as_raw_fd(), &self.other)
                } else {
                    // Overlapping ranges of one file are refused (EINVAL): leave them out.
                    let n = len.min((self.model.len() as u64).saturating_sub(from));
                    if from + n > to && from < to + n {
                        return;
                    }
                    (self.file(slot).as_raw_fd(), &self.model)
                };
                let mut off_in = from as i64;
                let mut off_out = to as i64;
                let fd = self.file(slot).as_raw_fd();
                // SAFETY: both fds are open and the offsets are live locals.
                let n = unsafe {
                    libc::copy_file_range(src_fd, &mut off_in, fd, &mut off_out, len as usize, 0)
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    self.fail(format!("copy_file_range: {e}"));
                }
                let avail = src.len().saturating_sub(from as usize);
                if n as usize > avail.min(len as usize) {
                    self.fail(format!("copy_file_range copied {n} of {avail} bytes"));
                }
                if n > 0 {
                    let data = src[from as usize..from as usize + n as usize].to_vec();
                    self.store(to, &data);
                }
            }
            Op::Sync(slot, data) => {
                let f = self.file(slot);
                let r = if data { f.sync_data() } else { f.sync_all() };
                check(self, r, "fsync");
            }
            Op::DropCache(slot) => {
                let fd = self.file(slot).as_raw_fd();
                // SAFETY: fd is open for the duration of the call.
                let rc = unsafe { libc::posix_fadvise(fd, 0, 0, libc::POSIX_FADV_DONTNEED) };
                if rc != 0 {
                    self.fail(format!("fadvise: errno {rc}"));
                }
            }
            Op::Stat(slot) => {
                let md = self
                    .file(slot)
                    .metadata()
                    .unwrap_or_else(|e| self.fail(format!("fstat: {e}")));
                if md.size() != self.model.len() as u64 {
                    self.fail(format!(
                        "fstat size {}, {} expected",
                        md.size(),
                        self.model.len()
                    ));
                }
            }
            Op::ReadAll => {
                let got = fs::read(&path).unwrap_or_else(|e| self.fail(format!("read: {e}")));
                self.compare("whole file", 0, SPAN * 2, &got);
            }
        }
    }
}

/// A page-aligned buffer, as direct I/O needs.
struct Aligned {
    v: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(len: usize) -> Aligned {
        let v = vec![0u8; len + PAGE as usize];
        let start = v.as_ptr().align_offset(PAGE as usize);
        Aligned { v, start, len }
    }

    fn from(data: &[u8]) -> Aligned {
        let mut a = Aligned::new(data.len());
        a.get_mut().copy_from_slice(data);
        a
    }

    fn get(&self) -> &[u8] {
        &self.v[self.start..self.start + self.len]
    }

    fn get_mut(&mut self) -> &mut [u8] {
        &mut self.v[self.start..self.start + self.len]
    }
}

/// Maps `len` bytes of `f` at `off` shared (writable if asked) and runs `body` on them; a
/// `true` from a writable body asks for `msync` before the unmapping.
fn with_mapping<T>(
    f: &File,
    off: u64,
    len: u64,
    write: bool,
    body: impl FnOnce(&mut [u8]) -> T,
) -> std::io::Result<T> {
    let start = off / PAGE * PAGE;
    let maplen = (off + len - start) as usize;
    let prot = if write {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: a fresh shared mapping of an open file, unmapped below; no other reference.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            maplen,
            prot,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            start as i64,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the mapping is maplen bytes long and lives until the munmap below.
    let s = unsafe {
        std::slice::from_raw_parts_mut((p as *mut u8).add((off - start) as usize), len as usize)
    };
    let out = body(s);
    let mut res = Ok(());
    // SAFETY: p and maplen are the mapping made above.
    if write && unsafe { libc::msync(p, maplen, libc::MS_SYNC) } != 0 {
        res = Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above; the slice is not used after this.
    unsafe { libc::munmap(p, maplen) };
    res.map(|_| out)
}

/// What a seed runs on: unionmount with these options, or kernel overlayfs (to tell a
/// mistake of the model from one of unionmount's).
#[derive(Clone, Copy, Debug)]
enum Target {
    Union(&'static [&'static str]),
    Kernel,
}

impl Target {
    fn args(self) -> &'static [&'static str] {
        match self {
            Target::Union(args) => args,
            Target::Kernel => &[],
        }
    }

    /// Mounts the target over `l`'s layers; also says what it is.
    fn mount(self, l: &Layers) -> (Mount, &'static str) {
        match self {
            Target::Union(args) if args.contains(&"off") => {
                (l.mount_with("m", args), "page-cached")
            }
            Target::Union(args) => (l.mount_with("m", args), "passthrough"),
            Target::Kernel => (l.mount_kernel("m"), "kernel overlayfs"),
        }
    }
}

/// Runs one seed on `target`; panics with a report on the first mismatch.
fn run(seed: u64, ops: usize, target: Target) {
    let mut r = Rng(seed ^ 0x5eed_f5c0);
    let l = Layers::new(1);
    let size = if r.one_in(6) {
        0
    } else {
        amount(&mut r, SPAN / 2)
    };
    let initial = pattern(r.next(), size);
    let other = pattern(r.next(), amount(&mut r, 1 << 18));
    l.lower(0)
        .file_bytes("f", &initial)
        .file_bytes("other", &other);
    let (mut m, label) = target.mount(&l);
    let mut c = Case {
        seed,
        direct: r.one_in(3),
        ops: Vec::new(),
        model: initial.clone(),
        other: other.clone(),
        fds: Default::default(),
        copied_up: false,
        readers_across_copy_up: !matches!(target, Target::Union(a) if !a.contains(&"off")),
        label,
    };
    // `UNIONMOUNT_FSX_CHECK_ALL=1` reads the whole file after every operation, to find the
    // first one that went wrong.
    let check_all = std::env::var("UNIONMOUNT_FSX_CHECK_ALL").is_ok_and(|v| v == "1");
    for _ in 0..ops {
        let op = c.generate(&mut r);
        c.ops.push(op.clone());
        c.apply(&m, &op);
        if check_all {
            c.apply(&m, &Op::ReadAll);
        }
    }
    c.ops.push(Op::ReadAll);
    c.apply(&m, &Op::ReadAll);
    for s in 0..FDS {
        c.fds[s] = None;
    }
    m.unmount();
    let upper = fs::read(m.upper_path("f")).unwrap_or_default();
    if upper != c.model {
        c.fail(format!(
            "after unmounting, the upper copy has {} bytes ({} expected); first difference at \
             byte {:?}",
            upper.len(),
            c.model.len(),
            upper.iter().zip(&c.model).position(|(a, b)| a != b)
        ));
    }
    if fs::read(l.lowers[0].join("f")).unwrap() != initial {
        c.fail("the lower file changed".into());
    }
    if fs::read(l.lowers[0].join("other")).unwrap() != other {
        c.fail("the other lower file changed".into());
    }
}

fn check_seeds(target: Target, run: fn(u64, usize, Target)) {
    let seeds = parse_seeds(&std::env::var("UNIONMOUNT_FSX_SEEDS").unwrap_or("1-3".into()));
    let ops: usize = std::env::var("UNIONMOUNT_FSX_OPS")
        .unwrap_or("1500".into())
        .parse()
        .expect("UNIONMOUNT_FSX_OPS is a number");
    for seed in seeds {
        eprintln!("data_integrity {target:?}: seed {seed}, {ops} operations");
        run(seed, ops, target);
    }
}

const PASSTHROUGH: Target = Target::Union(&["--passthrough", "on"]);
const PAGE_CACHED: Target = Target::Union(&["--passthrough", "off"]);

#[test]
fn file_data_matches_a_model_with_passthrough() {
    check_seeds(PASSTHROUGH, run);
}

#[test]
fn file_data_matches_a_model_on_the_page_cached_path() {
    check_seeds(PAGE_CACHED, run);
}

/// The same operations on kernel overlayfs: the model is right where unionmount is checked
/// against it.
#[test]
fn file_data_matches_a_model_on_kernel_overlayfs() {
    check_seeds(Target::Kernel, run);
}

// ---------------------------------------------------------------------------------------------
// Two writers at once

/// Bytes of one stripe; the stripes alternate between the two writers, so most pages hold
/// bytes of both.
const STRIPE: u64 = 3000;
const STRIPES: u64 = 160;

/// Two threads change one file at once, each only its own stripes, through descriptors of
/// its own (written, mapped, synced, its cache dropped, reopened); each reads back its own
/// stripes as it goes, and at the end the whole file must hold what each wrote. Both start
/// by opening the lower file for writing, so the copy-up itself is raced.
fn run_concurrent(seed: u64, ops: usize, target: Target) {
    let l = Layers::new(1);
    let initial = pattern(seed, STRIPE * STRIPES);
    l.lower(0).file_bytes("f", &initial);
    let (m, label) = target.mount(&l);
    let path = m.path("f");
    let start = std::sync::Barrier::new(2);
    let models: Vec<Vec<u8>> = std::thread::scope(|sc| {
        let workers: Vec<_> = (0..2u64)
            .map(|t| {
                let (path, initial, start) = (&path, &initial, &start);
                sc.spawn(move || writer(seed, t, ops, path, initial.clone(), start, label))
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap()).collect()
    });
    let got = fs::read(&path).unwrap();
    let want: Vec<u8> = (0..initial.len())
        .map(|i| models[(i as u64 / STRIPE % 2) as usize][i])
        .collect();
    if got != want {
        panic!(
            "data_integrity concurrent seed {seed} ({label}): the file has {} bytes ({} \
             expected); first difference at byte {:?}",
            got.len(),
            want.len(),
            got.iter().zip(&want).position(|(a, b)| a != b)
        );
    }
}

/// One of `run_concurrent`'s threads: answers its model of the file (right in its stripes).
fn writer(
    seed: u64,
    t: u64,
    ops: usize,
    path: &std::path::Path,
    mut model: Vec<u8>,
    start: &std::sync::Barrier,
    label: &str,
) -> Vec<u8> {
    let mut r = Rng(seed.wrapping_mul(31).wrapping_add(t));
    let open = || OpenOptions::new().read(true).write(true).open(path);
    start.wait();
    let mut f = open().unwrap();
    let fail = |i: usize, what: String| -> ! {
        panic!("data_integrity concurrent seed {seed} ({label}), writer {t}, operation {i}: {what}")
    };
    for i in 0..ops {
        // A range inside one of this thread's stripes.
        let k = r.below(STRIPES / 2) * 2 + t;
        let off = k * STRIPE + r.below(STRIPE);
        let len = 1 + r.below(k * STRIPE + STRIPE - off);
        let range = off as usize..(off + len) as usize;
        match r.below(10) {
            0..=2 => {
                let data = pattern(r.next(), len);
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| fail(i, format!("pwrite at {off}: {e}")));
                model[range].copy_from_slice(&data);
            }
            3 => {
                let data = pattern(r.next(), len);
                with_mapping(&f, off, len, true, |s| {
                    s.copy_from_slice(&data);
                    r.percent(50)
                })
                .unwrap_or_else(|e| fail(i, format!("mapped write at {off}: {e}")));
                model[range].copy_from_slice(&data);
            }
            4..=6 => {
                let mut buf = vec![0u8; len as usize];
                f.read_exact_at(&mut buf, off)
                    .unwrap_or_else(|e| fail(i, format!("pread at {off}: {e}")));
                if buf[..] != model[range] {
                    fail(i, format!("pread of {len} bytes at {off} differs"));
                }
            }
            7 => {
                let got = with_mapping(&f, off, len, false, |s| s.to_vec())
                    .unwrap_or_else(|e| fail(i, format!("mapped read at {off}: {e}")));
                if got[..] != model[range] {
                    fail(i, format!("mapped read of {len} bytes at {off} differs"));
                }
            }
            8 => {
                let r = match i % 2 {
                    0 => f.sync_data(),
                    _ => {
                        // SAFETY: f is open for the duration of the call.
                        let rc = unsafe {
                            libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED)
                        };
                        (rc == 0)
                            .then_some(())
                            .ok_or(std::io::Error::from_raw_os_error(rc))
                    }
                };
                r.unwrap_or_else(|e| fail(i, format!("sync or drop: {e}")));
            }
            _ => f = open().unwrap_or_else(|e| fail(i, format!("open: {e}"))),
        }
    }
    model
}

#[test]
fn two_writers_at_once_with_passthrough() {
    check_seeds(PASSTHROUGH, run_concurrent);
}

#[test]
fn two_writers_at_once_on_the_page_cached_path() {
    check_seeds(PAGE_CACHED, run_concurrent);
}

#[test]
fn two_writers_at_once_on_kernel_overlayfs() {
    check_seeds(Target::Kernel, run_concurrent);
}

// ---------------------------------------------------------------------------------------------
// A full upper

/// The kernel's write-back cache limit of this mount: set to `bytes` (a FUSE mount's
/// backing device info, before the daemon first reads it), as a machine with less memory
/// would have it.
fn set_cache_limit(m: &Mount, bytes: u64) {
    let dev = fs::metadata(&m.merged).unwrap().dev();
    let path = format!(
        "/sys/class/bdi/{}:{}/max_bytes",
        libc::major(dev),
        libc::minor(dev)
    );
    fs::write(&path, bytes.to_string()).unwrap_or_else(|e| panic!("{path}: {e}"));
}

/// The bytes free for an unprivileged writer on the filesystem of `p`.
fn free_bytes(p: &std::path::Path) -> u64 {
    let c = std::ffi::CString::new(p.as_os_str().as_bytes()).unwrap();
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: c is a valid C string and st is large enough for a statvfs.
    assert_eq!(unsafe { libc::statvfs(c.as_ptr(), st.as_mut_ptr()) }, 0);
    // SAFETY: statvfs succeeded.
    let st = unsafe { st.assume_init() };
    st.f_bavail * st.f_frsize
}

/// Writes 1 MiB at a time to a new file `name` until a write fails or `cap` bytes went in;
/// answers the bytes written and the error.
fn fill(m: &Mount, name: &str, cap: u64) -> (File, u64, Option<std::io::Error>) {
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(m.path(name))
        .unwrap();
    let chunk = vec![b'y'; 1 << 20];
    let mut n = 0;
    while n < cap {
        match std::io::Write::write(&mut f, &chunk) {
            Ok(w) => n += w as u64,
            Err(e) => return (f, n, Some(e)),
        }
    }
    (f, n, None)
}

/// Each open of a file learns of a failed write-back once, at its own fsync, as on ext4 and
/// kernel overlayfs: two read-only opens held while a write-back fails both get the error at
/// fsync, and an open made after the writer's fsync reported it gets none. The upper is an
/// ext4 on a loop device whose image lives on a small tmpfs: once the tmpfs is full, writing
/// back newly allocated blocks fails. (Read-only opens of an upper file sharing one descriptor
/// of the daemon gave the error to the first of the two, and to the later open.)
#[test]
fn each_open_learns_of_a_failed_write_back_at_its_own_fsync() {
    for target in [PAGE_CACHED, PASSTHROUGH, Target::Kernel] {
        let l = Layers::new(1);
        let room = l.root().join("room");
        let _room = Tmpfs::new(room.clone(), "40m");
        let image = room.join("ext4");
        common::fs_image(
            &image,
            200 << 20,
            &[
                "mkfs.ext4",
                "-q",
                "-O",
                "^has_journal",
                "-E",
                "lazy_itable_init=0,nodiscard",
            ],
            "e2fsprogs",
        );
        let _ext4 = common::scratch_mount(&["-o", "loop"], &image, &l.mkdir("m"));
        let (m, label) = target.mount(&l);
        let filler = room.join("filler");
        for (name, readers_then) in [("held", true), ("later", false)] {
            fs::write(m.path(name), vec![b'a'; 1 << 16]).unwrap();
            File::open(m.path(name)).unwrap().sync_all().unwrap();
            let readers = [
                File::open(m.path(name)).unwrap(),
                File::open(m.path(name)).unwrap(),
            ];
            let w = OpenOptions::new().write(true).open(m.path(name)).unwrap();
            // Fill the tmpfs under the image.
            let mut f = File::create(&filler).unwrap();
            let mib = vec![0u8; 1 << 20];
            while std::io::Write::write_all(&mut f, &mib).is_ok() {}
            drop(f);
            w.write_all_at(&vec![b'b'; 4 << 20], 1 << 16)
                .unwrap_or_else(|e| panic!("{label}: {name}: write: {e}"));
            let Err(err) = w.sync_all() else {
                panic!("{label}: {name}: the writer's fsync reported nothing");
            };
            fs::remove_file(&filler).unwrap();
            drop(w);
            if readers_then {
                for (i, r) in readers.iter().enumerate() {
                    let Err(e) = r.sync_all() else {
                        panic!("{label}: reader {i}'s fsync reported nothing");
                    };
                    assert_eq!(
                        e.raw_os_error(),
                        err.raw_os_error(),
                        "{label}: reader {i}'s fsync"
                    );
                }
            } else {
                File::open(m.path(name))
                    .unwrap()
                    .sync_all()
                    .unwrap_or_else(|e| {
                        panic!("{label}: an open made after the error was reported: {e}")
                    });
            }
        }
        drop(m);
    }
}

/// Writing to an upper that runs out of room fails with ENOSPC at write(2), as on ext4 and
/// kernel overlayfs, also on the page-cached path, where the kernel caches writes and the
/// daemon sees them only as it writes them back: a program writing on and on learns it and
/// stops (it used to write forever, every byte accepted and lost). There, bytes within the
/// kernel's cache limit of the end of the room may be accepted and fail at write-back
/// (README): fsync or close says so, the view then shows what the upper holds, and once there
/// is room again writes succeed again. With little room left at open, page-cached writes go
/// to the upper at once and fail at the exact byte.
#[test]
fn a_full_upper_fails_writes() {
    const MIB: u64 = 1 << 20;
    const LIMIT: u64 = 8 * MIB;
    for target in [PAGE_CACHED, PASSTHROUGH, Target::Kernel] {
        let l = Layers::new(1);
        l.lower(0).file("lower", "x");
        // Room for the ballast and eight cache limits: writes start through the cache.
        let _room = Tmpfs::new(l.root().join("m"), "88m");
        let (m, label) = target.mount(&l);
        let cached = label == "page-cached";
        if matches!(target, Target::Union(_)) {
            set_cache_limit(&m, LIMIT);
        }
        let ballast = vec![b'b'; (3 * LIMIT) as usize];
        fs::write(m.path("ballast"), &ballast).unwrap();
        File::open(m.path("ballast")).unwrap().sync_all().unwrap();

        let (f, n, err) = fill(&m, "big", 200 * MIB);
        let err = err.unwrap_or_else(|| panic!("{label}: 200 MiB written to an 88 MiB upper"));
        assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{label}: {err}");
        assert!(n <= 88 * MIB + 3 * LIMIT, "{label}: {n} bytes accepted");
        assert!(n >= 60 * MIB, "{label}: only {n} bytes accepted");
        let synced = f.sync_all();
        if !cached {
            synced
                .as_ref()
                .unwrap_or_else(|e| panic!("{label}: fsync: {e}"));
        }
        // The daemon drops failed bytes from the kernel's cache through its notification
        // queue; dropping the clean pages here leaves no race with it.
        // SAFETY: f is open for the duration of the call.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "{label}: fadvise");
        drop(f);
        // What the view shows is what the upper holds: the accepted bytes, less those that
        // failed at write-back (zeros, only on the page-cached path).
        let seen = fs::read(m.path("big")).unwrap();
        assert_eq!(seen.len() as u64, n, "{label}: size of the written file");
        let lost = seen.iter().filter(|&&b| b == 0).count() as u64;
        assert!(
            seen.iter().all(|&b| b == b'y' || b == 0),
            "{label}: bytes not written"
        );
        match cached {
            true => assert!(lost <= 3 * LIMIT, "{label}: {lost} bytes lost"),
            false => assert_eq!(lost, 0, "{label}: bytes lost"),
        }
        // Bytes lost at write-back are never lost in silence.
        if lost > 0 {
            assert!(
                synced.is_err(),
                "{label}: {lost} bytes lost, and fsync said nothing"
            );
        }
        assert_eq!(
            fs::read(m.upper_path("big")).unwrap(),
            seen,
            "{label}: the upper"
        );

        // With little room left, a new file fails at the exact byte, through the cache too.
        let (_g, small, err) = fill(&m, "small", 200 * MIB);
        assert_eq!(
            err.and_then(|e| e.raw_os_error()),
            Some(libc::ENOSPC),
            "{label}: a new file"
        );
        assert_eq!(
            fs::read(m.upper_path("small")).unwrap().len() as u64,
            small,
            "{label}: the new file's accepted bytes are on the upper"
        );

        // Room again: the file opened before takes writes again.
        fs::remove_file(m.path("ballast")).unwrap();
        let mut f = OpenOptions::new().append(true).open(m.path("big")).unwrap();
        std::io::Write::write_all(&mut f, &vec![b'z'; (2 * MIB) as usize])
            .unwrap_or_else(|e| panic!("{label}: a write once there is room again: {e}"));
        f.sync_all()
            .unwrap_or_else(|e| panic!("{label}: fsync once there is room again: {e}"));
        drop(f);
        let upper = fs::read(m.upper_path("big")).unwrap();
        assert_eq!(
            upper.len() as u64,
            n + 2 * MIB,
            "{label}: size after the append"
        );
        assert!(upper[n as usize..].iter().all(|&b| b == b'z'), "{label}");

        // Room for more than the cache limit, written a little past, half a MiB out of step
        // with the writes: the write-back that reaches the end of the room is stored only in
        // part, and that is an error too.
        let room = free_bytes(&m.upper_path(""));
        let (mut f, _, _) = fill(&m, "edge", 0);
        let chunk = vec![b'y'; MIB as usize];
        std::io::Write::write_all(&mut f, &chunk[..(MIB / 2) as usize]).unwrap();
        f.sync_all().unwrap();
        let mut written = MIB / 2;
        let target = room + 100 * 1024;
        while written < target {
            let len = (target - written).min(MIB) as usize;
            match std::io::Write::write(&mut f, &chunk[..len]) {
                Ok(w) => written += w as u64,
                Err(_) => break,
            }
        }
        let synced = f.sync_all();
        // SAFETY: f is open for the duration of the call.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        assert_eq!(rc, 0, "{label}: fadvise");
        drop(f);
        let seen = fs::read(m.path("edge")).unwrap();
        let lost = seen.iter().filter(|&&b| b == 0).count();
        if lost > 0 {
            assert!(
                synced.is_err(),
                "{label}: {lost} bytes lost, and fsync said nothing"
            );
        }
        assert_eq!(
            fs::read(m.upper_path("edge")).unwrap(),
            seen,
            "{label}: the upper"
        );
        drop(m);
    }
}

/// Reads answered by splicing the file's pages (large READs on the page-cached path) and by
/// copying them (small ones, or too large for the pipe) return the layer's bytes: lower files
/// and an upper copy, every size around the bounds (32 KiB, the pipe's 1 MiB, the end of the
/// file), through the page cache after its pages were dropped and through `O_DIRECT` at
/// unaligned offsets (which only the page-cached path passes to the daemon as they are).
#[test]
fn reads_of_every_size_return_the_layers_bytes() {
    const K: u64 = 1024;
    let sizes = [
        0,
        1,
        4095,
        32 * K - 1,
        32 * K,
        32 * K + 1,
        128 * K + 17,
        256 * K,
        1020 * K,
        1024 * K - 1,
        1024 * K,
        1024 * K + 1,
        3 * 1024 * K + 5,
    ];
    let l = Layers::new(1);
    let mut files = Vec::new();
    for (i, &size) in sizes.iter().enumerate() {
        let name = format!("f{size}");
        let data = pattern(i as u64 + 1, size);
        l.lower(0).file_bytes(&name, &data);
        files.push((name, data));
    }
    {
        let args = PAGE_CACHED.args();
        let m = l.mount_with("m", args);
        // One file copied up (a chmod keeps its bytes): its reads come from the upper copy.
        let copied = &files.last().unwrap().0;
        fs::set_permissions(
            m.path(copied),
            std::os::unix::fs::PermissionsExt::from_mode(0o600),
        )
        .unwrap();
        assert!(m.upper_path(copied).exists());
        for (name, data) in &files {
            let size = data.len() as u64;
            // Through the page cache, its pages dropped first, in reads of three sizes.
            for chunk in [4 * K, 128 * K, 1024 * K] {
                let f = File::open(m.path(name)).unwrap();
                // SAFETY: a valid open fd; fadvise touches no memory of ours.
                let rc =
                    unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
                assert_eq!(rc, 0);
                let mut got = Vec::new();
                let mut buf = vec![0u8; chunk as usize];
                loop {
                    let n = f.read_at(&mut buf, got.len() as u64).unwrap();
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                }
                assert!(got == *data, "{args:?} {name}: reads of {chunk} differ");
            }
            // O_DIRECT: the READs carry these offsets and sizes as they are.
            let f = OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_DIRECT)
                .open(m.path(name))
                .unwrap();
            for off in [0, 1, 4095, 4096, size.saturating_sub(100), size, size + 1] {
                for len in [32 * K - 1, 32 * K, 200_000, 1020 * K, 1024 * K] {
                    let mut buf = vec![0u8; len as usize];
                    let n = f.read_at(&mut buf, off).unwrap_or_else(|e| {
                        panic!("{args:?} {name}: O_DIRECT {len} at {off}: {e}")
                    });
                    let want = &data[(off.min(size) as usize)..((off + len).min(size) as usize)];
                    assert!(
                        &buf[..n] == want,
                        "{args:?} {name}: O_DIRECT read of {len} at {off}: {n} bytes, want {}",
                        want.len()
                    );
                }
            }
        }
        drop(m);
    }
}
