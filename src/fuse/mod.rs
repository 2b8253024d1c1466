//! unionmount's own FUSE transport: the protocol (`abi`, `request`, `reply`), the request
//! loop (`session`), and the long work a request may do in it (`longwork`). Types the
//! protocol shares with the rest of the crate (`FileAttr`, `Errno`, the flag sets) are
//! fuser's.

pub mod abi;
pub mod longwork;
pub mod reply;
pub mod request;
pub mod session;

pub use reply::{BackingId, Channel, DirBuf, Notifier, Reply};
pub use request::{Header, Op};
pub use session::{Access, InitConfig, Session};
