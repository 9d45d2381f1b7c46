//! What a command completes with when the host storage under its namespace fails: the
//! table of nvme/media_errors.py (which explains each choice), for the native engines.
//! tests/unit/test_native_plane.py checks every errno against the Python table.

use crate::spec::status;

/// How one failed backend access completes its command, and what else it means.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFailure {
    pub status: u16,
    pub dnr: bool,
    /// counted in SMART's Media and Data Integrity Errors
    pub media: bool,
    /// the store has gone: the namespace fails every later command
    pub gone: bool,
    /// the store went read-only: the namespace becomes write protected
    pub read_only: bool,
}

const fn failure(status: u16, dnr: bool) -> HostFailure {
    HostFailure {
        status,
        dnr,
        media: false,
        gone: false,
        read_only: false,
    }
}

pub const GONE: HostFailure = HostFailure {
    gone: true,
    ..failure(status::NAMESPACE_NOT_READY, true)
};
pub const PAST_END: HostFailure = failure(status::LBA_OUT_OF_RANGE, true);
pub const NO_SPACE: HostFailure = failure(status::CAPACITY_EXCEEDED, true);
pub const READ_ONLY: HostFailure = HostFailure {
    read_only: true,
    ..failure(status::NAMESPACE_WRITE_PROTECTED, true)
};
pub const DENIED: HostFailure = failure(status::ACCESS_DENIED, true);
pub const INTERRUPTED: HostFailure = failure(status::COMMAND_INTERRUPTED, false);
pub const READ_MEDIA_ERROR: HostFailure = HostFailure {
    media: true,
    ..failure(status::UNRECOVERED_READ_ERROR, false)
};
pub const WRITE_MEDIA_ERROR: HostFailure = HostFailure {
    media: true,
    ..failure(status::WRITE_FAULT, false)
};

pub fn is_gone(errno: i32) -> bool {
    matches!(
        errno,
        libc::ENODEV | libc::ENXIO | libc::ESTALE | libc::ENOTCONN | libc::ESHUTDOWN | libc::EBADF
    )
}

/// What the store says when asked its size, after an EIO or ENOSPC.
pub enum StoreSize {
    Bytes(u64),
    /// asking failed with this errno
    Failed(i32),
}

/// Errnos that say a network store (a Ceph RBD image) cannot be reached for now:
/// nvme/media_errors.py UNREACHABLE_ERRNOS. (Not EBLOCKLISTED, ESHUTDOWN on Linux: a
/// client the cluster fenced off never writes again; the store is gone.)
pub fn is_unreachable(errno: i32) -> bool {
    matches!(
        errno,
        libc::ETIMEDOUT
            | libc::ENOTCONN
            | libc::ECONNREFUSED
            | libc::ECONNRESET
            | libc::ECONNABORTED
            | libc::EHOSTUNREACH
            | libc::ENETUNREACH
            | libc::ENETDOWN
            | libc::EHOSTDOWN
    )
}

/// a network store out of reach: not ready now, and worth retrying
pub const UNREACHABLE: HostFailure = failure(status::NAMESPACE_NOT_READY, false);

/// `classify` for any store: a `network` one out of reach fails retryably, and is not
/// gone (nvme/media_errors.py classify with the backend's `network`).
pub fn classify_store(
    errno: i32,
    writing: bool,
    past_end: bool,
    network: bool,
    block_device: bool,
    store_size: impl FnOnce() -> StoreSize,
) -> HostFailure {
    if network && is_unreachable(errno) {
        return UNREACHABLE;
    }
    classify(errno, writing, past_end, block_device, store_size)
}

/// The failure `errno` (from a read, or a write with `writing`) stands for. `past_end`:
/// a read met the end of the store (a short read of nothing); `block_device` and
/// `store_size` describe the storage, asked only for EIO and ENOSPC.
pub fn classify(
    errno: i32,
    writing: bool,
    past_end: bool,
    block_device: bool,
    store_size: impl FnOnce() -> StoreSize,
) -> HostFailure {
    if is_gone(errno) {
        return GONE;
    }
    let past_end = past_end || (errno == libc::ENOSPC && block_device);
    if errno == libc::EIO || errno == libc::ENOSPC {
        // The errno cannot tell a bad sector from a deleted disk, nor a full filesystem
        // from a device that shrank: ask the store (only on this slow path).
        match store_size() {
            StoreSize::Failed(probe) => return if is_gone(probe) { GONE } else { media(writing) },
            StoreSize::Bytes(0) if block_device => return GONE,
            StoreSize::Bytes(_) => {}
        }
    }
    if past_end {
        return PAST_END;
    }
    match errno {
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NO_SPACE,
        libc::EROFS => READ_ONLY,
        libc::EACCES | libc::EPERM => DENIED,
        libc::EAGAIN | libc::EINTR | libc::ETIMEDOUT | libc::EBUSY => INTERRUPTED,
        _ => media(writing),
    }
}

fn media(writing: bool) -> HostFailure {
    if writing {
        WRITE_MEDIA_ERROR
    } else {
        READ_MEDIA_ERROR
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_table() {
        let size = || StoreSize::Bytes(1 << 20);
        assert_eq!(classify(libc::ENODEV, false, false, false, size), GONE);
        assert_eq!(
            classify(libc::EIO, false, false, false, size),
            READ_MEDIA_ERROR
        );
        assert_eq!(
            classify(libc::EIO, true, false, true, || StoreSize::Bytes(0)),
            GONE
        );
        assert_eq!(classify(libc::EIO, false, true, false, size), PAST_END);
        assert_eq!(classify(libc::ENOSPC, true, false, false, size), NO_SPACE);
        assert_eq!(classify(libc::ENOSPC, true, false, true, size), PAST_END);
        assert_eq!(classify(libc::EROFS, true, false, false, size), READ_ONLY);
        assert_eq!(
            classify(libc::EIO, true, false, false, || StoreSize::Failed(
                libc::ENXIO
            )),
            GONE
        );
    }

    #[test]
    fn a_network_store_out_of_reach_is_retryable_and_only_it() {
        let size = || StoreSize::Bytes(1 << 20);
        for errno in [
            libc::ETIMEDOUT,
            libc::ENOTCONN,
            libc::ECONNREFUSED,
            libc::EHOSTDOWN,
        ] {
            assert_eq!(
                classify_store(errno, true, false, true, false, size),
                UNREACHABLE
            );
            assert_ne!(
                classify_store(errno, true, false, false, false, size),
                UNREACHABLE
            );
        }
        // fenced off (EBLOCKLISTED), or any other failure: the table as for a file
        assert_eq!(
            classify_store(libc::ESHUTDOWN, true, false, true, false, size),
            GONE
        );
        assert_eq!(
            classify_store(libc::EIO, false, false, true, false, size),
            READ_MEDIA_ERROR
        );
    }
}
