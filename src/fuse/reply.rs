//! Replies and notifications written to `/dev/fuse`.

use std::io::IoSlice;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, FileAttr, FileType, FopenFlags};

use super::abi::{self, Out};
use crate::sys;

/// READ answers shorter than this are copied: splicing costs two more system calls, more
/// than copying a few pages.
pub const SPLICE_MIN: usize = 32 << 10;

/// One fd of the connection. A reply goes to the fd its request was read from: each clone
/// keeps its own list of requests being served.
#[derive(Clone, Debug)]
pub struct Channel(pub(crate) Arc<OwnedFd>);

impl Channel {
    pub fn new(fd: OwnedFd) -> Channel {
        Channel(Arc::new(fd))
    }

    pub fn fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }

    /// Sends one message: the out header (`error`, `unique`) followed by `parts`.
    fn send(&self, unique: u64, error: i32, parts: &[&[u8]]) -> sys::Result<()> {
        let len = abi::OUT_HEADER + parts.iter().map(|p| p.len()).sum::<usize>();
        let hdr = abi::out_header(len, error, unique);
        // At most three parts (a name notification: body, name, NUL): no allocation.
        let mut iov = [IoSlice::new(&[]); 4];
        iov[0] = IoSlice::new(&hdr);
        let mut n = 1;
        for p in parts.iter().filter(|p| !p.is_empty()) {
            if n == iov.len() {
                return Err(fuser::Errno::EINVAL);
            }
            iov[n] = IoSlice::new(p);
            n += 1;
        }
        sys::writev(self.fd(), &iov[..n]).map(drop)
    }

    /// Registers an open fd as the backing file of passthrough opens.
    pub fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        let id = sys::backing_open(self.fd(), fd)
            .map_err(|e| std::io::Error::from_raw_os_error(e.code()))?;
        Ok(BackingId {
            ch: self.clone(),
            id,
        })
    }
}

/// A passthrough backing file registered with the kernel; dropped, it is unregistered.
#[derive(Debug)]
pub struct BackingId {
    ch: Channel,
    pub id: u32,
}

impl Drop for BackingId {
    fn drop(&mut self) {
        if let Err(e) = sys::backing_close(self.ch.fd(), self.id) {
            log::debug!("closing backing id {}: {e:?}", self.id);
        }
    }
}

/// Cache invalidations, sent on any fd of the connection.
#[derive(Clone)]
pub struct Notifier(pub(crate) Channel);

impl Notifier {
    fn notify(&self, code: i32, body: &[&[u8]]) -> std::io::Result<()> {
        match self.0.send(0, code, body) {
            // Nothing cached: nothing to drop.
            Err(e) if e.code() == libc::ENOENT => Ok(()),
            r => r.map_err(|e| std::io::Error::from_raw_os_error(e.code())),
        }
    }

    pub fn inval_entry(&self, parent: u64, name: &std::ffi::OsStr) -> std::io::Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let name = name.as_bytes();
        let mut o = Out::with_capacity(16);
        o.u64(parent).u32(name.len() as u32).u32(0);
        self.notify(abi::NOTIFY_INVAL_ENTRY, &[&o.buf, name, b"\0"])
    }

    pub fn inval_inode(&self, ino: u64, off: i64, len: i64) -> std::io::Result<()> {
        let mut o = Out::with_capacity(24);
        o.u64(ino).u64(off as u64).u64(len as u64);
        self.notify(abi::NOTIFY_INVAL_INODE, &[&o.buf])
    }
}

/// A time as the kernel's (seconds, nanoseconds) since the epoch, the nanoseconds always
/// 0..1e9 (1969-12-31 23:59:59.5 is (-1, 500,000,000)).
pub(crate) fn unix_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => {
            let d = e.duration();
            let (s, n) = ((d.as_secs() as i64).wrapping_neg(), d.subsec_nanos());
            if n == 0 {
                (s, 0)
            } else {
                (s.wrapping_sub(1), 1_000_000_000 - n)
            }
        }
    }
}

fn split(t: SystemTime) -> (u64, u32) {
    let (s, n) = unix_time(t);
    (s as u64, n)
}

fn type_bits(kind: FileType) -> u32 {
    match kind {
        FileType::NamedPipe => libc::S_IFIFO,
        FileType::CharDevice => libc::S_IFCHR,
        FileType::BlockDevice => libc::S_IFBLK,
        FileType::Directory => libc::S_IFDIR,
        FileType::RegularFile => libc::S_IFREG,
        FileType::Symlink => libc::S_IFLNK,
        FileType::Socket => libc::S_IFSOCK,
    }
}

