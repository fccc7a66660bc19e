//! The fuzz targets' checks (`fuzz/src/lib.rs`, included here) run in
//! `cargo test` on stable, over:
//! - every input under `fuzz/regressions/<target>/`: each one made a target
//!   crash once, and must not any more;
//! - the committed seed corpus `fuzz/corpus/<target>/seed-*`, which this
//!   file also writes from real messages, records and config files
//!   (`PACKMETER_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_regressions`),
//!   and checks is current, so a format change cannot leave it stale.
//!
//! Fuzzing itself needs nightly and `cargo fuzz`: see `fuzz/README.md`.

#[path = "../fuzz/src/lib.rs"]
#[allow(dead_code)]
mod checks;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use packmeter::{
    grpc::proto,
    journal::{self, Record},
    ledger::{AccountFlush, AccountRecord, DedupRecord, DeltaRow},
    packs::{Item, PackSource, PackSpec},
};
use prost::Message;

const TARGETS: [&str; 3] = ["journal_decode", "grpc_request", "config_parse"];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

fn check(target: &str) -> fn(&[u8]) {
    match target {
        "journal_decode" => checks::journal,
        "grpc_request" => checks::grpc,
        "config_parse" => checks::config,
        other => panic!("no fuzz target {other}"),
    }
}

/// The files of a directory, by name; none when it does not exist.
fn files(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .map(|e| e.expect("a directory entry").path())
        .filter(|p| p.is_file())
        .collect();
    out.sort();
    out
}

/// Runs each file through the target's check; names the file that fails.
fn run_all(target: &str, paths: &[PathBuf]) {
    let check = check(target);
    for path in paths {
        let data = std::fs::read(path).expect("a fuzz input");
        let result = std::panic::catch_unwind(|| check(&data));
        if let Err(e) = result {
            let why = e
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| e.downcast_ref::<&str>().copied())
                .unwrap_or("a panic");
            panic!("{target}: {} fails again: {why}", path.display());
        }
    }
}

#[test]
fn every_input_that_crashed_a_fuzz_target_is_handled() {
    let mut n = 0;
    for target in TARGETS {
        let inputs = files(&fuzz_dir().join("regressions").join(target));
        n += inputs.len();
        run_all(target, &inputs);
    }
    println!("{n} regression input(s) checked");
}

#[test]
fn the_seed_corpus_is_current_and_passes_every_check() {
    let write = std::env::var_os("PACKMETER_WRITE_FUZZ_SEEDS").is_some();
    for (target, seeds) in seeds() {
        let dir = fuzz_dir().join("corpus").join(target);
        if write {
            std::fs::create_dir_all(&dir).expect("the corpus directory");
            for old in files(&dir) {
                let name = old.file_name().expect("a name").to_string_lossy();
                if name.starts_with("seed-") {
                    std::fs::remove_file(&old).expect("an old seed removed");
                }
            }
        }
        let mut paths = Vec::new();
        for (name, bytes) in &seeds {
            let path = dir.join(format!("seed-{name}"));
            if write {
                std::fs::write(&path, bytes).expect("a seed written");
            }
            let committed = std::fs::read(&path).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; write the seeds with PACKMETER_WRITE_FUZZ_SEEDS=1 cargo test --test \
                     fuzz_regressions",
                    path.display()
                )
            });
            assert!(
                committed == *bytes,
                "{} is stale; write the seeds again with PACKMETER_WRITE_FUZZ_SEEDS=1 cargo test \
                 --test fuzz_regressions",
                path.display()
            );
            paths.push(path);
        }
        let on_disk: Vec<PathBuf> = files(&dir)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("seed-"))
            })
            .collect();
        paths.sort();
        assert_eq!(
            on_disk, paths,
            "{target}: a committed seed this file no longer makes"
        );
        run_all(target, &paths);
    }
}

