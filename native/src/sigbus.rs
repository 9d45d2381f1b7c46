//! Containment of SIGBUS from guest memory.
//!
//! A client maps its memory with DMA_MAP and may truncate the file behind it later. The
//! next access to a page past the new end raises SIGBUS, whose default action ends the
//! whole daemon, and with it every other VM's disk. Seals cannot rule that out for every
//! backend (hugetlbfs files cannot be sealed), so the process catches SIGBUS: a fault
//! inside a guarded mapping replaces that mapping with anonymous memory, so the access
//! completes (on zeroes), counts a fault in the mapping's zone and wakes the watcher, which
//! makes that client's controller fatal. Any other SIGBUS goes on to whatever handled it
//! before (Python's faulthandler, or the default action: the process ends as it would
//! have without us).
//!
//! The handler may run on any thread at any moment, so it takes no lock and allocates
//! nothing: it reads an immutable table published through an atomic pointer. A writer
//! publishes a new table, then waits until no handler is inside the old one before it
//! frees it (the handler announces itself in `READERS` before it loads the pointer).

use std::io;
use std::ptr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Once, OnceLock};

/// The guarded mappings of one client's memory table, and how many of them have faulted
/// (been replaced) so far: each one is news to the watcher.
#[derive(Default, Debug)]
pub struct Zone {
    faults: AtomicU64,
}

impl Zone {
    pub fn faults(&self) -> u64 {
        self.faults.load(SeqCst)
    }
}

struct Guarded {
    start: usize,
    end: usize,
    zone: Arc<Zone>,
}

/// Sorted by start; ranges do not overlap (they are live mappings of this process).
type Table = Vec<Guarded>;

static TABLE: AtomicPtr<Table> = AtomicPtr::new(ptr::null_mut());
static READERS: AtomicUsize = AtomicUsize::new(0);
static WRITER: Mutex<()> = Mutex::new(());
static NOTIFIER: AtomicI32 = AtomicI32::new(-1);
static INSTALL: Once = Once::new();
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

/// Install the handler (once per process) and return the eventfd that it signals after
/// each fault it contained.
pub fn notifier() -> io::Result<i32> {
    let mut failure = None;
    INSTALL.call_once(|| {
        if let Err(err) = install() {
            failure = Some(err);
        }
    });
    if let Some(err) = failure {
        return Err(err);
    }
    match NOTIFIER.load(SeqCst) {
        -1 => Err(io::Error::other(
            "the SIGBUS handler could not be installed",
        )),
        fd => Ok(fd),
    }
}

fn install() -> io::Result<()> {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; sa_sigaction
    // is set to a handler with the SA_SIGINFO signature, and `previous` is written by
    // the kernel before we read it.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_sigbus as *const () as libc::sighandler_t;
        action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
        libc::sigemptyset(&mut action.sa_mask);
        let mut previous: libc::sigaction = std::mem::zeroed();
        if libc::sigaction(libc::SIGBUS, &action, &mut previous) != 0 {
            let err = io::Error::last_os_error();
            libc::close(fd);
            return Err(err);
        }
        let _ = PREVIOUS.set(previous);
    }
    NOTIFIER.store(fd, SeqCst);
    Ok(())
}

/// Guard [start, start + len): a mapping of this process that a client can truncate.
pub fn guard(start: usize, len: usize, zone: &Arc<Zone>) {
    update(|table| {
        let at = table.partition_point(|g| g.start < start);
        table.insert(
            at,
            Guarded {
                start,
                end: start + len,
                zone: zone.clone(),
            },
        );
    });
}

/// Stop guarding the mapping that starts at `start` (before it is unmapped).
pub fn unguard(start: usize) {
    update(|table| table.retain(|g| g.start != start));
}

/// Stop guarding every mapping of `zone`.
pub fn unguard_zone(zone: &Arc<Zone>) {
    update(|table| table.retain(|g| !Arc::ptr_eq(&g.zone, zone)));
}

fn update(change: impl FnOnce(&mut Table)) {
    let _writer = WRITER
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    let old = TABLE.load(SeqCst);
    // SAFETY: only writers (serialised by WRITER) replace or free the table, so `old`
    // stays valid while we copy it.
    let mut table: Table = match unsafe { old.as_ref() } {
        Some(current) => current
            .iter()
            .map(|g| Guarded {
                start: g.start,
                end: g.end,
                zone: g.zone.clone(),
            })
            .collect(),
        None => Vec::new(),
    };
    change(&mut table);
    TABLE.store(Box::into_raw(Box::new(table)), SeqCst);
    // A handler that loaded `old` incremented READERS before it loaded the pointer, so
    // it is counted here until it is done with `old`.
    while READERS.load(SeqCst) != 0 {
        std::thread::yield_now();
    }
    if !old.is_null() {
        // SAFETY: `old` came from Box::into_raw, is no longer published, and no handler
        // is reading it (above).
        drop(unsafe { Box::from_raw(old) });
    }
}

