//! What each fuzz target checks, shared by the targets in `fuzz_targets/`
//! and by the regression test `tests/fuzz_regressions.rs`, which runs every
//! input under `fuzz/regressions/<target>/` through the same function (it
//! includes this file with `#[path]`), so a crash found once stays fixed.
//!
//! Each function takes the fuzzer's bytes, runs the code packmeter runs on
//! such input, and panics only when packmeter misbehaves: a panic inside
//! packmeter, or a broken invariant asserted here. An error returned for bad
//! input is the expected outcome.
//!
//! The first byte of every input picks a mode; see each function.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, OnceLock},
};

use envoy_types::pb::envoy::service::ratelimit::v3::RateLimitRequest;
use futures_util::FutureExt;
use packmeter::{
    calendar::Ts,
    config::{Config, ServeArgs},
    grpc::{self, codec::StrictCodec, convert, proto},
    journal::{self, Record},
    meter::{validate_account_id, Meter},
    store::StoreUrl,
};
use tonic::{codec::Codec, codegen::Bytes, Status, Streaming};

/// 2026-03-01T00:00:00Z: a fixed server clock, so that a finding replays
/// the same way whenever it is run.
pub const NOW: Ts = 1_772_323_200 * packmeter::calendar::SECOND;

/// A directory of this process's own, for the files the targets write.
fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        // tmpfs when there is one: the journal and config targets write a
        // file or two per input.
        let shm = Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::Builder::new()
                .prefix("packmeter-fuzz-")
                .tempdir_in(shm)
        } else {
            tempfile::Builder::new().prefix("packmeter-fuzz-").tempdir()
        };
        dir.expect("a temporary directory for the fuzz target's files")
    })
    .path()
}

// === journal ===

/// The journal's record decoder, and the replay that reads what it decodes.
///
/// Mode (first byte):
/// - bit 0 clear: the rest is a segment file's bytes, as they are;
/// - bit 0 set: the rest is a list of bodies, each `[len u16 le][body]`
///   (the last may be short), and this function writes each one's header
///   with its real length and CRC, so the fuzzer gets past the CRC to the
///   postcard payloads;
/// - bit 1 set: once the bytes decode to at least one record, they are also
///   replayed ([`journal::replay`]) from a segment file, and the spill file
///   that replay writes must hold every deduction's amounts.
pub fn journal(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let buf = if mode & 1 == 0 {
        rest.to_vec()
    } else {
        frame_bodies(rest)
    };
    let decoded = journal::decode(&buf);

    // The records are contiguous from the start, and reading stops where
    // the first bad one starts, or at the end.
    let mut end = 0u64;
    for (offset, _) in &decoded.records {
        assert_eq!(*offset, end, "records are contiguous");
        let at = usize::try_from(*offset).expect("an offset within the buffer");
        let len = u32::from_le_bytes(buf[at..at + 4].try_into().expect("4 bytes"));
        end += (journal::HEADER as u64) + u64::from(len);
    }
    match &decoded.stop {
        Some(stop) => {
            assert_eq!(stop.offset, end, "reading stops at the first bad record");
            assert!(stop.offset < buf.len() as u64, "a stop inside the buffer");
            assert!(!stop.why.is_empty(), "a stop says why");
        }
        None => {
            let tail = &buf[usize::try_from(end).expect("an offset within the buffer")..];
            assert!(
                tail.iter().all(|b| *b == 0),
                "without a stop, every byte is read but zeros laid ahead of the records"
            );
        }
    }

    // Whatever decodes, encodes back to itself.
    let mut again = Vec::new();
    for (_, r) in &decoded.records {
        journal::encode(r, &mut again);
    }
    let redecoded = journal::decode(&again);
    assert_eq!(redecoded.stop, None, "re-encoded records decode");
    let records: Vec<&Record> = decoded.records.iter().map(|(_, r)| r).collect();
    let records_again: Vec<&Record> = redecoded.records.iter().map(|(_, r)| r).collect();
    assert_eq!(records, records_again, "records round-trip");

    if mode & 2 != 0 && !decoded.records.is_empty() {
        replay(&buf, &decoded.records);
    }
}

