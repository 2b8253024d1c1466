//! Changes to directories: create, mkdir, mknod, symlink, link, unlink, rmdir, rename.
//!
//! Every change lands in the upper layer. Where the merged view must keep hiding something
//! below (a name removed while a lower layer still has it, a directory created where a lower
//! one was removed), the change is built in the work directory and swapped in with one
//! rename, as kernel overlayfs does, so that a crash never shows a lower object again.

use std::cell::Cell;
use std::ffi::{CStr, CString, OsStr};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;

use crate::acl;
use crate::compact::Few;
use crate::grant::{moving_dir, with_owner_bits};
use crate::inode::{Held, Node, RealId};
use crate::layer::WorkDir;
use crate::lookup::{Found, Loc};
use crate::protect;
use crate::sys::{self, Errno, Result, Stat};
use crate::union::Union;
use crate::whiteout::{self, Format};

/// Who asks for a change, as the kernel reports it.
#[derive(Clone, Copy, Debug)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

/// What to create.
#[derive(Clone, Copy)]
pub enum Make<'a> {
    File { mode: u32, umask: u32, flags: i32 },
    Dir { mode: u32, umask: u32 },
    Node { mode: u32, umask: u32, rdev: u64 },
    Symlink { target: &'a CStr },
}

impl Make<'_> {
    fn is_dir(&self) -> bool {
        matches!(self, Make::Dir { .. })
    }

    /// The same request with no umask (creation under a default ACL ignores it).
    fn without_umask(self) -> Self {
        match self {
            Make::File { mode, flags, .. } => Make::File {
                mode,
                umask: 0,
                flags,
            },
            Make::Dir { mode, .. } => Make::Dir { mode, umask: 0 },
            Make::Node { mode, rdev, .. } => Make::Node {
                mode,
                umask: 0,
                rdev,
            },
            s @ Make::Symlink { .. } => s,
        }
    }
}

/// A newly created object.
pub struct Created {
    pub node: Arc<Node>,
    pub st: Stat,
    /// For `Make::File`: the open file.
    pub fd: Option<OwnedFd>,
}

thread_local! {
    /// The calling worker's umask once it has its own (see `set_thread_umask`).
    static OWN_UMASK: Cell<Option<u32>> = const { Cell::new(None) };
}

/// Sets the calling worker's umask (each worker has its own, see `sys::unshare_fs`), so that a
/// default ACL on the upper directory takes precedence over it as on a local filesystem.
/// Only this function changes it, so a worker whose umask is already `mask` makes no call.
pub(crate) fn set_thread_umask(mask: u32) -> Result<()> {
    let mask = mask & 0o777;
    match OWN_UMASK.with(|c| c.get()) {
        Some(cur) if cur == mask => return Ok(()),
        Some(_) => {}
        None => sys::unshare_fs()?,
    }
    sys::umask(mask);
    OWN_UMASK.with(|c| c.set(Some(mask)));
    Ok(())
}

/// What the upper directory holds at a name.
#[derive(Clone, Copy)]
enum UpperSlot {
    Empty,
    /// Empty, but `.wh.NAME` is there.
    AufsWhiteout,
    /// A character device 0/0.
    Whiteout,
    /// Anything else: its stat.
    Object(Stat),
}

fn upper_slot(dir: BorrowedFd<'_>, name: &CStr) -> Result<UpperSlot> {
    match sys::fstatat(dir, name, 0) {
        Ok(st) if whiteout::is_whiteout(&st) => Ok(UpperSlot::Whiteout),
        Ok(st) => Ok(UpperSlot::Object(st)),
        Err(e) if e.code() == libc::ENOENT => {
            let wh = aufs_cname(name)?;
            match sys::fstatat(dir, &wh, 0) {
                Ok(_) => Ok(UpperSlot::AufsWhiteout),
                Err(e) if matches!(e.code(), libc::ENOENT | libc::ENAMETOOLONG) => {
                    Ok(UpperSlot::Empty)
                }
                Err(e) => Err(e),
            }
        }
        Err(e) => Err(e),
    }
}

fn aufs_cname(name: &CStr) -> Result<CString> {
    CString::new(whiteout::aufs_name(OsStr::from_bytes(name.to_bytes()))).map_err(|_| Errno::EINVAL)
}

/// Names the merged view must refuse to create: the layer formats' own.
fn check_new_name(name: &OsStr) -> Result<()> {
    if whiteout::is_private_name(name.as_bytes()) {
        return Err(Errno::EPERM);
    }
    if name == "." || name == ".." {
        return Err(Errno::EEXIST);
    }
    Ok(())
}

/// Whether `gid` is one of the caller's groups (for the set-group-ID rule on create).
fn caller_in_group(caller: &Caller, gid: u32) -> bool {
    if caller.gid == gid {
        return true;
    }
    let Some(status) = crate::killpriv::thread_status(caller.pid) else {
        return false;
    };
    crate::killpriv::status_field(&status, "Groups:")
        .is_some_and(|g| g.split_whitespace().any(|x| x.parse() == Ok(gid)))
}

