//! Name resolution down the layers, and opening a node's object in one layer.

use std::ffi::{CStr, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::compact::{Few, Name};
use crate::fdcache::CachedDir;
use crate::inode::{Link, Links, Node, RealId, Redirect, State};
use crate::layer::LowerIdx;
use crate::sys::{self, Errno, Result, Stat};
use crate::union::Union;
use crate::whiteout;

/// Which layer an object is in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Loc {
    Upper,
    Lower(LowerIdx),
}

/// What a lookup found for a name.
pub struct Found {
    /// Stat of the top-most object.
    pub st: Stat,
    pub upper: Option<RealId>,
    pub lowers: Few<(LowerIdx, RealId)>,
    /// Lower layers reached through a redirect (see `State::redirects`).
    pub redirects: Option<Box<[(LowerIdx, Redirect)]>>,
    /// An upper non-directory's: what its `overlay.origin` says (`Union::origin_below`).
    pub origin: Origin,
}

/// What an upper non-directory's `overlay.origin` tells of its number.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    /// It has none (it was made in the upper).
    None,
    /// It names a lower file, which is not the one below it at its name, or one of them has
    /// other names: the copy keeps its own number.
    Elsewhere,
    /// It is a copy of this lower file, below it at its name, neither with other names.
    Here(RealId),
}

/// Where a redirect's path leads in one layer (`Union::walk_redirect`).
enum Walked {
    /// To this directory and the name of the path's last component in it.
    To(Arc<CachedDir>, std::ffi::CString),
    Absent,
    Stop,
}

impl Found {
    pub fn kind(&self) -> u32 {
        sys::file_type(self.st.st_mode)
    }

    pub fn top_id(&self) -> RealId {
        RealId::of(&self.st)
    }

    /// The identity a node of this object is keyed and numbered by: the top-most object's,
    /// except for a copied-up directory. An upper directory that merges a lower one found at
    /// its own name (neither opaque nor redirected) takes that lower directory's, as kernel
    /// overlayfs numbers merged directories by their origin: its number then survives a
    /// remount; readdir gives the same (`Union::merged_entries`). (A copied-up file's origin
    /// is weighed against the numbers the mount gave already: `Union::found_node`.)
    pub fn key_id(&self) -> RealId {
        if self.upper.is_some()
            && self.kind() == libc::S_IFDIR
            && let Some((l, id)) = self.lowers.first()
            && !self
                .redirects
                .as_ref()
                .is_some_and(|r| r.iter().any(|(rl, _)| rl == l))
        {
            return *id;
        }
        self.top_id()
    }

    pub fn top_loc(&self) -> Loc {
        match (self.upper, self.lowers.first()) {
            (Some(_), _) => Loc::Upper,
            (None, Some((l, _))) => Loc::Lower(*l),
            (None, None) => Loc::Upper,
        }
    }
}

const MAX_RETRIES: usize = 16;

/// How long a request waits for a node left nameless by a rename in progress.
const NAMELESS_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// Optimistic probes of a lookup before it takes the directory's lock.
const LOOKUP_TRIES: usize = 4;

/// The parent of the node's first name (none for the root or a node without names).
pub(crate) fn first_parent(node: &Node) -> Option<Arc<Node>> {
    node.state().links.first().map(|l| l.parent.clone())
}

/// Longest a request that found its file gone waits for an unlink of it under way to end
/// (see `Union::stale_if_removed`).
const UNLINK_WAIT: std::time::Duration = std::time::Duration::from_millis(20);

/// How long after an open met a removed file (`Strikes`) the kernel's second walk to the
/// name is expected.
const STRIKE_MS: u64 = 1000;

/// Names an open reached a removed file through (it got ESTALE, and the kernel walks the path
/// again, once). The file the second walk finds at such a name may be removed before its
/// open arrives too, and a second ESTALE reaches the caller (ext4 and kernel overlayfs open
/// the removed file): two threads creating and opening one name while two others unlink it
/// met that about once in 200 opens. The node the second walk's LOOKUP finds is marked, so
/// that its removal holds the object (`Union::hold_object`) and the open succeeds, as on
/// ext4. Removals hold no other unlinked file (holding costs each unlink an open and a
/// close), so names nobody races on cost nothing.
#[derive(Default)]
pub struct Strikes {
    /// The latest deadline (`clock_ms`) in `list`; 0 when it is empty. One load per LOOKUP.
    until: AtomicU64,
    /// (directory number, `name_hash`, deadline).
    list: Mutex<Vec<(u64, u64, u64)>>,
}

/// Most strikes kept at once (the oldest go first).
const MAX_STRIKES: usize = 256;

impl Strikes {
    fn add(&self, dir: u64, name: u64) {
        let until = crate::inode::clock_ms() + STRIKE_MS;
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        // One entry per name: a storm on one name strikes it again and again.
        if let Some(e) = list.iter_mut().find(|e| (e.0, e.1) == (dir, name)) {
            e.2 = until;
        } else {
            if list.len() >= MAX_STRIKES {
                list.remove(0);
            }
            list.push((dir, name, until));
        }
        self.until.store(until, Ordering::SeqCst);
    }

