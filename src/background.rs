//! A thread for background work that must not stall the calls in flight.
//!
//! The flush moves thousands of accounts' changes at a time: it takes them
//! out of the accounts, sorts them into batches, writes each batch in one
//! SQLite transaction and rebases the accounts' counters. Done on the
//! runtime's worker threads, a chunk of that work holds up every call
//! queued behind it (with the server pinned to one core there is a single
//! worker); done in tokio's blocking pool, it competes with the workers
//! for the core as an equal, and calls wait a scheduler slice behind it.
//! Either way it showed up as the serving tail (issue 14, BENCHMARKS.md).
//!
//! A [`Background`] is one named OS thread that runs such jobs in order,
//! at a **lower scheduling priority** than the serving threads. On Linux
//! it runs under `SCHED_IDLE`, which any unprivileged thread may choose:
//! a serving thread that wakes takes the core from it at once. A nice
//! value alone (+10, what this did first) was not enough: once the kernel
//! (EEVDF) has picked a niced thread it lets it run out its slice, about
//! 3 ms, and with the core saturated every call in flight waited that
//! long (p999 4.4 ms against the no-op's 0.7-0.9 ms at 10 k accounts, on
//! a machine five times faster than the one that first measured issue
//! 14; BENCHMARKS.md). When the core has idle time (a sidecar's usual
//! state) a job runs at full speed either way.
//!
//! `SCHED_IDLE` gets almost nothing of a core that the serving threads
//! keep busy, so a job that has waited in the queue longer than
//! [`STARVED_AFTER`] runs at nice +[`NICE`] instead (about a tenth of a
//! contended core), and the thread goes back to `SCHED_IDLE` after it:
//! under a load that saturates the core, flushes and operator writes are
//! slower, never stopped. A slower flush costs memory for at most one
//! ledger per account and hour (changes merge in each account's ledger
//! until they are taken), never a lost or repeated call. Where
//! `SCHED_IDLE` cannot be set, the thread runs at nice +[`NICE`] always.
//!
//! Lock discipline: a job may take the short locks the hot path takes
//! (an account's ledger, the flush queue) but must never wait for the
//! runtime, so a worker that waits for such a lock only waits for a job
//! that is running.

use std::{
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc, Condvar, Mutex},
    time::{Duration, Instant},
};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// A background thread that has had a job waiting or running this long
/// under `SCHED_IDLE` is moved to nice +[`NICE`] until its queue is empty:
/// the serving threads are keeping the core busy.
pub const STARVED_AFTER: Duration = Duration::from_millis(100);

/// How much the background thread's nice value is raised (Linux nice
/// values run from -20, most favoured, to 19). At 10 the kernel's weight
/// for the thread is about a ninth of a default thread's.
pub const NICE: i32 = 10;

/// One background thread; it ends when the last handle is dropped and its
/// queued jobs are done.
#[derive(Clone)]
pub struct Background {
    jobs: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

/// What the background thread, its callers and its watchdog share.
#[derive(Default)]
struct Shared {
    state: Mutex<State>,
    changed: Condvar,
}

#[derive(Default)]
struct State {
    /// Jobs queued and not yet finished.
    outstanding: usize,
    /// Since when the thread has had a job to do without a break (reset
    /// after each job); `None` while its queue is empty.
    busy_since: Option<Instant>,
    /// The thread is under `SCHED_IDLE`.
    idle: bool,
    /// The thread, for the watchdog (Linux).
    #[cfg(target_os = "linux")]
    native: Option<thread_priority::unix::ThreadId>,
    /// The thread has ended (its queue closed).
    ended: bool,
    /// Times the watchdog moved the thread off `SCHED_IDLE`.
    escalations: u64,
}

impl Background {
    /// Starts the thread, named `name` (as `top -H` and `perf` show it),
    /// and its watchdog.
    ///
    /// # Panics
    /// If the OS cannot start a thread, as `std::thread::spawn` does.
    pub fn start(name: &str) -> Background {
        let (jobs, queue) = mpsc::channel::<Job>();
        let shared = Arc::new(Shared::default());
        let on_thread = shared.clone();
        std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || {
                lower_priority();
                let idle = set_idle(true);
                {
                    let mut st = on_thread.state.lock().unwrap_or_else(|p| p.into_inner());
                    st.idle = idle;
                    #[cfg(target_os = "linux")]
                    {
                        st.native = Some(thread_priority::unix::thread_native_id());
                    }
                    on_thread.changed.notify_all();
                }
                for job in queue {
                    job();
                    let escalated = {
                        let mut st = on_thread.state.lock().unwrap_or_else(|p| p.into_inner());
                        st.outstanding -= 1;
                        st.busy_since = (st.outstanding > 0).then(Instant::now);
                        let back = st.outstanding == 0 && idle && !st.idle;
                        on_thread.changed.notify_all();
                        back
                    };
                    if escalated && set_idle(true) {
                        on_thread.lock().idle = true;
                        // A job queued meanwhile now waits under SCHED_IDLE.
                        on_thread.changed.notify_all();
                    }
                }
                on_thread.lock().ended = true;
                on_thread.changed.notify_all();
            })
            .expect("failed to start a background thread");
        if idle_supported() {
            let watched = shared.clone();
            std::thread::Builder::new()
                .name(format!("{name}-wd"))
                .spawn(move || watchdog(&watched))
                .expect("failed to start a background thread");
        }
        Background { jobs, shared }
    }

