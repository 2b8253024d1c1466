//! The thin unsafe edge: every system call the daemon makes goes through a small safe
//! wrapper here. Nothing else in the crate uses `unsafe`.
//!
//! Wrappers take `BorrowedFd`/`&CStr` and return `Result<_, Errno>` so that callers can use `?`
//! and hand the errno straight back to the kernel.

use std::ffi::{CStr, CString, OsStr, OsString};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};

pub use fuser::Errno;

pub type Result<T> = std::result::Result<T, Errno>;

/// The errno of the last failed call.
pub fn last_errno() -> Errno {
    Errno::from_i32(
        std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO),
    )
}

fn check(ret: libc::c_int) -> Result<libc::c_int> {
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

fn check_ssize(ret: libc::ssize_t) -> Result<usize> {
    if ret < 0 {
        Err(last_errno())
    } else {
        Ok(ret as usize)
    }
}

/// Retries a call that failed with EINTR.
fn retry<T>(mut f: impl FnMut() -> Result<T>) -> Result<T> {
    loop {
        match f() {
            Err(e) if e.code() == libc::EINTR => continue,
            other => return other,
        }
    }
}

/// Converts a name or relative path into a C string; an embedded NUL is EINVAL.
pub fn cstr(s: &OsStr) -> Result<CString> {
    CString::new(s.as_bytes()).map_err(|_| Errno::EINVAL)
}

fn owned(fd: libc::c_int) -> Result<OwnedFd> {
    let fd = check(fd)?;
    // SAFETY: the kernel just returned this descriptor to us and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------------------------
// Opening beneath a layer root

#[repr(C)]
struct OpenHow {
    flags: u64,
    mode: u64,
    resolve: u64,
}

const RESOLVE_NO_XDEV: u64 = 0x01;
const RESOLVE_NO_MAGICLINKS: u64 = 0x02;
const RESOLVE_NO_SYMLINKS: u64 = 0x04;
const RESOLVE_BENEATH: u64 = 0x08;

/// Opens `path` relative to `dir` without ever leaving `dir` and without following any symlink:
/// a symlink as last component is opened itself with `O_PATH` and refused (ELOOP) otherwise.
/// An empty path opens `dir` itself again.
pub fn open_beneath(dir: BorrowedFd<'_>, path: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    let path = if path.is_empty() { c"." } else { path };
    openat2(
        dir,
        path,
        flags,
        mode,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS,
    )
}

/// A detached copy of the mount `dir` is on, rooted at `dir` and without the mounts beneath
/// it (`open_tree(OPEN_TREE_CLONE)`, not recursive): resolving names from it reaches what
/// other filesystems mounted inside `dir` cover, as kernel overlayfs's private clones of its
/// layers do. Needs CAP_SYS_ADMIN over the mount namespace. Made read-only and `noatime`
/// where the kernel allows it, as kernel overlayfs makes its lower layers' clones: nothing
/// done through it changes the layer, not even the access times of the files the kernel
/// reads for a passthrough open (it reads them through a file of its own, with the
/// caller's open flags, so the daemon's `O_NOATIME` does not reach it).
pub fn clone_mount(dir: BorrowedFd<'_>, read_only: bool) -> Result<OwnedFd> {
    const OPEN_TREE_CLONE: libc::c_uint = 1;
    let flags =
        OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint | libc::AT_EMPTY_PATH as libc::c_uint;
    // SAFETY: plain syscall on a valid fd with an empty NUL-terminated path.
    let fd = unsafe { libc::syscall(libc::SYS_open_tree, dir.as_raw_fd(), c"".as_ptr(), flags) };
    let clone = owned(fd as libc::c_int)?;
    // Private, as kernel overlayfs's clones are: no mount made later inside the layer reaches
    // it (some kernels propagate mounts into detached copies). Best effort.
    #[repr(C)]
    struct MountAttr {
        attr_set: u64,
        attr_clr: u64,
        propagation: u64,
        userns_fd: u64,
    }
    const MOUNT_ATTR_RDONLY: u64 = 0x1;
    const MOUNT_ATTR_NOATIME: u64 = 0x10;
    const MOUNT_ATTR_ATIME: u64 = 0x70;
    let set = |attr_set: u64, attr_clr: u64, propagation: u64| {
        let attr = MountAttr {
            attr_set,
            attr_clr,
            propagation,
            userns_fd: 0,
        };
        // SAFETY: valid fd, empty NUL-terminated path, `attr` of the size passed.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_mount_setattr,
                clone.as_raw_fd(),
                c"".as_ptr(),
                libc::AT_EMPTY_PATH as libc::c_uint,
                &attr as *const MountAttr,
                std::mem::size_of::<MountAttr>(),
            )
        };
        if rc != 0 {
            log::debug!("mount_setattr on a layer's clone: {:?}", last_errno());
        }
    };
    // One call each: a mount from a more privileged namespace has its atime flags locked,
    // and still becomes private and read-only.
    set(0, 0, libc::MS_PRIVATE);
    if read_only {
        set(MOUNT_ATTR_RDONLY, 0, 0);
    }
    set(MOUNT_ATTR_NOATIME, MOUNT_ATTR_ATIME, 0);
    Ok(clone)
}

const MAX_HANDLE_SZ: usize = 128;

/// `struct file_handle` with room for any handle.
#[repr(C)]
struct Handle {
    bytes: libc::c_uint,
    kind: libc::c_int,
    data: [u8; MAX_HANDLE_SZ],
}

/// The file handle of `path` in `dir` (of `dir`'s object itself when `path` is empty); a
/// symlink is not followed.
fn handle_at(dir: BorrowedFd<'_>, path: &CStr) -> Result<Handle> {
    let mut h = Handle {
        bytes: MAX_HANDLE_SZ as libc::c_uint,
        kind: 0,
        data: [0; MAX_HANDLE_SZ],
    };
    let flags = if path.is_empty() {
        libc::AT_EMPTY_PATH
    } else {
        0
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: valid fd, NUL-terminated path, a handle buffer of the size it states and an
    // int out-pointer.
    check(unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            dir.as_raw_fd(),
            path.as_ptr(),
            &mut h as *mut Handle,
            &mut mount_id as *mut libc::c_int,
            flags,
        ) as libc::c_int
    })?;
    Ok(h)
}

/// The type and bytes of the file handle of `path` in `dir` (see `handle_at`).
pub fn file_handle(dir: BorrowedFd<'_>, path: &CStr) -> Result<(i32, Vec<u8>)> {
    let h = handle_at(dir, path)?;
    let len = (h.bytes as usize).min(MAX_HANDLE_SZ);
    Ok((h.kind, h.data[..len].to_vec()))
}

/// Opens the object of `fd` again, with `flags`, on the mount of `mount` (a copy of its
/// mount, say), through its file handle. Needs CAP_DAC_READ_SEARCH, and a filesystem that
/// gives handles.
pub fn reopen_on_mount(fd: BorrowedFd<'_>, mount: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd> {
    let mut h = handle_at(fd, c"")?;
    // SAFETY: valid fd and the handle just filled.
    owned(unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount.as_raw_fd(),
            &mut h as *mut Handle,
            flags | libc::O_CLOEXEC,
        ) as libc::c_int
    })
}

