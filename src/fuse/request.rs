//! Decoding of one request read from `/dev/fuse`: its header and its operation.

use std::ffi::OsStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, TimeOrNow};

use super::abi::{self, Args, fattr, op};
use crate::attr::SetAttr;

/// `fuse_in_header`: who asks, about what.
#[derive(Clone, Copy, Debug)]
pub struct Header {
    pub len: u32,
    pub opcode: u32,
    pub unique: u64,
    pub nodeid: u64,
    pub uid: u32,
    pub gid: u32,
    pub pid: u32,
}

impl Header {
    /// The header of a message of `n` bytes; None when the message is malformed.
    pub fn parse(msg: &[u8]) -> Option<Header> {
        let mut a = Args::new(msg);
        let h = Header {
            len: a.u32().ok()?,
            opcode: a.u32().ok()?,
            unique: a.u64().ok()?,
            nodeid: a.u64().ok()?,
            uid: a.u32().ok()?,
            gid: a.u32().ok()?,
            pid: a.u32().ok()?,
        };
        (h.len as usize == msg.len() && msg.len() >= abi::IN_HEADER).then_some(h)
    }

    /// For a malformed message: the request id to answer, if it has one that takes an
    /// answer (its caller would otherwise wait for good).
    pub fn unique_to_answer(msg: &[u8]) -> Option<u64> {
        let mut a = Args::new(msg);
        let (_len, opcode, unique) = (a.u32().ok()?, a.u32().ok()?, a.u64().ok()?);
        let no_answer = [op::FORGET, op::BATCH_FORGET, op::INTERRUPT];
        (unique != 0 && !no_answer.contains(&opcode)).then_some(unique)
    }
}

/// One operation, decoded. Inode numbers other than the header's are named in the variant.
#[derive(Debug)]
pub enum Op<'a> {
    Init {
        major: u32,
        minor: u32,
        max_readahead: u32,
        flags: u64,
    },
    Destroy,
    Interrupt,
    Lookup {
        name: &'a OsStr,
    },
    Forget {
        nlookup: u64,
    },
    BatchForget {
        items: Vec<(u64, u64)>,
    },
    Getattr {
        fh: Option<u64>,
    },
    /// GETATTR with the birth time (the kernel asks for basic stats and btime).
    Statx {
        fh: Option<u64>,
    },
    Setattr(SetAttr),
    Readlink,
    Mknod {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        rdev: u32,
    },
    Mkdir {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
    },
    Unlink {
        name: &'a OsStr,
    },
    Rmdir {
        name: &'a OsStr,
    },
    Symlink {
        name: &'a OsStr,
        target: &'a OsStr,
    },
    Rename {
        name: &'a OsStr,
        newdir: u64,
        newname: &'a OsStr,
        flags: u32,
    },
    Link {
        ino: u64,
        newname: &'a OsStr,
    },
    Open {
        flags: i32,
    },
    Read {
        fh: u64,
        offset: u64,
        size: u32,
        flags: i32,
    },
    Write {
        fh: u64,
        offset: u64,
        data: &'a [u8],
        write_flags: u32,
    },
    Statfs,
    Release {
        fh: u64,
    },
    Fsync {
        fh: u64,
        datasync: bool,
    },
    Setxattr {
        name: &'a OsStr,
        value: &'a [u8],
        flags: i32,
    },
    Getxattr {
        name: &'a OsStr,
        size: u32,
    },
    Listxattr {
        size: u32,
    },
    Removexattr {
        name: &'a OsStr,
    },
    Flush,
    Opendir,
    Readdir {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Readdirplus {
        fh: u64,
        offset: u64,
        size: u32,
    },
    Releasedir {
        fh: u64,
    },
    Fsyncdir {
        datasync: bool,
    },
    Access,
    /// O_TMPFILE: an unnamed file in the directory (the name the kernel sends is "/").
    Tmpfile {
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Create {
        name: &'a OsStr,
        mode: u32,
        umask: u32,
        flags: i32,
    },
    Ioctl {
        cmd: u32,
        in_data: &'a [u8],
        out_size: u32,
    },
    Fallocate {
        fh: u64,
        offset: u64,
        length: u64,
        mode: i32,
    },
    Lseek {
        fh: u64,
        offset: i64,
        whence: i32,
    },
    CopyFileRange {
        fh_in: u64,
        off_in: u64,
        fh_out: u64,
        off_out: u64,
        len: u64,
    },
    /// An operation this daemon does not serve: ENOSYS.
    Unknown(u32),
}

fn time(secs: u64, nsecs: u32) -> SystemTime {
    let secs = secs as i64;
    let nsecs = Duration::from_nanos(u64::from(nsecs.min(999_999_999)));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nsecs
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nsecs
    }
}

