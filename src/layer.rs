//! The layers of one mount: read-only lowers (top-most first), the optional writable upper, and
//! the work directory used to build objects before they appear in the upper.
//!
//! Every access to a layer goes through its root fd with `open_beneath`, so nothing a layer
//! contains (absolute or `..` symlinks, say) can make the daemon leave it.

use std::ffi::{CStr, CString};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::sys::{self, Errno, Result};
use crate::whiteout::Format;

/// Index of a lower layer in `Layers::lowers` (0 is the top-most lower).
pub type LowerIdx = u16;

pub struct Layer {
    pub path: PathBuf,
    /// `O_PATH` fd of the layer's root directory.
    pub root: OwnedFd,
    /// `st_dev` of the layer root.
    pub dev: u64,
    /// A lower layer's filesystem can set POSIX ACLs (`acl::fs_takes_acls`); true for the
    /// others, which are not asked.
    pub takes_acls: bool,
    /// A lower layer's filesystem UUID, as the kernel has it (null where it has none):
    /// kernel overlayfs checks it in a copy's `overlay.origin`.
    pub uuid: [u8; 16],
}

impl Layer {
    /// Opens a layer root. The layer path itself may be a symlink (container engines pass such
    /// paths); only what lies beneath the root is held to the no-symlink rule.
    pub fn open_root(path: &Path) -> std::io::Result<Layer> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
            .open(path)?;
        let root: OwnedFd = file.into();
        let st =
            sys::fstat(root.as_fd()).map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
        Ok(Layer {
            path: path.to_path_buf(),
            root,
            dev: st.st_dev,
            takes_acls: true,
            uuid: [0; 16],
        })
    }

    /// Opens a lower layer's root: `open_root`, with whether its filesystem takes ACLs, then,
    /// where the mount namespace allows it
    /// (root, or the root of a user namespace that owns it), in a detached copy of its mount,
    /// so that a filesystem mounted inside the layer hides nothing of it (kernel overlayfs
    /// does not cross such mounts either). The upper and the work directory are left as
    /// they are: renames between them need one mount.
    pub fn open_lower(path: &Path) -> std::io::Result<Layer> {
        let mut layer = Layer::open_root(path)?;
        let dev = layer.dev;
        layer.takes_acls = sys::fs_type(layer.root()).map_or(true, |magic| {
            crate::acl::fs_takes_acls(magic, || crate::mountinfo::type_of_dev(dev))
        });
        layer.uuid = sys::openat(layer.root(), c".", libc::O_RDONLY | libc::O_DIRECTORY, 0)
            .ok()
            .and_then(|d| sys::fs_uuid(d.as_fd()))
            .unwrap_or_default();
        match sys::clone_mount(layer.root(), true) {
            Ok(clone) => layer.root = clone,
            Err(e) => log::debug!(
                "lower layer {}: mounts inside it are crossed (no detached copy: {e:?})",
                path.display()
            ),
        }
        Ok(layer)
    }

    pub fn root(&self) -> BorrowedFd<'_> {
        self.root.as_fd()
    }

    /// Opens `rel` (a path relative to the layer root, empty for the root) beneath the root.
    pub fn open(&self, rel: &CStr, flags: i32) -> Result<OwnedFd> {
        sys::open_beneath(self.root(), rel, flags, 0)
    }
}

/// The scratch directory `WORK/work`, on the same filesystem as the upper.
pub struct WorkDir {
    pub fd: OwnedFd,
    counter: AtomicU64,
}

impl WorkDir {
    pub fn new(fd: OwnedFd) -> WorkDir {
        WorkDir {
            fd,
            counter: AtomicU64::new(0),
        }
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// A fresh name for a temporary object in the work directory.
    pub fn temp_name(&self) -> CString {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        CString::new(format!("#um{:x}.{n:x}", std::process::id())).expect("no NUL")
    }

    /// The pid of the daemon that made the temporary object `name` (see `temp_name`).
    pub fn owner_of(name: &[u8]) -> Option<u32> {
        let hex = name.strip_prefix(b"#um")?.split(|&b| b == b'.').next()?;
        u32::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()
    }
}

pub struct Layers {
    pub lowers: Vec<Layer>,
    pub upper: Option<Layer>,
    pub work: Option<WorkDir>,
    /// How whiteouts and opaque markers are written in the upper.
    pub format: Format,
    /// `renameat2(RENAME_WHITEOUT)` works in the upper (it needs CAP_MKNOD).
    pub rename_whiteout: bool,
    /// The upper holds POSIX ACLs (not a filesystem mounted `noacl`, say).
    pub upper_acls: bool,
    /// A `noatime` mount: a detached copy of the upper's mount that times no access, where
    /// passthrough backing files of upper files are opened (the kernel times reads of a
    /// backing file by its mount, not by the daemon's open flags).
    pub upper_noatime: Option<OwnedFd>,
}

impl Layers {
    pub fn upper(&self) -> Result<&Layer> {
        self.upper.as_ref().ok_or(Errno::EROFS)
    }

    pub fn work(&self) -> Result<&WorkDir> {
        self.work.as_ref().ok_or(Errno::EROFS)
    }

    pub fn lower(&self, idx: LowerIdx) -> &Layer {
        &self.lowers[idx as usize]
    }

    pub fn read_only(&self) -> bool {
        self.upper.is_none()
    }
}
