//! The request loop: the INIT handshake, then threads that each read requests from their own
//! fd of the connection and serve them.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use fuser::InitFlags;

use super::abi::{self, Out, op};
use super::reply::{Channel, Notifier, Reply};
use super::request::{Header, Op};
use crate::fs::UnionFs;
use crate::sys;

/// Who may use the mount besides what the kernel already enforces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    All,
    RootAndOwner,
    Owner,
}

/// What INIT settles: the kernel's offer and the daemon's choices.
#[derive(Debug)]
pub struct InitConfig {
    pub capable: InitFlags,
    pub want: InitFlags,
    pub max_write: u32,
    pub max_readahead: u32,
    pub max_background: u16,
    pub congestion_threshold: u16,
    pub max_stack_depth: u32,
}

impl InitConfig {
    /// Asks for a capability; false when the kernel does not offer it.
    pub fn add(&mut self, f: InitFlags) -> bool {
        if self.capable.contains(f) {
            self.want |= f;
            true
        } else {
            false
        }
    }
}

pub struct Session {
    fs: Arc<UnionFs>,
    ch: Channel,
    threads: usize,
    access: Access,
    owner: u32,
    /// Room for the largest request: a WRITE of `max_write` bytes and its headers.
    buf_size: usize,
}

fn io_err(e: fuser::Errno) -> std::io::Error {
    std::io::Error::from_raw_os_error(e.code())
}

impl Session {
    /// Performs the INIT handshake on `dev`, the fd of a fresh mount.
    pub fn new(
        fs: UnionFs,
        dev: OwnedFd,
        threads: usize,
        access: Access,
    ) -> std::io::Result<Session> {
        let mut s = Session {
            fs: Arc::new(fs),
            ch: Channel::new(dev),
            threads: threads.max(1),
            access,
            owner: sys::geteuid(),
            buf_size: crate::fs::MAX_IO as usize + 4096,
        };
        s.handshake()?;
        Ok(s)
    }

    pub fn notifier(&self) -> Notifier {
        Notifier(self.ch.clone())
    }

    fn handshake(&mut self) -> std::io::Result<()> {
        let mut buf = vec![0u8; self.buf_size];
        loop {
            let n = match sys::read_dev(self.ch.fd(), &mut buf) {
                Ok(n) => n,
                Err(e) if [libc::EINTR, libc::EAGAIN, libc::ENOENT].contains(&e.code()) => {
                    continue;
                }
                Err(e) => return Err(io_err(e)),
            };
            let msg = &buf[..n];
            let Some(h) = Header::parse(msg) else {
                return Err(std::io::Error::other("malformed request before INIT"));
            };
            let reply = Reply::new(self.ch.clone(), h.unique);
            let Ok(Op::Init {
                major,
                minor,
                max_readahead,
                flags,
            }) = Op::parse(h.opcode, &msg[abi::IN_HEADER..])
            else {
                reply.error(fuser::Errno::EIO);
                return Err(std::io::Error::other(
                    "the kernel sent a request before INIT",
                ));
            };
            if major > abi::MAJOR {
                // A newer major version: answer ours, and the kernel sends INIT again.
                let mut o = Out::with_capacity(8);
                o.u32(abi::MAJOR).u32(abi::MINOR);
                reply.data(&o.buf);
                continue;
            }
            if major < abi::MAJOR || minor < 36 {
                reply.error(fuser::Errno::EPROTO);
                return Err(std::io::Error::other(format!(
                    "the kernel speaks FUSE {major}.{minor}; 7.36 or later is needed"
                )));
            }
            let capable = InitFlags::from_bits_retain(flags);
            let mut cfg = InitConfig {
                capable,
                want: InitFlags::empty(),
                max_write: crate::fs::MAX_IO,
                max_readahead: max_readahead.min(crate::fs::MAX_IO),
                max_background: 16,
                congestion_threshold: 12,
                max_stack_depth: 0,
            };
            cfg.add(InitFlags::FUSE_INIT_EXT);
            Arc::get_mut(&mut self.fs)
                .expect("no thread runs before INIT")
                .init(&mut cfg);
            let want = cfg.want & capable;
            let page = 4096u32;
            let max_pages = (cfg.max_write.max(cfg.max_readahead).div_ceil(page)) as u16;
            let bits = want.bits();
            let mut o = Out::with_capacity(64);
            o.u32(abi::MAJOR).u32(abi::MINOR).u32(cfg.max_readahead);
            o.u32(bits as u32);
            o.u16(cfg.max_background).u16(cfg.congestion_threshold);
            o.u32(cfg.max_write).u32(1); // time_gran: 1 ns
            o.u16(max_pages).u16(0);
            o.u32((bits >> 32) as u32);
            let depth = if want.contains(InitFlags::FUSE_PASSTHROUGH) {
                cfg.max_stack_depth
            } else {
                0
            };
            o.u32(depth);
            o.zeros(64 - o.len());
            reply.data(&o.buf);
            log::debug!("INIT: FUSE {major}.{minor}, flags {bits:#x}");
            return Ok(());
        }
    }

