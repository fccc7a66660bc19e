//! `packmeter serve`: wires the application, the flusher, the gRPC services
//! and the admin port together, and owns start-up and the shutdown
//! sequence.
//!
//! Start-up binds both ports first, then replays the journal (see
//! [`crate::journal`]) and the spill file a previous shutdown may have left
//! (see [`crate::spill`]) into the store. Until that is done health reports
//! NOT_SERVING, `/readyz` 503 (`/livez` and `/metrics` answer), and every
//! Meter, Admin and Envoy call gets UNAVAILABLE ([`crate::grpc::StartGate`]):
//! nothing is served from a store that may lack acknowledged usage. Then
//! health flips to SERVING and the listening line is printed. A signal
//! during the replay stops it between two batches (it is idempotent, and the
//! next start goes on) and the process exits 0.
//!
//! Shutdown, all within `--shutdown-grace` from the signal:
//! 1. SIGTERM or SIGINT arrives;
//! 2. health reports NOT_SERVING and `/readyz` 503; the gate closes, so
//!    every new deduction gets UNAVAILABLE and open `DeductStream`s answer
//!    what they took and end with UNAVAILABLE; once `close` returns, no
//!    deduction is in progress;
//! 3. the gRPC server stops accepting connections and waits for the
//!    requests in flight (bounded by half the grace), then closes them;
//! 4. the background flusher stops (a flush already running finishes, or
//!    the deadline passes);
//! 5. the final flush runs, and repeats until nothing is unflushed;
//! 6. the connections close in order: each got a GOAWAY at step 3, writes
//!    its last replies and trailers, and closes once the client has them
//!    (a lingering close, [`crate::linger`]); until the deadline. Exiting
//!    before would reset them, and a client would lose an answer (a stream
//!    ending UNKNOWN instead of UNAVAILABLE, or the ALLOW of a billed call);
//! 7. the process exits 0; or, if the store refused the final flush or the
//!    deadline passed, it writes what is unflushed to the spill file beside
//!    the store and exits non-zero. Nothing acknowledged is lost either way.

use std::{
    future::Future,
    pin::Pin,
    sync::{atomic::Ordering, Arc},
    task::{Context, Poll},
    time::{Duration, Instant},
};

use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic_health::ServingStatus;

use crate::grpc::rls_server::rate_limit_service_server::RateLimitServiceServer;
use crate::{
    admin_http::{self, AdminState},
    app::App,
    auth::{AdminAuth, AdminInterceptor, TokenFile},
    clock::SystemClock,
    config::Config,
    drain::Drain,
    grpc::{
        admin::AdminService, envoy_rls::RlsService, meter::MeterService, noop::NoopService, proto,
        StartGate,
    },
    journal::Durability,
    meter::Meter,
    metrics::Metrics,
    spill, store,
};

