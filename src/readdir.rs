//! Merged directory listings.
//!
//! A listing is the union of the names of every layer of the directory, higher layers winning,
//! with whiteouts, the names they hide and the layer formats' private names removed. Types come
//! from the layers' `d_type`; only character devices (whiteout or not), `.wh.` names and
//! unknown types cost a stat. `d_ino` is the number lookup would give, from the table.
//!
//! An open directory keeps the listing it read at offset 0, so offsets stay valid while the
//! directory changes; reading from offset 0 again (rewinddir) takes a fresh one.

use std::collections::HashSet;
use std::ffi::{CStr, OsString};
use std::os::fd::AsFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::{Arc, Mutex};

use crate::inode::{Node, RealId};
use crate::lookup::Loc;
use crate::sys::{self, Result};
use crate::union::Union;
use crate::whiteout;

pub struct Entry {
    pub name: OsString,
    /// `DT_*` type.
    pub dtype: u8,
    pub ino: u64,
    /// The layer the entry comes from (for `.` and `..`: the directory's top layer).
    pub loc: Loc,
}

pub struct DirHandle {
    pub node: Arc<Node>,
    listing: Mutex<Option<Arc<Vec<Entry>>>>,
}

impl DirHandle {
    pub fn new(node: Arc<Node>) -> DirHandle {
        DirHandle {
            node,
            listing: Mutex::new(None),
        }
    }
}

pub fn dtype_of_mode(mode: u32) -> u8 {
    match sys::file_type(mode) {
        libc::S_IFDIR => libc::DT_DIR,
        libc::S_IFREG => libc::DT_REG,
        libc::S_IFLNK => libc::DT_LNK,
        libc::S_IFCHR => libc::DT_CHR,
        libc::S_IFBLK => libc::DT_BLK,
        libc::S_IFIFO => libc::DT_FIFO,
        libc::S_IFSOCK => libc::DT_SOCK,
        _ => libc::DT_UNKNOWN,
    }
}

