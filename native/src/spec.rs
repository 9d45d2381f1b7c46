//! NVMe constants the I/O path needs (NVMe Base 2.x, NVM Command Set 1.x): opcodes,
//! status codes, and the Do Not Retry rule. The Python side's `nvme/spec.py` has the
//! same values; `tests/unit/test_native_plane.py` checks that they agree.

pub const PAGE_SIZE: u64 = 4096;
pub const PAGE_MASK: u64 = PAGE_SIZE - 1;
pub const SQE_SIZE: u64 = 64;
pub const CQE_SIZE: u64 = 16;
pub const BROADCAST_NSID: u32 = 0xFFFF_FFFF;

/// I/O command opcodes (NVM Command Set 1.x, Figure 18).
pub mod opcode {
    pub const FLUSH: u8 = 0x00;
    pub const WRITE: u8 = 0x01;
    pub const READ: u8 = 0x02;
    pub const COMPARE: u8 = 0x05;
    pub const WRITE_ZEROES: u8 = 0x08;
    pub const DATASET_MANAGEMENT: u8 = 0x09;
    pub const VERIFY: u8 = 0x0C;
    pub const COPY: u8 = 0x19;
}

/// Status Field values: SCT << 8 | SC, without DNR (Base 4.6.1.2).
pub mod status {
    pub const SUCCESS: u16 = 0x000;
    pub const INVALID_OPCODE: u16 = 0x001;
    pub const INVALID_FIELD: u16 = 0x002;
    pub const DATA_TRANSFER_ERROR: u16 = 0x004;
    pub const INTERNAL_ERROR: u16 = 0x006;
    pub const ABORT_REQUESTED: u16 = 0x007;
    pub const ABORT_SQ_DELETED: u16 = 0x008;
    pub const ABORT_FUSE_MISSING: u16 = 0x00A;
    pub const INVALID_NAMESPACE: u16 = 0x00B;
    pub const INVALID_SGL_SEGMENT_DESCRIPTOR: u16 = 0x00D;
    pub const INVALID_NUMBER_OF_SGL_DESCRIPTORS: u16 = 0x00E;
    pub const DATA_SGL_LENGTH_INVALID: u16 = 0x00F;
    pub const SGL_DESCRIPTOR_TYPE_INVALID: u16 = 0x011;
    pub const PRP_OFFSET_INVALID: u16 = 0x013;
    pub const SGL_DATA_BLOCK_GRANULARITY_INVALID: u16 = 0x01E;
    pub const NAMESPACE_WRITE_PROTECTED: u16 = 0x020;
    pub const COMMAND_INTERRUPTED: u16 = 0x021;
    pub const TRANSIENT_TRANSPORT_ERROR: u16 = 0x022;
    pub const LBA_OUT_OF_RANGE: u16 = 0x080;
    pub const CAPACITY_EXCEEDED: u16 = 0x081;
    pub const NAMESPACE_NOT_READY: u16 = 0x082;
    pub const WRITE_FAULT: u16 = 0x280;
    pub const UNRECOVERED_READ_ERROR: u16 = 0x281;
    pub const ACCESS_DENIED: u16 = 0x286;
}

/// Do Not Retry, in the Status Field.
pub const DNR: u16 = 1 << 14;

/// The Status Field with Do Not Retry set where retrying cannot help (spec.with_dnr).
pub fn with_dnr(sf: u16) -> u16 {
    use status::*;
    match sf {
        SUCCESS
        | DATA_TRANSFER_ERROR
        | INTERNAL_ERROR
        | ABORT_REQUESTED
        | ABORT_SQ_DELETED
        | COMMAND_INTERRUPTED
        | TRANSIENT_TRANSPORT_ERROR
        | NAMESPACE_NOT_READY
        | WRITE_FAULT
        | UNRECOVERED_READ_ERROR => sf,
        _ => sf | DNR,
    }
}

/// One submission queue entry, as the guest wrote it: sixteen little-endian dwords.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Sqe {
    pub dw: [u32; 16],
}

/// CDW0 FUSE (bits 9:8) and PSDT (bits 15:14): anything but a plain PRP command.
pub const CDW0_FUSE_OR_PSDT: u32 = 0xC300;
pub const CDW0_FUSE: u32 = 0x3 << 8;
/// FUSE 01b and 10b: the first and the second command of a fused operation.
pub const CDW0_FUSE_FIRST: u32 = 0x1 << 8;
pub const CDW0_FUSE_SECOND: u32 = 0x2 << 8;
pub const CDW0_PSDT: u32 = 0x3 << 14;
/// CDW12 Force Unit Access (Read, Write, Write Zeroes, ...).
pub const FUA: u32 = 1 << 30;
/// CDW12 Deallocate (Write Zeroes).
pub const DEAC: u32 = 1 << 25;

impl Sqe {
    /// The entry from its 64 bytes.
    pub fn from_bytes(raw: &[u8; 64]) -> Sqe {
        let mut dw = [0u32; 16];
        for (i, word) in dw.iter_mut().enumerate() {
            *word =
                u32::from_le_bytes([raw[4 * i], raw[4 * i + 1], raw[4 * i + 2], raw[4 * i + 3]]);
        }
        Sqe { dw }
    }

    pub fn opcode(&self) -> u8 {
        self.dw[0] as u8
    }

    pub fn cid(&self) -> u16 {
        (self.dw[0] >> 16) as u16
    }

    pub fn nsid(&self) -> u32 {
        self.dw[1]
    }

    pub fn prp1(&self) -> u64 {
        u64::from(self.dw[6]) | (u64::from(self.dw[7]) << 32)
    }

    pub fn prp2(&self) -> u64 {
        u64::from(self.dw[8]) | (u64::from(self.dw[9]) << 32)
    }

    pub fn slba(&self) -> u64 {
        u64::from(self.dw[10]) | (u64::from(self.dw[11]) << 32)
    }

    /// Number of Logical Blocks, 1-based.
    pub fn nlb(&self) -> u64 {
        u64::from(self.dw[12] & 0xFFFF) + 1
    }

    pub fn fua(&self) -> bool {
        self.dw[12] & FUA != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnr_follows_the_python_rule() {
        assert_eq!(
            with_dnr(status::LBA_OUT_OF_RANGE),
            status::LBA_OUT_OF_RANGE | DNR
        );
        assert_eq!(
            with_dnr(status::DATA_TRANSFER_ERROR),
            status::DATA_TRANSFER_ERROR
        );
        assert_eq!(
            with_dnr(status::NAMESPACE_NOT_READY),
            status::NAMESPACE_NOT_READY
        );
    }

    #[test]
    fn sqe_fields() {
        let mut raw = [0u8; 64];
        raw[0] = 0x02;
        raw[2..4].copy_from_slice(&0xBEEFu16.to_le_bytes());
        raw[4..8].copy_from_slice(&7u32.to_le_bytes());
        raw[24..32].copy_from_slice(&0x1234_5678_9000u64.to_le_bytes());
        raw[40..48].copy_from_slice(&(u64::MAX - 1).to_le_bytes());
        raw[48..52].copy_from_slice(&(FUA | 0xFFFF).to_le_bytes());
        let sqe = Sqe::from_bytes(&raw);
        assert_eq!(sqe.opcode(), 2);
        assert_eq!(sqe.cid(), 0xBEEF);
        assert_eq!(sqe.nsid(), 7);
        assert_eq!(sqe.prp1(), 0x1234_5678_9000);
        assert_eq!(sqe.slba(), u64::MAX - 1);
        assert_eq!(sqe.nlb(), 0x10000);
        assert!(sqe.fua());
    }
}
