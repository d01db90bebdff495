//! Scoped threads that outlive the scope: [`scope`] works like `std::thread::scope` (every
//! spawned closure runs at once on a thread of its own and may borrow from the caller), but a
//! closure runs on a thread left idle by an earlier scope when there is one, and its thread
//! waits for the next closure afterwards instead of exiting.
//!
//! Why: a thread's allocator heap lives as long as the thread. With new threads for every
//! call, what a call's threads allocated was freed into the heaps of threads that had exited,
//! and the next call's new threads took fresh pages from the OS, which the kernel zeroes (on
//! the 2-core VM of the benchmarks, 2-5 ms per 2 MiB huge page, the host's faults included). A
//! 1M-pair reward augmentation on 2 threads faulted in 13-41 huge pages per call in steady
//! state and took 0.155-0.159 s; on threads kept between calls, 0.064-0.070 s.
//!
//! Forks: the threads are not copied into a child, so the set of idle threads belongs to the
//! process that made it (its pid), and a child starts a set of its own without touching its
//! parent's (whose locks a parent thread may have held at the fork).

use std::any::Any;
use std::marker::PhantomData;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicPtr, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, Once};

/// A spawned closure, boxed for a worker; it tells the worker which scope to report to once
/// it is back among the idle.
type Job = Box<dyn FnOnce() -> Arc<ScopeState> + Send + 'static>;
type Panic = Box<dyn Any + Send + 'static>;

/// A lock whose data stays valid if a holder panicked (nothing here panics while holding one,
/// and every update is a single assignment).
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a kept thread is to do next: a closure, and a request to tidy its own state (see
/// [`on_idle_threads`]), which it takes while staying among the idle.
#[derive(Default)]
struct Orders {
    job: Option<Job>,
    tidy: Option<fn()>,
}

struct Worker {
    orders: Mutex<Orders>,
    wake: Condvar,
}

/// The threads of one process, waiting for work, and the tidying requests still running.
struct Pool {
    pid: u32,
    idle: Mutex<Vec<Arc<Worker>>>,
    tidying: Mutex<usize>,
    tidied: Condvar,
}

static POOL: AtomicPtr<Pool> = AtomicPtr::new(std::ptr::null_mut());

/// This process's pool, made on first use (a forked child makes its own: see the module docs).
/// Pools are leaked: a process has one, or one per fork generation.
fn pool() -> &'static Pool {
    forget_pool_in_forked_children();
    let pid = std::process::id();
    loop {
        let current = POOL.load(Ordering::Acquire);
        if let Some(p) = existing(current, pid) {
            return p;
        }
        let fresh = Box::into_raw(Box::new(Pool {
            pid,
            idle: Mutex::new(Vec::new()),
            tidying: Mutex::new(0),
            tidied: Condvar::new(),
        }));
        if POOL.compare_exchange(current, fresh, Ordering::AcqRel, Ordering::Acquire).is_err() {
            // Another thread installed one first: use that.
            // SAFETY: `fresh` was never shared.
            drop(unsafe { Box::from_raw(fresh) });
        }
    }
}

/// The pool at `ptr` if this process made it.
fn existing(ptr: *mut Pool, pid: u32) -> Option<&'static Pool> {
    // SAFETY: POOL only ever holds null or a leaked, never freed Box<Pool>.
    unsafe { ptr.as_ref() }.filter(|p| p.pid == pid)
}

/// A child forgets its parent's pool as it starts. The pid check alone would take the pool of
/// a process whose pid the child was given after that process exited (a grandchild can be).
fn forget_pool_in_forked_children() {
    static INSTALL: Once = Once::new();
    INSTALL.call_once(|| {
        extern "C" fn in_child() {
            POOL.store(std::ptr::null_mut(), Ordering::Release);
        }
        // SAFETY: registers a plain function that only stores to an atomic.
        unsafe { libc::pthread_atfork(None, None, Some(in_child)) };
    });
}