/// The seeds also exercise the paths past decoding: each gRPC seed decodes
/// to the message it was made from, and each journal seed to its records.
#[test]
fn the_seeds_are_valid_inputs_not_just_bytes() {
    for (name, bytes) in grpc_seeds() {
        let (mode, body) = bytes.split_first().expect("a mode byte");
        if mode & 0x10 == 0 {
            assert!(!name.is_empty());
            // One message, framed by the target: prost reads it whole.
            match mode & 0x0f {
                0 => drop(proto::DeductRequest::decode(body).expect("a DeductRequest")),
                1 => drop(proto::DeductBatchRequest::decode(body).expect("a batch")),
                _ => {}
            }
        }
    }
    for (name, bytes) in journal_seeds() {
        let (mode, rest) = bytes.split_first().expect("a mode byte");
        if mode & 1 == 1 {
            continue;
        }
        let d = journal::decode(rest);
        assert!(!d.records.is_empty(), "{name}: holds records");
        // The damaged ones stop where they were damaged, by design.
        let damaged = name.contains("torn") || name.contains("flipped");
        assert_eq!(d.stop.is_some(), damaged, "{name}: {:?}", d.stop);
    }
}

// === seeds ===

type Seeds = Vec<(String, Vec<u8>)>;

fn seeds() -> BTreeMap<&'static str, Seeds> {
    BTreeMap::from([
        ("journal_decode", journal_seeds()),
        ("grpc_request", grpc_seeds()),
        ("config_parse", config_seeds()),
    ])
}

fn with_mode(mode: u8, bytes: &[u8]) -> Vec<u8> {
    let mut v = vec![mode];
    v.extend_from_slice(bytes);
    v
}

/// 2026-03-01T10:00:00Z, in microseconds.
const T: i64 = checks::NOW + 10 * 3_600_000_000;
const HOUR: i64 = 3_600_000_000;

fn journal_records() -> Vec<Record> {
    let pack = PackSpec {
        pack_id: "pk-2026-march".into(),
        source: PackSource::Purchased,
        item: Item::Calls,
        capacity: 1_000_000,
        valid_from: checks::NOW,
        valid_until: checks::NOW + 31 * 24 * HOUR,
        priority: 5,
        created_at: checks::NOW,
    };
    let hour = T - T % HOUR;
    vec![
        Record::Deduct {
            epoch: 1,
            parts: vec![AccountFlush {
                account_id: "acct-1".into(),
                account: Some(AccountRecord {
                    account_id: "acct-1".into(),
                    activated_at: Some(T),
                    suspended: false,
                    deny_on_exhausted: true,
                }),
                deltas: vec![
                    DeltaRow {
                        hour,
                        item: Item::Calls,
                        pack: Some(pack),
                        amount: 3,
                        span: Some((T, T + 1_000)),
                    },
                    DeltaRow {
                        hour,
                        item: Item::EgressBytes,
                        pack: None,
                        amount: 4096,
                        span: Some((T, T)),
                    },
                ],
                dedup: vec![DedupRecord {
                    request_id: "req-1".into(),
                    expires_at: T + HOUR,
                    hour: Some(hour),
                    calls_covered: 3,
                    calls_overage: 0,
                    egress_covered: 0,
                    egress_overage: 4096,
                }],
            }],
        },
        Record::Intent {
            epoch: 1,
            batch_id: "flush-00000000deadbeef-1".into(),
            now: T + 1_000_000,
            accounts: vec!["acct-1".into()],
        },
        Record::Deduct {
            epoch: 2,
            parts: vec![AccountFlush {
                account_id: "acct-2".into(),
                account: None,
                deltas: vec![DeltaRow {
                    hour,
                    item: Item::Calls,
                    pack: None,
                    amount: 1,
                    span: None,
                }],
                dedup: vec![],
            }],
        },
        Record::Probe,
        Record::Checkpoint {
            epoch: 2,
            journal_id: 0x1234_5678_9abc_def0,
        },
    ]
}

