//! The door between Python and the native data plane (dataplane/native.py is the other
//! side): the plane's control calls, with the GIL released wherever they may wait for
//! the plane's lock, and the Python services the plane calls back (the slow path, the
//! memory fallback, notify) with it held.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use pyo3::buffer::PyBuffer;
use pyo3::exceptions::PyOSError;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyTuple};

use crate::interrupts::VectorRoutes;
use crate::memory::{DmaError, Fallback, Region};
use crate::plane::{self, Completion, Config, Event, Host, Settings, Shared};
use crate::queues::DoorbellPage;
use crate::spec::Sqe;
use crate::storage::{CachedReads, FileStore, Namespace, Store};

/// MSI-X routes, shared by pci/msix.py (which decides them) and the native plane.
#[pyclass(name = "VectorRoutes", frozen, module = "nvme_mdev._native")]
pub struct PyRoutes {
    pub inner: Arc<VectorRoutes>,
}

#[pymethods]
impl PyRoutes {
    #[new]
    fn new(vectors: usize) -> Self {
        PyRoutes {
            inner: Arc::new(VectorRoutes::new(vectors)),
        }
    }

    /// Send `vector` (its eventfd, or its pending bit while it has none).
    fn signal(&self, py: Python<'_>, vector: usize) {
        py.detach(|| self.inner.signal(vector));
    }

    /// Where `vector` goes from now on (-1: nowhere); a pending vector that gets an
    /// eventfd fires once.
    fn route(&self, py: Python<'_>, vector: usize, fd: i32) {
        py.detach(|| self.inner.route(vector, fd));
    }

    fn pending(&self, vector: usize) -> bool {
        self.inner.pending(vector)
    }

    fn clear_pending(&self) {
        self.inner.clear_pending();
    }

    fn set_enabled(&self, on: bool) {
        self.inner.set_enabled(on);
    }

    #[getter]
    fn enabled(&self) -> bool {
        self.inner.enabled()
    }

    #[getter]
    fn vectors(&self) -> usize {
        self.inner.vectors()
    }
}

/// Guest memory the table cannot reach in place: the Python GuestMemory answers.
struct PyFallback {
    memory: Py<PyAny>,
}

fn dma_error(py: Python<'_>, err: PyErr) -> DmaError {
    DmaError(err.value(py).to_string())
}

impl Fallback for PyFallback {
    fn check(&self, addr: u64, len: u64, write: bool) -> Result<(), DmaError> {
        Python::attach(|py| {
            let view = self
                .memory
                .call_method1(py, "view", (addr, len, write))
                .map_err(|e| dma_error(py, e))?;
            if !view.is_none(py) {
                let _ = view.call_method0(py, "release");
            }
            Ok(())
        })
    }

    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), DmaError> {
        Python::attach(|py| {
            let data = self
                .memory
                .call_method1(py, "read", (addr, buf.len()))
                .map_err(|e| dma_error(py, e))?;
            let bytes: Vec<u8> = data.extract(py).map_err(|e| dma_error(py, e))?;
            if bytes.len() != buf.len() {
                return Err(DmaError(format!(
                    "DMA read {addr:#x}: {} bytes of {}",
                    bytes.len(),
                    buf.len()
                )));
            }
            buf.copy_from_slice(&bytes);
            Ok(())
        })
    }

    fn write(&self, addr: u64, data: &[u8]) -> Result<(), DmaError> {
        Python::attach(|py| {
            let bytes = PyBytes::new(py, data);
            self.memory
                .call_method1(py, "write", (addr, bytes))
                .map_err(|e| dma_error(py, e))?;
            Ok(())
        })
    }
}

struct PyHost {
    notify: Py<PyAny>,
    slow: Py<PyAny>,
    fused: Py<PyAny>,
    fallback: PyFallback,
}

impl Host for PyHost {
    fn notify(&self) {
        Python::attach(|py| {
            if let Err(e) = self.notify.call0(py) {
                e.print(py);
            }
        });
    }

    fn slow(&self, sqid: u16, sqe: &Sqe) -> Result<Completion, String> {
        Python::attach(|py| {
            let run = || -> PyResult<Completion> {
                let dw = PyTuple::new(py, sqe.dw)?;
                let (status, dw0, lba): (u16, u32, u64) =
                    self.slow.call1(py, (sqid, dw))?.extract(py)?;
                Ok(Completion { status, dw0, lba })
            };
            run().map_err(|e| {
                e.print(py);
                e.value(py).to_string()
            })
        })
    }

