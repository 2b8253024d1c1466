//! unionmount's own FUSE transport: the protocol (`abi`, `request`, `reply`) and the request
//! loop (`session`). Types the protocol shares with the rest of the crate (`FileAttr`,
//! `Errno`, the flag sets) are fuser's.

pub mod abi;
pub mod reply;
pub mod request;
pub mod session;

pub use reply::{BackingId, Channel, DirBuf, Notifier, Reply};
pub use request::{Header, Op};
pub use session::{Access, InitConfig, Session};
