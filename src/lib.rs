//! packmeter: a gRPC sidecar that meters API-gateway calls and egress bytes
//! against per-account resource packs.
//!
//! A gateway calls [`Meter`](grpc::proto::meter_server::Meter) for every
//! request. packmeter deducts the call and its egress from the account's
//! free-tier and purchased packs in microseconds, from in-memory atomic
//! counters, and flushes the usage to a durable store in the background.
//! The billing rules R1–R12 are in `docs/billing-rules.md`.
//!
//! # Layout
//!
//! The domain knows nothing of tonic, SQL or clap:
//! - [`calendar`]: the billing zone, the free window and its monthly packs (R2–R4).
//! - [`packs`]: pack counters and the deduction order (R6).
//! - [`meter`]: the hot path: resident accounts, deduction, deny, idempotency (R1, R5–R7, R9, R10).
//! - [`ledger`]: unflushed per-hour deltas and the rows a flush writes (R12).
//!
//! Around it:
//! - [`app`]: the application layer every transport calls: the one
//!   deduction path ([`app::App::deduct`]) and one function per admin change.
//! - [`clock`]: the server clock, replaceable in tests.
//! - [`spill`]: usage the final flush could not write, replayed at start.
//! - [`journal`]: `--durability journal`: deductions synced to a local journal before they
//!   are acknowledged, replayed at start.
//! - [`flush`]: the background flusher, with put-back and backoff on failure.
//! - [`changes`]: grants and account changes made through other nodes on a shared store.
//! - [`store`]: the store trait, the parsed store URL, [`store::sqlite`] and [`store::postgres`].
//! - [`grpc`]: the `Meter` and `Admin` services, Envoy's rate-limit service ([`grpc::envoy_rls`]),
//!   the `serve --noop` baseline; proto ⇄ domain conversion and status codes.
//! - [`admin_http`]: `/livez`, `/readyz`, `/metrics`.
//! - [`auth`]: who may call the admin interfaces (bearer tokens, or loopback only).
//! - [`pack_page`]: the HTML pack list (R11) and usage chart that `admin_http` serves at
//!   `/packs?account=ID`; [`daily`]: an account's usage by day, for the chart and the CLI.
//! - [`metrics`]: Prometheus metrics.
//! - [`config`]: flags, `PACKMETER_*` variables and the TOML file, each setting declared
//!   once ([`config::Settings`]), validated.
//! - [`server`]: start-up and the shutdown sequence; [`drain`] counts requests in flight;
//!   [`linger`] closes each gRPC connection without losing what it wrote last; [`tls`]
//!   serves the gRPC port over TLS, re-reading rotated certificates.
//!
//! The binary (`src/main.rs`) holds the client tooling, so that the library
//! does not link it: `cli`, the `packmeter` command line with the client
//! commands, and `loadgen`, `packmeter loadgen`, the closed-loop load
//! generator for the hot-path RPCs (indicatif, hdrhistogram).
//! Those crates and clap are behind the `cli` feature (default), which the
//! binary requires; the library builds without it.
#![forbid(unsafe_code)]

pub mod admin_http;
pub mod app;
pub mod auth;
pub mod background;
pub mod calendar;
pub mod changes;
pub mod clock;
pub mod config;
pub mod daily;
pub mod drain;
pub mod export;
mod file_stamp;
pub mod flush;
pub mod grpc;
pub mod journal;
pub mod ledger;
pub mod linger;
pub mod meter;
pub mod metrics;
pub mod pack_page;
pub mod packs;
pub mod plans;
pub mod recalc;
pub mod server;
pub mod spill;
pub mod store;
pub mod tls;