    fn fused(
        &self,
        sqid: u16,
        first: &Sqe,
        second: &Sqe,
    ) -> Result<(Completion, Completion), String> {
        Python::attach(|py| {
            let run = || -> PyResult<(Completion, Completion)> {
                let dws = (PyTuple::new(py, first.dw)?, PyTuple::new(py, second.dw)?);
                let ((s1, d1, l1), (s2, d2, l2)): ((u16, u32, u64), (u16, u32, u64)) =
                    self.fused.call1(py, (sqid, dws.0, dws.1))?.extract(py)?;
                Ok((
                    Completion {
                        status: s1,
                        dw0: d1,
                        lba: l1,
                    },
                    Completion {
                        status: s2,
                        dw0: d2,
                        lba: l2,
                    },
                ))
            };
            run().map_err(|e| {
                e.print(py);
                e.value(py).to_string()
            })
        })
    }

    fn fallback(&self) -> &dyn Fallback {
        &self.fallback
    }
}

fn dma_exception(py: Python<'_>, err: DmaError) -> PyErr {
    match py
        .import("nvme_mdev.guest_memory")
        .and_then(|m| m.getattr("DmaError"))
    {
        Ok(class) => match class.call1((err.0.clone(),)) {
            Ok(instance) => PyErr::from_value(instance),
            Err(e) => e,
        },
        Err(e) => e,
    }
}

/// The host address and length of a buffer; the export is released at once (the
/// plane keeps the address, not the object: memory.rs says why that is sound).
fn buffer_address(obj: &Bound<'_, PyAny>) -> PyResult<(usize, usize)> {
    let buffer = PyBuffer::<u8>::get(obj)?;
    if !buffer.is_c_contiguous() {
        return Err(pyo3::exceptions::PyValueError::new_err(
            "guest memory must be contiguous",
        ));
    }
    let address = buffer.buf_ptr() as usize;
    let len = buffer.len_bytes();
    drop(buffer); // (the GIL is held: the export is released now)
    Ok((address, len))
}

/// A DMA region as Python describes it: (iova, size, buffer or None, readable, writable).
type RegionSpec<'py> = (u64, u64, Option<Bound<'py, PyAny>>, bool, bool);

fn region_from_spec((iova, len, buffer, readable, writable): RegionSpec<'_>) -> PyResult<Region> {
    let host = match buffer {
        Some(obj) => {
            let (address, size) = buffer_address(&obj)?;
            if (size as u64) < len {
                return Err(pyo3::exceptions::PyValueError::new_err(
                    "region buffer shorter than the region",
                ));
            }
            address
        }
        None => 0,
    };
    Ok(Region {
        iova,
        len,
        host,
        readable,
        writable,
    })
}