/// Opens the name `name` in `dir` as `O_PATH` only if it is neither a symlink (ELOOP) nor a
/// mount point (EXDEV): the object itself is not opened (no device's or FIFO's open runs),
/// and nothing of another filesystem is reached.
pub fn open_path_here(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    openat2(
        dir,
        name,
        libc::O_PATH,
        0,
        RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV,
    )
}

fn openat2(
    dir: BorrowedFd<'_>,
    path: &CStr,
    flags: i32,
    mode: u32,
    resolve: u64,
) -> Result<OwnedFd> {
    let how = OpenHow {
        flags: (flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) as u64,
        // O_TMPFILE includes O_DIRECTORY's bit, so it is matched whole; a mode without a
        // creating flag is EINVAL.
        mode: if flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE {
            mode as u64
        } else {
            0
        },
        resolve,
    };
    retry(|| {
        // SAFETY: `how` is a valid open_how of the size passed; `path` is NUL-terminated.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_openat2,
                dir.as_raw_fd(),
                path.as_ptr(),
                &how as *const OpenHow,
                std::mem::size_of::<OpenHow>(),
            )
        };
        owned(ret as libc::c_int)
    })
}

/// `openat` of a single name (never a path) relative to `dir`, with `O_NOFOLLOW` added unless
/// `O_PATH` is asked for without it (then the symlink itself is opened).
pub fn openat(dir: BorrowedFd<'_>, name: &CStr, flags: i32, mode: u32) -> Result<OwnedFd> {
    retry(|| {
        // SAFETY: plain syscall on a valid fd and NUL-terminated name.
        owned(unsafe {
            libc::openat(
                dir.as_raw_fd(),
                name.as_ptr(),
                flags | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                mode as libc::c_uint,
            )
        })
    })
}

/// Opens `name` (`.` for `dir` itself) for reading its entries without touching its atime
/// (the layers' times are not ours to change); falls back to a plain open where `O_NOATIME`
/// is not permitted (neither owner nor CAP_FOWNER).
pub fn open_dir_noatime(dir: BorrowedFd<'_>, name: &CStr) -> Result<OwnedFd> {
    match openat(
        dir,
        name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOATIME,
        0,
    ) {
        Err(e) if e.code() == libc::EPERM => {
            openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)
        }
        r => r,
    }
}

/// Starts reading the first `len` bytes of the file `fd` into the page cache, without
/// waiting for the data.
pub fn readahead(fd: BorrowedFd<'_>, len: u64) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check_ssize(unsafe { libc::readahead(fd.as_raw_fd(), 0, len as usize) }).map(drop)
}

/// Opens a fresh description of the object `fd` refers to (typically an `O_PATH` fd) with new
/// flags, through `/proc/self/fd`. Magic links are only ever followed here, on our own fds.
pub fn reopen(fd: BorrowedFd<'_>, flags: i32) -> Result<OwnedFd> {
    let path = proc_fd_path(fd);
    retry(|| {
        // SAFETY: plain syscall with a NUL-terminated path.
        owned(unsafe { libc::open(path.as_ptr(), (flags | libc::O_CLOEXEC) & !libc::O_NOFOLLOW) })
    })
}

pub fn proc_fd_path(fd: BorrowedFd<'_>) -> CString {
    CString::new(format!("/proc/self/fd/{}", fd.as_raw_fd())).expect("no NUL in a number")
}

/// `AT_FDCWD` as a borrowed fd (for calls given an absolute `/proc/self/fd` path).
pub fn at_fdcwd() -> BorrowedFd<'static> {
    // SAFETY: AT_FDCWD is a valid dirfd value for every *at call and is never closed.
    unsafe { BorrowedFd::borrow_raw(libc::AT_FDCWD) }
}

/// The UUID of the filesystem of `fd` (an fd that may take ioctls, not `O_PATH`), as the
/// kernel has it (`FS_IOC_GETFSUUID`, Linux 6.5 and later); None where it gives none.
pub fn fs_uuid(fd: BorrowedFd<'_>) -> Option<[u8; 16]> {
    #[repr(C)]
    struct FsUuid2 {
        len: u8,
        uuid: [u8; 16],
    }
    // _IOR(0x15, 0, struct fsuuid2)
    const FS_IOC_GETFSUUID: libc::Ioctl = 0x8011_1500;
    let mut u = FsUuid2 {
        len: 0,
        uuid: [0; 16],
    };
    // SAFETY: the ioctl fills a `struct fsuuid2` we own, of the size its number states.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), FS_IOC_GETFSUUID, &mut u as *mut FsUuid2) };
    (r == 0 && u.len == 16).then_some(u.uuid)
}

/// flock(2): `op` is `LOCK_EX`, `LOCK_SH` or `LOCK_UN`, with `LOCK_NB` or not.
pub fn flock(fd: BorrowedFd<'_>, op: i32) -> Result<()> {
    // SAFETY: flock on a valid fd; no memory is passed.
    retry(|| check(unsafe { libc::flock(fd.as_raw_fd(), op) })).map(drop)
}

pub fn dup(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    fd.try_clone_to_owned().map_err(Errno::from)
}

// ---------------------------------------------------------------------------------------------
// stat

pub type Stat = libc::stat;

pub fn fstatat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<Stat> {
    let mut st = MaybeUninit::<Stat>::uninit();
    // SAFETY: `st` is a valid out-pointer of the right type.
    check(unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })?;
    // SAFETY: fstatat succeeded, so it filled the struct.
    Ok(unsafe { st.assume_init() })
}

pub fn fstat(fd: BorrowedFd<'_>) -> Result<Stat> {
    fstatat(fd, c"", libc::AT_EMPTY_PATH)
}

