//! Streaming a lower file into the kernel's page cache ahead of a sequential reader, on the
//! page-cached path (rootless, `--passthrough off`).
//!
//! There the kernel reads a FUSE file ahead only 128 KiB at a time (only root may raise the
//! mount's `read_ahead_kb`), one READ round trip after another, and each READ's data is
//! copied twice on its way (into the daemon, then into the kernel's page), so a cold
//! sequential read runs below the disk's speed. Once a reader has read `START` bytes of a
//! lower file in order, two threads of the daemon hand the file's data on ahead of it to the
//! kernel's page cache (`FUSE_NOTIFY_STORE`), `WINDOW` at a time, at most two windows past
//! the reader. The data is spliced from the layer file through a pipe into /dev/fuse, so it
//! is copied once, by the kernel. The first page of each window is left out: the reader's
//! miss there is the READ that tells the daemon where it is and lets the next window go.
//!
//! Only data that cannot change is stored: the file's lower layer data, at the node's
//! `data_gen` of the moment the reader's handle was opened on it. A copy-up moves `data_gen`,
//! and a chunk checks it, under the streams' lock, before it starts. The data can change only
//! after a writable open or a truncation, both after a copy-up: their replies wait until the
//! chunks already under way have landed (`after_stop`), so no stored page can overwrite a
//! newer write. They wait without holding a request thread: the reply is sent by the
//! streaming thread whose chunk is the last to land, since a store may itself wait for a
//! READ that only a free request thread can answer.

use std::collections::HashMap;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};

use crate::fuse::abi;
use crate::inode::Node;
use crate::sys;

/// Bytes a reader reads in order before its file is streamed ahead of it.
pub const START: u64 = 1 << 20;
/// Bytes stored ahead per window; the reader is kept within two windows of the stream.
pub const WINDOW: u64 = 4 << 20;
/// Bytes read and stored at a time.
const CHUNK: usize = 1 << 20;
/// Streaming threads: a store costs the kernel a copy of the data, so two chunks in flight
/// keep ahead of a reader where one would not.
const THREADS: usize = 2;
/// Files followed at once (readers being watched and streams).
const TRACKED: usize = 32;
const PAGE: u64 = 4096;

/// A reply (or anything else) that must wait until no store of a node is under way.
pub type Deferred = Box<dyn FnOnce() + Send>;

struct Track {
    node: Arc<Node>,
    /// The lower file's data, and the node's `data_gen` it belongs to.
    fd: Arc<OwnedFd>,
    generation: u64,
    size: u64,
    /// End of the last READ in order, and how many bytes were read in order up to it.
    read_end: u64,
    run: u64,
    /// Streaming: chunks handed out up to `stored`, wanted up to `target`.
    streaming: bool,
    stored: u64,
    target: u64,
    /// Chunks being read or stored; `waiting` run once none is.
    busy: usize,
    stopped: bool,
    waiting: Vec<Deferred>,
    /// Order of last use, for dropping the stalest when full.
    used: u64,
}

#[derive(Default)]
struct Inner {
    tracks: HashMap<u64, Track>,
    clock: u64,
    threads: usize,
}

#[derive(Default)]
pub struct Streams {
    inner: Mutex<Inner>,
    work: Condvar,
    /// Tracks in the map (read without the lock by the paths that would stop them).
    count: AtomicUsize,
    /// The connection's /dev/fuse, for stores spliced from the layer file (no copy through
    /// the daemon's memory); no streaming without it.
    dev: OnceLock<OwnedFd>,
}

/// The size of a store's headers (`fuse_out_header` and `fuse_notify_store_out`).
const STORE_HEADER: usize = abi::OUT_HEADER + 24;
/// Bytes spliced per store: a pipe of 1 MiB (the unprivileged maximum by default) has room
/// for this many pages and the header.
const SPLICED: u64 = 512 << 10;
const PIPE: usize = 1 << 20;

/// A pipe for splicing stores.
struct Pipe {
    r: OwnedFd,
    w: OwnedFd,
}

impl Pipe {
    fn new() -> Option<Pipe> {
        let (r, w) = sys::pipe().ok()?;
        match sys::set_pipe_size(w.as_fd(), PIPE) {
            Ok(got) if got >= PIPE => Some(Pipe { r, w }),
            _ => None,
        }
    }
}

