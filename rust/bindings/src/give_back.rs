//! Freed memory goes back to the OS once the extension has been idle for a while.
//!
//! mimalloc keeps what a run frees for its purge delay (10 s here, see `tune_allocator`), but
//! only checks the delay inside allocator calls, so after a process's last call the cache would
//! stay resident (558 MB after a 250k-prompt prep). Handing it back as each long call returned
//! fixed that, but made the next call fault its whole working set in again, pages the kernel
//! zeroes. So a background thread, started by the first call, hands it back once no call has
//! run for [`IDLE`], and then parks until the next call ends.
//!
//! Forks: state is in atomics, so a child never inherits a held lock of ours; it has no copy
//! of the thread and starts its own. A fork while the thread is inside the allocator could
//! leave the child's allocator locked (mimalloc's locks are plain mutexes), so everything the
//! thread does in the allocator (setting up its heap, handing memory back) holds `IN_ALLOCATOR`,
//! which a pthread_atfork handler takes around `fork`. The thread never exits, because its
//! teardown would be allocator work outside that lock.
//!
//! The workers of `prefops_core::threads` are kept between calls, each with its own heap that
//! only it can hand back, so the thread also has every idle worker collect, under the same lock.

use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Once, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long the extension must be idle before its freed memory goes back.
pub const IDLE: Duration = Duration::from_secs(1);

/// Calls running now.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
/// When the last call ended (milliseconds since `epoch()`, at least 1), or 0 once its memory
/// has been handed back.
static ENDED_MS: AtomicU64 = AtomicU64::new(0);
/// Whether this process has started its thread (cleared in a forked child).
static STARTED: AtomicBool = AtomicBool::new(false);
/// The thread's handle, to wake it; null until it has set itself up (and in a forked child).
static WAKER: AtomicPtr<Thread> = AtomicPtr::new(std::ptr::null_mut());
/// Held while the thread is inside the allocator, and by `fork` (see the module docs).
static mut IN_ALLOCATOR: libc::pthread_mutex_t = libc::PTHREAD_MUTEX_INITIALIZER;

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
        // Before STARTED, so that a child forked once it is set always gets it cleared.
        guard_forks();
        if !STARTED.swap(true, SeqCst) {
            start_thread();
            return;
        }
        // A thread that has not set up its waker yet reads ENDED_MS after doing so (SeqCst:
        // this store comes before that load), so no end is missed.
        let waker = WAKER.load(SeqCst);
        if !waker.is_null() {
            // SAFETY: set once per process from a leaked Box, never freed.
            unsafe { (*waker).unpark() };
        }
    }
}

fn start_thread() {
    if std::thread::Builder::new().name("prefops-give-back".into()).spawn(hand_back_when_idle).is_err() {
        // Without the thread, memory stays with the allocator, as it would without us.
        STARTED.store(false, SeqCst);
    }
}

fn hand_back_when_idle() {
    // mi_collect works through the calling thread's heap: one this thread has not used is not
    // set up, and the call would return at once without purging anything. Setting it up, and
    // the waker's allocation, happen under the fork guard.
    with_fork_guard(|| {
        // SAFETY: sets up this thread's allocator state; no preconditions.
        unsafe { libmimalloc_sys::mi_thread_init() };
        WAKER.store(Box::into_raw(Box::new(std::thread::current())), SeqCst);
    });
    loop {
        let ended = ENDED_MS.load(SeqCst);
        if ended == 0 {
            // Nothing to hand back until a call ends; it unparks us (a wake-up that came
            // before this park makes it return at once).
            std::thread::park();
            continue;
        }
        let idle = Duration::from_millis(now_ms().saturating_sub(ended));
        if idle < IDLE || RUNNING.load(SeqCst) > 0 {
            std::thread::sleep(IDLE.saturating_sub(idle).max(IDLE / 4));
            continue;
        }
        // Another call may end meanwhile: then its end time stays, and is handled next round.
        if ENDED_MS.compare_exchange(ended, 0, SeqCst, SeqCst).is_ok() {
            // The kept worker threads first: what a call's workers allocated went back into
            // their own heaps, which only they can hand back.
            prefops_core::threads::on_idle_threads(collect);
            collect();
        }
    }
}

/// Hand the calling thread's freed memory back to the OS.
fn collect() {
    // SAFETY: mi_collect may be called from any thread at any time.
    with_fork_guard(|| unsafe { libmimalloc_sys::mi_collect(true) });
}

fn with_fork_guard(work: impl FnOnce()) {
    // SAFETY: a statically initialised mutex, locked and unlocked on this thread.
    unsafe { libc::pthread_mutex_lock(&raw mut IN_ALLOCATOR) };
    work();
    // SAFETY: locked above by this thread.
    unsafe { libc::pthread_mutex_unlock(&raw mut IN_ALLOCATOR) };
}

fn guard_forks() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        extern "C" fn before() {
            // SAFETY: see with_fork_guard; the forking thread locks it here and unlocks it
            // right after the fork, in the parent and (as the same thread) in the child.
            unsafe { libc::pthread_mutex_lock(&raw mut IN_ALLOCATOR) };
        }
        extern "C" fn in_parent() {
            // SAFETY: locked by this thread in `before`.
            unsafe { libc::pthread_mutex_unlock(&raw mut IN_ALLOCATOR) };
        }
        extern "C" fn in_child() {
            // The thread was not copied: the child's first call starts its own. (The parent's
            // waker is left allocated, as it is in the parent.)
            WAKER.store(std::ptr::null_mut(), SeqCst);
            STARTED.store(false, SeqCst);
            // SAFETY: locked by this thread in `before`.
            unsafe { libc::pthread_mutex_unlock(&raw mut IN_ALLOCATOR) };
        }
        // SAFETY: registers plain functions that only touch atomics and IN_ALLOCATOR.
        unsafe { libc::pthread_atfork(Some(before), Some(in_parent), Some(in_child)) };
    });
}
