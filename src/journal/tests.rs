use super::*;
use crate::{
    ledger::{AccountFlush, DeltaRow},
    packs::Item,
};
use proptest::prelude::*;

fn part(account: &str, amount: u64) -> AccountFlush {
    AccountFlush {
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
    }
}

fn deduct(epoch: u64, account: &str, amount: u64) -> Record {
    Record::Deduct {
        epoch,
        parts: vec![part(account, amount)],
    }
}

/// Three records, and where each starts.
fn three() -> (Vec<u8>, Vec<usize>, Vec<Record>) {
    let records = vec![
        deduct(1, "a", 1),
        Record::Intent {
            epoch: 1,
            batch_id: "b-1".into(),
            now: 5,
            accounts: vec!["a".into()],
        },
        deduct(2, "b", 7),
    ];
    let mut buf = Vec::new();
    let mut starts = Vec::new();
    for r in &records {
        starts.push(buf.len());
        encode(r, &mut buf);
    }
    (buf, starts, records)
}

#[test]
fn records_decode_as_they_were_encoded() {
    let (buf, starts, records) = three();
    let d = decode(&buf);
    assert_eq!(d.stop, None);
    let got: Vec<_> = d
        .records
        .iter()
        .map(|(o, r)| (*o as usize, r.clone()))
        .collect();
    let want: Vec<_> = starts.into_iter().zip(records).collect();
    assert_eq!(got, want);
}

#[test]
fn a_last_record_cut_at_every_byte_keeps_every_record_before_it() {
    let (buf, starts, records) = three();
    let last = starts[2];
    for cut in last..buf.len() {
        let d = decode(&buf[..cut]);
        let kept: Vec<_> = d.records.iter().map(|(_, r)| r.clone()).collect();
        assert_eq!(kept, records[..2], "cut at {cut}");
        if cut == last {
            assert_eq!(d.stop, None, "a cut between records is a clean end");
        } else {
            let stop = d.stop.expect("a torn record is reported");
            assert_eq!(stop.offset, last as u64, "cut at {cut}");
            assert!(stop.why.contains("torn"), "cut at {cut}: {}", stop.why);
        }
    }
}

#[test]
fn a_flipped_byte_inside_a_record_stops_reading_at_that_record() {
    let (buf, starts, records) = three();
    // Every byte of the middle record, header included.
    for at in starts[1]..starts[2] {
        for flip in [0x01u8, 0x80, 0xff] {
            let mut bad = buf.clone();
            bad[at] ^= flip;
            let d = decode(&bad);
            let kept: Vec<_> = d.records.iter().map(|(_, r)| r.clone()).collect();
            assert_eq!(kept, records[..1], "byte {at} ^ {flip:#x}");
            let stop = d.stop.expect("reported");
            assert_eq!(stop.offset, starts[1] as u64, "byte {at} ^ {flip:#x}");
        }
    }
}

#[test]
fn a_crc_mismatch_says_so() {
    let (mut buf, starts, _) = three();
    let body = starts[2] + HEADER + 3;
    buf[body] ^= 0x10;
    let stop = decode(&buf).stop.unwrap();
    assert_eq!(stop.offset, starts[2] as u64);
    assert_eq!(stop.why, "CRC mismatch");
}

#[test]
fn zeros_after_the_records_end_them_and_zeros_before_more_bytes_stop_there() {
    let (buf, _, records) = three();
    let mut zeros = buf.clone();
    zeros.resize(buf.len() + ZERO_AHEAD as usize, 0);
    let d = decode(&zeros);
    assert_eq!(d.stop, None, "a zero tail is the end of the records");
    let kept: Vec<_> = d.records.into_iter().map(|(_, r)| r).collect();
    assert_eq!(kept, records);
    // A group torn by a crash can leave zeros before some of its bytes:
    // that is a bad record, reported where the zeros start.
    let mut torn = zeros;
    let last = torn.len() - 1;
    torn[last] = 1;
    let stop = decode(&torn).stop.expect("zeros then bytes are reported");
    assert_eq!(stop.offset, buf.len() as u64);
}

