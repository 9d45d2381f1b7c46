//! nvme-mdev's native data plane: the I/O queues' hot path (doorbell → command →
//! storage → completion → interrupt) in Rust, on a thread of its own that holds no GIL.
//! It sits behind the Python DataPlane seam (src/nvme_mdev/dataplane/) and does what
//! the Python data plane does, command for command; the Python side stays the
//! reference it is tested against.
//!
//! `unsafe` lives at two boundaries only: guest memory and the mapped doorbell page
//! (memory.rs, queues.rs), and the kernel and librbd (storage.rs, engine.rs, rbd.rs:
//! iovecs handed to preadv2/pwritev2, io_uring and librbd; eventfds). Each block says
//! why it is sound.

pub mod engine;
pub mod fuzzing;
pub mod interrupts;
pub mod journal;
pub mod media_errors;
pub mod memory;
pub mod plane;
pub mod prp;
mod python;
pub mod queues;
pub mod rbd;
pub mod sgl;
pub mod sigbus;
pub mod spec;
pub mod stats;
pub mod storage;
pub mod table;
