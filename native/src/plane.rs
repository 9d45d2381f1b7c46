//! The native data plane: one controller's I/O queues, the pass over them, the one place
//! completions are written, and the thread that polls, parks and is woken. It does what
//! dataplane/python.py does, command for command; what it does not do natively (other
//! opcodes, namespaces the Python side serves, data in memory reachable only by
//! messages) it hands to the Python side (`Host::slow`) and completes the same way.
//!
//! Locking: everything a pass touches is in `State`, behind one mutex that the thread
//! holds for a pass and releases between passes. The control side (Python threads, with
//! the GIL released) takes it to change what the host set up. The thread enters Python
//! (the GIL) only with that lock held and only for the slow path, the memory fallback,
//! and `notify`; Python code never calls back into a method that takes the lock.

use std::collections::{HashMap, HashSet, VecDeque};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Instant;

use crate::engine::Engine;
use crate::interrupts::VectorRoutes;
use crate::media_errors::{self, StoreSize};
use crate::memory::{DmaError, Fallback, GuestMemory, View};
use crate::prp::{prp_segments, CmdError, CmdResult, Segment};
use crate::queues::{CompletionQueue, Doorbell, DoorbellPage, Slots, SubmissionQueue};
use crate::rbd::{Finished, Op, RbdEngine};
use crate::sgl::sgl_segments;
use crate::spec::{
    opcode, status, with_dnr, Sqe, BROADCAST_NSID, CDW0_FUSE, CDW0_FUSE_FIRST, CDW0_FUSE_OR_PSDT,
    CDW0_FUSE_SECOND, CDW0_PSDT, DEAC, DNR, PAGE_MASK, PAGE_SIZE,
};
use crate::stats::{bump, Stats};
use crate::storage::{CachedReads, IoFailure, Namespace, Store, IOV_MAX};
use crate::table::IdTable;

/// A command that is done: the completion to post.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Completion {
    /// the Status Field, with DNR as it will be posted
    pub status: u16,
    pub dw0: u32,
    /// for the Error Information log
    pub lba: u64,
}

impl Completion {
    pub const SUCCESS: Completion = Completion {
        status: 0,
        dw0: 0,
        lba: 0,
    };
}

/// The completion a failed command gets (nvme/io.py failed()).
pub fn failed(err: &CmdError) -> Completion {
    let status = match err.dnr {
        None => with_dnr(err.status),
        Some(true) => err.status | DNR,
        Some(false) => err.status,
    };
    Completion {
        status,
        dw0: 0,
        lba: err.lba,
    }
}

/// What executing a command gives.
pub enum Outcome {
    Done(Completion),
    /// its transfer is in the engine: completed when reaped
    Submitted,
    /// for the Python side to run (the slow path)
    Slow,
}

/// What became of the first command of a fused operation.
enum Fused {
    /// not one to pair (FUSE 11b, or an Abort marked it): the usual path takes it
    Usual,
    /// it stays in the SQ: its second has not come, or the CQ lacks room for both
    Wait,
    /// this many entries were taken and completed
    Taken(u32),
}

/// What the data plane tells the control side (dataplane/events.py).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    CommandFailed {
        sqid: u16,
        cid: u16,
        status: u16,
        nsid: u32,
        lba: u64,
    },
    StorageFailed {
        nsid: u32,
        gone: bool,
        read_only: bool,
        reason: String,
    },
    InvalidDoorbell {
        info: u8,
    },
    Fatal {
        reason: String,
    },
}

/// Error Information event info (Base 5.2 Figure 148)
pub const INVALID_DOORBELL_VALUE: u8 = 0x01;

/// What the plane needs from its owner (the Python side, or a test).
pub trait Host: Send + Sync {
    /// Wake the control side: an event was queued, the admin doorbell moved, or (MSI-X
    /// off) the INTx level may have changed.
    fn notify(&self);
    /// Run a command the plane does not run itself; Err: the Python side failed (a bug).
    fn slow(&self, sqid: u16, sqe: &Sqe) -> Result<Completion, String>;
    /// Run a fused operation (its first and second command) as one unit, with nothing
    /// else in flight: the completions of both (nvme/io.py fused()).
    fn fused(
        &self,
        sqid: u16,
        first: &Sqe,
        second: &Sqe,
    ) -> Result<(Completion, Completion), String>;
    /// Guest memory that the table cannot reach in place.
    fn fallback(&self) -> &dyn Fallback;
}

/// What the controller offers (ControllerConfig).
#[derive(Clone, Debug)]
pub struct Config {
    pub max_io_queues: u16,
    pub max_transfer: u64,
    pub max_namespaces: u32,
    /// SGLS bits 1:0: 0 none, 1 byte granularity, 2 dword granularity
    pub sgl_support: u8,
    pub vectors: usize,
    pub uring: bool,
}

/// What the host's features say (IoSettings).
#[derive(Clone, Debug)]
pub struct Settings {
    pub arbitration_burst: u32,
    pub coalescing_threshold: u32,
    pub coalescing_time: u32,
    pub coalescing_disabled: Vec<bool>,
    pub write_cache: bool,
}

/// A command whose transfer is in the engine.
#[derive(Clone, Copy, Default)]
pub struct Inflight {
    pub sqid: u16,
    pub sqe: Sqe,
    pub seen: u64,
}

/// Everything a pass touches.
pub struct State {
    pub config: Config,
    pub settings: Settings,
    pub memory: GuestMemory,
    /// by QID (0 unused: the admin queue is the control side's)
    sqs: IdTable<SubmissionQueue>,
    cqs: IdTable<CompletionQueue>,
    /// SQ ids in arbitration order
    active: Vec<u16>,
    shadow_pages: Option<(u64, u64)>,
    page: Option<DoorbellPage>,
    /// where the queues stand and what is in flight, for a successor after a crash
    pub journal: Option<crate::journal::Journal>,
    /// queues are being restored from a predecessor process: their doorbells hold the
    /// guest's latest values, which attaching must not overwrite
    pub keep_doorbells: bool,
    admin_words: (u32, u32),
    aborts: HashSet<(u16, u16)>,
    /// by NSID, 1..=max_namespaces
    namespaces: IdTable<Namespace>,
    /// attach order (a broadcast Flush goes through them in it, as Python's dict)
    order: Vec<u32>,
    pub engine: Engine<Inflight>,
    /// operations on RBD images, in librbd
    pub rbd: RbdEngine,
    /// vector -> (completions held, deadline ns)
    coalesced: HashMap<u16, (u32, u64)>,
    touched: Vec<u16>,
    pub enabled: bool,
    pub halted: bool,
    segments: Vec<Segment>,
    iov: Vec<libc::iovec>,
    discard: Vec<u8>,
    reaped: Vec<u32>,
}

// SAFETY: the raw pointers inside (iovecs, cached queue addresses) are into guest memory
// and the doorbell page, valid as memory.rs and queues.rs explain; State moves between
// threads only under its mutex.
unsafe impl Send for State {}

pub struct Control {
    pub pause_requests: u32,
    pub paused: bool,
    pub running: bool,
    pub thread_alive: bool,
}

pub struct Shared {
    pub state: Mutex<State>,
    pub stats: Stats,
    pub routes: Arc<VectorRoutes>,
    /// per doorbell (2 * QID + is CQ): the size of the queue there, 0 for none
    pub sizes: Vec<AtomicU32>,
    /// per SQ doorbell: a trapped tail not yet taken, + 1 (0: none)
    pub trapped: Vec<AtomicU32>,
    /// the thread parks on it; doorbells and control requests write it
    pub wake_fd: OwnedFd,
    /// where librbd's threads leave the RBD operations that ended (State::rbd's)
    pub rbd_finished: Arc<Finished>,
    pub events: Mutex<VecDeque<Event>>,
    pub control: Mutex<Control>,
    pub control_cond: Condvar,
    /// control-side callers waiting for the state lock: the polling thread yields
    pub waiters: AtomicU32,
    /// a pause or a stop is asked for: the thread looks at `control`
    pub attention: AtomicBool,
    pub poll_limit_ns: AtomicU64,
    pub started_ns: AtomicU64,
    pub tid: AtomicU32,
    /// the mapped doorbell page, if any (a trapped write to it is stored there too)
    pub page: Option<DoorbellPage>,
    pub host: Box<dyn Host>,
}

/// The poll window (engine/poller.py AdaptivePoll, with the same constants).
pub const POLL_WINDOW_START_NS: u64 = 64_000;
pub const POLL_GROW_LIMIT_NS: u64 = 1_000_000;
/// longest wait for an in-flight transfer before looking at the queues again
const IN_FLIGHT_WAIT_NS: u64 = 200_000;
const MAX_EVENTS: usize = 65_536;
const DISCARD_SIZE: usize = 64 << 10;