    /// Whether an open met a removed file at `name` in `dir` within `STRIKE_MS`.
    fn struck(&self, dir: u64, name: &OsStr) -> bool {
        let until = self.until.load(Ordering::SeqCst);
        if until == 0 {
            return false;
        }
        let now = crate::inode::clock_ms();
        let mut list = self.list.lock().unwrap_or_else(|p| p.into_inner());
        list.retain(|&(_, _, u)| u > now);
        if list.is_empty() {
            // Unless a strike was added since the load above.
            let _ = self
                .until
                .compare_exchange(until, 0, Ordering::SeqCst, Ordering::SeqCst);
            return false;
        }
        let h = crate::inode::name_hash(name);
        list.iter().any(|&(d, n, _)| d == dir && n == h)
    }
}

impl Union {
    /// Records that a request on `node` answers ESTALE, at its name or, once it has none, the
    /// name it last had (see `Strikes`).
    fn note_strike(&self, node: &Node) {
        let at_name = node
            .state()
            .links
            .first()
            .map(|l| (l.parent.ino, crate::inode::name_hash(&l.name)));
        if let Some((dir, name)) = at_name.or_else(|| node.last_name().map(|(d, n)| (d.ino, n))) {
            self.strikes.add(dir, name);
        }
    }

    /// A LOOKUP found `node` at `name` in `dir`: if an open met a removed file at that name
    /// just before, this is the kernel's second walk, and `node`'s removal is to hold its
    /// object (see `Strikes`). Marked under the directory's lock, which a removal holds from
    /// its choice of what to keep to the name's removal: false if the node lost its last name
    /// before the mark (answered as no entry, the kernel walks to the name once more).
    pub fn looked_up(&self, dir: &Node, name: &OsStr, node: &Node) -> bool {
        if node.is_dir() || !self.strikes.struck(dir.ino, name) {
            return true;
        }
        let _lock = dir.lock_dir();
        node.hold_if_removed();
        !node.state().is_unlinked()
    }

    /// Waits (at most `UNLINK_WAIT`) for a removal of the node's last name that is under way
    /// to end, what it keeps of the object recorded; true if the node was removed. (A split
    /// node's name moved: nothing to wait for.)
    pub(crate) fn await_removal(&self, node: &Node) -> bool {
        let since = std::time::Instant::now();
        while !node.was_removed()
            && !node.is_split()
            && self.tree_snapshot().is_none()
            && since.elapsed() < UNLINK_WAIT
        {
            std::thread::sleep(std::time::Duration::from_micros(20));
        }
        node.was_removed()
    }

    /// ESTALE for a request on a file or symlink whose last name went (unlinked, or replaced
    /// by a rename) between the kernel's path walk and the request, where it found nothing:
    /// the kernel then walks the path again (`LOOKUP_REVAL`) and reaches what the name holds
    /// now, as an open on a local filesystem reaches the old file or the new one and never
    /// fails. An unlink under way (the object gone, the node not yet nameless) is waited for
    /// (at most `UNLINK_WAIT`): its end decides. Directories keep ENOENT (a removed working
    /// directory is not walked to again), and so does a file that still has its name.
    pub(crate) fn stale_if_removed(&self, node: &Node, e: Errno) -> Errno {
        if e.code() == libc::ESTALE && !node.is_dir() {
            // Another object at the name (`at_parent`), or a split node.
            self.note_strike(node);
        }
        if e.code() != libc::ENOENT || node.is_dir() {
            return e;
        }
        self.await_removal(node);
        if node.state().is_unlinked() {
            self.note_strike(node);
            Errno::ESTALE
        } else {
            e
        }
    }
}

/// A directory opened for reading its xattrs: readable, or `O_PATH` where the daemon may not
/// read it (xattrs then go through /proc).
fn open_for_xattrs(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    match sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0) {
        Err(e) if e.code() == libc::EACCES => {
            sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)
        }
        r => r,
    }
}

/// The redirect in force below a directory whose redirect xattr is `value`, where `current`
/// was in force above it: an absolute one is a path from the layers' roots; a relative one
/// replaces the name looked up (the last component of a path in force).
fn next_redirect(current: Option<Redirect>, value: &[u8]) -> Result<Redirect> {
    let (absolute, parts) = whiteout::parse_redirect(value)?;
    let mut parts = parts.into_iter().map(|p| Name::new(OsStr::from_bytes(p)));
    if absolute {
        return Ok(Redirect::Path(parts.collect()));
    }
    let name = parts.next().ok_or(Errno::EINVAL)?;
    Ok(match current {
        Some(Redirect::Path(p)) => {
            let mut p = p.into_vec();
            p.pop();
            p.push(name);
            Redirect::Path(p.into())
        }
        _ => Redirect::Name(name),
    })
}

/// Opening a whiteout (a 0/0 character device) fails with ENXIO: for a node that is no
/// device, socket or FIFO, that means its name was deleted or renamed meanwhile.
fn stale_name_error(node: &Node, e: Errno) -> Errno {
    let can_be_enxio = matches!(
        node.kind(),
        libc::S_IFCHR | libc::S_IFBLK | libc::S_IFSOCK | libc::S_IFIFO
    );
    if e.code() == libc::ENXIO && !can_be_enxio {
        Errno::ENOENT
    } else {
        e
    }
}

