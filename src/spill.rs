//! The spill file: usage that shutdown could not flush, kept beside the
//! store and replayed at the next start before the server reports ready.
//!
//! One [`FlushBatch`] per line, as JSON. Batches keep their ids, and the
//! store records the ids it applied, so a batch that was being written when
//! the process gave up (and may have committed after all) is applied once.
//! The file is written to a temporary name, synced and renamed, so a crash
//! while spilling leaves the previous file, never half of a new one.

use std::{
    io::Write,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    ledger::FlushBatch,
    store::{Store, StoreError},
};

#[derive(Debug, thiserror::Error)]
pub enum SpillError {
    #[error("spill file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "spill file {path}, line {line}: {message}; nothing was replayed. \
         Move the file aside to start without it (its usage is then not billed)"
    )]
    Corrupt {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("replaying spill file {path}: {source}; the file is kept for the next start")]
    Store { path: PathBuf, source: StoreError },
}

/// What a replay did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    /// Batches written now.
    pub applied: usize,
    /// Batches the store had applied already.
    pub skipped: usize,
    /// Accounts the store refused for good: kept in the file.
    pub kept: usize,
    /// Shutdown stopped the replay between two batches: the file is kept
    /// whole, and the next start replays it (skipping what was applied).
    pub interrupted: bool,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SpillError + '_ {
    move |source| SpillError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Reads every batch of a spill file; an empty list if there is none.
pub fn read(path: &Path) -> Result<Vec<FlushBatch>, SpillError> {
    batches(path)?.collect()
}

/// The batches of a spill file, parsed one line at a time (none if there
/// is no file): a replayed journal's file can be hundreds of MB, and its
/// batches are written or copied one by one, never held together.
fn batches(
    path: &Path,
) -> Result<impl Iterator<Item = Result<FlushBatch, SpillError>> + '_, SpillError> {
    use std::io::BufRead;
    let lines = match std::fs::File::open(path) {
        Ok(f) => Some(std::io::BufReader::new(f).lines()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(io(path)(e)),
    };
    Ok(lines
        .into_iter()
        .flatten()
        .enumerate()
        .filter_map(move |(i, line)| {
            let line = match line {
                Ok(l) if l.trim().is_empty() => return None,
                Ok(l) => l,
                Err(e) => return Some(Err(io(path)(e))),
            };
            Some(
                serde_json::from_str(&line).map_err(|e| SpillError::Corrupt {
                    path: path.to_path_buf(),
                    line: i + 1,
                    message: e.to_string(),
                }),
            )
        }))
}

/// Writes `batches` after whatever the file already holds, atomically.
pub fn append(path: &Path, batches: &[Arc<FlushBatch>]) -> Result<(), SpillError> {
    let mut out = Appender::open(path)?;
    for b in batches {
        out.push(b)?;
    }
    out.commit()
}

/// A spill file growing by some batches: what it held is copied to a
/// temporary file, then each batch [`push`](Appender::push)ed is written
/// after it, and [`commit`](Appender::commit) replaces the file with it,
/// atomically. Dropped without a commit, it leaves the file as it was.
pub struct Appender {
    path: PathBuf,
    tmp: PathBuf,
    /// `None` once committed.
    out: Option<std::io::BufWriter<std::fs::File>>,
    written: usize,
}

impl Drop for Appender {
    /// Not committed (a write failed, a disk filled): the temporary file
    /// goes, so that it does not keep the space a retry needs.
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

impl Appender {
    /// Starts the new file with the batches `path` holds (a corrupt line
    /// fails here, and the file is left alone).
    pub fn open(path: &Path) -> Result<Appender, SpillError> {
        let mut out = Appender::empty(path)?;
        for b in batches(path)? {
            out.push(&b?)?;
        }
        Ok(out)
    }

    /// Starts a new file that will replace `path` whatever it holds.
    fn empty(path: &Path) -> Result<Appender, SpillError> {
        let dir = parent(path);
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let tmp = path.with_extension("tmp");
        let file = std::fs::File::create(&tmp).map_err(io(&tmp))?;
        Ok(Appender {
            path: path.to_path_buf(),
            tmp,
            out: Some(std::io::BufWriter::new(file)),
            written: 0,
        })
    }

    /// Writes one more batch.
    pub fn push(&mut self, batch: &FlushBatch) -> Result<(), SpillError> {
        let tmp = &self.tmp;
        let Some(out) = self.out.as_mut() else {
            unreachable!("commit() takes the Appender")
        };
        // A full disk is an I/O error here, not a bad batch.
        serde_json::to_writer(&mut *out, batch).map_err(|e| match e.is_io() {
            true => io(tmp)(e.into()),
            false => SpillError::Corrupt {
                path: tmp.clone(),
                line: 0,
                message: e.to_string(),
            },
        })?;
        writeln!(out).map_err(io(tmp))?;
        self.written += 1;
        Ok(())
    }

