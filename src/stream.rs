//! Streaming a lower file into the kernel's page cache ahead of a sequential reader, on the
//! page-cached path (rootless, `--passthrough off`).
//!
//! There the kernel reads a FUSE file ahead only 128 KiB at a time (only root may raise the
//! mount's `read_ahead_kb`), one READ round trip after another (each answered by splicing
//! the file's pages, see `Reply::data_spliced`, but waited for), so a cold sequential read
//! runs below the disk's speed. Once a reader has read `START` bytes of a
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
use crate::sys::{self, Pipe};

/// Bytes a reader reads in order before its file is streamed ahead of it.
pub const START: u64 = 1 << 20;
/// Bytes stored ahead per window; the reader is kept within two windows of the stream.
pub const WINDOW: u64 = 4 << 20;
/// Bytes read and stored at a time.
const CHUNK: usize = 1 << 20;
/// How far apart READs of one reader may be handled and still count as in order
/// (`Follow::note_read`).
const SLACK: u64 = 4 << 20;
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
    /// The reader followed, and what is stored ahead of it.
    f: Follow,
    /// Chunks being read or stored; `waiting` run once none is.
    busy: usize,
    stopped: bool,
    waiting: Vec<Deferred>,
    /// Order of last use, for dropping the stalest when full.
    used: u64,
}

/// A reader followed through a file of `size` bytes, and the stream ahead of it.
#[derive(Debug, Default)]
struct Follow {
    size: u64,
    /// End of the last READ in order, and how many bytes were read in order up to it.
    read_end: u64,
    run: u64,
    /// Streaming: chunks handed out up to `stored`, wanted up to `target`.
    streaming: bool,
    stored: u64,
    target: u64,
}

impl Follow {
    /// Notes a READ of `[off, end)`: follows the reader while it reads in order, and sets
    /// what to store ahead of it once it has read `START` bytes so. True when there is
    /// something to store.
    fn note_read(&mut self, off: u64, end: u64) -> bool {
        // READs of one reader arrive out of order: the kernel keeps its read-ahead in flight
        // (up to two windows of up to 1 MiB READs past the reader) and request threads take
        // them in any order, so the READ that starts the file may come after ones 2.75 MiB
        // on (seen on a loaded machine). While streaming, the reader's next READ is the miss
        // at a window's first page, which may be as far ahead as what is stored.
        let ahead = if self.streaming {
            self.stored.max(self.read_end)
        } else {
            self.read_end
        };
        if off <= ahead + SLACK && end + SLACK >= self.read_end {
            if end > self.read_end {
                self.run += end - self.read_end.max(off);
                self.read_end = end;
            }
        } else {
            // Not in order: whoever reads now is not the reader being streamed for (or it
            // went elsewhere). Streaming stops until it has read `START` in order again,
            // rather than storing windows ahead of each random READ.
            self.run = 0;
            self.read_end = end;
            self.streaming = false;
            self.target = 0;
            return false;
        }
        if !self.streaming && self.run >= START {
            self.streaming = true;
            self.stored = end;
        }
        if !self.streaming {
            return false;
        }
        // A reader past what is stored has overtaken the stream: go on from where it is.
        self.stored = self.stored.max(end);
        self.target = self.target.max((end + 2 * WINDOW).min(self.size));
        self.stored < self.target
    }
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
                    f: Follow {
                        size,
                        ..Follow::default()
                    },
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
        if t.f.note_read(off, end) {
            if g.threads < THREADS {
                g.threads += 1;
                spawn = true;
            }
            self.work.notify_all();
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
                .filter(|(_, t)| t.f.streaming && !t.stopped && t.f.stored < t.f.target)
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
            let from = t.f.stored;
            let next_window = (from / WINDOW + 1) * WINDOW;
            let to = (from + CHUNK as u64).min(next_window).min(t.f.target);
            t.busy += 1;
            t.f.stored = to;
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
            let done = t.stopped || (t.f.stored >= t.f.size && t.f.streaming);
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
            *pipe = Pipe::new(PIPE, PIPE);
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

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;
    const K: u64 = 1 << 10;

    fn reader(size: u64) -> Follow {
        Follow {
            size,
            ..Follow::default()
        }
    }

    /// READs as `(offset, length)`; what `note_read` answered for each.
    fn reads(f: &mut Follow, reads: &[(u64, u64)]) -> Vec<bool> {
        reads.iter().map(|&(o, l)| f.note_read(o, o + l)).collect()
    }

    #[test]
    fn a_reader_in_order_is_streamed_two_windows_ahead() {
        let mut f = reader(24 * MIB);
        let r = reads(&mut f, &[(0, 256 * K), (256 * K, 512 * K), (768 * K, MIB)]);
        assert_eq!(r, [false, false, true]);
        assert!(f.streaming);
        assert_eq!((f.stored, f.target), (1792 * K, 1792 * K + 2 * WINDOW));
    }

    /// Seen on a loaded machine: the request threads took the kernel's read-ahead READs up
    /// to 2.75 MiB before the one at 0 (those came before the file was followed), then the
    /// READ at 2.75 MiB. The reader is still in order.
    #[test]
    fn read_ahead_handled_out_of_order_is_still_in_order() {
        let mut f = reader(24 * MIB);
        let r = reads(&mut f, &[(0, 256 * K), (2816 * K, MIB)]);
        assert_eq!(r, [false, true]);
        assert_eq!(f.target, 3840 * K + 2 * WINDOW);
        // The READs between, handled last, change nothing.
        let r = reads(
            &mut f,
            &[(256 * K, 512 * K), (768 * K, MIB), (1792 * K, MIB)],
        );
        assert_eq!(r, [true, true, true]);
        assert!(f.streaming);
        assert_eq!(f.target, 3840 * K + 2 * WINDOW);
    }

    #[test]
    fn a_read_far_away_stops_the_stream() {
        let mut f = reader(64 * MIB);
        reads(&mut f, &[(0, MIB), (MIB, MIB)]);
        assert!(f.streaming);
        // Within what is stored (a window's first page) the reader is still followed.
        f.stored = f.target;
        assert!(f.note_read(2 * WINDOW, 2 * WINDOW + 4 * K));
        // Far past what is stored, or far behind the reader: someone else.
        assert!(!f.note_read(40 * MIB, 40 * MIB + 4 * K));
        assert!(!f.streaming);
        assert_eq!((f.run, f.target), (0, 0));
        reads(&mut f, &[(40 * MIB + 4 * K, MIB)]);
        assert!(!f.note_read(MIB, MIB + 4 * K));
        assert!(!f.streaming);
    }

    #[test]
    fn random_reads_never_start_a_stream() {
        let mut f = reader(1 << 30);
        let mut x: u64 = 12345;
        for _ in 0..10_000 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let off = ((x >> 33) % (1 << 30)) & !4095;
            assert!(!f.note_read(off, off + 4 * K), "at {off:#x}");
        }
    }
}