/// Frames `[len u16][body]...` as journal records with real CRCs.
fn frame_bodies(mut rest: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(rest.len() + rest.len() / 4);
    while let Some((len, after)) = rest.split_first_chunk::<2>() {
        let len = usize::from(u16::from_le_bytes(*len)).min(after.len());
        let body = &after[..len];
        out.extend_from_slice(&(len as u32).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        out.extend_from_slice(body);
        rest = &after[len..];
    }
    out
}

/// Replays `buf` as the only segment of a fresh journal directory: replay
/// must succeed, and the spill file it writes must hold exactly the
/// amounts of the deduction records (epoch 1 and later; nothing is
/// checkpointed).
fn replay(buf: &[u8], records: &[(u64, Record)]) {
    let base = scratch().join("journal");
    let _ = std::fs::remove_dir_all(&base);
    let dir = base.join("store.journal");
    std::fs::create_dir_all(&dir).expect("the journal directory");
    std::fs::write(dir.join("00000000000000000001-0000.seg"), buf).expect("the segment");
    let spill = base.join("store.spill");

    let replayed = journal::replay(&dir, &spill, NOW)
        .unwrap_or_else(|e| panic!("replay of a readable journal fails: {e}"));

    let want: u128 = records
        .iter()
        .filter_map(|(_, r)| match r {
            Record::Deduct { epoch, parts } if *epoch > 0 => Some(parts),
            _ => None,
        })
        .flatten()
        .flat_map(|p| &p.deltas)
        .map(|d| u128::from(d.amount))
        .sum();
    let batches = if replayed.batches == 0 {
        assert!(!spill.exists(), "no batch, no spill file");
        Vec::new()
    } else {
        packmeter::spill::read(&spill).unwrap_or_else(|e| panic!("the spill file reads: {e}"))
    };
    assert_eq!(batches.len(), replayed.batches, "every batch is spilled");
    let got: u128 = batches
        .iter()
        .flat_map(|b| &b.accounts)
        .flat_map(|p| &p.deltas)
        .map(|d| u128::from(d.amount))
        .sum();
    assert_eq!(got, want, "replay keeps every amount, once");
}

// === gRPC requests ===

/// What the server was configured with: the defaults, as `serve` resolves
/// them with no flag, file or variable.
fn server() -> &'static (Config, Meter) {
    static SERVER: OnceLock<(Config, Meter)> = OnceLock::new();
    SERVER.get_or_init(|| {
        let config = Config::resolve(&ServeArgs::default()).expect("the default config");
        // Validation reads only the meter's settings; the store is there
        // because a meter has one (a real SQLite file, never read here).
        let path = scratch().join("validate.db");
        let store = packmeter::store::sqlite::SqliteStore::open(&path.to_string_lossy())
            .expect("a SQLite store in the scratch directory");
        let meter = Meter::new(config.meter.clone(), Arc::new(store));
        (config, meter)
    })
}

/// Every message a request body of this type holds, decoded as the server
/// decodes it: tonic's request framing and [`StrictCodec`]'s decoder, with
/// the server's `--max-message-bytes`. Stops at the first error, which must
/// be INVALID_ARGUMENT (a malformed message), or what tonic answers for bad
/// framing.
fn decode_all<U>(body: Vec<u8>) -> Vec<U>
where
    U: prost::Message + Default + Send + 'static,
{
    let (config, _) = server();
    let mut codec = StrictCodec::<(), U>::default();
    let mut stream = Streaming::<U>::new_request(
        codec.decoder(),
        http_body_util::Full::new(Bytes::from(body)),
        // The server accepts no compression.
        None,
        Some(config.limits.max_message_bytes),
    );
    let mut out = Vec::new();
    loop {
        // The body is all in memory, so every poll is ready at once.
        let next = stream
            .message()
            .now_or_never()
            .expect("a body in memory decodes without waiting");
        match next {
            Ok(Some(m)) => out.push(m),
            Ok(None) => break,
            Err(status) => {
                expected_status(&status);
                break;
            }
        }
    }
    out
}