impl Streams {
    /// Enables streaming; called once the session is up, with an fd of its /dev/fuse.
    pub fn start(&self, dev: OwnedFd) {
        let _ = self.dev.set(dev);
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Notes a READ of `len` bytes at `off` served from `fd`, the lower data of `node` at
    /// `generation`, through the page cache.
    pub fn read(
        self: &Arc<Self>,
        node: &Arc<Node>,
        fd: &Arc<OwnedFd>,
        generation: u64,
        off: u64,
        len: u64,
    ) {
        // A file is followed from a full read of its start, if it is large enough to gain;
        // other READs take the lock only while some file is followed.
        let first = off == 0 && len >= 64 << 10;
        if self.dev.get().is_none() || !first && self.count.load(Ordering::SeqCst) == 0 {
            return;
        }
        let size = match first.then(|| sys::fstat(fd.as_fd())) {
            Some(Ok(st)) if st.st_size as u64 > START + WINDOW => Some(st.st_size as u64),
            _ => None,
        };
        let end = off + len;
        let mut g = self.lock();
        g.clock += 1;
        let now = g.clock;
        let mut spawn = false;
        if !g.tracks.contains_key(&node.ino) {
            let Some(size) = size else {
                return;
            };
            if g.tracks.len() >= TRACKED && !evict(&mut g.tracks) {
                return;
            }
            g.tracks.insert(
                node.ino,
                Track {
                    node: node.clone(),
                    fd: fd.clone(),
                    generation,
                    size,
                    read_end: 0,
                    run: 0,
                    streaming: false,
                    stored: 0,
                    target: 0,
                    busy: 0,
                    stopped: false,
                    waiting: Vec::new(),
                    used: now,
                },
            );
            self.count.store(g.tracks.len(), Ordering::SeqCst);
        }
        let t = g.tracks.get_mut(&node.ino).expect("inserted above");
        if t.stopped || t.generation != generation {
            return;
        }
        t.used = now;
        // READs of one reader may arrive a little out of order (several request threads);
        // while streaming, its next READ is the miss at a window's first page, which may be
        // as far ahead as what is stored.
        let slack = 2 * CHUNK as u64;
        let ahead = if t.streaming {
            t.stored.max(t.read_end)
        } else {
            t.read_end
        };
        if off <= ahead + slack && end + slack >= t.read_end {
            if end > t.read_end {
                t.run += end - t.read_end.max(off);
                t.read_end = end;
            }
        } else {
            // Not in order: whoever reads now is not the reader being streamed for (or it
            // went elsewhere). Streaming stops until it has read `START` in order again,
            // rather than storing windows ahead of each random READ.
            t.run = 0;
            t.read_end = end;
            t.streaming = false;
            t.target = 0;
            return;
        }
        if !t.streaming && t.run >= START {
            t.streaming = true;
            t.stored = end;
        }
        if t.streaming {
            // A reader past what is stored has overtaken the stream: go on from where it is.
            t.stored = t.stored.max(end);
            t.target = t.target.max((end + 2 * WINDOW).min(t.size));
            if t.stored < t.target {
                if g.threads < THREADS {
                    g.threads += 1;
                    spawn = true;
                }
                self.work.notify_all();
            }
        }
        drop(g);
        if spawn {
            let me = self.clone();
            let started = std::thread::Builder::new()
                .name("stream".into())
                .spawn(move || me.run());
            if started.is_err() {
                self.lock().threads -= 1;
            }
        }
    }

    /// Runs `then` once no chunk of `ino` is under way, and stops streaming it. The node's
    /// data may change next (a writable open or a truncation after its copy-up).
    pub fn after_stop(&self, ino: u64, then: Deferred) {
        if self.count.load(Ordering::SeqCst) == 0 {
            return then();
        }
        let mut g = self.lock();
        match g.tracks.get_mut(&ino) {
            Some(t) if t.busy > 0 => {
                t.stopped = true;
                t.waiting.push(then);
            }
            Some(_) => {
                g.tracks.remove(&ino);
                self.count.store(g.tracks.len(), Ordering::SeqCst);
                drop(g);
                then();
            }
            None => {
                drop(g);
                then();
            }
        }
    }

    /// The streaming thread: stores chunks of the streams that are behind their target.
    fn run(self: Arc<Self>) {
        // Made when first needed, and again after a failed store (what is left in it goes).
        let mut pipe: Option<Pipe> = None;
        let mut g = self.lock();
        loop {
            let next = g
                .tracks
                .iter()
                .filter(|(_, t)| t.streaming && !t.stopped && t.stored < t.target)
                .max_by_key(|(_, t)| t.used)
                .map(|(ino, _)| *ino);
            let Some(ino) = next else {
                // Nothing to do: sleep until a reader wakes us.
                g = self.work.wait(g).unwrap_or_else(|p| p.into_inner());
                continue;
            };
            let t = g.tracks.get_mut(&ino).expect("found above");
            if t.node.data_gen() != t.generation {
                // Copied up: no new chunk; the track goes once those under way are done.
                t.stopped = true;
                if t.busy == 0 {
                    g.tracks.remove(&ino);
                    self.count.store(g.tracks.len(), Ordering::SeqCst);
                }
                continue;
            }
            // One chunk, not across a window's first page (left for the reader to miss).
            let from = t.stored;
            let next_window = (from / WINDOW + 1) * WINDOW;
            let to = (from + CHUNK as u64).min(next_window).min(t.target);
            t.busy += 1;
            t.stored = to;
            let (fd, node) = (t.fd.clone(), t.node.clone());
            drop(g);
            let ok = self.store(&mut pipe, &fd, node.ino, from, to);
            g = self.lock();
            let Some(t) = g.tracks.get_mut(&ino) else {
                continue;
            };
            t.busy -= 1;
            if !ok {
                t.stopped = true;
            }
            let done = t.stopped || (t.stored >= t.size && t.streaming);
            if done && t.busy == 0 {
                let t = g.tracks.remove(&ino).expect("present");
                self.count.store(g.tracks.len(), Ordering::SeqCst);
                drop(g);
                for then in t.waiting {
                    then();
                }
                g = self.lock();
            }
        }
    }

    /// Stores `[from, to)` of `fd` in the kernel's cache of inode `ino`, leaving out a page
    /// that starts a window. False when streaming this node should stop.
    ///
    /// Without a pipe (none to be had) nothing is stored: copying through the daemon instead
    /// was measured to gain nothing.
    fn store(&self, pipe: &mut Option<Pipe>, fd: &OwnedFd, ino: u64, from: u64, to: u64) -> bool {
        let Some(dev) = self.dev.get() else {
            return false;
        };
        let mut from = if from % WINDOW == 0 {
            from + PAGE
        } else {
            from
        };
        if pipe.is_none() {
            *pipe = Pipe::new();
        }
        let Some(p) = pipe else {
            return false;
        };
        while from < to {
            let end = (from + SPLICED).min(to);
            if let Err(e) = splice_store(p, dev, fd, ino, from, (end - from) as usize) {
                // A header or data may be left in the pipe (a failed read of the layer file
                // too can be ENOENT): it goes, and the next chunk gets a new one. ENOENT from
                // /dev/fuse means the kernel no longer has the inode.
                if e != sys::Errno::ENOENT {
                    log::debug!("storing ahead of a reader failed: {e:?}");
                }
                *pipe = None;
                return false;
            }
            from = end;
        }
        true
    }
}

/// Stores `len` bytes of `fd` at `off` in the kernel's cache of inode `ino`: the header is
/// written to the pipe, the data spliced from the layer file into it (the pipe takes the page
/// cache's pages, no copy), and the whole message spliced into /dev/fuse, where the kernel
/// copies the data once into the FUSE file's pages.
fn splice_store(
    p: &Pipe,
    dev: &OwnedFd,
    fd: &OwnedFd,
    ino: u64,
    off: u64,
    len: usize,
) -> sys::Result<()> {
    let total = STORE_HEADER + len;
    let mut hdr = [0u8; STORE_HEADER];
    hdr[..abi::OUT_HEADER].copy_from_slice(&abi::out_header(total, abi::NOTIFY_STORE, 0));
    hdr[16..24].copy_from_slice(&ino.to_ne_bytes());
    hdr[24..32].copy_from_slice(&off.to_ne_bytes());
    hdr[32..36].copy_from_slice(&(len as u32).to_ne_bytes());
    sys::write_all(p.w.as_fd(), &hdr)?;
    let mut at = off as i64;
    let mut put = 0;
    while put < len {
        match sys::splice(fd.as_fd(), Some(&mut at), p.w.as_fd(), len - put)? {
            0 => return Err(sys::Errno::EIO),
            n => put += n,
        }
    }
    if sys::splice(p.r.as_fd(), None, dev.as_fd(), total)? != total {
        return Err(sys::Errno::EIO);
    }
    Ok(())
}

/// Drops the least recently used track with no chunk under way; false if all have one.
fn evict(tracks: &mut HashMap<u64, Track>) -> bool {
    let stalest = tracks
        .iter()
        .filter(|(_, t)| t.busy == 0)
        .min_by_key(|(_, t)| t.used)
        .map(|(ino, _)| *ino);
    match stalest {
        Some(ino) => tracks.remove(&ino).is_some(),
        None => false,
    }
}