/// Why `serve` stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}", open_failed(.0))]
    Open(#[from] crate::store::OpenError),
    #[error("cannot read the store: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("cannot open the store {url}: {error}")]
    OpenStore {
        url: String,
        error: crate::store::StoreError,
    },
    /// The store must not be used by this binary (a schema newer than it
    /// knows): a configuration error.
    #[error("cannot use the store {url}: {message}")]
    IncompatibleStore { url: String, message: String },
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("gRPC server failed: {0}")]
    Grpc(#[from] tonic::transport::Error),
    #[error(
        "the final flush failed ({error}); the unflushed usage is in {} and is replayed at \
         the next start", path.display()
    )]
    FinalFlush {
        error: crate::store::StoreError,
        path: std::path::PathBuf,
    },
    #[error(
        "the final flush failed ({error}) and the unflushed usage could not be written to the \
         spill file either ({spill}); it is lost"
    )]
    SpillFailed {
        error: crate::store::StoreError,
        spill: spill::SpillError,
    },
    #[error("{0}")]
    Replay(#[from] spill::SpillError),
    #[error("{0}")]
    Journal(#[from] crate::journal::JournalError),
    /// The journal's replay at start-up failed. It checkpoints the journal
    /// only once the spill file holds what it read, so nothing is lost.
    #[error(
        "the journal's replay failed ({error}); nothing is lost: the journal {} is kept and \
         the next start replays it again. If a disk is full (the journal's, or the spill \
         file's beside the store), free space first", dir.display()
    )]
    JournalReplay {
        error: crate::journal::JournalError,
        dir: std::path::PathBuf,
    },
    #[error(
        "the final flush failed ({error}); the unflushed usage stays in the journal {} and is \
         replayed at the next start", dir.display()
    )]
    FinalFlushJournaled {
        error: crate::store::StoreError,
        dir: std::path::PathBuf,
    },
    /// The start-up task (the replay) ended without an answer: a panic.
    #[error("start-up failed: {0}; the next start replays the journal and the spill file again")]
    StartUp(String),
    #[error("cannot listen for SIGTERM/SIGINT: {0}")]
    Signal(std::io::Error),
    /// The plans file disagrees with the plans the store records in force.
    #[error("invalid configuration: plans: {0}")]
    PlansInForce(String),
    #[error("{0}")]
    PlansStore(String),
    #[error("cannot listen for SIGHUP (reloads of the plans file): {0}")]
    HangupSignal(std::io::Error),
    #[error("reflection setup failed: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The token file was checked at configuration time and has since
    /// become unreadable or empty.
    #[error("invalid configuration: admin_token_file: {0}")]
    AdminTokens(String),
    /// The TLS files were checked at configuration time and have since
    /// become unusable.
    #[error("invalid configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// An unwritable store is the configuration's fault, and said like one.
fn open_failed(e: &crate::store::OpenError) -> String {
    match e {
        crate::store::OpenError::NotWritable { .. }
        | crate::store::OpenError::NoDirectory { .. } => {
            format!("invalid configuration: store: {e}")
        }
        _ => format!("cannot open the store: {e}"),
    }
}

/// `EX_USAGE`: the configuration cannot work.
pub const EX_USAGE: u8 = 64;
/// `EX_UNAVAILABLE`: the store is held by another process.
pub const EX_UNAVAILABLE: u8 = 69;

impl ServeError {
    /// The exit code `serve` stops with: 64 for a store this process
    /// cannot write, whose directory is missing, or whose schema is newer
    /// than this binary knows (as for any other bad setting), 69 for a
    /// store another process holds, 1 for anything else. README, "Exit
    /// codes".
    pub fn exit_code(&self) -> u8 {
        use crate::store::OpenError;
        match self {
            ServeError::Open(OpenError::NotWritable { .. } | OpenError::NoDirectory { .. }) => {
                EX_USAGE
            }
            ServeError::Open(OpenError::InUse { .. }) => EX_UNAVAILABLE,
            ServeError::IncompatibleStore { .. }
            | ServeError::AdminTokens(_)
            | ServeError::PlansInForce(_)
            | ServeError::Tls(_) => EX_USAGE,
            _ => 1,
        }
    }
}

