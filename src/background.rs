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
//! at a **lower scheduling priority** than the serving threads: on Linux
//! its nice value is raised by [`NICE`], which any unprivileged process
//! may do. The kernel then runs the workers first whenever both want the
//! core, and the job gets the rest; when the core has idle time (a
//! sidecar's usual state) the job runs at full speed. Under a load that
//! saturates the core the flush still gets a share (about a tenth of a
//! contended core at nice 10) and its batches simply grow: each account's
//! changes are merged in its ledger until they are taken, so a slower
//! flush costs memory for at most one ledger per account and hour, never
//! a lost or repeated call.
//!
//! That share can be too little: a flush that falls further and further
//! behind widens what a crash may lose. So a job can ask for the serving
//! threads' own priority ([`with_priority`], [`Priority::Calls`]); it then
//! runs on a second thread of the same [`Background`], which never lowered
//! its priority, and the two threads take turns, never overlapping.
//!
//! Lock discipline: a job may take the short locks the hot path takes
//! (an account's ledger, the flush queue) but must never wait for the
//! runtime, so a worker that waits for such a lock only waits for a job
//! that is running.

use std::{
    panic::{catch_unwind, resume_unwind, AssertUnwindSafe},
    sync::{mpsc, Arc},
    time::{Duration, Instant},
};

type Job = Box<dyn FnOnce() + Send + 'static>;

/// How much the background thread's nice value is raised (Linux nice
/// values run from -20, most favoured, to 19). At 10 the kernel's weight
/// for the thread is about a ninth of a default thread's.
pub const NICE: i32 = 10;

/// The priority a background job runs at.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Priority {
    /// Below the serving threads' (nice raised by [`NICE`]): the job gets
    /// the core only when no call wants it. The usual case.
    #[default]
    Low,
    /// The serving threads' own: for work that has fallen so far behind
    /// that waiting for idle time would break a promise, such as a flush
    /// whose oldest change is older than the durability window allows
    /// (`Flusher`). On a saturated core the job then takes up to about
    /// half of it ([`Slicer::pause`]), and the calls slow down instead.
    /// A job that asks for it while the low thread runs a job of the same
    /// executor waits for that job to end, at its low priority.
    Calls,
}

tokio::task_local! {
    /// The priority of the background jobs the current task runs.
    static PRIORITY: Priority;
}

/// Runs `fut` so that every job it runs through [`Background::run`],
/// directly or through the functions it calls (the SQLite store's writer
/// thread, say), runs at `priority`. Outside such a scope jobs run at
/// [`Priority::Low`].
pub async fn with_priority<F: std::future::Future>(priority: Priority, fut: F) -> F::Output {
    PRIORITY.scope(priority, fut).await
}

std::thread_local! {
    /// The priority of the background thread this is (`Low` elsewhere).
    static THREAD_PRIORITY: std::cell::Cell<Priority> = const { std::cell::Cell::new(Priority::Low) };
}

fn current_priority() -> Priority {
    PRIORITY.try_with(|p| *p).unwrap_or_default()
}

/// A serial executor for background jobs: one named thread at a lower
/// priority, and a second one at the serving threads' priority, started
/// the first time a job asks for it ([`with_priority`]). A thread cannot
/// take back a priority it gave up (lowering its nice value again needs
/// `CAP_SYS_NICE`), hence two threads. Jobs never overlap: each runs under
/// the executor's lock, whichever thread runs it, so its jobs stay as
/// serial as they were on one thread. The threads end when the last
/// handle is dropped and their queued jobs are done.
#[derive(Clone)]
pub struct Background {
    jobs: mpsc::Sender<Job>,
    at_calls_priority: Arc<CallsThread>,
    serial: Arc<parking_lot::Mutex<()>>,
}

/// The thread of a [`Background`] that runs at the serving threads'
/// priority, started on first use.
struct CallsThread {
    name: String,
    jobs: std::sync::OnceLock<mpsc::Sender<Job>>,
}

