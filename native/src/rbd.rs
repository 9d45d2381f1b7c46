//! Ceph RBD images as the native plane reaches them: reads, writes, flushes and
//! write-zeroes through librbd's asynchronous C API, many in flight at once.
//!
//! backends/rbd.py opens the image (its cluster connection, its exclusive lock, its
//! size watch) and hands the plane the `rbd_image_t`; the plane submits, librbd
//! completes each operation on a thread of its own, and the completion callback here
//! (no Python, no GIL) queues (slot, result) and, if the I/O thread sleeps, writes the
//! plane's wake eventfd: the thread wakes as it does for a doorbell and posts the
//! completion itself, so a CQ still has one writer. librbd is loaded with the first RBD namespace (dlopen of the
//! soname Debian's librbd1 ships, as the Python side does): the crate works without it.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::plane::Inflight;

/// the soname backends/rbd.py loads too (LIBRARIES["rbd"])
const LIBRBD: &str = "librbd.so.1";

type RbdCompletion = *mut c_void;
type RbdCallback = unsafe extern "C" fn(RbdCompletion, *mut c_void);

/// The librbd calls the plane makes, looked up once.
struct Api {
    create_completion:
        unsafe extern "C" fn(*mut c_void, Option<RbdCallback>, *mut RbdCompletion) -> i32,
    readv: unsafe extern "C" fn(*mut c_void, *const libc::iovec, i32, u64, RbdCompletion) -> i32,
    writev: unsafe extern "C" fn(*mut c_void, *const libc::iovec, i32, u64, RbdCompletion) -> i32,
    flush: unsafe extern "C" fn(*mut c_void, RbdCompletion) -> i32,
    write_zeroes: unsafe extern "C" fn(*mut c_void, u64, usize, RbdCompletion, i32, i32) -> i32,
    get_return_value: unsafe extern "C" fn(RbdCompletion) -> isize,
    release: unsafe extern "C" fn(RbdCompletion),
    sync_flush: unsafe extern "C" fn(*mut c_void) -> i32,
    get_size: unsafe extern "C" fn(*mut c_void, *mut u64) -> i32,
    /// kept loaded for the life of the process (the pointers above are into it)
    _library: libloading::Library,
}

fn api() -> Result<&'static Api, String> {
    static API: OnceLock<Result<Api, String>> = OnceLock::new();
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    // SAFETY: loading librbd runs its initialisers, which only set up its own state.
    let library = unsafe { libloading::Library::new(LIBRBD) }
        .map_err(|e| format!("cannot load {LIBRBD}: {e}"))?;
    macro_rules! symbol {
        ($name:literal) => {
            // SAFETY: the field types above are librbd.h's prototypes for these names
            // (Ceph 16's librbd1, ABI-stable since the calls were added).
            *unsafe { library.get($name) }.map_err(|e| format!("{LIBRBD}: {e}"))?
        };
    }
    Ok(Api {
        create_completion: symbol!(b"rbd_aio_create_completion\0"),
        readv: symbol!(b"rbd_aio_readv\0"),
        writev: symbol!(b"rbd_aio_writev\0"),
        flush: symbol!(b"rbd_aio_flush\0"),
        write_zeroes: symbol!(b"rbd_aio_write_zeroes\0"),
        get_return_value: symbol!(b"rbd_aio_get_return_value\0"),
        release: symbol!(b"rbd_aio_release\0"),
        sync_flush: symbol!(b"rbd_flush\0"),
        get_size: symbol!(b"rbd_get_size\0"),
        _library: library,
    })
}

/// An open image (`rbd_image_t`) that the Python backend owns: it stays open while a
/// namespace that names it is attached (a namespace is detached, with nothing in
/// flight, before its backend closes it).
#[derive(Clone, Debug)]
pub struct RbdStore {
    pub image: usize,
    /// the backend was opened read-only (a snapshot): its flush does nothing
    pub readonly: bool,
}

impl RbdStore {
    fn handle(&self) -> *mut c_void {
        self.image as *mut c_void
    }

    /// Make every completed write durable, waiting here (a broadcast Flush).
    pub fn flush(&self) -> Result<(), i32> {
        if self.readonly {
            return Ok(());
        }
        let api = api().map_err(|_| libc::ENOSYS)?;
        // SAFETY: the image is open (see the type's comment).
        let rc = unsafe { (api.sync_flush)(self.handle()) };
        if rc < 0 {
            Err(-rc)
        } else {
            Ok(())
        }
    }

