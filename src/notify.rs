//! Cache invalidations sent to the kernel from a thread of their own.
//!
//! A notification can need a lock the kernel holds for the very request being served (an entry
//! invalidation takes the parent directory's lock, which LINK, RENAME and CREATE hold), so
//! sending one from inside a handler could deadlock. Handlers queue them here instead.

use std::ffi::OsString;
use std::sync::mpsc;

use fuser::{INodeNo, Notifier};

enum Msg {
    Entry(u64, OsString),
    Inode(u64),
}

pub struct Invalidator {
    tx: mpsc::Sender<Msg>,
    notifier: Notifier,
}

impl Invalidator {
    pub fn start(notifier: Notifier) -> Invalidator {
        let (tx, rx) = mpsc::channel::<Msg>();
        let own = notifier.clone();
        std::thread::Builder::new()
            .name("invalidator".into())
            .spawn(move || {
                for msg in rx {
                    // ENOENT (nothing cached) is already treated as success by fuser; other
                    // failures only mean the kernel keeps a cache entry until it times out.
                    let res = match &msg {
                        Msg::Entry(parent, name) => notifier.inval_entry(INodeNo(*parent), name),
                        Msg::Inode(ino) => notifier.inval_inode(INodeNo(*ino), 0, 0),
                    };
                    if let Err(e) = res {
                        log::debug!("invalidation failed: {e}");
                    }
                }
            })
            .expect("spawn invalidator thread");
        Invalidator { tx, notifier: own }
    }

    /// Drops the kernel's cached attributes of an inode now, before the reply to the current
    /// request. Safe inside a handler: an attribute-only invalidation takes no inode, page or
    /// directory lock.
    pub fn attrs_now(&self, ino: u64) {
        if let Err(e) = self.notifier.inval_inode(INodeNo(ino), -1, 0) {
            log::debug!("attribute invalidation failed: {e}");
        }
    }

    pub fn entry(&self, parent: u64, name: &std::ffi::OsStr) {
        let _ = self.tx.send(Msg::Entry(parent, name.to_owned()));
    }

    pub fn inode(&self, ino: u64) {
        let _ = self.tx.send(Msg::Inode(ino));
    }
}
