//! `TaskController`: one owner for background tasks. A node's tasks belong to its
//! tracker (waited for on shutdown) and end with a cancellation token; a task spawned
//! here races the token itself, so the loops it runs no longer do by hand. Actors that
//! own tasks take a child controller (same tracker, child token) and cancel it when
//! they stop. Tasks that must do work after cancellation (a final flush, an answer in
//! flight) watch the token themselves and are spawned on the tracker directly.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

#[derive(Clone, Debug)]
pub struct TaskController {
    tracker: TaskTracker,
    cancel: CancellationToken,
}

impl TaskController {
    pub fn new(tracker: TaskTracker, cancel: CancellationToken) -> Self {
        TaskController { tracker, cancel }
    }

    /// Runs `fut` on the tracker until it ends or the token is cancelled; then it is
    /// dropped where it waits (a future that has not started never starts).
    pub fn spawn_until_cancelled<F>(&self, fut: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let cancel = self.cancel.clone();
        self.tracker.spawn(async move {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {}
                _ = fut => {}
            }
        });
    }

    /// The same tracker with a child token: cancelled with this one, or alone.
    pub fn child(&self) -> TaskController {
        TaskController {
            tracker: self.tracker.clone(),
            cancel: self.cancel.child_token(),
        }
    }

    pub fn token(&self) -> &CancellationToken {
        &self.cancel
    }

    pub fn tracker(&self) -> &TaskTracker {
        &self.tracker
    }

    /// Cancels this controller's tasks (its children too).
    pub fn cancel(&self) {
        self.cancel.cancel();
    }

    /// Cancels, closes the tracker and waits for every task at most `bound`. False when
    /// some task had not ended by then.
    pub async fn terminate(&self, bound: Duration) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        tokio::time::timeout(bound, self.tracker.wait())
            .await
            .is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[tokio::test]
    async fn a_cancelled_controller_drops_its_loops_and_terminates_within_its_bound() {
        let tasks = TaskController::new(TaskTracker::new(), CancellationToken::new());
        let (tx, rx) = flume::unbounded::<u32>();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let s = seen.clone();
        tasks.child().spawn_until_cancelled(async move {
            while let Ok(n) = rx.recv_async().await {
                s.lock().unwrap().push(n);
            }
        });
        tx.send(1).unwrap();
        tokio::task::yield_now().await;
        assert_eq!(*seen.lock().unwrap(), vec![1]);
        assert!(tasks.terminate(Duration::from_secs(1)).await);
        assert!(
            tx.send(2).is_err(),
            "the loop ended and dropped its receiver"
        );

        // A task that ignores the token is waited for only up to the bound.
        let stuck = TaskController::new(TaskTracker::new(), CancellationToken::new());
        let ended = Arc::new(AtomicBool::new(false));
        let e = ended.clone();
        stuck.tracker().spawn(async move {
            tokio::time::sleep(Duration::from_secs(60)).await;
            e.store(true, Ordering::SeqCst);
        });
        assert!(!stuck.terminate(Duration::from_millis(50)).await);
        assert!(!ended.load(Ordering::SeqCst));
    }

    #[tokio::test]
    async fn a_future_spawned_after_cancellation_never_starts() {
        let tasks = TaskController::new(TaskTracker::new(), CancellationToken::new());
        tasks.cancel();
        let started = Arc::new(AtomicBool::new(false));
        let s = started.clone();
        tasks.spawn_until_cancelled(async move { s.store(true, Ordering::SeqCst) });
        assert!(tasks.terminate(Duration::from_secs(1)).await);
        assert!(!started.load(Ordering::SeqCst));
    }
}