/// The type of the filesystem `fd` is on (statfs `f_type`, a magic number).
pub fn fs_type(fd: BorrowedFd<'_>) -> Result<u64> {
    let mut st = MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `st` is a valid out-pointer of the right type.
    check(unsafe { libc::fstatfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatfs succeeded. The magic is an unsigned 32-bit number in a signed field.
    Ok(unsafe { st.assume_init() }.f_type as u64 & 0xffff_ffff)
}

pub fn fstatvfs(fd: BorrowedFd<'_>) -> Result<libc::statvfs> {
    let mut st = MaybeUninit::<libc::statvfs>::uninit();
    // SAFETY: `st` is a valid out-pointer of the right type.
    check(unsafe { libc::fstatvfs(fd.as_raw_fd(), st.as_mut_ptr()) })?;
    // SAFETY: fstatvfs succeeded.
    Ok(unsafe { st.assume_init() })
}

// ---------------------------------------------------------------------------------------------
// Directory changes

pub fn mkdirat(dir: BorrowedFd<'_>, name: &CStr, mode: u32) -> Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

pub fn mknodat(dir: BorrowedFd<'_>, name: &CStr, mode: u32, rdev: u64) -> Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, rdev) }).map(drop)
}

pub fn symlinkat(target: &CStr, dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    // SAFETY: plain syscall with NUL-terminated strings.
    check(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

pub fn linkat(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: i32,
) -> Result<()> {
    // SAFETY: plain syscall with valid fds and NUL-terminated names.
    check(unsafe {
        libc::linkat(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn unlinkat(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags) }).map(drop)
}

pub fn renameat2(
    olddir: BorrowedFd<'_>,
    oldname: &CStr,
    newdir: BorrowedFd<'_>,
    newname: &CStr,
    flags: u32,
) -> Result<()> {
    // SAFETY: plain syscall with valid fds and NUL-terminated names.
    check(unsafe {
        libc::renameat2(
            olddir.as_raw_fd(),
            oldname.as_ptr(),
            newdir.as_raw_fd(),
            newname.as_ptr(),
            flags,
        )
    })
    .map(drop)
}

pub fn readlinkat(dir: BorrowedFd<'_>, name: &CStr) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; libc::PATH_MAX as usize + 1];
    // SAFETY: `buf` is writable for its full length.
    let n = check_ssize(unsafe {
        libc::readlinkat(
            dir.as_raw_fd(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    })?;
    buf.truncate(n);
    Ok(buf)
}

pub fn fchownat(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32, flags: i32) -> Result<()> {
    // SAFETY: plain syscall on a valid fd and NUL-terminated name.
    check(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> Result<()> {
    fchownat(fd, c"", uid, gid, libc::AT_EMPTY_PATH)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// chmod of the object an `O_PATH` fd refers to (fchmod refuses `O_PATH` fds).
pub fn fchmod_path(fd: BorrowedFd<'_>, mode: u32) -> Result<()> {
    let path = proc_fd_path(fd);
    // SAFETY: plain syscall with a NUL-terminated path.
    check(unsafe { libc::chmod(path.as_ptr(), mode) }).map(drop)
}

pub const UTIME_OMIT: i64 = libc::UTIME_OMIT;
pub const UTIME_NOW: i64 = libc::UTIME_NOW;

pub fn utimensat(
    dir: BorrowedFd<'_>,
    name: &CStr,
    times: &[libc::timespec; 2],
    flags: i32,
) -> Result<()> {
    // SAFETY: `times` points to two valid timespecs.
    check(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            flags | libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// Extended attributes. `O_PATH` fds cannot be used with f*xattr; the `*xattrat` calls
// (Linux 6.13) take them with `AT_EMPTY_PATH`. On older kernels we go through the
// `/proc/self/fd` magic link of our own fd, which resolves to the object itself (a symlink
// included) and never to a symlink's target.

const SYS_SETXATTRAT: libc::c_long = 463;
const SYS_GETXATTRAT: libc::c_long = 464;
const SYS_LISTXATTRAT: libc::c_long = 465;
const SYS_REMOVEXATTRAT: libc::c_long = 466;

#[repr(C)]
struct XattrArgs {
    value: u64,
    size: u32,
    flags: u32,
}

static XATTRAT: std::sync::atomic::AtomicU8 = std::sync::atomic::AtomicU8::new(0);

/// Runs an `*xattrat` call unless the kernel is known to lack them; `None` means "use the
/// fallback" (also for an `O_PATH` fd with an empty path, which the calls refuse with EBADF).
fn xattrat(mut call: impl FnMut() -> libc::c_long) -> Option<Result<usize>> {
    use std::sync::atomic::Ordering;
    if XATTRAT.load(Ordering::Relaxed) == 2 {
        return None;
    }
    let ret = call();
    if ret < 0 {
        let e = last_errno();
        if e.code() == libc::ENOSYS {
            XATTRAT.store(2, Ordering::Relaxed);
            return None;
        }
        if e.code() == libc::EBADF {
            return None;
        }
        return Some(Err(e));
    }
    XATTRAT.store(1, Ordering::Relaxed);
    Some(Ok(ret as usize))
}

const AT_XATTR: i32 = libc::AT_SYMLINK_NOFOLLOW;

/// getxattr of `name` in directory `dir` (`c""` for `dir` itself).
pub fn getxattr_at(dir: BorrowedFd<'_>, path: &CStr, name: &CStr, buf: &mut [u8]) -> Result<usize> {
    let flags = AT_XATTR
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    let args = XattrArgs {
        value: buf.as_mut_ptr() as u64,
        size: buf.len() as u32,
        flags: 0,
    };
    retry(|| {
        // SAFETY: valid fd, NUL-terminated strings, `args` points at a writable buffer of `size`.
        let r = xattrat(|| unsafe {
            libc::syscall(
                SYS_GETXATTRAT,
                dir.as_raw_fd(),
                path.as_ptr(),
                flags,
                name.as_ptr(),
                &args as *const XattrArgs,
                std::mem::size_of::<XattrArgs>(),
            )
        });
        match r {
            Some(r) => r,
            None => {
                let p = at_proc_path(dir, path);
                // An empty path names the magic link itself, which only the following form
                // of the call resolves to the object.
                let f = if path.is_empty() {
                    libc::getxattr
                } else {
                    libc::lgetxattr
                };
                // SAFETY: NUL-terminated strings and a writable buffer of its length.
                check_ssize(unsafe {
                    f(
                        p.as_ptr(),
                        name.as_ptr(),
                        buf.as_mut_ptr().cast(),
                        buf.len(),
                    )
                })
            }
        }
    })
}

pub fn setxattr_at(
    dir: BorrowedFd<'_>,
    path: &CStr,
    name: &CStr,
    value: &[u8],
    xflags: i32,
) -> Result<()> {
    let flags = AT_XATTR
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    let args = XattrArgs {
        value: value.as_ptr() as u64,
        size: value.len() as u32,
        flags: xflags as u32,
    };
    // SAFETY: valid fd, NUL-terminated strings, `args` points at a readable buffer of `size`.
    let r = xattrat(|| unsafe {
        libc::syscall(
            SYS_SETXATTRAT,
            dir.as_raw_fd(),
            path.as_ptr(),
            flags,
            name.as_ptr(),
            &args as *const XattrArgs,
            std::mem::size_of::<XattrArgs>(),
        )
    });
    match r {
        Some(r) => r.map(drop),
        None => {
            let p = at_proc_path(dir, path);
            let f = if path.is_empty() {
                libc::setxattr
            } else {
                libc::lsetxattr
            };
            // SAFETY: NUL-terminated strings and a readable buffer of its length.
            check(unsafe {
                f(
                    p.as_ptr(),
                    name.as_ptr(),
                    value.as_ptr().cast(),
                    value.len(),
                    xflags,
                )
            })
            .map(drop)
        }
    }
}

pub fn removexattr_at(dir: BorrowedFd<'_>, path: &CStr, name: &CStr) -> Result<()> {
    let flags = AT_XATTR
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: valid fd and NUL-terminated strings.
    let r = xattrat(|| unsafe {
        libc::syscall(
            SYS_REMOVEXATTRAT,
            dir.as_raw_fd(),
            path.as_ptr(),
            flags,
            name.as_ptr(),
        )
    });
    match r {
        Some(r) => r.map(drop),
        None => {
            let p = at_proc_path(dir, path);
            let f = if path.is_empty() {
                libc::removexattr
            } else {
                libc::lremovexattr
            };
            // SAFETY: NUL-terminated strings.
            check(unsafe { f(p.as_ptr(), name.as_ptr()) }).map(drop)
        }
    }
}

pub fn listxattr_at(dir: BorrowedFd<'_>, path: &CStr, buf: &mut [u8]) -> Result<usize> {
    let flags = AT_XATTR
        | if path.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    retry(|| {
        // SAFETY: valid fd, NUL-terminated path and a writable buffer of its length.
        let r = xattrat(|| unsafe {
            libc::syscall(
                SYS_LISTXATTRAT,
                dir.as_raw_fd(),
                path.as_ptr(),
                flags,
                buf.as_mut_ptr(),
                buf.len(),
            )
        });
        match r {
            Some(r) => r,
            None => {
                let p = at_proc_path(dir, path);
                let f = if path.is_empty() {
                    libc::listxattr
                } else {
                    libc::llistxattr
                };
                // SAFETY: NUL-terminated path and a writable buffer of its length.
                check_ssize(unsafe { f(p.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) })
            }
        }
    })
}

/// `/proc/self/fd/N[/path]` for the fallback of the `*at` xattr calls.
fn at_proc_path(dir: BorrowedFd<'_>, path: &CStr) -> CString {
    let mut p = format!("/proc/self/fd/{}", dir.as_raw_fd()).into_bytes();
    if !path.is_empty() {
        p.push(b'/');
        p.extend_from_slice(path.to_bytes());
    }
    CString::new(p).expect("no NUL")
}

pub fn getxattr(fd: BorrowedFd<'_>, name: &CStr, buf: &mut [u8]) -> Result<usize> {
    getxattr_at(fd, c"", name, buf)
}

pub fn setxattr(fd: BorrowedFd<'_>, name: &CStr, value: &[u8], flags: i32) -> Result<()> {
    setxattr_at(fd, c"", name, value, flags)
}

pub fn removexattr(fd: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    removexattr_at(fd, c"", name)
}

pub fn listxattr(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    listxattr_at(fd, c"", buf)
}

/// The whole value of an xattr, or `None` if it is not set.
pub fn getxattr_vec(fd: BorrowedFd<'_>, name: &CStr) -> Result<Option<Vec<u8>>> {
    getxattr_vec_at(fd, c"", name)
}

pub fn getxattr_vec_at(dir: BorrowedFd<'_>, path: &CStr, name: &CStr) -> Result<Option<Vec<u8>>> {
    loop {
        let size = match getxattr_at(dir, path, name, &mut []) {
            Ok(n) => n,
            Err(e) if e.code() == libc::ENODATA => return Ok(None),
            Err(e) => return Err(e),
        };
        let mut buf = vec![0u8; size];
        match getxattr_at(dir, path, name, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(Some(buf));
            }
            Err(e) if e.code() == libc::ERANGE => continue,
            Err(e) if e.code() == libc::ENODATA => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// All xattr names of an object.
pub fn listxattr_vec(fd: BorrowedFd<'_>) -> Result<Vec<OsString>> {
    listxattr_vec_at(fd, c"")
}

pub fn listxattr_vec_at(dir: BorrowedFd<'_>, path: &CStr) -> Result<Vec<OsString>> {
    loop {
        let size = listxattr_at(dir, path, &mut [])?;
        if size == 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; size];
        match listxattr_at(dir, path, &mut buf) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf
                    .split(|&b| b == 0)
                    .filter(|s| !s.is_empty())
                    .map(|s| OsString::from_vec(s.to_vec()))
                    .collect());
            }
            Err(e) if e.code() == libc::ERANGE => continue,
            Err(e) => return Err(e),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Reading directories

/// One entry of a real directory, as getdents64 gives it.
pub struct RawDirent<'a> {
    pub ino: u64,
    pub kind: u8,
    pub name: &'a [u8],
}

/// Reads the start of the directory `name` in `dir` through a descriptor that times the
/// access (no `O_NOATIME`): the kernel updates its access time as its mount says (`relatime`,
/// `noatime`, ...), as for any reader's listing.
pub fn read_dir_timed(dir: BorrowedFd<'_>, name: &CStr) -> Result<()> {
    let fd = openat(dir, name, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    read_dirents(fd.as_fd(), &mut [0u8; 256], |_| false)
}

/// Calls `f` for every entry of the directory open as `fd` (read from its current position).
pub fn for_each_dirent(fd: BorrowedFd<'_>, mut f: impl FnMut(RawDirent<'_>)) -> Result<()> {
    for_each_dirent_while(fd, |d| {
        f(d);
        true
    })
}

/// Calls `f` for the entries of the directory open as `fd` until it returns false (the rest of
/// the batch read with it is skipped, and no more is read; the fd's position is then past
/// that whole batch, so a later read of it would miss the skipped entries).
pub fn for_each_dirent_while(
    fd: BorrowedFd<'_>,
    f: impl FnMut(RawDirent<'_>) -> bool,
) -> Result<()> {
    thread_local! {
        /// Each serving thread reuses one buffer: a fresh zeroed one per directory would be
        /// 64 KiB written and freed on every listing.
        static BUF: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
    }
    // Taken out while in use, so a nested call (from `f`) makes its own.
    let mut buf = BUF.take();
    if buf.is_empty() {
        buf = vec![0u8; 64 * 1024];
    }
    let res = read_dirents(fd, &mut buf, f);
    BUF.set(buf);
    res
}

fn read_dirents(
    fd: BorrowedFd<'_>,
    buf: &mut [u8],
    mut f: impl FnMut(RawDirent<'_>) -> bool,
) -> Result<()> {
    loop {
        // SAFETY: `buf` is writable for its full length.
        let n = check_ssize(unsafe {
            libc::syscall(
                libc::SYS_getdents64,
                fd.as_raw_fd(),
                buf.as_mut_ptr(),
                buf.len(),
            ) as libc::ssize_t
        })?;
        if n == 0 {
            return Ok(());
        }
        let mut off = 0;
        while off < n {
            // linux_dirent64: u64 ino, i64 off, u16 reclen, u8 type, name...
            let rec = &buf[off..n];
            let ino = u64::from_ne_bytes(rec[0..8].try_into().expect("8 bytes"));
            let reclen = u16::from_ne_bytes(rec[16..18].try_into().expect("2 bytes")) as usize;
            let kind = rec[18];
            let name_area = &rec[19..reclen.min(rec.len())];
            let len = name_area
                .iter()
                .position(|&b| b == 0)
                .unwrap_or(name_area.len());
            if !f(RawDirent {
                ino,
                kind,
                name: &name_area[..len],
            }) {
                return Ok(());
            }
            if reclen == 0 {
                break;
            }
            off += reclen;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// File data

pub fn pread(fd: BorrowedFd<'_>, buf: &mut [u8], off: u64) -> Result<usize> {
    retry(|| {
        // SAFETY: `buf` is writable for its full length.
        check_ssize(unsafe {
            libc::pread64(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                off as i64,
            )
        })
    })
}

/// Starts writing a range of a file's dirty pages to its disk, without waiting for them.
pub fn start_writeback(fd: BorrowedFd<'_>, off: u64, len: u64) -> Result<()> {
    // SAFETY: plain syscall on a valid fd.
    check(unsafe {
        libc::sync_file_range(
            fd.as_raw_fd(),
            off as i64,
            len as i64,
            libc::SYNC_FILE_RANGE_WRITE,
        )
    })
    .map(drop)
}

pub fn pwrite(fd: BorrowedFd<'_>, buf: &[u8], off: u64) -> Result<usize> {
    retry(|| {
        // SAFETY: `buf` is readable for its full length.
        check_ssize(unsafe {
            libc::pwrite64(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len(), off as i64)
        })
    })
}

pub fn ftruncate(fd: BorrowedFd<'_>, len: u64) -> Result<()> {
    retry(|| {
        // SAFETY: plain syscall on a valid fd.
        check(unsafe { libc::ftruncate64(fd.as_raw_fd(), len as i64) }).map(drop)
    })
}

pub fn fallocate(fd: BorrowedFd<'_>, mode: i32, off: u64, len: u64) -> Result<()> {
    retry(|| {
        // SAFETY: plain syscall on a valid fd.
        check(unsafe { libc::fallocate64(fd.as_raw_fd(), mode, off as i64, len as i64) }).map(drop)
    })
}

pub fn fsync(fd: BorrowedFd<'_>, datasync: bool) -> Result<()> {
    retry(|| {
        // SAFETY: plain syscall on a valid fd.
        check(unsafe {
            if datasync {
                libc::fdatasync(fd.as_raw_fd())
            } else {
                libc::fsync(fd.as_raw_fd())
            }
        })
        .map(drop)
    })
}

pub fn lseek(fd: BorrowedFd<'_>, off: i64, whence: i32) -> Result<i64> {
    // SAFETY: plain syscall on a valid fd.
    let ret = unsafe { libc::lseek64(fd.as_raw_fd(), off, whence) };
    if ret < 0 { Err(last_errno()) } else { Ok(ret) }
}

/// sendfile(2) from `fd_in` at `*off_in` to `fd_out` at its file position.
pub fn sendfile(
    fd_out: BorrowedFd<'_>,
    fd_in: BorrowedFd<'_>,
    off_in: &mut i64,
    len: usize,
) -> Result<usize> {
    retry(|| {
        // SAFETY: `off_in` is a valid pointer to an i64 owned by the caller.
        check_ssize(unsafe {
            libc::sendfile(
                fd_out.as_raw_fd(),
                fd_in.as_raw_fd(),
                off_in as *mut i64,
                len,
            )
        })
    })
}

pub fn copy_file_range(
    fd_in: BorrowedFd<'_>,
    off_in: &mut i64,
    fd_out: BorrowedFd<'_>,
    off_out: &mut i64,
    len: usize,
) -> Result<usize> {
    retry(|| {
        // SAFETY: offsets are valid pointers to i64 owned by the caller.
        check_ssize(unsafe {
            libc::copy_file_range(
                fd_in.as_raw_fd(),
                off_in as *mut i64,
                fd_out.as_raw_fd(),
                off_out as *mut i64,
                len,
                0,
            )
        })
    })
}

const FICLONE: libc::c_ulong = 0x4004_9409;

/// Shares all data of `src` with `dst` (reflink) where the filesystem can.
pub fn ficlone(dst: BorrowedFd<'_>, src: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: FICLONE takes the source fd as its integer argument.
    check(unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) }).map(drop)
}

// Inode flags (`lsattr`/`chattr`), as the ioctls name them (FUSE passes the number as 32
// bits).
pub const FS_IOC_GETFLAGS: u32 = libc::FS_IOC_GETFLAGS as u32;
pub const FS_IOC_SETFLAGS: u32 = libc::FS_IOC_SETFLAGS as u32;
pub const FS_IOC_FSGETXATTR: u32 = libc::_IOR::<[u8; FSXATTR_SIZE]>(b'X' as u32, 31) as u32;
pub const FS_IOC_FSSETXATTR: u32 = libc::_IOW::<[u8; FSXATTR_SIZE]>(b'X' as u32, 32) as u32;
/// Size of `struct fsxattr`, the argument of FS_IOC_FS[GS]ETXATTR.
pub const FSXATTR_SIZE: usize = 28;

/// An object's inode flags (FS_*_FL).
pub fn get_inode_flags(fd: BorrowedFd<'_>) -> Result<u32> {
    let mut flags: libc::c_int = 0;
    // SAFETY: FS_IOC_GETFLAGS writes one int through the pointer, which is valid.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_GETFLAGS as libc::Ioctl,
            &mut flags as *mut libc::c_int,
        )
    })?;
    Ok(flags as u32)
}

pub fn set_inode_flags(fd: BorrowedFd<'_>, flags: u32) -> Result<()> {
    let flags = flags as libc::c_int;
    // SAFETY: FS_IOC_SETFLAGS reads one int through the pointer, which is valid.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_SETFLAGS as libc::Ioctl,
            &flags as *const libc::c_int,
        )
    })
    .map(drop)
}

/// An object's extended attributes of the XFS kind (`struct fsxattr`, as bytes).
pub fn get_fsxattr(fd: BorrowedFd<'_>) -> Result<[u8; FSXATTR_SIZE]> {
    let mut buf = [0u8; FSXATTR_SIZE];
    // SAFETY: FS_IOC_FSGETXATTR writes a struct fsxattr (28 bytes) into the buffer.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSGETXATTR as libc::Ioctl,
            buf.as_mut_ptr(),
        )
    })?;
    Ok(buf)
}

pub fn set_fsxattr(fd: BorrowedFd<'_>, fsx: &[u8; FSXATTR_SIZE]) -> Result<()> {
    // SAFETY: FS_IOC_FSSETXATTR reads a struct fsxattr (28 bytes) from the buffer.
    check(unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            FS_IOC_FSSETXATTR as libc::Ioctl,
            fsx.as_ptr(),
        )
    })
    .map(drop)
}

// ---------------------------------------------------------------------------------------------
// Process state

/// Gives the calling thread its own umask/cwd (`CLONE_FS`), so that a per-request umask set on
/// one worker never affects another.
pub fn unshare_fs() -> Result<()> {
    // SAFETY: CLONE_FS unsharing only affects the calling thread's fs_struct.
    check(unsafe { libc::unshare(libc::CLONE_FS) }).map(drop)
}

pub fn umask(mask: u32) -> u32 {
    // SAFETY: umask cannot fail.
    unsafe { libc::umask(mask) }
}

/// `statx` of `name` in `dir` (`c""` for `dir` itself; links not followed), asking for
/// `mask`.
fn statx_at(dir: BorrowedFd<'_>, name: &CStr, mask: u32) -> Result<libc::statx> {
    let mut stx = MaybeUninit::<libc::statx>::zeroed();
    let flags = libc::AT_SYMLINK_NOFOLLOW
        | if name.is_empty() {
            libc::AT_EMPTY_PATH
        } else {
            0
        };
    // SAFETY: NUL-terminated name, `stx` is a valid out-pointer of the right type.
    check(unsafe {
        libc::statx(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags,
            mask,
            stx.as_mut_ptr(),
        )
    })?;
    // SAFETY: statx succeeded and filled the struct (it was zeroed before).
    Ok(unsafe { stx.assume_init() })
}

/// The birth time of `name` in `dir` (`c""` for `dir` itself; links not followed), where the
/// filesystem records one.
pub fn btime_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<Option<(i64, u32)>> {
    let stx = statx_at(dir, name, libc::STATX_BTIME)?;
    Ok((stx.stx_mask & libc::STATX_BTIME != 0)
        .then_some((stx.stx_btime.tv_sec, stx.stx_btime.tv_nsec)))
}

/// The id of the mount `path` is on (`STATX_MNT_ID`; symlinks followed), if the kernel says.
pub fn mount_id(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::fs::OpenOptionsExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_PATH)
        .open(path)
        .ok()?;
    let stx = statx_at(f.as_fd(), c"", libc::STATX_MNT_ID).ok()?;
    (stx.stx_mask & libc::STATX_MNT_ID != 0).then_some(stx.stx_mnt_id)
}

/// The alignment the file open as `fd` takes direct I/O at (offsets and lengths), if its
/// filesystem says (`STATX_DIOALIGN`).
pub fn dio_offset_align(fd: BorrowedFd<'_>) -> Option<u32> {
    let stx = statx_at(fd, c"", libc::STATX_DIOALIGN).ok()?;
    (stx.stx_mask & libc::STATX_DIOALIGN != 0 && stx.stx_dio_offset_align > 0)
        .then_some(stx.stx_dio_offset_align)
}

/// The attributes `statx` reports of `name` in `dir` (`c""` or `c"."` for `dir` itself; links
/// not followed) that its filesystem supports (STATX_ATTR_*).
pub fn statx_attributes_at(dir: BorrowedFd<'_>, name: &CStr) -> Result<u64> {
    let stx = statx_at(dir, name, 0)?;
    Ok(stx.stx_attributes & stx.stx_attributes_mask)
}

/// The size of a memory page.
pub fn page_size() -> usize {
    // SAFETY: sysconf reads a constant of the system.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 { n as usize } else { 4096 }
}

pub fn geteuid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::geteuid() }
}

pub fn getegid() -> u32 {
    // SAFETY: cannot fail.
    unsafe { libc::getegid() }
}

/// Whether this process is a member of group `gid` (its effective group or a supplementary
/// one).
pub fn in_group(gid: u32) -> bool {
    if getegid() == gid {
        return true;
    }
    // SAFETY: a size query: no buffer is written.
    let n = unsafe { libc::getgroups(0, std::ptr::null_mut()) };
    if n <= 0 {
        return false;
    }
    let mut groups = vec![0 as libc::gid_t; n as usize];
    // SAFETY: `groups` holds `n` gid_t.
    let m = unsafe { libc::getgroups(n, groups.as_mut_ptr()) };
    m > 0 && groups[..m as usize].contains(&gid)
}

/// The soft limit on open files.
pub fn nofile_limit() -> u64 {
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) } == 0 {
        // SAFETY: getrlimit succeeded.
        unsafe { lim.assume_init() }.rlim_cur
    } else {
        1024
    }
}

