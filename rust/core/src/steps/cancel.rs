//! Cooperative cancellation of a step (Ctrl-C): the caller runs the step inside [`scope`]
//! and sets the flag from another thread; the step checks it between slices and before an
//! output is renamed into place, so it stops within one slice and leaves no file behind.
//! The flag lives in a thread-local and [`par_map`](super::par_map) hands it to its workers,
//! so steps need no extra argument and runs on other threads are unaffected.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::error::{PrepError, Result};

thread_local! {
    static FLAG: RefCell<Option<Arc<AtomicBool>>> = const { RefCell::new(None) };
}

/// Run `f` on this thread with `flag` as its cancellation flag.
pub fn scope<R>(flag: Arc<AtomicBool>, f: impl FnOnce() -> R) -> R {
    let previous = FLAG.with(|c| c.replace(Some(flag)));
    struct Restore(Option<Arc<AtomicBool>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            let previous = self.0.take();
            FLAG.with(|c| *c.borrow_mut() = previous);
        }
    }
    let _restore = Restore(previous);
    f()
}

/// The flag of the current thread, to install on worker threads.
pub fn current() -> Option<Arc<AtomicBool>> {
    FLAG.with(|c| c.borrow().clone())
}

/// `Err(Interrupted)` once the current run's flag is set.
pub fn check() -> Result<()> {
    let set = FLAG.with(|c| c.borrow().as_ref().is_some_and(|f| f.load(Ordering::Relaxed)));
    if set {
        Err(PrepError::Interrupted)
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_reaches_par_map_workers_and_is_restored() {
        let flag = Arc::new(AtomicBool::new(false));
        let items: Vec<usize> = (0..64).collect();
        let r = scope(flag.clone(), || {
            super::super::par_map(&items, 4, |&i| {
                if i == 3 {
                    flag.store(true, Ordering::Relaxed);
                }
                Ok(i)
            })
        });
        assert!(matches!(r, Err(PrepError::Interrupted)), "{r:?}");
        assert!(check().is_ok(), "no flag outside the scope");
        let ok = scope(Arc::new(AtomicBool::new(false)), || super::super::par_map(&items, 4, |&i| Ok(i)));
        assert_eq!(ok.unwrap(), items);
    }
}
