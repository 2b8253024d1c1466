//! The request loop: the INIT handshake, then threads that each have their own fd of the
//! connection and serve the requests they read from it. With polling on (`--spin-us`), one
//! thread at a time reads (see `Readers`); with it off, every thread blocks in read(2).

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fuser::InitFlags;

use super::abi::{self, Out, op};
use super::longwork;
use super::reply::{Channel, Notifier, Reply};
use super::request::{Header, Op};
use crate::fs::UnionFs;
use crate::sys;

/// Whom the daemon serves, beyond what the kernel enforces. A mount without `allow_other`
/// is kept to its owner by the kernel itself (which also makes requests of its own, such as
/// writing back a file's times from a kernel thread, that must get through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    All,
    /// Root and the given user (`-o allow_root`, mounted with `allow_other`).
    RootAndOwner(u32),
}

/// What INIT settles: the kernel's offer and the daemon's choices.
#[derive(Debug)]
pub struct InitConfig {
    pub capable: InitFlags,
    pub want: InitFlags,
    pub max_write: u32,
    pub max_readahead: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_stack_depth: u32,
}

impl InitConfig {
    /// Asks for a capability; false when the kernel does not offer it.
    pub fn add(&mut self, f: InitFlags) -> bool {
        if self.capable.contains(f) {
            self.want |= f;
            true
        } else {
            false
        }
    }
}

pub struct Session {
    fs: Arc<UnionFs>,
    ch: Channel,
    threads: usize,
    /// How long the reading thread polls for the next request before it sleeps.
    spin: Option<Duration>,
    access: Access,
    /// Room for the largest request: a WRITE of `max_write` bytes and its headers.
    buf_size: usize,
}

fn io_err(e: fuser::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.code())
}

impl Session {
    /// Performs the INIT handshake on `dev`, the fd of a fresh mount.
    pub fn new(
        fs: UnionFs,
        dev: OwnedFd,
        threads: usize,
        spin: Duration,
        access: Access,
    ) -> std::io::Result<Session> {
        let mut s = Session {
            fs: Arc::new(fs),
            ch: Channel::new(dev),
            threads: threads.max(1),
            spin: (!spin.is_zero()).then_some(spin),
            access,
            buf_size: crate::fs::MAX_IO as usize + 4096,
        };
        s.handshake()?;
        Ok(s)
    }

    pub fn notifier(&self) -> Notifier {
        Notifier(self.ch.clone())
    }