/// Raises the limit on open files as far as the process may: to the kernel's ceiling
/// (`fs.nr_open`) where it may raise its hard limit (CAP_SYS_RESOURCE, so as root), else the
/// soft limit to the hard one. Every file open through the view holds a descriptor of the
/// daemon's: under the limit it inherited, callers that together stay inside their own
/// limits (one process near a limit equal to the daemon's, as LTP's creat05) made the
/// daemon's run out, and every open, listing and create on the mount failed with EMFILE
/// until they closed their files; kernel overlayfs has no such shared limit.
pub fn raise_nofile_limit() {
    let ceiling = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<libc::rlim_t>().ok());
    if let Some(max) = ceiling {
        let lim = libc::rlimit {
            rlim_cur: max,
            rlim_max: max,
        };
        // SAFETY: `lim` is a valid rlimit.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) } == 0 {
            return;
        }
    }
    let mut lim = MaybeUninit::<libc::rlimit>::uninit();
    // SAFETY: `lim` is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, lim.as_mut_ptr()) } == 0 {
        // SAFETY: getrlimit succeeded.
        let mut lim = unsafe { lim.assume_init() };
        lim.rlim_cur = lim.rlim_max;
        // SAFETY: `lim` is a valid rlimit.
        unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &lim) };
    }
}

