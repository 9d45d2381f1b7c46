//! The fuzz targets' bodies (native/fuzz runs them under libFuzzer; `cargo test` replays
//! their corpus, tests/fuzz_corpus.rs): everything that decodes what a guest wrote.
//!
//! Each takes arbitrary bytes, lays them out as a guest would (queue entries, PRP lists,
//! SGL segments in guest memory, doorbell values) and checks what must hold whatever
//! they say: no panic, and the invariants noted at each target.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use crate::interrupts::VectorRoutes;
use crate::memory::{Fallback, GuestMemory, NoFallback, Region};
use crate::plane::{Completion, Config, Host, Shared};
use crate::prp::prp_segments;
use crate::sgl::sgl_segments;
use crate::spec::{status, Sqe};
use crate::storage::{Namespace, Store};

/// Guest RAM of a fuzz case: 64 KiB at IOVA 0x10000, with a hole past it.
const RAM_BASE: u64 = 0x10000;
const RAM_SIZE: usize = 64 << 10;

struct Ram {
    bytes: Vec<u8>,
    memory: GuestMemory,
}

impl Ram {
    fn new(contents: &[u8]) -> Ram {
        let mut bytes = vec![0u8; RAM_SIZE];
        let n = contents.len().min(RAM_SIZE);
        bytes[..n].copy_from_slice(&contents[..n]);
        let memory = memory_over(RAM_BASE, &mut bytes);
        Ram { bytes, memory }
    }
}

/// Guest memory of one readable and writable region at `iova`: `ram` (for fuzz targets
/// and tests; the caller keeps `ram` alive, and in place, as long as the memory is used).
pub fn memory_over(iova: u64, ram: &mut [u8]) -> GuestMemory {
    let mut memory = GuestMemory::default();
    memory.set(vec![Region {
        iova,
        len: ram.len() as u64,
        host: ram.as_mut_ptr() as usize,
        readable: true,
        writable: true,
    }]);
    memory
}

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    for (i, b) in raw.iter_mut().enumerate() {
        *b = data.get(at + i).copied().unwrap_or(0);
    }
    u64::from_le_bytes(raw)
}

/// An address near the RAM (inside it, at its edges, or anywhere), from 8 bytes.
fn address(raw: u64) -> u64 {
    match raw & 3 {
        0 => RAM_BASE + (raw >> 2) % RAM_SIZE as u64,
        1 => RAM_BASE + ((raw >> 2) % (RAM_SIZE as u64 / 4096)) * 4096,
        2 => RAM_BASE + RAM_SIZE as u64 - ((raw >> 2) % 64),
        _ => raw,
    }
}

/// An SQE: decoding never fails, and its fields are its dwords.
pub fn sqe(data: &[u8]) {
    let mut raw = [0u8; 64];
    let n = data.len().min(64);
    raw[..n].copy_from_slice(&data[..n]);
    let sqe = Sqe::from_bytes(&raw);
    assert_eq!(sqe.opcode(), raw[0]);
    assert_eq!(sqe.cid(), u16::from_le_bytes([raw[2], raw[3]]));
    assert!(sqe.nlb() >= 1 && sqe.nlb() <= 0x10000);
}

/// A PRP pair and list: on success the segments describe exactly `length` bytes, each
/// inside one page after the first, merged where adjacent.
pub fn prp(data: &[u8]) {
    let prp1 = address(u64_at(data, 0));
    let prp2 = address(u64_at(data, 8));
    let length = u64_at(data, 16) % (1 << 21);
    let ram = Ram::new(data.get(24..).unwrap_or(&[]));
    let mut segments = Vec::new();
    if prp_segments(&ram.memory, &NoFallback, prp1, prp2, length, &mut segments).is_ok() {
        assert_eq!(segments.iter().map(|s| s.len).sum::<u64>(), length);
        assert!(segments.iter().all(|s| s.len > 0 && !s.bucket));
    }
    drop(ram.bytes);
}

/// An SGL: on success the segments describe exactly `length` bytes (bit buckets only in
/// a read); a walk never loops, whatever the segments point at.
pub fn sgl(data: &[u8]) {
    let addr = address(u64_at(data, 0));
    let dlen = u64_at(data, 8) as u32;
    let ident = data.get(12).copied().unwrap_or(0);
    let flags = data.get(13).copied().unwrap_or(0);
    let length = u64_at(data, 16) % (1 << 21);
    let to_guest = flags & 1 != 0;
    let ram = Ram::new(data.get(24..).unwrap_or(&[]));
    let mut segments = Vec::new();
    let walked = sgl_segments(
        &ram.memory,
        &NoFallback,
        addr,
        dlen,
        ident,
        length,
        to_guest,
        flags & 2 != 0,
        &mut segments,
    );
    if walked.is_ok() {
        assert_eq!(segments.iter().map(|s| s.len).sum::<u64>(), length);
        assert!(to_guest || segments.iter().all(|s| !s.bucket));
    }
    drop(ram.bytes);
}