    fn handshake(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; self.buf_size];
        loop {
            let n = match sys::read_dev(self.ch.fd(), &mut buf) {
                Ok(n) => n,
                Err(e) if [libc::EINTR, libc::EAGAIN, libc::ENOENT].contains(&e.code()) => {
                    continue;
                }
                Err(e) => return Err(io_err(e)),
            };
            let msg = &buf[..n];
            let Some(h) = Header::parse(msg) else {
                return Err(std::io::Error::other("malformed request before INIT"));
            };
            let reply = Reply::new(self.ch.clone(), h.unique);
            let Ok(Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            }) = Op::parse(h.opcode, &msg[abi::IN_HEADER..])
            else {
                reply.error(fuser::Errno::EIO);
                return Err(std::io::Error::other(
                    "the kernel sent a request before INIT",
                ));
            };
            if major > abi::MAJOR {
                // A newer major version: answer ours, and the kernel sends INIT again.
                let mut o = Out::with_capacity(8);
                o.u32(abi::MAJOR).u32(abi::MINOR);
                reply.data(&o.buf);
                continue;
            }
            if major < abi::MAJOR || minor < 23 {
                reply.error(fuser::Errno::EPROTO);
                return Err(std::io::Error::other(format!(
                    "the kernel speaks FUSE {major}.{minor}; 7.23 (Linux 3.15) or later is needed"
                )));
            }
            let capable = InitFlags::from_bits_retain(flags);
            let mut cfg = InitConfig {
                capable,
                want: InitFlags::empty(),
                max_write: crate::fs::MAX_IO,
                max_readahead: max_readahead.min(crate::fs::MAX_IO),
                max_background: 16,
                congestion_threshold: 12,
                max_stack_depth: 0,
            };
            cfg.add(InitFlags::FUSE_INIT_EXT);
            Arc::get_mut(&mut self.fs)
                .expect("no thread runs before INIT")
                .init(&mut cfg);
            let want = cfg.want & capable;
            let page = sys::page_size() as u32;
            let max_pages = (cfg.max_write.max(cfg.max_readahead).div_ceil(page)) as u16;
            let bits = want.bits();
            let mut o = Out::with_capacity(64);
            o.u32(abi::MAJOR).u32(abi::MINOR).u32(cfg.max_readahead);
            o.u32(bits as u32);
            o.u16(cfg.max_background).u16(cfg.congestion_threshold);
            o.u32(cfg.max_write).u32(1); // time_gran: 1 ns
            o.u16(max_pages).u16(0);
            o.u32((bits >> 32) as u32);
            let depth = if want.contains(InitFlags::FUSE_PASSTHROUGH) {
                cfg.max_stack_depth
            } else {
                0
            };
            o.u32(depth);
            o.zeros(64 - o.len());
            reply.data(&o.buf);
            log::debug!("INIT: FUSE {major}.{minor}, flags {bits:#x}");
            return Ok(());
        }
    }

    /// Serves requests until the mount goes away.
    pub fn run(self) -> std::io::Result<()> {
        // Every fd is made ready before any thread serves: a failure here leaves nothing
        // running.
        let spin = self.spin;
        if spin.is_some() {
            sys::set_nonblocking(self.ch.fd()).map_err(io_err)?;
        }
        let mut channels = vec![self.ch.clone()];
        for _ in 1..self.threads {
            channels.push(clone_channel(&self.ch, spin.is_some())?);
        }
        let readers = spin.map(|_| Arc::new(Readers::default()));
        let mut handles = Vec::with_capacity(channels.len());
        let mut res = Ok(());
        {
            // Extra workers: a fd of their own each, detached (they end by themselves, or
            // with the mount).
            let (fs, base_ch, readers) = (self.fs.clone(), self.ch.clone(), readers.clone());
            let (access, buf_size) = (self.access, self.buf_size);
            let next = AtomicUsize::new(self.threads);
            let start = move || {
                let ch = match clone_channel(&base_ch, spin.is_some()) {
                    Ok(ch) => ch,
                    Err(e) => {
                        log::warn!("no fd for an extra request thread: {e}");
                        return false;
                    }
                };
                let me = next.fetch_add(1, Ordering::Relaxed);
                let w = Worker {
                    me,
                    readers: readers.clone(),
                    fs: fs.clone(),
                    ch,
                    spin,
                    access,
                    buf_size,
                    extra: true,
                };
                let spawned = w.spawn();
                if let Err(e) = &spawned {
                    log::warn!("no extra request thread: {e}");
                }
                spawned.is_ok()
            };
            longwork::set_spares(self.threads, Box::new(start));
        }
        for (i, ch) in channels.into_iter().enumerate() {
            let w = Worker {
                me: i,
                readers: readers.clone(),
                fs: self.fs.clone(),
                ch,
                spin,
                access: self.access,
                buf_size: self.buf_size,
                extra: false,
            };
            match w.spawn() {
                Ok(h) => handles.push(h),
                Err(e) => {
                    // The threads already serving keep the mount alive; it is served by
                    // fewer threads than asked.
                    log::warn!("started {i} of {} request threads: {e}", self.threads);
                    if i == 0 {
                        res = Err(e);
                    }
                    break;
                }
            }
        }
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if res.is_ok() {
                        res = Err(e)
                    }
                }
                Err(_) => res = Err(std::io::Error::other("a request thread panicked")),
            }
        }
        res
    }
}