#[test]
fn an_unknown_version_is_refused_even_with_a_good_crc() {
    let mut buf = Vec::new();
    encode(&Record::Probe, &mut buf);
    buf[HEADER] = 9;
    frame(&mut buf, 0);
    let stop = decode(&buf).stop.unwrap();
    assert!(stop.why.contains("version 9"), "{}", stop.why);
}

proptest! {
    /// The decoder takes any bytes without panicking, and what it keeps
    /// re-encodes to exactly the bytes it read.
    #[test]
    fn decoding_any_bytes_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let d = decode(&bytes);
        let mut again = Vec::new();
        for (_, r) in &d.records {
            encode(r, &mut again);
        }
        prop_assert!(bytes.starts_with(&again));
    }

    /// Garbage after good records never loses them.
    #[test]
    fn good_records_survive_any_garbage_after_them(
        amounts in proptest::collection::vec(1u64..1_000_000, 1..8),
        tail in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut buf = Vec::new();
        for (i, a) in amounts.iter().enumerate() {
            encode(&deduct(i as u64, "acct", *a), &mut buf);
        }
        let good = buf.len();
        buf.extend_from_slice(&tail);
        let d = decode(&buf);
        prop_assert!(d.records.len() >= amounts.len());
        for (i, a) in amounts.iter().enumerate() {
            prop_assert_eq!(&d.records[i].1, &deduct(i as u64, "acct", *a));
        }
        if tail.iter().all(|b| *b == 0) {
            // Nothing, or the zeros the writer lays ahead: a clean end.
            prop_assert_eq!(d.records.len(), amounts.len());
            prop_assert_eq!(d.stop, None);
        } else if d.records.len() == amounts.len() {
            prop_assert_eq!(d.stop.map(|s| s.offset), Some(good as u64));
        }
    }
}

fn intent(epoch: u64, id: &str, accounts: &[&str]) -> (u64, String, Ts, Vec<Arc<str>>) {
    (
        epoch,
        id.into(),
        0,
        accounts.iter().map(|a| Arc::from(*a)).collect(),
    )
}

#[test]
fn each_deduction_goes_to_the_first_take_of_its_account_at_or_after_its_epoch() {
    let deductions = vec![
        (1, part("a", 1)),
        (1, part("b", 2)),
        (2, part("a", 4)),
        (3, part("a", 8)),
        (3, part("c", 16)),
    ];
    let intents = vec![
        // Take 1 held a and b; b's batch was narrowed to b-alone.
        intent(1, "t1", &["a", "b"]),
        intent(1, "t1-b", &["b"]),
        // Take 2 held a.
        intent(2, "t2", &["a"]),
    ];
    let batches = assign(deductions, intents, 0xab, 0, 3, 99);
    let sum = |id: &str| -> Vec<(String, u64)> {
        batches
            .iter()
            .filter(|b| b.batch_id.starts_with(id))
            .flat_map(|b| b.accounts.iter())
            .map(|a| (a.account_id.to_string(), a.deltas[0].amount))
            .collect()
    };
    assert_eq!(sum("t1"), vec![("a".into(), 1), ("b".into(), 2)]);
    // Parts of one account in one batch are merged, amounts summed.
    let rest = batches
        .iter()
        .find(|b| b.batch_id.starts_with("journal-"))
        .unwrap();
    assert_eq!(rest.accounts.len(), 2);
    assert_eq!(sum("t1-b"), vec![("b".into(), 2)]);
    assert!(batches
        .iter()
        .all(|b| b.batch_id != "t1" || b.accounts.len() == 1));
    assert_eq!(sum("t2"), vec![("a".into(), 4)]);
    // Nothing took epoch 3: a new batch, named after the journal.
    assert_eq!(
        sum("journal-00000000000000ab-0-3-0"),
        vec![("a".into(), 8), ("c".into(), 16)]
    );
}