/// Gives `work/name`, just made for `what` with the umask not applied, what it would have
/// inherited from the default ACL `default` of its real parent; returns its new stat.
fn inherit_acl(
    work: BorrowedFd<'_>,
    name: &CStr,
    default: &[u8],
    what: &Make<'_>,
    st: &Stat,
) -> Result<Stat> {
    let requested = match what {
        Make::File { mode, .. } | Make::Dir { mode, .. } | Make::Node { mode, .. } => *mode,
        Make::Symlink { .. } => return Ok(*st),
    };
    let Some((bits, access)) = acl::inherit(default, requested) else {
        log::warn!("ignoring a malformed default ACL");
        return Ok(*st);
    };
    let f = sys::openat(work, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
    sys::fchmod_path(f.as_fd(), (st.st_mode & 0o7000) | bits)?;
    if let Some(access) = access {
        sys::setxattr(f.as_fd(), acl::ACCESS, &access, 0)?;
    }
    if what.is_dir() {
        sys::setxattr(f.as_fd(), acl::DEFAULT, default, 0)?;
    }
    sys::fstat(f.as_fd())
}

/// Removes what the work directory holds at `name`, whatever it is (a directory moved there
/// to be deleted contains only whiteouts and markers, but is emptied without assuming so).
pub fn remove_tree(dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    match sys::unlinkat(dir, name, 0) {
        Ok(()) => return Ok(()),
        Err(e) if e.code() == libc::ENOENT => return Ok(()),
        Err(e) if e.code() == libc::EISDIR || e.code() == libc::EPERM => {}
        Err(e) => return Err(e),
    }
    // The daemon's own directory, to be deleted: a daemon without privileges (see `grant`)
    // gives itself the access it needs to empty it when refused.
    let open = || sys::openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0);
    let sub = match open() {
        Err(e) if e.code() == libc::EACCES => {
            let p = sys::openat(dir, name, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            sys::fchmod_path(p.as_fd(), 0o700)?;
            open()?
        }
        r => r?,
    };
    let mut names = Vec::new();
    sys::for_each_dirent(sub.as_fd(), |d| {
        if d.name != b"." && d.name != b".." {
            names.push(CString::new(d.name).expect("no NUL in a dirent"));
        }
    })?;
    for n in names {
        match remove_tree(sub.as_fd(), &n) {
            Err(e) if e.code() == libc::EACCES => {
                sys::fchmod_path(sub.as_fd(), 0o700)?;
                remove_tree(sub.as_fd(), &n)?;
            }
            r => r?,
        }
    }
    match sys::unlinkat(dir, name, libc::AT_REMOVEDIR) {
        Err(e) if e.code() == libc::ENOENT => Ok(()),
        r => r,
    }
}

impl Union {
    /// ESTALE if the caller's entry for `name` in `parent` leads to a node that a copy-up of
    /// another name of a lower hard link broke the name off since the caller's lookup (see
    /// `hardlinks::Walks`): the kernel walks to the name again, and acts on what is there now.
    /// Checked once the name's node is found, so that a copy-up before that finding shows
    /// here, and one after it shows in the copy-up of the found node.
    fn kernel_entry_current(&self, parent: &Node, name: &OsStr) -> Result<()> {
        let pid = crate::fuse::longwork::caller();
        match self.walks.broken_walk_to(pid, parent.ino, name) {
            true => Err(Errno::ESTALE),
            false => Ok(()),
        }
    }

    /// Runs `remove` (a removal of a name of `node`) with what it keeps of the object
    /// recorded before the name goes: a request that finds the name gone meanwhile (a
    /// GETATTR of an open's permission check) answers from it at once, instead of waiting for
    /// the removal's bookkeeping, which a thread preempted between its unlink and
    /// `last_name_gone` may hold up for long (see `Union::stat_node`). Dropped again if the
    /// removal fails.
    fn with_held_ahead(
        &self,
        node: Option<&Arc<Node>>,
        held: Option<&Held>,
        remove: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let ahead = node.zip(held);
        if let Some((n, h)) = ahead {
            n.set_held(h.clone());
        }
        let res = remove();
        if let (Err(_), Some((n, _))) = (&res, ahead) {
            n.clear_held();
        }
        res
    }

    fn check_writable(&self) -> Result<()> {
        if self.layers.read_only() {
            Err(Errno::EROFS)
        } else {
            Ok(())
        }
    }

    /// Writes a whiteout for `name` into the upper directory `dir`. As in kernel overlayfs, it
    /// is made in the work directory and moved into place, so that it takes nothing from
    /// `dir`: not the group of a set-group-ID directory, not a default ACL.
    fn make_whiteout(&self, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
        let work = self.layers.work()?;
        let tmp = self.whiteout_in_work(work)?;
        let (target, flags) = match self.layers.format {
            // A stale `.wh.NAME` left there is replaced.
            Format::Aufs => (aufs_cname(name)?, 0),
            _ => (name.to_owned(), libc::RENAME_NOREPLACE),
        };
        if let Err(e) = sys::renameat2(work.fd(), &tmp, dir, &target, flags) {
            let _ = sys::unlinkat(work.fd(), &tmp, 0);
            return Err(e);
        }
        Ok(())
    }

    /// Makes a whiteout in the upper's format (a char 0/0 device, or the empty file an aufs
    /// `.wh.NAME` is) under a fresh name in the work directory, and returns that name.
    fn whiteout_in_work(&self, work: &WorkDir) -> Result<CString> {
        let tmp = work.temp_name();
        match self.layers.format {
            Format::Aufs => drop(sys::openat(
                work.fd(),
                &tmp,
                libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY,
                0o600,
            )?),
            _ => sys::mknodat(work.fd(), &tmp, libc::S_IFCHR, 0)?,
        }
        Ok(tmp)
    }

    /// Marks `dir`'s upper directory (`fd`) `overlay.impure`, as kernel overlayfs marks the
    /// parent of every copy-up and the new parent of a copy moved by a rename: a kernel
    /// overlayfs mount of the upper then numbers the entries of its listings as their stat
    /// does (a copy keeps its lower file's number). Once per directory while its node lives;
    /// nothing where the upper takes no such xattr.
    pub(crate) fn mark_impure(&self, dir: &Node, fd: BorrowedFd<'_>) {
        let e = dir.extra();
        if e.impure.load(std::sync::atomic::Ordering::Relaxed) {
            return;
        }
        // A daemon without privileges needs write access to the directory for a `user.`
        // xattr (a read-only lower directory copied up stays read-only).
        let name = self.layers.format.impure_xattr();
        let set = || sys::setxattr(fd, name, b"y", 0);
        match with_owner_bits(fd, 0o200, set, Some((self, dir))) {
            Ok(()) => e.impure.store(true, std::sync::atomic::Ordering::Relaxed),
            Err(err) => log::debug!("marking a directory impure: {err:?}"),
        }
    }

    /// After a rename moved `dir/name` in from another directory: marks `dir` impure (see
    /// `mark_impure`) if the object is a copy (it has an `overlay.origin`).
    fn moved_copy_in(&self, dir: &Node, fd: BorrowedFd<'_>, name: &CStr) {
        let origin = self.layers.format.origin_xattr();
        if sys::getxattr_at(fd, name, origin, &mut []).is_ok() {
            self.mark_impure(dir, fd);
        }
    }

    /// Marks an upper directory opaque in the upper's format.
    /// A directory the caller may move needs no write access for it, its daemon does: see
    /// `grant`. (A renamed directory's own lock is not taken, as renames lock
    /// parents only; a chmod of it through the view at that moment could be undone.)
    /// `node`: its node, if it is in the view.
    fn make_opaque(&self, dir: BorrowedFd<'_>, node: Option<&Node>) -> Result<()> {
        let name = self.layers.format.opaque_xattr();
        let shown = node.map(|n| (self, n));
        // An upper without extended attributes (ramfs): the AUFS marker alone marks it,
        // which every layer is read for.
        let no_xattrs =
            match with_owner_bits(dir, 0o200, || sys::setxattr(dir, name, b"y", 0), shown) {
                Err(e) if e.code() == libc::EOPNOTSUPP => true,
                r => {
                    r?;
                    false
                }
            };
        if self.layers.format == Format::Aufs || no_xattrs {
            let marker = || {
                let flags = libc::O_CREAT | libc::O_WRONLY;
                sys::openat(dir, whiteout::OPAQUE_MARKER, flags, 0o600)
            };
            drop(with_owner_bits(dir, 0o300, marker, shown)?);
        }
        Ok(())
    }

    /// Whether some lower layer of `parent` would show `name` if the upper had nothing there.
    pub fn lower_has(&self, parent: &Node, name: &CStr) -> Result<bool> {
        let lowers: Vec<_> = parent.state().lowers.iter().map(|(l, _)| *l).collect();
        let below = self.first_below(parent, lowers.into_iter().map(Loc::Lower), name)?;
        Ok(below.is_some())
    }

    /// The default ACL of the upper directory `dir`, if a new `what` there would inherit it.
    fn default_acl(&self, dir: BorrowedFd<'_>, what: &Make<'_>) -> Result<Option<Vec<u8>>> {
        if !self.opts.posix_acl || matches!(what, Make::Symlink { .. }) {
            return Ok(None);
        }
        match sys::getxattr_vec(dir, acl::DEFAULT) {
            Ok(v) => Ok(v.map(|v| acl::without_unmapped(&v).unwrap_or(v))),
            Err(e) if matches!(e.code(), libc::EOPNOTSUPP | libc::ENODATA) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates `what` at `dir/name` owned by the caller, and returns its stat (and an open fd
    /// for a file). `parent_st` is the stat of the parent it will live in, as the view shows
    /// it (set-group-ID directories pass their group down).
    fn make_at(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        what: &Make<'_>,
        caller: &Caller,
        parent_st: &Stat,
    ) -> Result<(Stat, Option<OwnedFd>)> {
        let mut fd = None;
        let requested = match what {
            Make::File { mode, umask, flags } => {
                set_thread_umask(*umask)?;
                let mut acc = flags & libc::O_ACCMODE;
                if acc == libc::O_WRONLY && self.writeback_active() {
                    // The kernel may read back pages it caches for writing (see file.rs).
                    acc = libc::O_RDWR;
                }
                let extra = flags & (libc::O_SYNC | libc::O_DSYNC);
                let f = sys::openat(
                    dir,
                    name,
                    libc::O_CREAT | libc::O_EXCL | acc | extra,
                    mode & 0o7777,
                )?;
                fd = Some(f);
                *mode & 0o7777
            }
            Make::Dir { mode, umask } => {
                set_thread_umask(*umask)?;
                sys::mkdirat(dir, name, mode & 0o7777)?;
                *mode & 0o7777
            }
            Make::Node { mode, umask, rdev } => {
                set_thread_umask(*umask)?;
                let device = matches!(sys::file_type(*mode), libc::S_IFCHR | libc::S_IFBLK);
                if device && self.override_xattr().is_some() {
                    // A device the daemon may not make: a regular file carries its type.
                    sys::mknodat(dir, name, libc::S_IFREG | (mode & 0o7777), 0)?;
                } else {
                    whiteout::mknod_at(dir, name, *mode, *rdev)?;
                }
                *mode & 0o7777
            }
            Make::Symlink { target } => {
                sys::symlinkat(target, dir, name)?;
                0o777
            }
        };
        let result = self.own_new(dir, name, what, caller, parent_st, requested);
        match result {
            Ok(st) => Ok((st, fd)),
            Err(e) => {
                let flags = if what.is_dir() { libc::AT_REMOVEDIR } else { 0 };
                let _ = sys::unlinkat(dir, name, flags);
                Err(e)
            }
        }
    }

    /// Gives a just-created object the caller's ownership (and the set-ID bits chown drops).
    fn own_new(
        &self,
        dir: BorrowedFd<'_>,
        name: &CStr,
        what: &Make<'_>,
        caller: &Caller,
        parent_st: &Stat,
        requested: u32,
    ) -> Result<Stat> {
        let map = &self.opts.idmap;
        // A caller whose id has no mapping creates objects owned by the overflow id on
        // disk (the container's "nobody"), as fuse-overlayfs does: host root copying files
        // into a mount of a container with its own ids (`buildah mount`) must succeed.
        let uid = map
            .uid_to_disk(caller.uid)
            .unwrap_or(crate::idmap::OVERFLOW_ID);
        // An empty name: `dir` is the object itself (an unnamed temporary file).
        let here = if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
        let object = || match name.is_empty() {
            true => sys::dup(dir),
            false => sys::openat(dir, name, libc::O_PATH, 0),
        };
        let setgid_parent = parent_st.st_mode & libc::S_ISGID != 0;
        let gid = if setgid_parent {
            parent_st.st_gid
        } else {
            map.gid_to_disk(caller.gid)
                .unwrap_or(crate::idmap::OVERFLOW_ID)
        };
        let st = sys::fstatat(dir, name, here)?;
        if let Some(xattr) = self.override_xattr()
            && matches!(sys::file_type(st.st_mode), libc::S_IFREG | libc::S_IFDIR)
        {
            // xattr_permissions: the caller's ownership and the mode are recorded, the real
            // object stays the daemon's.
            let kind = match what {
                Make::Node { mode, rdev, .. }
                    if matches!(sys::file_type(*mode), libc::S_IFCHR | libc::S_IFBLK) =>
                {
                    let stand_in = if whiteout::is_devzero_standin(*rdev) {
                        0
                    } else {
                        *rdev
                    };
                    Some((sys::file_type(*mode), stand_in))
                }
                _ => None,
            };
            let mut perm = st.st_mode & 0o7777 | (requested & (libc::S_ISUID | libc::S_ISGID));
            if what.is_dir() && setgid_parent {
                perm |= libc::S_ISGID;
            }
            let o = crate::override_stat::Override {
                uid,
                gid,
                perm,
                kind,
            };
            let f = object()?;
            let real_kind = sys::file_type(st.st_mode);
            crate::override_stat::keep_owner_bits(f.as_fd(), real_kind, st.st_mode)?;
            sys::setxattr(f.as_fd(), xattr, o.format().as_bytes(), 0)?;
            let mut shown = sys::fstatat(dir, name, here)?;
            o.apply(&mut shown);
            return Ok(shown);
        }
        let mut mode = st.st_mode & 0o7777;
        if what.is_dir() && setgid_parent {
            // Built in the work directory, the set-group-ID bit was not inherited.
            mode |= libc::S_ISGID;
        }
        if !what.is_dir() && requested & libc::S_ISGID != 0 && setgid_parent && caller.uid != 0 {
            // As inode_init_owner: a member of neither group cannot create set-group-ID files.
            if !caller_in_group(caller, gid) {
                mode &= !libc::S_ISGID;
            }
        }
        let mut changed = false;
        if st.st_uid != uid || st.st_gid != gid {
            match sys::fchownat(dir, name, uid, gid, here) {
                Ok(()) => changed = true,
                // Rootless: owners the daemon cannot give are kept as they are.
                Err(e)
                    if e.code() == libc::EPERM
                        && (map.squashes() || self.override_xattr().is_some()) => {}
                Err(e) => return Err(e),
            }
        }
        let is_link = sys::file_type(st.st_mode) == libc::S_IFLNK;
        if !is_link && (changed || mode != st.st_mode & 0o7777) {
            let cur = sys::fstatat(dir, name, here)?;
            if cur.st_mode & 0o7777 != mode {
                let f = object()?;
                sys::fchmod_path(f.as_fd(), mode)?;
            }
        }
        if changed || !is_link && mode != st.st_mode & 0o7777 {
            sys::fstatat(dir, name, here)
        } else {
            Ok(st)
        }
    }

    /// create/mkdir/mknod/symlink.
    pub fn create(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        what: Make<'_>,
        caller: &Caller,
    ) -> Result<Created> {
        self.check_writable()?;
        check_new_name(name)?;
        if !parent.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        protect::check_add_entry(self.prot(parent)?)?;
        let mut what = what;
        if let Make::Node { mode, rdev, .. } = &mut what
            && sys::file_type(*mode) == libc::S_IFCHR
        {
            // 0/0 would read back as a whiteout: it is stored as a stand-in, which is therefore
            // the one device number that cannot be created as itself.
            if whiteout::is_devzero_standin(*rdev) {
                return Err(Errno::EPERM);
            }
            if *rdev == 0 {
                *rdev = whiteout::DEVZERO_STANDIN;
            }
        }
        self.copy_up(parent)?;
        let cname = sys::cstr(name)?;
        // The kernel has just looked the name up and found nothing, and holds the directory
        // locked while it creates: only what the upper holds there needs checking.
        let _lock = parent.lock_dir();
        let dir = self.dir_fd(parent, Loc::Upper)?;
        // As the view shows it: with xattr_permissions a set-group-ID bit and group are in
        // the parent's override.
        let pst = self.stat_fd(dir.as_fd())?;
        // Where no lower layer merges into the directory, a whiteout in it hides nothing: the
        // object is made straight away, and the name is looked at only if it is taken (by
        // an object, or by a whiteout left from an earlier stack of layers).
        let made = if parent.state().has_lower() {
            None
        } else {
            match self.make_at(dir.as_fd(), &cname, &what, caller, &pst) {
                Err(e) if e.code() == libc::EEXIST => None,
                r => Some(r?),
            }
        };
        let (st, fd) = match made {
            Some(made) => made,
            None => match upper_slot(dir.as_fd(), &cname)? {
                UpperSlot::Object(_) => return Err(Errno::EEXIST),
                UpperSlot::Empty => self.make_at(dir.as_fd(), &cname, &what, caller, &pst)?,
                slot => self.make_over_whiteout(dir.as_fd(), &cname, what, caller, &pst, slot)?,
            },
        };
        let node = self.new_object_node(parent, name, st);
        // A new object has no protection flags: none to read before its first change.
        node.set_prot(Some(0));
        self.dir_changed(parent);
        if what.is_dir() {
            self.adjust_subdirs(parent, 1);
        }
        Ok(Created { node, st, fd })
    }

    /// open(2) with O_TMPFILE in `parent`: an unnamed regular file in the upper directory,
    /// owned as a created file is, which linkat(2) may give a name later.
    pub fn tmpfile(
        &self,
        parent: &Arc<Node>,
        mode: u32,
        umask: u32,
        flags: i32,
        caller: &Caller,
    ) -> Result<Created> {
        self.check_writable()?;
        if !parent.is_dir() {
            return Err(Errno::ENOTDIR);
        }
        protect::check_add_entry(self.prot(parent)?)?;
        self.copy_up(parent)?;
        let dir = self.dir_fd(parent, Loc::Upper)?;
        let pst = self.stat_fd(dir.as_fd())?;
        set_thread_umask(umask)?;
        let mut acc = flags & libc::O_ACCMODE;
        if acc == libc::O_WRONLY && self.writeback_active() {
            // The kernel may read back pages it caches for writing (see file.rs).
            acc = libc::O_RDWR;
        }
        let extra = flags & (libc::O_SYNC | libc::O_DSYNC);
        let f = sys::openat(
            dir.as_fd(),
            c".",
            libc::O_TMPFILE | acc | extra,
            mode & 0o7777,
        )?;
        let what = Make::File { mode, umask, flags };
        let st = self.own_new(f.as_fd(), c"", &what, caller, &pst, mode & 0o7777)?;
        let node = self.new_nameless_node(RealId::of(&st), st);
        Ok(Created {
            node,
            st,
            fd: Some(f),
        })
    }

    /// Makes `what` at `dir/name` where the upper holds a whiteout (`slot`): built whole in
    /// the work directory and swapped with it. A directory made where a lower one was
    /// removed is opaque, so the old contents never come back.
    fn make_over_whiteout(
        &self,
        dir: BorrowedFd<'_>,
        cname: &CStr,
        what: Make<'_>,
        caller: &Caller,
        pst: &Stat,
        slot: UpperSlot,
    ) -> Result<(Stat, Option<OwnedFd>)> {
        let work = self.layers.work()?;
        let tmp = work.temp_name();
        // Built away from its parent, the object misses the parent's default ACL:
        // it is applied by hand, and then the umask is not (as for any creation
        // under a default ACL).
        let default_acl = self.default_acl(dir, &what)?;
        let here = if default_acl.is_some() {
            what.without_umask()
        } else {
            what
        };
        let (mut st, fd) = self.make_at(work.fd(), &tmp, &here, caller, pst)?;
        let placed = (|| {
            if let Some(default) = &default_acl {
                st = inherit_acl(work.fd(), &tmp, default, &what, &st)?;
                if let Some(xattr) = self.override_xattr() {
                    st = self.inherited_under_override(work.fd(), &tmp, xattr)?;
                }
            }
            if !what.is_dir() {
                return self.place_from_work(&tmp, dir, cname, slot, false);
            }
            let d = sys::openat(work.fd(), &tmp, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            self.make_opaque(d.as_fd(), None)?;
            // A directory changes parent only with write access to it (see
            // `grant`); it is not in the tree yet, no lock is needed.
            let place = || self.place_from_work(&tmp, dir, cname, slot, true);
            with_owner_bits(d.as_fd(), 0o200, place, None)
        })();
        if let Err(e) = placed {
            let _ = remove_tree(work.fd(), &tmp);
            return Err(e);
        }
        Ok((st, fd))
    }

    /// With `xattr_permissions`: the permission bits a default ACL left on `work/name` (see
    /// `inherit_acl`) go into its override, as the filesystem puts them in the mode where it
    /// applies the ACL itself; returns the stat the view shows.
    fn inherited_under_override(
        &self,
        work: BorrowedFd<'_>,
        name: &CStr,
        xattr: &CStr,
    ) -> Result<Stat> {
        let f = sys::openat(work, name, libc::O_PATH | libc::O_NOFOLLOW, 0)?;
        let real = sys::fstat(f.as_fd())?;
        let real_kind = sys::file_type(real.st_mode);
        if !matches!(real_kind, libc::S_IFREG | libc::S_IFDIR) {
            return Ok(real);
        }
        let bits = real.st_mode & 0o777;
        crate::override_stat::keep_owner_bits(f.as_fd(), real_kind, real.st_mode)?;
        let mut o = self.current_override(f.as_fd(), xattr)?;
        o.perm = (o.perm & 0o7000) | bits;
        sys::setxattr(f.as_fd(), xattr, o.format().as_bytes(), 0)?;
        let mut shown = sys::fstat(f.as_fd())?;
        o.apply(&mut shown);
        Ok(shown)
    }

    /// Moves an object built in the work directory (`tmp`) to `dir/name`, where the upper
    /// holds `slot`: over a whiteout (a directory is exchanged with it, the whiteout then
    /// removed), beside an AUFS whiteout (which then goes), or into an empty name.
    fn place_from_work(
        &self,
        tmp: &CStr,
        dir: BorrowedFd<'_>,
        name: &CStr,
        slot: UpperSlot,
        is_dir: bool,
    ) -> Result<()> {
        let work = self.layers.work()?.fd();
        self.tree_change(|| match slot {
            UpperSlot::Whiteout if is_dir => {
                sys::renameat2(work, tmp, dir, name, libc::RENAME_EXCHANGE)?;
                sys::unlinkat(work, tmp, 0)
            }
            UpperSlot::Whiteout => sys::renameat2(work, tmp, dir, name, 0),
            UpperSlot::AufsWhiteout => {
                sys::renameat2(work, tmp, dir, name, libc::RENAME_NOREPLACE)?;
                sys::unlinkat(dir, &aufs_cname(name)?, 0)
            }
            UpperSlot::Empty => sys::renameat2(work, tmp, dir, name, libc::RENAME_NOREPLACE),
            UpperSlot::Object(_) => Err(Errno::EEXIST),
        })
    }

    /// The node for an object in the upper at `parent/name` (in no lower layer) that may
    /// have a node already (a new name of it).
    fn new_upper_node(&self, parent: &Arc<Node>, name: &OsStr, st: Stat) -> Arc<Node> {
        let found = Found {
            st,
            upper: Some(RealId::of(&st)),
            lowers: Few::new(),
            redirects: None,
            origin: crate::lookup::Origin::None,
        };
        self.node_for(parent, name, found)
    }

    /// link(2): a new name for `node` in `newparent`.
    pub fn link(
        &self,
        node: &Arc<Node>,
        newparent: &Arc<Node>,
        newname: &OsStr,
    ) -> Result<Created> {
        self.check_writable()?;
        check_new_name(newname)?;
        if node.is_dir() {
            return Err(Errno::EPERM);
        }
        protect::check_add_entry(self.prot(newparent)?)?;
        self.check_change_prot(node)?;
        // A file whose last name went is never linked again, as the VFS refuses it (it
        // may not have seen the link count drop: a deleted lower file shows its lower one).
        if node.was_removed() {
            return Err(Errno::ENOENT);
        }
        self.copy_up(node)?;
        self.copy_up(newparent)?;
        let cname = sys::cstr(newname)?;
        let _lock = newparent.lock_dir();
        // An unnamed temporary file (O_TMPFILE, never linked: no links at all) is reached
        // through its upper object's open fd. A file deleted while open keeps its ENOENT: its
        // number left the identity map with its last name.
        let src = match self.open_in(node, Loc::Upper, libc::O_PATH) {
            Ok(f) => Arc::new(f),
            Err(e) => {
                let fd = self.nameless_fd(node, None, true, e)?;
                if sys::fstat(fd.as_fd())?.st_nlink != 0 {
                    return Err(e);
                }
                fd
            }
        };
        let src_path = sys::proc_fd_path(src.as_fd());
        let dir = self.dir_fd(newparent, Loc::Upper)?;
        let cwd = sys::at_fdcwd();
        match upper_slot(dir.as_fd(), &cname)? {
            UpperSlot::Object(_) => return Err(Errno::EEXIST),
            UpperSlot::Empty => {
                sys::linkat(cwd, &src_path, dir.as_fd(), &cname, libc::AT_SYMLINK_FOLLOW)?
            }
            UpperSlot::AufsWhiteout => {
                sys::linkat(cwd, &src_path, dir.as_fd(), &cname, libc::AT_SYMLINK_FOLLOW)?;
                sys::unlinkat(dir.as_fd(), &aufs_cname(&cname)?, 0)?;
            }
            UpperSlot::Whiteout => {
                let work = self.layers.work()?;
                let tmp = work.temp_name();
                sys::linkat(cwd, &src_path, work.fd(), &tmp, libc::AT_SYMLINK_FOLLOW)?;
                let slot = UpperSlot::Whiteout;
                if let Err(e) = self.place_from_work(&tmp, dir.as_fd(), &cname, slot, false) {
                    let _ = sys::unlinkat(work.fd(), &tmp, 0);
                    return Err(e);
                }
            }
        }
        let mut st = sys::fstatat(dir.as_fd(), &cname, 0)?;
        self.apply_override(dir.as_fd(), &cname, &mut st);
        let n = self.new_upper_node(newparent, newname, st);
        self.dir_changed(newparent);
        Ok(Created {
            node: n,
            st,
            fd: None,
        })
    }

    /// unlink(2) and rmdir(2).
    pub fn remove(&self, parent: &Arc<Node>, name: &OsStr, want_dir: bool) -> Result<()> {
        self.check_writable()?;
        let found = self.probe(parent, name)?.ok_or(Errno::ENOENT)?;
        let is_dir = sys::is_dir(&found.st);
        let in_upper = found.upper.is_some();
        let found_st = found.st;
        let node = self.node_for(parent, name, found);
        // Protection flags before the type, as the kernel's VFS checks them on an overlayfs
        // inode (on the FUSE inode, which has none, it has already checked the type).
        let res = (|| {
            self.kernel_entry_current(parent, name)?;
            protect::check_remove_entry(self.prot(parent)?, self.prot(&node)?)?;
            if want_dir && !is_dir {
                return Err(Errno::ENOTDIR);
            }
            if !want_dir && is_dir {
                return Err(Errno::EISDIR);
            }
            self.remove_node(parent, name, &node, &found_st, in_upper)
        })();
        self.table.unpin(&node, 1);
        res
    }

    fn remove_node(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        node: &Arc<Node>,
        st: &Stat,
        in_upper: bool,
    ) -> Result<()> {
        let is_dir = sys::is_dir(st);
        if is_dir && !self.is_empty_dir(node)? {
            return Err(Errno::ENOTEMPTY);
        }
        self.copy_up(parent)?;
        // A copy-up of the object in progress ends first (it holds the node's copy lock, then
        // the directory's, as this does): the removal then takes the copy away with a
        // whiteout, as kernel overlayfs's unlink waits for it, instead of finding the name
        // taken when it whites the lower object out (EEXIST).
        let _copy = crate::copy_up::wait_copy_lock(node);
        // Copied up at this name, that is (another name of a lower hard link may have taken
        // the copy, and this one then still shows the lower file).
        let copied_to = node.state().upper.filter(|_| !in_upper);
        let copied = copied_to.is_some_and(|up| {
            let here = sys::cstr(name)
                .and_then(|c| sys::fstatat(self.dir_fd(parent, Loc::Upper)?.as_fd(), &c, 0));
            here.is_ok_and(|st| RealId::of(&st) == up)
        });
        let in_upper = in_upper || copied;
        let upper_st;
        let st = if copied {
            upper_st = self.stat_in(node, Loc::Upper)?;
            &upper_st
        } else {
            st
        };
        if in_upper {
            self.follow_copy_up(node);
        }
        let cname = sys::cstr(name)?;
        let _lock = parent.lock_dir();
        let needs_whiteout = self.lower_has(parent, &cname)?;
        let dir = self.dir_fd(parent, Loc::Upper)?;
        let work = self.layers.work()?;
        let held = self.hold_object(node, (in_upper && !is_dir).then_some(st), false);
        if !is_dir && node.state().links.len() > 1 {
            node.extra().mark_link_drop();
        }
        let ahead = held.clone();
        self.with_held_ahead(Some(node), ahead.as_ref(), || {
            self.tree_change(|| -> Result<()> {
                if !in_upper {
                    self.make_whiteout(dir.as_fd(), &cname)?;
                } else if needs_whiteout && self.layers.format != Format::Aufs {
                    // Swap the object for a whiteout in one step, then delete it in the work dir.
                    let tmp = self.whiteout_in_work(work)?;
                    let exchange = || {
                        sys::renameat2(work.fd(), &tmp, dir.as_fd(), &cname, libc::RENAME_EXCHANGE)
                    };
                    let exchanged = match is_dir {
                        true => moving_dir(dir.as_fd(), &cname, exchange, Some((self, node))),
                        false => exchange(),
                    };
                    if let Err(e) = exchanged {
                        let _ = sys::unlinkat(work.fd(), &tmp, 0);
                        return Err(e);
                    }
                    if let Err(e) = remove_tree(work.fd(), &tmp) {
                        log::warn!("cleaning the work directory: {e:?}");
                    }
                } else {
                    if needs_whiteout {
                        self.make_whiteout(dir.as_fd(), &cname)?;
                    }
                    if is_dir {
                        // It may still hold whiteouts: move it out whole, then empty it.
                        match sys::unlinkat(dir.as_fd(), &cname, libc::AT_REMOVEDIR) {
                            Ok(()) => {}
                            Err(e) if e.code() == libc::ENOTEMPTY => {
                                let tmp = work.temp_name();
                                let out =
                                    || sys::renameat2(dir.as_fd(), &cname, work.fd(), &tmp, 0);
                                moving_dir(dir.as_fd(), &cname, out, Some((self, node)))?;
                                if let Err(e) = remove_tree(work.fd(), &tmp) {
                                    log::warn!("cleaning the work directory: {e:?}");
                                }
                            }
                            Err(e) => return Err(e),
                        }
                    } else {
                        sys::unlinkat(dir.as_fd(), &cname, 0)?;
                    }
                }
                self.table.unlink(node, parent, name);
                if node.state().is_unlinked() {
                    self.last_name_gone(node, parent, name, is_dir || st.st_nlink <= 1, held);
                }
                Ok(())
            })
        })?;
        self.dir_changed(parent);
        if is_dir {
            self.drop_dir_fd(node, Loc::Upper);
            self.adjust_subdirs(parent, -1);
        } else if !node.state().is_unlinked() || node.held().is_some() {
            // The kernel drops its cached link count by one on unlink; a name whited out over
            // a lower object leaves that object's count as it was, so have it asked (kernel
            // overlayfs shows a deleted lower file with its lower link count), as an object
            // with other links does (it can change through them: see `Fs::attr_ttl`).
            self.invalidate_attrs(node.ino);
        }
        Ok(())
    }

    /// After the last name the table knew of `node` (`name` in `parent`) went, with
    /// `object_gone` if its object went with it (else it has names the table does not know,
    /// other names of a hard link): its number stays with the node while the kernel holds it
    /// (`Table::mark_departed`), or the object gets a new one (`Table::renumber_survivor`);
    /// its identities leave the node, and what is kept of it (`held`, see `hold_object`) is
    /// recorded before the last parent, so that `was_removed` tells that it is there (see
    /// `Union::await_removal`).
    fn last_name_gone(
        &self,
        node: &Node,
        parent: &Arc<Node>,
        name: &OsStr,
        object_gone: bool,
        held: Option<Held>,
    ) {
        if object_gone {
            self.table.mark_departed(node);
        } else {
            self.table.renumber_survivor(node);
        }
        self.table.forget_ids(node, true);
        if let Some(h) = held {
            node.set_held(h);
        }
        node.set_last_parent(parent, name);
    }

    /// Before a removal that may take `node`'s last name: what to keep of the object it
    /// shows (`Extra::held`) once the name is gone, for what still holds the node in the
    /// kernel (a working directory, an `O_PATH` file, an open FIFO or device: none of them an
    /// open file of the daemon's). An `O_PATH` fd of it, through which it can be stat-ed, its
    /// xattrs read, reopened through `/proc` and, in the upper, changed, as on ext4 and
    /// kernel overlayfs. But for an upper file or symlink with no other link (`upper_st`,
    /// its stat as the view shows it), which the removal frees, only its attributes: holding
    /// it would keep its inode alive until the kernel forgets the node, an open, an ext4
    /// orphan entry and a close for every unlink (about 3 us each, on the paths trees are
    /// removed by). Its open files, if any, stand for it meanwhile. A file replaced by a
    /// rename (`replaced`) is held all the same: an atomic replace (written beside, renamed
    /// over) must leave the old file openable by a reader whose path walk reached it just
    /// before, as on ext4, and such a reader's open arrives after the rename. So is a file
    /// the kernel walked to again after an open of its name met a removed file (see
    /// `lookup::Strikes`): its open must not fail a second time.
    fn hold_object(&self, node: &Node, upper_st: Option<&Stat>, replaced: bool) -> Option<Held> {
        if node.state().links.len() != 1 {
            return None;
        }
        if let Some(st) = upper_st
            && !replaced
            && !node.holds_if_removed()
            && st.st_nlink <= 1
            && matches!(sys::file_type(st.st_mode), libc::S_IFREG | libc::S_IFLNK)
        {
            let mut st = *st;
            st.st_nlink = 0;
            // The removal changes the inode (ext4 sets its ctime).
            if let Ok(now) = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH) {
                st.st_ctime = now.as_secs() as i64;
                st.st_ctime_nsec = i64::from(now.subsec_nanos());
            }
            return Some(Held::Stat(Box::new(st)));
        }
        let flags = if node.is_dir() {
            libc::O_PATH
        } else {
            libc::O_PATH | libc::O_NOFOLLOW
        };
        self.open_in(node, self.top_loc(node), flags)
            .inspect_err(|e| log::debug!("holding a removed object: {e:?}"))
            .ok()
            .map(|fd| Held::Object(Arc::new(fd)))
    }

    /// rename(2)/renameat2(2) with `RENAME_NOREPLACE`, `RENAME_EXCHANGE` and
    /// `RENAME_WHITEOUT`. The last leaves a character device 0/0 at the old name, as the view
    /// shows devices (kernel overlayfs needs it of its upper layer, so it can be nested on
    /// this mount). The device is made in the work directory first, so that failing to make
    /// it (no space, no right to make devices) refuses the rename, and is moved to the old
    /// name right after the rename.
    pub fn rename(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        flags: u32,
        caller: &Caller,
    ) -> Result<()> {
        self.check_writable()?;
        let exchange = flags & libc::RENAME_EXCHANGE != 0;
        let noreplace = flags & libc::RENAME_NOREPLACE != 0;
        let whiteout = flags & libc::RENAME_WHITEOUT != 0;
        let known = libc::RENAME_EXCHANGE | libc::RENAME_NOREPLACE | libc::RENAME_WHITEOUT;
        if flags & !known != 0 || (exchange && (noreplace || whiteout)) {
            return Err(Errno::EINVAL);
        }
        check_new_name(newname)?;
        let src_found = self.probe(parent, name)?.ok_or(Errno::ENOENT)?;
        let dst_found = self.probe(newparent, newname)?;
        let src = self.node_for(parent, name, src_found);
        let dst = dst_found.map(|f| self.node_for(newparent, newname, f));
        // Both names checked (each check is the walk's one), so that the retry finds both
        // entries new.
        let (from, to) = (
            self.kernel_entry_current(parent, name),
            self.kernel_entry_current(newparent, newname),
        );
        if let Err(e) = from.and(to) {
            self.table.unpin(&src, 1);
            if let Some(d) = &dst {
                self.table.unpin(d, 1);
            }
            return Err(e);
        }
        // Two names of one file: rename(2) does nothing, and leaves no device either.
        let same_file = dst.as_ref().is_some_and(|d| d.ino == src.ino);
        let device = (whiteout && !same_file).then(|| self.build_rename_whiteout(parent, caller));
        let res = match &device {
            Some(Err(e)) => Err(*e),
            _ => self.rename_nodes(
                parent,
                name,
                newparent,
                newname,
                &src,
                dst.as_ref(),
                exchange,
                noreplace,
            ),
        };
        self.table.unpin(&src, 1);
        if let Some(d) = &dst {
            self.table.unpin(d, 1);
        }
        let Some(Ok((tmp, st))) = device else {
            return res;
        };
        let res = res.and_then(|()| self.place_rename_whiteout(parent, name, &tmp, st));
        if res.is_err() {
            let _ = sys::unlinkat(self.layers.work()?.fd(), &tmp, 0);
        }
        res
    }

    /// For RENAME_WHITEOUT: the character device 0/0 (the stand-in on disk) to leave at the
    /// old name in `parent`, made in the work directory with the caller as owner.
    fn build_rename_whiteout(
        &self,
        parent: &Arc<Node>,
        caller: &Caller,
    ) -> Result<(CString, Stat)> {
        self.copy_up(parent)?;
        let dir = self.dir_fd(parent, Loc::Upper)?;
        let pst = sys::fstat(dir.as_fd())?;
        let work = self.layers.work()?;
        let tmp = work.temp_name();
        let device = Make::Node {
            mode: libc::S_IFCHR,
            umask: 0,
            rdev: whiteout::DEVZERO_STANDIN,
        };
        let (st, _) = self.make_at(work.fd(), &tmp, &device, caller, &pst)?;
        Ok((tmp, st))
    }

    /// Moves the device made by `build_rename_whiteout` to the old name, over the whiteout
    /// the rename left there if the name was also in a lower layer.
    fn place_rename_whiteout(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        tmp: &CStr,
        st: Stat,
    ) -> Result<()> {
        let cname = sys::cstr(name)?;
        let _lock = parent.lock_dir();
        let dir = self.dir_fd(parent, Loc::Upper)?;
        let slot = upper_slot(dir.as_fd(), &cname)?;
        self.place_from_work(tmp, dir.as_fd(), &cname, slot, false)?;
        // The kernel moved its entry to the new name and holds none for the device.
        let node = self.new_object_node(parent, name, st);
        self.table.unpin(&node, 1);
        self.dir_changed(parent);
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn rename_nodes(
        &self,
        parent: &Arc<Node>,
        name: &OsStr,
        newparent: &Arc<Node>,
        newname: &OsStr,
        src: &Arc<Node>,
        dst: Option<&Arc<Node>>,
        exchange: bool,
        noreplace: bool,
    ) -> Result<()> {
        if dst.is_some_and(|d| d.ino == src.ino) {
            // Two names of one file: rename(2) does nothing.
            return Ok(());
        }
        if exchange && dst.is_none() {
            return Err(Errno::ENOENT);
        }
        if noreplace && dst.is_some() {
            return Err(Errno::EEXIST);
        }
        // The kernel's VFS checks protection flags before the filesystem is asked.
        protect::check_remove_entry(self.prot(parent)?, self.prot(src)?)?;
        match dst {
            Some(d) => protect::check_remove_entry(self.prot(newparent)?, self.prot(d)?)?,
            None => protect::check_add_entry(self.prot(newparent)?)?,
        }
        // Directories that exist in a lower layer cannot move: mv falls back to copying.
        let lower_dir = |n: &Node| n.is_dir() && n.state().has_lower();
        if lower_dir(src) || (exchange && dst.is_some_and(|d| lower_dir(d))) {
            return Err(Errno::EXDEV);
        }
        if let (Some(d), false) = (dst, exchange) {
            match (src.is_dir(), d.is_dir()) {
                (true, false) => return Err(Errno::ENOTDIR),
                (false, true) => return Err(Errno::EISDIR),
                (true, true) if !self.is_empty_dir(d)? => return Err(Errno::ENOTEMPTY),
                _ => {}
            }
        }
        self.copy_up(src)?;
        if let (Some(d), true) = (dst, exchange) {
            self.copy_up(d)?;
        }
        self.copy_up(parent)?;
        self.copy_up(newparent)?;
        if let (Some(d), false) = (dst, exchange) {
            self.follow_copy_up(d);
        }
        let cname = sys::cstr(name)?;
        let cnew = sys::cstr(newname)?;
        // Directory locks in node order, so two renames never wait on each other.
        let (first, second) = if parent.ino <= newparent.ino {
            (parent, newparent)
        } else {
            (newparent, parent)
        };
        let _l1 = first.lock_dir();
        let _l2 = (first.ino != second.ino).then(|| second.lock_dir());
        let old_dir = self.dir_fd(parent, Loc::Upper)?;
        let new_dir = self.dir_fd(newparent, Loc::Upper)?;
        let work = self.layers.work()?;
        let src_lower_below = self.lower_has(parent, &cname)?;
        let dst_slot = upper_slot(new_dir.as_fd(), &cnew)?;
        // A target that exists in the upper is the replaced node's upper object.
        let held = dst.filter(|_| !exchange).and_then(|d| {
            let upper_st = match &dst_slot {
                UpperSlot::Object(st) if !d.is_dir() => {
                    let mut st = *st;
                    self.apply_override(new_dir.as_fd(), &cnew, &mut st);
                    Some(st)
                }
                _ => None,
            };
            self.hold_object(d, upper_st.as_ref(), true)
        });
        // Whether the replaced object goes with its name (see `Table::mark_departed`); a
        // lower one may have other names.
        let dst_gone = matches!(&dst_slot, UpperSlot::Object(st) if st.st_nlink <= 1);
        if let Some(d) = dst.filter(|d| !exchange && !d.is_dir())
            && d.state().links.len() > 1
        {
            d.extra().mark_link_drop();
        }

        // A directory moved into a merged directory is made opaque, as kernel overlayfs
        // does, so nothing a lower layer has (or gets) under that name merges into it.
        let merged = |n: &Node| n.state().has_lower();
        if src.is_dir() && merged(newparent) {
            let d = sys::openat(old_dir.as_fd(), &cname, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            self.make_opaque(d.as_fd(), Some(src))?;
        }
        if exchange && dst.is_some_and(|d| d.is_dir()) && merged(parent) {
            let d = sys::openat(new_dir.as_fd(), &cnew, libc::O_PATH | libc::O_DIRECTORY, 0)?;
            self.make_opaque(d.as_fd(), dst.map(|d| &**d))?;
        }
        // A directory being replaced may still hold whiteouts, which the real rename refuses:
        // swap it for an empty one first, then delete it in the work directory.
        if !exchange
            && let (Some(d), UpperSlot::Object(_)) = (dst, &dst_slot)
            && d.is_dir()
        {
            let tmp = work.temp_name();
            // The daemon's own directory: not masked by the last caller's umask.
            set_thread_umask(0)?;
            sys::mkdirat(work.fd(), &tmp, 0o700)?;
            let swapped = self.tree_change(|| {
                let exchange = || {
                    let flags = libc::RENAME_EXCHANGE;
                    sys::renameat2(work.fd(), &tmp, new_dir.as_fd(), &cnew, flags)
                };
                moving_dir(new_dir.as_fd(), &cnew, exchange, Some((self, d)))
            });
            if let Err(e) = swapped {
                let _ = sys::unlinkat(work.fd(), &tmp, libc::AT_REMOVEDIR);
                return Err(e);
            }
            if let Err(e) = remove_tree(work.fd(), &tmp) {
                log::warn!("cleaning the work directory: {e:?}");
            }
        }

        let ahead = held.clone();
        self.with_held_ahead(dst, ahead.as_ref(), || {
            self.tree_change(|| -> Result<()> {
                if exchange {
                    sys::renameat2(
                        old_dir.as_fd(),
                        &cname,
                        new_dir.as_fd(),
                        &cnew,
                        libc::RENAME_EXCHANGE,
                    )?;
                } else if matches!(dst_slot, UpperSlot::Whiteout)
                    && (src.is_dir() || src_lower_below)
                {
                    // Exchanging leaves the target's whiteout at the old name, which is what is
                    // needed there if a lower layer has it (the kernel's "switch whiteouts": the
                    // whiteout keeps its owner); a directory cannot replace a whiteout anyway.
                    sys::renameat2(
                        old_dir.as_fd(),
                        &cname,
                        new_dir.as_fd(),
                        &cnew,
                        libc::RENAME_EXCHANGE,
                    )?;
                    if !src_lower_below {
                        sys::unlinkat(old_dir.as_fd(), &cname, 0)?;
                    }
                } else if src_lower_below && self.layers.rename_whiteout {
                    sys::renameat2(
                        old_dir.as_fd(),
                        &cname,
                        new_dir.as_fd(),
                        &cnew,
                        libc::RENAME_WHITEOUT,
                    )?;
                } else {
                    sys::renameat2(old_dir.as_fd(), &cname, new_dir.as_fd(), &cnew, 0)?;
                    if src_lower_below {
                        self.make_whiteout(old_dir.as_fd(), &cname)?;
                    }
                }
                if matches!(dst_slot, UpperSlot::AufsWhiteout) && !exchange {
                    sys::unlinkat(new_dir.as_fd(), &aufs_cname(&cnew)?, 0)?;
                }
                // The nodes follow their objects.
                if let Some(d) = dst {
                    if exchange {
                        self.table.relink(d, newparent, newname, parent, name);
                    } else {
                        self.table.unlink(d, newparent, newname);
                        if d.is_dir() {
                            self.drop_dir_fd(d, Loc::Upper);
                        }
                        if d.state().is_unlinked() {
                            let gone = d.is_dir() || dst_gone;
                            self.last_name_gone(d, newparent, newname, gone, held);
                        }
                    }
                }
                self.table.relink(src, parent, name, newparent, newname);
                if parent.ino != newparent.ino {
                    self.moved_copy_in(newparent, new_dir.as_fd(), &cnew);
                    if exchange {
                        self.moved_copy_in(parent, old_dir.as_fd(), &cname);
                    }
                }
                Ok(())
            })
        })?;
        self.dir_changed(parent);
        self.dir_changed(newparent);
        if parent.ino != newparent.ino {
            let moved = |n: &Node| i64::from(n.is_dir());
            let s = moved(src);
            let d = dst.map(|d| moved(d)).unwrap_or(0);
            if exchange {
                self.adjust_subdirs(parent, d - s);
                self.adjust_subdirs(newparent, s - d);
            } else {
                self.adjust_subdirs(parent, -s);
                self.adjust_subdirs(newparent, s - d);
            }
        } else if !exchange && dst.is_some_and(|d| d.is_dir()) {
            self.adjust_subdirs(parent, -1);
        }
        // As for unlink: a replaced name of a lower object leaves its link count as it was.
        if let Some(d) = dst
            && !exchange
            && !d.is_dir()
            && (!d.state().is_unlinked() || d.held().is_some())
        {
            self.invalidate_attrs(d.ino);
        }
        Ok(())
    }
}