/// How long the reader may serve one request before another thread takes over reading.
const TAKE_OVER: Duration = Duration::from_micros(500);
/// Requests from different threads this close together are served in parallel.
const PARALLEL: Duration = Duration::from_millis(1);
/// After this long without requests, the watcher stops checking on the reader.
const QUIET: Duration = Duration::from_millis(50);

/// Which thread reads `/dev/fuse`. One thread at a time reads, and serves what it reads
/// itself, spinning for the next request before it sleeps: a request then finds it awake,
/// and no other thread is woken for it. The others sleep in user space, out of the kernel's
/// wait queue, so that a request wakes nobody in vain. A request that moves data (READ,
/// WRITE, FSYNC, ...) hands reading to another thread at once; any other request that keeps
/// its reader longer than `TAKE_OVER` has reading taken over by the watcher, one waiting
/// thread that checks on the reader at that interval while requests come (and sleeps once
/// the mount is quiet). So slow requests are served in parallel, as with a reader per
/// thread, and quick ones cost no wake-up.
#[derive(Default)]
struct Readers {
    state: Mutex<ReadState>,
    /// The waiting threads other than the watcher.
    waiting: Condvar,
    watcher: Condvar,
}

#[derive(Default)]
struct ReadState {
    /// The thread that reads (a worker index), if any.
    reader: Option<usize>,
    /// Since when the reader has been serving a request (None while it reads).
    busy_since: Option<Instant>,
    /// The reader sleeps in poll(2).
    reader_sleeps: bool,
    last_request: Option<Instant>,
    /// The thread the last request came from (0: the kernel's own).
    last_pid: u32,
    has_watcher: bool,
    watcher_parked: bool,
    /// Threads waiting that are not the watcher.
    waiters: usize,
    ended: bool,
}

