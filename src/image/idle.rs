//! The thread background renders run on: one thread of its own, at the scheduler's idle priority
//! (Linux `SCHED_IDLE`), so a pre-render only ever uses CPU time nothing else wants. A client's
//! render, the runtime's threads and the load balancer's probes always run first; on a busy machine
//! a background render simply waits, holding its slot and memory reservation until it is done.
//!
//! A thread's policy cannot be raised again without privileges, which is why the work goes to a
//! dedicated thread rather than to tokio's blocking pool, whose threads also run clients' renders.

use std::sync::mpsc;
use std::sync::OnceLock;

use tokio::sync::oneshot;

type Work = Box<dyn FnOnce() + Send>;

static THREAD: OnceLock<Option<mpsc::Sender<Work>>> = OnceLock::new();

/// Starts the thread once; `None` if the system would not start a thread.
fn sender() -> Option<&'static mpsc::Sender<Work>> {
    THREAD
        .get_or_init(|| {
            let (tx, rx) = mpsc::channel::<Work>();
            std::thread::Builder::new()
                .name("background-render".into())
                .spawn(move || {
                    lower_priority();
                    while let Ok(work) = rx.recv() {
                        work();
                    }
                })
                .ok()
                .map(|_| tx)
        })
        .as_ref()
}

/// Puts the calling thread in `SCHED_IDLE`. Anyone may lower a thread's priority; if the system
/// refuses (not Linux), the work runs at normal priority and the log says so once.
fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler on the calling thread (0) with a valid, initialised param.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) };
        if rc == 0 {
            return;
        }
    }
    tracing::warn!("background renders run at normal priority (SCHED_IDLE unavailable)");
}

/// Runs `work` on the background thread; the receiver gets its result, or an error if the thread
/// could not be started.
pub(super) fn run<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> oneshot::Receiver<T> {
    let (tx, rx) = oneshot::channel();
    if let Some(thread) = sender() {
        let _ = thread.send(Box::new(move || {
            let _ = tx.send(work());
        }));
    }
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn work_runs_on_one_thread_at_idle_priority() {
        let first = run(|| std::thread::current().id()).await.expect("ran");
        let second = run(|| std::thread::current().id()).await.expect("ran");
        assert_eq!(first, second, "one dedicated thread");
        assert_ne!(first, std::thread::current().id());
        #[cfg(target_os = "linux")]
        {
            // SAFETY: sched_getscheduler on the calling thread.
            let policy = run(|| unsafe { libc::sched_getscheduler(0) })
                .await
                .expect("ran");
            assert_eq!(policy, libc::SCHED_IDLE);
        }
    }
}