/// A pipe for splicing, of a known capacity.
pub struct Pipe {
    pub r: OwnedFd,
    pub w: OwnedFd,
    /// Bytes it holds at most.
    pub capacity: usize,
}

impl Pipe {
    /// A pipe of `want` bytes where the limits allow it, else of `min`.
    pub fn new(min: usize, want: usize) -> Option<Pipe> {
        let (r, w) = pipe().ok()?;
        let capacity = set_pipe_size(w.as_fd(), want)
            .or_else(|_| set_pipe_size(w.as_fd(), min))
            .ok()?;
        (capacity >= min).then_some(Pipe { r, w, capacity })
    }
}

pub fn pipe() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for two descriptors.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded and gave us two fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Sets a pipe's capacity (`F_SETPIPE_SZ`); returns the capacity it got.
pub fn set_pipe_size(fd: BorrowedFd<'_>, size: usize) -> Result<usize> {
    // SAFETY: F_SETPIPE_SZ takes an int argument and touches no memory of ours.
    let got =
        check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETPIPE_SZ, size as libc::c_int) })?;
    Ok(got as usize)
}

/// splice(2) from `from` (at `*off`, advanced, when given) to `to`.
pub fn splice(
    from: BorrowedFd<'_>,
    off: Option<&mut i64>,
    to: BorrowedFd<'_>,
    len: usize,
) -> Result<usize> {
    splice_with(from, off, to, len, 0)
}

