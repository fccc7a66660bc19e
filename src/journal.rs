//! `--durability journal`: every deduction is appended to a local journal,
//! and made durable with `fsync`, before it is acknowledged; the journal is
//! replayed at the next start, so a SIGKILL loses nothing acknowledged.
//!
//! # Files
//!
//! A directory beside the store (`<store>.journal`, see [`journal_dir`]):
//! - segments `EEEEEEEEEEEEEEEEEEEE-NNNN.seg`, one or more per *epoch* (a
//!   new file after a failed write, so a torn group is never written over);
//! - `checkpoint`: the last epoch whose deductions are all in the store,
//!   and the journal's random id. Written to a temporary name, synced and
//!   renamed.
//!
//! Every record is `[len u32][crc32 u32][version u8][kind u8][payload]`,
//! little-endian, the CRC (crc32fast) over everything after it. The
//! payload is [`Record`]'s fields in postcard's compact serde format. A record that is short (torn), fails its
//! CRC, does not decode or carries an epoch past [`MAX_EPOCH`] stops the reading of its file there: everything
//! before it is kept, and the log says at which offset and why. A file may
//! end in zeros (the writer lays them ahead of its records, see
//! [`ZERO_AHEAD`]): they end its records, as the end of the file does.
//!
//! # Group commit
//!
//! Deductions hand their records to one writer thread and wait. The thread
//! takes every record waiting, writes them, calls `fsync` (`sync_data`)
//! once, and wakes the whole group: under load one `fsync` covers many
//! deductions. A batch or a stream message is one group entry.
//!
//! When it takes them: in `serve`, whose runtime tells the journal when a
//! worker parks ([`park_hooks`]), once a worker has nothing left to run
//! (every call it holds is waiting), so a group holds every deduction made
//! by then; at most [`HOLD_MAX`] after the first record. Records handed
//! over from other threads are taken as soon as the writer can.
//!
//! The writer writes zeros ahead of its records ([`ZERO_AHEAD`]), so that
//! most `fsync`s write data alone, not the file's metadata.
//!
//! # What the journal knows of the flush: epochs and intents
//!
//! The journal must not bring back usage the store already has. Each
//! deduction record carries the *epoch* it was deducted in. A flush in
//! journal mode takes every dirty account's changes in one short exclusive
//! section ([`Journal::take`]) that also moves the epoch on, so a
//! deduction of epoch `e` is in the take of the first flush with epoch
//! `k >= e` that includes its account. Before a batch is written to the
//! store, an *intent* record names its id, its take epoch and its
//! accounts, and is durable. At replay, each deduction goes to the batch
//! that took it (the last intent of that epoch naming the account: a batch
//! narrowed after a permanent error has halves) and is written again
//! **under that batch's id**: the store skips a batch it applied already,
//! and applies it otherwise. Deductions no flush took form new batches whose
//! ids derive from the journal's id and epochs, so a replay interrupted
//! and run again writes the same ids.
//!
//! Once a flush has written every batch of its take, with no batch left to
//! retry and no account set aside, the store holds every deduction of that
//! epoch and the ones before: the checkpoint moves there and those
//! segments are deleted. The journal so holds about one or two flush
//! intervals of traffic. (While an account is set aside, the journal is not
//! truncated; the log says so.)
//!
//! # Replay
//!
//! [`replay`] runs at start, with both ports bound but before the server
//! reports ready (health NOT_SERVING, `/readyz` 503, calls UNAVAILABLE:
//! see [`crate::server`]): it turns the journal into batches, appends them
//! to the spill file (atomically), moves the checkpoint past them and
//! deletes the segments; the spill file's replay (the same as after a
//! failed shutdown flush) then writes them to the store, each batch once by
//! its id. Each step can be cut short (a SIGTERM stops the spill file's
//! replay between two batches; a SIGKILL anywhere) and run again: the same
//! journal gives the same batch ids.
//!
//! # When the journal cannot be written
//!
//! A failed write or `fsync` fails its whole group: those deductions are
//! answered UNAVAILABLE. (They were counted in memory and are flushed and
//! billed once, like any deduction; the client was told it may retry, so
//! send request ids.) The journal is then *unwritable*: new deductions are
//! refused with UNAVAILABLE before they deduct anything, health reports
//! NOT_SERVING, and the writer probes a fresh file every
//! [`PROBE_EVERY`] until a write and an `fsync` succeed again.

use std::{
    cell::RefCell,
    collections::{BTreeMap, HashMap},
    fs::File,
    io::Write,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering},
        Arc, OnceLock,
    },
    time::{Duration, Instant},
};

use crate::{
    calendar::Ts,
    ledger::{AccountFlush, FlushBatch},
    meter::gate::Gate,
    store::StoreUrl,
};

/// Format version of every record.
pub const VERSION: u8 = 1;
/// Bytes before a record's body: length and CRC.
pub const HEADER: usize = 8;
/// Larger bodies are taken for corruption, not allocated.
pub const MAX_BODY: usize = 64 << 20;
/// The largest epoch a record, a checkpoint or a segment name may carry:
/// epochs advance once per flush, so no journal counts past 2^63 (it would
/// take 292,000 years at one flush a microsecond), and a larger one is
/// corruption. It also leaves room to count on: replay starts the next run
/// at the last epoch plus one.
pub const MAX_EPOCH: u64 = i64::MAX as u64;
/// How often an unwritable journal tries a write again.
pub const PROBE_EVERY: Duration = Duration::from_millis(250);
/// The writer keeps at least this many bytes of zeros written ahead of its
/// records, and writes the next run of them with the group that reaches
/// them. A group's `fsync` then overwrites blocks the file already has
/// within its size: only the data goes to disk, not the file's metadata
/// (its size, its block map) through the file system's own journal. On the
/// ext4 of the benchmark VM, a C loop of 3,000 writes of 1.2 kB (a group),
/// each followed by `fdatasync`, took 81–85 µs of CPU per `fdatasync`
/// appending and 50 µs over zeros laid 64 kB ahead.
pub const ZERO_AHEAD: u64 = 64 << 10;

const KIND_DEDUCT: u8 = 1;
const KIND_INTENT: u8 = 2;
const KIND_PROBE: u8 = 3;
const KIND_CHECKPOINT: u8 = 4;

/// `--durability`: what a SIGKILL may lose.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Durability {
    /// Acknowledge from memory; the flush makes usage durable every
    /// `flush_interval`. A SIGKILL loses at most about one interval.
    #[default]
    Flush,
    /// Acknowledge once the deduction is in the local journal, synced.
    Journal,
}

impl std::str::FromStr for Durability {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "flush" => Ok(Durability::Flush),
            "journal" => Ok(Durability::Journal),
            other => Err(format!("`{other}` is not flush or journal")),
        }
    }
}