impl<'a> Op<'a> {
    /// The operation for a log line: payloads by their size only.
    pub fn brief(&self) -> String {
        match self {
            Op::Write {
                fh, offset, data, ..
            } => format!(
                "Write {{ fh: {fh}, offset: {offset}, size: {} }}",
                data.len()
            ),
            Op::Setxattr { name, value, flags } => {
                format!(
                    "Setxattr {{ name: {name:?}, size: {}, flags: {flags} }}",
                    value.len()
                )
            }
            Op::Ioctl {
                cmd,
                in_data,
                out_size,
            } => format!(
                "Ioctl {{ cmd: {cmd:#x}, in: {}, out: {out_size} }}",
                in_data.len()
            ),
            Op::BatchForget { items } => format!("BatchForget {{ {} }}", items.len()),
            other => format!("{other:?}"),
        }
    }

    /// Decodes the body after the header; a body too short for its operation is EINVAL.
    pub fn parse(opcode: u32, body: &'a [u8]) -> Result<Op<'a>, Errno> {
        let mut a = Args::new(body);
        Ok(match opcode {
            op::INIT => {
                let (major, minor, max_readahead, flags) = (a.u32()?, a.u32()?, a.u32()?, a.u32()?);
                // flags2 exists from 7.36 on; a shorter INIT has none.
                let flags2 = a.u32().unwrap_or(0);
                Op::Init {
                    major,
                    minor,
                    max_readahead,
                    flags: u64::from(flags) | (u64::from(flags2) << 32),
                }
            }
            op::DESTROY => Op::Destroy,
            op::INTERRUPT => Op::Interrupt,
            op::LOOKUP => Op::Lookup {
                name: a.component()?,
            },
            op::FORGET => Op::Forget { nlookup: a.u64()? },
            op::BATCH_FORGET => {
                let count = a.u32()?;
                a.skip(4)?;
                let mut items = Vec::with_capacity((count as usize).min(body.len() / 16));
                for _ in 0..count {
                    items.push((a.u64()?, a.u64()?));
                }
                Op::BatchForget { items }
            }
            op::GETATTR => {
                let flags = a.u32()?;
                a.skip(4)?;
                let fh = a.u64()?;
                Op::Getattr {
                    fh: (flags & abi::GETATTR_FH != 0).then_some(fh),
                }
            }
            op::SETATTR => {
                let valid = a.u32()?;
                a.skip(4)?;
                let fh = a.u64()?;
                let size = a.u64()?;
                let _lock_owner = a.u64()?;
                let (atime, mtime, ctime) = (a.u64()?, a.u64()?, a.u64()?);
                let (atimensec, mtimensec, ctimensec) = (a.u32()?, a.u32()?, a.u32()?);
                let mode = a.u32()?;
                a.skip(4)?;
                let (uid, gid) = (a.u32()?, a.u32()?);
                a.skip(4)?;
                let has = |bit| valid & bit != 0;
                let at = |now, set, s, ns| {
                    if has(now) {
                        Some(TimeOrNow::Now)
                    } else if has(set) {
                        Some(TimeOrNow::SpecificTime(time(s, ns)))
                    } else {
                        None
                    }
                };
                Op::Setattr(SetAttr {
                    mode: has(fattr::MODE).then_some(mode),
                    uid: has(fattr::UID).then_some(uid),
                    gid: has(fattr::GID).then_some(gid),
                    size: has(fattr::SIZE).then_some(size),
                    atime: at(fattr::ATIME_NOW, fattr::ATIME, atime, atimensec),
                    mtime: at(fattr::MTIME_NOW, fattr::MTIME, mtime, mtimensec),
                    ctime: has(fattr::CTIME).then(|| time(ctime, ctimensec)),
                    fh: has(fattr::FH).then_some(fh),
                })
            }
            op::STATX => {
                let flags = a.u32()?;
                a.skip(4)?;
                let fh = a.u64()?;
                a.skip(8)?; // sx_flags, sx_mask
                Op::Statx {
                    fh: (flags & abi::GETATTR_FH != 0).then_some(fh),
                }
            }
            op::READLINK => Op::Readlink,
            op::SYMLINK => {
                let name = a.component()?;
                Op::Symlink {
                    name,
                    target: a.name()?,
                }
            }
            op::MKNOD => {
                let (mode, rdev, umask) = (a.u32()?, a.u32()?, a.u32()?);
                a.skip(4)?;
                Op::Mknod {
                    name: a.component()?,
                    mode,
                    umask,
                    rdev,
                }
            }
            op::MKDIR => {
                let (mode, umask) = (a.u32()?, a.u32()?);
                Op::Mkdir {
                    name: a.component()?,
                    mode,
                    umask,
                }
            }
            op::UNLINK => Op::Unlink {
                name: a.component()?,
            },
            op::RMDIR => Op::Rmdir {
                name: a.component()?,
            },
            op::RENAME | op::RENAME2 => {
                let newdir = a.u64()?;
                let flags = if opcode == op::RENAME2 {
                    let f = a.u32()?;
                    a.skip(4)?;
                    f
                } else {
                    0
                };
                let name = a.component()?;
                Op::Rename {
                    name,
                    newdir,
                    newname: a.component()?,
                    flags,
                }
            }
            op::LINK => {
                let ino = a.u64()?;
                Op::Link {
                    ino,
                    newname: a.component()?,
                }
            }
            op::OPEN => Op::Open {
                flags: a.u32()? as i32,
            },
            op::OPENDIR => Op::Opendir,
            op::READ | op::READDIR | op::READDIRPLUS => {
                let (fh, offset, size) = (a.u64()?, a.u64()?, a.u32()?);
                let _read_flags = a.u32()?;
                let _lock_owner = a.u64()?;
                let flags = a.u32()? as i32;
                match opcode {
                    op::READ => Op::Read {
                        fh,
                        offset,
                        size,
                        flags,
                    },
                    op::READDIR => Op::Readdir { fh, offset, size },
                    _ => Op::Readdirplus { fh, offset, size },
                }
            }
            op::WRITE => {
                let (fh, offset, size, write_flags) = (a.u64()?, a.u64()?, a.u32()?, a.u32()?);
                a.skip(16)?;
                Op::Write {
                    fh,
                    offset,
                    data: a.bytes(size as usize)?,
                    write_flags,
                }
            }
            op::STATFS => Op::Statfs,
            op::RELEASE => Op::Release { fh: a.u64()? },
            op::RELEASEDIR => Op::Releasedir { fh: a.u64()? },
            op::FSYNC | op::FSYNCDIR => {
                let fh = a.u64()?;
                let datasync = a.u32()? & 1 != 0;
                if opcode == op::FSYNC {
                    Op::Fsync { fh, datasync }
                } else {
                    Op::Fsyncdir { datasync }
                }
            }
            op::SETXATTR => {
                // Without FUSE_SETXATTR_EXT the header is { size, flags }.
                let (size, flags) = (a.u32()?, a.u32()? as i32);
                let name = a.name()?;
                Op::Setxattr {
                    name,
                    value: a.bytes(size as usize)?,
                    flags,
                }
            }
            op::GETXATTR => {
                let size = a.u32()?;
                a.skip(4)?;
                Op::Getxattr {
                    name: a.name()?,
                    size,
                }
            }
            op::LISTXATTR => Op::Listxattr { size: a.u32()? },
            op::REMOVEXATTR => Op::Removexattr { name: a.name()? },
            op::FLUSH => Op::Flush,
            op::ACCESS => Op::Access,
            op::CREATE | op::TMPFILE => {
                let (flags, mode, umask) = (a.u32()? as i32, a.u32()?, a.u32()?);
                a.skip(4)?;
                // TMPFILE names no entry: the kernel sends "/".
                let name = match opcode {
                    op::CREATE => a.component()?,
                    _ => a.name()?,
                };
                match opcode {
                    op::CREATE => Op::Create {
                        name,
                        mode,
                        umask,
                        flags,
                    },
                    _ => Op::Tmpfile { mode, umask, flags },
                }
            }
            op::IOCTL => {
                let _fh = a.u64()?;
                let _flags = a.u32()?;
                let cmd = a.u32()?;
                let _arg = a.u64()?;
                let (in_size, out_size) = (a.u32()?, a.u32()?);
                Op::Ioctl {
                    cmd,
                    in_data: a.bytes(in_size as usize)?,
                    out_size,
                }
            }
            op::FALLOCATE => Op::Fallocate {
                fh: a.u64()?,
                offset: a.u64()?,
                length: a.u64()?,
                mode: a.u32()? as i32,
            },
            op::LSEEK => Op::Lseek {
                fh: a.u64()?,
                offset: a.u64()? as i64,
                whence: a.u32()? as i32,
            },
            op::COPY_FILE_RANGE => {
                let (fh_in, off_in) = (a.u64()?, a.u64()?);
                let _nodeid_out = a.u64()?;
                Op::CopyFileRange {
                    fh_in,
                    off_in,
                    fh_out: a.u64()?,
                    off_out: a.u64()?,
                    len: a.u64()?,
                }
            }
            other => Op::Unknown(other),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn malformed_requests_are_answered_when_they_take_an_answer() {
        let msg = |len: u32, opcode: u32, unique: u64| {
            let mut m = Vec::new();
            m.extend_from_slice(&len.to_ne_bytes());
            m.extend_from_slice(&opcode.to_ne_bytes());
            m.extend_from_slice(&unique.to_ne_bytes());
            m
        };
        // A length that does not match what was read.
        let getattr = msg(999, 3, 42);
        assert!(Header::parse(&getattr).is_none());
        assert_eq!(Header::unique_to_answer(&getattr), Some(42));
        assert_eq!(Header::unique_to_answer(&msg(999, op::FORGET, 42)), None);
        assert_eq!(Header::unique_to_answer(&msg(999, op::INTERRUPT, 42)), None);
        assert_eq!(Header::unique_to_answer(&getattr[..12]), None);
    }

    #[test]
    fn no_body_makes_decoding_panic() {
        // Every opcode, every short length, bytes with and without NULs.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for opcode in 0..64 {
            for len in 0..160 {
                let body: Vec<u8> = (0..len)
                    .map(|_| {
                        seed ^= seed << 13;
                        seed ^= seed >> 7;
                        seed ^= seed << 17;
                        if seed % 5 == 0 { 0 } else { seed as u8 }
                    })
                    .collect();
                let _ = Op::parse(opcode, &body);
                let _ = Header::parse(&body);
            }
        }
    }

    #[test]
    fn setattr_takes_only_the_fields_marked_valid() {
        let mut b = abi::Out::default();
        b.u32(fattr::MODE | fattr::MTIME_NOW | fattr::ATIME | fattr::FH)
            .u32(0);
        b.u64(9).u64(4096).u64(0); // fh, size, lock owner
        b.u64(100).u64(200).u64(300).u32(5).u32(6).u32(7); // times
        b.u32(0o100644).u32(0).u32(1000).u32(1000).u32(0);
        let Ok(Op::Setattr(s)) = Op::parse(op::SETATTR, &b.buf) else {
            panic!("not a setattr");
        };
        assert_eq!(s.mode, Some(0o100644));
        assert_eq!((s.uid, s.gid, s.size), (None, None, None));
        assert_eq!(s.fh, Some(9));
        assert_eq!(s.mtime, Some(TimeOrNow::Now));
        assert_eq!(
            s.atime,
            Some(TimeOrNow::SpecificTime(UNIX_EPOCH + Duration::new(100, 5)))
        );
        // One byte short: EINVAL, not a guess.
        assert!(Op::parse(op::SETATTR, &b.buf[..b.len() - 1]).is_err());
    }

    #[test]
    fn rename2_reads_its_flags_and_both_names() {
        let mut b = abi::Out::default();
        b.u64(42)
            .u32(libc::RENAME_NOREPLACE)
            .u32(0)
            .bytes(b"old\0new\0");
        match Op::parse(op::RENAME2, &b.buf) {
            Ok(Op::Rename {
                name,
                newdir,
                newname,
                flags,
            }) => {
                assert_eq!(
                    (name, newdir, newname),
                    ("old".as_ref(), 42, "new".as_ref())
                );
                assert_eq!(flags, libc::RENAME_NOREPLACE);
            }
            other => panic!("{other:?}"),
        }
        // A name without its NUL is malformed, and so is one of more than one component.
        assert!(Op::parse(op::LOOKUP, b"abc").is_err());
        assert!(Op::parse(op::LOOKUP, b"/\0").is_err());
        assert!(Op::parse(op::UNLINK, b"a/b\0").is_err());
        assert!(matches!(
            Op::parse(op::TMPFILE, b"\0\0\0\0\xa4\x81\0\0\x12\0\0\0\0\0\0\0/\0"),
            Ok(Op::Tmpfile { .. })
        ));
    }
}