/// Runs the server until `shutdown` resolves, then drains and flushes.
///
/// Binds both ports at once; prints one line to stdout once start-up (the
/// replay) is done and it serves: `packmeter listening grpc=ADDR admin=ADDR`.
pub async fn serve(
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ServeError> {
    if !config.create_store_dir {
        store::check_dir(&config.store)?;
    }
    let store = store::open(&config.store).await.map_err(|e| match e {
        store::OpenError::Store(error) => ServeError::OpenStore {
            url: config.store.to_string(),
            error,
        },
        store::OpenError::Incompatible(message) => ServeError::IncompatibleStore {
            url: config.store.to_string(),
            message,
        },
        e => ServeError::Open(e),
    })?;
    if let Some(plans) = &config.meter.plans {
        let now = crate::calendar::now_ts();
        crate::plans::reconcile(
            &*store,
            &plans.file(),
            &default_plan(&config.meter),
            config.meter.late_grace,
            now,
        )
        .await
        .map_err(|e| match e {
            crate::plans::PlansError::Store(_) => ServeError::PlansStore(e.to_string()),
            e => ServeError::PlansInForce(format!("{}: {e}", plans.path().display())),
        })?;
    }
    let spill_path = store::spill_path(&config.store);
    let spill_fallback = store::fallback_spill_path(&config.store);
    let journal_dir = crate::journal::journal_dir(&config.store);
    // Built now, reached only once start-up is done (`StartUp::run`).
    let metrics = Arc::new(Metrics::new());
    let app = Arc::new(App::new(
        config.meter.clone(),
        store,
        metrics.clone(),
        Arc::new(SystemClock),
        crate::flush::BATCH_ACCOUNTS,
    ));
    let meter: Arc<Meter> = app.meter().clone();
    let flusher = app.flusher().clone();
    // Notified by a reload of the plans file: a plan it adds may be due.
    let plans_changed = Arc::new(tokio::sync::Notify::new());
    if let Some(plans) = config.meter.plans.clone() {
        // The plans whose instant has passed on this server's clock.
        plans.switch_through(app.now());
        reload_plans_on_hangup(plans, app.clone(), metrics.clone(), plans_changed.clone())
            .map_err(ServeError::HangupSignal)?;
    }
    // Who may call Admin and the pack page: one policy for both ports.
    let admin_auth = {
        let tokens = match &config.admin_token_file {
            Some(path) => Some(Arc::new(
                TokenFile::open(path).map_err(ServeError::AdminTokens)?,
            )),
            None => None,
        };
        AdminAuth::new(tokens, metrics.clone())
    };
    if !admin_auth.has_tokens() {
        tracing::info!(
            "no --admin-token-file: admin RPCs and the pack page are served to loopback peers only"
        );
    }

    // TLS: the files were checked at configuration time; load them again
    // (they may have changed since) before any port is bound.
    let tls = match &config.tls {
        Some(files) => {
            let tls = crate::tls::TlsReloader::new(files.clone(), metrics.clone())?;
            tracing::info!(
                cert = %files.cert.display(),
                client_auth = tls.client_auth(),
                "TLS on the gRPC port; the admin HTTP port stays plaintext"
            );
            Some(Arc::new(tls))
        }
        None => None,
    };

    let bind = |addr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })
    };
    let grpc_listener = bind(config.listen).await?;
    let admin_listener = bind(config.admin_listen).await?;
    let grpc_addr = grpc_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.listen,
            source,
        })?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|source| ServeError::Bind {
            addr: config.admin_listen,
            source,
        })?;

    let (health, health_service) = tonic_health::server::health_reporter();
    let services = [
        "",
        "packmeter.v1.Meter",
        "packmeter.v1.Admin",
        "envoy.service.ratelimit.v3.RateLimitService",
    ];
    // NOT_SERVING until start-up is done (the reporter starts "" SERVING).
    for s in services {
        health
            .set_service_status(s, ServingStatus::NotServing)
            .await;
    }
    // Both reflection versions: grpcurl and older tools still ask v1alpha.
    let reflection = || {
        tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
    };
    let reflection_v1 = reflection().build_v1()?;
    let reflection_v1alpha = reflection().build_v1alpha()?;

    let drain = Arc::new(Drain::default());
    let tasks = TaskTracker::new();
    let stop_background = CancellationToken::new();

    let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let admin_state = Arc::new(AdminState {
        app: app.clone(),
        ready: false.into(),
        started: started.clone(),
        auth: admin_auth.clone(),
    });
    let stop_admin = CancellationToken::new();
    let admin = {
        let stop = stop_admin.clone();
        let router = admin_http::router(admin_state.clone());
        tokio::spawn(async move {
            // The peer address, for the loopback-only pack page.
            let router = router.into_make_service_with_connect_info::<std::net::SocketAddr>();
            let served = axum::serve(admin_listener, router)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "admin HTTP server failed");
            }
        })
    };

    // The shutdown sequence starts here: flip health and readiness, close
    // the gate to deductions, then let tonic drain. The deadline counts
    // from the signal.
    let draining = CancellationToken::new();
    let grace = config.shutdown_grace;
    let deadline = Arc::new(std::sync::OnceLock::<tokio::time::Instant>::new());
    {
        let (draining, health, admin_state, app, deadline) = (
            draining.clone(),
            health.clone(),
            admin_state.clone(),
            app.clone(),
            deadline.clone(),
        );
        tokio::spawn(async move {
            shutdown.await;
            let _ = deadline.set(tokio::time::Instant::now() + grace);
            tracing::info!("shutdown requested: refusing new deductions and draining");
            // Waits (microseconds) for deductions between their checks and
            // their ledger entry; every later one is refused. Before
            // readiness clears: start-up, flipping to ready, checks the
            // gate after (see `StartUp::run`).
            app.close();
            admin_state.ready.store(false, Ordering::Release);
            for s in services {
                health
                    .set_service_status(s, ServingStatus::NotServing)
                    .await;
            }
            draining.cancel();
        });
    }

    tracing::info!(%grpc_addr, %admin_addr, store = %config.store, "ports bound; not ready until the journal and the spill file are replayed");

    let limits = &config.limits;
    let max_message = limits.max_message_bytes;
    let router = tonic::transport::Server::builder()
        // Calls beyond it wait on the client (HTTP/2 SETTINGS), rather
        // than one connection taking every task the server has.
        .max_concurrent_streams(Some(limits.max_concurrent_streams))
        .layer(tower::layer::layer_fn({
            let metrics = metrics.clone();
            let drain = drain.clone();
            move |inner| Timed {
                inner,
                metrics: metrics.clone(),
                drain: drain.clone(),
            }
        }))
        .add_service(health_service)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha);
    let router = if config.noop {
        // The benchmark baseline: same builder and layers, fixed answers.
        tracing::warn!(
            "--noop: answering Meter and ShouldRateLimit with fixed responses; nothing is metered"
        );
        let noop = Arc::new(NoopService::default());
        router
            .add_service(
                proto::meter_server::MeterServer::from_arc(noop.clone())
                    .max_decoding_message_size(max_message),
            )
            .add_service(
                RateLimitServiceServer::from_arc(noop).max_decoding_message_size(max_message),
            )
    } else {
        // Admin alone is behind the credential check; Meter, Envoy's RLS,
        // health and reflection stay open (README, "Security").
        let admin = proto::admin_server::AdminServer::new(AdminService::new(
            app.clone(),
            limits.max_export_range,
        ))
        .max_decoding_message_size(max_message);
        // Every one of them refuses calls until start-up is done.
        use tonic::service::interceptor::InterceptedService;
        let start_gate = StartGate(started.clone());
        router
            .add_service(InterceptedService::new(
                proto::meter_server::MeterServer::new(MeterService::new(
                    app.clone(),
                    config.max_batch,
                    limits.max_stream_in_flight,
                    drain.clone(),
                ))
                .max_decoding_message_size(max_message),
                start_gate.clone(),
            ))
            .add_service(InterceptedService::new(
                InterceptedService::new(admin, AdminInterceptor(admin_auth)),
                start_gate.clone(),
            ))
            .add_service(InterceptedService::new(
                RateLimitServiceServer::new(RlsService::new(app.clone(), config.rls.clone()))
                    .max_decoding_message_size(max_message),
                start_gate,
            ))
    };
    // Each connection closes with a lingering close (see `crate::linger`),
    // with TLS too (see `crate::tls`).
    let lingering = TaskTracker::new();
    let incoming = crate::tls::incoming(grpc_listener, lingering.clone(), tls, metrics.clone());
    let grpc = router.serve_with_incoming_shutdown(incoming, {
        let d = draining.clone();
        async move { d.cancelled().await }
    });

    // Start-up runs beside the server, which answers health and refuses
    // calls meanwhile. A failed start-up stops the server (draining).
    let mut startup = tokio::spawn({
        let s = StartUp {
            app: app.clone(),
            config: config.clone(),
            spill_path: spill_path.clone(),
            spill_fallback: spill_fallback.clone(),
            journal_dir: journal_dir.clone(),
            plans_changed: plans_changed.clone(),
            health: health.clone(),
            services,
            admin_state: admin_state.clone(),
            tasks: tasks.clone(),
            stop_background: stop_background.clone(),
            draining: draining.clone(),
            addrs: (grpc_addr, admin_addr),
        };
        let draining = draining.clone();
        async move {
            let r = s.run().await;
            if r.is_err() {
                draining.cancel();
            }
            r
        }
    });

    // Once draining, wait for the requests in flight, not for clients to
    // hang up; and not forever: a client holding a DeductStream open must
    // not keep the process from flushing within its grace period.
    tokio::pin!(grpc);
    // Whether to let the connections close by themselves before exiting:
    // not if they are closed already, nor if a request is still running
    // after half the grace (its connection is cut).
    let mut linger = false;
    let served = {
        tokio::select! {
            r = &mut grpc => r,
            _ = async { draining.cancelled().await; drain.idle().await } => {
                tracing::info!("requests in flight drained; closing connections");
                linger = true;
                Ok(())
            }
            _ = async { draining.cancelled().await; tokio::time::sleep(grace / 2).await } => {
                tracing::warn!(in_flight = drain.in_flight(), "drain took longer than half the grace period; closing connections");
                Ok(())
            }
        }
    };
    // Normally set by the signal; the server can also stop on its own.
    let deadline = *deadline.get_or_init(|| tokio::time::Instant::now() + grace);
    // Nothing is acknowledged any more once the gate is closed (it already
    // is after a signal).
    app.close();
    // Start-up stops at its next step once draining (a replay between two
    // batches: the next start goes on from the file, skipping what is
    // applied); it spawns no background task after this.
    draining.cancel();
    let started_up = match tokio::time::timeout_at(deadline, &mut startup).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => Err(ServeError::StartUp(e.to_string())),
        Err(_) => {
            // Cut at an await: a batch being written either commits or
            // not, and its id makes the next start's replay skip it or
            // apply it.
            startup.abort();
            tracing::warn!(
                "start-up did not stop before the deadline; the next start replays what is left"
            );
            Ok(false)
        }
    };
    let started = Instant::now();
    stop_background.cancel();
    tasks.close();
    if tokio::time::timeout_at(deadline, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!("the running flush did not finish before the deadline");
    }
    // Nothing was deducted unless start-up was done (calls were refused).
    let flushed = match started_up {
        Ok(true) => flusher.final_flush(deadline).await,
        _ => Ok(Default::default()),
    };
    let set_aside = meter.set_aside_accounts().len();
    let outcome = match flushed {
        // (Before start-up was done nothing was leased or flushed.)
        Ok(_) if !matches!(started_up, Ok(true)) => Ok(()),
        Ok(report) if set_aside == 0 => {
            if let Some(leases) = meter.leases() {
                // What the leases admitted is booked: return the rest.
                leases.release_all(&**app.store()).await;
            }
            tracing::info!(accounts = report.accounts, elapsed = ?started.elapsed(), "final flush done; exiting");
            Ok(())
        }
        other if app.journal().is_some() => {
            // Journal mode: every unflushed deduction is in the journal,
            // which the next start replays; a spill file now would hold
            // them twice.
            let error = other.err().unwrap_or_else(|| {
                crate::store::StoreError::permanent(format!(
                    "the store refuses the usage of {set_aside} account(s)"
                ))
            });
            tracing::error!(%error, dir = %journal_dir.display(), "final flush failed; the unflushed usage stays in the journal and is replayed at the next start");
            Err(ServeError::FinalFlushJournaled {
                error,
                dir: journal_dir.clone(),
            })
        }
        other => {
            let error = other.err().unwrap_or_else(|| {
                crate::store::StoreError::permanent(format!(
                    "the store refuses the usage of {set_aside} account(s)"
                ))
            });
            let batches = flusher.spill();
            let accounts: usize = batches.iter().map(|b| b.accounts.len()).sum();
            // Beside the store; if its filesystem refuses (failed, or
            // turned read-only), in the data directory.
            let spilled = match spill::append(&spill_path, &batches) {
                Ok(()) => Ok(spill_path.clone()),
                Err(beside) => match &spill_fallback {
                    Some(fallback) => {
                        tracing::error!(error = %beside, fallback = %fallback.display(), "cannot write the spill file beside the store; writing it to the data directory");
                        spill::append(fallback, &batches)
                            .map(|()| fallback.clone())
                            .map_err(|e| {
                                tracing::error!(error = %e, "cannot write the spill file to the data directory either");
                                beside
                            })
                    }
                    None => Err(beside),
                },
            };
            match spilled {
                Ok(path) => {
                    tracing::error!(%error, accounts, path = %path.display(), "final flush failed; unflushed usage written to the spill file");
                    Err(ServeError::FinalFlush { error, path })
                }
                Err(spill) => Err(ServeError::SpillFailed { error, spill }),
            }
        }
    };
    // The replies and stream trailers of the requests drained above may
    // still sit in their connections' buffers: exiting now would drop them
    // and reset the sockets, so a client would see a broken connection
    // (UNKNOWN) instead of its answer, or lose an ALLOW for a deduction
    // that is billed. Each connection got a GOAWAY when draining began and
    // closes once its streams are done and its frames are written; wait
    // for that, until the deadline.
    if linger {
        match tokio::time::timeout_at(deadline, &mut grpc).await {
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "gRPC server failed while closing its connections")
            }
            Ok(Ok(())) => tracing::debug!("every gRPC connection closed"),
            Err(_) => tracing::warn!("gRPC connections still open at the deadline; closing them"),
        }
        lingering.close();
        let _ = tokio::time::timeout_at(deadline, lingering.wait()).await;
    }
    if let Some(j) = app.journal() {
        // Every acknowledged record is synced already; this ends the writer.
        j.close();
    }
    stop_admin.cancel();
    let _ = admin.await;
    served?;
    if !started_up? {
        tracing::info!("stopped before start-up was done; the next start replays what is left");
    }
    outcome
}