#[test]
fn replay_moves_the_journal_to_the_spill_file_once_and_keeps_what_precedes_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&jdir).unwrap();
    let mut buf = Vec::new();
    encode(&deduct(1, "a", 5), &mut buf);
    encode(&deduct(1, "b", 6), &mut buf);
    let torn = buf.len();
    encode(&deduct(1, "c", 7), &mut buf);
    std::fs::write(jdir.join(segment_name(1, 0)), &buf[..torn + 5]).unwrap();
    let r = replay(&jdir, &spill, 1).unwrap();
    assert_eq!((r.deductions, r.batches, r.stopped), (2, 1, 1));
    let spilled = crate::spill::read(&spill).unwrap();
    let accounts: Vec<_> = spilled[0]
        .accounts
        .iter()
        .map(|a| a.account_id.to_string())
        .collect();
    assert_eq!(accounts, ["a", "b"]);
    // The checkpoint moved past it: a second replay adds nothing.
    assert!(list_segments(&jdir).unwrap().is_empty());
    let again = replay(&jdir, &spill, 2).unwrap();
    assert_eq!(again.deductions, 0);
    assert_eq!(again.journal_id, r.journal_id);
    assert!(again.next_epoch >= r.next_epoch);
    assert_eq!(crate::spill::read(&spill).unwrap().len(), 1);
}

/// Found by `fuzz/run.sh` (journal_decode; the input is in
/// fuzz/regressions/journal_decode/): a CRC-valid record with epoch
/// u64::MAX made replay's `last_epoch + 1` overflow, a panic at start.
#[test]
fn an_epoch_no_journal_reaches_stops_reading_there_and_replay_keeps_what_precedes_it() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    let spill = dir.path().join("spill");
    std::fs::create_dir_all(&jdir).unwrap();
    let mut buf = Vec::new();
    encode(&deduct(1, "a", 5), &mut buf);
    let bad = buf.len();
    encode(&deduct(u64::MAX, "b", 6), &mut buf);
    encode(&deduct(2, "c", 7), &mut buf);

    let d = decode(&buf);
    assert_eq!(d.records.len(), 1);
    let stop = d.stop.expect("the record with epoch u64::MAX is refused");
    assert_eq!(stop.offset, bad as u64);
    assert!(stop.why.contains("epoch"), "{}", stop.why);

    std::fs::write(jdir.join(segment_name(1, 0)), &buf).unwrap();
    let r = replay(&jdir, &spill, 1).unwrap();
    assert_eq!((r.deductions, r.batches, r.stopped), (1, 1, 1));
    assert_eq!(r.next_epoch, 2);

    // The largest epoch accepted still leaves the next one countable, and
    // one past it is refused, in a checkpoint too.
    for (epoch, ok) in [(MAX_EPOCH, true), (MAX_EPOCH + 1, false)] {
        let mut one = Vec::new();
        encode(&deduct(epoch, "a", 1), &mut one);
        assert_eq!(decode(&one).stop.is_none(), ok, "epoch {epoch}");
        let mut cp = Vec::new();
        encode(
            &Record::Checkpoint {
                epoch,
                journal_id: 1,
            },
            &mut cp,
        );
        assert_eq!(decode(&cp).stop.is_none(), ok, "checkpoint epoch {epoch}");
    }
    assert_eq!(
        parse_segment_name(&segment_name(MAX_EPOCH, 0)),
        Some((MAX_EPOCH, 0))
    );
    assert_eq!(parse_segment_name(&segment_name(u64::MAX, 0)), None);
}

#[test]
fn a_corrupt_checkpoint_stops_the_replay_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("checkpoint"), b"\x05\0\0\0garbage").unwrap();
    let e = replay(dir.path(), &dir.path().join("spill"), 0).unwrap_err();
    assert!(e.to_string().contains("checkpoint"), "{e}");
}