impl Pool {
    /// Run `job` on an idle thread, or on a new one when none is idle.
    fn run(&'static self, job: Job) -> std::io::Result<()> {
        let idle = lock(&self.idle).pop();
        match idle {
            Some(worker) => {
                lock(&worker.orders).job = Some(job);
                worker.wake.notify_one();
            }
            None => {
                let orders = Orders { job: Some(job), tidy: None };
                let worker = Arc::new(Worker { orders: Mutex::new(orders), wake: Condvar::new() });
                std::thread::Builder::new().name("prefops-worker".into()).spawn(move || self.serve(worker))?;
            }
        }
        Ok(())
    }

    /// A worker's life: run its closure, go back among the idle, then tell the closure's scope
    /// (so that a scope started next finds this thread idle), and wait. Workers never exit: a
    /// thread's teardown is allocator work, which a fork from another thread at that moment
    /// could leave half done in the child (see the bindings' give_back). A process keeps as
    /// many as it has ever had closures running at once, parked.
    fn serve(&'static self, me: Arc<Worker>) {
        loop {
            let (job, tidy) = {
                let mut orders = lock(&me.orders);
                while orders.job.is_none() && orders.tidy.is_none() {
                    orders = me.wake.wait(orders).unwrap_or_else(|e| e.into_inner());
                }
                // Tidy first: a closure that came meanwhile waits for it.
                match orders.tidy.take() {
                    Some(tidy) => (None, Some(tidy)),
                    None => (orders.job.take(), None),
                }
            };
            if let Some(tidy) = tidy {
                let _ = catch_unwind(tidy);
                let mut tidying = lock(&self.tidying);
                *tidying -= 1;
                if *tidying == 0 {
                    self.tidied.notify_all();
                }
            }
            if let Some(job) = job {
                let scope = job();
                lock(&self.idle).push(me.clone());
                scope.finish_one();
            }
        }
    }
}

/// Run `work` once on every kept thread that is idle now, and return when all have: for
/// state that each thread holds for itself, such as its allocator heap's cache of freed memory.
/// The threads stay available meanwhile (a closure given to one runs once it has tidied), and
/// this allocates nothing, so it may run where allocating is unwelcome (a process that forks).
pub fn on_idle_threads(work: fn()) {
    let Some(pool) = existing(POOL.load(Ordering::Acquire), std::process::id()) else {
        return; // no threads in this process yet
    };
    {
        let idle = lock(&pool.idle);
        for worker in idle.iter() {
            let mut orders = lock(&worker.orders);
            if orders.tidy.is_none() {
                orders.tidy = Some(work);
                *lock(&pool.tidying) += 1;
                worker.wake.notify_one();
            }
        }
    }
    let mut tidying = lock(&pool.tidying);
    while *tidying > 0 {
        tidying = pool.tidied.wait(tidying).unwrap_or_else(|e| e.into_inner());
    }
}

/// Closures of a scope still running, and the first panic no handle was joined for.
#[derive(Default)]
struct ScopeState {
    running: Mutex<usize>,
    all_done: Condvar,
    panic: Mutex<Option<Panic>>,
}

impl ScopeState {
    fn finish_one(&self) {
        let mut running = lock(&self.running);
        *running -= 1;
        if *running == 0 {
            self.all_done.notify_all();
        }
    }
}

/// Spawns closures that may borrow anything that outlives the [`scope`] call.
pub struct Scope<'env> {
    state: Arc<ScopeState>,
    /// Invariant in 'env, as std's scope is.
    _env: PhantomData<&'env mut &'env ()>,
}

/// A closure's result: set once it has run, taken by [`Handle::join`].
struct Packet<T> {
    result: Mutex<Option<std::thread::Result<T>>>,
    done: Condvar,
    scope: Arc<ScopeState>,
}

impl<T> Drop for Packet<T> {
    fn drop(&mut self) {
        let result = self.result.get_mut().unwrap_or_else(|e| e.into_inner()).take();
        let scope = &self.scope;
        // A panic nobody joined for makes the scope panic, as std's does. A value or payload
        // whose drop panics aborts, as in std: unwinding here would skip telling the scope.
        let dropped = catch_unwind(AssertUnwindSafe(move || match result {
            Some(Err(payload)) => {
                lock(&scope.panic).get_or_insert(payload);
            }
            other => drop(other),
        }));
        if dropped.is_err() {
            eprintln!("prefops: a worker thread's result panicked on drop; aborting");
            std::process::abort();
        }
    }
}