/// `fuse_attr`.
fn put_attr(o: &mut Out, a: &FileAttr) {
    let (at, atn) = split(a.atime);
    let (mt, mtn) = split(a.mtime);
    let (ct, ctn) = split(a.ctime);
    o.u64(a.ino.0).u64(a.size).u64(a.blocks);
    o.u64(at).u64(mt).u64(ct).u32(atn).u32(mtn).u32(ctn);
    o.u32(type_bits(a.kind) | u32::from(a.perm));
    o.u32(a.nlink)
        .u32(a.uid)
        .u32(a.gid)
        .u32(a.rdev)
        .u32(a.blksize)
        .u32(0);
}

fn put_ttl_pair(o: &mut Out, entry: &Duration, attr: &Duration) {
    o.u64(entry.as_secs()).u64(attr.as_secs());
    o.u32(entry.subsec_nanos()).u32(attr.subsec_nanos());
}

/// `fuse_entry_out`; a zero inode number is a negative entry.
fn put_entry(o: &mut Out, entry: &Duration, attr: &Duration, a: &FileAttr, generation: u64) {
    o.u64(a.ino.0).u64(generation);
    put_ttl_pair(o, entry, attr);
    put_attr(o, a);
}

fn put_open(o: &mut Out, fh: u64, flags: FopenFlags, backing: Option<&BackingId>) {
    let mut bits = flags.bits();
    if backing.is_some() {
        bits |= FopenFlags::FOPEN_PASSTHROUGH.bits();
    }
    o.u64(fh).u32(bits).u32(backing.map_or(0, |b| b.id));
}

/// The answer owed to one request. Dropped unanswered, it answers EIO, so the caller never
/// hangs.
pub struct Reply {
    ch: Channel,
    unique: u64,
    done: bool,
}

impl Reply {
    pub fn new(ch: Channel, unique: u64) -> Reply {
        Reply {
            ch,
            unique,
            done: false,
        }
    }

    fn send(mut self, error: i32, parts: &[&[u8]]) {
        self.done = true;
        if let Err(e) = self.ch.send(self.unique, error, parts) {
            // ENOENT: the request was interrupted and is gone.
            if e.code() != libc::ENOENT {
                log::debug!("reply to request {}: {e:?}", self.unique);
            }
        }
    }

    /// Sends an error answer; false when the kernel does not know the request on this fd.
    pub fn error_once(mut self, e: Errno) -> bool {
        self.done = true;
        !matches!(self.ch.send(self.unique, -e.code().abs(), &[]), Err(e) if e.code() == libc::ENOENT)
    }

    pub fn error(self, e: Errno) {
        let code = e.code();
        self.send(-code.abs(), &[]);
    }

    pub fn ok(self) {
        self.send(0, &[]);
    }

    pub fn open_backing(&self, fd: BorrowedFd<'_>) -> std::io::Result<BackingId> {
        self.ch.open_backing(fd)
    }

    /// `entry`: how long the kernel may keep the name, `ttl` the attributes; `generation`:
    /// see `Node::generation`.
    pub fn entry(self, entry: &Duration, ttl: &Duration, attr: &FileAttr, generation: u64) {
        let mut o = Out::with_capacity(abi::ENTRY_OUT);
        put_entry(&mut o, entry, ttl, attr, generation);
        self.send(0, &[&o.buf]);
    }

    pub fn attr(self, ttl: &Duration, attr: &FileAttr) {
        let mut o = Out::with_capacity(16 + abi::ATTR);
        o.u64(ttl.as_secs()).u32(ttl.subsec_nanos()).u32(0);
        put_attr(&mut o, attr);
        self.send(0, &[&o.buf]);
    }