/// One controller's native data plane.
#[pyclass(name = "DataPlane", frozen, module = "nvme_mdev._native")]
pub struct PyPlane {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for PyPlane {
    /// A plane dropped while its thread runs (its controller gone without a stop) ends
    /// that thread: it holds the Shared, and with it the io_uring, eventfds and guest
    /// memory views, for as long as it runs.
    fn drop(&mut self) {
        Python::attach(|py| self.stop(py));
    }
}

#[pymethods]
impl PyPlane {
    #[new]
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (max_io_queues, max_transfer, max_namespaces, sgl_support, routes, uring, doorbell_page, notify, slow, fused, memory))]
    fn new(
        max_io_queues: u16,
        max_transfer: u64,
        max_namespaces: u32,
        sgl_support: u8,
        routes: &PyRoutes,
        uring: bool,
        doorbell_page: Option<Bound<'_, PyAny>>,
        notify: Py<PyAny>,
        slow: Py<PyAny>,
        fused: Py<PyAny>,
        memory: Py<PyAny>,
    ) -> PyResult<Self> {
        let page = match doorbell_page {
            Some(obj) => {
                let (address, len) = buffer_address(&obj)?;
                Some(DoorbellPage {
                    base: address as *mut u8,
                    words: len / 4,
                })
            }
            None => None,
        };
        let config = Config {
            max_io_queues,
            max_transfer,
            max_namespaces,
            sgl_support,
            vectors: routes.inner.vectors(),
            uring,
        };
        let host = Box::new(PyHost {
            notify,
            slow,
            fused,
            fallback: PyFallback { memory },
        });
        let shared = Shared::new(config, routes.inner.clone(), page, host)
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        Ok(PyPlane {
            shared: Arc::new(shared),
            thread: Mutex::new(None),
        })
    }

    // --- the thread ---------------------------------------------------------------------

    fn start(&self) -> PyResult<()> {
        let mut thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if thread.is_some() {
            return Ok(());
        }
        {
            let mut c = self
                .shared
                .control
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            c.running = true;
            c.thread_alive = true;
        }
        self.shared
            .started_ns
            .store(plane::now_ns().max(1), Ordering::Release);
        let shared = self.shared.clone();
        let handle = std::thread::Builder::new()
            .name("nvme-mdev-io".into())
            .spawn(move || plane::run(shared))
            .map_err(|e| PyOSError::new_err(e.to_string()))?;
        *thread = Some(handle);
        Ok(())
    }

    /// Finish the pass being made and every transfer in flight (posted), end the thread.
    fn stop(&self, py: Python<'_>) {
        py.detach(|| {
            {
                let mut c = self
                    .shared
                    .control
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                c.running = false;
                self.shared.attention.store(true, Ordering::SeqCst);
                self.shared.control_cond.notify_all();
            }
            self.shared.wake();
            if let Some(handle) = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
                let _ = handle.join();
            }
            let mut st = self.shared.lock();
            st.drain(&self.shared, true);
        });
    }

    fn wake(&self) {
        self.shared.wake();
    }

    fn pause(&self, py: Python<'_>) {
        py.detach(|| self.shared.pause());
    }

    fn resume(&self) {
        self.shared.resume();
    }

    /// One pass on the caller's thread, then every transfer in flight completed.
    fn process(&self, py: Python<'_>) -> u32 {
        py.detach(|| {
            let mut st = self.shared.lock();
            let n = st.process_pass(&self.shared);
            st.drain(&self.shared, true);
            n
        })
    }

    #[getter]
    fn tid(&self) -> Option<u32> {
        let tid = self.shared.tid.load(Ordering::Acquire);
        (tid != 0
            && self
                .thread
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some())
        .then_some(tid)
    }

    fn set_poll_timeout_ns(&self, ns: u64) {
        self.shared.poll_limit_ns.store(ns, Ordering::Relaxed);
        self.shared.wake();
    }

    // --- queues --------------------------------------------------------------------------

    fn create_cq(
        &self,
        py: Python<'_>,
        qid: u16,
        base: u64,
        size: u32,
        vector: u16,
        interrupts_enabled: bool,
    ) -> PyResult<()> {
        let result = py.detach(|| {
            self.shared
                .lock()
                .create_cq(&self.shared, qid, base, size, vector, interrupts_enabled)
        });
        result.map_err(|e| dma_exception(py, e))
    }

    fn create_sq(&self, py: Python<'_>, qid: u16, base: u64, size: u32, cqid: u16) -> PyResult<()> {
        let result = py.detach(|| {
            self.shared
                .lock()
                .create_sq(&self.shared, qid, base, size, cqid)
        });
        result.map_err(|e| dma_exception(py, e))
    }

    fn delete_sq(&self, py: Python<'_>, qid: u16) {
        py.detach(|| self.shared.lock().delete_sq(&self.shared, qid));
    }

    fn delete_cq(&self, py: Python<'_>, qid: u16) {
        py.detach(|| self.shared.lock().delete_cq(&self.shared, qid));
    }

    fn set_doorbell_buffers(
        &self,
        py: Python<'_>,
        shadow_page: u64,
        eventidx_page: u64,
    ) -> PyResult<()> {
        let result = py.detach(|| {
            self.shared
                .lock()
                .set_doorbell_buffers(&self.shared, shadow_page, eventidx_page)
        });
        result.map_err(|e| dma_exception(py, e))
    }

    fn doorbell(&self, py: Python<'_>, qid: u16, is_cq: bool, value: u32) -> bool {
        py.detach(|| self.shared.doorbell(qid, is_cq, value))
    }

    fn abort(&self, py: Python<'_>, sqid: u16, cid: u16) -> bool {
        py.detach(|| self.shared.lock().abort(&self.shared, sqid, cid))
    }

    fn marked_aborts(&self, py: Python<'_>) -> usize {
        py.detach(|| self.shared.lock().marked_aborts())
    }

    fn enable(&self, py: Python<'_>) {
        py.detach(|| self.shared.lock().enabled = true);
        self.shared.wake();
    }

    fn halt(&self, py: Python<'_>) {
        py.detach(|| self.shared.lock().halted = true);
    }

    fn reset(&self, py: Python<'_>) {
        py.detach(|| self.shared.lock().reset(&self.shared));
    }

    fn pending_interrupt(&self, py: Python<'_>) -> bool {
        py.detach(|| self.shared.lock().pending_interrupt())
    }

    fn enable_notifications(&self, py: Python<'_>) -> bool {
        py.detach(|| self.shared.lock().enable_notifications(&self.shared))
    }

    fn suppress_notifications(&self, py: Python<'_>) {
        py.detach(|| self.shared.lock().suppress_notifications(&self.shared));
    }

    /// (qid, is_cq, head, tail, phase) of every queue (State::positions).
    fn positions(&self, py: Python<'_>) -> Vec<(u16, bool, u32, u32, u32)> {
        py.detach(|| self.shared.lock().positions(&self.shared))
    }

    fn restore_position(
        &self,
        py: Python<'_>,
        qid: u16,
        is_cq: bool,
        head: u32,
        tail: u32,
        phase: u32,
    ) -> bool {
        py.detach(|| {
            self.shared
                .lock()
                .restore_position(qid, is_cq, head, tail, phase)
        })
    }

    /// Keep the I/O journal (handover/journal.py) in `buffer`, a mapping the caller
    /// keeps alive for as long as the plane lives.
    fn set_journal(
        &self,
        py: Python<'_>,
        buffer: &Bound<'_, PyAny>,
        queues: usize,
    ) -> PyResult<()> {
        let (address, len) = buffer_address(buffer)?;
        let journal = crate::journal::Journal::new(address as *mut u8, len, queues)
            .ok_or_else(|| pyo3::exceptions::PyValueError::new_err("journal too short"))?;
        py.detach(|| self.shared.lock().journal = Some(journal));
        Ok(())
    }

    fn keep_doorbells(&self, py: Python<'_>, on: bool) {
        py.detach(|| self.shared.lock().keep_doorbells = on);
    }

    /// (qid, is_cq, size, head, tail) of every queue.
    fn queues(&self, py: Python<'_>) -> Vec<(u16, bool, u32, u32, u32)> {
        py.detach(|| self.shared.lock().queues())
    }

    // --- namespaces, memory, settings -----------------------------------------------------

    /// `store`: "file" (with the descriptors), "null", "rbd" (with the open
    /// `rbd_image_t`, which the backend keeps open while the namespace is attached), or
    /// "python".
    #[allow(clippy::too_many_arguments)]
    #[pyo3(signature = (nsid, store, fd, direct_fd, direct_align, base, block_device, backend_readonly, lba_shift, blocks, readonly, failure, passthrough, description, rbd_image=0))]
    fn attach_namespace(
        &self,
        py: Python<'_>,
        nsid: u32,
        store: &str,
        fd: i32,
        direct_fd: i32,
        direct_align: u64,
        base: u64,
        block_device: bool,
        backend_readonly: bool,
        lba_shift: u32,
        blocks: u64,
        readonly: bool,
        failure: Option<String>,
        passthrough: bool,
        description: String,
        rbd_image: usize,
    ) -> PyResult<()> {
        let store = match store {
            "rbd" => {
                crate::rbd::available().map_err(PyOSError::new_err)?;
                Store::Rbd(crate::rbd::RbdStore {
                    image: rbd_image,
                    readonly: backend_readonly,
                })
            }
            "file" => Store::File(FileStore {
                fd,
                direct_fd,
                direct_align: direct_align.max(1),
                base,
                block_device,
                readonly: backend_readonly,
                cached_reads: CachedReads::for_fd(fd, block_device),
            }),
            "null" => Store::Null,
            "python" => Store::Python,
            other => {
                return Err(pyo3::exceptions::PyValueError::new_err(format!(
                    "store {other:?}"
                )))
            }
        };
        let ns = Namespace {
            nsid,
            store,
            lba_shift,
            blocks,
            readonly,
            failure,
            passthrough,
            description,
        };
        py.detach(|| self.shared.lock().attach_namespace(ns));
        Ok(())
    }

    fn detach_namespace(&self, py: Python<'_>, nsid: u32) {
        py.detach(|| self.shared.lock().detach_namespace(nsid));
    }

    fn update_namespace(
        &self,
        py: Python<'_>,
        nsid: u32,
        blocks: u64,
        readonly: bool,
        failure: Option<String>,
    ) {
        py.detach(|| {
            self.shared
                .lock()
                .update_namespace(nsid, blocks, readonly, failure)
        });
    }

    /// The client's DMA table: (iova, size, buffer or None, readable, writable) each.
    fn set_memory(&self, py: Python<'_>, regions: Vec<RegionSpec<'_>>) -> PyResult<()> {
        let table = regions
            .into_iter()
            .map(region_from_spec)
            .collect::<PyResult<Vec<_>>>()?;
        py.detach(|| self.shared.lock().memory.set(table));
        Ok(())
    }

    /// One region added to the table (DMA_MAP).
    #[pyo3(signature = (iova, len, buffer, readable, writable))]
    fn map_region(
        &self,
        py: Python<'_>,
        iova: u64,
        len: u64,
        buffer: Option<Bound<'_, PyAny>>,
        readable: bool,
        writable: bool,
    ) -> PyResult<()> {
        let region = region_from_spec((iova, len, buffer, readable, writable))?;
        py.detach(|| self.shared.lock().memory.insert(region));
        Ok(())
    }

    /// The regions starting at these guest addresses removed (DMA_UNMAP).
    fn unmap_regions(&self, py: Python<'_>, iovas: Vec<u64>) {
        py.detach(|| self.shared.lock().memory.remove(&iovas));
    }

    #[pyo3(signature = (arbitration_burst, coalescing_threshold, coalescing_time, coalescing_disabled, write_cache))]
    fn configure(
        &self,
        py: Python<'_>,
        arbitration_burst: u32,
        coalescing_threshold: u32,
        coalescing_time: u32,
        coalescing_disabled: Vec<usize>,
        write_cache: bool,
    ) {
        let vectors = self.shared.routes.vectors();
        let mut disabled = vec![false; vectors];
        for v in coalescing_disabled {
            if v < vectors {
                disabled[v] = true;
            }
        }
        let settings = Settings {
            arbitration_burst,
            coalescing_threshold,
            coalescing_time,
            coalescing_disabled: disabled,
            write_cache,
        };
        py.detach(|| self.shared.lock().settings = settings);
    }

    // --- what the control side reads ------------------------------------------------------

    /// What happened, in order: ("failed", sqid, cid, status, nsid, lba), ("storage",
    /// nsid, gone, read_only, reason), ("doorbell", info), ("fatal", reason).
    fn take_events<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let events = self.shared.take_events();
        let list = PyList::empty(py);
        for event in events {
            let item = match event {
                Event::CommandFailed {
                    sqid,
                    cid,
                    status,
                    nsid,
                    lba,
                } => ("failed", sqid, cid, status, nsid, lba)
                    .into_pyobject(py)?
                    .into_any(),
                Event::StorageFailed {
                    nsid,
                    gone,
                    read_only,
                    reason,
                } => ("storage", nsid, gone, read_only, reason)
                    .into_pyobject(py)?
                    .into_any(),
                Event::InvalidDoorbell { info } => ("doorbell", info).into_pyobject(py)?.into_any(),
                Event::Fatal { reason } => ("fatal", reason).into_pyobject(py)?.into_any(),
            };
            list.append(item)?;
        }
        Ok(list)
    }

    /// The counters, read without stopping the thread.
    fn statistics<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let s = &self.shared.stats;
        let load = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
        let d = PyDict::new(py);
        let queues = PyList::empty(py);
        for (qid, q) in s.queues.iter().enumerate() {
            let commands: Vec<u64> = q.commands.iter().map(load).collect();
            if commands.iter().all(|c| *c == 0) {
                continue;
            }
            let bytes: Vec<u64> = q.bytes.iter().map(load).collect();
            let latency: Vec<u64> = q.latency.iter().map(load).collect();
            queues.append((
                qid,
                commands,
                bytes,
                load(&q.errors),
                latency,
                load(&q.latency_sum_ns),
            ))?;
        }
        d.set_item("queues", queues)?;
        d.set_item(
            "interrupts",
            s.interrupts.iter().map(load).collect::<Vec<u64>>(),
        )?;
        let now = plane::now_ns();
        let since = load(&s.parked_since);
        let parked = load(&s.parked_ns)
            + if since != 0 {
                now.saturating_sub(since)
            } else {
                0
            };
        let started = self.shared.started_ns.load(Ordering::Acquire);
        let total = if started != 0 {
            now.saturating_sub(started)
        } else {
            0
        };
        d.set_item("polling_ns", total.saturating_sub(parked))?;
        d.set_item("parked_ns", parked)?;
        d.set_item("parks", load(&s.parks))?;
        d.set_item("doorbell_traps", load(&s.doorbell_traps))?;
        d.set_item("direct_transfers", load(&s.direct_transfers))?;
        let c = &s.counters;
        d.set_item(
            "counters",
            (
                load(&c.host_read_commands),
                load(&c.host_write_commands),
                load(&c.bytes_read),
                load(&c.bytes_written),
                load(&c.media_errors),
                load(&c.host_errors),
            ),
        )?;
        Ok(d)
    }
}