/// Waits for one spawned closure.
pub struct Handle<'scope, T> {
    packet: Arc<Packet<T>>,
    _scope: PhantomData<&'scope ()>,
}

impl<T> Handle<'_, T> {
    /// The closure's value, or the payload of its panic.
    pub fn join(self) -> std::thread::Result<T> {
        let mut result = lock(&self.packet.result);
        loop {
            if let Some(r) = result.take() {
                return r;
            }
            result = self.packet.done.wait(result).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl<'env> Scope<'env> {
    /// Run `f` now on a thread of its own (a kept one when idle).
    pub fn spawn<'scope, F, T>(&'scope self, f: F) -> Handle<'scope, T>
    where
        F: FnOnce() -> T + Send + 'env,
        T: Send + 'env,
    {
        let packet = Arc::new(Packet { result: Mutex::new(None), done: Condvar::new(), scope: self.state.clone() });
        *lock(&self.state.running) += 1;
        let (ours, state) = (packet.clone(), self.state.clone());
        let job = move || {
            let result = catch_unwind(AssertUnwindSafe(f));
            *lock(&ours.result) = Some(result);
            ours.done.notify_all();
            // Our reference goes before the scope is told: if it was the last (no handle), the
            // value or panic is dropped or recorded while what it borrows is still alive.
            drop(ours);
            state
        };
        let job: Box<dyn FnOnce() -> Arc<ScopeState> + Send + 'env> = Box::new(job);
        // SAFETY: `scope` does not return (nor unwind) before every job it spawned has run to
        // the end, including the drops of everything the job holds that may borrow from 'env
        // (see above), so nothing it borrows dies while it runs.
        let job: Job = unsafe { std::mem::transmute::<Box<dyn FnOnce() -> Arc<ScopeState> + Send + 'env>, Job>(job) };
        if let Err(e) = pool().run(job) {
            // The job was dropped unrun: it no longer counts.
            self.state.finish_one();
            panic!("failed to spawn a worker thread: {e}");
        }
        Handle { packet, _scope: PhantomData }
    }
}

/// `std::thread::scope` on kept threads (see the module docs). Returns once every spawned
/// closure has finished; panics if one panicked and its handle was not joined, or if `f` did.
pub fn scope<'env, R>(f: impl FnOnce(&Scope<'env>) -> R) -> R {
    let scope = Scope { state: Arc::new(ScopeState::default()), _env: PhantomData };
    let result = catch_unwind(AssertUnwindSafe(|| f(&scope)));
    let mut running = lock(&scope.state.running);
    while *running > 0 {
        running = scope.state.all_done.wait(running).unwrap_or_else(|e| e.into_inner());
    }
    drop(running);
    let unjoined = lock(&scope.state.panic).take();
    match (result, unjoined) {
        (Err(payload), _) | (Ok(_), Some(payload)) => resume_unwind(payload),
        (Ok(r), None) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::Barrier;
    use std::time::Duration;

    #[test]
    fn closures_run_at_once_and_borrow_from_the_caller() {
        // Each closure waits for all the others: this finishes only if all run concurrently.
        let barrier = Barrier::new(6);
        let mut sums = [0u64; 6];
        scope(|s| {
            for (i, sum) in sums.iter_mut().enumerate() {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    *sum = (0..=i as u64).sum();
                });
            }
        });
        assert_eq!(sums, [0, 1, 3, 6, 10, 15]);
        let values = scope(|s| {
            let handles: Vec<_> = (0..4).map(|i| s.spawn(move || i * 10)).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        assert_eq!(values, [0, 10, 20, 30]);
    }

    #[test]
    fn threads_are_kept_between_scopes() {
        // Other tests share the pool and may take idle threads, so count over many scopes:
        // with new threads every time there would be 2 per scope.
        let mut ids = HashSet::new();
        for _ in 0..20 {
            let barrier = Barrier::new(2);
            scope(|s| {
                let handles: Vec<_> = (0..2)
                    .map(|_| {
                        s.spawn(|| {
                            barrier.wait();
                            std::thread::current().id()
                        })
                    })
                    .collect();
                ids.extend(handles.into_iter().map(|h| h.join().unwrap()));
            });
        }
        assert!(ids.len() < 20, "{} threads for 20 scopes of 2", ids.len());
    }

    #[test]
    fn work_runs_on_each_idle_thread() {
        thread_local! {
            static TIDIED: std::cell::Cell<u32> = const { std::cell::Cell::new(0) };
        }
        fn tidy() {
            TIDIED.with(|t| t.set(t.get() + 1));
        }
        let barrier = Barrier::new(3);
        scope(|s| {
            for _ in 0..3 {
                s.spawn(|| barrier.wait());
            }
        });
        // At least the three threads just used are idle (other tests may add or take some).
        on_idle_threads(tidy);
        let barrier = Barrier::new(3);
        let tidied = scope(|s| {
            let handles: Vec<_> = (0..3)
                .map(|_| {
                    s.spawn(|| {
                        barrier.wait();
                        TIDIED.with(|t| t.get())
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect::<Vec<_>>()
        });
        assert!(tidied.iter().any(|&t| t > 0), "{tidied:?}");
        on_idle_threads(tidy); // and again, with nothing left over from the first
    }

    #[test]
    fn a_forked_child_runs_scopes_on_threads_of_its_own() {
        // The parent has kept threads (idle now); the child has none of them, and a scope there
        // must start its own instead of handing closures to threads that do not exist. A
        // grandchild too. A hang is killed by the alarm and fails the test.
        assert_eq!(scope(|s| s.spawn(|| 1).join().unwrap()), 1);
        fn in_child() -> i32 {
            // SAFETY: sets a timer in this (single-threaded) child.
            unsafe { libc::alarm(20) };
            let sums: Vec<u64> =
                scope(|s| (0..3u64).map(|i| s.spawn(move || i * 2)).collect::<Vec<_>>().into_iter().map(|h| h.join().unwrap()).collect());
            (sums == [0, 2, 4]) as i32
        }
        fn fork_and_wait(child: fn() -> i32) -> i32 {
            // SAFETY: the child only runs `child` and exits without unwinding.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0, "fork failed");
            if pid == 0 {
                unsafe { libc::_exit(if child() == 1 { 0 } else { 1 }) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just made.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            status
        }
        assert_eq!(fork_and_wait(in_child), 0);
        fn child_that_forks() -> i32 {
            (in_child() == 1 && fork_and_wait(in_child) == 0) as i32
        }
        assert_eq!(fork_and_wait(child_that_forks), 0);
    }

    #[test]
    fn panics_reach_the_caller_after_everything_has_finished() {
        let finished = Mutex::new(0);
        // A joined panic is the handle's to report.
        let joined = scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(20));
                *lock(&finished) += 1;
            });
            s.spawn(|| panic!("joined")).join()
        });
        assert_eq!(*lock(&finished), 1);
        let payload = joined.unwrap_err();
        assert_eq!(payload.downcast_ref::<&str>(), Some(&"joined"));
        // An unjoined panic, and a panic of the scope's own closure, come out of scope() once
        // the other closures are done.
        for own in [false, true] {
            let r = catch_unwind(AssertUnwindSafe(|| {
                scope(|s| {
                    s.spawn(|| {
                        std::thread::sleep(Duration::from_millis(20));
                        *lock(&finished) += 1;
                    });
                    if own {
                        panic!("own");
                    }
                    s.spawn(|| panic!("unjoined"));
                })
            }));
            let payload = r.unwrap_err();
            let expected = if own { "own" } else { "unjoined" };
            assert_eq!(payload.downcast_ref::<&str>(), Some(&expected));
        }
        assert_eq!(*lock(&finished), 3);
        // The threads that ran panicking closures are still usable.
        assert_eq!(scope(|s| s.spawn(|| 7).join().unwrap()), 7);
    }
}
