//! Long-running per-object work — plan runs, inventory probe loops (and next: health
//! rounds, policy rollouts, drift loops) — in one registry, so a reconcile stays short.
//! Each task is keyed by object and carries a *run key*: a reconcile steers a task whose run
//! key still matches, replaces it when the key changed (the new task starts only after the
//! old one ended, so their last status writes cannot cross), and stops it when its object
//! is deleted. Shutdown asks every task to stop, waits a grace period, then aborts.

use std::any::Any;
use std::collections::HashMap;
use std::future::Future;
use std::sync::Mutex;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long shutdown (and a replaced or deleted object's task) may take to reach a safe
/// point (a host boundary) before it is aborted.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// What a task hands back to be steered with; `stop` asks it to end at its next safe point.
pub trait Steer: Any + Send + Sync {
    fn stop(&self);
}

/// A cancellation token is the simplest steering handle.
impl Steer for CancellationToken {
    fn stop(&self) {
        self.cancel();
    }
}

struct Entry {
    run_key: String,
    steer: Box<dyn Steer>,
    task: JoinHandle<()>,
}

/// What [`Registry::steer`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// A task with this run key is running (and was steered).
    Running,
    /// A task with this run key ran and ended.
    Finished,
    /// No task, or one with another run key.
    Other,
}

/// The tasks of every object, keyed `kind/namespace/name`.
#[derive(Default)]
pub struct Registry {
    tasks: Mutex<HashMap<String, Entry>>,
}

impl Registry {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.tasks.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Calls `steer` on the task of `key` if it runs under `run_key`.
    pub fn steer<S: Steer>(&self, key: &str, run_key: &str, steer: impl FnOnce(&S)) -> Found {
        let tasks = self.lock();
        match tasks.get(key) {
            Some(e) if e.run_key == run_key && !e.task.is_finished() => {
                if let Some(s) = (e.steer.as_ref() as &dyn Any).downcast_ref::<S>() {
                    steer(s);
                }
                Found::Running
            }
            Some(e) if e.run_key == run_key => Found::Finished,
            _ => Found::Other,
        }
    }

    /// Whether a task for `key` exists (running or finished) under any run key.
    pub fn contains(&self, key: &str) -> bool {
        self.lock().contains_key(key)
    }

    /// Starts `work` as the task of `key` under `run_key`, replacing any task it had: the
    /// old one is asked to stop, and `work` begins only once it ended (or was aborted after
    /// [`SHUTDOWN_GRACE`]). Returns whether an older task was replaced.
    pub fn start<S, Fut>(&self, key: &str, run_key: String, steer: S, work: Fut) -> bool
    where
        S: Steer,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut tasks = self.lock();
        let previous = tasks.remove(key);
        let replaced = previous.is_some();
        let task = tokio::spawn(async move {
            if let Some(old) = previous {
                old.steer.stop();
                end_within(old.task, SHUTDOWN_GRACE).await;
            }
            work.await;
        });
        tasks.insert(
            key.to_string(),
            Entry {
                run_key,
                steer: Box::new(steer),
                task,
            },
        );
        replaced
    }

    /// Stops the task of `key` (if any) and forgets it: it gets [`SHUTDOWN_GRACE`] to end
    /// on its own before it is aborted. Idempotent.
    pub fn stop(&self, key: &str) {
        if let Some(e) = self.lock().remove(key) {
            e.steer.stop();
            tokio::spawn(end_within(e.task, SHUTDOWN_GRACE));
        }
    }

    /// Asks every task to stop, waits up to `grace` for all of them, then aborts the rest.
    pub async fn shutdown(&self, grace: Duration) {
        let entries: Vec<Entry> = self.lock().drain().map(|(_, e)| e).collect();
        for e in &entries {
            e.steer.stop();
        }
        let deadline = tokio::time::Instant::now() + grace;
        for e in entries {
            let abort = e.task.abort_handle();
            if tokio::time::timeout_at(deadline, e.task).await.is_err() {
                abort.abort();
            }
        }
    }

    /// Number of tasks known (running or finished but not replaced).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Waits for `task` up to `grace`, then aborts it.
async fn end_within(task: JoinHandle<()>, grace: Duration) {
    let abort = task.abort_handle();
    if tokio::time::timeout(grace, task).await.is_err() {
        abort.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[tokio::test(start_paused = true)]
    async fn a_replacement_starts_only_after_the_old_task_ended() {
        let reg = Registry::default();
        let order = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let (o, s) = (order.clone(), stop.clone());
        reg.start("k", "r1".into(), stop.clone(), async move {
            s.cancelled().await;
            // a slow last write after the stop request
            tokio::time::sleep(Duration::from_secs(2)).await;
            o.lock().unwrap().push("old ended");
        });
        assert_eq!(
            reg.steer::<CancellationToken>("k", "r1", |_| {}),
            Found::Running
        );
        assert_eq!(
            reg.steer::<CancellationToken>("k", "r2", |_| {}),
            Found::Other
        );
        let o = order.clone();
        let replaced = reg.start("k", "r2".into(), CancellationToken::new(), async move {
            o.lock().unwrap().push("new started");
        });
        assert!(replaced);
        tokio::time::sleep(Duration::from_secs(5)).await;
        assert_eq!(*order.lock().unwrap(), vec!["old ended", "new started"]);
        assert_eq!(
            reg.steer::<CancellationToken>("k", "r2", |_| {}),
            Found::Finished
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_task_that_ignores_stop_is_aborted_after_the_grace() {
        let reg = Registry::default();
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        reg.start("k", "r".into(), CancellationToken::new(), async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                r.fetch_add(1, Ordering::SeqCst);
            }
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        reg.shutdown(Duration::from_secs(3)).await;
        let at_shutdown = ran.load(Ordering::SeqCst);
        assert!(reg.is_empty());
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(
            ran.load(Ordering::SeqCst),
            at_shutdown,
            "aborted tasks do not run on"
        );
        assert!(
            at_shutdown >= 4,
            "it ran until the grace ended: {at_shutdown}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn stop_is_idempotent_and_steer_reaches_the_handle() {
        let reg = Registry::default();
        let token = CancellationToken::new();
        let t = token.clone();
        reg.start("k", "r".into(), token.clone(), async move {
            t.cancelled().await
        });
        let mut steered = false;
        reg.steer::<CancellationToken>("k", "r", |s| steered = !s.is_cancelled());
        assert!(steered);
        reg.stop("k");
        reg.stop("k");
        assert!(token.is_cancelled());
        assert!(!reg.contains("k"));
    }
}