/// What the handler does with a faulting address: Some(true) when it was a guarded
/// mapping, now replaced; Some(false) when it was guarded but could not be replaced;
/// None when it is not ours. Async-signal-safe: atomics, a binary search, mmap.
fn contain(addr: usize) -> Option<bool> {
    let table = TABLE.load(SeqCst);
    // SAFETY: a published table is freed only when READERS is 0, and our caller holds
    // a count in READERS across this call.
    let table = unsafe { table.as_ref() }?;
    let at = table.partition_point(|g| g.start <= addr);
    let guarded = table[..at].last().filter(|g| addr < g.end)?;
    // SAFETY: the range is a live mapping of this process that only guest-memory code
    // uses; MAP_FIXED replaces it in one step with private zero pages of the same size,
    // so no other object's memory is touched and every pointer into it stays valid.
    let replaced = unsafe {
        libc::mmap(
            guarded.start as *mut libc::c_void,
            guarded.end - guarded.start,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    if replaced == libc::MAP_FAILED {
        return Some(false);
    }
    guarded.zone.faults.fetch_add(1, SeqCst);
    Some(true)
}

extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: the kernel passes a valid siginfo_t to an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // si_code <= 0: sent by a process (kill, tgkill), not a fault; the address means nothing.
    if code > 0 {
        READERS.fetch_add(1, SeqCst);
        let contained = contain(addr);
        READERS.fetch_sub(1, SeqCst);
        if contained == Some(true) {
            let one: u64 = 1;
            // SAFETY: write(2) is async-signal-safe; the eventfd lives as long as the
            // process. If it fails the watcher misses a wake-up, not memory safety.
            unsafe {
                libc::write(
                    NOTIFIER.load(SeqCst),
                    &one as *const u64 as *const libc::c_void,
                    8,
                )
            };
            return; // the faulting access runs again, on the replacement
        }
    }
    chain(signal, info, context);
}

/// Hand the signal to whoever had it before us.
fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    let handler = PREVIOUS.get().map_or(libc::SIG_DFL, |p| p.sa_sigaction);
    let flags = PREVIOUS.get().map_or(0, |p| p.sa_flags);
    if handler == libc::SIG_DFL || handler == libc::SIG_IGN {
        // SAFETY: restoring the default disposition; returning re-runs the faulting
        // access (or, for a sent signal, it is raised again), which the default
        // action then ends the process for, as it would have without this handler.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = libc::SIG_DFL;
            libc::sigaction(libc::SIGBUS, &action, ptr::null_mut());
            if code_is_sent(info) {
                libc::raise(libc::SIGBUS);
            }
        }
    } else if flags & libc::SA_SIGINFO != 0 {
        // SAFETY: the previous handler was installed with this signature (SA_SIGINFO).
        let previous: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
            unsafe { std::mem::transmute(handler) };
        previous(signal, info, context);
    } else {
        // SAFETY: without SA_SIGINFO the previous handler takes the signal number only.
        let previous: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(handler) };
        previous(signal);
    }
}

fn code_is_sent(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: as in on_sigbus.
    unsafe { (*info).si_code <= 0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::fd::AsRawFd;

    /// Map a file, truncate it, touch the lost page: the guard replaces the mapping,
    /// the access reads zeroes, the zone counts the fault and the notifier counts one.
    #[test]
    fn a_truncated_guarded_mapping_becomes_zeroes_and_counts_in_its_zone() {
        let fd = notifier().unwrap();
        let mut file = tempfile();
        file.write_all(&[0xa5; 8192]).unwrap();
        // SAFETY: a fresh shared mapping of 8 KiB of our own file.
        let base = unsafe {
            libc::mmap(
                ptr::null_mut(),
                8192,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        } as *mut u8;
        assert_ne!(base as *mut libc::c_void, libc::MAP_FAILED);
        let zone = Arc::new(Zone::default());
        guard(base as usize, 8192, &zone);
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { ptr::read_volatile(base.add(4096)) }, 0xa5);
        file.set_len(0).unwrap();
        // SAFETY: inside the mapping; the page is gone, the guard catches the fault.
        let after = unsafe { ptr::read_volatile(base.add(4096)) };
        assert_eq!(after, 0);
        assert_eq!(zone.faults(), 1);
        let mut count = 0u64;
        // SAFETY: reading 8 bytes from our eventfd into a u64.
        let n = unsafe { libc::read(fd, &mut count as *mut u64 as *mut libc::c_void, 8) };
        assert_eq!(n, 8);
        assert!(count >= 1);
        unguard(base as usize);
        // SAFETY: our mapping (now anonymous), unmapped once.
        unsafe { libc::munmap(base as *mut libc::c_void, 8192) };
    }

    #[test]
    fn unguard_zone_forgets_every_mapping_of_the_zone() {
        let zone = Arc::new(Zone::default());
        let other = Arc::new(Zone::default());
        guard(0x1000_0000, 0x1000, &zone);
        guard(0x2000_0000, 0x1000, &zone);
        guard(0x3000_0000, 0x1000, &other);
        unguard_zone(&zone);
        let starts = guarded_starts();
        assert!(!starts.contains(&0x1000_0000) && !starts.contains(&0x2000_0000));
        assert!(starts.contains(&0x3000_0000));
        unguard(0x3000_0000);
    }

    fn guarded_starts() -> Vec<usize> {
        let _writer = WRITER.lock().unwrap();
        // SAFETY: holding WRITER: nobody replaces or frees the table meanwhile.
        unsafe { TABLE.load(SeqCst).as_ref() }
            .map(|table| table.iter().map(|g| g.start).collect())
            .unwrap_or_default()
    }

    fn tempfile() -> std::fs::File {
        let path = std::env::temp_dir().join(format!("sigbus-test-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }
}