/// splice(2) with `flags` (`SPLICE_F_NONBLOCK`: EAGAIN where a pipe would block).
pub fn splice_with(
    from: BorrowedFd<'_>,
    off: Option<&mut i64>,
    to: BorrowedFd<'_>,
    len: usize,
    flags: u32,
) -> Result<usize> {
    let off = off.map_or(std::ptr::null_mut(), |o| o as *mut i64);
    retry(|| {
        // SAFETY: `off` is null or points to an i64 we hold exclusively for the call.
        check_ssize(unsafe {
            libc::splice(
                from.as_raw_fd(),
                off,
                to.as_raw_fd(),
                std::ptr::null_mut(),
                len,
                flags,
            )
        })
    })
}

pub enum Fork {
    Parent(libc::pid_t),
    Child,
}

/// fork(2). Call only while the process has a single thread.
pub fn fork() -> Result<Fork> {
    // SAFETY: the caller guarantees the process is single-threaded at this point.
    let pid = check(unsafe { libc::fork() })?;
    Ok(if pid == 0 {
        Fork::Child
    } else {
        Fork::Parent(pid)
    })
}

pub fn setsid() {
    // SAFETY: setsid has no memory effects.
    unsafe { libc::setsid() };
}

/// Ends the process at once (no destructors, no atexit handlers) with `code`, its
/// descriptors above the standard ones closed first: their files and mounts are let go as
/// this call returns to user space, before the other threads are torn down.
pub fn exit_now(code: i32) -> ! {
    // SAFETY: plain syscalls; nothing of this process runs after them but its exit.
    unsafe {
        libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32);
        libc::_exit(code)
    }
}

/// The descriptors above the standard ones this process has now (for the daemon: those it
/// inherited from whoever started it).
pub fn open_fds_above_stdio() -> Vec<i32> {
    let Ok(dir) = openat(
        at_fdcwd(),
        c"/proc/self/fd",
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
    ) else {
        return Vec::new();
    };
    let own = dir.as_raw_fd();
    let mut fds = Vec::new();
    let _ = for_each_dirent(dir.as_fd(), |d| {
        if let Some(fd) = std::str::from_utf8(d.name)
            .ok()
            .and_then(|n| n.parse().ok())
            && fd > 2
            && fd != own
        {
            fds.push(fd);
        }
    });
    fds
}

/// Closes descriptors the process does not own (see `open_fds_above_stdio`).
pub fn close_fds(fds: &[i32]) {
    for &fd in fds {
        // SAFETY: closing a descriptor the caller listed as not used by this program.
        unsafe { libc::close(fd) };
    }
}

