//! unionmount: an OverlayFS-compatible union filesystem in user space.
//!
//! Read-only lower layers and an optional writable upper layer are merged into one tree and
//! served through FUSE. The modules follow the concerns of kernel overlayfs: `layer` and
//! `whiteout` (on-disk formats), `inode` (the inode table, with `compact` storage for its
//! nodes), `lookup` (resolution through the layers), `readdir`, `copy_up`, `dir` (namespace
//! changes, with `grant` for a daemon without privileges), `attr`, `file`; `fuse` speaks the FUSE protocol and `fs` adapts the whole to it, `config` and `mount` take a
//! command line to a live mount.

pub mod acl;
pub mod attr;
pub mod compact;
pub mod config;
pub mod copy_up;
pub mod dir;
pub mod fdcache;
pub mod file;
pub mod fs;
pub mod fuse;
pub mod grant;
pub mod hardlinks;
pub mod idmap;
pub mod inode;
pub mod killpriv;
pub mod layer;
pub mod links;
pub mod logger;
pub mod lookup;
pub mod mount;
pub mod mountinfo;
pub mod notify;
pub mod override_stat;
pub mod prefetch;
pub mod protect;
pub mod readdir;
pub mod stream;
pub mod sys;
pub mod union;
pub mod walkers;
pub mod watcher;
pub mod whiteout;
