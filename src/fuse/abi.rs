//! The numbers of the FUSE protocol (`<linux/fuse.h>`) that the daemon speaks, and plain
//! little readers and writers for its messages (native byte order, as the kernel's own).

/// Protocol version answered to INIT: 7.40 (passthrough) is the newest feature used.
pub const MAJOR: u32 = 7;
pub const MINOR: u32 = 40;

pub mod op {
    pub const LOOKUP: u32 = 1;
    pub const FORGET: u32 = 2;
    pub const GETATTR: u32 = 3;
    pub const SETATTR: u32 = 4;
    pub const READLINK: u32 = 5;
    pub const SYMLINK: u32 = 6;
    pub const MKNOD: u32 = 8;
    pub const MKDIR: u32 = 9;
    pub const UNLINK: u32 = 10;
    pub const RMDIR: u32 = 11;
    pub const RENAME: u32 = 12;
    pub const LINK: u32 = 13;
    pub const OPEN: u32 = 14;
    pub const READ: u32 = 15;
    pub const WRITE: u32 = 16;
    pub const STATFS: u32 = 17;
    pub const RELEASE: u32 = 18;
    pub const FSYNC: u32 = 20;
    pub const SETXATTR: u32 = 21;
    pub const GETXATTR: u32 = 22;
    pub const LISTXATTR: u32 = 23;
    pub const REMOVEXATTR: u32 = 24;
    pub const FLUSH: u32 = 25;
    pub const INIT: u32 = 26;
    pub const OPENDIR: u32 = 27;
    pub const READDIR: u32 = 28;
    pub const RELEASEDIR: u32 = 29;
    pub const FSYNCDIR: u32 = 30;
    pub const ACCESS: u32 = 34;
    pub const CREATE: u32 = 35;
    pub const INTERRUPT: u32 = 36;
    pub const DESTROY: u32 = 38;
    pub const IOCTL: u32 = 39;
    pub const BATCH_FORGET: u32 = 42;
    pub const FALLOCATE: u32 = 43;
    pub const READDIRPLUS: u32 = 44;
    pub const RENAME2: u32 = 45;
    pub const LSEEK: u32 = 46;
    pub const COPY_FILE_RANGE: u32 = 47;
    pub const TMPFILE: u32 = 51;
    pub const STATX: u32 = 52;
}

/// `fuse_setattr_in.valid` bits.
pub mod fattr {
    pub const MODE: u32 = 1 << 0;
    pub const UID: u32 = 1 << 1;
    pub const GID: u32 = 1 << 2;
    pub const SIZE: u32 = 1 << 3;
    pub const ATIME: u32 = 1 << 4;
    pub const MTIME: u32 = 1 << 5;
    pub const FH: u32 = 1 << 6;
    pub const ATIME_NOW: u32 = 1 << 7;
    pub const MTIME_NOW: u32 = 1 << 8;
    pub const CTIME: u32 = 1 << 10;
}

/// `fuse_getattr_in.getattr_flags`: the request names an open file.
pub const GETATTR_FH: u32 = 1 << 0;

/// Notification codes (in `fuse_out_header.error` of a message with `unique` 0).
pub const NOTIFY_INVAL_INODE: i32 = 2;
pub const NOTIFY_INVAL_ENTRY: i32 = 3;
pub const NOTIFY_STORE: i32 = 4;

pub const IN_HEADER: usize = 40;
pub const OUT_HEADER: usize = 16;
/// `fuse_attr`, `fuse_entry_out`, `fuse_dirent` (without its name).
pub const ATTR: usize = 88;
pub const ENTRY_OUT: usize = 40 + ATTR;
pub const DIRENT: usize = 24;

/// `fuse_out_header` of a message of `len` bytes in all: a reply to request `unique`, or a
/// notification (`unique` 0, its code in `error`).
pub fn out_header(len: usize, error: i32, unique: u64) -> [u8; OUT_HEADER] {
    let mut h = [0u8; OUT_HEADER];
    h[..4].copy_from_slice(&(len as u32).to_ne_bytes());
    h[4..8].copy_from_slice(&error.to_ne_bytes());
    h[8..].copy_from_slice(&unique.to_ne_bytes());
    h
}

/// Reads the fields of a request body in order; running short is EINVAL (never a panic).
pub struct Args<'a> {
    rest: &'a [u8],
}

pub type Short = fuser::Errno;

impl<'a> Args<'a> {
    pub fn new(body: &'a [u8]) -> Args<'a> {
        Args { rest: body }
    }

    pub fn bytes(&mut self, n: usize) -> Result<&'a [u8], Short> {
        if self.rest.len() < n {
            return Err(fuser::Errno::EINVAL);
        }
        let (head, tail) = self.rest.split_at(n);
        self.rest = tail;
        Ok(head)
    }

    pub fn u32(&mut self) -> Result<u32, Short> {
        let b = self.bytes(4)?;
        Ok(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    pub fn u64(&mut self) -> Result<u64, Short> {
        let b = self.bytes(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_ne_bytes(a))
    }

    pub fn skip(&mut self, n: usize) -> Result<(), Short> {
        self.bytes(n).map(drop)
    }

    /// A NUL-terminated name (the NUL is consumed, not returned).
    pub fn name(&mut self) -> Result<&'a std::ffi::OsStr, Short> {
        use std::os::unix::ffi::OsStrExt;
        let end = self
            .rest
            .iter()
            .position(|&b| b == 0)
            .ok_or(fuser::Errno::EINVAL)?;
        let name = &self.rest[..end];
        self.rest = &self.rest[end + 1..];
        Ok(std::ffi::OsStr::from_bytes(name))
    }

    /// A name of one path component: one holding '/' is EINVAL (the kernel never sends one).
    pub fn component(&mut self) -> Result<&'a std::ffi::OsStr, Short> {
        use std::os::unix::ffi::OsStrExt;
        let name = self.name()?;
        if name.as_bytes().contains(&b'/') {
            return Err(fuser::Errno::EINVAL);
        }
        Ok(name)
    }

    pub fn rest(self) -> &'a [u8] {
        self.rest
    }
}

/// Builds a reply or notification body.
#[derive(Default)]
pub struct Out {
    pub buf: Vec<u8>,
}

impl Out {
    pub fn with_capacity(n: usize) -> Out {
        Out {
            buf: Vec::with_capacity(n),
        }
    }

    pub fn u16(&mut self, v: u16) -> &mut Out {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    pub fn u32(&mut self, v: u32) -> &mut Out {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    pub fn u64(&mut self, v: u64) -> &mut Out {
        self.buf.extend_from_slice(&v.to_ne_bytes());
        self
    }

    pub fn bytes(&mut self, b: &[u8]) -> &mut Out {
        self.buf.extend_from_slice(b);
        self
    }

    pub fn zeros(&mut self, n: usize) -> &mut Out {
        self.buf.resize(self.buf.len() + n, 0);
        self
    }

    pub fn len(&self) -> usize {
        self.buf.len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }
}