/// The completion the native engines give a host error (media_errors.rs), for the test
/// that holds it to nvme/media_errors.py: (status, dnr, media, gone, read_only).
/// `store_size` is what the store says when asked, or `probe_errno` if asking fails.
#[pyfunction]
#[pyo3(signature = (errno, writing, past_end, block_device, store_size, probe_errno=None, network=false))]
fn classify_host_error(
    errno: i32,
    writing: bool,
    past_end: bool,
    block_device: bool,
    store_size: u64,
    probe_errno: Option<i32>,
    network: bool,
) -> (u16, bool, bool, bool, bool) {
    let f = crate::media_errors::classify_store(
        errno,
        writing,
        past_end,
        network,
        block_device,
        || match probe_errno {
            Some(e) => crate::media_errors::StoreSize::Failed(e),
            None => crate::media_errors::StoreSize::Bytes(store_size),
        },
    );
    (f.status, f.dnr, f.media, f.gone, f.read_only)
}

/// The Status Field with Do Not Retry where retrying cannot help (spec.rs), for the test
/// that holds it to nvme/spec.py with_dnr.
#[pyfunction]
fn status_with_dnr(status: u16) -> u16 {
    crate::spec::with_dnr(status)
}

/// One client's guarded guest memory (sigbus.rs): mappings it can truncate under us.
#[pyclass(name = "SigbusZone", frozen, module = "nvme_mdev._native")]
pub struct PyZone {
    inner: Arc<crate::sigbus::Zone>,
}