impl Union {
    /// The identity the node's object has in a layer, when known.
    fn id_in(&self, node: &Node, loc: Loc) -> Option<RealId> {
        let st = node.state();
        match loc {
            Loc::Upper => st.upper,
            Loc::Lower(l) => st.lowers.iter().find(|(x, _)| *x == l).map(|(_, id)| *id),
        }
    }

    /// Runs `f` on the parent's directory fd in `loc` and the node's name there. Names in the
    /// upper can move under a concurrent rename or unlink; when one may have happened, what `f`
    /// reached is checked against the node's known identity (`id_of`) and the call retried.
    fn at_parent<T>(
        &self,
        node: &Node,
        loc: Loc,
        mut f: impl FnMut(BorrowedFd<'_>, &CStr) -> Result<T>,
        id_of: impl Fn(&T) -> Result<Option<RealId>>,
    ) -> Result<T> {
        let mut last = Errno::ENOENT;
        let mut waiting = None;
        for attempt in 0..MAX_RETRIES {
            let snap = self.tree_snapshot();
            let link = {
                let st = node.state();
                match st.links.first() {
                    Some(l) => Some((l.parent.clone(), sys::cstr(&l.name)?)),
                    None => None,
                }
            };
            let Some((parent, name)) = link else {
                // A rename in progress (an exchange unlinks, then links each node again) may
                // be what left it nameless for the moment: wait for the changes in progress
                // to end (a rename holds them for microseconds; its thread may be preempted).
                // A node whose last name went (`was_removed`) or that waited already answers
                // at once.
                let since = *waiting.get_or_insert_with(std::time::Instant::now);
                if loc != Loc::Upper
                    || self.tree_unchanged_since(snap)
                    || node.was_removed()
                    || since.elapsed() >= NAMELESS_WAIT
                {
                    return Err(node.nameless_error());
                }
                last = node.nameless_error();
                while node.state().links.is_empty()
                    && self.tree_snapshot().is_none()
                    && since.elapsed() < NAMELESS_WAIT
                {
                    std::thread::sleep(std::time::Duration::from_micros(20));
                }
                continue;
            };
            let res = self
                .dir_fd(&parent, loc)
                .and_then(|dir| f(dir.as_fd(), &name))
                .map_err(|e| stale_name_error(node, e));
            if loc != Loc::Upper || self.tree_unchanged_since(snap) {
                if matches!(&res, Err(e) if e.code() == libc::ENOENT) && !node.is_dir() {
                    return self.at_another_name(node, loc, &mut f).unwrap_or(res);
                }
                return res;
            }
            match res {
                Ok(v) => {
                    let want = self.id_in(node, loc);
                    match (want, id_of(&v)?) {
                        // The name holds another object now: for a file, the kernel is to
                        // walk the path again (see `stale_if_removed`).
                        (Some(w), Some(got)) if w != got => {
                            last = if node.is_dir() {
                                Errno::ENOENT
                            } else {
                                Errno::ESTALE
                            }
                        }
                        _ => return Ok(v),
                    }
                }
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) => last = e,
                // An error from what the name holds now, if that is another object (a rename
                // put a symlink there: ELOOP from an open, or a file: EINVAL from readlink),
                // is no answer about this node: as for another object reached.
                Err(e) if self.holds_another(&parent, loc, &name, node) => {
                    log::debug!("{e:?} from another object at the name of node {}", node.ino);
                    last = if node.is_dir() {
                        Errno::ENOENT
                    } else {
                        Errno::ESTALE
                    }
                }
                Err(e) => return Err(e),
            }
            if attempt > 2 {
                std::thread::yield_now();
            }
        }
        Err(last)
    }

    /// Whether `name` in the parent's directory in `loc` holds no longer the node's object
    /// (another one, or none); false where the node's identity there is not known.
    fn holds_another(&self, parent: &Node, loc: Loc, name: &CStr, node: &Node) -> bool {
        let Some(want) = self.id_in(node, loc) else {
            return false;
        };
        let Ok(dir) = self.dir_fd(parent, loc) else {
            return false;
        };
        match sys::fstatat(dir.as_fd(), name, libc::AT_SYMLINK_NOFOLLOW) {
            Ok(st) => RealId::of(&st) != want,
            Err(e) => e.code() == libc::ENOENT,
        }
    }