/// A refusal of bad input: a code a client can act on and a message.
fn expected_status(s: &Status) {
    use tonic::Code::*;
    assert!(
        matches!(
            s.code(),
            InvalidArgument | FailedPrecondition | ResourceExhausted | OutOfRange | Internal
        ),
        "unexpected status for bad input: {s:?}"
    );
    assert!(!s.message().is_empty(), "a status without a message: {s:?}");
    // INTERNAL comes only from tonic's framing (a compressed-flag the
    // server never negotiated, a body that ends inside a frame), as the
    // gRPC spec asks; a message that does not parse is INVALID_ARGUMENT
    // naming it.
    if s.code() == Internal {
        assert!(
            s.message().starts_with("protocol error") || s.message().starts_with("Unexpected EOF"),
            "INTERNAL for something other than framing: {s:?}"
        );
    }
}

/// A Meter request as the Meter service checks it: converted, then
/// validated at [`NOW`].
fn deduct(r: &proto::DeductRequest) {
    let (_, meter) = server();
    match grpc::meter::request(r) {
        Ok(req) => {
            if let Err(e) = meter.validate(req.account_id, &req.deduction, NOW) {
                expected_status(&e.into());
            }
        }
        Err(s) => expected_status(&s),
    }
}

/// The gRPC request decoders, each followed by the checks its handler runs
/// before it touches any state.
///
/// Mode (first byte): bits 0–3 pick the message type (DeductRequest,
/// DeductBatchRequest, a DeductStream, GetUsageRequest, PutAccountRequest,
/// GetAccountRequest, GrantPackRequest, ListPacksRequest, FlushRequest,
/// ExportUsageRequest, Envoy's RateLimitRequest); bit 4 set: the rest is
/// the HTTP/2 DATA as it is (gRPC frames: `[compressed u8][len u32
/// be][message]`), else it is one message and is framed here.
pub fn grpc(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let body = if mode & 0x10 != 0 {
        rest.to_vec()
    } else {
        let mut b = Vec::with_capacity(rest.len() + 5);
        b.push(0);
        b.extend_from_slice(&(rest.len() as u32).to_be_bytes());
        b.extend_from_slice(rest);
        b
    };
    let (config, meter) = server();
    match mode & 0x0f {
        // Deduct, and DeductStream: each message in turn.
        0 | 2 => {
            for r in decode_all::<proto::DeductRequest>(body) {
                deduct(&r);
            }
        }
        1 => {
            for r in decode_all::<proto::DeductBatchRequest>(body) {
                if r.deductions.len() <= config.max_batch {
                    r.deductions.iter().for_each(deduct);
                }
            }
        }
        3 => {
            for r in decode_all::<proto::GetUsageRequest>(body) {
                if let Err(s) = convert::ts("at", r.at.as_ref()) {
                    expected_status(&s);
                }
            }
        }
        4 => {
            for r in decode_all::<proto::PutAccountRequest>(body) {
                let Some(a) = r.account else { continue };
                let change = validate_account_id(&a.account_id)
                    .map_err(Status::from)
                    .and_then(|()| convert::account_change(a, r.update_mask.as_ref()));
                if let Err(s) = change {
                    expected_status(&s);
                }
            }
        }
        5 | 7 => {
            for r in decode_all::<proto::GetAccountRequest>(body) {
                if let Err(e) = validate_account_id(&r.account_id) {
                    expected_status(&e.into());
                }
            }
        }
        6 => {
            for r in decode_all::<proto::GrantPackRequest>(body) {
                let terms = grpc::admin::grant(r).and_then(|g| {
                    g.terms(NOW, &meter.config().zone)
                        .map_err(Status::from)
                        .map(|(from, until)| {
                            assert!(from < until, "a pack ends after it starts");
                            (g, from, until)
                        })
                });
                if let Err(s) = terms {
                    expected_status(&s);
                }
            }
        }
        8 => {
            decode_all::<proto::FlushRequest>(body);
        }
        9 => {
            for r in decode_all::<proto::ExportUsageRequest>(body) {
                match grpc::admin::export_range(r, config.limits.max_export_range) {
                    Ok((from, to, _)) => assert!(from <= to, "an export range in order"),
                    Err(s) => expected_status(&s),
                }
            }
        }
        _ => {
            for r in decode_all::<RateLimitRequest>(body) {
                match grpc::envoy_rls::map_request(&config.rls, &r) {
                    Ok(wanted) => {
                        for w in wanted {
                            if let Err(e) = meter.validate(w.account_id, &w.deduction, NOW) {
                                expected_status(&e.into());
                            }
                        }
                    }
                    Err(s) => expected_status(&s),
                }
            }
        }
    }
}

