//! Where blocking work runs.
//!
//! Work that blocks (the local store's file I/O) goes to tokio's blocking pool when it is
//! reached from a runtime worker, which must not block. A FUSE session thread exists to
//! block: there, handing the work to the pool and waking a worker for the reply would cost
//! two thread switches, more than a small put or get itself. The FUSE adapter marks the
//! time it spends polling a request's future on its own thread with [`allowed_here`].

use std::cell::Cell;
use std::panic::{AssertUnwindSafe, catch_unwind};

thread_local! {
    static MAY_BLOCK: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with blocking work allowed on this thread.
pub fn allowed_here<T>(f: impl FnOnce() -> T) -> T {
    struct Reset(bool);
    impl Drop for Reset {
        fn drop(&mut self) {
            MAY_BLOCK.set(self.0);
        }
    }
    let _reset = Reset(MAY_BLOCK.replace(true));
    f()
}

/// Runs blocking `f` here when this thread may block, else on the blocking pool. A panic in
/// `f` comes back as an error either way, as a message.
pub async fn run<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, String> {
    if MAY_BLOCK.get() {
        return catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_message(&*p));
    }
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| match e.try_into_panic() {
            Ok(p) => panic_message(&*p),
            Err(e) => e.to_string(),
        })
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    match (p.downcast_ref::<&str>(), p.downcast_ref::<String>()) {
        (Some(s), _) => format!("panicked: {s}"),
        (_, Some(s)) => format!("panicked: {s}"),
        _ => "panicked".to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 1)]
    async fn blocking_work_runs_here_only_where_allowed() {
        let here = std::thread::current().id();
        let elsewhere = run(|| std::thread::current().id()).await.unwrap();
        assert_ne!(
            elsewhere, here,
            "a runtime worker hands blocking work to the pool"
        );

        let fut = run(|| std::thread::current().id());
        let mut fut = std::pin::pin!(fut);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = allowed_here(|| fut.as_mut().poll(&mut cx));
        assert_eq!(polled, std::task::Poll::Ready(Ok(here)), "ran inline");
        assert!(!MAY_BLOCK.get(), "the mark ends with the call");

        let err = allowed_here(|| {
            let fut = run(|| -> u32 { panic!("boom") });
            futures::executor::block_on(fut)
        });
        assert_eq!(err, Err("panicked: boom".to_string()));
    }
}
