//! The core's own rayon pool, safe after `fork`, and the progress/cancellation handle of long kernels.
//!
//! Kernels never touch rayon's global pool: PyTorch DataLoader workers `fork` the interpreter, and a
//! child inherits the parent's pool bookkeeping but none of its threads, so work handed to it would
//! never run. The pool remembers the pid that built it; a call from another pid (a forked child) builds
//! a fresh pool and leaks the dead one on purpose (dropping it would wake threads that do not exist).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use rayon::ThreadPool;

use crate::error::{CoreError, CoreResult};

struct PoolState {
    pid: u32,
    threads: usize,
    pool: Arc<ThreadPool>,
}

static POOL: Mutex<Option<PoolState>> = Mutex::new(None);
/// 0 = not set: use `EAMET_NUM_THREADS` or the number of CPUs this process may run on.
static REQUESTED_THREADS: AtomicUsize = AtomicUsize::new(0);

fn default_threads() -> usize {
    if let Some(n) = std::env::var("EAMET_NUM_THREADS")
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|&n| n > 0)
    {
        return n;
    }
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// The number of threads the kernels use.
pub fn num_threads() -> usize {
    match REQUESTED_THREADS.load(Ordering::Relaxed) {
        0 => default_threads(),
        n => n,
    }
}

/// Sets the number of threads the kernels use (`0` restores the default). Takes effect on the next call.
pub fn set_num_threads(n: usize) {
    REQUESTED_THREADS.store(n, Ordering::Relaxed);
}

fn pool() -> CoreResult<Arc<ThreadPool>> {
    let pid = std::process::id();
    let threads = num_threads();
    // A poisoned lock only means another thread panicked while holding it; the state is still valid.
    let mut guard = POOL.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(state) = guard.as_ref() {
        if state.pid == pid && state.threads == threads {
            return Ok(Arc::clone(&state.pool));
        }
    }
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("eamet-core-{i}"))
        .build()
        .map_err(|e| CoreError::Internal(format!("cannot start {threads} worker threads: {e}")))?;
    let fresh = PoolState { pid, threads, pool: Arc::new(pool) };
    if let Some(old) = guard.replace(fresh) {
        if old.pid != pid {
            // Inherited across fork: its threads live only in the parent.
            std::mem::forget(old);
        }
    }
    Ok(Arc::clone(&guard.as_ref().expect("just set").pool))
}

/// Runs `f` inside the core's pool; a panic anywhere in it becomes `CoreError::Internal`.
pub fn run<R: Send>(f: impl FnOnce() -> CoreResult<R> + Send) -> CoreResult<R> {
    let pool = pool()?;
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| pool.install(f))) {
        Ok(result) => result,
        Err(payload) => Err(CoreError::Internal(panic_message(payload.as_ref()))),
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Shared between a long kernel and whoever waits for it: units of work done, and a stop request.
#[derive(Debug, Default)]
pub struct Control {
    done: AtomicUsize,
    total: AtomicUsize,
    cancelled: AtomicBool,
}

impl Control {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    pub fn set_total(&self, total: usize) {
        self.total.store(total, Ordering::Relaxed);
    }

    pub fn advance(&self, units: usize) {
        self.done.fetch_add(units, Ordering::Relaxed);
    }

    /// `(done, total)` units of work.
    pub fn progress(&self) -> (usize, usize) {
        (self.done.load(Ordering::Relaxed), self.total.load(Ordering::Relaxed))
    }

    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    /// `Err(Cancelled)` once a stop was requested; kernels call this between tiles.
    pub fn check(&self) -> CoreResult<()> {
        if self.cancelled.load(Ordering::Relaxed) {
            Err(CoreError::Cancelled)
        } else {
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn panics_become_internal_errors() {
        let err = run::<()>(|| panic!("boom")).unwrap_err();
        assert!(matches!(err, CoreError::Internal(ref m) if m.contains("boom")));
    }

    #[test]
    fn pool_runs_work_and_reports_thread_count() {
        let n = run(|| Ok(rayon::current_num_threads())).unwrap();
        assert_eq!(n, num_threads());
    }

    #[test]
    fn cancellation_is_observed() {
        let c = Control::new();
        assert!(c.check().is_ok());
        c.cancel();
        assert!(matches!(c.check(), Err(CoreError::Cancelled)));
    }
}