// === config ===

/// `packmeter serve`'s flags, as clap parses them.
#[derive(clap::Parser, Debug)]
#[command(name = "packmeter-serve")]
struct Serve {
    #[command(flatten)]
    args: ServeArgs,
}

/// The config parsers: the TOML file, the flags, and the parsers under
/// them (durations, store URLs, the admin token file).
///
/// Mode (first byte, modulo 4):
/// - 0: the rest is a TOML config file, resolved as `serve --config FILE`;
/// - 1: the rest is `TOML\0ARGS`: the command line, one argument a line,
///   resolved as `serve` resolves it; with `--config` (any path), the
///   file read is one holding `TOML`;
/// - 2: the rest is one value for each of `parse_duration`,
///   `StoreUrl::parse` and `store::redact`;
/// - 3: the rest is an admin token file, read as `serve` reads it.
///
/// A refusal must name a field (`ConfigError::field`) and say why.
pub fn config(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    match mode % 4 {
        0 => {
            let path = config_file();
            std::fs::write(&path, rest).expect("the config file");
            let args = ServeArgs {
                config: Some(path),
                ..ServeArgs::default()
            };
            resolve(&args);
        }
        1 => {
            let (toml, argv) = text.split_once('\0').unwrap_or(("", &*text));
            let argv = std::iter::once("packmeter-serve").chain(argv.split('\n'));
            if let Ok(mut serve) = <Serve as clap::Parser>::try_parse_from(argv) {
                if serve.args.config.is_some() {
                    let path = config_file();
                    std::fs::write(&path, toml).expect("the config file");
                    serve.args.config = Some(path);
                }
                resolve(&serve.args);
            }
        }
        2 => {
            match packmeter::config::parse_duration(&text) {
                Ok(d) => assert!(d <= packmeter::config::MAX_DURATION),
                Err(e) => assert!(!e.is_empty()),
            }
            match StoreUrl::parse(&text) {
                // What the logs show.
                Ok(url) => assert!(!url.to_string().is_empty()),
                Err(e) => assert!(!e.0.is_empty()),
            }
            let _ = packmeter::store::redact(&text);
        }
        _ => {
            let path = scratch().join("tokens");
            std::fs::write(&path, rest).expect("the token file");
            match packmeter::auth::read_tokens(&path) {
                Ok(tokens) => {
                    assert!(!tokens.is_empty());
                    for t in tokens {
                        assert!(!t.is_empty() && !t.iter().any(u8::is_ascii_whitespace));
                    }
                }
                Err(e) => assert!(!e.is_empty()),
            }
        }
    }
}

/// Where mode 0 writes the TOML file.
fn config_file() -> PathBuf {
    scratch().join("packmeter.toml")
}

fn resolve(args: &ServeArgs) {
    if let Err(e) = Config::resolve(args) {
        assert!(!e.field.is_empty(), "a config error names its field");
        assert!(!e.message.is_empty(), "a config error says why");
    }
}