/// The journal directory of a store: beside its spill file.
pub fn journal_dir(url: &StoreUrl) -> PathBuf {
    crate::store::spill_path(url).with_extension("journal")
}

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("journal {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("journal checkpoint {path} is unreadable ({why}); nothing was replayed. Look at the file: replaying without it may bill usage twice")]
    Checkpoint { path: PathBuf, why: String },
    #[error("the journal cannot be written ({0}); deductions are refused until it can")]
    Unwritable(String),
    #[error("{0}")]
    Spill(#[from] crate::spill::SpillError),
    /// A part the replay encoded to hold it did not decode: a defect, not
    /// the journal's content (that was decoded once already).
    #[error("the journal's replay could not decode a part it had held: {0}; nothing was replayed")]
    Held(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// === records ===

/// A record's payload.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Record {
    /// What one deduction group added to the accounts' unflushed changes,
    /// in the epoch it did so.
    Deduct {
        epoch: u64,
        parts: Vec<AccountFlush>,
    },
    /// A flush batch, taken in epoch `epoch`, is about to be written.
    Intent {
        epoch: u64,
        batch_id: String,
        now: Ts,
        accounts: Vec<Arc<str>>,
    },
    /// A write probe of an unwritable journal; carries nothing.
    Probe,
    /// The checkpoint file's content.
    Checkpoint { epoch: u64, journal_id: u64 },
}

impl Record {
    fn kind(&self) -> u8 {
        match self {
            Record::Deduct { .. } => KIND_DEDUCT,
            Record::Intent { .. } => KIND_INTENT,
            Record::Probe => KIND_PROBE,
            Record::Checkpoint { .. } => KIND_CHECKPOINT,
        }
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct DeductBody<'a> {
    e: u64,
    #[serde(borrow)]
    p: std::borrow::Cow<'a, [AccountFlush]>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct IntentBody {
    e: u64,
    b: String,
    now: Ts,
    a: Vec<Arc<str>>,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct CheckpointBody {
    e: u64,
    id: u64,
}

/// Appends one framed record to `out`.
pub fn encode(record: &Record, out: &mut Vec<u8>) {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER]);
    out.push(VERSION);
    out.push(record.kind());
    // postcard: compact and fast (a deduction is about 80 bytes), and
    // serializing these plain structs into a Vec cannot fail.
    let encoded = match record {
        Record::Deduct { epoch, parts } => postcard::to_extend(
            &DeductBody {
                e: *epoch,
                p: std::borrow::Cow::Borrowed(parts),
            },
            std::mem::take(out),
        ),
        Record::Intent {
            epoch,
            batch_id,
            now,
            accounts,
        } => postcard::to_extend(
            &IntentBody {
                e: *epoch,
                b: batch_id.clone(),
                now: *now,
                a: accounts.clone(),
            },
            std::mem::take(out),
        ),
        Record::Probe => Ok(std::mem::take(out)),
        Record::Checkpoint { epoch, journal_id } => postcard::to_extend(
            &CheckpointBody {
                e: *epoch,
                id: *journal_id,
            },
            std::mem::take(out),
        ),
    };
    match encoded {
        Ok(v) => *out = v,
        Err(e) => unreachable!("postcard cannot fail to serialize into a Vec: {e}"),
    }
    frame(out, start);
}

/// Fills in the header of the record that starts at `start`.
fn frame(out: &mut [u8], start: usize) {
    let body = &out[start + HEADER..];
    let len = u32::try_from(body.len()).unwrap_or(u32::MAX);
    let crc = crc32fast::hash(body);
    out[start..start + 4].copy_from_slice(&len.to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// Why reading stopped before the end of a file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stop {
    /// Where the bad record starts.
    pub offset: u64,
    pub why: String,
}

/// What a file holds: the good records with their offsets, and where and
/// why reading stopped, if before the end.
#[derive(Debug, Default)]
pub struct Decoded {
    pub records: Vec<(u64, Record)>,
    pub stop: Option<Stop>,
}

/// Decodes a payload that must be exactly one value.
fn whole<'a, T: serde::Deserialize<'a>>(payload: &'a [u8]) -> Result<T, postcard::Error> {
    match postcard::take_from_bytes(payload)? {
        (v, []) => Ok(v),
        _ => Err(postcard::Error::DeserializeBadEncoding),
    }
}

/// Decodes one record's body (version, kind, payload).
fn decode_body(body: &[u8]) -> Result<Record, String> {
    let [version, kind, payload @ ..] = body else {
        return Err("body shorter than its version and kind".into());
    };
    if *version != VERSION {
        return Err(format!("unknown record version {version}"));
    }
    let bad = |e: postcard::Error| format!("payload does not decode: {e}");
    let epoch = |e: u64| {
        if e > MAX_EPOCH {
            Err(format!(
                "epoch {e} is past {MAX_EPOCH}, further than any journal counts"
            ))
        } else {
            Ok(e)
        }
    };
    Ok(match *kind {
        KIND_DEDUCT => {
            let b: DeductBody<'_> = whole(payload).map_err(bad)?;
            Record::Deduct {
                epoch: epoch(b.e)?,
                parts: b.p.into_owned(),
            }
        }
        KIND_INTENT => {
            let b: IntentBody = whole(payload).map_err(bad)?;
            Record::Intent {
                epoch: epoch(b.e)?,
                batch_id: b.b,
                now: b.now,
                accounts: b.a,
            }
        }
        KIND_PROBE if payload.is_empty() => Record::Probe,
        KIND_CHECKPOINT => {
            let b: CheckpointBody = whole(payload).map_err(bad)?;
            Record::Checkpoint {
                epoch: epoch(b.e)?,
                journal_id: b.id,
            }
        }
        k => return Err(format!("unknown record kind {k}")),
    })
}

/// Decodes every record of `buf` up to the first bad one. Never panics,
/// whatever `buf` holds.
pub fn decode(buf: &[u8]) -> Decoded {
    let mut records = Records::new(buf);
    let mut out = Decoded {
        records: records.by_ref().collect(),
        stop: None,
    };
    // Reading a slice cannot fail.
    out.stop = records.stop;
    out
}

/// The records of a journal file, read from `R` one at a time with their
/// offsets, up to the first bad one; [`Records::stop`] then says where and
/// why. A replay reads a segment this way, so that it holds one record of
/// it at a time, never the file. An I/O error ends the records too and is
/// kept in [`Records::failed`]: it is not the file's content.
pub struct Records<R> {
    src: R,
    at: u64,
    ended: bool,
    /// The body being read, its allocation kept from record to record.
    body: Vec<u8>,
    /// Set once the reading stopped at a bad record.
    pub stop: Option<Stop>,
    /// Set once a read failed.
    pub failed: Option<std::io::Error>,
}

impl<R: std::io::Read> Records<R> {
    pub fn new(src: R) -> Records<R> {
        Records {
            src,
            at: 0,
            ended: false,
            body: Vec::new(),
            stop: None,
            failed: None,
        }
    }

    /// Fills `out` (less only at the end of the file); how much it read.
    fn fill(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let mut got = 0;
        while got < out.len() {
            match self.src.read(&mut out[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }

    /// Whether every byte left is zero (reads them all).
    fn zeros_to_the_end(&mut self) -> std::io::Result<bool> {
        let mut chunk = [0u8; 8192];
        loop {
            match self.src.read(&mut chunk) {
                Ok(0) => return Ok(true),
                Ok(n) if chunk[..n].iter().all(|b| *b == 0) => {}
                Ok(_) => return Ok(false),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    fn read_one(&mut self) -> std::io::Result<Result<Option<Record>, String>> {
        use std::io::Read;
        let mut header = [0u8; HEADER];
        let got = self.fill(&mut header)?;
        if got == 0 {
            return Ok(Ok(None));
        }
        if header.iter().all(|b| *b == 0) && (got < HEADER || self.zeros_to_the_end()?) {
            // The zeros the writer lays ahead of its records
            // ([`ZERO_AHEAD`]): the end of the records, not a bad one (a
            // header of zeros never framed a record: no body is empty).
            return Ok(Ok(None));
        }
        if got < HEADER {
            return Ok(Err(format!(
                "torn record: {got} byte(s) of an {HEADER}-byte header"
            )));
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
        if len > MAX_BODY {
            return Ok(Err(format!(
                "record length {len} is past the {MAX_BODY}-byte limit"
            )));
        }
        // Read as it comes: a torn length never allocates more than the
        // file holds.
        let mut body = std::mem::take(&mut self.body);
        body.clear();
        let got = (&mut self.src).take(len as u64).read_to_end(&mut body)?;
        let record = if got < len {
            Err(format!("torn record: {got} of its {len} bytes"))
        } else if crc32fast::hash(&body) != crc {
            Err("CRC mismatch".into())
        } else {
            decode_body(&body).map(Some)
        };
        if let Ok(Some(_)) = record {
            self.at += (HEADER + len) as u64;
        }
        self.body = body;
        Ok(record)
    }
}

impl<R: std::io::Read> Iterator for Records<R> {
    type Item = (u64, Record);

    fn next(&mut self) -> Option<(u64, Record)> {
        if self.ended {
            return None;
        }
        let at = self.at;
        let record = match self.read_one() {
            Ok(Ok(Some(r))) => return Some((at, r)),
            Ok(Ok(None)) => None,
            Ok(Err(why)) => {
                self.stop = Some(Stop { offset: at, why });
                None
            }
            Err(e) => {
                self.failed = Some(e);
                None
            }
        };
        self.ended = true;
        record
    }
}

// === capture ===

thread_local! {
    /// Set by [`Journal::capture`] around one synchronous deduction: the
    /// meter's ledger writes (`Meter::record`, the one place a deduction
    /// changes an account's unflushed changes) are copied here.
    static CAPTURE: RefCell<Option<Vec<AccountFlush>>> = const { RefCell::new(None) };
}

/// Whether a deduction on this thread is being journaled.
pub(crate) fn capturing() -> bool {
    CAPTURE.with(|c| c.borrow().is_some())
}

/// Copies what a deduction adds to an account's unflushed changes.
pub(crate) fn captured(part: AccountFlush) {
    CAPTURE.with(|c| {
        if let Some(v) = c.borrow_mut().as_mut() {
            v.push(part);
        }
    });
}

// === group commit ===

/// One group commit: every record waiting when the writer took them.
#[derive(Default)]
pub struct Group {
    outcome: OnceLock<Result<(), String>>,
    done: tokio::sync::Notify,
}

impl Group {
    fn finish(&self, r: Result<(), String>) {
        let _ = self.outcome.set(r);
        self.done.notify_waiters();
    }

    /// Waits until the group's records are durable, or their write failed.
    pub async fn wait(&self) -> Result<(), JournalError> {
        loop {
            let notified = self.done.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if let Some(r) = self.outcome.get() {
                return r.clone().map_err(JournalError::Unwritable);
            }
            notified.await;
        }
    }
}

/// A deduction's place in a group: await [`Commit::wait`] before answering.
pub struct Commit(Arc<Group>);

impl Commit {
    pub async fn wait(self) -> Result<(), JournalError> {
        self.0.wait().await
    }
}

struct Queue {
    /// (epoch, framed record) in submission order.
    records: Vec<(u64, Vec<u8>)>,
    group: Arc<Group>,
    stop: bool,
    /// When the first of `records` was handed over.
    first_at: Option<Instant>,
    /// One of `records` comes from a thread of no hooked runtime: no park
    /// will tell when to take it.
    unhooked: bool,
    /// A hooked thread has handed over a record: while the queue is empty,
    /// the writer looks at it every [`HOLD_BACKSTOP`].
    hooked_seen: bool,
}

// === when the writer takes a group ===

/// The longest a record waits for a worker to go idle before the writer
/// takes it anyway (a worker that never parks: overload, or a long run of
/// other calls).
pub const HOLD_MAX: Duration = Duration::from_millis(1);
/// A group this large is taken without waiting for an idle worker.
const HOLD_RECORDS: usize = 1024;
/// An idle writer whose records wait for a worker's park looks at them at
/// least this often (the last backstop of [`HOLD_MAX`]: records handed over
/// while every worker stays busy and no later record comes to notice their
/// age).
const HOLD_BACKSTOP: Duration = Duration::from_millis(20);

thread_local! {
    /// Whether this thread belongs to a runtime that tells the journal when
    /// its workers park (built with [`park_hooks`]). A record handed over
    /// from any other thread is taken as soon as the writer can, as before
    /// the hooks.
    static HOOKED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}
/// Workers of hooked runtimes that are parked (they have no task to run).
static PARKED: AtomicUsize = AtomicUsize::new(0);

/// The writers a worker's park may wake.
static HANDOFFS: parking_lot::RwLock<Vec<std::sync::Weak<Handoff>>> =
    parking_lot::RwLock::new(Vec::new());

/// Installs the runtime hooks that let the journal writer take its group
/// when a worker parks: `serve` runs on a runtime built with them.
///
/// Why: with the core saturated, a writer that takes the records as soon
/// as it can (woken by the first record of a group, or right after the
/// previous `fsync`) takes the few handed over so far and pays a write, an
/// `fsync` and the wake-ups for them while the worker is still deducting
/// the calls that would have joined them. A worker parks when every call
/// it holds waits (mostly for the journal): then the group is as large as
/// it will get. Records wait at most [`HOLD_MAX`] for a park.
pub fn park_hooks(builder: &mut tokio::runtime::Builder) -> &mut tokio::runtime::Builder {
    builder
        .on_thread_start(|| HOOKED.set(true))
        .on_thread_park(worker_parks)
        .on_thread_unpark(|| {
            PARKED.fetch_sub(1, Ordering::SeqCst);
        })
}

/// A worker of the hooked runtime is about to park.
fn worker_parks() {
    PARKED.fetch_add(1, Ordering::SeqCst);
    for h in HANDOFFS.read().iter() {
        if let Some(h) = h.upgrade() {
            h.worker_parks();
        }
    }
}

/// The queue between the deductions and the writer thread, and when the
/// writer takes it.
struct Handoff {
    queue: parking_lot::Mutex<Queue>,
    wake: parking_lot::Condvar,
    /// The writer waits for a worker to park (for [`worker_parks`] to wake it).
    holding: AtomicBool,
    /// Records in the queue (read without its lock by [`worker_parks`]).
    pending: AtomicUsize,
    /// [`HOLD_MAX`], but for tests.
    hold_max: Duration,
}

impl Handoff {
    fn worker_parks(&self) {
        // SeqCst, with `PARKED` counted first and `holding` set first in
        // the writer: either the writer sees the park before it waits, or
        // this sees `holding` and wakes it (under the queue's lock, which
        // the writer holds until it waits).
        if self.holding.load(Ordering::SeqCst) && self.pending.load(Ordering::SeqCst) > 0 {
            let _q = self.queue.lock();
            self.wake.notify_one();
        }
    }
}

/// Hooks for the journal metrics, so this module needs no metrics crate.
pub trait JournalObserver: Send + Sync + 'static {
    /// A group commit: how many records and bytes, and how long `fsync` took.
    fn committed(&self, records: usize, bytes: usize, fsync: Duration);
    /// The journal's size on disk.
    fn size(&self, bytes: u64);
    fn writable(&self, writable: bool);
}

impl JournalObserver for () {
    fn committed(&self, _: usize, _: usize, _: Duration) {}
    fn size(&self, _: u64) {}
    fn writable(&self, _: bool) {}
}

/// The segment files the writer knows: (epoch, n) -> bytes.
type Segments = BTreeMap<(u64, u32), u64>;

fn segment_name(epoch: u64, n: u32) -> String {
    format!("{epoch:020}-{n:04}.seg")
}

/// `None` for a name the writer never makes, among them an epoch past
/// [`MAX_EPOCH`]: such a file is not the journal's and is left alone.
fn parse_segment_name(name: &str) -> Option<(u64, u32)> {
    let stem = name.strip_suffix(".seg")?;
    let (e, n) = stem.split_once('-')?;
    Some((e.parse().ok().filter(|e| *e <= MAX_EPOCH)?, n.parse().ok()?))
}

/// A segment file: its (epoch, n) and its path.
type SegmentFile = ((u64, u32), PathBuf);

/// Every segment file of `dir`, in order.
fn list_segments(dir: &Path) -> Result<Vec<SegmentFile>, JournalError> {
    let mut out = Vec::new();
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io(dir)(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(dir))?;
        if let Some(key) = entry.file_name().to_str().and_then(parse_segment_name) {
            out.push((key, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

fn sync_dir(dir: &Path) -> Result<(), JournalError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

fn checkpoint_path(dir: &Path) -> PathBuf {
    dir.join("checkpoint")
}

/// Reads the checkpoint: (epoch, journal id), or `None` if there is none.
fn read_checkpoint(dir: &Path) -> Result<Option<(u64, u64)>, JournalError> {
    let path = checkpoint_path(dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(&path)(e)),
    };
    let d = decode(&bytes);
    match (d.records.as_slice(), d.stop) {
        ([(_, Record::Checkpoint { epoch, journal_id })], None) => Ok(Some((*epoch, *journal_id))),
        (_, Some(stop)) => Err(JournalError::Checkpoint {
            path,
            why: format!("at offset {}: {}", stop.offset, stop.why),
        }),
        _ => Err(JournalError::Checkpoint {
            path,
            why: "not one checkpoint record".into(),
        }),
    }
}

/// Writes the checkpoint atomically: a temporary file, synced, renamed,
/// and the directory synced.
fn write_checkpoint(dir: &Path, epoch: u64, journal_id: u64) -> Result<(), JournalError> {
    let path = checkpoint_path(dir);
    let tmp = dir.join("checkpoint.tmp");
    let mut buf = Vec::new();
    encode(&Record::Checkpoint { epoch, journal_id }, &mut buf);
    {
        let mut f = File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(&buf).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, &path).map_err(io(&path))?;
    sync_dir(dir)
}

// === the journal ===

pub struct Journal {
    dir: PathBuf,
    journal_id: u64,
    /// Deductions hold a pass from reading the epoch to handing over their
    /// record; [`take`](Self::take) moves the epoch with no pass held.
    gate: Gate,
    epoch: AtomicU64,
    handoff: Arc<Handoff>,
    writable: AtomicBool,
    writable_tx: tokio::sync::watch::Sender<bool>,
    segments: parking_lot::Mutex<Segments>,
    /// Batches taken in journal mode: id -> (take epoch, intent durable).
    batches: parking_lot::Mutex<HashMap<String, (u64, bool)>>,
    observer: Arc<dyn JournalObserver>,
    writer: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The epoch the last checkpoint covers.
    checkpointed: AtomicU64,
    /// Logged once per run of set-aside accounts.
    warned_set_aside: AtomicBool,
}

impl Journal {
    /// Opens the journal in `dir` for writing, after [`replay`] emptied it,
    /// and starts its writer thread.
    pub fn open(
        dir: &Path,
        replayed: &Replayed,
        observer: Arc<dyn JournalObserver>,
    ) -> Result<Arc<Journal>, JournalError> {
        Self::open_holding(dir, replayed, observer, HOLD_MAX)
    }

    /// [`open`](Self::open), with records of hooked threads held up to
    /// `hold_max` for a worker's park.
    fn open_holding(
        dir: &Path,
        replayed: &Replayed,
        observer: Arc<dyn JournalObserver>,
        hold_max: Duration,
    ) -> Result<Arc<Journal>, JournalError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let segments: Segments = list_segments(dir)?
            .into_iter()
            .map(|(k, p)| (k, std::fs::metadata(&p).map_or(0, |m| m.len())))
            .collect();
        let (writable_tx, _) = tokio::sync::watch::channel(true);
        let journal = Arc::new(Journal {
            dir: dir.to_path_buf(),
            journal_id: replayed.journal_id,
            gate: Gate::default(),
            epoch: AtomicU64::new(replayed.next_epoch),
            handoff: Arc::new(Handoff {
                queue: parking_lot::Mutex::new(Queue {
                    records: Vec::new(),
                    group: Arc::default(),
                    stop: false,
                    first_at: None,
                    unhooked: false,
                    hooked_seen: false,
                }),
                wake: parking_lot::Condvar::new(),
                holding: AtomicBool::new(false),
                pending: Default::default(),
                hold_max,
            }),
            writable: AtomicBool::new(true),
            writable_tx,
            segments: parking_lot::Mutex::new(segments),
            batches: Default::default(),
            observer,
            writer: parking_lot::Mutex::new(None),
            checkpointed: AtomicU64::new(replayed.next_epoch.saturating_sub(1)),
            warned_set_aside: AtomicBool::new(false),
        });
        {
            let mut all = HANDOFFS.write();
            all.retain(|h| h.strong_count() > 0);
            all.push(Arc::downgrade(&journal.handoff));
        }
        journal.report_size();
        journal.observer.writable(true);
        let writer = std::thread::Builder::new()
            .name("packmeter-journal".into())
            .spawn({
                let j = journal.clone();
                move || j.write_loop()
            })
            .map_err(io(dir))?;
        *journal.writer.lock() = Some(writer);
        Ok(journal)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the last write succeeded: while not, deductions are refused.
    pub fn writable(&self) -> bool {
        self.writable.load(Ordering::Acquire)
    }

    /// Follows [`writable`](Self::writable), for health.
    pub fn watch_writable(&self) -> tokio::sync::watch::Receiver<bool> {
        self.writable_tx.subscribe()
    }

    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Runs one synchronous deduction and journals what it changed: the
    /// epoch is read and the record handed to the writer under one pass,
    /// so a flush's [`take`](Self::take) sees the deduction wholly before
    /// or wholly after it. Returns the deduction's result and, if it
    /// changed anything, the commit to await before acknowledging it.
    pub fn capture<R>(&self, deduct: impl FnOnce() -> R) -> (R, Option<Commit>) {
        // The gate is never closed: it only separates passes from takes.
        let Ok(pass) = self.gate.enter() else {
            unreachable!("the journal's gate is never closed")
        };
        let epoch = self.epoch.load(Ordering::SeqCst);
        CAPTURE.with(|c| *c.borrow_mut() = Some(Vec::new()));
        let r = deduct();
        let parts = CAPTURE.with(|c| c.borrow_mut().take()).unwrap_or_default();
        let commit = (!parts.is_empty()).then(|| {
            let mut buf = Vec::with_capacity(256);
            encode(&Record::Deduct { epoch, parts }, &mut buf);
            self.submit(epoch, buf)
        });
        drop(pass);
        (r, commit)
    }

    /// Hands a framed record to the writer.
    fn submit(&self, epoch: u64, buf: Vec<u8>) -> Commit {
        let h = &*self.handoff;
        let mut q = h.queue.lock();
        q.records.push((epoch, buf));
        let n = q.records.len();
        h.pending.store(n, Ordering::SeqCst);
        if n == 1 {
            q.first_at = Some(Instant::now());
        }
        let wake = if !HOOKED.get() {
            q.unhooked = true;
            true
        } else {
            // Woken now if a worker is parked (a core has nothing to do, so
            // waiting would only add latency), if the records are many or
            // old, or for the first hooked record ever (the writer waits
            // without a timeout until then); otherwise by the next park.
            let first = !std::mem::replace(&mut q.hooked_seen, true);
            first
                || PARKED.load(Ordering::SeqCst) > 0
                || n >= HOLD_RECORDS
                || q.first_at.is_some_and(|t| t.elapsed() >= h.hold_max)
        };
        let group = q.group.clone();
        drop(q);
        if wake {
            h.wake.notify_one();
        }
        Commit(group)
    }

    /// The flusher's take: moves the epoch on and runs `take` (which takes
    /// every dirty account's changes) while no deduction is between its
    /// epoch and its record. Returns the epoch the taken changes belong to.
    pub fn take<R>(&self, take: impl FnOnce() -> R) -> (u64, R) {
        self.gate.exclusive(|_, _| {
            let epoch = self.epoch.fetch_add(1, Ordering::SeqCst);
            (epoch, take())
        })
    }

    /// Registers a batch of the take of `epoch`.
    pub fn register(&self, batch_id: &str, epoch: u64) {
        self.batches
            .lock()
            .insert(batch_id.to_owned(), (epoch, false));
    }

    /// A batch made of part of `parent`'s accounts (narrowing a permanent
    /// error): of the same take.
    pub fn derive(&self, parent: &str, child: &str) {
        let mut b = self.batches.lock();
        if let Some(&(epoch, _)) = b.get(parent) {
            b.insert(child.to_owned(), (epoch, false));
        }
    }

    /// Makes the batch's intent durable before the store is asked to write
    /// it (once per batch id; a retry under the same id has it already).
    pub async fn before_write(&self, batch: &FlushBatch) -> Result<(), JournalError> {
        let epoch = match self.batches.lock().get(&batch.batch_id) {
            None | Some((_, true)) => return Ok(()),
            Some(&(epoch, false)) => epoch,
        };
        let mut buf = Vec::new();
        encode(
            &Record::Intent {
                epoch,
                batch_id: batch.batch_id.clone(),
                now: batch.now,
                accounts: batch
                    .accounts
                    .iter()
                    .map(|a| a.account_id.clone())
                    .collect(),
            },
            &mut buf,
        );
        // In the current epoch's segment: after the take, never before it.
        self.submit(self.epoch(), buf).wait().await?;
        if let Some(e) = self.batches.lock().get_mut(&batch.batch_id) {
            e.1 = true;
        }
        Ok(())
    }

    /// The store applied the batch, or refused it for good.
    pub fn resolved(&self, batch_id: &str) {
        self.batches.lock().remove(batch_id);
    }

    /// After a flush wrote every batch of the take of `epoch` and nothing
    /// is left to retry: moves the checkpoint there and deletes the
    /// segments it covers. `set_aside` accounts keep the journal whole.
    pub async fn checkpoint(self: &Arc<Self>, epoch: u64, set_aside: usize) {
        if set_aside > 0 {
            if !self.warned_set_aside.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    set_aside,
                    "accounts are set aside (the store refuses their usage): the journal is not \
                     truncated until a restart replays them"
                );
            }
            return;
        }
        self.warned_set_aside.store(false, Ordering::Relaxed);
        let covered: Vec<(u64, u32)> = self
            .segments
            .lock()
            .keys()
            .filter(|(e, _)| *e <= epoch)
            .copied()
            .collect();
        if covered.is_empty() || self.checkpointed.load(Ordering::Relaxed) >= epoch {
            return;
        }
        let this = self.clone();
        let done = tokio::task::spawn_blocking(move || -> Result<(), JournalError> {
            write_checkpoint(&this.dir, epoch, this.journal_id)?;
            this.checkpointed.fetch_max(epoch, Ordering::Relaxed);
            for key in covered {
                let path = this.dir.join(segment_name(key.0, key.1));
                match std::fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&path)(e)),
                    _ => {
                        this.segments.lock().remove(&key);
                    }
                }
            }
            this.report_size();
            Ok(())
        })
        .await;
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "journal checkpoint failed; the journal is kept and truncated at a later flush")
            }
            Err(e) => tracing::warn!(error = %e, "journal checkpoint task failed"),
        }
    }

    fn report_size(&self) {
        self.observer.size(self.segments.lock().values().sum());
    }

    /// Stops the writer once every record handed to it is written.
    pub fn close(&self) {
        self.handoff.queue.lock().stop = true;
        self.handoff.wake.notify_all();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
    }

    fn set_writable(&self, ok: bool) {
        if self.writable.swap(ok, Ordering::AcqRel) != ok {
            self.observer.writable(ok);
            self.writable_tx.send_replace(ok);
            if ok {
                tracing::info!(dir = %self.dir.display(), "the journal is writable again; deductions are accepted");
            }
        }
    }

    // === the writer thread ===

    fn write_loop(&self) {
        let mut out = Writer {
            dir: &self.dir,
            file: None,
        };
        loop {
            let (records, group) = {
                let h = &*self.handoff;
                let mut q = h.queue.lock();
                loop {
                    if q.stop {
                        break;
                    }
                    if !self.writable() {
                        // Probing: records are refused before they get here
                        // (a group already handed over goes with the probe).
                        if q.records.is_empty() && h.wake.wait_for(&mut q, PROBE_EVERY).timed_out()
                        {
                            break;
                        }
                        if !q.records.is_empty() {
                            break;
                        }
                        continue;
                    }
                    // Records of hooked threads alone are taken once a
                    // worker is parked, or once they are many or old.
                    let pending = !q.records.is_empty();
                    if pending
                        && (q.unhooked
                            || q.records.len() >= HOLD_RECORDS
                            || q.first_at.is_some_and(|t| t.elapsed() >= h.hold_max))
                    {
                        break;
                    }
                    h.holding.store(true, Ordering::SeqCst);
                    if pending && PARKED.load(Ordering::SeqCst) > 0 {
                        h.holding.store(false, Ordering::SeqCst);
                        break;
                    }
                    match q.first_at {
                        Some(t) if pending => {
                            let left = (t + h.hold_max).saturating_duration_since(Instant::now());
                            h.wake.wait_for(&mut q, left);
                        }
                        _ if q.hooked_seen => {
                            h.wake.wait_for(&mut q, HOLD_BACKSTOP);
                        }
                        _ => h.wake.wait(&mut q),
                    }
                    h.holding.store(false, Ordering::SeqCst);
                }
                h.pending.store(0, Ordering::SeqCst);
                q.first_at = None;
                q.unhooked = false;
                if q.records.is_empty() && q.stop {
                    if let Some(seg) = &out.file {
                        // Tidy: a clean stop leaves no zeros after the
                        // records (a build before them would warn of a bad
                        // record there at replay, and keep every record).
                        let _ = seg.file.set_len(seg.at);
                    }
                    return;
                }
                let group = std::mem::take(&mut q.group);
                (std::mem::take(&mut q.records), group)
            };
            if records.is_empty() {
                // An unwritable journal probes with a record of its own.
                let mut buf = Vec::new();
                encode(&Record::Probe, &mut buf);
                let probe = [(self.epoch(), buf)];
                if self.write_group(&mut out, &probe).is_ok() {
                    self.set_writable(true);
                }
                continue;
            }
            match self.write_group(&mut out, &records) {
                Ok(()) => {
                    self.set_writable(true);
                    group.finish(Ok(()));
                }
                Err(e) => {
                    let msg = e.to_string();
                    if self.writable() {
                        tracing::error!(error = %msg, dir = %self.dir.display(), "journal write failed: refusing deductions until it can be written again");
                    }
                    self.set_writable(false);
                    group.finish(Err(msg));
                }
            }
        }
    }

    /// Writes and syncs a group; on any error the file is dropped (the next
    /// write starts a new one, so a torn group is never written over).
    fn write_group(
        &self,
        out: &mut Writer<'_>,
        records: &[(u64, Vec<u8>)],
    ) -> Result<(), JournalError> {
        let mut write = || -> Result<(), JournalError> {
            // One run of records per epoch, each epoch in its own file.
            for run in records.chunk_by(|a, b| a.0 == b.0) {
                let key = out.open(run[0].0, &self.segments)?;
                let mut buf = Vec::with_capacity(run.iter().map(|(_, r)| r.len()).sum());
                for (_, r) in run {
                    buf.extend_from_slice(r);
                }
                let written = buf.len();
                let seg = out.segment();
                seg.append(&mut buf)?;
                let started = Instant::now();
                seg.file.sync_data().map_err(io(&seg.path))?;
                let fsync = started.elapsed();
                *self.segments.lock().entry(key).or_default() += written as u64;
                self.observer.committed(run.len(), written, fsync);
            }
            Ok(())
        };
        let result = write();
        if result.is_err() {
            out.file = None;
        }
        self.report_size();
        result
    }
}

/// The writer thread's open segment.
struct Writer<'a> {
    dir: &'a Path,
    file: Option<Segment>,
}

/// A segment being written.
struct Segment {
    epoch: u64,
    n: u32,
    file: File,
    path: PathBuf,
    /// Where the next record goes: the end of the records.
    at: u64,
    /// The end of the zeros written after them (the file's size).
    zeroed: u64,
}

impl Segment {
    /// Writes `records` at the end of the records (not synced). When they
    /// reach past the zeros already written, [`ZERO_AHEAD`] more go with
    /// them in the same write. `records` may be extended with those zeros.
    fn append(&mut self, records: &mut Vec<u8>) -> Result<(), JournalError> {
        use std::os::unix::fs::FileExt;
        let len = records.len() as u64;
        let end = self.at + len;
        if end > self.zeroed {
            let zeroed = end + ZERO_AHEAD;
            records.resize((zeroed - self.at) as usize, 0);
            self.file
                .write_all_at(records, self.at)
                .map_err(io(&self.path))?;
            self.zeroed = zeroed;
        } else {
            self.file
                .write_all_at(records, self.at)
                .map_err(io(&self.path))?;
        }
        self.at = end;
        Ok(())
    }
}

impl Writer<'_> {
    /// Makes the open file one of `epoch`, creating a new one if needed.
    fn open(
        &mut self,
        epoch: u64,
        segments: &parking_lot::Mutex<Segments>,
    ) -> Result<(u64, u32), JournalError> {
        if let Some(seg) = &self.file {
            if seg.epoch >= epoch {
                // Records never go back in epoch; keep writing this file.
                return Ok((seg.epoch, seg.n));
            }
        }
        // A new file: after the highest one of this epoch (a failed write
        // left its file torn).
        let n = segments
            .lock()
            .range((epoch, 0)..=(epoch, u32::MAX))
            .next_back()
            .map_or(0, |((_, n), _)| n + 1);
        std::fs::create_dir_all(self.dir).map_err(io(self.dir))?;
        let path = self.dir.join(segment_name(epoch, n));
        // Not in append mode: records go at `Segment::at`, over the zeros
        // written ahead of them. The name is new (the one after the highest
        // this journal knows of the epoch); were a file there anyway, its
        // bytes are kept and the records go after them, as an append would.
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(&path)
            .map_err(io(&path))?;
        let len = file.metadata().map_err(io(&path))?.len();
        // The new name must survive a crash too.
        sync_dir(self.dir)?;
        segments.lock().insert((epoch, n), 0);
        self.file = Some(Segment {
            epoch,
            n,
            file,
            path,
            at: len,
            zeroed: len,
        });
        Ok((epoch, n))
    }

    fn segment(&mut self) -> &mut Segment {
        let Some(seg) = self.file.as_mut() else {
            unreachable!("open() ran first")
        };
        seg
    }
}

// === replay ===

/// What [`replay`] found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Deduction records replayed (their epoch after the checkpoint).
    pub deductions: usize,
    /// Batches appended to the spill file.
    pub batches: usize,
    /// Files whose reading stopped at a bad record.
    pub stopped: usize,
    /// The first epoch of this run.
    pub next_epoch: u64,
    pub journal_id: u64,
}

/// Accounts per batch the replay writes for deductions no flush took, as
/// the flusher's batches. Part of those batches' ids: a replay that is cut
/// short (after the spill file, before the checkpoint) runs again with the
/// same chunks, and the store skips the ids it applied.
const REPLAY_BATCH_ACCOUNTS: usize = crate::flush::BATCH_ACCOUNTS;

/// Reads the journal in `dir` and turns what the store may lack into
/// batches appended to the spill file at `spill`; then moves the
/// checkpoint past them and deletes the segments. Run before the server
/// starts; [`crate::spill::replay`] then writes them.
///
/// It reads the segments twice, so as not to hold the journal in memory:
/// first the intents (which batch took which accounts, in which epoch),
/// then the deductions, each merged into the batch it goes to. A flush
/// batch's usage is written to the spill file as soon as no later record
/// can add to it; what no flush took is written last.
pub fn replay(dir: &Path, spill: &Path, now: Ts) -> Result<Replayed, JournalError> {
    let checkpoint = read_checkpoint(dir)?;
    let (covered, journal_id) = match checkpoint {
        Some(c) => c,
        None => (0, crate::flush::random_u64()),
    };
    if checkpoint.is_none() && !list_segments(dir)?.is_empty() {
        // The spill file's batch ids carry the journal's id: a replay cut
        // short after the spill file is written must find the same id at
        // the next start, or the store would apply its batches again under
        // new ids. A journal without a checkpoint (a server killed before
        // its first replay was done) gets one now, covering nothing.
        write_checkpoint(dir, 0, journal_id)?;
    }
    let mut done = Replayed {
        journal_id,
        ..Replayed::default()
    };
    let segments = list_segments(dir)?;
    let mut last_epoch = segments
        .iter()
        .map(|((epoch, _), _)| *epoch)
        .fold(covered, u64::max);
    let mut takes = Takes::default();
    done.stopped = each_record(&segments, covered, true, |seq, record| {
        match record {
            Record::Deduct { epoch, .. } => {
                last_epoch = last_epoch.max(epoch);
                done.deductions += 1;
                takes.deducted(seq, epoch);
            }
            Record::Intent {
                epoch,
                batch_id,
                now,
                accounts,
            } => {
                last_epoch = last_epoch.max(epoch);
                takes.intent(seq, epoch, batch_id, now, accounts);
            }
            _ => {}
        }
        Ok(())
    })?;
    let mut batches = Batches::new(takes, journal_id, covered, last_epoch, now);
    let mut out: Option<crate::spill::Appender> = None;
    let mut write = |batch: FlushBatch| -> Result<(), JournalError> {
        let out = match &mut out {
            Some(out) => out,
            None => out.insert(crate::spill::Appender::open(spill)?),
        };
        done.batches += 1;
        #[cfg(test)]
        tests::WRITTEN_AT.with(|w| w.borrow_mut().push(tests::READ.with(|r| r.get())));
        Ok(out.push(&batch)?)
    };
    each_record(&segments, covered, false, |seq, record| {
        if let Record::Deduct { epoch, parts } = record {
            batches.add(epoch, parts)?;
        }
        #[cfg(test)]
        tests::READ.with(|r| r.set(seq + 1));
        batches.complete(seq, &mut write)
    })?;
    batches.finish(&mut write)?;
    if let Some(out) = out {
        tracing::info!(
            deductions = done.deductions,
            batches = done.batches,
            dir = %dir.display(),
            "journal replay: usage the store may lack goes to the spill file"
        );
        out.commit()?;
    }
    // Everything read is in the spill file now: move past it.
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    write_checkpoint(dir, last_epoch, journal_id)?;
    for (_, path) in &segments {
        std::fs::remove_file(path).map_err(io(path))?;
    }
    sync_dir(dir)?;
    done.next_epoch = last_epoch + 1;
    Ok(done)
}

/// Calls `f` with every deduction and intent after the checkpoint (epoch
/// past `covered`), in journal order, numbered from 0, each read from its
/// file and decoded one at a time. Stops at `f`'s first error. Returns how
/// many files stopped at a bad record, and logs each if `warn`. The same
/// files give the same records and numbers, so the replay's two passes
/// agree.
fn each_record(
    segments: &[SegmentFile],
    covered: u64,
    warn: bool,
    mut f: impl FnMut(u64, Record) -> Result<(), JournalError>,
) -> Result<usize, JournalError> {
    let (mut seq, mut stopped) = (0u64, 0usize);
    for ((epoch, _), path) in segments {
        if *epoch <= covered {
            continue;
        }
        let file = std::fs::File::open(path).map_err(io(path))?;
        let mut records = Records::new(std::io::BufReader::with_capacity(1 << 16, file));
        let mut kept = 0usize;
        for (_, r) in records.by_ref() {
            kept += 1;
            let epoch = match &r {
                Record::Deduct { epoch, .. } | Record::Intent { epoch, .. } => *epoch,
                _ => continue,
            };
            if epoch > covered {
                f(seq, r)?;
                seq += 1;
            }
        }
        if let Some(e) = records.failed {
            return Err(io(path)(e));
        }
        let Some(stop) = records.stop else {
            continue;
        };
        stopped += 1;
        if warn {
            tracing::warn!(
                file = %path.display(),
                offset = stop.offset,
                why = %stop.why,
                kept,
                "journal replay stops reading this file at a bad record; every record before it is kept"
            );
        }
    }
    Ok(stopped)
}

/// The replay's first pass: the journal's intents, which accounts each
/// took, and how far the journal must be read before each one's batch is
/// whole.
#[derive(Default)]
struct Takes {
    /// (take epoch, batch id, batch now, number of the intent's record).
    intents: Vec<(u64, String, Ts, u64)>,
    /// account -> the intents that took it, by take epoch: within an
    /// epoch, the last intent (the narrowest batch that held the account).
    by_account: HashMap<Arc<str>, TakenBy>,
    /// epoch -> the number of the last deduction record of that epoch.
    last_deduction: BTreeMap<u64, u64>,
}

/// The intents that took one account: nearly always one.
enum TakenBy {
    One(u64, usize),
    Many(BTreeMap<u64, usize>),
}

impl TakenBy {
    fn insert(&mut self, epoch: u64, intent: usize) {
        match self {
            TakenBy::One(e, i) if *e == epoch => *i = intent,
            TakenBy::One(e, i) => {
                *self = TakenBy::Many(BTreeMap::from([(*e, *i), (epoch, intent)]))
            }
            TakenBy::Many(m) => {
                m.insert(epoch, intent);
            }
        }
    }

    /// The intent of the first take at or after `epoch`.
    fn first_from(&self, epoch: u64) -> Option<usize> {
        match self {
            TakenBy::One(e, i) => (*e >= epoch).then_some(*i),
            TakenBy::Many(m) => m.range(epoch..).next().map(|(_, i)| *i),
        }
    }
}

impl Takes {
    fn deducted(&mut self, seq: u64, epoch: u64) {
        self.last_deduction.insert(epoch, seq);
    }

    fn intent(&mut self, seq: u64, epoch: u64, batch_id: String, now: Ts, accounts: Vec<Arc<str>>) {
        let i = self.intents.len();
        for a in accounts {
            match self.by_account.entry(a) {
                std::collections::hash_map::Entry::Occupied(mut t) => t.get_mut().insert(epoch, i),
                std::collections::hash_map::Entry::Vacant(v) => {
                    v.insert(TakenBy::One(epoch, i));
                }
            }
        }
        self.intents.push((epoch, batch_id, now, seq));
    }
}

/// One account's parts in a batch while the replay holds them:
/// postcard-encoded back to back, in journal order (about a fourth of
/// their decoded size). Whenever they pass twice their size after the
/// last compaction (and [`COMPACT_AT`]), they are compacted: decoded,
/// merged into one ([`merge`]) and encoded again. So an account deducted a
/// million times is held as about one part, and appending stays linear.
#[derive(Default)]
struct Held {
    bytes: Vec<u8>,
    compacted: usize,
}

/// Bytes of an account's held parts below which they are not compacted
/// (a few parts).
const COMPACT_AT: usize = 1024;

impl Held {
    fn add(&mut self, part: &AccountFlush) -> Result<(), JournalError> {
        let held = |e: postcard::Error| JournalError::Held(e.to_string());
        if self.bytes.is_empty() {
            // Most accounts have one part: no spare capacity for it.
            self.bytes = postcard::to_allocvec(part).map_err(held)?;
            self.bytes.shrink_to_fit();
            return Ok(());
        }
        self.bytes = postcard::to_extend(part, std::mem::take(&mut self.bytes)).map_err(held)?;
        if self.bytes.len() > COMPACT_AT.max(2 * self.compacted) {
            let merged = unheld(&self.bytes)?;
            self.bytes = postcard::to_allocvec(&merged).map_err(held)?;
            self.compacted = self.bytes.len();
        }
        Ok(())
    }
}

/// One batch's parts while the replay holds them, by account. Decoded
/// when the batch is written, so that only one batch is ever held decoded
/// whole.
type HeldParts = BTreeMap<Arc<str>, Held>;

/// The replay's second pass: deduction parts given to the batch each goes
/// to, every batch leaving as soon as it is whole, in the order of the
/// intents, then what no flush took. Deterministic: the same journal
/// yields the same batches and ids.
struct Batches {
    takes: Takes,
    /// For intent i, the number of the record after which no deduction
    /// can go to it: its own, or the last of an epoch at or before its.
    whole_after: Vec<u64>,
    /// The parts of intents not yet written, by intent.
    open: HashMap<usize, HeldParts>,
    /// The next intent to write.
    next: usize,
    rest: HeldParts,
    rest_id: (u64, u64, u64),
    now: Ts,
}

impl Batches {
    fn new(takes: Takes, journal_id: u64, covered: u64, last_epoch: u64, now: Ts) -> Batches {
        // The last deduction record at or before each epoch.
        let mut upto = BTreeMap::new();
        let mut last = 0;
        for (epoch, seq) in &takes.last_deduction {
            last = last.max(*seq);
            upto.insert(*epoch, last);
        }
        let whole_after = takes
            .intents
            .iter()
            .map(|(epoch, _, _, seq)| {
                let deducted = upto.range(..=*epoch).next_back().map_or(0, |(_, s)| *s);
                (*seq).max(deducted)
            })
            .collect();
        Batches {
            takes,
            whole_after,
            open: HashMap::new(),
            next: 0,
            rest: HeldParts::new(),
            rest_id: (journal_id, covered, last_epoch),
            now,
        }
    }

    /// Gives each part of a deduction record to the first take of its
    /// account at or after the record's epoch, or to the rest.
    fn add(&mut self, epoch: u64, parts: Vec<AccountFlush>) -> Result<(), JournalError> {
        for part in parts {
            // The key the takes hold already, when there is one: one copy
            // of the id for both.
            let (key, taken) = match self.takes.by_account.get_key_value(&part.account_id) {
                Some((key, t)) => (key.clone(), t.first_from(epoch)),
                None => (part.account_id.clone(), None),
            };
            let into = match taken {
                Some(i) => self.open.entry(i).or_default(),
                None => &mut self.rest,
            };
            into.entry(key).or_default().add(&part)?;
        }
        Ok(())
    }

    /// Writes the batches whole once record `seq` is read, in intent order.
    fn complete(
        &mut self,
        seq: u64,
        write: &mut impl FnMut(FlushBatch) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        while self.next < self.whole_after.len() && self.whole_after[self.next] <= seq {
            self.write_intent(self.next, write)?;
            self.next += 1;
        }
        Ok(())
    }

    fn write_intent(
        &mut self,
        i: usize,
        write: &mut impl FnMut(FlushBatch) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        let Some(held) = self.open.remove(&i) else {
            return Ok(());
        };
        let (_, batch_id, now, _) = &self.takes.intents[i];
        let (batch_id, now) = (batch_id.clone(), *now);
        let accounts = held
            .into_values()
            .map(|h| unheld(&h.bytes))
            .collect::<Result<_, _>>()?;
        write(FlushBatch {
            batch_id,
            now,
            accounts,
        })
    }

    /// Writes every batch not yet written: the intents' (none once every
    /// record was read), then what no flush took, in chunks named after
    /// the journal.
    fn finish(
        mut self,
        write: &mut impl FnMut(FlushBatch) -> Result<(), JournalError>,
    ) -> Result<(), JournalError> {
        for i in self.next..self.whole_after.len() {
            self.write_intent(i, write)?;
        }
        let (journal_id, covered, last_epoch) = self.rest_id;
        let mut rest = std::mem::take(&mut self.rest).into_values().peekable();
        let mut n = 0;
        while rest.peek().is_some() {
            let accounts = rest
                .by_ref()
                .take(REPLAY_BATCH_ACCOUNTS)
                .map(|h| unheld(&h.bytes))
                .collect::<Result<_, _>>()?;
            write(FlushBatch {
                batch_id: format!("journal-{journal_id:016x}-{covered}-{last_epoch}-{n}"),
                now: self.now,
                accounts,
            })?;
            n += 1;
        }
        Ok(())
    }
}

/// One account's held parts (see [`Held`]), decoded and merged into one.
fn unheld(mut bytes: &[u8]) -> Result<AccountFlush, JournalError> {
    let mut merged: Option<AccountFlush> = None;
    while !bytes.is_empty() {
        let (part, after) = postcard::take_from_bytes::<AccountFlush>(bytes)
            .map_err(|e| JournalError::Held(e.to_string()))?;
        bytes = after;
        match &mut merged {
            None => merged = Some(part),
            Some(m) => merge(m, part),
        }
    }
    merged.ok_or_else(|| JournalError::Held("an account with no part".into()))
}

/// Gives each deduction part to the batch that took it, or to new batches:
/// [`replay`]'s two passes over deductions and intents held in memory.
#[cfg(test)]
fn assign(
    deductions: Vec<(u64, AccountFlush)>,
    intents: Vec<IntentOf>,
    journal_id: u64,
    covered: u64,
    last_epoch: u64,
    now: Ts,
) -> Vec<FlushBatch> {
    // Every deduction first, then every intent, as records numbered so.
    let mut takes = Takes::default();
    let n = deductions.len() as u64;
    for (seq, (epoch, _)) in deductions.iter().enumerate() {
        takes.deducted(seq as u64, *epoch);
    }
    for (k, (epoch, batch_id, at, accounts)) in intents.into_iter().enumerate() {
        takes.intent(n + k as u64, epoch, batch_id, at, accounts);
    }
    let mut batches = Batches::new(takes, journal_id, covered, last_epoch, now);
    let mut out = Vec::new();
    let mut write = |b| {
        out.push(b);
        Ok(())
    };
    for (seq, (epoch, part)) in deductions.into_iter().enumerate() {
        batches.add(epoch, vec![part]).unwrap();
        batches.complete(seq as u64, &mut write).unwrap();
    }
    batches.finish(&mut write).unwrap();
    out
}

/// An intent as replay reads it: (take epoch, batch id, batch now, accounts).
#[cfg(test)]
type IntentOf = (u64, String, Ts, Vec<Arc<str>>);

/// The parts of one batch, one per account in account order, as a flush
/// would send them: [`merge`]d. A million deductions of ten thousand
/// accounts replay as ten thousand parts.
#[cfg(test)]
fn merge_parts(parts: Vec<AccountFlush>) -> Vec<AccountFlush> {
    let mut by_account: BTreeMap<Arc<str>, AccountFlush> = BTreeMap::new();
    for p in parts {
        match by_account.get_mut(&p.account_id) {
            Some(m) => merge(m, p),
            None => {
                by_account.insert(p.account_id.clone(), p);
            }
        }
    }
    by_account.into_values().collect()
}

/// Adds part `p` to `m`, a part of the same account, as a flush would
/// send them: amounts summed per (hour, item, pack), request ids kept in
/// order, and the account row with the earliest activation (it only moves
/// back, R1) and the latest flags.
fn merge(m: &mut AccountFlush, p: AccountFlush) {
    for d in p.deltas {
        let same = m.deltas.iter_mut().find(|x| {
            (x.hour, x.item) == (d.hour, d.item)
                && x.pack.as_ref().map(|s| &s.pack_id) == d.pack.as_ref().map(|s| &s.pack_id)
                && x.amount.checked_add(d.amount).is_some()
        });
        match same {
            Some(x) => x.amount += d.amount,
            None => m.deltas.push(d),
        }
    }
    m.dedup.extend(p.dedup);
    m.account = match (m.account.take(), p.account) {
        (Some(a), Some(b)) => Some(crate::ledger::AccountRecord {
            activated_at: match (a.activated_at, b.activated_at) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            },
            ..b
        }),
        (a, b) => b.or(a),
    };
}

#[cfg(test)]
mod tests;