#[test]
fn parts_of_one_account_merge_into_one_with_summed_amounts() {
    let mut b = part("a", 5);
    b.dedup.push(crate::ledger::DedupRecord {
        request_id: "r1".into(),
        expires_at: 10,
        hour: Some(0),
        calls_covered: 0,
        calls_overage: 5,
        egress_covered: 0,
        egress_overage: 0,
    });
    b.account = Some(crate::ledger::AccountRecord {
        account_id: "a".into(),
        activated_at: Some(7),
        suspended: false,
        deny_on_exhausted: true,
    });
    let mut c = part("a", 2);
    c.deltas[0].hour = 3_600_000_000;
    let merged = merge_parts(vec![part("b", 1), part("a", 1), b, c]);
    let ids: Vec<_> = merged.iter().map(|p| p.account_id.to_string()).collect();
    assert_eq!(ids, ["a", "b"]);
    let a = &merged[0];
    let amounts: Vec<_> = a.deltas.iter().map(|d| (d.hour, d.amount)).collect();
    assert_eq!(amounts, [(0, 6), (3_600_000_000, 2)]);
    assert_eq!(a.dedup.len(), 1);
    assert_eq!(a.account.as_ref().unwrap().activated_at, Some(7));
}

/// The writer lays zeros ahead of its records; a crash leaves them there.
/// The replay reads every record up to them and reports no bad record.
#[tokio::test]
async fn replay_after_a_crash_reads_every_record_before_the_zeros_laid_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    let spill = dir.path().join("spill");
    let first = replay(&jdir, &spill, 1).unwrap();
    let journal = Journal::open(&jdir, &first, Arc::new(())).unwrap();
    // One record lays the first run of zeros; then enough records to
    // write over all of it and lay a second.
    let ((), commit) = journal.capture(|| captured(part("a0", 1)));
    commit.unwrap().wait().await.unwrap();
    let n = 1 + 2 * ZERO_AHEAD as usize / 30;
    let mut commits = Vec::new();
    for i in 1..n {
        let ((), commit) = journal.capture(|| captured(part(&format!("a{}", i % 7), 1)));
        commits.push(commit.expect("a deduction is journaled"));
    }
    for c in commits {
        c.wait().await.unwrap();
    }
    let segments = list_segments(&jdir).unwrap();
    assert_eq!(segments.len(), 1);
    let bytes = std::fs::read(&segments[0].1).unwrap();
    let records = *journal.segments.lock().values().next().unwrap() as usize;
    assert!(
        bytes.len() > records && bytes[records..].iter().all(|b| *b == 0),
        "{} bytes of zeros after {records} of records",
        bytes.len() - records
    );
    // A crash: the writer thread is not stopped, the zeros stay.
    let r = replay(&jdir, &spill, 2).unwrap();
    assert_eq!((r.deductions, r.stopped), (n, 0));
    let spilled = crate::spill::read(&spill).unwrap();
    let total: u64 = spilled
        .iter()
        .flat_map(|b| &b.accounts)
        .flat_map(|a| &a.deltas)
        .map(|d| d.amount)
        .sum();
    assert_eq!(total, n as u64);
    journal.close();
}

/// A clean stop takes the zeros away again: nothing after the records.
#[tokio::test]
async fn a_clean_stop_leaves_no_zeros_after_the_records() {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    let first = replay(&jdir, &dir.path().join("spill"), 1).unwrap();
    let journal = Journal::open(&jdir, &first, Arc::new(())).unwrap();
    let ((), commit) = journal.capture(|| captured(part("a", 1)));
    commit.unwrap().wait().await.unwrap();
    journal.close();
    let segments = list_segments(&jdir).unwrap();
    let bytes = std::fs::read(&segments[0].1).unwrap();
    assert_eq!(
        bytes.len() as u64,
        *journal.segments.lock().values().next().unwrap()
    );
    assert_eq!(decode(&bytes).records.len(), 1);
}

