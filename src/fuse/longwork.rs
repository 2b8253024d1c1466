//! Long work inside a request (the copy of a large file at copy-up): a request thread kept
//! busy for seconds must not hold the rest of the mount, and a caller killed meanwhile must
//! not wait for it. See `long_work`.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// Workers started while long requests hold the others (see `long_work`).
struct Spares {
    /// Workers that serve for the life of the session.
    base: usize,
    /// Requests in long work now.
    long: AtomicUsize,
    /// Extra workers serving now.
    extra: AtomicUsize,
    /// Starts one extra worker; false if it could not.
    start: Box<dyn Fn() -> bool + Send + Sync>,
    /// Most extra workers at once (`max_extra`).
    max_extra: usize,
}

/// The session's spares (one session per process).
static SPARES: OnceLock<Spares> = OnceLock::new();

/// Most extra workers at once: one per long request (a large copy-up, or a wait for one:
/// a burst of writers of one large lower file waits as one request each, as its callers do
/// on kernel overlayfs), bounded by a sixteenth of the open-file limit, as each holds a
/// `/dev/fuse` fd of its own, and by 1024 threads.
fn max_extra() -> usize {
    (crate::sys::nofile_limit() / 16).clamp(64, 1024) as usize
}

thread_local! {
    /// The request this thread serves: its unique id and the caller's thread id.
    static CURRENT: std::cell::Cell<(u64, u32)> = const { std::cell::Cell::new((0, 0)) };
}

/// The requests in long work now (see `long_work`): unique id, caller's thread id, and the
/// flag an INTERRUPT of a killed caller sets.
static LONG: Mutex<Vec<(u64, u32, Arc<AtomicBool>)>> = Mutex::new(Vec::new());

/// An INTERRUPT of request `unique`: a request in long work is cancelled if its caller is
/// being killed (SIGKILL pending), as kernel overlayfs's copy-up stops for a fatal signal
/// only. Any other INTERRUPT is ignored (FUSE lets a filesystem ignore them); a caller with
/// a signal it handles waits for its request, whose answer comes as usual.
pub(super) fn interrupt(unique: u64) {
    let target = LONG
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(u, _, _)| *u == unique)
        .map(|(_, pid, flag)| (*pid, flag.clone()));
    if let Some((pid, flag)) = target
        && killed(pid)
    {
        log::debug!("request {unique}: caller {pid} killed, its long work cancelled");
        flag.store(true, Ordering::SeqCst);
    }
}

/// Whether thread `tid` has SIGKILL pending (it is being killed). Not when /proc cannot
/// tell (a kernel request, another pid namespace's /proc): its copy goes on.
fn killed(tid: u32) -> bool {
    let Some(status) = crate::killpriv::thread_status(tid) else {
        return false;
    };
    const SIGKILL_BIT: u64 = 1 << (libc::SIGKILL - 1);
    ["SigPnd:", "ShdPnd:"].iter().any(|f| {
        crate::killpriv::status_field(&status, f)
            .and_then(|m| u64::from_str_radix(m, 16).ok())
            .is_some_and(|m| m & SIGKILL_BIT != 0)
    })
}

/// Runs `f`, the long part of a request (the copy of a large file at copy-up), making sure
/// that a worker stays free to serve other requests meanwhile: as many such requests as
/// there are workers would otherwise hold the whole mount until one of them ends (kernel
/// overlayfs copies in the caller's own context). An extra worker is started when none would
/// be left free, and ends once it finds itself idle with one free beside it. `f` gets a
/// check that says whether the caller was killed meanwhile (see `interrupt`): it is to stop
/// then, as the answer goes nowhere.
pub fn long_work<T>(f: impl FnOnce(&dyn Fn() -> bool) -> T) -> T {
    let (unique, pid) = CURRENT.with(|c| c.get());
    let flag = Arc::new(AtomicBool::new(false));
    if unique != 0 {
        LONG.lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((unique, pid, flag.clone()));
        // An INTERRUPT that came before the registration found nothing to stop (the kernel
        // sends one per request): a kill it told of shows in the caller's status now.
        if killed(pid) {
            flag.store(true, Ordering::SeqCst);
        }
    }
    // Unregistered when done, also when `f` panics (see `Worker::dispatch`).
    struct Registered(u64);
    impl Drop for Registered {
        fn drop(&mut self) {
            if self.0 != 0 {
                LONG.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .retain(|(u, _, _)| *u != self.0);
            }
        }
    }
    let _registered = Registered(unique);
    let cancelled = || flag.load(Ordering::SeqCst);
    spared(|| f(&cancelled))
}

/// `long_work`'s part that keeps a worker free.
fn spared<T>(f: impl FnOnce() -> T) -> T {
    let Some(s) = SPARES.get() else {
        return f();
    };
    let long = s.long.fetch_add(1, Ordering::SeqCst) + 1;
    let extra = s.extra.load(Ordering::SeqCst);
    if long >= s.base + extra && extra < s.max_extra {
        s.extra.fetch_add(1, Ordering::SeqCst);
        if !(s.start)() {
            s.extra.fetch_sub(1, Ordering::SeqCst);
        }
    }
    // No longer long when done, also when `f` panics.
    struct Done<'a>(&'a AtomicUsize);
    impl Drop for Done<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }
    let _done = Done(&s.long);
    f()
}

impl Spares {
    /// Whether an extra worker may end now (counted out if so): the others leave one free.
    fn leave(&self) -> bool {
        self.extra
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |extra| {
                (extra > 0 && self.base + extra - 1 > self.long.load(Ordering::SeqCst))
                    .then(|| extra - 1)
            })
            .is_ok()
    }
}

/// Starts the spares of a session of `base` workers; `start` starts one extra worker.
pub(super) fn set_spares(base: usize, start: Box<dyn Fn() -> bool + Send + Sync>) {
    let _ = SPARES.set(Spares {
        base,
        long: AtomicUsize::new(0),
        extra: AtomicUsize::new(0),
        start,
        max_extra: max_extra(),
    });
}

/// Whether an extra worker may end now (see `Spares::leave`).
pub(super) fn extra_may_leave() -> bool {
    SPARES.get().is_some_and(|s| s.leave())
}

/// The thread id of the caller whose request the calling worker serves (0 outside requests).
pub fn caller() -> u32 {
    CURRENT.with(|c| c.get().1)
}

/// The request the calling worker serves from now on.
pub(super) fn serving(unique: u64, pid: u32) {
    CURRENT.with(|c| c.set((unique, pid)));
}
