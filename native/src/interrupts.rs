//! MSI-X delivery (pci/msix.py decides where each vector goes; this sends it): a route
//! per vector, the client's eventfd or none (masked, or no eventfd yet), and a pending
//! bit for a vector that fired while it had none. One lock, so that a route change and
//! a signal never cross: a vector that becomes deliverable while pending fires once.

use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

struct Routes {
    fds: Vec<RawFd>,
    pending: Vec<bool>,
}

pub struct VectorRoutes {
    routes: Mutex<Routes>,
    /// MSI-X is on (else completions are signalled on INTx, by the control side)
    enabled: AtomicBool,
}

impl VectorRoutes {
    pub fn new(vectors: usize) -> VectorRoutes {
        VectorRoutes {
            routes: Mutex::new(Routes {
                fds: vec![-1; vectors],
                pending: vec![false; vectors],
            }),
            enabled: AtomicBool::new(false),
        }
    }

    pub fn vectors(&self) -> usize {
        self.lock().fds.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Routes> {
        self.routes.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Send `vector` to its eventfd, or mark it pending if it has none.
    pub fn signal(&self, vector: usize) {
        let mut r = self.lock();
        if vector >= r.fds.len() {
            return;
        }
        let fd = r.fds[vector];
        if fd >= 0 {
            eventfd_write(fd);
        } else {
            r.pending[vector] = true;
        }
    }

    /// Where `vector` goes from now on (-1: nowhere); if it is pending and now has an
    /// eventfd, it fires once and the pending bit clears.
    pub fn route(&self, vector: usize, fd: RawFd) {
        let mut r = self.lock();
        if vector >= r.fds.len() {
            return;
        }
        r.fds[vector] = fd;
        if fd >= 0 && r.pending[vector] {
            r.pending[vector] = false;
            eventfd_write(fd);
        }
    }

    pub fn pending(&self, vector: usize) -> bool {
        self.lock().pending.get(vector).copied().unwrap_or(false)
    }

    pub fn clear_pending(&self) {
        self.lock().pending.iter_mut().for_each(|p| *p = false);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Acquire)
    }

    pub fn set_enabled(&self, on: bool) {
        self.enabled.store(on, Ordering::Release);
    }
}

fn eventfd_write(fd: RawFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes we own to a descriptor the client gave for this vector
    // (checked to be an eventfd when it arrived); a failure is the client's problem,
    // and the guest sees a lost interrupt, which its driver's timeout handles.
    let _ = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
}