    /// For a lower object: runs `f` on another name that reaches it, in any lower layer. One
    /// inode may sit in several lower layers (layers made with hard links, `cp -al`, or a pull
    /// that links files it already has), and its node then has names from each, while `loc`
    /// is the layer of the name that made it. A candidate is checked to be the object before
    /// `f` runs. None if no name reaches it. (An upper object that is also a lower file is
    /// not looked for by its lower names: a change through one must copy it up, not write
    /// the shared inode.)
    fn at_another_name<T>(
        &self,
        node: &Node,
        loc: Loc,
        f: &mut impl FnMut(BorrowedFd<'_>, &CStr) -> Result<T>,
    ) -> Option<Result<T>> {
        if loc == Loc::Upper {
            return None;
        }
        let want = self.id_in(node, loc)?;
        let links: Vec<(Arc<Node>, std::ffi::CString)> = node
            .state()
            .links
            .iter()
            .filter_map(|l| Some((l.parent.clone(), sys::cstr(&l.name).ok()?)))
            .collect();
        for (parent, name) in links {
            for place in self.dir_layers(&parent) {
                if place == Loc::Upper {
                    continue;
                }
                let Ok(dir) = self.dir_fd(&parent, place) else {
                    continue;
                };
                let here = sys::fstatat(dir.as_fd(), &name, libc::AT_SYMLINK_NOFOLLOW);
                if here.is_ok_and(|st| RealId::of(&st) == want) {
                    return Some(f(dir.as_fd(), &name));
                }
            }
        }
        None
    }

    /// The cached `O_PATH` fd of a directory node in one layer.
    pub fn dir_fd(&self, node: &Node, loc: Loc) -> Result<Arc<CachedDir>> {
        if let Some(fd) = self.fds.get(node.serial, loc) {
            return Ok(fd);
        }
        if !node.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        // Ancestors whose fds are not cached either are opened first, top-down, so that each
        // open below finds its parent's fd cached: a directory thousands of levels deep (a
        // layer's content, or made through the view) must not cost a stack frame per level.
        let mut missing = Vec::new();
        let mut up = self.reached_through_parent(node, loc);
        while let Some(p) = up {
            if p.is_root() || self.fds.get(p.serial, loc).is_some() {
                break;
            }
            up = self.reached_through_parent(&p, loc);
            missing.push(p);
        }
        for p in missing.iter().rev() {
            self.open_dir_fd(p, loc)?;
        }
        self.open_dir_fd(node, loc)
    }

    /// The parent through whose directory in `loc` the node's directory there is opened: its
    /// first parent, unless a redirect's path leads there from the layer's root.
    fn reached_through_parent(&self, node: &Node, loc: Loc) -> Option<Arc<Node>> {
        let st = node.state();
        if let Loc::Lower(l) = loc
            && let Some(Redirect::Path(_)) = st.redirect(l)
        {
            return None;
        }
        st.links.first().map(|l| l.parent.clone())
    }

    /// `dir_fd` of a node whose parent's fd is (normally) cached.
    fn open_dir_fd(&self, node: &Node, loc: Loc) -> Result<Arc<CachedDir>> {
        if let Some(fd) = self.fds.get(node.serial, loc) {
            return Ok(fd);
        }
        let redirect = match loc {
            Loc::Lower(l) => node.state().redirect(l).cloned(),
            Loc::Upper => None,
        };
        let fd = if let (Some(r), Loc::Lower(l)) = (redirect, loc) {
            self.open_redirected(node, l, &r)?
        } else if node.is_root() {
            let layer = match loc {
                Loc::Upper => self.layers.upper()?,
                Loc::Lower(i) => self.layers.lower(i),
            };
            sys::dup(layer.root())?
        } else {
            self.at_parent(
                node,
                loc,
                |dir, name| sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0),
                |fd| Ok(Some(RealId::of(&sys::fstat(fd.as_fd())?))),
            )?
        };
        let fd = Arc::new(CachedDir::new(fd));
        self.fds.insert(node.serial, loc, fd.clone());
        Ok(fd)
    }

    /// Opens a directory node's directory in lower layer `l`, which a layer above redirects.
    fn open_redirected(&self, node: &Node, l: LowerIdx, r: &Redirect) -> Result<OwnedFd> {
        let flags = libc::O_PATH | libc::O_DIRECTORY;
        match r {
            Redirect::Name(name) => {
                let parent = first_parent(node).ok_or_else(|| node.nameless_error())?;
                let dir = self.dir_fd(&parent, Loc::Lower(l))?;
                sys::openat(dir.as_fd(), &sys::cstr(name)?, flags, 0)
            }
            Redirect::Path(parts) => match self.walk_redirect(l, parts)? {
                Walked::To(dir, last) => sys::openat(dir.as_fd(), &last, flags, 0),
                Walked::Absent | Walked::Stop => Err(Errno::ENOENT),
            },
        }
    }

    /// Forgets the cached directory fd of a node in one layer (its directory there was
    /// removed or replaced).
    pub fn drop_dir_fd(&self, node: &Node, loc: Loc) {
        self.fds.remove(node.serial, loc);
    }

    /// Opens a node's object in one layer with `flags` (never following a symlink). Other
    /// than `O_PATH`, a non-directory is opened only if it is a regular file
    /// (`sys::open_regular`): the only ones the daemon opens for their data.
    pub fn open_in(&self, node: &Node, loc: Loc, flags: i32) -> Result<OwnedFd> {
        if node.is_dir() {
            let dir = self.dir_fd(node, loc)?;
            if flags == libc::O_PATH | libc::O_DIRECTORY || flags == libc::O_PATH {
                return sys::dup(dir.as_fd());
            }
            return sys::openat(dir.as_fd(), c".", flags, 0);
        }
        self.at_parent(
            node,
            loc,
            |dir, name| match flags & libc::O_PATH {
                0 => sys::open_regular(dir, name, flags),
                _ => sys::openat(dir, name, flags, 0),
            },
            |fd| Ok(Some(RealId::of(&sys::fstat(fd.as_fd())?))),
        )
    }