pub fn now_ns() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

impl Shared {
    pub fn new(
        config: Config,
        routes: Arc<VectorRoutes>,
        page: Option<DoorbellPage>,
        host: Box<dyn Host>,
    ) -> std::io::Result<Shared> {
        let doorbells = 2 * (usize::from(config.max_io_queues) + 1);
        let engine = Engine::new(config.uring, 256)?;
        // SAFETY: creating an eventfd; checked below.
        let wake_fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if wake_fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh eventfd that nothing else owns; closed when the Shared drops.
        let wake_fd = unsafe { OwnedFd::from_raw_fd(wake_fd) };
        let rbd_finished = Finished::new(wake_fd.try_clone()?);
        let rbd = RbdEngine::new(rbd_finished.clone());
        let vectors = config.vectors;
        let queues = usize::from(config.max_io_queues) + 1;
        let config_namespaces = config.max_namespaces as usize;
        let state = State {
            settings: Settings {
                arbitration_burst: 32,
                coalescing_threshold: 0,
                coalescing_time: 0,
                coalescing_disabled: vec![false; vectors],
                write_cache: true,
            },
            config,
            memory: GuestMemory::default(),
            sqs: IdTable::new(queues),
            cqs: IdTable::new(queues),
            active: Vec::new(),
            shadow_pages: None,
            page,
            journal: None,
            keep_doorbells: false,
            admin_words: (0, 0),
            aborts: HashSet::new(),
            namespaces: IdTable::new(config_namespaces + 1),
            order: Vec::new(),
            engine,
            rbd,
            coalesced: HashMap::new(),
            touched: Vec::new(),
            enabled: false,
            halted: false,
            segments: Vec::new(),
            iov: Vec::new(),
            discard: vec![0; DISCARD_SIZE],
            reaped: Vec::new(),
        };
        Ok(Shared {
            state: Mutex::new(state),
            stats: Stats::new(queues, vectors),
            routes,
            sizes: (0..doorbells).map(|_| AtomicU32::new(0)).collect(),
            trapped: (0..doorbells).map(|_| AtomicU32::new(0)).collect(),
            wake_fd,
            rbd_finished,
            events: Mutex::new(VecDeque::new()),
            control: Mutex::new(Control {
                pause_requests: 0,
                paused: false,
                running: false,
                thread_alive: false,
            }),
            control_cond: Condvar::new(),
            waiters: AtomicU32::new(0),
            attention: AtomicBool::new(true),
            poll_limit_ns: AtomicU64::new(500_000_000),
            started_ns: AtomicU64::new(0),
            tid: AtomicU32::new(0),
            page,
            host,
        })
    }

