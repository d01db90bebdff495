//! Freed memory goes back to the OS once the extension has been idle for a while.
//!
//! mimalloc keeps what a run frees for its purge delay (10 s here, see `tune_allocator`), but
//! only checks the delay inside allocator calls, so after a process's last call the cache would
//! stay resident (558 MB after a 250k-prompt prep). Handing it back as each long call returned
//! fixed that, but made the next call fault its whole working set in again, pages the kernel
//! zeroes. So a background thread hands it back once no call has run for [`IDLE`]; the thread
//! exits when there is nothing left to hand back.
//!
//! State is in atomics, so a fork never inherits a held lock; a child has no copy of the thread
//! and starts its own. A fork while the thread is inside the allocator could leave the child's
//! allocator locked, so a pthread_atfork handler makes `fork` wait until that is done.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Once, OnceLock};
use std::time::{Duration, Instant};

/// How long the extension must be idle before its freed memory goes back.
pub const IDLE: Duration = Duration::from_secs(1);

/// Calls running now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// When the last call ended (milliseconds since `epoch()`, at least 1), or 0 once its memory
/// has been handed back.
static ENDED_MS: AtomicU64 = AtomicU64::new(0);
/// The process whose thread is handing memory back, or 0 when no thread is.
static THREAD_OF: AtomicU32 = AtomicU32::new(0);
/// Held while the allocator hands memory back, and by `fork` (see the module docs).
static mut IN_COLLECT: libc::pthread_mutex_t = libc::PTHREAD_MUTEX_INITIALIZER;

fn epoch() -> Instant {
    static START: OnceLock<Instant> = OnceLock::new();
    *START.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    epoch().elapsed().as_millis() as u64 + 1
}

/// Marks a call as running until dropped.
pub struct Call(());

pub fn call() -> Call {
    RUNNING.fetch_add(1, SeqCst);
    Call(())
}

impl Drop for Call {
    fn drop(&mut self) {
        ENDED_MS.store(now_ms(), SeqCst);
        RUNNING.fetch_sub(1, SeqCst);
        start_thread();
    }
}

/// Start the hand-back thread unless this process has one running.
fn start_thread() {
    let pid = std::process::id();
    let held = THREAD_OF.load(SeqCst);
    if held == pid || THREAD_OF.compare_exchange(held, pid, SeqCst, SeqCst).is_err() {
        return;
    }
    guard_forks();
    if std::thread::Builder::new().name("prefops-give-back".into()).spawn(hand_back_when_idle).is_err() {
        // Without the thread, memory stays with the allocator, as it would without us.
        THREAD_OF.store(0, SeqCst);
    }
}

fn hand_back_when_idle() {
    // mi_collect works through the calling thread's heap: one this thread has not used is not
    // set up, and the call would return at once without purging anything.
    // SAFETY: sets up this thread's allocator state; no preconditions.
    unsafe { libmimalloc_sys::mi_thread_init() };
    let pid = std::process::id();
    loop {
        let ended = ENDED_MS.load(SeqCst);
        if ended == 0 {
            // Nothing to hand back: stop, unless a call ended while stopping, whose thread
            // start saw this one still running.
            THREAD_OF.store(0, SeqCst);
            if ENDED_MS.load(SeqCst) == 0 || THREAD_OF.compare_exchange(0, pid, SeqCst, SeqCst).is_err() {
                return;
            }
            continue;
        }
        let idle = Duration::from_millis(now_ms().saturating_sub(ended));
        if idle < IDLE || RUNNING.load(SeqCst) > 0 {
            std::thread::sleep(IDLE.saturating_sub(idle).max(IDLE / 4));
            continue;
        }
        // Another call may end meanwhile: then its end time stays, and is handled next round.
        if ENDED_MS.compare_exchange(ended, 0, SeqCst, SeqCst).is_ok() {
            collect();
        }
    }
}

fn collect() {
    // SAFETY: a statically initialised mutex, locked and unlocked on this thread; mi_collect
    // may be called from any thread at any time.
    unsafe {
        libc::pthread_mutex_lock(&raw mut IN_COLLECT);
        libmimalloc_sys::mi_collect(true);
        libc::pthread_mutex_unlock(&raw mut IN_COLLECT);
    }
}

fn guard_forks() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        extern "C" fn before() {
            // SAFETY: see collect; the forking thread locks it here and unlocks it right after
            // the fork, in the parent and (as the same thread) in the child.
            unsafe { libc::pthread_mutex_lock(&raw mut IN_COLLECT) };
        }
        extern "C" fn after() {
            // SAFETY: locked by this thread in `before`.
            unsafe { libc::pthread_mutex_unlock(&raw mut IN_COLLECT) };
        }
        // SAFETY: registers plain functions that only lock and unlock IN_COLLECT.
        unsafe { libc::pthread_atfork(Some(before), Some(after), Some(after)) };
    });
}
