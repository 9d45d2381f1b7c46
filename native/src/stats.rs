//! Counters of one controller's I/O queues (statistics.py's shape): per queue, commands
//! and bytes by opcode, errors and a latency histogram; per vector, interrupts; the
//! thread's parking; SMART's I/O counters. One writer (whoever holds the state lock)
//! and lock-free readers: a load and a store, no locked instruction on the hot path.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

/// bucket b counts latencies of [2**(b-1), 2**b) nanoseconds
pub const LATENCY_BUCKETS: usize = 65;

#[inline]
pub fn bump(counter: &AtomicU64, by: u64) {
    counter.store(counter.load(Relaxed).wrapping_add(by), Relaxed);
}

pub struct QueueStats {
    pub commands: [AtomicU64; 256],
    pub bytes: [AtomicU64; 256],
    pub errors: AtomicU64,
    pub latency: [AtomicU64; LATENCY_BUCKETS],
    pub latency_sum_ns: AtomicU64,
}

impl Default for QueueStats {
    fn default() -> Self {
        QueueStats {
            commands: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes: std::array::from_fn(|_| AtomicU64::new(0)),
            errors: AtomicU64::new(0),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            latency_sum_ns: AtomicU64::new(0),
        }
    }
}

impl QueueStats {
    #[inline]
    pub fn record(&self, opcode: u8, nbytes: u64, failed: bool, latency_ns: u64) {
        bump(&self.commands[opcode as usize], 1);
        if nbytes != 0 {
            bump(&self.bytes[opcode as usize], nbytes);
        }
        if failed {
            bump(&self.errors, 1);
        }
        bump(&self.latency[(64 - latency_ns.leading_zeros()) as usize], 1);
        bump(&self.latency_sum_ns, latency_ns);
    }
}

/// SMART / Health's counts of host I/O (nvme/io.py IoCounters).
#[derive(Default)]
pub struct IoCounters {
    pub host_read_commands: AtomicU64,
    pub host_write_commands: AtomicU64,
    pub bytes_read: AtomicU64,
    pub bytes_written: AtomicU64,
    pub media_errors: AtomicU64,
    pub host_errors: AtomicU64,
}

pub struct Stats {
    pub queues: Vec<QueueStats>,
    pub interrupts: Vec<AtomicU64>,
    pub parks: AtomicU64,
    pub parked_ns: AtomicU64,
    /// monotonic ns when the current park began, or 0
    pub parked_since: AtomicU64,
    pub doorbell_traps: AtomicU64,
    /// transfers sent O_DIRECT (past the host's page cache)
    pub direct_transfers: AtomicU64,
    pub counters: IoCounters,
}

impl Stats {
    pub fn new(queues: usize, vectors: usize) -> Stats {
        Stats {
            queues: (0..queues).map(|_| QueueStats::default()).collect(),
            interrupts: (0..vectors).map(|_| AtomicU64::new(0)).collect(),
            parks: AtomicU64::new(0),
            parked_ns: AtomicU64::new(0),
            parked_since: AtomicU64::new(0),
            doorbell_traps: AtomicU64::new(0),
            direct_transfers: AtomicU64::new(0),
            counters: IoCounters::default(),
        }
    }
}