impl Background {
    /// Starts the thread, named `name` (as `top -H` and `perf` show it).
    ///
    /// # Panics
    /// If the OS cannot start a thread, as `std::thread::spawn` does.
    pub fn start(name: &str) -> Background {
        let serial = Arc::new(parking_lot::Mutex::new(()));
        Background {
            jobs: spawn_thread(name.to_owned(), Priority::Low, serial.clone()),
            at_calls_priority: Arc::new(CallsThread {
                // Linux shows a thread's first 15 bytes (`top -H`):
                // `packmeter-flush` is already 15.
                name: format!(
                    "pm-{}-late",
                    name.strip_prefix("packmeter-").unwrap_or(name)
                ),
                jobs: std::sync::OnceLock::new(),
            }),
            serial,
        }
    }

    /// Where a job of the current task goes (see [`with_priority`]).
    fn queue(&self) -> &mpsc::Sender<Job> {
        match current_priority() {
            Priority::Low => &self.jobs,
            Priority::Calls => {
                let t = &self.at_calls_priority;
                t.jobs.get_or_init(|| {
                    spawn_thread(t.name.clone(), Priority::Calls, self.serial.clone())
                })
            }
        }
    }

    /// Queues `f` on the background thread without waiting for it, at the
    /// current task's priority (see [`with_priority`]). A panic in `f` is
    /// caught and logged; the thread carries on.
    pub fn submit(&self, f: impl FnOnce() + Send + 'static) {
        let job: Job = Box::new(move || {
            if catch_unwind(AssertUnwindSafe(f)).is_err() {
                tracing::error!("a background job panicked");
            }
        });
        if let Err(mpsc::SendError(job)) = self.queue().send(job) {
            job();
        }
    }

    /// Runs `f` on the background thread, at the current task's priority
    /// (see [`with_priority`]), and returns what it returns. A panic in `f`
    /// is raised again here, in the caller, as if `f` had run in place (the
    /// thread itself carries on with the next job).
    pub async fn run<T, F>(&self, f: F) -> T
    where
        T: Send + 'static,
        F: FnOnce() -> T + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(f)));
        });
        if let Err(mpsc::SendError(job)) = self.queue().send(job) {
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
}

/// How long a background job runs before it hands the core back to any
/// thread waiting for it (see [`Slicer`]).
pub const SLICE: Duration = Duration::from_micros(200);

/// Hands the core back to the serving threads every [`SLICE`] of a long
/// job.
///
/// A lower priority decides who gets the core when both a worker and a
/// background thread want it; it does not bound how long a background
/// thread keeps the core once the kernel has picked it. With both runnable,
/// Linux's scheduler (EEVDF) switches between them only at its tick, every
/// 4 ms at the usual `HZ=250`, whatever their slices, so each time the
/// flush's SQLite writer was picked under load, the calls queued behind it
/// waited up to a tick: the serving p99 at 10 k accounts was about 3× the
/// no-op's, against 1.2-1.7× with the writer yielding every 200 µs (issue
/// 14; BENCHMARKS.md, "A flat tail").
///
/// A job calls [`Slicer::pause`] between pieces of work, only where it
/// holds no lock a call waits for; once the job has run for [`SLICE`] since
/// the last yield, the thread yields (`sched_yield`) and the kernel runs a
/// waiting worker first. With no worker waiting, the yield returns at once.
/// On the thread at the calls' priority ([`Priority::Calls`]) the pause is
/// a sleep of one [`SLICE`] instead, whether or not a worker waits (see
/// [`Slicer::pause`]).
pub struct Slicer {
    since: Instant,
    yields: u64,
}

impl Default for Slicer {
    fn default() -> Self {
        Slicer::new()
    }
}

impl Slicer {
    pub fn new() -> Slicer {
        Slicer {
            since: Instant::now(),
            yields: 0,
        }
    }

    /// Once the job has run for [`SLICE`] since it last paused, hands the
    /// core back: on the thread at the lower priority, a yield; on the one
    /// at the calls' priority ([`Priority::Calls`]), a sleep of one
    /// [`SLICE`]. Among threads of one priority a yield hands the core to
    /// a busy worker for its whole scheduler slice, and the late job got a
    /// few percent of a saturated core; without any pause it got an equal
    /// share, but held calls for up to a scheduler tick (p99 4-4.5 ms
    /// against 2.2 ms with the sleep, at 100 k accounts; BENCHMARKS.md,
    /// stop 30). The sleep caps its share at about half the core, which
    /// measured enough to bound its lag.
    pub fn pause(&mut self) {
        if self.due(Instant::now()) {
            match THREAD_PRIORITY.get() {
                Priority::Low => std::thread::yield_now(),
                Priority::Calls => std::thread::sleep(SLICE),
            }
            self.yields += 1;
            self.since = Instant::now();
        }
    }

