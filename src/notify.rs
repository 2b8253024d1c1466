//! Cache invalidations sent to the kernel from a thread of their own.
//!
//! A notification can need a lock the kernel holds for the very request being served (an entry
//! invalidation takes the parent directory's lock, which LINK, RENAME and CREATE hold), so
//! sending one from inside a handler could deadlock. Handlers queue them here instead.

use std::ffi::OsString;
use std::sync::mpsc;

use crate::fuse::Notifier;

enum Msg {
    Entry(u64, OsString),
    Inode(u64),
    Pages(u64, i64, i64),
}

pub struct Invalidator {
    tx: mpsc::Sender<Msg>,
    notifier: Notifier,
}

impl Invalidator {
    pub fn start(notifier: Notifier) -> std::io::Result<Invalidator> {
        let (tx, rx) = mpsc::channel::<Msg>();
        let own = notifier.clone();
        std::thread::Builder::new()
            .name("invalidator".into())
            .spawn(move || {
                for msg in rx {
                    // ENOENT (nothing cached) is already treated as success; other
                    // failures only mean the kernel keeps a cache entry until it times out.
                    let res = match &msg {
                        Msg::Entry(parent, name) => notifier.inval_entry(*parent, name),
                        Msg::Inode(ino) => notifier.inval_inode(*ino, 0, 0),
                        Msg::Pages(ino, off, len) => notifier.inval_inode(*ino, *off, *len),
                    };
                    if let Err(e) = res {
                        log::debug!("invalidation failed: {e}");
                    }
                }
            })?;
        Ok(Invalidator { tx, notifier: own })
    }

    /// Drops the kernel's cached attributes of an inode now, before the reply to the current
    /// request. Safe inside a handler: an attribute-only invalidation takes no inode, page or
    /// directory lock.
    pub fn attrs_now(&self, ino: u64) {
        if let Err(e) = self.notifier.inval_inode(ino, -1, 0) {
            log::debug!("attribute invalidation failed: {e}");
        }
    }

    pub fn entry(&self, parent: u64, name: &std::ffi::OsStr) {
        let _ = self.tx.send(Msg::Entry(parent, name.to_owned()));
    }

    pub fn inode(&self, ino: u64) {
        let _ = self.tx.send(Msg::Inode(ino));
    }

    /// Drops the kernel's cached pages of `len` bytes at `off` of an inode (and its
    /// attributes).
    pub fn pages(&self, ino: u64, off: u64, len: u64) {
        let _ = self.tx.send(Msg::Pages(ino, off as i64, len as i64));
    }
}

/// Nodes kept before the least recently used are handed back to the kernel.
pub const NODES_HIGH: usize = 56_000;
/// What trimming brings the table down to.
pub const NODES_LOW: usize = 42_000;

/// Keeps the inode table bounded. The kernel holds every inode it has looked up until memory
/// runs short, and the table holds a node for each; past `NODES_HIGH` nodes, the names of the
/// least recently used ones are invalidated, so the kernel drops the dentries nobody uses,
/// evicts their inodes and forgets them.
///
/// It also ticks the table's clock, frees idle read buffers and closes the fds of forgotten
/// directories. Once a tick finds none of that to do and no request since the last one, it
/// sleeps until a request comes (`Table::stir`): an idle mount wakes nobody.
pub fn start_trimmer(u: std::sync::Arc<crate::union::Union>) -> std::io::Result<()> {
    const TICK: std::time::Duration = std::time::Duration::from_millis(500);
    let union = u.clone();
    let thread = std::thread::Builder::new()
        .name("trimmer".into())
        .spawn(move || {
            let mut last_tick = std::time::Instant::now();
            let mut asleep = false;
            loop {
                if asleep {
                    std::thread::park();
                    asleep = false;
                } else {
                    // Woken early when the table passes NODES_HIGH.
                    std::thread::park_timeout(TICK.saturating_sub(last_tick.elapsed()));
                }
                if last_tick.elapsed() >= TICK {
                    last_tick = std::time::Instant::now();
                    let quiet = u.table.tick();
                    // Read buffers are freed half a second to a second after reads stop.
                    u.handles.read_bufs.release_idle();
                    // Directories the kernel has forgotten keep no fds open.
                    for (serial, locs) in u.table.take_dead_dirs() {
                        for loc in locs {
                            u.fds.remove(serial, loc);
                        }
                    }
                    if quiet && u.table.len() <= NODES_HIGH && u.table.doze() {
                        // Work left just before the doze (whose request saw no `ASLEEP` to
                        // wake) keeps it ticking.
                        if u.handles.read_bufs.any_pooled() || u.table.has_dead_dirs() {
                            u.table.stir();
                        } else {
                            // What the work freed goes back to the system before the sleep
                            // (the allocator keeps freed memory: large listings read by
                            // many streams left an idle daemon at 80-90 MiB).
                            crate::sys::malloc_trim();
                            asleep = true;
                        }
                    }
                }
                let len = u.table.len();
                if len <= NODES_HIGH {
                    u.table.trimmed();
                    continue;
                }
                asleep = false;
                log::debug!("trimmer: {len} nodes, handing back the coldest");
                for (parent, name) in u.table.coldest(len - NODES_LOW) {
                    u.invalidate_entry(parent, &name);
                }
                crate::sys::malloc_trim();
            }
        })?;
    // Woken again once the kernel forgot half of what a trim handed back.
    union.table.set_trimmer(
        thread.thread().clone(),
        NODES_HIGH,
        (NODES_HIGH + NODES_LOW) / 2,
    );
    Ok(())
}