    /// `fuse_statx_out`: the attributes, and the birth time when there is one.
    pub fn statx(self, ttl: &Duration, a: &FileAttr, btime: Option<(i64, u32)>) {
        // STATX_BASIC_STATS, and STATX_BTIME with a birth time.
        let mask = libc::STATX_BASIC_STATS | btime.map_or(0, |_| libc::STATX_BTIME);
        let dev = crate::sys::decode_dev_u32(a.rdev);
        let mut o = Out::with_capacity(288);
        o.u64(ttl.as_secs())
            .u32(ttl.subsec_nanos())
            .u32(0)
            .zeros(16);
        o.u32(mask).u32(a.blksize).u64(0);
        o.u32(a.nlink).u32(a.uid).u32(a.gid);
        o.u16((type_bits(a.kind) | u32::from(a.perm)) as u16).u16(0);
        o.u64(a.ino.0).u64(a.size).u64(a.blocks).u64(0);
        let mut time = |(s, n): (u64, u32)| {
            o.u64(s).u32(n).u32(0);
        };
        time(split(a.atime));
        time(btime.map_or((0, 0), |(s, n)| (s as u64, n)));
        time(split(a.ctime));
        time(split(a.mtime));
        o.u32(crate::sys::major(dev)).u32(crate::sys::minor(dev));
        o.u32(0).u32(0).zeros(14 * 8);
        self.send(0, &[&o.buf]);
    }

    pub fn data(self, d: &[u8]) {
        self.send(0, &[d]);
    }

    /// Answers a READ with up to `size` bytes of `file` at `off` without copying them through
    /// the daemon: the header is written to `pipe`, the data spliced from the file into it
    /// (the pipe takes references to the file's cached pages) and the whole answer spliced
    /// into /dev/fuse, where the kernel copies the data once. Returns the bytes sent, or the
    /// reply back, unsent, where the data should be copied instead (too little or too much
    /// for the pipe, or a splice refused). `pipe` is emptied when a failure leaves bytes in
    /// it.
    pub fn data_spliced(
        self,
        pipe: &mut Option<sys::Pipe>,
        file: BorrowedFd<'_>,
        off: u64,
        size: usize,
    ) -> Result<usize, Reply> {
        let Some(p) = pipe.as_ref() else {
            return Err(self);
        };
        // What the file holds there now: the header must give the length before the data.
        let len = match sys::fstat(file) {
            Ok(st) => (st.st_size as u64).saturating_sub(off).min(size as u64) as usize,
            Err(_) => return Err(self),
        };
        // A slot for the header and one per page of data.
        let page = sys::page_size();
        let slots = 1 + ((off % page as u64) as usize + len).div_ceil(page);
        if len < SPLICE_MIN || slots * page > p.capacity {
            return Err(self);
        }
        let total = abi::OUT_HEADER + len;
        let hdr = abi::out_header(total, 0, self.unique);
        let filled = (|| {
            sys::write_all(p.w.as_fd(), &hdr)?;
            let mut at = off as i64;
            let mut put = 0;
            while put < len {
                // Never waiting for room: nothing else empties this pipe. A file cut and
                // extended again meanwhile can fill it early (the rest of a page cut short
                // takes a slot of its own); EAGAIN then, and the copy answers.
                let nonblock = libc::SPLICE_F_NONBLOCK;
                match sys::splice_with(file, Some(&mut at), p.w.as_fd(), len - put, nonblock)? {
                    // Shorter than it was a moment ago.
                    0 => return Err(Errno::EIO),
                    n => put += n,
                }
            }
            Ok(())
        })();
        if filled.is_err() {
            *pipe = None;
            return Err(self);
        }
        match sys::splice(p.r.as_fd(), None, self.ch.fd(), total) {
            Ok(n) if n == total => {
                let mut this = self;
                this.done = true;
                Ok(len)
            }
            // The request was interrupted and is gone.
            Err(e) if e.code() == libc::ENOENT => {
                let mut this = self;
                this.done = true;
                Ok(len)
            }
            r => {
                log::debug!("splicing the answer to request {}: {r:?}", self.unique);
                *pipe = None;
                Err(self)
            }
        }
    }

    pub fn opened(self, fh: u64, flags: FopenFlags, backing: Option<&BackingId>) {
        let mut o = Out::with_capacity(16);
        put_open(&mut o, fh, flags, backing);
        self.send(0, &[&o.buf]);
    }

    /// CREATE's and TMPFILE's answer; `entry` is how long the kernel may keep the name.
    #[allow(clippy::too_many_arguments)]
    pub fn created(
        self,
        entry: &Duration,
        ttl: &Duration,
        attr: &FileAttr,
        generation: u64,
        fh: u64,
        flags: FopenFlags,
        backing: Option<&BackingId>,
    ) {
        let mut o = Out::with_capacity(abi::ENTRY_OUT + 16);
        put_entry(&mut o, entry, ttl, attr, generation);
        put_open(&mut o, fh, flags, backing);
        self.send(0, &[&o.buf]);
    }