    /// Replaces the file with what was written, durably; removes it if
    /// that is nothing.
    pub fn commit(mut self) -> Result<(), SpillError> {
        let (path, tmp) = (&self.path, &self.tmp);
        let Some(out) = self.out.as_mut() else {
            unreachable!("commit() takes the Appender")
        };
        out.flush().map_err(io(tmp))?;
        if self.written == 0 {
            // Drop removes the temporary file.
            return remove(path);
        }
        out.get_ref().sync_all().map_err(io(tmp))?;
        std::fs::rename(tmp, path).map_err(io(path))?;
        self.out = None;
        // The rename is durable once the directory is synced.
        let dir = parent(path);
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir))
    }
}

/// Removes the spill file at `path`, if there is one.
fn remove(path: &Path) -> Result<(), SpillError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// The directory a spill file is in.
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Replaces the file with `batches` (removes it if there are none).
fn write_all<'a>(
    path: &Path,
    batches: impl IntoIterator<Item = &'a FlushBatch>,
) -> Result<(), SpillError> {
    let mut batches = batches.into_iter().peekable();
    if batches.peek().is_none() {
        // Nothing to keep: no temporary file for it.
        return remove(path);
    }
    let mut out = Appender::empty(path)?;
    for b in batches {
        out.push(b)?;
    }
    out.commit()
}

/// Transient store errors at start are retried this many times.
const ATTEMPTS: u32 = 6;

/// Writes a batch, retrying transient errors with backoff.
async fn write(store: &dyn Store, batch: &FlushBatch) -> Result<bool, StoreError> {
    let mut delay = Duration::from_millis(100);
    let mut attempt = 1;
    loop {
        match store.write_batch(batch).await {
            Err(e) if e.transient && attempt < ATTEMPTS => {
                tracing::warn!(error = %e, attempt, "spill replay: store busy; retrying");
                tokio::time::sleep(delay).await;
                delay *= 2;
                attempt += 1;
            }
            r => return r,
        }
    }
}