    /// Runs `f` with a directory fd and a name (`.` for the directory itself) that reach the
    /// node's object in one layer, for the `*at` calls.
    pub fn with_object<T>(
        &self,
        node: &Node,
        loc: Loc,
        f: impl FnMut(BorrowedFd<'_>, &CStr) -> Result<T>,
    ) -> Result<T> {
        let mut f = f;
        if node.is_dir() {
            let dir = self.dir_fd(node, loc)?;
            return f(dir.as_fd(), c".");
        }
        self.at_parent(node, loc, f, |_| Ok(None))
    }

    /// Stat of a node's object in one layer (as the view shows it: see `apply_override`).
    pub fn stat_in(&self, node: &Node, loc: Loc) -> Result<Stat> {
        if node.is_dir() {
            let dir = self.dir_fd(node, loc)?;
            let mut st = sys::fstat(dir.as_fd())?;
            self.apply_override(dir.as_fd(), c".", &mut st);
            return Ok(st);
        }
        self.at_parent(
            node,
            loc,
            |dir, name| {
                let mut st = sys::fstatat(dir, name, 0)?;
                self.apply_override(dir, name, &mut st);
                Ok(st)
            },
            |st| Ok(Some(RealId::of(st))),
        )
    }

    /// With `xattr_permissions`, shows the owner, mode and type an object's override xattr
    /// records instead of its real ones (regular files and directories carry them).
    pub fn apply_override(&self, dir: BorrowedFd<'_>, name: &CStr, st: &mut Stat) {
        let Some(xattr) = self.override_xattr() else {
            return;
        };
        if !matches!(sys::file_type(st.st_mode), libc::S_IFREG | libc::S_IFDIR) {
            return;
        }
        if let Ok(Some(v)) = sys::getxattr_vec_at(dir, name, xattr)
            && let Some(o) = crate::override_stat::Override::parse(&v)
        {
            o.apply(st);
        }
    }

    /// Where the node's visible object is: the upper if it has one, else its top lower.
    pub fn top_loc(&self, node: &Node) -> Loc {
        let st = node.state();
        match (st.upper, st.top_lower()) {
            (Some(_), _) => Loc::Upper,
            (None, Some(l)) => Loc::Lower(l),
            (None, None) => Loc::Upper,
        }
    }

    /// Opens the node's visible object.
    pub fn open_top(&self, node: &Node, flags: i32) -> Result<(OwnedFd, Loc)> {
        let loc = self.top_loc(node);
        Ok((self.open_in(node, loc, flags)?, loc))
    }

    /// The layers a directory node merges, top-most first.
    pub fn dir_layers(&self, node: &Node) -> Vec<Loc> {
        let st = node.state();
        let mut v = Vec::with_capacity(st.lowers.len() + 1);
        if st.upper.is_some() {
            v.push(Loc::Upper);
        }
        v.extend(st.lowers.iter().map(|(l, _)| Loc::Lower(*l)));
        v
    }

    /// Resolves `name` in the directory `parent` through its layers. `None` when the merged
    /// view has no such name (absent or whited out).
    ///
    /// A directory found may redirect the layers below it (kernel overlayfs's
    /// `overlay.redirect`, left by a rename with `redirect_dir=on`, which kernel overlayfs
    /// follows by default): a name redirects to another name in the parent's directories
    /// below, a path to that path from the root of every layer below.
    pub fn probe(&self, parent: &Node, name: &OsStr) -> Result<Option<Found>> {
        if whiteout::is_private_name(name.as_bytes()) {
            return Ok(None);
        }
        let cname = sys::cstr(name)?;
        let mut layers = self.dir_layers(parent);
        let mut found: Option<Found> = None;
        // The redirect in force for the layers below the current one, and the lower layers
        // reached through one.
        let mut redirect: Option<Redirect> = None;
        let mut redirects: Vec<(LowerIdx, Redirect)> = Vec::new();
        let mut i = 0;
        while i < layers.len() {
            let loc = layers[i];
            i += 1;
            let (dir, here) = match (&redirect, loc) {
                (Some(Redirect::Path(parts)), Loc::Lower(l)) => {
                    match self.walk_redirect(l, parts)? {
                        Walked::To(dir, last) => (dir, last),
                        Walked::Absent => continue,
                        Walked::Stop => break,
                    }
                }
                _ => {
                    let here = match &redirect {
                        Some(Redirect::Name(n)) => sys::cstr(n)?,
                        _ => cname.clone(),
                    };
                    match self.dir_fd(parent, loc) {
                        Ok(fd) => (fd, here),
                        // The parent vanished from this layer (a concurrent removal): nothing
                        // below.
                        Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) => break,
                        Err(e) => return Err(e),
                    }
                }
            };
            let hname = here.to_bytes();
            let st = match sys::fstatat(dir.as_fd(), &here, 0) {
                Ok(st) => st,
                // A redirect's name too long is not found, as the kernel takes it (the
                // name looked up itself answers ENAMETOOLONG, as on ext4).
                Err(e)
                    if matches!(e.code(), libc::ENOENT | libc::ENOTDIR)
                        || (e.code() == libc::ENAMETOOLONG && redirect.is_some()) =>
                {
                    // A `.wh.NAME` hides the name in the layers below; in the last layer
                    // there is nothing below to hide.
                    if i < layers.len() && dir.has_aufs_whiteout(hname, loc != Loc::Upper)? {
                        break;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            if whiteout::is_whiteout(&st) {
                break;
            }
            if loc != Loc::Upper && dir.is_xwhiteout(&here, &st) {
                break;
            }
            let id = RealId::of(&st);
            let is_dir = sys::is_dir(&st);
            match &mut found {
                None => {
                    let mut shown = st;
                    self.apply_override(dir.as_fd(), &here, &mut shown);
                    let mut f = Found {
                        st: shown,
                        upper: None,
                        lowers: Few::new(),
                        redirects: None,
                        origin: Origin::None,
                    };
                    match loc {
                        Loc::Upper => f.upper = Some(id),
                        Loc::Lower(l) => f.lowers.push((l, id)),
                    }
                    if !is_dir {
                        if loc == Loc::Upper && i < layers.len() {
                            f.origin = self.origin_below(parent, &layers[i..], &dir, &here, &st);
                        }
                        found = Some(f);
                        break;
                    }
                    found = Some(f);
                }
                Some(f) => {
                    // Below a directory, only directories merge; anything else ends the stack.
                    if !is_dir {
                        break;
                    }
                    if let Loc::Lower(l) = loc {
                        f.lowers.push((l, id));
                    }
                }
            }
            if let (Some(r), Loc::Lower(l)) = (&redirect, loc) {
                redirects.push((l, r.clone()));
            }
            // Only directories go on. An opaque directory hides what lies below it (no need to
            // ask the bottom layer), and so does a `.wh.NAME` beside the directory NAME in the
            // same lower layer (an image layer that deleted a directory and made a new one in
            // its place; answered from the layer's cached `.wh.` names). In the upper, a
            // directory made over a whiteout is opaque itself.
            let below = match loc {
                Loc::Upper => self.layers.lowers.len(),
                Loc::Lower(l) => self.layers.lowers.len() - usize::from(l) - 1,
            };
            if below == 0 {
                break;
            }
            let child = if i < layers.len() {
                if loc != Loc::Upper && dir.has_aufs_whiteout(hname, true)? {
                    break;
                }
                let child = open_for_xattrs(dir.as_fd(), &here)?;
                if whiteout::is_opaque_dir(child.as_fd())? {
                    break;
                }
                Some(child)
            } else {
                None
            };
            // A redirect may reach layers the parent does not merge (a path), so it is asked
            // wherever any layer lies below.
            let Some(value) = self.redirect_of(child.as_ref(), dir.as_fd(), &here)? else {
                continue;
            };
            let next = next_redirect(redirect.take(), &value)?;
            if let Redirect::Path(_) = next {
                // From the root of every lower layer below this one.
                let first = match loc {
                    Loc::Upper => 0,
                    Loc::Lower(l) => l + 1,
                };
                layers.truncate(i);
                layers.extend((first..self.layers.lowers.len() as LowerIdx).map(Loc::Lower));
            }
            redirect = Some(next);
        }
        if let Some(f) = &mut found
            && !redirects.is_empty()
        {
            f.redirects = Some(redirects.into());
        }
        Ok(found)
    }

    /// What the upper non-directory `name` in `dir` (of stat `st`) is a copy of: the first
    /// object at its own name in the layers `below` (`Origin::Here`), if the copy carries
    /// kernel overlayfs's `overlay.origin` naming it (its file handle). Neither may have
    /// other names: a copy of a lower hard link, or a copy linked since, keeps its own number
    /// (as on kernel overlayfs without `index`), so that no two objects claim one lower file.
    /// A copy renamed away from its lower file's name keeps its own number too (the lower file
    /// is found by name only). One getxattr for an upper file without an origin.
    pub(crate) fn origin_below(
        &self,
        parent: &Node,
        below: &[Loc],
        dir: &CachedDir,
        name: &CStr,
        st: &Stat,
    ) -> Origin {
        if sys::is_dir(st) {
            return Origin::None;
        }
        let mut buf = [0u8; 256];
        let xattr = self.layers.format.origin_xattr();
        let Ok(n) = sys::getxattr_at(dir.as_fd(), name, xattr, &mut buf) else {
            return Origin::None;
        };
        match whiteout::parse_origin(&buf[..n]) {
            Some((kind, fid)) if st.st_nlink == 1 => {
                match self.lower_at_name(parent, below, name, kind, fid) {
                    Some(id) => Origin::Here(id),
                    None => Origin::Elsewhere,
                }
            }
            _ => Origin::Elsewhere,
        }
    }

    /// The first object at `name` in the layers `below`, if it is a one-link non-directory
    /// whose file handle is (`kind`, `fid`).
    fn lower_at_name(
        &self,
        parent: &Node,
        below: &[Loc],
        name: &CStr,
        kind: i32,
        fid: &[u8],
    ) -> Option<RealId> {
        let (ldir, lst) = self
            .first_below(parent, below.iter().copied(), name)
            .ok()??;
        if sys::is_dir(&lst) || lst.st_nlink != 1 {
            return None;
        }
        let (k, f) = sys::file_handle(ldir.as_fd(), name).ok()?;
        (k == kind && f == fid).then(|| RealId::of(&lst))
    }

    /// The first object the layers `locs` of `parent` show at `name`, top-most first, with
    /// its directory there: None if no layer has it or a whiteout (of any form) hides it.
    pub(crate) fn first_below(
        &self,
        parent: &Node,
        locs: impl IntoIterator<Item = Loc>,
        name: &CStr,
    ) -> Result<Option<(Arc<CachedDir>, Stat)>> {
        for loc in locs {
            let dir = match self.dir_fd(parent, loc) {
                Ok(d) => d,
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) => return Ok(None),
                Err(e) => return Err(e),
            };
            match sys::fstatat(dir.as_fd(), name, 0) {
                Ok(st) if whiteout::is_whiteout(&st) || dir.is_xwhiteout(name, &st) => {
                    return Ok(None);
                }
                Ok(st) => return Ok(Some((dir, st))),
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR) => {
                    if dir.has_aufs_whiteout(name.to_bytes(), true)? {
                        return Ok(None);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }

    /// The identity a copied-up file with origin `origin` is numbered by, `top` being its
    /// upper object's: its lower file's (`Origin::Here`), unless the mount numbered the copy
    /// by its upper object already (looked up while renamed away or linked, say), which it
    /// then keeps, so that one object never gets two nodes or two numbers in a mount.
    pub(crate) fn copy_key(&self, origin: Origin, top: RealId) -> RealId {
        match origin {
            Origin::Here(lower) if !self.table.numbered(top) => lower,
            _ => top,
        }
    }

    /// Whether the upper directory `name` in `dir` merges what the lower layers hold at its
    /// own name: it is neither opaque nor redirected (see `Found::key_id`).
    pub(crate) fn merges_at_own_name(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<bool> {
        let child = open_for_xattrs(dir, name)?;
        Ok(!whiteout::is_opaque_dir(child.as_fd())?
            && self.redirect_of(Some(&child), dir, name)?.is_none())
    }

    /// The redirect of the directory `here` in `dir` (through `child`, its fd, when open), if
    /// it has one.
    fn redirect_of(
        &self,
        child: Option<&OwnedFd>,
        dir: BorrowedFd<'_>,
        here: &CStr,
    ) -> Result<Option<Vec<u8>>> {
        let name = self.layers.format.redirect_xattr();
        let value = match child {
            Some(c) => sys::getxattr_vec(c.as_fd(), name),
            None => sys::getxattr_vec_at(dir, here, name),
        };
        match value {
            Err(e)
                if matches!(
                    e.code(),
                    libc::ENODATA | libc::ENOTSUP | libc::EPERM | libc::EACCES
                ) =>
            {
                Ok(None)
            }
            r => r,
        }
    }

    /// Walks a redirect's path from the root of lower layer `l`: to the directory that should
    /// hold its last component, `Absent` if a component is missing there, `Stop` if one is
    /// not a directory, a whiteout or an opaque directory (nothing below it either).
    fn walk_redirect(&self, l: LowerIdx, parts: &[Name]) -> Result<Walked> {
        let Some((last, path)) = parts.split_last() else {
            return Ok(Walked::Absent);
        };
        let mut dir = sys::dup(self.layers.lower(l).root())?;
        for part in path {
            let c = sys::cstr(part)?;
            let st = match sys::fstatat(dir.as_fd(), &c, 0) {
                Ok(st) => st,
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENOTDIR | libc::ENAMETOOLONG) => {
                    return Ok(Walked::Absent);
                }
                Err(e) => return Err(e),
            };
            if !sys::is_dir(&st) {
                return Ok(Walked::Stop);
            }
            dir = open_for_xattrs(dir.as_fd(), &c)?;
            if whiteout::is_opaque_dir(dir.as_fd())? {
                return Ok(Walked::Stop);
            }
        }
        Ok(Walked::To(Arc::new(CachedDir::new(dir)), sys::cstr(last)?))
    }

    /// Looks `name` up in `parent` and returns its node with one more kernel reference.
    pub fn lookup(&self, parent: &Arc<Node>, name: &OsStr) -> Result<Arc<Node>> {
        if !parent.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        if name == "." {
            self.table.pin(parent, 1);
            return Ok(parent.clone());
        }
        if name == ".." {
            let up = parent
                .state()
                .links
                .first()
                .map(|l| l.parent.clone())
                .unwrap_or_else(|| parent.clone());
            self.table.pin(&up, 1);
            return Ok(up);
        }
        Ok(self.lookup_stat(parent, name)?.0)
    }

    /// Like `lookup`, with the stat of the object found (the attributes of the reply).
    pub fn lookup_stat(&self, parent: &Arc<Node>, name: &OsStr) -> Result<(Arc<Node>, Stat)> {
        // A rename or unlink in the upper that ran during the probe may have moved the object
        // found away from this name: a node must not get a name it no longer has. The probe
        // is repeated while changes keep coming, and finally made under the directory's lock,
        // which every change of its names holds.
        for attempt in 0..LOOKUP_TRIES {
            let snap = self.tree_snapshot();
            let found = self.probe(parent, name)?.ok_or(Errno::ENOENT)?;
            let st = found.st;
            let fresh = || self.tree_unchanged_since(snap);
            if let Some(node) = self.node_for_checked(parent, name, found, &fresh) {
                return Ok((node, st));
            }
            if attempt > 0 {
                std::thread::yield_now();
            }
        }
        let _dir = parent.lock_dir();
        let found = self.probe(parent, name)?.ok_or(Errno::ENOENT)?;
        let st = found.st;
        Ok((self.node_for(parent, name, found), st))
    }

    /// The node for an object just found or created at `parent/name`, with one kernel
    /// reference taken.
    pub fn node_for(&self, parent: &Arc<Node>, name: &OsStr, found: Found) -> Arc<Node> {
        let node = self.found_node(found);
        self.give_name(&node, parent, name, &|| true);
        node
    }

    /// Like `node_for`, but a name the node lacks (every name, for a new node) is added only
    /// if `fresh()` holds, asked while no other name change can reach the node. If it does
    /// not, nothing changes and `None` is returned.
    fn node_for_checked(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        found: Found,
        fresh: &dyn Fn() -> bool,
    ) -> Option<Arc<Node>> {
        let node = self.found_node(found);
        if self.give_name(&node, parent, name, fresh) {
            return Some(node);
        }
        self.table.unpin(&node, 1);
        None
    }

    /// The node of a found object (made if new, without names), with one reference taken.
    pub(crate) fn found_node(&self, found: Found) -> Arc<Node> {
        let kind = found.kind();
        let top = found.top_id();
        let id = match found.origin {
            Origin::None => found.key_id(),
            origin => self.copy_key(origin, top),
        };
        let (node, existed) = self.table.get_or_insert(id, kind, || State {
            links: Links::new(),
            upper: found.upper,
            lowers: found.lowers,
            ids: Few::One(id),
            redirects: found.redirects,
        });
        // A copy numbered by its origin is found by its own identity too, as after a
        // copy-up in this mount (a split node's copy is: `split_copy_ino`); a new node of one
        // numbered by its upper object keeps that number for the rest of the mount
        // (`copy_key`).
        if found.origin != Origin::None {
            if id == top {
                if !existed {
                    self.table.keep_number(&node, top);
                }
            } else if !node.state().ids.contains(&top) {
                self.table.add_live_id(&node, top);
            }
        }
        node
    }

    /// The node for an object just made in the upper at `parent/name` (a fresh real inode,
    /// in no lower layer), with one kernel reference taken: never the node of an earlier
    /// object that had the same real inode (see `Table::insert_new`).
    pub(crate) fn new_object_node(&self, parent: &Arc<Node>, name: &OsStr, st: Stat) -> Arc<Node> {
        let id = RealId::of(&st);
        let node = self.new_nameless_node(id, st);
        self.give_name(&node, parent, name, &|| true);
        node
    }

    /// The node for an object just made in the upper without a name (`O_TMPFILE`).
    pub(crate) fn new_nameless_node(&self, id: RealId, st: Stat) -> Arc<Node> {
        self.table
            .insert_new(id, sys::file_type(st.st_mode), || State {
                links: Links::new(),
                upper: Some(id),
                lowers: Few::new(),
                ids: Few::One(id),
                redirects: None,
            })
    }

    /// Makes `parent/name` the node's first name. A name it lacks is added only if `fresh()`
    /// holds, asked under one hold of the node's state with the insertion; returns whether
    /// the node has the name.
    fn give_name(
        &self,
        node: &Node,
        parent: &Arc<Node>,
        name: &OsStr,
        fresh: &dyn Fn() -> bool,
    ) -> bool {
        if node.touch_link(parent.ino, name) {
            return true;
        }
        // The parent is pinned before the state is held (a new name holds a reference).
        self.table.pin(parent, 1);
        let dropped: Links = {
            let mut st = node.state();
            let has = st.links.contains(parent.ino, name);
            if has || !fresh() {
                // A concurrent lookup of the same name added it, or the name is stale.
                drop(st);
                self.table.unpin(parent, 1);
                return has;
            }
            // A directory has one name; the old one is stale.
            let old = if node.is_dir() {
                std::mem::take(&mut st.links)
            } else {
                Links::new()
            };
            let twice = st.links.push_first(Link {
                parent: parent.clone(),
                name: Name::new(name),
            });
            debug_assert!(twice.is_none(), "checked above under the same lock");
            old
        };
        for l in dropped {
            self.table.unpin(&l.parent, 1);
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(r: &Redirect) -> Vec<String> {
        match r {
            Redirect::Name(n) => vec![n.to_string_lossy().into_owned()],
            Redirect::Path(p) => p
                .iter()
                .map(|n| format!("/{}", n.to_string_lossy()))
                .collect(),
        }
    }

    #[test]
    fn redirects_in_force_below() {
        let abs = next_redirect(None, b"/a/b").unwrap();
        assert_eq!(names(&abs), ["/a", "/b"]);
        // A relative redirect below a path replaces its last component.
        assert_eq!(
            names(&next_redirect(Some(abs), b"c").unwrap()),
            ["/a", "/c"]
        );
        let rel = next_redirect(None, b"x").unwrap();
        assert_eq!(names(&rel), ["x"]);
        assert_eq!(names(&next_redirect(Some(rel), b"y").unwrap()), ["y"]);
        assert_eq!(next_redirect(None, b"a/b").err(), Some(Errno::EINVAL));
        assert_eq!(next_redirect(None, b"..").err(), Some(Errno::EACCES));
    }
}