    /// The state, for a control-side caller (the polling thread yields to it).
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.waiters.fetch_add(1, Ordering::SeqCst);
        let guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, Ordering::SeqCst);
        guard
    }

    pub fn wake(&self) {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes we own to our own eventfd.
        let _ = unsafe { libc::write(self.wake_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    fn clear_wake(&self) {
        let mut value: u64 = 0;
        // SAFETY: reads 8 bytes into a u64 we own from our own (non-blocking) eventfd.
        let _ = unsafe { libc::read(self.wake_fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) };
    }

    /// Wait until the eventfd is written, `timeout_ns` at most (None: for good), and
    /// take what was written: the caller looks at everything it could have meant.
    fn wait_woken(&self, timeout_ns: Option<u64>) {
        let mut pfd = libc::pollfd {
            fd: self.wake_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ts = timeout_ns.map(|ns| libc::timespec {
            tv_sec: (ns / 1_000_000_000) as libc::time_t,
            tv_nsec: (ns % 1_000_000_000) as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // SAFETY: one pollfd and an optional timespec that we own.
        let _ = unsafe { libc::ppoll(&mut pfd, 1, ts_ptr, std::ptr::null()) };
        self.clear_wake();
    }

    /// Sleep until the eventfd is written.
    fn sleep(&self) {
        let mut pfd = libc::pollfd {
            fd: self.wake_fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own.
        let _ = unsafe { libc::poll(&mut pfd, 1, -1) };
    }

    pub fn emit(&self, event: Event) {
        let first = {
            let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
            if events.len() >= MAX_EVENTS {
                return; // a guest failing commands faster than the log is read loses entries
            }
            events.push_back(event);
            events.len() == 1
        };
        if first {
            self.host.notify();
        }
    }

    pub fn take_events(&self) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect()
    }

    pub fn fb(&self) -> &dyn Fallback {
        self.host.fallback()
    }

    /// A pause request: the thread holds between passes with nothing in flight.
    pub fn pause(&self) {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        c.pause_requests += 1;
        self.attention.store(true, Ordering::SeqCst);
        if !c.thread_alive {
            drop(c);
            let mut st = self.lock();
            st.drain(self, true);
            return;
        }
        self.wake();
        while !c.paused && c.thread_alive {
            c = self.control_cond.wait(c).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn resume(&self) {
        let mut c = self.control.lock().unwrap_or_else(|e| e.into_inner());
        c.pause_requests = c.pause_requests.saturating_sub(1);
        self.control_cond.notify_all();
    }

    fn pause_requested(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pause_requests
            > 0
    }

    fn running(&self) -> bool {
        self.control
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .running
    }

    /// A trapped doorbell write to I/O queue `qid` (validated by the caller against
    /// `sizes`): SQ tails are taken at the next pass; CQ heads now.
    pub fn doorbell(&self, qid: u16, is_cq: bool, value: u32) -> bool {
        let index = 2 * usize::from(qid) + usize::from(is_cq);
        let Some(size) = self.sizes.get(index).map(|s| s.load(Ordering::Acquire)) else {
            return false;
        };
        if size == 0 || value >= size {
            return false;
        }
        self.stats.doorbell_traps.fetch_add(1, Ordering::Relaxed);
        if let Some(page) = self.page {
            // A client that did not map the page (or mapped it and also traps): the
            // register still holds what the guest wrote, where the poller looks.
            page.store(index, value);
        }
        if !is_cq {
            self.trapped[index].store(value + 1, Ordering::SeqCst);
            self.wake();
            return true;
        }
        let mut st = self.lock();
        st.cq_doorbell(self, qid, value);
        drop(st);
        self.wake();
        true
    }
}

impl State {
    // --- queues (the control side, state lock held) -------------------------------------

    pub fn create_cq(
        &mut self,
        sh: &Shared,
        qid: u16,
        base: u64,
        size: u32,
        vector: u16,
        ien: bool,
    ) -> Result<(), DmaError> {
        let slots = Slots::new(&self.memory, sh.fb(), base, u64::from(size) * 16)?;
        let mut cq = CompletionQueue {
            qid,
            size,
            head: 0,
            tail: 0,
            phase: 1,
            vector,
            interrupts_enabled: ien,
            doorbell: Doorbell::Trapped,
            slots,
            reserved: 0,
            unsignalled: 0,
        };
        cq.doorbell = self.attach_doorbell(sh, qid, true, 0)?;
        self.cqs.insert(u32::from(qid), cq);
        sh.sizes[2 * usize::from(qid) + 1].store(size, Ordering::Release);
        Ok(())
    }

    pub fn create_sq(
        &mut self,
        sh: &Shared,
        qid: u16,
        base: u64,
        size: u32,
        cqid: u16,
    ) -> Result<(), DmaError> {
        let slots = Slots::new(&self.memory, sh.fb(), base, u64::from(size) * 64)?;
        let doorbell = self.attach_doorbell(sh, qid, false, 0)?;
        self.sqs.insert(
            u32::from(qid),
            SubmissionQueue {
                qid,
                size,
                cqid,
                head: 0,
                tail: 0,
                doorbell,
                slots,
                fused_wait: None,
            },
        );
        self.active = sorted_keys(&self.sqs);
        sh.trapped[2 * usize::from(qid)].store(0, Ordering::SeqCst);
        sh.sizes[2 * usize::from(qid)].store(size, Ordering::Release);
        Ok(())
    }

    pub fn delete_sq(&mut self, sh: &Shared, qid: u16) {
        self.drain(sh, true);
        self.sqs.remove(u32::from(qid));
        self.active = sorted_keys(&self.sqs);
        self.aborts.retain(|(s, _)| *s != qid);
        sh.sizes[2 * usize::from(qid)].store(0, Ordering::Release);
        sh.trapped[2 * usize::from(qid)].store(0, Ordering::SeqCst);
    }

    pub fn delete_cq(&mut self, sh: &Shared, qid: u16) {
        self.cqs.remove(u32::from(qid));
        sh.sizes[2 * usize::from(qid) + 1].store(0, Ordering::Release);
    }

    /// A queue's doorbell: its word of the mapped page (reset to 0), or its shadow
    /// slots seeded with its current index, or trapped writes only.
    fn attach_doorbell(
        &mut self,
        sh: &Shared,
        qid: u16,
        is_cq: bool,
        index_now: u32,
    ) -> Result<Doorbell, DmaError> {
        let index = 2 * usize::from(qid) + usize::from(is_cq);
        if let Some(page) = self.page {
            if !self.keep_doorbells {
                page.store(index, 0); // a new queue's doorbell starts at 0, whatever was there
            }
            return Ok(Doorbell::Mapped { index });
        }
        let Some((shadow_page, eventidx_page)) = self.shadow_pages else {
            return Ok(Doorbell::Trapped);
        };
        let shadow = shadow_page + 4 * index as u64;
        let eventidx = eventidx_page + 4 * index as u64;
        let fb = sh.fb();
        // Python checks both slots exist (ShadowDoorbell builds views of them).
        self.memory.view(shadow, 4, true, fb)?;
        self.memory.view(eventidx, 4, true, fb)?;
        if self.keep_doorbells {
            return Ok(Doorbell::Shadow { shadow, eventidx });
        }
        self.memory.store_u32(shadow, index_now, fb)?;
        let event = if is_cq && sh.routes.enabled() {
            // With MSI-X the guest's CQ head matters only when a CQ is full, and then we
            // poll it; INTx ends only on a BAR access, so then every update must ring.
            index_now.wrapping_sub(1)
        } else {
            index_now
        };
        self.memory.store_u32(eventidx, event & 0xFFFF, fb)?;
        Ok(Doorbell::Shadow { shadow, eventidx })
    }

    pub fn set_doorbell_buffers(
        &mut self,
        sh: &Shared,
        shadow_page: u64,
        eventidx_page: u64,
    ) -> Result<(), DmaError> {
        self.shadow_pages = Some((shadow_page, eventidx_page));
        let mut sqs: Vec<(u16, u32)> = self.sqs.values().map(|q| (q.qid, q.tail)).collect();
        sqs.sort();
        for (qid, tail) in sqs {
            let db = self.attach_doorbell(sh, qid, false, tail)?;
            self.sqs.get_mut(u32::from(qid)).expect("listed").doorbell = db;
        }
        let mut cqs: Vec<(u16, u32)> = self.cqs.values().map(|q| (q.qid, q.head)).collect();
        cqs.sort();
        for (qid, head) in cqs {
            let db = self.attach_doorbell(sh, qid, true, head)?;
            self.cqs.get_mut(u32::from(qid)).expect("listed").doorbell = db;
        }
        Ok(())
    }

    fn cq_doorbell(&mut self, sh: &Shared, qid: u16, value: u32) {
        let msix = sh.routes.enabled();
        let fb = sh.fb();
        let Some(cq) = self.cqs.get_mut(u32::from(qid)) else {
            return;
        };
        match cq.doorbell {
            Doorbell::Trapped => {
                if !cq.set_head(value) {
                    sh.emit(Event::InvalidDoorbell {
                        info: INVALID_DOORBELL_VALUE,
                    });
                }
            }
            Doorbell::Shadow { eventidx, .. } => {
                // The guest stored this value in the shadow before ringing, and may have
                // stored newer ones since: the shadow is the truth.
                if !msix {
                    let _ = cq.refresh_head(&self.memory, fb, None);
                    // QEMU ends an INTx only on a BAR access: have the guest ring every time.
                    let _ = self.memory.store_u32(eventidx, cq.head & 0xFFFF, fb);
                }
            }
            Doorbell::Mapped { .. } => {
                if !msix {
                    let _ = cq.refresh_head(&self.memory, fb, self.page);
                }
            }
        }
    }

    pub fn abort(&mut self, sh: &Shared, sqid: u16, cid: u16) -> bool {
        let fb = sh.fb();
        let page = self.page;
        let Some(sq) = self.sqs.get_mut(u32::from(sqid)) else {
            return false;
        };
        if let Some(v) = take_trapped(sh, sqid) {
            sq.take_rung_tail(v);
        }
        let _ = sq.refresh_tail(&self.memory, fb, page);
        let pending = (sq.tail + sq.size - sq.head) % sq.size;
        for i in 0..pending {
            let slot = (sq.head + i) % sq.size;
            let mut raw = [0u8; 2];
            if self
                .memory
                .read(sq.slots.base + u64::from(slot) * 64 + 2, &mut raw, fb)
                .is_ok()
                && u16::from_le_bytes(raw) == cid
            {
                self.aborts.insert((sqid, cid));
                return true;
            }
        }
        false
    }

    pub fn marked_aborts(&self) -> usize {
        self.aborts.len()
    }

    /// Controller Level Reset: transfers in flight complete unposted, everything goes.
    pub fn reset(&mut self, sh: &Shared) {
        self.drain(sh, false);
        for qid in self.sqs.ids() {
            sh.sizes[2 * qid as usize].store(0, Ordering::Release);
            sh.trapped[2 * qid as usize].store(0, Ordering::SeqCst);
        }
        for qid in self.cqs.ids() {
            sh.sizes[2 * qid as usize + 1].store(0, Ordering::Release);
        }
        self.sqs.clear();
        self.cqs.clear();
        self.active.clear();
        self.shadow_pages = None;
        self.aborts.clear();
        self.coalesced.clear();
        self.touched.clear();
        self.enabled = false;
        self.halted = false;
        if let Some(page) = self.page {
            for i in 0..page.words {
                page.store(i, 0);
            }
        }
        self.admin_words = (0, 0);
    }

    pub fn pending_interrupt(&self) -> bool {
        self.cqs
            .values()
            .any(|cq| cq.interrupts_enabled && cq.head != cq.tail)
    }

    /// (qid, is_cq, head, tail, phase) of every queue, for a successor process to go on
    /// from: an SQ's tail includes a trapped doorbell value the thread has not taken.
    pub fn positions(&self, sh: &Shared) -> Vec<(u16, bool, u32, u32, u32)> {
        let mut out: Vec<(u16, bool, u32, u32, u32)> = self
            .sqs
            .values()
            .map(|q| {
                let trapped = sh.trapped[2 * usize::from(q.qid)].load(Ordering::SeqCst);
                let tail = if trapped == 0 { q.tail } else { trapped - 1 };
                (q.qid, false, q.head, tail, 0)
            })
            .collect();
        out.extend(
            self.cqs
                .values()
                .map(|q| (q.qid, true, q.head, q.tail, q.phase)),
        );
        out.sort();
        out
    }

    /// Put a restored queue where its predecessor left it; false if there is no such
    /// queue or a position is out of range.
    pub fn restore_position(
        &mut self,
        qid: u16,
        is_cq: bool,
        head: u32,
        tail: u32,
        phase: u32,
    ) -> bool {
        if is_cq {
            match self.cqs.get_mut(u32::from(qid)) {
                Some(cq) if head < cq.size && tail < cq.size && phase <= 1 => {
                    (cq.head, cq.tail, cq.phase) = (head, tail, phase);
                    true
                }
                _ => false,
            }
        } else {
            match self.sqs.get_mut(u32::from(qid)) {
                Some(sq) if head < sq.size && tail < sq.size => {
                    (sq.head, sq.tail) = (head, tail);
                    true
                }
                _ => false,
            }
        }
    }

    pub fn queues(&self) -> Vec<(u16, bool, u32, u32, u32)> {
        let mut out: Vec<(u16, bool, u32, u32, u32)> = self
            .sqs
            .values()
            .map(|q| (q.qid, false, q.size, q.head, q.tail))
            .collect();
        out.sort();
        let mut cqs: Vec<(u16, bool, u32, u32, u32)> = self
            .cqs
            .values()
            .map(|q| (q.qid, true, q.size, q.head, q.tail))
            .collect();
        cqs.sort();
        out.extend(cqs);
        out
    }

    // --- namespaces --------------------------------------------------------------------

    pub fn attach_namespace(&mut self, ns: Namespace) {
        let nsid = ns.nsid;
        if self.namespaces.insert(nsid, ns).is_none() && !self.order.contains(&nsid) {
            self.order.push(nsid);
        }
    }

    pub fn detach_namespace(&mut self, nsid: u32) {
        self.namespaces.remove(nsid);
        self.order.retain(|n| *n != nsid);
    }

    pub fn update_namespace(
        &mut self,
        nsid: u32,
        blocks: u64,
        readonly: bool,
        failure: Option<String>,
    ) {
        if let Some(ns) = self.namespaces.get_mut(nsid) {
            ns.blocks = blocks;
            ns.readonly = readonly;
            ns.failure = failure;
        }
    }

    // --- the pass (the thread, or process()) ---------------------------------------------

    /// One round-robin pass over the I/O submission queues, at most the Arbitration
    /// Burst of commands from each (Base 3.4.4); returns commands fetched.
    pub fn process_pass(&mut self, sh: &Shared) -> u32 {
        if self.halted {
            return 0;
        }
        match self.pass(sh) {
            Ok(n) => {
                self.signal_touched(sh);
                if !self.coalesced.is_empty() {
                    self.flush_coalesced(sh, false);
                }
                n
            }
            Err(e) => {
                self.signal_touched(sh);
                self.fatal(sh, format!("I/O queue memory: {}", e.0));
                0
            }
        }
    }

    fn pass(&mut self, sh: &Shared) -> Result<u32, DmaError> {
        let fb = sh.fb();
        let burst = self.settings.arbitration_burst;
        let mut done = 0u32;
        for turn in 0..self.active.len() {
            let qid = self.active[turn];
            let page = self.page;
            let (cqid, seen) = {
                let sq = self.sqs.get_mut(u32::from(qid)).expect("active");
                if let Some(v) = take_trapped(sh, qid) {
                    sq.take_rung_tail(v);
                }
                sq.refresh_tail(&self.memory, fb, page)?;
                if sq.head == sq.tail {
                    continue;
                }
                (sq.cqid, now_ns())
            };
            let mut n = 0;
            loop {
                let sq = self.sqs.get_mut(u32::from(qid)).expect("active");
                if n >= burst || sq.head == sq.tail {
                    break;
                }
                let Some(cq) = self.cqs.get_mut(u32::from(cqid)) else {
                    break;
                };
                if cq.is_full(&self.memory, fb, page)? {
                    break;
                }
                let slot = sq.head;
                let sqe = sq.fetch(&self.memory, fb)?;
                if sqe.dw[0] & CDW0_FUSE_FIRST != 0 {
                    // FUSE 01b (or 11b, reserved: the usual path refuses it)
                    match self.fused_operation(sh, qid, cqid, slot, &sqe, seen)? {
                        Fused::Usual => {}
                        Fused::Wait => break,
                        Fused::Taken(k) => {
                            n += k;
                            if self.halted {
                                return Ok(done + n);
                            }
                            continue;
                        }
                    }
                }
                if let Some(journal) = self.journal {
                    let head = self.sqs.get(u32::from(qid)).expect("active").head;
                    journal.fetched(qid, head, sqe.cid());
                }
                n += 1;
                if !self.aborts.is_empty() && self.aborts.remove(&(qid, sqe.cid())) {
                    let c = Completion {
                        status: with_dnr(status::ABORT_REQUESTED),
                        dw0: 0,
                        lba: 0,
                    };
                    self.complete(sh, qid, &sqe, c, seen)?;
                    continue;
                }
                match self.execute(sh, qid, &sqe, seen) {
                    Outcome::Done(c) => self.complete(sh, qid, &sqe, c, seen)?,
                    Outcome::Submitted => {
                        self.cqs.get_mut(u32::from(cqid)).expect("checked").reserved += 1
                    }
                    Outcome::Slow => match sh.host.slow(qid, &sqe) {
                        Ok(c) => self.complete(sh, qid, &sqe, c, seen)?,
                        Err(reason) => {
                            self.fatal(sh, format!("I/O processing failed: {reason}"));
                            return Ok(done + n);
                        }
                    },
                }
            }
            if n > 0 {
                done += n;
                // Keep the guest from ringing while we poll.
                self.sqs
                    .get(u32::from(qid))
                    .expect("active")
                    .suppress_notification(&self.memory, fb)?;
            }
        }
        if self.engine.in_flight > 0 {
            self.engine.submit(); // the whole pass in one system call
            self.finish_reaped(sh, true)?;
        }
        if self.rbd.in_flight > 0 {
            self.finish_rbd(sh, true)?;
        }
        Ok(done)
    }

    fn fatal(&mut self, sh: &Shared, reason: String) {
        self.halted = true;
        sh.emit(Event::Fatal { reason });
    }

    /// The entry just fetched from `slot` of SQ `qid` is the first of a fused operation
    /// (FUSE 01b, or 11b): run it with its second as one unit (dataplane/python.py
    /// _fused_operation). The first stays in the SQ, unfetched, until its second
    /// arrives (a guest may ring between the two) and the CQ has room for both.
    fn fused_operation(
        &mut self,
        sh: &Shared,
        qid: u16,
        cqid: u16,
        slot: u32,
        first: &Sqe,
        seen: u64,
    ) -> Result<Fused, DmaError> {
        let fb = sh.fb();
        let page = self.page;
        let aborted = |aborts: &HashSet<(u16, u16)>, sqe: &Sqe| {
            !aborts.is_empty() && aborts.contains(&(qid, sqe.cid()))
        };
        let sq = self.sqs.get_mut(u32::from(qid)).expect("active");
        sq.fused_wait = None;
        if first.dw[0] & CDW0_FUSE != CDW0_FUSE_FIRST
            || first.opcode() != opcode::COMPARE // (no such operation: refused at once)
            || aborted(&self.aborts, first)
        {
            return Ok(Fused::Usual);
        }
        if sq.head == sq.tail {
            sq.head = slot; // nothing after it yet: put it back
            sq.fused_wait = Some(sq.tail);
            return Ok(Fused::Wait);
        }
        let second = sq.peek(&self.memory, fb, sq.head)?;
        if second.dw[0] & CDW0_FUSE != CDW0_FUSE_SECOND || aborted(&self.aborts, &second) {
            if let Some(journal) = self.journal {
                journal.fetched(qid, sq.head, first.cid());
            }
            let missing = failed(&CmdError::new(
                status::ABORT_FUSE_MISSING,
                "the second command of its fused operation is missing",
            ));
            self.complete(sh, qid, first, missing, seen)?;
            return Ok(Fused::Taken(1)); // the next entry goes the usual way
        }
        let cq = self.cqs.get_mut(u32::from(cqid)).expect("checked");
        cq.reserved += 1; // (is_full asks for room for one beside the reserved)
        let full = cq.is_full(&self.memory, fb, page);
        cq.reserved -= 1;
        let sq = self.sqs.get_mut(u32::from(qid)).expect("active");
        if full? {
            sq.head = slot;
            return Ok(Fused::Wait);
        }
        sq.head = sq.next(sq.head);
        if let Some(journal) = self.journal {
            journal.fetched(qid, sq.next(slot), first.cid());
            journal.fetched(qid, sq.head, second.cid());
        }
        // Atomic against every other command of this controller: nothing in flight, and
        // nothing else submitted until both are done (this thread runs them).
        self.drain(sh, true);
        if self.halted {
            return Ok(Fused::Taken(2));
        }
        match sh.host.fused(qid, first, &second) {
            Ok((compared, written)) => {
                self.complete(sh, qid, first, compared, seen)?;
                self.complete(sh, qid, &second, written, seen)?;
            }
            Err(reason) => self.fatal(sh, format!("I/O processing failed: {reason}")),
        }
        Ok(Fused::Taken(2))
    }

    /// The one place an I/O completion is written: the CQE, the statistics, the error
    /// log's event; the CQ's interrupt goes out at the end of the pass.
    fn complete(
        &mut self,
        sh: &Shared,
        sqid: u16,
        sqe: &Sqe,
        c: Completion,
        seen: u64,
    ) -> Result<(), DmaError> {
        let fb = sh.fb();
        let Some(sq) = self.sqs.get(u32::from(sqid)) else {
            return Ok(());
        };
        let (head, cqid) = (sq.head, sq.cqid);
        let Some(cq) = self.cqs.get_mut(u32::from(cqid)) else {
            return Ok(());
        };
        cq.post(&self.memory, fb, c.dw0, head, sqid, sqe.cid(), c.status)?;
        if let Some(journal) = self.journal {
            journal.posted(sqid, sqe.cid(), cqid, cq.tail, cq.phase);
        }
        cq.unsignalled += 1;
        if cq.unsignalled == 1 {
            self.touched.push(cqid);
        }
        let op = sqe.opcode();
        let mut nbytes = 0;
        if c.status != 0 {
            sh.emit(Event::CommandFailed {
                sqid,
                cid: sqe.cid(),
                status: c.status,
                nsid: sqe.nsid(),
                lba: c.lba,
            });
        } else if matches!(op, opcode::READ | opcode::WRITE | opcode::COMPARE) {
            if let Some(ns) = self.namespaces.get(sqe.nsid()) {
                nbytes = sqe.nlb() << ns.lba_shift;
            }
        }
        if let Some(q) = sh.stats.queues.get(usize::from(sqid)) {
            q.record(op, nbytes, c.status != 0, now_ns().saturating_sub(seen));
        }
        Ok(())
    }

    /// Complete the commands whose transfers the engine hands back.
    fn finish_reaped(&mut self, sh: &Shared, post: bool) -> Result<(), DmaError> {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        self.engine.reap(&mut reaped);
        let mut unreachable = None;
        for &index in &reaped {
            let slot = &self.engine.slots[index as usize];
            let ctx = slot.ctx;
            let c = self.finish(sh, index);
            self.engine.release(index);
            if let Err(e) = self.retire(sh, &ctx, c, post) {
                unreachable = Some(e); // the CQ's memory: fatal, once all are released
            }
        }
        self.reaped = reaped;
        unreachable.map_or(Ok(()), Err)
    }

    /// A command whose transfer the engine or librbd ended: its CQ slot is no longer
    /// held for it, and (`post`) its completion is written.
    fn retire(
        &mut self,
        sh: &Shared,
        ctx: &Inflight,
        c: Completion,
        post: bool,
    ) -> Result<(), DmaError> {
        if let Some(cq) = self
            .sqs
            .get(u32::from(ctx.sqid))
            .and_then(|sq| self.cqs.get_mut(u32::from(sq.cqid)))
        {
            cq.reserved -= 1;
        }
        if post {
            self.complete(sh, ctx.sqid, &ctx.sqe, c, ctx.seen)?;
        }
        Ok(())
    }

    /// Complete the commands whose librbd operations ended; a write with FUA whose
    /// write ended well goes on to its flush first.
    fn finish_rbd(&mut self, sh: &Shared, post: bool) -> Result<(), DmaError> {
        let mut reaped = std::mem::take(&mut self.reaped);
        reaped.clear();
        self.rbd.reap(&mut reaped);
        let mut unreachable = None;
        for &index in &reaped {
            let slot = &self.rbd.slots[index as usize];
            let ctx = slot.ctx;
            let c = match self.rbd_outcome(sh, index) {
                Some(c) => c,
                None => continue, // its flush is in flight now
            };
            self.rbd.release(index);
            if let Err(e) = self.retire(sh, &ctx, c, post) {
                unreachable = Some(e);
            }
        }
        self.reaped = reaped;
        unreachable.map_or(Ok(()), Err)
    }

    /// What a librbd operation that ended completes its command with; None when a FUA
    /// write goes on to its flush.
    fn rbd_outcome(&mut self, sh: &Shared, index: u32) -> Option<Completion> {
        let slot = &self.rbd.slots[index as usize];
        let (result, op, offset, length, fua, flushing, nsid) = (
            slot.result,
            slot.op,
            slot.offset,
            slot.length,
            slot.fua,
            slot.flushing,
            slot.ctx.sqe.nsid(),
        );
        let failure = if result < 0 {
            let errno = (-result) as i32;
            // A read or write across the image's end (it shrank on the cluster): librbd
            // refuses it (EINVAL); a read that meets the end is short.
            let past_end = errno == libc::EINVAL
                && !flushing
                && op != Op::Flush
                && slot
                    .store
                    .as_ref()
                    .and_then(|s| s.size().ok())
                    .is_some_and(|size| offset + length > size);
            Some(IoFailure {
                errno: if past_end { libc::EIO } else { errno },
                past_end,
            })
        } else if op == Op::Read && (result as u64) < length {
            Some(IoFailure {
                errno: libc::EIO,
                past_end: true,
            })
        } else {
            None
        };
        let writing = op != Op::Read;
        if let Some(e) = failure {
            return Some(self.storage_failure(sh, nsid, e, writing, offset));
        }
        if fua && !flushing {
            return match self.rbd.follow_with_flush(index) {
                Ok(()) => None,
                Err(errno) => Some(self.storage_failure(sh, nsid, refused(errno), true, offset)),
            };
        }
        match op {
            Op::Read | Op::Write => count_transfer(sh, op == Op::Write, length),
            Op::WriteZeroes | Op::Flush => {}
        }
        Some(Completion::SUCCESS)
    }

    /// The completion of a transfer the engine ran (nvme/io.py finish()): a short one
    /// is finished here, errors become NVMe statuses, the SMART counters count it.
    fn finish(&mut self, sh: &Shared, index: u32) -> Completion {
        let slot = &self.engine.slots[index as usize];
        let (res, length, write, fua, offset, nsid) = (
            slot.result,
            slot.length,
            slot.write,
            slot.fua,
            slot.offset,
            slot.ctx.sqe.nsid(),
        );
        let outcome = if res < 0 {
            Err(IoFailure {
                errno: -res,
                past_end: false,
            })
        } else if (res as u64) < length {
            let rest = skip_iov(&slot.iov, res as usize);
            slot.store
                .as_ref()
                .expect("submitted")
                .transfer(offset + res as u64, &rest, write, fua)
        } else {
            Ok(())
        };
        match outcome {
            Ok(()) => {
                count_transfer(sh, write, length);
                Completion::SUCCESS
            }
            Err(e) => self.storage_failure(sh, nsid, e, write, offset),
        }
    }

    /// The completion of a command whose storage access failed: the namespace's error
    /// table, or (the namespace went meanwhile) a plain read or write error.
    fn storage_failure(
        &mut self,
        sh: &Shared,
        nsid: u32,
        e: IoFailure,
        writing: bool,
        offset: u64,
    ) -> Completion {
        let error = match self.namespaces.get_mut(nsid) {
            Some(ns) => {
                let error = host_error(sh, ns, e, writing, offset);
                // Gone (Namespace Not Ready, DNR: media_errors::GONE): its next commands
                // fail at once, before the control side has applied the event.
                if error.status == status::NAMESPACE_NOT_READY && error.dnr == Some(true) {
                    ns.failure.get_or_insert_with(|| error.message.clone());
                }
                error
            }
            None => {
                let st = if writing {
                    status::WRITE_FAULT
                } else {
                    status::UNRECOVERED_READ_ERROR
                };
                CmdError::new(st, "storage error")
            }
        };
        failed(&error)
    }

    /// Wait for every transfer in flight and complete its command.
    pub fn drain(&mut self, sh: &Shared, post: bool) {
        let post = post && !self.halted;
        self.engine.submit();
        while self.engine.in_flight > 0 {
            if self.engine.outstanding() == 0 {
                break; // nothing left in the kernel (never wait for what cannot come)
            }
            self.engine.wait(None);
            if let Err(e) = self.finish_reaped(sh, post) {
                self.fatal(sh, format!("I/O queue memory: {}", e.0));
            }
        }
        // librbd ends every operation, in time: an unreachable cluster fails it after
        // the connection's operation timeout (backends/rbd.py OP_TIMEOUT_S).
        while self.rbd.in_flight > 0 {
            sh.rbd_finished
                .sleep_unless_finished(|| sh.wait_woken(None));
            if let Err(e) = self.finish_rbd(sh, post) {
                self.fatal(sh, format!("I/O queue memory: {}", e.0));
            }
        }
        self.signal_touched(sh);
    }

    // --- the commands it runs itself ------------------------------------------------------

    fn execute(&mut self, sh: &Shared, sqid: u16, sqe: &Sqe, seen: u64) -> Outcome {
        let op = sqe.opcode();
        if let Some(ns) = self.namespaces.get(sqe.nsid()) {
            if (ns.passthrough && ns.failure.is_none()) || matches!(ns.store, Store::Python) {
                return Outcome::Slow; // the Python side serves it
            }
        } else if sqe.nsid() == BROADCAST_NSID
            && op == opcode::FLUSH
            && self
                .namespaces
                .values()
                .any(|ns| matches!(ns.store, Store::Python))
        {
            return Outcome::Slow; // a flush of namespaces the Python side serves
        }
        match op {
            opcode::READ | opcode::WRITE | opcode::FLUSH | opcode::WRITE_ZEROES => {}
            opcode::DATASET_MANAGEMENT | opcode::COMPARE | opcode::VERIFY | opcode::COPY => {
                return Outcome::Slow
            }
            _ => {
                return Outcome::Done(failed(&CmdError::new(
                    status::INVALID_OPCODE,
                    "invalid opcode",
                )))
            }
        }
        let cdw0 = sqe.dw[0];
        if cdw0 & CDW0_FUSE_OR_PSDT != 0 {
            let fuse = cdw0 & CDW0_FUSE;
            if fuse != 0 {
                // Alone: the pass hands pairs to the Python side (fused_operation).
                let half_of_compare_and_write = (fuse == CDW0_FUSE_FIRST && op == opcode::COMPARE)
                    || (fuse == CDW0_FUSE_SECOND && op == opcode::WRITE);
                let (st, why) = if !half_of_compare_and_write {
                    (status::INVALID_FIELD, "no such fused operation") // (11b included)
                } else {
                    (
                        status::ABORT_FUSE_MISSING,
                        "the other command of its fused operation is missing",
                    )
                };
                return Outcome::Done(failed(&CmdError::new(st, why)));
            }
            let refusal = if cdw0 & CDW0_PSDT == CDW0_PSDT {
                Some("PSDT 11b is reserved")
            } else if self.config.sgl_support == 0 {
                Some("SGLs are not supported")
            } else {
                None
            };
            if let Some(why) = refusal {
                return Outcome::Done(failed(&CmdError::new(status::INVALID_FIELD, why)));
            }
        }
        let result = match op {
            opcode::READ | opcode::WRITE => {
                self.read_write(sh, sqid, sqe, seen, op == opcode::WRITE)
            }
            opcode::FLUSH => self.flush(sh, sqid, sqe, seen),
            _ => self.write_zeroes(sh, sqid, sqe, seen),
        };
        result.unwrap_or_else(|e| Outcome::Done(failed(&e)))
    }

    fn read_write(
        &mut self,
        sh: &Shared,
        sqid: u16,
        sqe: &Sqe,
        seen: u64,
        write: bool,
    ) -> CmdResult<Outcome> {
        let fb = sh.fb();
        let State {
            namespaces,
            memory,
            config,
            settings,
            engine,
            rbd,
            segments,
            iov,
            discard,
            ..
        } = self;
        let ns = lookup(namespaces, config.max_namespaces, sqe.nsid())?;
        let (offset, length) = ns
            .byte_range(sqe.slba(), sqe.nlb())
            .ok_or_else(|| CmdError::new(status::LBA_OUT_OF_RANGE, "LBA out of range"))?;
        if length > config.max_transfer {
            return Err(CmdError::new(
                status::INVALID_FIELD,
                format!("{length} bytes > MDTS"),
            ));
        }
        let fua = if write {
            if ns.readonly {
                return Err(CmdError::new(
                    status::NAMESPACE_WRITE_PROTECTED,
                    "read-only namespace",
                ));
            }
            sqe.fua() || !settings.write_cache
        } else {
            if sqe.fua() && settings.write_cache {
                // FUA on a read: what the volatile cache holds reaches the medium first.
                flush_store(ns).map_err(|e| host_error(sh, ns, e, true, 0))?;
            }
            false
        };
        let to_guest = !write;
        if !data_pointer(
            memory,
            config.sgl_support,
            fb,
            sqe,
            length,
            to_guest,
            segments,
        )? {
            return Ok(Outcome::Slow); // (the Python side copies through messages)
        }
        iovecs(memory, segments, to_guest, discard, iov);
        let ctx = Inflight {
            sqid,
            sqe: *sqe,
            seen,
        };
        let store = match &ns.store {
            Store::File(f) => f,
            Store::Null => {
                count_transfer(sh, write, length);
                return Ok(Outcome::Done(Completion::SUCCESS));
            }
            Store::Rbd(r) => {
                if iov.len() > IOV_MAX {
                    return Ok(Outcome::Slow); // (librbd takes IOV_MAX a call; Python splits)
                }
                let op = if write { Op::Write } else { Op::Read };
                return match rbd.submit(r, op, offset, length, iov, fua, ctx) {
                    Ok(_) => Ok(Outcome::Submitted),
                    Err(errno) => Err(host_error(sh, ns, refused(errno), write, offset)),
                };
            }
            Store::Python => return Ok(Outcome::Slow),
        };
        if !write && engine.is_uring() && !engine.direct_eligible(store, offset, iov) {
            // A buffered read: what the page cache holds is read in place, faster than
            // any queue; only a read that would wait for the device goes to the engine.
            let now = match store.cached_reads {
                CachedReads::InPlace => true,
                CachedReads::NoWait => match store.read_nowait(offset, iov) {
                    Ok(true) => {
                        count_transfer(sh, write, length);
                        return Ok(Outcome::Done(Completion::SUCCESS));
                    }
                    Ok(false) => false,
                    Err(e) => return Err(host_error(sh, ns, e, write, offset)),
                },
                CachedReads::Engine => false,
            };
            if now {
                return match store.transfer(offset, iov, write, fua) {
                    Ok(()) => {
                        count_transfer(sh, write, length);
                        Ok(Outcome::Done(Completion::SUCCESS))
                    }
                    Err(e) => Err(host_error(sh, ns, e, write, offset)),
                };
            }
        }
        let direct = engine.direct;
        if engine
            .try_submit(store, offset, iov, length, write, fua, ctx)
            .is_ok()
        {
            if engine.direct != direct {
                bump(&sh.stats.direct_transfers, 1);
            }
            return Ok(Outcome::Submitted);
        }
        match store.transfer(offset, iov, write, fua) {
            Ok(()) => {
                count_transfer(sh, write, length);
                Ok(Outcome::Done(Completion::SUCCESS))
            }
            Err(e) => Err(host_error(sh, ns, e, write, offset)),
        }
    }

    fn flush(&mut self, sh: &Shared, sqid: u16, sqe: &Sqe, seen: u64) -> CmdResult<Outcome> {
        let nsid = sqe.nsid();
        if nsid != BROADCAST_NSID {
            let ns = lookup(&self.namespaces, self.config.max_namespaces, nsid)?;
            if let Store::Rbd(r) = &ns.store {
                if !r.readonly {
                    let ctx = Inflight {
                        sqid,
                        sqe: *sqe,
                        seen,
                    };
                    return match self.rbd.submit(r, Op::Flush, 0, 0, &[], false, ctx) {
                        Ok(_) => Ok(Outcome::Submitted),
                        Err(errno) => Err(host_error(sh, ns, refused(errno), true, 0)),
                    };
                }
            }
            return flush_store(ns)
                .map(|()| Outcome::Done(Completion::SUCCESS))
                .map_err(|e| host_error(sh, ns, e, true, 0));
        }
        // Every namespace is flushed, even past one that fails; the first failure is
        // what the command reports. A namespace whose storage is gone cannot be made
        // durable: the flush does not pretend it was.
        let mut error = None;
        for nsid in &self.order {
            let Some(ns) = self.namespaces.get(*nsid) else {
                continue;
            };
            if let Some(why) = &ns.failure {
                error.get_or_insert(CmdError {
                    status: status::NAMESPACE_NOT_READY,
                    dnr: Some(true),
                    lba: 0,
                    message: why.clone(),
                });
                continue;
            }
            if let Err(e) = flush_store(ns) {
                let err = host_error(sh, ns, e, true, 0);
                error.get_or_insert(err);
            }
        }
        error.map_or(Ok(Outcome::Done(Completion::SUCCESS)), Err)
    }

    fn write_zeroes(&mut self, sh: &Shared, sqid: u16, sqe: &Sqe, seen: u64) -> CmdResult<Outcome> {
        let ns = lookup(&self.namespaces, self.config.max_namespaces, sqe.nsid())?;
        let (offset, length) = ns
            .byte_range(sqe.slba(), sqe.nlb())
            .ok_or_else(|| CmdError::new(status::LBA_OUT_OF_RANGE, "LBA out of range"))?;
        if ns.readonly {
            return Err(CmdError::new(
                status::NAMESPACE_WRITE_PROTECTED,
                "read-only namespace",
            ));
        }
        let deallocate = sqe.dw[12] & DEAC != 0;
        let fua = sqe.fua() || !self.settings.write_cache;
        let result = match &ns.store {
            Store::File(f) => f.write_zeroes(offset, length, deallocate).and_then(|()| {
                if fua {
                    f.flush()
                } else {
                    Ok(())
                }
            }),
            Store::Rbd(r) => {
                // librbd's write-zeroes frees whole objects and zeroes the rest: the
                // blocks read as zeroes either way, deallocated or not.
                let ctx = Inflight {
                    sqid,
                    sqe: *sqe,
                    seen,
                };
                return match self
                    .rbd
                    .submit(r, Op::WriteZeroes, offset, length, &[], fua, ctx)
                {
                    Ok(_) => Ok(Outcome::Submitted),
                    Err(errno) => Err(host_error(sh, ns, refused(errno), true, offset)),
                };
            }
            _ => Ok(()),
        };
        result
            .map(|()| Outcome::Done(Completion::SUCCESS))
            .map_err(|e| host_error(sh, ns, e, true, offset))
    }

    // --- interrupts -----------------------------------------------------------------------

    fn signal_touched(&mut self, sh: &Shared) {
        let touched = std::mem::take(&mut self.touched);
        for cqid in &touched {
            self.signal(sh, *cqid);
        }
        self.touched = touched;
        self.touched.clear();
    }

    /// Tell the guest about new completions on a CQ: MSI-X (one message per pass, fewer
    /// with interrupt coalescing); without MSI-X the control side recomputes INTx.
    fn signal(&mut self, sh: &Shared, cqid: u16) {
        let Some(cq) = self.cqs.get_mut(u32::from(cqid)) else {
            return;
        };
        let count = std::mem::take(&mut cq.unsignalled);
        if !cq.interrupts_enabled {
            return;
        }
        if !sh.routes.enabled() {
            sh.host.notify();
            return;
        }
        let vector = cq.vector;
        let s = &self.settings;
        let disabled = s
            .coalescing_disabled
            .get(usize::from(vector))
            .copied()
            .unwrap_or(false);
        if s.coalescing_threshold != 0 && s.coalescing_time != 0 && !disabled {
            let now = now_ns();
            let time = u64::from(s.coalescing_time) * 100_000;
            let entry = self.coalesced.entry(vector).or_insert((0, now + time));
            entry.0 += count.max(1);
            if entry.0 <= s.coalescing_threshold && now < entry.1 {
                return;
            }
            self.coalesced.remove(&vector);
        }
        send(sh, vector);
    }

    /// Send what coalescing held back past its aggregation time (all of it with
    /// `force`: the thread is about to park).
    pub fn flush_coalesced(&mut self, sh: &Shared, force: bool) {
        if self.coalesced.is_empty() {
            return;
        }
        let now = now_ns();
        let mut due: Vec<u16> = self
            .coalesced
            .iter()
            .filter(|(_, (_, deadline))| force || now >= *deadline)
            .map(|(v, _)| *v)
            .collect();
        due.sort();
        for vector in due {
            self.coalesced.remove(&vector);
            send(sh, vector);
        }
    }

    // --- what the thread asks ---------------------------------------------------------------

    pub fn polls_doorbells(&self) -> bool {
        self.shadow_pages.is_some() || self.page.is_some()
    }

    pub fn polls_forever(&self) -> bool {
        self.page.is_some() && self.enabled && !self.halted
    }

    /// With mapped doorbells nothing traps: watch the admin doorbells (the admin worker
    /// runs the admin queue) and, without MSI-X, the CQ heads (INTx may drop).
    pub fn poll_mapped_doorbells(&mut self, sh: &Shared) {
        let Some(page) = self.page else { return };
        let admin = (page.load(0), page.load(1));
        let mut changed = admin != self.admin_words;
        self.admin_words = admin;
        if !sh.routes.enabled() {
            let fb = sh.fb();
            // (Only CQs that interrupt: a polled one never moves the INTx level.)
            for cq in self.cqs.values_mut().filter(|cq| cq.interrupts_enabled) {
                let head = cq.head;
                let _ = cq.refresh_head(&self.memory, fb, Some(page));
                changed |= cq.head != head;
            }
        }
        if changed {
            sh.host.notify();
        }
    }

    pub fn enable_notifications(&mut self, sh: &Shared) -> bool {
        let fb = sh.fb();
        let mut waiting = false;
        for turn in 0..self.active.len() {
            let qid = self.active[turn];
            let sq = self.sqs.get_mut(u32::from(qid)).expect("active");
            if sh.trapped[2 * usize::from(qid)].load(Ordering::SeqCst) != 0 {
                waiting = true;
            }
            match sq.enable_notification(&self.memory, fb) {
                Ok(w) => waiting |= w,
                Err(e) => {
                    // EventIdx in memory the guest unmapped: this controller cannot go
                    // on (the guest resets it); the thread sleeps until then.
                    self.fatal(sh, format!("shadow doorbells: {}", e.0));
                    return false;
                }
            }
        }
        waiting
    }

    pub fn suppress_notifications(&mut self, sh: &Shared) {
        let fb = sh.fb();
        for qid in &self.active {
            if let Some(sq) = self.sqs.get(u32::from(*qid)) {
                let _ = sq.suppress_notification(&self.memory, fb);
            }
        }
    }
}

fn lookup(
    namespaces: &IdTable<Namespace>,
    max_namespaces: u32,
    nsid: u32,
) -> CmdResult<&Namespace> {
    match namespaces.get(nsid) {
        // Base 2.0+: a valid but inactive NSID is Invalid Field; an invalid one (0, past
        // NN, FFFFFFFFh where no broadcast is allowed) Invalid Namespace or Format.
        None if nsid > 0 && nsid <= max_namespaces => Err(CmdError::new(
            status::INVALID_FIELD,
            format!("nsid {nsid} is not active"),
        )),
        None => Err(CmdError::new(
            status::INVALID_NAMESPACE,
            format!("nsid {nsid:#x}"),
        )),
        Some(ns) => match &ns.failure {
            // Its storage is gone: fail fast (DNR: retrying later will not help).
            Some(why) => Err(CmdError {
                status: status::NAMESPACE_NOT_READY,
                dnr: Some(true),
                lba: 0,
                message: why.clone(),
            }),
            None => Ok(ns),
        },
    }
}

/// The data pointer's segments (PRPs or an SGL); Ok(false) if some are reachable only
/// through copies (the Python side's bounce buffers).
fn data_pointer(
    memory: &GuestMemory,
    sgl_support: u8,
    fb: &dyn Fallback,
    sqe: &Sqe,
    length: u64,
    to_guest: bool,
    segments: &mut Vec<Segment>,
) -> CmdResult<bool> {
    if sqe.dw[0] & CDW0_PSDT != 0 {
        let (addr, dlen, ident) = (sqe.prp1(), sqe.dw[8], (sqe.dw[9] >> 24) as u8);
        sgl_segments(
            memory,
            fb,
            addr,
            dlen,
            ident,
            length,
            to_guest,
            sgl_support == 2,
            segments,
        )?;
    } else {
        let prp1 = sqe.prp1();
        if length <= PAGE_SIZE - (prp1 & PAGE_MASK) && prp1 & 0x3 == 0 && length > 0 {
            // The most common transfer of all, one that PRP1 alone describes.
            segments.clear();
            segments.push(Segment {
                addr: prp1,
                len: length,
                bucket: false,
            });
        } else {
            prp_segments(memory, fb, prp1, sqe.prp2(), length, segments)?;
        }
    }
    for s in segments.iter() {
        if s.bucket {
            continue;
        }
        match memory
            .view(s.addr, s.len, to_guest, fb)
            .map_err(CmdError::transfer)?
        {
            View::Mapped(_) => {}
            View::Copied => return Ok(false),
        }
    }
    Ok(true)
}

/// iovecs for checked segments (every one mapped): bit buckets into the discard buffer.
fn iovecs(
    memory: &GuestMemory,
    segments: &[Segment],
    to_guest: bool,
    discard: &mut [u8],
    iov: &mut Vec<libc::iovec>,
) {
    iov.clear();
    for s in segments {
        if s.bucket {
            let mut left = s.len as usize;
            while left > 0 {
                let n = left.min(discard.len());
                iov.push(libc::iovec {
                    iov_base: discard.as_mut_ptr().cast(),
                    iov_len: n,
                });
                left -= n;
            }
            continue;
        }
        let ptr = memory
            .mapped(s.addr, s.len, to_guest)
            .expect("checked by data_pointer");
        iov.push(libc::iovec {
            iov_base: ptr.cast(),
            iov_len: s.len as usize,
        });
    }
}

fn sorted_keys(sqs: &IdTable<SubmissionQueue>) -> Vec<u16> {
    sqs.ids().map(|q| q as u16).collect()
}

fn take_trapped(sh: &Shared, qid: u16) -> Option<u32> {
    match sh
        .trapped
        .get(2 * usize::from(qid))?
        .swap(0, Ordering::SeqCst)
    {
        0 => None,
        v => Some(v - 1),
    }
}

fn send(sh: &Shared, vector: u16) {
    if let Some(count) = sh.stats.interrupts.get(usize::from(vector)) {
        bump(count, 1);
    }
    sh.routes.signal(usize::from(vector));
}

fn count_transfer(sh: &Shared, write: bool, length: u64) {
    let c = &sh.stats.counters;
    if write {
        bump(&c.host_write_commands, 1);
        bump(&c.bytes_written, length);
    } else {
        bump(&c.host_read_commands, 1);
        bump(&c.bytes_read, length);
    }
}

/// A failure with no more to it than its errno (librbd refused an operation).
fn refused(errno: i32) -> IoFailure {
    IoFailure {
        errno,
        past_end: false,
    }
}

fn flush_store(ns: &Namespace) -> Result<(), IoFailure> {
    match &ns.store {
        Store::File(f) => f.flush(),
        Store::Rbd(r) => r.flush().map_err(refused),
        _ => Ok(()),
    }
}

/// The completion for a backend's failure at byte `offset` of `ns`, counted, and the
/// namespace's new state told to the control side (nvme/io.py _host_error).
fn host_error(sh: &Shared, ns: &Namespace, e: IoFailure, writing: bool, offset: u64) -> CmdError {
    let block_device = matches!(&ns.store, Store::File(f) if f.block_device);
    let network = matches!(ns.store, Store::Rbd(_));
    let failure =
        media_errors::classify_store(e.errno, writing, e.past_end, network, block_device, || {
            match &ns.store {
                Store::File(f) => f.store_size(),
                Store::Rbd(r) => r.size().map_or_else(StoreSize::Failed, StoreSize::Bytes),
                _ => StoreSize::Bytes(u64::MAX),
            }
        });
    let c = &sh.stats.counters;
    bump(&c.host_errors, 1);
    if failure.media {
        bump(&c.media_errors, 1);
    }
    let mut reason = if e.past_end {
        format!("{}: end of the backing store", ns.description)
    } else {
        format!(
            "{}: {}",
            ns.description,
            std::io::Error::from_raw_os_error(e.errno)
        )
    };
    if failure.gone && !media_errors::is_gone(e.errno) {
        reason = format!(
            "{}: its capacity is now 0 (the device is gone)",
            ns.description
        );
    }
    if failure.gone || failure.read_only {
        sh.emit(Event::StorageFailed {
            nsid: ns.nsid,
            gone: failure.gone,
            read_only: failure.read_only,
            reason: reason.clone(),
        });
    }
    CmdError {
        status: failure.status,
        dnr: Some(failure.dnr),
        lba: offset >> ns.lba_shift,
        message: reason,
    }
}

/// The iovecs from byte `skip` on (what a short transfer left undone).
fn skip_iov(iov: &[libc::iovec], mut skip: usize) -> Vec<libc::iovec> {
    let mut rest = Vec::with_capacity(iov.len());
    for v in iov {
        if skip >= v.iov_len {
            skip -= v.iov_len;
            continue;
        }
        // (skip < iov_len: still inside the caller's buffer)
        rest.push(libc::iovec {
            iov_base: (v.iov_base as *mut u8).wrapping_add(skip).cast(),
            iov_len: v.iov_len - skip,
        });
        skip = 0;
    }
    rest
}

// --- the thread -----------------------------------------------------------------------------

/// The poll window: grows while parking proves premature, shrinks while it does not
/// (engine/poller.py AdaptivePoll).
pub struct AdaptivePoll {
    pub window_ns: u64,
}

impl AdaptivePoll {
    pub fn keep_polling(&self, limit_ns: u64, idle_ns: u64) -> bool {
        limit_ns == 0 || idle_ns < self.window_ns.min(limit_ns)
    }

    pub fn woken(&mut self, limit_ns: u64, gap_ns: u64) {
        if gap_ns < POLL_GROW_LIMIT_NS {
            self.window_ns = (2 * self.window_ns).max(POLL_WINDOW_START_NS).min(limit_ns);
        } else {
            self.window_ns /= 2;
            if self.window_ns < POLL_WINDOW_START_NS / 4 {
                self.window_ns = 0;
            }
        }
    }
}

pub fn run(sh: Arc<Shared>) {
    // SAFETY: gettid has no preconditions.
    sh.tid
        .store(unsafe { libc::gettid() } as u32, Ordering::Release);
    let mut poll = AdaptivePoll {
        window_ns: POLL_WINDOW_START_NS,
    };
    let mut last_work = now_ns();
    loop {
        if sh.attention.load(Ordering::Acquire) {
            let mut c = sh.control.lock().unwrap_or_else(|e| e.into_inner());
            if !c.running {
                break;
            }
            if c.pause_requests > 0 {
                drop(c);
                sh.state
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .drain(&sh, true);
                c = sh.control.lock().unwrap_or_else(|e| e.into_inner());
                c.paused = true;
                sh.control_cond.notify_all();
                while c.pause_requests > 0 && c.running {
                    c = sh.control_cond.wait(c).unwrap_or_else(|e| e.into_inner());
                }
                c.paused = false;
                continue;
            }
            // Nothing asked: look again only when the next request says so.
            sh.attention.store(false, Ordering::SeqCst);
            if c.pause_requests > 0 || !c.running {
                sh.attention.store(true, Ordering::SeqCst);
            }
            continue;
        }
        let (worked, in_flight, rbd_in_flight, forever, doorbells, halted) = {
            let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
            let n = st.process_pass(&sh);
            (
                n,
                st.engine.in_flight,
                st.rbd.in_flight,
                st.polls_forever(),
                st.polls_doorbells(),
                st.halted,
            )
        };
        if worked > 0 {
            last_work = now_ns();
            yield_to_waiters(&sh);
            continue;
        }
        if in_flight > 0 && !halted {
            // Never park with transfers in flight: nothing would post their completions.
            // Sleep in the kernel until one ends, briefly, so that new submissions are seen.
            sh.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .engine
                .wait(Some(IN_FLIGHT_WAIT_NS));
            last_work = now_ns();
            continue;
        }
        if rbd_in_flight > 0 && !halted {
            // librbd's completions write the wake eventfd: sleep on it, as briefly.
            sh.rbd_finished
                .sleep_unless_finished(|| sh.wait_woken(Some(IN_FLIGHT_WAIT_NS)));
            last_work = now_ns();
            continue;
        }
        if forever {
            sh.state
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .poll_mapped_doorbells(&sh);
            idle_poll(&sh, now_ns() - last_work);
            continue;
        }
        let limit = sh.poll_limit_ns.load(Ordering::Relaxed);
        let idle = now_ns() - last_work;
        if doorbells && !halted && poll.keep_polling(limit, idle) {
            idle_poll(&sh, idle);
            continue;
        }
        if park(&sh) {
            poll.woken(limit, now_ns() - last_work);
        }
        last_work = now_ns();
    }
    let mut c = sh.control.lock().unwrap_or_else(|e| e.into_inner());
    c.thread_alive = false;
    sh.control_cond.notify_all();
}

/// Polling with nothing to do for a while: let whatever else wants this CPU run (a
/// guest's vCPU, a client) rather than spin through its time slice. Right after work
/// the next submission usually follows within microseconds: spin then.
fn idle_poll(sh: &Shared, idle_ns: u64) {
    if idle_ns > IDLE_SPIN_NS || sh.waiters.load(Ordering::Relaxed) > 0 {
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

/// how long an idle poller spins before it yields its CPU between looks
const IDLE_SPIN_NS: u64 = 20_000;

fn yield_to_waiters(sh: &Shared) {
    if sh.waiters.load(Ordering::Relaxed) > 0 {
        std::thread::yield_now();
    }
}

/// Sleep until a doorbell (or a pause, or stop) wakes the thread; false if work arrived
/// while arming the doorbells, and it did not sleep.
fn park(sh: &Shared) -> bool {
    sh.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .flush_coalesced(sh, true);
    sh.clear_wake();
    {
        let mut st = sh.state.lock().unwrap_or_else(|e| e.into_inner());
        // (A fatal controller asks the guest for nothing: it sleeps until reset.) A
        // librbd completion queued before the eventfd was cleared is work too.
        let waiting = !st.halted && (st.enable_notifications(sh) || st.rbd.has_finished());
        if waiting || sh.pause_requested() || !sh.running() {
            st.suppress_notifications(sh);
            return false;
        }
    }
    bump(&sh.stats.parks, 1);
    let since = now_ns();
    sh.stats.parked_since.store(since.max(1), Ordering::Release);
    sh.sleep();
    sh.stats.parked_since.store(0, Ordering::Release);
    bump(&sh.stats.parked_ns, now_ns() - since);
    sh.state
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .suppress_notifications(sh);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The same window as engine/poller.py's AdaptivePoll (tests/unit: the Python one).
    #[test]
    fn poll_window_grows_and_shrinks_as_the_python_one() {
        let limit = 500_000_000;
        let mut poll = AdaptivePoll {
            window_ns: POLL_WINDOW_START_NS,
        };
        assert!(poll.keep_polling(limit, POLL_WINDOW_START_NS - 1));
        assert!(!poll.keep_polling(limit, POLL_WINDOW_START_NS));
        poll.woken(limit, 300_000);
        assert_eq!(poll.window_ns, 2 * POLL_WINDOW_START_NS);
        for _ in 0..30 {
            poll.woken(limit, 300_000);
        }
        assert_eq!(poll.window_ns, limit);
        poll.woken(limit, POLL_GROW_LIMIT_NS);
        assert_eq!(poll.window_ns, limit / 2);
        for _ in 0..40 {
            poll.woken(limit, 5_000_000_000);
        }
        assert_eq!(poll.window_ns, 0);
        assert!(!poll.keep_polling(limit, 0));
        assert!(poll.keep_polling(0, u64::MAX)); // a limit of 0: poll forever
        poll.woken(limit, 10_000);
        assert_eq!(poll.window_ns, POLL_WINDOW_START_NS);
    }
}