impl Readers {
    fn lock(&self) -> MutexGuard<'_, ReadState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until thread `me` may read; false once the session has ended.
    fn take(&self, me: usize) -> bool {
        let mut s = self.lock();
        let mut watching = false;
        loop {
            let stuck = s.busy_since.is_some_and(|t| t.elapsed() >= TAKE_OVER);
            if s.ended || s.reader.is_none() || stuck {
                if watching {
                    s.has_watcher = false;
                    if s.waiters > 0 {
                        // Another waiting thread watches from now on.
                        self.waiting.notify_one();
                    }
                }
                if s.ended {
                    return false;
                }
                s.reader = Some(me);
                s.busy_since = None;
                s.reader_sleeps = false;
                return true;
            }
            if !watching && s.has_watcher {
                s.waiters += 1;
                s = self.waiting.wait(s).unwrap_or_else(|e| e.into_inner());
                s.waiters -= 1;
                continue;
            }
            watching = true;
            s.has_watcher = true;
            let quiet = s.reader_sleeps && s.last_request.is_none_or(|t| t.elapsed() >= QUIET);
            if quiet {
                s.watcher_parked = true;
                s = self.watcher.wait(s).unwrap_or_else(|e| e.into_inner());
                s.watcher_parked = false;
            } else {
                let wait = match s.busy_since {
                    Some(t) => TAKE_OVER.saturating_sub(t.elapsed()),
                    None => TAKE_OVER,
                };
                s = self
                    .watcher
                    .wait_timeout(s, wait.max(Duration::from_micros(50)))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
    }

    /// The reader goes to sleep in poll(2), or woke from it.
    fn sleeps(&self, me: usize, sleeping: bool) {
        let mut s = self.lock();
        if s.reader == Some(me) {
            s.reader_sleeps = sleeping;
            if !sleeping && s.watcher_parked {
                self.watcher.notify_one();
            }
        }
    }

    /// The reader got a request from thread `pid`. It either serves it and reads on
    /// afterwards (true, unless reading is taken over meanwhile) or hands reading on now:
    /// when `hand_on` or when requests come from more than one thread at once, since they
    /// are then best served in parallel.
    fn got(&self, me: usize, pid: u32, hand_on: bool) -> bool {
        let mut s = self.lock();
        let now = Instant::now();
        let parallel = pid != 0
            && s.last_pid != 0
            && pid != s.last_pid
            && s.last_request.is_some_and(|t| now - t < PARALLEL);
        if pid != 0 {
            s.last_pid = pid;
        }
        let hand_on = hand_on || parallel;
        s.last_request = Some(now);
        if s.reader != Some(me) {
            return false;
        }
        if hand_on {
            s.reader = None;
            s.busy_since = None;
            if s.waiters > 0 {
                self.waiting.notify_one();
            } else {
                self.watcher.notify_one();
            }
            false
        } else {
            s.busy_since = Some(now);
            true
        }
    }

    /// The request is served: true if `me` is still the reader.
    fn served(&self, me: usize) -> bool {
        let mut s = self.lock();
        if s.reader == Some(me) {
            s.busy_since = None;
            true
        } else {
            false
        }
    }

    fn end(&self) {
        let mut s = self.lock();
        s.ended = true;
        self.waiting.notify_all();
        self.watcher.notify_all();
    }
}

/// Requests that move data, or wait for the disk by their nature: their reader hands
/// reading on before serving them.
fn moves_data(opcode: u32) -> bool {
    matches!(
        opcode,
        op::READ | op::WRITE | op::FSYNC | op::FSYNCDIR | op::FALLOCATE | op::COPY_FILE_RANGE
    )
}

/// A `/dev/fuse` fd of its own for one more worker (a clone of `base`), non-blocking for a
/// worker that spins.
fn clone_channel(base: &Channel, nonblocking: bool) -> std::io::Result<Channel> {
    let ch = Channel::new(sys::clone_dev_fuse(base.fd()).map_err(io_err)?);
    if nonblocking {
        sys::set_nonblocking(ch.fd()).map_err(io_err)?;
    }
    Ok(ch)
}

/// Requests being served, by all threads (see `mount_gone`).
static IN_SERVICE: AtomicUsize = AtomicUsize::new(0);
/// The kernel ended the connection (see `mount_gone`).
static GONE: AtomicBool = AtomicBool::new(false);

/// The mount is gone: the process ends as soon as no request is being served (the kernel
/// ended those pending with the connection, so their answers go nowhere), here or as the
/// last one ends, and with it its hold on the layers' filesystems. A script unmounting them
/// right after the view found them busy (EBUSY) for the milliseconds every thread took to
/// wind down.
fn mount_gone() {
    GONE.store(true, Ordering::SeqCst);
    if IN_SERVICE.load(Ordering::SeqCst) == 0 {
        end_now();
    }
}

/// Ends the process once its mount is gone (the watcher first: see `crate::watcher`).
fn end_now() -> ! {
    crate::watcher::dismiss();
    sys::exit_now(0)
}

struct Worker {
    /// This thread's index, and the readers it belongs to (None: it reads by itself,
    /// blocking).
    me: usize,
    readers: Option<Arc<Readers>>,
    fs: Arc<UnionFs>,
    ch: Channel,
    /// Poll (non-blocking fd) this long after a request before sleeping in poll(2).
    spin: Option<Duration>,
    access: Access,
    buf_size: usize,
    /// Started for a long request (see `long_work`): it ends once not needed.
    extra: bool,
}

impl Worker {
    /// Starts the worker on a thread of its own.
    fn spawn(self) -> std::io::Result<std::thread::JoinHandle<std::io::Result<()>>> {
        std::thread::Builder::new()
            .name(format!("fuse-{}", self.me))
            .spawn(move || self.serve())
    }

    fn serve(self) -> std::io::Result<()> {
        let res = self.serve_requests();
        if matches!(res, Ok(true)) {
            // An extra worker that is not needed any more: the others serve on.
            return Ok(());
        }
        if matches!(res, Ok(false)) {
            mount_gone();
        }
        if let Some(r) = &self.readers {
            r.end();
        }
        res.map(drop)
    }

    /// Serves requests until the mount goes away (false) or, for an extra worker, until it
    /// is not needed (true).
    fn serve_requests(&self) -> std::io::Result<bool> {
        // Zeroed by the allocator: the pages stay untouched until a request needs them.
        let mut buf = vec![0u8; self.buf_size];
        let mut last = Instant::now();
        let mut reading = false;
        loop {
            // Only between requests, and never as the reader.
            if self.extra && !reading && longwork::extra_may_leave() {
                return Ok(true);
            }
            if let Some(r) = &self.readers
                && !reading
            {
                if !r.take(self.me) {
                    return Ok(false);
                }
                reading = true;
                last = Instant::now();
            }
            let n = match sys::read_dev(self.ch.fd(), &mut buf) {
                Ok(n) => n,
                Err(e) => match e.code() {
                    libc::EAGAIN => {
                        if let Some(spin) = self.spin
                            && last.elapsed() < spin
                        {
                            std::thread::yield_now();
                            continue;
                        }
                        if let Some(r) = &self.readers {
                            r.sleeps(self.me, true);
                        }
                        let woke = sys::wait_readable(self.ch.fd());
                        if let Some(r) = &self.readers {
                            r.sleeps(self.me, false);
                        }
                        woke.map_err(io_err)?;
                        last = Instant::now();
                        continue;
                    }
                    // Interrupted, or the request went away before it was read.
                    libc::EINTR | libc::ENOENT => continue,
                    // The mount is gone.
                    libc::ENODEV | libc::ECONNABORTED => return Ok(false),
                    _ => return Err(io_err(e)),
                },
            };
            let msg = &buf[..n];
            let Some(h) = Header::parse(msg) else {
                log::warn!("a malformed request of {n} bytes: answered EIO");
                if let Some(unique) = Header::unique_to_answer(msg) {
                    Reply::new(self.ch.clone(), unique).error(fuser::Errno::EIO);
                }
                continue;
            };
            if let Some(r) = &self.readers {
                reading = r.got(self.me, h.pid, moves_data(h.opcode));
            }
            IN_SERVICE.fetch_add(1, Ordering::SeqCst);
            let more = self.handle(&h, &msg[abi::IN_HEADER..]);
            if IN_SERVICE.fetch_sub(1, Ordering::SeqCst) == 1 && GONE.load(Ordering::SeqCst) {
                end_now();
            }
            if !more {
                return Ok(false);
            }
            if let Some(r) = &self.readers
                && reading
            {
                reading = r.served(self.me);
            }
            last = Instant::now();
        }
    }

    /// Serves one request; false after DESTROY.
    fn handle(&self, h: &Header, body: &[u8]) -> bool {
        // Requests that get no reply.
        match h.opcode {
            op::FORGET | op::BATCH_FORGET => {
                if let Ok(op) = Op::parse(h.opcode, body) {
                    self.dispatch(h, op, None);
                }
                return true;
            }
            op::INTERRUPT => {
                // No answer (see `interrupt`): the interrupted request answers for itself.
                let unique = body
                    .get(..8)
                    .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")));
                log::debug!("request {}: Interrupt of {unique:?}", h.unique);
                if let Some(unique) = unique {
                    longwork::interrupt(unique);
                }
                return true;
            }
            _ => {}
        }
        longwork::serving(h.unique, h.pid);
        let reply = Reply::new(self.ch.clone(), h.unique);
        if h.opcode == op::DESTROY {
            reply.ok();
            return false;
        }
        if !self.allowed(h) {
            reply.error(fuser::Errno::EACCES);
            return true;
        }
        match Op::parse(h.opcode, body) {
            Ok(Op::Init { .. }) => reply.error(fuser::Errno::EIO),
            Ok(op) => {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!(
                        "request {} ino {} uid {} pid {}: {}",
                        h.unique,
                        h.nodeid,
                        h.uid,
                        h.pid,
                        op.brief()
                    );
                }
                self.dispatch(h, op, Some(reply))
            }
            Err(e) => {
                log::debug!("request {}: opcode {} malformed", h.unique, h.opcode);
                reply.error(e)
            }
        }
        true
    }

    /// Has the filesystem serve one request. A panic (a bug) fails that request alone: its
    /// reply, dropped as the panic unwinds, answers EIO, the panic is logged (see
    /// `logger::init`), and this thread serves on.
    fn dispatch(&self, h: &Header, op: Op<'_>, reply: Option<Reply>) {
        let served = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(debug_assertions)]
            panic_for_test_getxattr(&op);
            self.fs.dispatch(h, op, reply)
        }));
        if served.is_err() {
            log::error!(
                "request {} (opcode {}) failed with a panic; answered EIO",
                h.unique,
                h.opcode
            );
        }
    }

    /// `-o allow_root`: requests that carry a caller's identity must come from root or the
    /// owner.
    fn allowed(&self, h: &Header) -> bool {
        let ok_uid = match self.access {
            Access::All => return true,
            Access::RootAndOwner(owner) => h.uid == 0 || h.uid == owner,
        };
        // The kernel may send these without the caller's identity.
        ok_uid
            || matches!(
                h.opcode,
                op::READ
                    | op::WRITE
                    | op::READDIR
                    | op::READDIRPLUS
                    | op::FSYNC
                    | op::FSYNCDIR
                    | op::RELEASE
                    | op::RELEASEDIR
            )
    }
}