    /// The image's size now (it may have been resized on the cluster).
    pub fn size(&self) -> Result<u64, i32> {
        let api = api().map_err(|_| libc::ENOSYS)?;
        let mut size = 0u64;
        // SAFETY: the image is open; rbd_get_size writes one u64 we own.
        let rc = unsafe { (api.get_size)(self.handle(), &mut size) };
        if rc < 0 {
            Err(-rc)
        } else {
            Ok(size)
        }
    }
}

/// Whether librbd can be loaded (the Python side checks before it attaches an image).
pub fn available() -> Result<(), String> {
    api().map(|_| ())
}

/// What an operation in flight is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
    WriteZeroes,
    Flush,
}

/// One operation submitted to librbd, from submission to release.
pub struct Slot {
    pub ctx: Inflight,
    pub store: Option<RbdStore>,
    /// the guest buffers of a read or write: librbd reads or fills them until it
    /// completes (guest memory stays mapped while anything is in flight, memory.rs)
    pub iov: Vec<libc::iovec>,
    pub op: Op,
    pub offset: u64,
    pub length: u64,
    /// a write (or write-zeroes) with FUA: a flush follows it before it completes
    pub fua: bool,
    /// that flush is what is in flight now
    pub flushing: bool,
    /// what librbd answered (bytes, or -errno) for the operation that completed
    pub result: isize,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            ctx: Inflight::default(),
            store: None,
            iov: Vec::new(),
            op: Op::Read,
            offset: 0,
            length: 0,
            fua: false,
            flushing: false,
            result: 0,
        }
    }
}

/// Where librbd's threads leave finished operations for the I/O thread.
pub struct Finished {
    done: Mutex<Vec<(u32, isize)>>,
    /// a duplicate of the plane's wake eventfd: open for as long as an operation is
    /// (a ticket holds this), whatever happens to the plane
    wake: OwnedFd,
    /// the I/O thread sleeps on the eventfd: only then does a completion write it (an
    /// awake thread finds it in `done` at its next pass, without the system calls)
    sleeping: AtomicBool,
}

impl Finished {
    /// `wake`: a duplicate of the plane's wake eventfd.
    pub fn new(wake: OwnedFd) -> Arc<Finished> {
        Arc::new(Finished {
            done: Mutex::new(Vec::new()),
            wake,
            sleeping: AtomicBool::new(false),
        })
    }

    fn is_empty(&self) -> bool {
        self.done
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    /// Run `sleep` (a wait on the wake eventfd) unless an operation has finished
    /// already; one that finishes meanwhile writes the eventfd. (Both sides store, then
    /// look at the other's store, sequentially consistent; the queue's mutex orders
    /// the rest: either the callback sees `sleeping`, or this sees its entry.)
    pub fn sleep_unless_finished(&self, sleep: impl FnOnce()) {
        self.sleeping.store(true, Ordering::SeqCst);
        if self.is_empty() {
            sleep();
        }
        self.sleeping.store(false, Ordering::SeqCst);
    }
}

/// The callback argument of one operation: freed by the callback.
struct Ticket {
    finished: Arc<Finished>,
    slot: u32,
}

/// librbd calls this once per operation, on one of its threads, when it is done.
unsafe extern "C" fn on_complete(completion: RbdCompletion, arg: *mut c_void) {
    // SAFETY: `arg` is the Box<Ticket> submit() leaked for this completion, and librbd
    // calls back exactly once per completion.
    let ticket = unsafe { Box::from_raw(arg.cast::<Ticket>()) };
    let (result, api) = match api() {
        // SAFETY: the completion is valid until released, here, after its value is read.
        Ok(api) => (unsafe { (api.get_return_value)(completion) }, Some(api)),
        Err(_) => (-(libc::EIO as isize), None), // (unreachable: it was loaded to submit)
    };
    if let Some(api) = api {
        // SAFETY: as above; nothing else holds the completion.
        unsafe { (api.release)(completion) };
    }
    let finished = &ticket.finished;
    finished
        .done
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((ticket.slot, result));
    if !finished.sleeping.load(Ordering::SeqCst) {
        return;
    }
    let one: u64 = 1;
    // SAFETY: 8 bytes we own to the eventfd the ticket keeps open.
    let _ = unsafe {
        libc::write(
            ticket.finished.wake.as_raw_fd(),
            (&one as *const u64).cast(),
            8,
        )
    };
}

/// The operations one plane has in librbd.
pub struct RbdEngine {
    pub slots: Vec<Slot>,
    free: Vec<u32>,
    /// submitted and not yet released
    pub in_flight: u32,
    finished: Arc<Finished>,
    reaped: Vec<(u32, isize)>,
}

impl RbdEngine {
    /// `finished`: where the plane's operations end (Shared::rbd_finished).
    pub fn new(finished: Arc<Finished>) -> RbdEngine {
        RbdEngine {
            slots: Vec::new(),
            free: Vec::new(),
            in_flight: 0,
            finished,
            reaped: Vec::new(),
        }
    }