#[pymethods]
impl PyZone {
    #[new]
    fn new() -> PyResult<Self> {
        crate::sigbus::notifier().map_err(PyOSError::new_err)?;
        Ok(PyZone {
            inner: Arc::new(crate::sigbus::Zone::default()),
        })
    }

    /// Guard the whole mapping behind `mapping` (an mmap); returns its host address,
    /// the key for unguard().
    fn guard(&self, py: Python<'_>, mapping: &Bound<'_, PyAny>) -> PyResult<usize> {
        let (address, len) = buffer_address(mapping)?;
        py.detach(|| crate::sigbus::guard(address, len, &self.inner));
        Ok(address)
    }

    /// Stop guarding the mapping at `address` (before it is unmapped).
    fn unguard(&self, py: Python<'_>, address: usize) {
        py.detach(|| crate::sigbus::unguard(address));
    }

    /// How many of the zone's mappings have faulted (and are zeroes now).
    #[getter]
    fn faults(&self) -> u64 {
        self.inner.faults()
    }
}

impl Drop for PyZone {
    fn drop(&mut self) {
        crate::sigbus::unguard_zone(&self.inner);
    }
}

/// The eventfd the SIGBUS handler signals after each fault it contained (installs the
/// handler on first use).
#[pyfunction]
fn sigbus_notifier() -> PyResult<i32> {
    crate::sigbus::notifier().map_err(PyOSError::new_err)
}

/// A full memory barrier (`fence(SeqCst)`: MFENCE on x86-64), for the Python data plane.
#[pyfunction]
fn full_fence() {
    std::sync::atomic::fence(Ordering::SeqCst);
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(full_fence, m)?)?;
    m.add_function(wrap_pyfunction!(classify_host_error, m)?)?;
    m.add_function(wrap_pyfunction!(status_with_dnr, m)?)?;
    m.add_function(wrap_pyfunction!(sigbus_notifier, m)?)?;
    m.add_class::<PyZone>()?;
    m.add_class::<PyRoutes>()?;
    m.add_class::<PyPlane>()?;
    Ok(())
}