impl Union {
    /// The merged entries of a directory, without `.` and `..`.
    pub fn merged_entries(&self, dir: &Node) -> Result<Vec<Entry>> {
        let layers = self.dir_layers(dir);
        let single = layers.len() == 1;
        let mut out = Vec::new();
        // Names decided by a higher layer (present or whited out).
        let mut seen: HashSet<Vec<u8>> = HashSet::new();
        for (i, &loc) in layers.iter().enumerate() {
            let last = i + 1 == layers.len();
            let fd = match self.open_in(dir, loc, libc::O_RDONLY | libc::O_DIRECTORY) {
                Ok(fd) => fd,
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) && i > 0 => break,
                Err(e) => return Err(e),
            };
            let dev = match loc {
                Loc::Upper => self.layers.upper()?.dev,
                Loc::Lower(l) => self.layers.lower(l).dev,
            };
            // `.wh.NAME` hides NAME in the layers below, not in its own.
            let mut hidden_below: Vec<Vec<u8>> = Vec::new();
            let mut err = None;
            sys::for_each_dirent(fd.as_fd(), |d| {
                if err.is_some() || d.name == b"." || d.name == b".." {
                    return;
                }
                if whiteout::is_private_name(d.name) {
                    if !last && let Some(n) = whiteout::whited_out_name(d.name) {
                        hidden_below.push(n.to_vec());
                    }
                    return;
                }
                if !single && seen.contains(d.name) {
                    return;
                }
                let mut dtype = d.kind;
                let mut ino = d.ino;
                if dtype == libc::DT_CHR || dtype == libc::DT_UNKNOWN {
                    let Ok(cname) = std::ffi::CString::new(d.name) else {
                        return;
                    };
                    match sys::fstatat(fd.as_fd(), &cname, 0) {
                        Ok(st) => {
                            if whiteout::is_whiteout(&st) {
                                if !single {
                                    seen.insert(d.name.to_vec());
                                }
                                return;
                            }
                            dtype = dtype_of_mode(st.st_mode);
                            ino = st.st_ino;
                        }
                        // Gone since getdents: skip it.
                        Err(e) if e.code() == libc::ENOENT => return,
                        Err(e) => {
                            err = Some(e);
                            return;
                        }
                    }
                }
                if !single {
                    seen.insert(d.name.to_vec());
                }
                out.push(Entry {
                    name: OsString::from_vec(d.name.to_vec()),
                    dtype,
                    ino: self.table.ino_for(RealId { dev, ino }),
                    loc,
                });
            })?;
            if let Some(e) = err {
                return Err(e);
            }
            seen.extend(hidden_below);
        }
        Ok(out)
    }

    /// Number of subdirectories in the merged view (cached on the node).
    pub fn subdir_count(&self, dir: &Node) -> Result<u64> {
        if let Some(n) = dir.state().subdirs {
            return Ok(n);
        }
        let n = self
            .merged_entries(dir)?
            .iter()
            .filter(|e| e.dtype == libc::DT_DIR)
            .count() as u64;
        dir.state().subdirs = Some(n);
        Ok(n)
    }

    /// Adjusts a directory's cached subdirectory count by `delta`.
    pub fn adjust_subdirs(&self, dir: &Node, delta: i64) {
        let mut st = dir.state();
        if let Some(n) = st.subdirs {
            st.subdirs = Some(n.saturating_add_signed(delta));
        }
    }

    /// Whether a directory is empty in the merged view.
    pub fn is_empty_dir(&self, dir: &Node) -> Result<bool> {
        Ok(self.merged_entries(dir)?.is_empty())
    }

    /// The listing of an open directory for a read at `offset`, with `.` and `..` first.
    pub fn dir_listing(&self, h: &DirHandle, offset: u64) -> Result<Arc<Vec<Entry>>> {
        let mut cur = h.listing.lock().unwrap_or_else(|p| p.into_inner());
        if offset == 0 || cur.is_none() {
            let node = &h.node;
            let parent_ino = node
                .state()
                .links
                .first()
                .map(|l| l.parent.ino)
                .unwrap_or(node.ino);
            let top = self.top_loc(node);
            let mut v = vec![
                Entry {
                    name: ".".into(),
                    dtype: libc::DT_DIR,
                    ino: node.ino,
                    loc: top,
                },
                Entry {
                    name: "..".into(),
                    dtype: libc::DT_DIR,
                    ino: parent_ino,
                    loc: top,
                },
            ];
            v.extend(self.merged_entries(node)?);
            *cur = Some(Arc::new(v));
        }
        Ok(cur.clone().expect("filled above"))
    }

    /// Stat of a listed entry in the layer it came from.
    pub fn stat_entry(&self, dir: &Node, e: &Entry) -> Result<sys::Stat> {
        let fd = self.dir_fd(dir, e.loc)?;
        let name = sys::cstr(&e.name)?;
        sys::fstatat(fd.as_fd(), &name, 0)
    }
}

/// `true` for `.` and `..`.
pub fn is_dot(name: &CStr) -> bool {
    let b = name.to_bytes();
    b == b"." || b == b".."
}

pub fn is_dot_name(name: &std::ffi::OsStr) -> bool {
    let b = name.as_bytes();
    b == b"." || b == b".."
}

impl Union {
    /// The node and attributes of a listed entry, for readdirplus (one kernel reference is
    /// taken on the node). A non-directory needs only a stat in the layer it was listed
    /// from; a directory is looked up through every layer to find what it merges.
    pub fn lookup_entry(&self, dir: &Arc<Node>, e: &Entry) -> Result<(Arc<Node>, fuser::FileAttr)> {
        let node = if e.dtype == libc::DT_DIR {
            self.lookup(dir, &e.name)?
        } else {
            let st = self.stat_entry(dir, e)?;
            let id = RealId::of(&st);
            let found = match e.loc {
                Loc::Upper => crate::lookup::Found {
                    st,
                    upper: Some(id),
                    lowers: Vec::new(),
                },
                Loc::Lower(l) => crate::lookup::Found {
                    st,
                    upper: None,
                    lowers: vec![(l, id)],
                },
            };
            let st = found.st;
            let node = self.node_for(dir, &e.name, found);
            return match self.attr(&node, &st) {
                Ok(a) => Ok((node, a)),
                Err(err) => {
                    self.table.unpin(&node, 1);
                    Err(err)
                }
            };
        };
        match self.getattr(&node, None) {
            Ok(a) => Ok((node, a)),
            Err(err) => {
                self.table.unpin(&node, 1);
                Err(err)
            }
        }
    }
}