/// Debug builds only: a getxattr of this name panics, so that the tests can check that a
/// panic fails one request and nothing else.
#[cfg(debug_assertions)]
fn panic_for_test_getxattr(op: &Op<'_>) {
    if let Op::Getxattr { name, .. } = op {
        panic_for_tests(name.as_encoded_bytes());
    }
}

/// Debug builds only: panics for the xattr name the tests use to ask for a panic (a getxattr
/// of it, or a copy-up of a file that has it).
#[cfg(debug_assertions)]
pub fn panic_for_tests(xattr: &[u8]) {
    if xattr == b"user.unionmount.test.panic" {
        panic!("a panic asked for by a test");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_reader_serving_too_long_has_reading_taken_over() {
        let r = Arc::new(Readers::default());
        assert!(r.take(0));
        // Thread 0 serves a quick request: it stays the reader.
        assert!(r.got(0, 7, false));
        assert!(r.served(0));
        // Now one that keeps it busy: thread 1, watching, takes over.
        assert!(r.got(0, 7, false));
        let r1 = r.clone();
        let t = std::thread::spawn(move || r1.take(1));
        assert!(t.join().unwrap(), "thread 1 reads");
        assert!(!r.served(0), "thread 0 no longer reads");
        r.end();
        assert!(!r.take(0), "nobody reads after the end");
    }

    #[test]
    fn a_request_that_moves_data_hands_reading_on_at_once() {
        let r = Arc::new(Readers::default());
        assert!(r.take(0));
        let r1 = r.clone();
        let t = std::thread::spawn(move || r1.take(1));
        // Thread 1 waits (watching) until thread 0 hands reading on.
        assert!(!r.got(0, 7, true));
        assert!(t.join().unwrap());
        let s = r.lock();
        assert_eq!(s.reader, Some(1));
        assert!(!s.has_watcher);
    }

    #[test]
    fn the_end_releases_every_waiting_thread() {
        let r = Arc::new(Readers::default());
        assert!(r.take(0));
        r.sleeps(0, true);
        let waiting: Vec<_> = (1..4)
            .map(|i| {
                let r = r.clone();
                std::thread::spawn(move || r.take(i))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(20));
        r.end();
        for t in waiting {
            assert!(!t.join().unwrap());
        }
    }
}