/// Points stdin, stdout and stderr at /dev/null.
pub fn detach_stdio() {
    // SAFETY: opening /dev/null and dup2 onto the standard descriptors is always sound.
    unsafe {
        let fd = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
        if fd >= 0 {
            libc::dup2(fd, 0);
            libc::dup2(fd, 1);
            libc::dup2(fd, 2);
            if fd > 2 {
                libc::close(fd);
            }
        }
    }
}

pub fn write_all(fd: BorrowedFd<'_>, mut buf: &[u8]) -> Result<()> {
    while !buf.is_empty() {
        let n = retry(|| {
            // SAFETY: `buf` is readable for its full length.
            check_ssize(unsafe { libc::write(fd.as_raw_fd(), buf.as_ptr().cast(), buf.len()) })
        })?;
        buf = &buf[n..];
    }
    Ok(())
}

pub fn read_to_end(fd: BorrowedFd<'_>) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = retry(|| {
            // SAFETY: `buf` is writable for its full length.
            check_ssize(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
        })?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&buf[..n]);
    }
}

/// Blocks the termination signals in the calling thread (and threads it spawns later) and
/// returns the set, for a signal thread to `sigwait` on.
pub fn block_term_signals() -> libc::sigset_t {
    let mut set = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigset manipulation on a local set; pthread_sigmask only changes our mask.
    unsafe {
        libc::sigemptyset(set.as_mut_ptr());
        libc::sigaddset(set.as_mut_ptr(), libc::SIGINT);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGTERM);
        libc::sigaddset(set.as_mut_ptr(), libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, set.as_ptr(), std::ptr::null_mut());
        set.assume_init()
    }
}

pub fn sigwait(set: &libc::sigset_t) -> i32 {
    let mut sig = 0;
    // SAFETY: `set` is an initialised sigset and `sig` a valid out-pointer.
    unsafe { libc::sigwait(set, &mut sig) };
    sig
}

/// Blocks every signal it can in the calling thread, and returns the set with `sig` alone,
/// for `sigwait`.
pub fn block_all_signals(sig: i32) -> libc::sigset_t {
    let mut all = MaybeUninit::<libc::sigset_t>::uninit();
    let mut one = MaybeUninit::<libc::sigset_t>::uninit();
    // SAFETY: sigset manipulation on local sets; pthread_sigmask only changes our mask.
    unsafe {
        libc::sigfillset(all.as_mut_ptr());
        libc::pthread_sigmask(libc::SIG_BLOCK, all.as_ptr(), std::ptr::null_mut());
        libc::sigemptyset(one.as_mut_ptr());
        libc::sigaddset(one.as_mut_ptr(), sig);
        one.assume_init()
    }
}

/// Has `sig` sent to this process when the thread that created it ends (`PR_SET_PDEATHSIG`).
pub fn set_parent_death_signal(sig: i32) -> Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, sig as libc::c_ulong, 0, 0, 0) }).map(drop)
}

/// Names the calling thread (`comm`, at most 15 bytes shown).
pub fn set_thread_name(name: &CStr) {
    // SAFETY: `name` is NUL-terminated; the kernel copies at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Kills a child process of ours and reaps it.
pub fn kill_child(pid: i32) {
    // SAFETY: kill and waitpid of a pid this process started; the status is not read.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
}

/// access(2): whether this process (by its real ids) may use `path` as `mode` says.
pub fn access(path: &CStr, mode: libc::c_int) -> Result<()> {
    // SAFETY: access(2) only reads the NUL-terminated path.
    check(unsafe { libc::access(path.as_ptr(), mode) }).map(drop)
}

/// Starts `cmd` with none of this process's descriptors but its standard ones (which `cmd`
/// sets): every other one is marked close-on-exec in the child first.
pub fn spawn_bare(cmd: &mut std::process::Command) -> std::io::Result<std::process::Child> {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs between fork and exec and makes one async-signal-safe syscall.
    unsafe {
        cmd.pre_exec(|| {
            let r = libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            if r < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    };
    cmd.spawn()
}

pub fn ignore_sigpipe() {
    // SAFETY: setting a signal to SIG_IGN is always sound.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
}

// ---------------------------------------------------------------------------------------------
// Mounting

pub fn mount(source: &CStr, target: &CStr, fstype: &CStr, flags: u64, data: &CStr) -> Result<()> {
    // SAFETY: all pointers are NUL-terminated strings that outlive the call.
    check(unsafe {
        libc::mount(
            source.as_ptr(),
            target.as_ptr(),
            fstype.as_ptr(),
            flags as libc::c_ulong,
            data.as_ptr().cast(),
        )
    })
    .map(drop)
}

pub fn umount_detach(target: &CStr) -> Result<()> {
    // SAFETY: NUL-terminated path.
    check(unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) }).map(drop)
}

pub fn open_dev_fuse() -> Result<OwnedFd> {
    // SAFETY: plain open of a fixed path.
    owned(unsafe { libc::open(c"/dev/fuse".as_ptr(), libc::O_RDWR | libc::O_CLOEXEC) })
}

/// Receives one fd sent with SCM_RIGHTS over a unix socket (the fusermount3 protocol).
pub fn recv_fd(sock: BorrowedFd<'_>) -> Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    // Room for one cmsghdr carrying one int, suitably aligned.
    let mut cbuf = [0u64; 8];
    // SAFETY: zeroed msghdr is a valid "empty" value; we fill the pointers below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&cbuf);
    let n = retry(|| {
        // SAFETY: msg points at valid buffers that live across the call.
        check_ssize(unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) })
    })?;
    if n == 0 {
        return Err(Errno::ECONNREFUSED);
    }
    // SAFETY: recvmsg filled msg; CMSG_FIRSTHDR/CMSG_DATA walk the control buffer it described.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if cmsg.is_null()
            || (*cmsg).cmsg_level != libc::SOL_SOCKET
            || (*cmsg).cmsg_type != libc::SCM_RIGHTS
        {
            return Err(Errno::EIO);
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const RawFd);
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Clears close-on-exec so a child (fusermount3) inherits the fd.
pub fn clear_cloexec(fd: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: F_SETFD on a valid fd.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, 0) }).map(drop)
}

pub fn socketpair() -> Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for two descriptors.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded and gave us two fresh descriptors.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

// ---------------------------------------------------------------------------------------------
// Small helpers over stat results

pub fn file_type(mode: u32) -> u32 {
    mode & libc::S_IFMT
}

pub fn is_dir(st: &Stat) -> bool {
    file_type(st.st_mode) == libc::S_IFDIR
}

pub fn major(dev: u64) -> u32 {
    libc::major(dev)
}

pub fn minor(dev: u64) -> u32 {
    libc::minor(dev)
}

/// The kernel's `new_encode_dev`, as FUSE carries rdev in 32 bits.
pub fn encode_dev_u32(dev: u64) -> u32 {
    let (ma, mi) = (major(dev), minor(dev));
    (mi & 0xff) | (ma << 8) | ((mi & !0xff) << 12)
}

pub fn decode_dev_u32(dev: u32) -> u64 {
    let ma = (dev & 0xfff00) >> 8;
    let mi = (dev & 0xff) | ((dev >> 12) & 0xfff00);
    libc::makedev(ma, mi)
}

/// Borrow helper for code holding an `OwnedFd` in an `Arc`.
pub fn bfd(fd: &impl AsFd) -> BorrowedFd<'_> {
    fd.as_fd()
}

// ---------------------------------------------------------------------------------------------
// syslog