/// Replays a spill file into the store, then removes it. A batch the store
/// refuses for good is split by account; the accounts it still refuses stay
/// in the file (logged), and the rest is applied. Their split ids derive
/// from the batch's, so a second replay is as idempotent as the first.
///
/// Once `stop` is cancelled (shutdown began), no further batch is started:
/// the file is left as it is and [`Replayed::interrupted`] is set.
pub async fn replay(
    store: &dyn Store,
    path: &Path,
    stop: &CancellationToken,
) -> Result<Replayed, SpillError> {
    // Every line is parsed before the first batch is written, so that a
    // corrupt file replays nothing (as its error says); then the batches
    // are read again and written one at a time, never all held at once.
    let count = batches(path)?.try_fold(0usize, |n, b| b.map(|_| n + 1))?;
    let mut done = Replayed::default();
    if count == 0 {
        return Ok(done);
    }
    tracing::info!(path = %path.display(), batches = count, "replaying the spill file");
    let failed = |source| SpillError::Store {
        path: path.to_path_buf(),
        source,
    };
    let mut kept = Vec::new();
    for batch in batches(path)? {
        let batch = batch?;
        if stop.is_cancelled() {
            done.interrupted = true;
            return Ok(done);
        }
        match write(store, &batch).await {
            Ok(true) => done.applied += 1,
            Ok(false) => done.skipped += 1,
            Err(e) if e.transient => return Err(failed(e)),
            Err(e) => {
                tracing::warn!(error = %e, batch = %batch.batch_id, "spill replay: the store refuses a batch; replaying it account by account");
                for a in &batch.accounts {
                    let one = FlushBatch {
                        batch_id: format!("{}#{}", batch.batch_id, a.account_id),
                        accounts: vec![a.clone()],
                        now: batch.now,
                    };
                    match write(store, &one).await {
                        Ok(true) => done.applied += 1,
                        Ok(false) => done.skipped += 1,
                        Err(e) if e.transient => return Err(failed(e)),
                        Err(e) => {
                            tracing::error!(account = %a.account_id, error = %e, path = %path.display(),
                                "spill replay: the store refuses this account's usage; it stays in the spill file");
                            done.kept += 1;
                            kept.push(one);
                        }
                    }
                }
            }
        }
    }
    write_all(path, &kept)?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ledger::{AccountFlush, DeltaRow},
        packs::Item,
        store::sqlite::SqliteStore,
    };

    fn batch(id: &str, account: &str, amount: u64) -> Arc<FlushBatch> {
        Arc::new(FlushBatch {
            batch_id: id.into(),
            now: 1,
            accounts: vec![AccountFlush {
                account_id: account.into(),
                account: None,
                deltas: vec![DeltaRow {
                    hour: 0,
                    item: Item::Calls,
                    pack: None,
                    amount,
                    span: None,
                }],
                dedup: vec![],
            }],
        })
    }

    #[tokio::test]
    async fn a_replay_applies_each_batch_once_and_keeps_what_the_store_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db").to_str().unwrap()).unwrap();
        let path = dir.path().join("s.db.unflushed");
        // b0 committed before the spill: it must not be applied again.
        store.write_batch(&batch("b0", "a", 5)).await.unwrap();
        append(&path, &[batch("b0", "a", 5), batch("b1", "a", 7)]).unwrap();
        append(&path, &[batch("b2", "b", u64::MAX)]).unwrap();
        assert_eq!(read(&path).unwrap().len(), 3);
        let r = replay(&store, &path, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((r.applied, r.skipped, r.kept), (1, 1, 1));
        let rows = store
            .usage_rows_page(0, 1, Some("a"), None, 100)
            .await
            .unwrap();
        assert_eq!(rows.iter().map(|r| r.amount).sum::<u64>(), 12);
        // The refused account stays in the file; replaying again changes nothing.
        assert_eq!(read(&path).unwrap().len(), 1);
        let r = replay(&store, &path, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((r.applied, r.skipped, r.kept), (0, 0, 1));
        assert_eq!(
            store
                .usage_rows_page(0, 1, Some("a"), None, 100)
                .await
                .unwrap()
                .iter()
                .map(|r| r.amount)
                .sum::<u64>(),
            12
        );
    }

    #[tokio::test]
    async fn a_stopped_replay_starts_no_batch_and_keeps_the_file_whole() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db").to_str().unwrap()).unwrap();
        let path = dir.path().join("s.db.unflushed");
        append(&path, &[batch("b0", "a", 5), batch("b1", "a", 7)]).unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        let r = replay(&store, &path, &stop).await.unwrap();
        assert!(r.interrupted);
        assert_eq!((r.applied, r.skipped), (0, 0));
        assert_eq!(read(&path).unwrap().len(), 2);
        // The next start replays it all.
        let r = replay(&store, &path, &CancellationToken::new())
            .await
            .unwrap();
        assert_eq!((r.applied, r.skipped, r.interrupted), (2, 0, false));
        assert!(read(&path).unwrap().is_empty());
    }

    /// An append that does not commit (a failed write) leaves the file as
    /// it was and takes its temporary file away.
    #[test]
    fn an_append_given_up_leaves_the_file_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.unflushed");
        append(&path, &[batch("b1", "a", 7)]).unwrap();
        let before = std::fs::read_to_string(&path).unwrap();
        let mut out = Appender::open(&path).unwrap();
        out.push(&batch("b2", "a", 8)).unwrap();
        assert!(path.with_extension("tmp").exists());
        drop(out);
        assert!(!path.with_extension("tmp").exists());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), before);
        // Committed, the batches follow the ones it held.
        let mut out = Appender::open(&path).unwrap();
        out.push(&batch("b2", "a", 8)).unwrap();
        out.commit().unwrap();
        let ids: Vec<_> = read(&path)
            .unwrap()
            .into_iter()
            .map(|b| b.batch_id)
            .collect();
        assert_eq!(ids, ["b1", "b2"]);
        assert!(!path.with_extension("tmp").exists());
    }

    /// The replay reads the file one batch at a time, but checks every
    /// line first: a corrupt line after good batches writes none of them,
    /// and the file is left as it was.
    #[tokio::test]
    async fn a_replay_of_a_file_with_a_corrupt_line_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(dir.path().join("s.db").to_str().unwrap()).unwrap();
        let path = dir.path().join("s.db.unflushed");
        append(&path, &[batch("b1", "a", 7)]).unwrap();
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{torn\n");
        std::fs::write(&path, &text).unwrap();
        match replay(&store, &path, &CancellationToken::new()).await {
            Err(SpillError::Corrupt { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected Corrupt, got {other:?}"),
        }
        let rows = store
            .usage_rows_page(0, 1, Some("a"), None, 100)
            .await
            .unwrap();
        assert!(rows.is_empty(), "{rows:?}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
    }

    #[test]
    fn a_corrupt_line_is_named_and_nothing_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.unflushed");
        std::fs::write(
            &path,
            "{\"batch_id\":\"b\",\"accounts\":[],\"now\":1}\n{torn",
        )
        .unwrap();
        match read(&path) {
            Err(SpillError::Corrupt { line, .. }) => assert_eq!(line, 2),
            other => panic!("expected Corrupt, got {other:?}"),
        }
    }
}