/// A host that does nothing: the slow path refuses, memory past the table is unmapped.
pub struct NullHost {
    pub notified: AtomicU32,
}

impl Host for NullHost {
    fn notify(&self) {
        self.notified.fetch_add(1, Ordering::Relaxed);
    }
    fn slow(&self, _sqid: u16, _sqe: &Sqe) -> Result<Completion, String> {
        Ok(Completion {
            status: status::INVALID_OPCODE,
            dw0: 0,
            lba: 0,
        })
    }
    fn fused(
        &self,
        _sqid: u16,
        _first: &Sqe,
        _second: &Sqe,
    ) -> Result<(Completion, Completion), String> {
        let refused = Completion {
            status: status::INVALID_FIELD,
            dw0: 0,
            lba: 0,
        };
        Ok((refused, refused))
    }
    fn fallback(&self) -> &dyn Fallback {
        &NoFallback
    }
}

/// A whole data plane on guest memory the input fills: byte 0 is the SQ tail doorbell
/// and byte 1 a CQ head doorbell (values past the queue included), then sixteen SQ
/// entries (PRPs and SGLs pointing anywhere), then the rest of guest RAM. One null
/// namespace and one tiny read-only one. The plane must answer every command it
/// fetches with exactly one completion, take only doorbell values inside the queue,
/// and never panic.
pub fn plane(data: &[u8]) {
    let routes = Arc::new(VectorRoutes::new(2));
    routes.set_enabled(true);
    let config = Config {
        max_io_queues: 1,
        max_transfer: 128 << 10,
        max_namespaces: 4,
        sgl_support: 1,
        vectors: 2,
        uring: false,
    };
    let host = Box::new(NullHost {
        notified: AtomicU32::new(0),
    });
    let Ok(shared) = Shared::new(config, routes, None, host) else {
        return;
    };
    let entries = 16usize;
    let tail = u32::from(data.first().copied().unwrap_or(0));
    let head = u32::from(data.get(1).copied().unwrap_or(0));
    let body = data.get(2..).unwrap_or(&[]);
    // SQ at page 0 (the input's entries), CQ at page 1, data from page 2 on.
    let mut ram = Ram::new(&[]);
    let n = body.len().min(entries * 64);
    ram.bytes[..n].copy_from_slice(&body[..n]);
    let rest = body.get(n..).unwrap_or(&[]);
    let m = rest.len().min(RAM_SIZE - 2 * 4096);
    ram.bytes[2 * 4096..2 * 4096 + m].copy_from_slice(&rest[..m]);
    let mut st = shared.lock();
    st.memory.set(ram.memory.regions().to_vec());
    st.attach_namespace(Namespace {
        nsid: 1,
        store: Store::Null,
        lba_shift: 9,
        blocks: 1 << 20,
        readonly: false,
        failure: None,
        passthrough: false,
        description: "null".into(),
    });
    st.attach_namespace(Namespace {
        nsid: 2,
        store: Store::Null,
        lba_shift: 12,
        blocks: 8,
        readonly: true,
        failure: None,
        passthrough: false,
        description: "tiny".into(),
    });
    st.create_cq(&shared, 1, RAM_BASE + 4096, entries as u32, 1, true)
        .expect("mapped");
    st.create_sq(&shared, 1, RAM_BASE, entries as u32, 1)
        .expect("mapped");
    drop(st);
    assert_eq!(shared.doorbell(1, false, tail), tail < entries as u32);
    assert_eq!(shared.doorbell(1, true, head), head < entries as u32);
    let mut st = shared.lock();
    let fetched = st.process_pass(&shared);
    st.drain(&shared, true);
    // Each fetched command was completed once (the CQ holds 15 at most).
    let cq = &ram.bytes[4096..4096 + entries * 16];
    let posted = (0..entries).filter(|i| cq[i * 16 + 14] & 1 == 1).count() as u32;
    if !st.halted {
        assert_eq!(posted, fetched.min(entries as u32 - 1));
    }
    drop(st);
    drop(ram.bytes);
}
