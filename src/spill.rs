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
    use std::io::BufRead;
    // Line by line: a replayed journal's file can be hundreds of MB, which
    // held whole beside its parsed batches only raised the peak.
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(path)(e)),
    };
    let mut batches = Vec::new();
    for (i, line) in std::io::BufReader::new(file).lines().enumerate() {
        let line = line.map_err(io(path))?;
        if line.trim().is_empty() {
            continue;
        }
        batches.push(
            serde_json::from_str(&line).map_err(|e| SpillError::Corrupt {
                path: path.to_path_buf(),
                line: i + 1,
                message: e.to_string(),
            })?,
        );
    }
    Ok(batches)
}

/// Writes `batches` after whatever the file already holds, atomically.
pub fn append(path: &Path, batches: &[Arc<FlushBatch>]) -> Result<(), SpillError> {
    let before: Vec<FlushBatch> = read(path)?;
    // By reference: a copy of a replayed journal's batches doubled the
    // memory they take.
    write_all(path, before.iter().chain(batches.iter().map(|b| &**b)))
}

fn write_all<'a>(
    path: &Path,
    batches: impl IntoIterator<Item = &'a FlushBatch>,
) -> Result<(), SpillError> {
    let mut batches = batches.into_iter().peekable();
    if batches.peek().is_none() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
            _ => Ok(()),
        };
    }
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let tmp = path.with_extension("tmp");
    {
        let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp).map_err(io(&tmp))?);
        for b in batches {
            // A full disk is an I/O error here, not a bad batch.
            serde_json::to_writer(&mut f, b).map_err(|e| match e.is_io() {
                true => io(&tmp)(e.into()),
                false => SpillError::Corrupt {
                    path: tmp.clone(),
                    line: 0,
                    message: e.to_string(),
                },
            })?;
            writeln!(f).map_err(io(&tmp))?;
        }
        let f = f.into_inner().map_err(|e| io(&tmp)(e.into_error()))?;
        f.sync_all().map_err(io(&tmp))?;
    }
    std::fs::rename(&tmp, path).map_err(io(path))?;
    // The rename is durable once the directory is synced.
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(dir))
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
    let batches = read(path)?;
    let mut done = Replayed::default();
    if batches.is_empty() {
        return Ok(done);
    }
    tracing::info!(path = %path.display(), batches = batches.len(), "replaying the spill file");
    let failed = |source| SpillError::Store {
        path: path.to_path_buf(),
        source,
    };
    let mut kept = Vec::new();
    for batch in batches {
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