// === start-up ===

/// What start-up needs, beside the server already listening.
struct StartUp {
    app: Arc<App>,
    config: Config,
    spill_path: std::path::PathBuf,
    /// Where shutdown spilled when it could not write beside the store
    /// (see [`store::fallback_spill_path`]).
    spill_fallback: Option<std::path::PathBuf>,
    journal_dir: std::path::PathBuf,
    /// Notified by each reload of the plans file ([`crate::recalc`]).
    plans_changed: Arc<tokio::sync::Notify>,
    health: tonic_health::server::HealthReporter,
    services: [&'static str; 4],
    admin_state: Arc<AdminState>,
    tasks: TaskTracker,
    stop_background: CancellationToken,
    /// Cancelled once shutdown begins: start-up stops at its next step.
    draining: CancellationToken,
    addrs: (std::net::SocketAddr, std::net::SocketAddr),
}

impl StartUp {
    /// Replays the journal and the spill file, starts the background
    /// tasks, then lets calls through and reports SERVING. `Ok(false)` if
    /// shutdown began first.
    async fn run(self) -> Result<bool, ServeError> {
        let StartUp {
            app,
            config,
            spill_path,
            spill_fallback,
            journal_dir,
            plans_changed,
            health,
            services,
            admin_state,
            tasks,
            stop_background,
            draining,
            addrs: (grpc_addr, admin_addr),
        } = self;
        let store = app.store().clone();
        // The journal first (into the spill file), then the spill file. A
        // journal left by a journal-mode run is replayed in flush mode too.
        // Its replay is file work: off the runtime's threads, and not
        // stopped half-way by a signal.
        let journaled = if config.durability == Durability::Journal || journal_dir.exists() {
            let (dir, spill) = (journal_dir.clone(), spill_path.clone());
            let r = tokio::task::spawn_blocking(move || {
                crate::journal::replay(&dir, &spill, crate::calendar::now_ts())
            })
            .await
            .map_err(|e| ServeError::StartUp(format!("the journal's replay: {e}")))?
            .map_err(|error| ServeError::JournalReplay {
                error,
                dir: journal_dir.clone(),
            })?;
            if r.deductions > 0 || r.stopped > 0 {
                tracing::info!(
                    deductions = r.deductions,
                    batches = r.batches,
                    files_stopped_early = r.stopped,
                    "journal replayed"
                );
            }
            Some(r)
        } else {
            None
        };
        for path in std::iter::once(&spill_path).chain(&spill_fallback) {
            let replayed = spill::replay(&*store, path, &draining).await?;
            if replayed.interrupted {
                tracing::info!(?replayed, path = %path.display(), "shutdown during the spill file's replay: the rest stays in it for the next start");
                return Ok(false);
            }
            if replayed != spill::Replayed::default() {
                tracing::info!(?replayed, path = %path.display(), "spill file replayed");
            }
        }
        // Hours an earlier run settled stay settled, whatever --late-grace
        // says now (R12).
        let settled = store.settled_before().await?;
        let meter = app.meter().clone();
        meter.gate().settle(settled);
        // Watched from its opening, so that health sees a change of its
        // writability before the flip below too.
        let mut writable = None;
        if let (Durability::Journal, Some(r)) = (config.durability, &journaled) {
            let j = crate::journal::Journal::open(&journal_dir, r, app.metrics().clone())?;
            tracing::info!(dir = %journal_dir.display(), "durability = journal: deductions are synced to the journal before they are answered");
            writable = Some(j.watch_writable());
            app.enable_journal(j);
        }
        // Many nodes may share the store: read the changes made through the
        // others from here on (accounts load fresh).
        let changes = if store_is_shared(&config.store) {
            let last = store.last_change().await?;
            Some(crate::changes::ChangeCursor::starting_after(last))
        } else {
            None
        };
        if draining.is_cancelled() {
            return Ok(false);
        }

        app.flusher().set_late_after(config.flush_max_lag);
        tasks.spawn(
            app.flusher()
                .clone()
                .run(config.flush_interval, stop_background.clone()),
        );
        if let Some(plans) = config.meter.plans.clone() {
            // Plans switch in as their instants pass (R8).
            tasks.spawn(crate::recalc::run(
                app.clone(),
                plans,
                app.metrics().clone(),
                plans_changed,
                stop_background.clone(),
            ));
        }
        if let Some(cursor) = changes {
            tasks.spawn(crate::changes::run(
                app.clone(),
                cursor,
                config.flush_interval,
                stop_background.clone(),
            ));
        }
        if let Some(leases) = meter.leases() {
            // Strict mode: renew leases in use, return idle ones.
            tasks.spawn(leases.clone().run(
                meter.clone(),
                store.clone(),
                app.clock().clone(),
                stop_background.clone(),
            ));
        }
        tasks.spawn(evict_loop(
            meter.clone(),
            config.idle_evict,
            stop_background.clone(),
        ));

        // Serving: calls pass, then health and readiness flip. Shutdown
        // closes the gate before it clears readiness and reports
        // NOT_SERVING, so checking the gate after the flip undoes one that
        // raced it: either the check sees the gate closed, or the flip came
        // before shutdown's own writes.
        admin_state.started.store(true, Ordering::Release);
        for s in services {
            health.set_service_status(s, ServingStatus::Serving).await;
        }
        admin_state.ready.store(true, Ordering::Release);
        if meter.gate().is_closed() {
            admin_state.ready.store(false, Ordering::Release);
            for s in services {
                health
                    .set_service_status(s, ServingStatus::NotServing)
                    .await;
            }
            return Ok(true);
        }
        if let Some(writable) = writable {
            // Health follows the journal: NOT_SERVING while it cannot be
            // written, SERVING again once it can (until shutdown).
            tasks.spawn(journal_health(
                writable,
                health.clone(),
                services,
                admin_state.clone(),
                stop_background.clone(),
            ));
        }
        // Scripts and tests wait for this line: the server is ready. (Not
        // println!: a closed stdout must not stop the server.)
        {
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            let _ = writeln!(
                out,
                "packmeter listening grpc={grpc_addr} admin={admin_addr}"
            )
            .and_then(|()| out.flush());
        }
        tracing::info!(%grpc_addr, %admin_addr, store = %config.store, "serving");
        Ok(true)
    }
}

/// Sets health and readiness from the journal's writability.
async fn journal_health(
    mut writable: tokio::sync::watch::Receiver<bool>,
    health: tonic_health::server::HealthReporter,
    services: [&'static str; 4],
    admin: Arc<AdminState>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            changed = writable.changed() => if changed.is_err() { return },
        }
        let ok = *writable.borrow_and_update();
        if admin.app.meter().gate().is_closed() {
            // Shutting down: health stays NOT_SERVING.
            return;
        }
        admin.ready.store(ok, Ordering::Release);
        let status = if ok {
            ServingStatus::Serving
        } else {
            ServingStatus::NotServing
        };
        for s in services {
            health.set_service_status(s, status).await;
        }
    }
}