    fn due(&self, now: Instant) -> bool {
        now.saturating_duration_since(self.since) >= SLICE
    }

    /// How many times [`pause`](Self::pause) handed the core back (a yield,
    /// or a sleep on the thread at the calls' priority).
    pub fn yields(&self) -> u64 {
        self.yields
    }
}

/// Starts a thread named `name` that runs the jobs sent to it at
/// `priority`, each under `serial`, and returns their queue.
///
/// # Panics
/// If the OS cannot start a thread, as `std::thread::spawn` does.
fn spawn_thread(
    name: String,
    priority: Priority,
    serial: Arc<parking_lot::Mutex<()>>,
) -> mpsc::Sender<Job> {
    let (jobs, queue) = mpsc::channel::<Job>();
    std::thread::Builder::new()
        .name(name)
        .spawn(move || {
            THREAD_PRIORITY.set(priority);
            if priority == Priority::Low {
                lower_priority();
            }
            for job in queue {
                let _serial = serial.lock();
                job();
            }
        })
        .expect("failed to start a background thread");
    jobs
}

/// Raises the calling thread's nice value by [`NICE`]. A failure (a
/// seccomp profile that forbids it, say) is logged and otherwise ignored:
/// the work is the same, only its priority is not lowered.
fn lower_priority() {
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

    #[test]
    fn a_slicer_yields_once_its_slice_has_run_and_starts_a_new_one() {
        let mut slicer = Slicer::new();
        let start = slicer.since;
        assert!(!slicer.due(start));
        assert!(!slicer.due(start + SLICE - Duration::from_nanos(1)));
        assert!(slicer.due(start + SLICE));
        // Once the slice has run, `pause` yields and a new slice begins.
        slicer.since = start - SLICE;
        slicer.pause();
        assert_eq!(slicer.yields(), 1);
        assert!(slicer.since >= start);
    }

    #[cfg(target_os = "linux")]
    #[tokio::test]
    async fn a_job_asked_for_at_the_calls_priority_runs_at_the_callers_on_a_thread_of_its_own() {
        let bg = Background::start("packmeter-test-prio");
        let here = || {
            let nice =
                rustix::process::getpriority_process(Some(rustix::thread::gettid())).unwrap();
            (nice, std::thread::current().name().map(str::to_owned))
        };
        let (caller, _) = here();
        let (nice, name) = with_priority(Priority::Calls, bg.run(here)).await;
        assert_eq!(nice, caller);
        assert_eq!(name.as_deref(), Some("pm-test-prio-late"));
        // Outside the scope, the next job runs low again.
        let (nice, name) = bg.run(here).await;
        assert_eq!(nice, (caller + NICE).min(19));
        assert_eq!(name.as_deref(), Some("packmeter-test-prio"));
        // So does one submitted within a scope that asks for `Low`.
        let (tx, rx) = tokio::sync::oneshot::channel();
        with_priority(Priority::Low, async {
            bg.submit(move || drop(tx.send(here())))
        })
        .await;
        assert_eq!(rx.await.unwrap().0, (caller + NICE).min(19));
    }

    #[tokio::test]
    async fn jobs_at_the_two_priorities_never_overlap() {
        let bg = Background::start("packmeter-test-serial");
        // The low job waits for a signal that only the other job sends. If
        // the two ran at once, the signal would arrive within the wait;
        // run one after the other, it cannot, and the low job sees the
        // wait end empty before the other job starts.
        let (signal, signalled) = std::sync::mpsc::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel::<()>();
        let low = tokio::spawn({
            let bg = bg.clone();
            async move {
                bg.run(move || {
                    started_tx.send(()).unwrap();
                    signalled.recv_timeout(Duration::from_millis(500)).is_ok()
                })
                .await
            }
        });
        // The low job holds the executor before the other is queued.
        tokio::task::spawn_blocking(move || started.recv().unwrap())
            .await
            .unwrap();
        with_priority(
            Priority::Calls,
            bg.run(move || {
                let _ = signal.send(());
            }),
        )
        .await;
        assert!(
            !low.await.unwrap(),
            "the job at the calls' priority ran while the low job ran"
        );
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