    /// Submit `op` on `store` (with `iov` for a read or write); the slot it went to, or
    /// the errno librbd refused it with (the caller completes the command with it).
    #[allow(clippy::too_many_arguments)]
    pub fn submit(
        &mut self,
        store: &RbdStore,
        op: Op,
        offset: u64,
        length: u64,
        iov: &[libc::iovec],
        fua: bool,
        ctx: Inflight,
    ) -> Result<u32, i32> {
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(Slot::default());
                (self.slots.len() - 1) as u32
            }
        };
        let slot = &mut self.slots[index as usize];
        slot.iov.clear();
        slot.iov.extend_from_slice(iov);
        slot.ctx = ctx;
        slot.store = Some(store.clone());
        slot.op = op;
        slot.offset = offset;
        slot.length = length;
        slot.fua = fua;
        slot.flushing = false;
        slot.result = 0;
        if let Err(errno) = self.start(index, op) {
            self.slots[index as usize] = Slot::default();
            self.free.push(index);
            return Err(errno);
        }
        self.in_flight += 1;
        Ok(index)
    }

    /// Hand the slot's operation `op` to librbd.
    fn start(&self, index: u32, op: Op) -> Result<(), i32> {
        let api = api().map_err(|_| libc::ENOSYS)?;
        let slot = &self.slots[index as usize];
        let image = slot.store.as_ref().expect("set by the caller").handle();
        let ticket = Box::into_raw(Box::new(Ticket {
            finished: self.finished.clone(),
            slot: index,
        }));
        let mut completion: RbdCompletion = std::ptr::null_mut();
        // SAFETY: creates a completion that calls on_complete(…, ticket) once.
        let rc =
            unsafe { (api.create_completion)(ticket.cast(), Some(on_complete), &mut completion) };
        if rc < 0 {
            // SAFETY: librbd did not take the ticket.
            drop(unsafe { Box::from_raw(ticket) });
            return Err(-rc);
        }
        // SAFETY: the image is open while the namespace is attached; the iovec array
        // lives in the slot, which is not reused before release(), and the buffers it
        // names stay mapped while anything is in flight (a DMA_UNMAP drains first).
        let rc = unsafe {
            match op {
                Op::Read | Op::Write => {
                    let vectored = if op == Op::Read {
                        api.readv
                    } else {
                        api.writev
                    };
                    vectored(
                        image,
                        slot.iov.as_ptr(),
                        slot.iov.len() as i32,
                        slot.offset,
                        completion,
                    )
                }
                Op::WriteZeroes => {
                    (api.write_zeroes)(image, slot.offset, slot.length as usize, completion, 0, 0)
                }
                Op::Flush => (api.flush)(image, completion),
            }
        };
        if rc < 0 {
            // SAFETY: refused before it started: librbd will not call back; the
            // completion and the ticket are still ours.
            unsafe { (api.release)(completion) };
            drop(unsafe { Box::from_raw(ticket) });
            return Err(-rc);
        }
        Ok(())
    }

    /// After a write with FUA succeeded: the flush that makes it durable, in the same
    /// slot (which stays in flight). Err: librbd refused the flush.
    pub fn follow_with_flush(&mut self, index: u32) -> Result<(), i32> {
        self.slots[index as usize].flushing = true;
        self.start(index, Op::Flush)
    }

    /// The slots whose operations ended (their `result` set), without waiting.
    pub fn reap(&mut self, out: &mut Vec<u32>) {
        {
            let mut done = self.finished.done.lock().unwrap_or_else(|e| e.into_inner());
            std::mem::swap(&mut self.reaped, &mut *done);
        }
        for &(index, result) in &self.reaped {
            self.slots[index as usize].result = result;
            out.push(index);
        }
        self.reaped.clear();
    }

    /// Whether librbd has ended operations that reap() has not taken yet.
    pub fn has_finished(&self) -> bool {
        !self.finished.is_empty()
    }

    /// The slot is finished with.
    pub fn release(&mut self, index: u32) {
        let slot = &mut self.slots[index as usize];
        slot.store = None;
        slot.ctx = Inflight::default();
        self.free.push(index);
        self.in_flight -= 1;
    }
}