    /// Runs `f` on the background thread and returns what it returns. A
    /// panic in `f` is raised again here, in the caller, as if `f` had run
    /// in place (the thread itself carries on with the next job).
    pub async fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        {
            let mut st = self.shared.lock();
            st.outstanding += 1;
            st.busy_since.get_or_insert_with(Instant::now);
            self.shared.changed.notify_all();
        }
        if let Err(mpsc::SendError(job)) = self.jobs.send(job) {
            // The thread is gone (it cannot be while a handle exists, but a
            // job must run regardless): run it here.
            job();
        }
        match rx.await {
            Ok(Ok(value)) => value,
            Ok(Err(panic)) => resume_unwind(panic),
            // The job was dropped unrun: only if the thread died, which
            // `job()` above and `catch_unwind` leave no way for.
            Err(_) => unreachable!("the background thread dropped a job"),
        }
    }

    /// Times the watchdog moved the thread off `SCHED_IDLE`.
    pub fn escalations(&self) -> u64 {
        self.shared.lock().escalations
    }
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Moves the background thread from `SCHED_IDLE` to `SCHED_OTHER` (its
/// nice value, +[`NICE`], is kept) once it has been busy for
/// [`STARVED_AFTER`]; the thread goes back to `SCHED_IDLE` itself when its
/// queue is empty. Sleeps on the condition variable otherwise.
fn watchdog(shared: &Shared) {
    let mut st = shared.lock();
    loop {
        if st.ended {
            return;
        }
        let due = match st.busy_since {
            Some(since) if st.idle => since + STARVED_AFTER,
            _ => {
                st = shared.changed.wait(st).unwrap_or_else(|p| p.into_inner());
                continue;
            }
        };
        let now = Instant::now();
        if now < due {
            st = shared
                .changed
                .wait_timeout(st, due - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            continue;
        }
        #[cfg(target_os = "linux")]
        if let Some(native) = st.native {
            use thread_priority::{
                unix::{
                    set_thread_priority_and_policy, NormalThreadSchedulePolicy,
                    ThreadSchedulePolicy,
                },
                ThreadPriority,
            };
            // Sets the policy of the background thread, then the nice value
            // of the *calling* thread (this watchdog, which does nothing
            // else) to the lowest: the background thread keeps its own.
            let _ = set_thread_priority_and_policy(
                native,
                ThreadPriority::Min,
                ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Other),
            );
        }
        st.idle = false;
        st.escalations += 1;
        shared.changed.notify_all();
    }
}

/// Whether this platform has `SCHED_IDLE` (whether a thread may take it is
/// only known when it tries).
fn idle_supported() -> bool {
    cfg!(target_os = "linux")
}

/// Puts the calling thread under `SCHED_IDLE`, keeping its nice value for
/// when the watchdog moves it back. Returns whether it is under
/// `SCHED_IDLE` afterwards.
fn set_idle(idle: bool) -> bool {
    #[cfg(target_os = "linux")]
    {
        use thread_priority::{
            unix::{
                set_thread_priority_and_policy, thread_native_id, thread_schedule_policy,
                NormalThreadSchedulePolicy, ThreadSchedulePolicy,
            },
            ThreadPriority,
        };
        if !idle {
            return false;
        }
        let tid = Some(rustix::thread::gettid());
        let Ok(nice) = rustix::process::getpriority_process(tid) else {
            return false;
        };
        // The library sets the policy, then the calling thread's nice value
        // to 0: refused to an unprivileged thread at nice 10 (after the
        // policy took), allowed to root. Either way it is put back, which
        // only ever raises it.
        let _ = set_thread_priority_and_policy(
            thread_native_id(),
            ThreadPriority::Min,
            ThreadSchedulePolicy::Normal(NormalThreadSchedulePolicy::Idle),
        );
        let _ = rustix::process::setpriority_process(tid, nice);
        let now_idle = matches!(
            thread_schedule_policy(),
            Ok(ThreadSchedulePolicy::Normal(
                NormalThreadSchedulePolicy::Idle
            ))
        );
        if !now_idle {
            tracing::warn!(
                "could not put a background thread under SCHED_IDLE; it runs at nice +10, and \
                 calls may wait up to a scheduler slice behind a flush"
            );
        }
        now_idle
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = idle;
        false
    }
}

/// Raises the calling thread's nice value by [`NICE`]. A failure (a
/// seccomp profile that forbids it, say) is logged and otherwise ignored:
/// the work is the same, only its priority is not lowered.
pub(crate) fn lower_priority() {
    #[cfg(target_os = "linux")]
    {
        // On Linux the nice value is per thread, and `PRIO_PROCESS` with a
        // thread id changes that thread alone.
        use rustix::{process, thread};
        let tid = Some(thread::gettid());
        let lowered = process::getpriority_process(tid)
            .and_then(|now| process::setpriority_process(tid, (now + NICE).min(19)));
        if let Err(error) = lowered {
            tracing::warn!(
                %error,
                "could not lower the background thread's priority; flushes compete with calls for the CPU"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn jobs_run_in_order_on_the_named_thread() {
        let bg = Background::start("packmeter-test-bg");
        let mut seen = Vec::new();
        for i in 0..3 {
            seen.push(
                bg.run(move || (i, std::thread::current().name().map(str::to_owned)))
                    .await,
            );
        }
        for (i, (n, name)) in seen.into_iter().enumerate() {
            assert_eq!(n, i);
            assert_eq!(name.as_deref(), Some("packmeter-test-bg"));
        }
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn the_thread_runs_at_a_lower_priority_than_its_caller() {
        let bg = Background::start("packmeter-test-nice");
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let here = nice();
        let there = bg.run(nice).await;
        assert_eq!(there, (here + NICE).min(19));
    }

    #[cfg(target_os = "linux")]
    fn policy() -> thread_priority::unix::ThreadSchedulePolicy {
        thread_priority::unix::thread_schedule_policy().unwrap()
    }

    #[cfg(target_os = "linux")]
    const IDLE: thread_priority::unix::ThreadSchedulePolicy =
        thread_priority::unix::ThreadSchedulePolicy::Normal(
            thread_priority::unix::NormalThreadSchedulePolicy::Idle,
        );

    #[cfg(target_os = "linux")]
    const OTHER: thread_priority::unix::ThreadSchedulePolicy =
        thread_priority::unix::ThreadSchedulePolicy::Normal(
            thread_priority::unix::NormalThreadSchedulePolicy::Other,
        );

    /// Issue 14: a serving thread that wakes takes the core from a job at
    /// once (SCHED_IDLE), instead of waiting out the job's slice.
    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn jobs_run_under_sched_idle() {
        let bg = Background::start("packmeter-test-idle");
        assert_eq!(bg.run(policy).await, IDLE);
        assert_eq!(policy(), OTHER, "the caller is unchanged");
    }

    /// A job busy for longer than STARVED_AFTER (here: blocked until the
    /// watchdog has acted) finishes at nice +10 under SCHED_OTHER, and the
    /// next job runs under SCHED_IDLE again.
    #[cfg(target_os = "linux")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_starved_job_is_moved_off_sched_idle_and_the_thread_goes_back() {
        let bg = Background::start("packmeter-test-starved");
        let nice = || rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
        let here = nice();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let job = tokio::spawn({
            let bg = bg.clone();
            async move {
                bg.run(move || {
                    wait.recv().unwrap();
                    (policy(), nice())
                })
                .await
            }
        });
        {
            let shared = &bg.shared;
            let mut st = shared.lock();
            while st.escalations == 0 {
                st = shared.changed.wait(st).unwrap();
            }
        }
        go.send(()).unwrap();
        assert_eq!(job.await.unwrap(), (OTHER, (here + NICE).min(19)));
        assert_eq!(bg.escalations(), 1);
        {
            // The thread goes back to SCHED_IDLE once its queue is empty.
            let shared = &bg.shared;
            let mut st = shared.lock();
            while !st.idle {
                st = shared.changed.wait(st).unwrap();
            }
        }
        assert_eq!(bg.run(policy).await, IDLE);
    }

    #[tokio::test]
    async fn a_panicking_job_panics_in_the_caller_and_the_thread_goes_on() {
        let bg = Background::start("packmeter-test-panic");
        let caller = tokio::spawn({
            let bg = bg.clone();
            async move { bg.run(|| panic!("boom")).await }
        });
        let err = caller.await.unwrap_err();
        assert!(err.is_panic());
        assert_eq!(bg.run(|| 7).await, 7);
    }
}