    pub fn written(self, n: u32) {
        let mut o = Out::with_capacity(8);
        o.u32(n).u32(0);
        self.send(0, &[&o.buf]);
    }

    /// `fuse_getxattr_out`: the size a value or list needs.
    pub fn size(self, n: u32) {
        self.written(n);
    }

    pub fn offset(self, off: i64) {
        self.send(0, &[&off.to_ne_bytes()]);
    }

    pub fn statfs(self, s: &libc::statvfs) {
        let mut o = Out::with_capacity(80);
        o.u64(s.f_blocks).u64(s.f_bfree).u64(s.f_bavail);
        o.u64(s.f_files).u64(s.f_ffree);
        o.u32(s.f_bsize as u32)
            .u32(s.f_namemax as u32)
            .u32(s.f_frsize as u32);
        o.zeros(4 + 24);
        self.send(0, &[&o.buf]);
    }

    pub fn ioctl(self, result: i32, data: &[u8]) {
        let mut o = Out::with_capacity(16);
        o.u32(result as u32).u32(0).u32(0).u32(0);
        self.send(0, &[&o.buf, data]);
    }

    pub fn dir(self, d: DirBuf) {
        self.send(0, &[&d.out.buf]);
    }
}

impl Drop for Reply {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let _ = self.ch.send(self.unique, -libc::EIO, &[]);
        }
    }
}

/// A listing reply being filled, up to the size the kernel asked for.
pub struct DirBuf {
    out: Out,
    max: usize,
}

fn padded(n: usize) -> usize {
    (n + 7) & !7
}

impl DirBuf {
    pub fn new(max: u32) -> DirBuf {
        let max = max as usize;
        DirBuf {
            out: Out::with_capacity(max.min(1 << 17)),
            max,
        }
    }

    /// Adds a plain entry; true when it did not fit (the listing is full).
    pub fn add(&mut self, ino: u64, next: u64, kind: FileType, name: &std::ffi::OsStr) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let name = name.as_bytes();
        let size = padded(abi::DIRENT + name.len());
        if self.out.len() + size > self.max {
            return true;
        }
        self.put_dirent(ino, next, kind, name, size);
        false
    }

    /// Adds an entry with its attributes (the name kept for `entry`, the attributes for
    /// `ttl`); true when it did not fit.
    pub fn add_plus(
        &mut self,
        next: u64,
        name: &std::ffi::OsStr,
        (entry, ttl): (&Duration, &Duration),
        attr: &FileAttr,
        generation: u64,
    ) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let name = name.as_bytes();
        let size = padded(abi::DIRENT + name.len());
        if self.out.len() + abi::ENTRY_OUT + size > self.max {
            return true;
        }
        put_entry(&mut self.out, entry, ttl, attr, generation);
        self.put_dirent(attr.ino.0, next, attr.kind, name, size);
        false
    }

    fn put_dirent(&mut self, ino: u64, next: u64, kind: FileType, name: &[u8], size: usize) {
        let start = self.out.len();
        self.out.u64(ino).u64(next).u32(name.len() as u32);
        self.out.u32(type_bits(kind) >> 12).bytes(name);
        self.out.zeros(size - (self.out.len() - start));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_before_the_epoch_split_as_the_kernel_reads_them() {
        let t = UNIX_EPOCH - Duration::new(1, 250_000_000);
        assert_eq!(split(t), ((-2i64) as u64, 750_000_000));
        assert_eq!(
            split(UNIX_EPOCH - Duration::from_secs(3)),
            ((-3i64) as u64, 0)
        );
        assert_eq!(split(UNIX_EPOCH + Duration::new(5, 7)), (5, 7));
    }

    #[test]
    fn dirents_are_padded_to_eight_bytes_and_stop_when_full() {
        let mut d = DirBuf::new(64);
        assert!(!d.add(7, 1, FileType::RegularFile, "abc".as_ref()));
        assert_eq!(d.out.len(), 32);
        assert_eq!(&d.out.buf[16..20], &3u32.to_ne_bytes());
        assert_eq!(&d.out.buf[20..24], &(libc::DT_REG as u32).to_ne_bytes());
        assert!(!d.add(8, 2, FileType::Directory, "0123456".as_ref()));
        assert_eq!(d.out.len(), 64);
        assert!(d.add(9, 3, FileType::Directory, "x".as_ref()));
        assert_eq!(d.out.len(), 64);
    }
}