fn journal_seeds() -> Seeds {
    let records = journal_records();
    let mut all = Vec::new();
    for r in &records {
        journal::encode(r, &mut all);
    }
    let mut first = Vec::new();
    journal::encode(&records[0], &mut first);
    // The same records as bodies for the framing mode: [len u16][body].
    let mut bodies = Vec::new();
    for r in &records {
        let mut one = Vec::new();
        journal::encode(r, &mut one);
        let body = &one[journal::HEADER..];
        bodies.extend_from_slice(&(body.len() as u16).to_le_bytes());
        bodies.extend_from_slice(body);
    }
    let mut flipped = all.clone();
    let last = flipped.len() - 3;
    flipped[last] ^= 0x40;
    vec![
        ("records".into(), with_mode(0, &all)),
        ("records-replayed".into(), with_mode(2, &all)),
        ("one-deduction".into(), with_mode(2, &first)),
        ("bodies".into(), with_mode(1, &bodies)),
        ("bodies-replayed".into(), with_mode(3, &bodies)),
        ("torn-tail".into(), with_mode(0, &all[..all.len() - 5])),
        ("flipped-byte".into(), with_mode(0, &flipped)),
        // The zeros the writer lays ahead of its records: a clean end.
        (
            "zero-tail".into(),
            with_mode(0, &[&all[..], &[0; 4096]].concat()),
        ),
        // Zeros with a record after them: replay stops at the zeros.
        (
            "zeros-then-torn-record".into(),
            with_mode(0, &[&all[..], &[0; 64], &first[..]].concat()),
        ),
    ]
}

fn ts(micros: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp {
        seconds: micros / 1_000_000,
        nanos: (micros % 1_000_000) as i32 * 1000,
    })
}