pub fn openlog() {
    // SAFETY: the ident is a static NUL-terminated string, as openlog requires.
    unsafe { libc::openlog(c"unionmount".as_ptr(), libc::LOG_PID, libc::LOG_DAEMON) };
}

/// `level`: log::Level as i32 (1 = error ... 5 = trace).
pub fn syslog(level: i32, msg: &str) {
    let prio = match level {
        1 => libc::LOG_ERR,
        2 => libc::LOG_WARNING,
        3 => libc::LOG_INFO,
        _ => libc::LOG_DEBUG,
    };
    let Ok(c) = CString::new(msg.replace('\0', " ")) else {
        return;
    };
    // SAFETY: "%s" with one NUL-terminated string argument.
    unsafe { libc::syslog(prio, c"%s".as_ptr(), c.as_ptr()) };
}

/// Returns freed heap memory to the system.
pub fn malloc_trim() {
    // SAFETY: malloc_trim only releases free memory of the allocator.
    unsafe { libc::malloc_trim(0) };
}

/// Caps glibc's per-thread heap arenas: each worker thread otherwise grows an arena of its
/// own, and memory freed in one is not reused by the others.
pub fn limit_malloc_arenas(n: i32) {
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(libc::M_ARENA_MAX, n) };
}

/// Serves every allocation of `bytes` or more with its own mapping, and keeps it so. glibc
/// otherwise raises the threshold to the size of the largest mapped block freed, after which
/// the session's 16 MiB request buffers come from the heap, where `calloc` must clear the
/// part it reuses (about 70 KiB each, resident for good); mapped anew they stay untouched
/// until a request needs them.
pub fn fix_malloc_mmap_threshold(bytes: i32) {
    // SAFETY: mallopt only changes allocator tuning.
    unsafe { libc::mallopt(libc::M_MMAP_THRESHOLD, bytes) };
}

// ---------------------------------------------------------------------------------------------
// The FUSE device

/// `FUSE_DEV_IOC_CLONE`, `FUSE_DEV_IOC_BACKING_OPEN` and `FUSE_DEV_IOC_BACKING_CLOSE`
/// (`<linux/fuse.h>`: magic 229; the backing map is 16 bytes).
const FUSE_DEV_IOC_CLONE: libc::c_ulong = libc::_IOR::<u32>(229, 0) as libc::c_ulong;
const FUSE_DEV_IOC_BACKING_OPEN: libc::c_ulong = libc::_IOW::<[u8; 16]>(229, 1) as libc::c_ulong;
const FUSE_DEV_IOC_BACKING_CLOSE: libc::c_ulong = libc::_IOW::<u32>(229, 2) as libc::c_ulong;

/// Reads one request from a FUSE device fd (blocking unless the fd is non-blocking).
pub fn read_dev(fd: BorrowedFd<'_>, buf: &mut [u8]) -> Result<usize> {
    // SAFETY: `buf` is valid for writes of its length.
    check_ssize(unsafe { libc::read(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) })
}

/// Writes one message (a reply or a notification) to a FUSE device fd, in one call.
pub fn writev(fd: BorrowedFd<'_>, bufs: &[std::io::IoSlice<'_>]) -> Result<usize> {
    // SAFETY: IoSlice is ABI-compatible with iovec; the slices live across the call.
    check_ssize(unsafe {
        libc::writev(
            fd.as_raw_fd(),
            bufs.as_ptr().cast(),
            bufs.len().min(libc::c_int::MAX as usize) as libc::c_int,
        )
    })
}

/// Waits until `fd` is readable (or hung up).
pub fn wait_readable(fd: BorrowedFd<'_>) -> Result<()> {
    let mut p = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    retry(|| check(unsafe { libc::poll(&mut p, 1, -1) })).map(drop)
}

pub fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<()> {
    // SAFETY: F_GETFL on a valid fd.
    let fl = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    set_status_flags(fd, fl | libc::O_NONBLOCK)
}

/// Sets the status flags of an open file (`O_APPEND`, `O_NONBLOCK`, `O_NOATIME`, ...) to
/// those in `flags`; the others in `flags` are ignored.
pub fn set_status_flags(fd: BorrowedFd<'_>, flags: i32) -> Result<()> {
    // SAFETY: F_SETFL takes an int and changes only the fd's status flags.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags) }).map(drop)
}

/// Opens `name` in `dir` for its data, if it is a regular file: never a device, fifo or
/// socket put at that name behind the daemon's back (opening a fifo would block, a device
/// would be read or written). O_NONBLOCK keeps the open itself from blocking, and is then
/// taken off again (unless asked for). ESTALE for anything but a regular file.
pub fn open_regular(dir: BorrowedFd<'_>, name: &CStr, flags: i32) -> Result<OwnedFd> {
    let fd = match openat(dir, name, flags | libc::O_NONBLOCK, 0) {
        // EAGAIN: a lease another process holds on the file, whose break O_NONBLOCK does
        // not wait for (an open waits). ENXIO: a fifo without a reader, or a socket. The
        // object is looked at through O_PATH (which opens nothing), then, if it is a
        // regular file, opened for real.
        Err(e) if matches!(e.code(), libc::EAGAIN | libc::ENXIO) => {
            let path = openat(dir, name, libc::O_PATH, 0)?;
            if file_type(fstat(path.as_fd())?.st_mode) != libc::S_IFREG {
                return Err(Errno::ESTALE);
            }
            return reopen(path.as_fd(), flags);
        }
        r => r?,
    };
    if file_type(fstat(fd.as_fd())?.st_mode) != libc::S_IFREG {
        return Err(Errno::ESTALE);
    }
    if flags & libc::O_NONBLOCK == 0 {
        set_status_flags(fd.as_fd(), flags)?;
    }
    Ok(fd)
}

/// Attaches a fresh `/dev/fuse` fd to the connection of `of`, so it reads requests too.
pub fn clone_dev_fuse(of: BorrowedFd<'_>) -> Result<OwnedFd> {
    let new = open_dev_fuse()?;
    let mut src = of.as_raw_fd() as u32;
    // SAFETY: the ioctl reads one u32 (the source fd).
    check(unsafe { libc::ioctl(new.as_raw_fd(), FUSE_DEV_IOC_CLONE, &mut src) })?;
    Ok(new)
}

/// Registers `file` as a passthrough backing file of the connection; returns its id.
pub fn backing_open(dev: BorrowedFd<'_>, file: BorrowedFd<'_>) -> Result<u32> {
    // struct fuse_backing_map { int32_t fd; uint32_t flags; uint64_t padding; }
    let mut map = [0u8; 16];
    map[..4].copy_from_slice(&file.as_raw_fd().to_ne_bytes());
    // SAFETY: the ioctl reads 16 bytes from `map`.
    let id =
        check(unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_OPEN, map.as_ptr()) })?;
    Ok(id as u32)
}

pub fn backing_close(dev: BorrowedFd<'_>, id: u32) -> Result<()> {
    // SAFETY: the ioctl reads one u32.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), FUSE_DEV_IOC_BACKING_CLOSE, &id) }).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_beneath_ignores_a_mode_without_a_creating_flag() {
        let root = std::fs::File::open("/").unwrap();
        // O_DIRECTORY shares a bit with O_TMPFILE; the mode must not reach openat2 here.
        open_beneath(
            root.as_fd(),
            c"tmp",
            libc::O_RDONLY | libc::O_DIRECTORY,
            0o644,
        )
        .unwrap();
    }
}