/// Group sizes, as the writer commits them.
#[derive(Default)]
struct Groups(parking_lot::Mutex<Vec<usize>>);

impl JournalObserver for Groups {
    fn committed(&self, records: usize, _: usize, _: Duration) {
        self.0.lock().push(records);
    }
    fn size(&self, _: u64) {}
    fn writable(&self, _: bool) {}
}

/// With the runtime's park hooks, the writer takes the records of a hooked
/// worker when that worker has nothing left to run: every deduction it
/// handed over by then is in one group. (Held an hour otherwise, so only
/// the park can make the group.)
#[test]
fn with_the_park_hooks_the_group_is_taken_when_the_worker_parks() {
    let rt = park_hooks(tokio::runtime::Builder::new_multi_thread().worker_threads(1))
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    let first = replay(&jdir, &dir.path().join("spill"), 1).unwrap();
    let groups = Arc::new(Groups::default());
    let journal =
        Journal::open_holding(&jdir, &first, groups.clone(), Duration::from_secs(3600)).unwrap();
    let j = journal.clone();
    rt.block_on(async move {
        tokio::spawn(async move {
            // A group of one: taken when the worker parks, waiting for it.
            let ((), c) = j.capture(|| captured(part("first", 1)));
            c.unwrap().wait().await.unwrap();
            let commits: Vec<_> = (0..50)
                .map(|i| {
                    let ((), c) = j.capture(|| captured(part(&format!("a{i}"), 1)));
                    c.unwrap()
                })
                .collect();
            // The writer holds them while this worker is busy, however long
            // it stays busy (without the hooks it takes them at once).
            let h = &j.handoff;
            let give_up = Instant::now() + Duration::from_secs(10);
            while !(h.holding.load(Ordering::SeqCst) && h.pending.load(Ordering::SeqCst) == 50) {
                assert!(
                    Instant::now() < give_up,
                    "the writer took records of a busy worker"
                );
                std::hint::spin_loop();
            }
            for c in commits {
                c.wait().await.unwrap();
            }
        })
        .await
        .unwrap();
    });
    assert_eq!(*groups.0.lock(), [1, 50]);
    journal.close();
}

// === the replay's two passes ===