fn grpc_seeds() -> Seeds {
    use envoy_types::pb::envoy::{
        extensions::common::ratelimit::v3::{rate_limit_descriptor::Entry, RateLimitDescriptor},
        service::ratelimit::v3::RateLimitRequest,
    };
    let deduct = proto::DeductRequest {
        account_id: "acct-1".into(),
        calls: 1,
        egress_bytes: 2048,
        at: ts(checks::NOW - 60_000_000),
        request_id: "req-7f3a".into(),
    };
    let mut frames = Vec::new();
    for i in 0..3u64 {
        let m = proto::DeductRequest {
            calls: i + 1,
            at: None,
            ..deduct.clone()
        }
        .encode_to_vec();
        frames.push(0);
        frames.extend_from_slice(&(m.len() as u32).to_be_bytes());
        frames.extend_from_slice(&m);
    }
    let entry = |k: &str, v: &str| Entry {
        key: k.into(),
        value: v.into(),
    };
    let rls = RateLimitRequest {
        domain: "gateway".into(),
        descriptors: vec![
            RateLimitDescriptor {
                entries: vec![entry("account", "acct-1"), entry("item", "calls")],
                ..Default::default()
            },
            RateLimitDescriptor {
                entries: vec![
                    entry("account", "acct-1"),
                    entry("item", "egress_bytes"),
                    entry("remote_address", "10.0.0.1"),
                ],
                hits_addend: Some(envoy_types::pb::google::protobuf::UInt64Value { value: 4096 }),
                ..Default::default()
            },
        ],
        hits_addend: 1,
    };
    vec![
        ("deduct".into(), with_mode(0, &deduct.encode_to_vec())),
        (
            "deduct-batch".into(),
            with_mode(
                1,
                &proto::DeductBatchRequest {
                    deductions: vec![deduct.clone(), proto::DeductRequest::default()],
                }
                .encode_to_vec(),
            ),
        ),
        ("deduct-stream".into(), with_mode(0x12, &frames)),
        (
            "get-usage".into(),
            with_mode(
                3,
                &proto::GetUsageRequest {
                    account_id: "acct-1".into(),
                    at: ts(T),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "put-account".into(),
            with_mode(
                4,
                &proto::PutAccountRequest {
                    account: Some(proto::Account {
                        account_id: "acct-1".into(),
                        activated_at: ts(T),
                        suspended: true,
                        deny_on_exhausted: true,
                        billing_zone: String::new(),
                    }),
                    update_mask: Some(prost_types::FieldMask {
                        paths: vec!["activated_at".into(), "deny_on_exhausted".into()],
                    }),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "get-account".into(),
            with_mode(
                5,
                &proto::GetAccountRequest {
                    account_id: "acct-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "grant-pack-for".into(),
            with_mode(
                6,
                &proto::GrantPackRequest {
                    account_id: "acct-1".into(),
                    item: proto::Item::Calls as i32,
                    capacity: 100_000,
                    valid_from: ts(checks::NOW + 30 * 24 * HOUR),
                    valid_until: None,
                    pack_id: "pk-1".into(),
                    priority: 2,
                    valid_for: Some(proto::Validity {
                        months: 1,
                        seconds: 3600,
                    }),
                }
                .encode_to_vec(),
            ),
        ),
        (
            "grant-pack-until".into(),
            with_mode(
                6,
                &proto::GrantPackRequest {
                    account_id: "acct-1".into(),
                    item: proto::Item::EgressBytes as i32,
                    capacity: 1 << 30,
                    valid_until: ts(checks::NOW + 24 * HOUR),
                    ..Default::default()
                }
                .encode_to_vec(),
            ),
        ),
        (
            "list-packs".into(),
            with_mode(
                7,
                &proto::ListPacksRequest {
                    account_id: "acct-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        ("flush".into(), with_mode(8, &[])),
        (
            "export-usage".into(),
            with_mode(
                9,
                &proto::ExportUsageRequest {
                    from: ts(checks::NOW - 48 * HOUR),
                    to: ts(checks::NOW - 24 * HOUR),
                    account_id: "acct-1".into(),
                }
                .encode_to_vec(),
            ),
        ),
        ("rate-limit".into(), with_mode(10, &rls.encode_to_vec())),
    ]
}

fn config_seeds() -> Seeds {
    // Every key the file takes, with a value it accepts.
    let full = r#"listen = "0.0.0.0:50051"
admin_listen = "127.0.0.1:9090"
store = "sqlite:///var/lib/packmeter/packmeter.db"
flush_interval = "500ms"
flush_max_lag = "2s"
late_grace = "1h"
dedup_window = "2h"
timezone = "Asia/Shanghai"
max_future_skew = "5m"
unknown_accounts = "activate"
strict_deny = "off"
shutdown_grace = "30s"
durability = "journal"
log_format = "json"
max_calls = 5000
max_egress_bytes = 1_073_741_824
max_batch = 1000
free_calls = 1000
free_egress_bytes = 1048576
free_months = 12
idle_evict = "10m"
rls_domain = "gateway"
rls_account_key = "tenant"
rls_item_key = "kind"
max_message_bytes = 4194304
max_concurrent_streams = 1024
max_export_range = "731d"
"#;
    let readme =
        "listen = \"0.0.0.0:50051\"\nstore = \"sqlite:///var/lib/packmeter/packmeter.db\"\n\
                  timezone = \"Asia/Shanghai\"\nflush_interval = \"500ms\"\n";
    let postgres =
        "store = \"postgres://packmeter:secret@db.internal:5432/packmeter?sslmode=require\"\n\
                    timezone = \"-05:00\"\nunknown_accounts = \"reject\"\n";
    vec![
        ("toml-readme".into(), with_mode(0, readme.as_bytes())),
        ("toml-every-key".into(), with_mode(0, full.as_bytes())),
        ("toml-postgres".into(), with_mode(0, postgres.as_bytes())),
        (
            "flags".into(),
            with_mode(
                1,
                b"--listen\n127.0.0.1:0\n--flush-interval\n250ms\n--timezone\n+08:00\n\
                  --max-batch\n500\n--durability\nflush",
            ),
        ),
        (
            "flags-and-file".into(),
            with_mode(
                1,
                b"late_grace = \"2h\"\nmax_calls = 10\n\0--config\nfile.toml\n--late-grace\n90m",
            ),
        ),
        ("duration".into(), with_mode(2, b"1h 30m 15s 200ms")),
        (
            "store-sqlite".into(),
            with_mode(2, b"sqlite://./packmeter.db"),
        ),
        (
            "store-postgres".into(),
            with_mode(
                2,
                b"postgresql://u:p%40ss@[::1]:5433/billing?sslmode=verify-full&connect_timeout=5",
            ),
        ),
        (
            "tokens".into(),
            with_mode(
                3,
                b"# admin tokens\n\nk8s-ops-7d1f0a\n  billing-cron-22c9  \n",
            ),
        ),
    ]
}