    /// Serves requests until the mount goes away.
    pub fn run(self) -> std::io::Result<()> {
        let mut channels = vec![self.ch.clone()];
        for _ in 1..self.threads {
            channels.push(Channel::new(
                sys::clone_dev_fuse(self.ch.fd()).map_err(io_err)?,
            ));
        }
        let mut handles = Vec::with_capacity(channels.len());
        for (i, ch) in channels.into_iter().enumerate() {
            let w = Worker {
                fs: self.fs.clone(),
                ch,
                access: self.access,
                owner: self.owner,
                buf_size: self.buf_size,
            };
            handles.push(
                std::thread::Builder::new()
                    .name(format!("fuse-{i}"))
                    .spawn(move || w.serve())?,
            );
        }
        let mut res = Ok(());
        for h in handles {
            match h.join() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    if res.is_ok() {
                        res = Err(e)
                    }
                }
                Err(_) => res = Err(std::io::Error::other("a request thread panicked")),
            }
        }
        res
    }
}

struct Worker {
    fs: Arc<UnionFs>,
    ch: Channel,
    access: Access,
    owner: u32,
    buf_size: usize,
}

impl Worker {
    fn serve(self) -> std::io::Result<()> {
        // Zeroed by the allocator: the pages stay untouched until a request needs them.
        let mut buf = vec![0u8; self.buf_size];
        loop {
            let n = match sys::read_dev(self.ch.fd(), &mut buf) {
                Ok(n) => n,
                Err(e) => match e.code() {
                    // Interrupted, or the request went away before it was read.
                    libc::EINTR | libc::EAGAIN | libc::ENOENT => continue,
                    // The mount is gone.
                    libc::ENODEV | libc::ECONNABORTED => return Ok(()),
                    _ => return Err(io_err(e)),
                },
            };
            if !self.handle(&buf[..n]) {
                return Ok(());
            }
        }
    }

    /// Serves one request; false after DESTROY.
    fn handle(&self, msg: &[u8]) -> bool {
        let Some(h) = Header::parse(msg) else {
            log::warn!("ignoring a malformed request of {} bytes", msg.len());
            return true;
        };
        let body = &msg[abi::IN_HEADER..];
        // Requests that get no reply.
        match h.opcode {
            op::FORGET | op::BATCH_FORGET | op::INTERRUPT => {
                if let Ok(op) = Op::parse(h.opcode, body) {
                    self.fs.dispatch(&h, op, None);
                }
                return true;
            }
            _ => {}
        }
        let reply = Reply::new(self.ch.clone(), h.unique);
        if h.opcode == op::DESTROY {
            reply.ok();
            return false;
        }
        if !self.allowed(&h) {
            reply.error(fuser::Errno::EACCES);
            return true;
        }
        match Op::parse(h.opcode, body) {
            Ok(Op::Init { .. }) => reply.error(fuser::Errno::EIO),
            Ok(op) => {
                if log::log_enabled!(log::Level::Debug) {
                    log::debug!(
                        "request {} ino {} uid {} pid {}: {}",
                        h.unique,
                        h.nodeid,
                        h.uid,
                        h.pid,
                        op.brief()
                    );
                }
                self.fs.dispatch(&h, op, Some(reply))
            }
            Err(e) => {
                log::debug!("request {}: opcode {} malformed", h.unique, h.opcode);
                reply.error(e)
            }
        }
        true
    }

    /// `-o allow_root` and a mount for its owner only: requests that carry a caller's
    /// identity must come from root or the owner.
    fn allowed(&self, h: &Header) -> bool {
        let ok_uid = match self.access {
            Access::All => return true,
            Access::RootAndOwner => h.uid == 0 || h.uid == self.owner,
            Access::Owner => h.uid == self.owner,
        };
        // The kernel may send these without the caller's identity.
        ok_uid
            || matches!(
                h.opcode,
                op::READ
                    | op::WRITE
                    | op::READDIR
                    | op::READDIRPLUS
                    | op::FSYNC
                    | op::FSYNCDIR
                    | op::RELEASE
                    | op::RELEASEDIR
            )
    }
}