thread_local! {
    /// Records the replay's second pass has read so far.
    pub(super) static READ: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    /// For each batch the replay wrote, how many records it had read then.
    pub(super) static WRITTEN_AT: std::cell::RefCell<Vec<u64>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The replay as it was before it streamed (stop 32): every record of the
/// journal read into memory, each deduction part given to the first take
/// of its account at or after its epoch, the batches merged and written
/// in intent order, then the rest in chunks. The streamed replay must
/// write exactly these batches.
fn replay_in_memory(
    segments: &[(u64, Vec<Record>)],
    covered: u64,
    journal_id: u64,
    now: Ts,
) -> Vec<FlushBatch> {
    let mut last_epoch = covered;
    let mut deductions = Vec::new();
    let mut intents = Vec::new();
    for (seg_epoch, records) in segments {
        last_epoch = last_epoch.max(*seg_epoch);
        if *seg_epoch <= covered {
            continue;
        }
        for r in records.clone() {
            match r {
                Record::Deduct { epoch, parts } if epoch > covered => {
                    last_epoch = last_epoch.max(epoch);
                    deductions.extend(parts.into_iter().map(|p| (epoch, p)));
                }
                Record::Intent {
                    epoch,
                    batch_id,
                    now,
                    accounts,
                } if epoch > covered => {
                    last_epoch = last_epoch.max(epoch);
                    intents.push((epoch, batch_id, now, accounts));
                }
                _ => {}
            }
        }
    }
    let mut takes: HashMap<Arc<str>, BTreeMap<u64, usize>> = HashMap::new();
    for (i, (epoch, _, _, accounts)) in intents.iter().enumerate() {
        for a in accounts {
            takes.entry(a.clone()).or_default().insert(*epoch, i);
        }
    }
    let mut by_intent: BTreeMap<usize, Vec<AccountFlush>> = BTreeMap::new();
    let mut rest = Vec::new();
    for (epoch, part) in deductions {
        match takes
            .get(&part.account_id)
            .and_then(|t| t.range(epoch..).next())
        {
            Some((_, i)) => by_intent.entry(*i).or_default().push(part),
            None => rest.push(part),
        }
    }
    let mut out: Vec<FlushBatch> = by_intent
        .into_iter()
        .map(|(i, parts)| FlushBatch {
            batch_id: intents[i].1.clone(),
            now: intents[i].2,
            accounts: merge_parts(parts),
        })
        .collect();
    for (n, chunk) in merge_parts(rest).chunks(REPLAY_BATCH_ACCOUNTS).enumerate() {
        out.push(FlushBatch {
            batch_id: format!("journal-{journal_id:016x}-{covered}-{last_epoch}-{n}"),
            now,
            accounts: chunk.to_vec(),
        });
    }
    out
}

/// Writes `segments` as segment files of `jdir` (and a checkpoint at
/// `covered` for journal id 7), replays them, and returns what the spill
/// file got.
fn replayed(segments: &[(u64, Vec<Record>)], covered: u64) -> (Replayed, Vec<FlushBatch>) {
    let dir = tempfile::tempdir().unwrap();
    let jdir = dir.path().join("j");
    std::fs::create_dir_all(&jdir).unwrap();
    write_checkpoint(&jdir, covered, 7).unwrap();
    for (n, (epoch, records)) in segments.iter().enumerate() {
        let mut buf = Vec::new();
        for r in records {
            encode(r, &mut buf);
        }
        // Zeros laid ahead, as the writer leaves them.
        buf.extend_from_slice(&[0; 100]);
        std::fs::write(jdir.join(segment_name(*epoch, n as u32)), &buf).unwrap();
    }
    let spill = dir.path().join("spill");
    let r = replay(&jdir, &spill, 42).unwrap();
    (r, crate::spill::read(&spill).unwrap())
}

fn a_part(account: &str, hour: u64, amount: u64, with_account: bool) -> AccountFlush {
    let mut p = part(account, amount);
    p.deltas[0].hour = hour as Ts * 3_600_000_000;
    if with_account {
        p.account = Some(crate::ledger::AccountRecord {
            account_id: account.into(),
            activated_at: Some(amount as Ts),
            suspended: amount.is_multiple_of(2),
            deny_on_exhausted: false,
        });
    }
    p
}

fn any_record() -> impl Strategy<Value = Record> {
    let account = prop::sample::select(vec!["a", "b", "c", "d", "e"]);
    let deduct = (
        1u64..6,
        prop::collection::vec((account.clone(), 0u64..2, 1u64..100, any::<bool>()), 1..4),
    )
        .prop_map(|(epoch, parts)| Record::Deduct {
            epoch,
            parts: parts
                .into_iter()
                .map(|(a, h, n, w)| a_part(a, h, n, w))
                .collect(),
        });
    let intent = (1u64..6, 0u32..1000, prop::collection::vec(account, 0..4)).prop_map(
        |(epoch, id, accounts)| Record::Intent {
            epoch,
            batch_id: format!("b-{epoch}-{id}"),
            now: id as Ts,
            accounts: accounts.into_iter().map(Arc::from).collect(),
        },
    );
    prop_oneof![3 => deduct, 1 => intent]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Whatever the order of deductions and intents, across segments and
    /// past a checkpoint, the streamed replay writes the batches the
    /// in-memory replay wrote: the same ids, in the same order, with the
    /// same merged parts. A replay cut short and run again by another
    /// version names its batches the same, so the store skips them.
    #[test]
    fn the_streamed_replay_writes_what_the_in_memory_replay_wrote(
        segments in prop::collection::vec(
            (1u64..6, prop::collection::vec(any_record(), 0..12)),
            0..4,
        ),
        covered in 0u64..3,
    ) {
        let mut segments = segments;
        segments.sort_by_key(|(epoch, _)| *epoch);
        let (r, got) = replayed(&segments, covered);
        let want = replay_in_memory(&segments, covered, 7, 42);
        prop_assert_eq!(r.batches, want.len());
        prop_assert_eq!(got, want);
    }
}

/// Each take's batch is written once no later record can add to it, not
/// after the whole journal was read: the replay holds one take's usage,
/// not the journal's.
#[test]
fn a_takes_batch_is_written_before_the_journal_is_read_to_its_end() {
    let take = |epoch: u64, accounts: &[&str]| Record::Intent {
        epoch,
        batch_id: format!("t{epoch}"),
        now: 0,
        accounts: accounts.iter().map(|a| Arc::from(*a)).collect(),
    };
    let records = vec![
        deduct(1, "a", 1),
        deduct(1, "b", 2),
        take(1, &["a", "b"]),
        deduct(2, "a", 4),
        take(2, &["a"]),
        deduct(3, "c", 8),
    ];
    WRITTEN_AT.with(|w| w.borrow_mut().clear());
    let (r, got) = replayed(&[(1, records)], 0);
    let ids: Vec<_> = got.iter().map(|b| b.batch_id.as_str()).collect();
    assert_eq!(ids, ["t1", "t2", "journal-0000000000000007-0-3-0"]);
    assert_eq!(r.batches, 3);
    // t1 left once its intent (the third record) was read; t2 after the
    // fifth; what no take held, at the end.
    assert_eq!(WRITTEN_AT.with(|w| w.borrow().clone()), [3, 5, 6]);
}

/// What no take held leaves in chunks of the flusher's batch size, in
/// account order, numbered from 0, as before the replay streamed.
#[test]
fn the_rest_is_chunked_as_before() {
    let n = 2 * REPLAY_BATCH_ACCOUNTS + 1;
    let parts = (0..n)
        .map(|i| a_part(&format!("acct-{i:06}"), 0, 1, false))
        .collect();
    let segments = [(3, vec![Record::Deduct { epoch: 3, parts }])];
    let (_, got) = replayed(&segments, 0);
    let sizes: Vec<_> = got
        .iter()
        .map(|b| (b.batch_id.as_str(), b.accounts.len()))
        .collect();
    assert_eq!(
        sizes,
        [
            ("journal-0000000000000007-0-3-0", REPLAY_BATCH_ACCOUNTS),
            ("journal-0000000000000007-0-3-1", REPLAY_BATCH_ACCOUNTS),
            ("journal-0000000000000007-0-3-2", 1),
        ]
    );
    assert_eq!(got, replay_in_memory(&segments, 0, 7, 42));
}

/// An account deducted many times between checkpoints is held compacted
/// as the replay reads (`Held`), and replays as the in-memory replay
/// merged it: one part, its amounts summed.
#[test]
fn a_hot_account_replays_as_one_merged_part() {
    let records: Vec<Record> = (0..20_000u64)
        .map(|i| Record::Deduct {
            epoch: 2,
            parts: vec![a_part("hot", i % 3, 1, i % 1000 == 0)],
        })
        .collect();
    let segments = [(2, records)];
    let (r, got) = replayed(&segments, 0);
    assert_eq!((r.deductions, r.batches), (20_000, 1));
    assert_eq!(got, replay_in_memory(&segments, 0, 7, 42));
    let hot = &got[0].accounts[0];
    assert_eq!(hot.deltas.iter().map(|d| d.amount).sum::<u64>(), 20_000);
    assert_eq!(hot.deltas.len(), 3);
}