/// Whether other nodes may write the store: one SQLite file has one server
/// (it is locked), a PostgreSQL database any number.
fn store_is_shared(url: &store::StoreUrl) -> bool {
    match *url {
        #[cfg(feature = "sqlite")]
        store::StoreUrl::Sqlite(_) => false,
        #[cfg(feature = "postgres")]
        store::StoreUrl::Postgres(_) => true,
    }
}

/// Evicts idle accounts once a minute (or every `idle / 4`, if shorter).
async fn evict_loop(meter: Arc<Meter>, idle: Duration, stop: CancellationToken) {
    let every = (idle / 4)
        .min(Duration::from_secs(60))
        .max(Duration::from_millis(100));
    let idle_us = i64::try_from(idle.as_micros()).unwrap_or(i64::MAX);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let evicted = meter.evict_idle(crate::calendar::now_ts().saturating_sub(idle_us));
        if evicted > 0 {
            tracing::debug!(
                evicted,
                resident = meter.resident(),
                "evicted idle accounts"
            );
        }
    }
}

/// Registers for SIGTERM and SIGINT at once, and returns a future that
/// resolves on the first of them.
///
/// Registration happens here, not on first poll: a SIGTERM that arrives
/// between start-up and the first poll must start the drain, not kill the
/// process with the default action. Call it before binding.
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// Reloads the plans file on each SIGHUP (R8): the new plans replace the
/// current ones only if no month that has begun (or begins within the
/// future skew) changes, so nothing recorded needs re-deducting; otherwise
/// the current plans stay and the error is logged (see
/// [`crate::plans::LivePlans::reload`]). Each reload is counted in
/// `packmeter_plans_reloads_total`. Registered before binding, so a SIGHUP
/// never takes its default action (ending the process) once serving.
/// Without a plans file no handler is installed.
fn reload_plans_on_hangup(
    plans: Arc<crate::plans::LivePlans>,
    app: Arc<App>,
    metrics: Arc<Metrics>,
    changed: Arc<tokio::sync::Notify>,
) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hangup = signal(SignalKind::hangup())?;
    tokio::spawn(async move {
        while hangup.recv().await.is_some() {
            let default = default_plan(app.config());
            let now = app.clock().now();
            match plans
                .reload(&**app.store(), &default, app.config().late_grace, now)
                .await
            {
                Ok(n) => {
                    // A plan whose instant has passed is switched in now.
                    changed.notify_one();
                    metrics.plans_reloaded("ok");
                    tracing::info!(file = %plans.path().display(), plans = n, "plans file reloaded");
                }
                Err(e) => {
                    metrics.plans_reloaded("error");
                    tracing::error!(file = %plans.path().display(), error = %e, "plans file not reloaded; the plans in force are kept");
                }
            }
        }
    });
    Ok(())
}

/// The plan in force without a plans file (the `--free-*` settings): what a
/// store holding usage but no recorded plan was run under.
fn default_plan(meter: &crate::meter::MeterConfig) -> crate::plans::Plan {
    crate::plans::Plans::single(meter.plan, meter.zone).plans()[0].clone()
}

// === impl Timed ===

/// A tower layer recording each RPC's latency by method, and counting it
/// in flight until its response is ready.
#[derive(Clone)]
struct Timed<S> {
    inner: S,
    metrics: Arc<Metrics>,
    drain: Arc<Drain>,
}

impl<S, B> tower::Service<http::Request<B>> for Timed<S>
where
    S: tower::Service<http::Request<B>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = crate::metrics::rpc_method(req.uri().path());
        let started = Instant::now();
        let fut = self.inner.call(req);
        let metrics = self.metrics.clone();
        let in_flight = self.drain.enter();
        Box::pin(async move {
            let r = fut.await;
            drop(in_flight);
            metrics.observe_rpc(method, started.elapsed().as_secs_f64());
            r
        })
    }
}
