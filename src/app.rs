//! The application layer: every transport (gRPC unary, batch and stream,
//! Envoy's rate-limit service, the admin HTTP port) calls these functions
//! and only converts types.
//!
//! - [`App::deduct`] is the one path for deductions: validate everything,
//!   load the accounts, read a fresh clock, then deduct under the meter's
//!   gate. It is the one place a deduction is acknowledged.
//! - One function per admin change: the store is written first, then
//!   memory, one change at a time.
//! - Flush, settlement and shutdown.

use std::sync::{
    atomic::{AtomicU64, Ordering},
    Arc,
};

use crate::{
    calendar::{BillingZone, Ts},
    clock::Clock,
    daily,
    flush::{FlushReport, Flusher},
    journal::{Commit, Journal},
    ledger::AccountRecord,
    meter::{
        validate_account_id, Atomicity, Charge, Decision, DeductOutcome, Deduction, DenyReason,
        Meter, MeterConfig, MeterError, PackView, MAX_ACCOUNT_ID_BYTES,
    },
    metrics::Metrics,
    packs::{Item, PackSource, PackSpec},
    store::{Granted, Store, StoreError},
};

/// One deduction for one account, as a transport hands it over.
#[derive(Clone, Copy, Debug)]
pub struct DeductRequest<'a> {
    pub account_id: &'a str,
    pub deduction: Deduction<'a>,
}

/// A request of a group was refused; nothing of the group was deducted.
#[derive(Debug, thiserror::Error)]
#[error("{error}")]
pub struct Refused {
    /// Which request of the group.
    pub index: usize,
    pub error: MeterError,
}

/// An operator's change to an account (`Admin.PutAccount`). `None` is no
/// change: the setting keeps its current value.
#[derive(Clone, Debug, Default)]
pub struct AccountChange {
    pub account_id: String,
    /// `None` keeps the current activation, or activates a new account now.
    /// A change is refused once the account has usage (R1).
    pub activated_at: Option<Ts>,
    pub suspended: Option<bool>,
    pub deny_on_exhausted: Option<bool>,
}

/// A purchased pack to grant (`Admin.GrantPack`).
#[derive(Clone, Debug)]
pub struct Grant {
    pub account_id: String,
    /// Empty for a generated id.
    pub pack_id: String,
    pub item: Item,
    pub capacity: u64,
    /// `None` for "from now".
    pub valid_from: Option<Ts>,
    pub validity: Validity,
    pub priority: u32,
}

impl Grant {
    /// Checks the grant's ids, capacity and validity, and returns when the
    /// pack starts and ends, with "from now" read at `now`. Changes nothing.
    /// Public for the fuzz targets (`fuzz/fuzz_targets/grpc_request.rs`).
    #[doc(hidden)]
    pub fn terms(&self, now: Ts, zone: &BillingZone) -> Result<(Ts, Ts), MeterError> {
        validate_account_id(&self.account_id)?;
        validate_pack_id(&self.pack_id)?;
        if self.capacity == 0 {
            return Err(MeterError::InvalidPack(
                "capacity: must be at least 1".into(),
            ));
        }
        if i64::try_from(self.capacity).is_err() {
            return Err(MeterError::InvalidPack(
                "capacity: must be below 2^63".into(),
            ));
        }
        let valid_from = self.valid_from.unwrap_or(now);
        let Some(valid_until) = self.validity.until(valid_from, zone) else {
            return Err(MeterError::InvalidPack(
                "valid_for: ends after year 9999; give a shorter length".into(),
            ));
        };
        if valid_until <= valid_from {
            return Err(MeterError::InvalidPack(match self.validity {
                Validity::Until(_) => {
                    "valid_until: must be after valid_from (valid_until is exclusive)".into()
                }
                Validity::For { .. } => "valid_for: must be longer than zero".into(),
            }));
        }
        Ok((valid_from, valid_until))
    }
}

/// When a granted pack ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// At this instant (exclusive).
    Until(Ts),
    /// This long after `valid_from`: calendar months in the billing zone,
    /// then a fixed length.
    For { months: u32, extra: Ts },
}

impl Validity {
    /// The end of a pack valid from `from`; `None` for a length that ends
    /// after year 9999, which a protobuf `Timestamp` cannot hold.
    fn until(self, from: Ts, zone: &BillingZone) -> Option<Ts> {
        match self {
            Validity::Until(t) => Some(t),
            // 10,000 years of months keeps the calendar arithmetic in range.
            Validity::For { months, .. } if months > 120_000 => None,
            Validity::For { months, extra } => zone
                .add_months(from, months)
                .checked_add(extra)
                .filter(|&t| t <= MAX_TS),
        }
    }
}

/// The last instant a protobuf `Timestamp` holds: 9999-12-31T23:59:59Z.
const MAX_TS: Ts = 253_402_300_799 * crate::calendar::SECOND;

/// The outcomes of a group, in order; inline for a group of one.
pub type Outcomes = smallvec::SmallVec<[DeductOutcome; 1]>;

/// A group deducted but not yet acknowledged: see [`App::deduct_deferred`].
#[must_use = "a deferred deduction is answered only through App::acknowledge"]
pub struct Deferred {
    outcomes: Outcomes,
    /// Journal mode: the group commit its record is in.
    commit: Option<Commit>,
}

/// A group's requests with their resident accounts, in order.
fn charges<'a>(
    reqs: &'a [DeductRequest<'a>],
    accounts: &'a [Arc<crate::meter::AccountState>],
) -> Vec<Charge<'a>> {
    reqs.iter()
        .zip(accounts)
        .map(|(r, account)| Charge {
            account,
            deduction: r.deduction,
        })
        .collect()
}

/// A group's resident accounts, in order (see [`App::admit`]).
type Accounts = Vec<Arc<crate::meter::AccountState>>;

/// How often a deduction whose request id is in flight elsewhere waits for
/// the original before it is refused as retryable.
const IN_FLIGHT_RETRIES: usize = 64;

pub struct App {
    meter: Arc<Meter>,
    store: Arc<dyn Store>,
    flusher: Arc<Flusher>,
    metrics: Arc<Metrics>,
    clock: Arc<dyn Clock>,
    /// Serializes operator writes, so the store and memory apply them in
    /// the same order. Held across the store's await.
    admin_writes: tokio::sync::Mutex<()>,
    next_pack: AtomicU64,
    /// Cancelled by [`close`](Self::close): open streams end on it.
    closing: tokio_util::sync::CancellationToken,
    /// `--durability journal`: set once at start by
    /// [`enable_journal`](Self::enable_journal).
    journal: std::sync::OnceLock<Arc<Journal>>,
}

/// How many times a unary deduction of a `deny` account covers its lease
/// and deducts, in strict mode, when other calls spend the lease between.
const LEASE_ATTEMPTS: u32 = 3;

/// One deduction of [`App::deduct_one`]: an outcome to answer, or, with
/// `retry`, a denial for a lease spent meanwhile, which is retried and not
/// counted (only the answered attempt reaches the metrics).
struct Attempt {
    outcome: [DeductOutcome; 1],
    retry: bool,
}

impl App {
    pub fn new(
        cfg: MeterConfig,
        store: Arc<dyn Store>,
        metrics: Arc<Metrics>,
        clock: Arc<dyn Clock>,
        batch_accounts: usize,
    ) -> App {
        let meter = Arc::new(Meter::new(cfg, store.clone()));
        let flusher = Arc::new(Flusher::new(
            meter.clone(),
            store.clone(),
            batch_accounts,
            metrics.clone(),
            clock.clone(),
        ));
        if let Some(strict) = meter.config().strict {
            meter.enable_leases(strict, flusher.node_id());
        }
        App {
            meter,
            store,
            flusher,
            metrics,
            clock,
            admin_writes: tokio::sync::Mutex::new(()),
            next_pack: AtomicU64::new(0),
            closing: tokio_util::sync::CancellationToken::new(),
            journal: std::sync::OnceLock::new(),
        }
    }

    /// `--durability journal`: from now on every deduction is answered only
    /// once its record is durable in `journal`, and the flusher checkpoints
    /// it. Call before serving.
    pub fn enable_journal(&self, journal: Arc<Journal>) {
        self.flusher.enable_journal(journal.clone());
        let _ = self.journal.set(journal);
    }

    pub fn journal(&self) -> Option<&Arc<Journal>> {
        self.journal.get()
    }

    pub fn meter(&self) -> &Arc<Meter> {
        &self.meter
    }

    pub fn flusher(&self) -> &Arc<Flusher> {
        &self.flusher
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn clock(&self) -> &Arc<dyn Clock> {
        &self.clock
    }

    /// Strict mode: makes sure this node's leases cover the calls the
    /// charges take from `deny` accounts (a store round trip only for a
    /// spent lease). A no-op otherwise.
    async fn cover_leases(&self, charges: &[Charge<'_>]) -> bool {
        let Some(leases) = self.meter.leases() else {
            return true;
        };
        let mut wanted: Vec<(&Arc<crate::meter::AccountState>, u64)> = Vec::new();
        for c in charges {
            if !self.meter.needs_lease(c.account, c.deduction.calls) {
                continue;
            }
            match wanted.iter_mut().find(|w| Arc::ptr_eq(w.0, c.account)) {
                Some(w) => w.1 = w.1.saturating_add(c.deduction.calls),
                None => wanted.push((c.account, c.deduction.calls)),
            }
        }
        let mut covered = true;
        for (acct, calls) in wanted {
            covered &= leases
                .ensure(&self.meter, &*self.store, acct, calls, &*self.clock)
                .await;
        }
        covered
    }

    pub fn now(&self) -> Ts {
        self.clock.now()
    }

    pub fn config(&self) -> &MeterConfig {
        self.meter.config()
    }

    // --- deductions ---

    /// Deducts a group of requests: a unary `Deduct` or one stream message
    /// is a group of one, a `DeductBatch` a group of its elements, an Envoy
    /// request a group of its descriptors (all or nothing).
    ///
    /// Every request is validated and its account loaded before anything
    /// is deducted, so a refused request changes nothing of the group.
    pub async fn deduct(
        &self,
        reqs: &[DeductRequest<'_>],
        atomicity: Atomicity,
    ) -> Result<Outcomes, Refused> {
        let deferred = self.deduct_deferred(reqs, atomicity).await?;
        self.acknowledge(deferred).await
    }

    /// [`deduct`](Self::deduct) up to, not including, the acknowledgement:
    /// the group is deducted and, in journal mode, its record handed to the
    /// journal. A stream deducts the messages it has received this way, in
    /// order, then acknowledges each, so one group commit covers them all.
    pub async fn deduct_deferred(
        &self,
        reqs: &[DeductRequest<'_>],
        atomicity: Atomicity,
    ) -> Result<Deferred, Refused> {
        let (now, accounts) = self.admit(reqs)?;
        if let Some(deducted) = self.deduct_resident(reqs, accounts, now, atomicity) {
            return deducted;
        }
        // Boxed, so that the common case above stays a small future: a
        // stream or unary call moves this future around, and the loading
        // path's state (store reads, lease round trips) is large.
        Box::pin(self.deduct_loading(reqs, now, atomicity)).await
    }

    /// [`deduct_deferred`](Self::deduct_deferred) for a group whose
    /// accounts are all resident, with nothing to wait for: the group is
    /// admitted and deducted at once, or `None` with nothing deducted (a
    /// request refused, an account to load, a lease to cover, a request id
    /// in flight elsewhere, shutdown). A `DeductStream` deducts the
    /// messages that arrived together this way, as one group, and takes
    /// them one by one when this gives `None`, so a refusal still names the
    /// message it is about and the messages before it stand.
    pub fn deduct_deferred_now(
        &self,
        reqs: &[DeductRequest<'_>],
        atomicity: Atomicity,
    ) -> Option<Deferred> {
        let (now, accounts) = self.admit(reqs).ok()?;
        self.deduct_resident(reqs, accounts, now, atomicity)?.ok()
    }

    /// Refuses the group before anything is deducted while the server
    /// shuts down or the journal cannot be written, or if a request is
    /// invalid at `now`; returns `now`, the clock the checks used.
    ///
    /// For a group of more than one (strict mode off), also returns its
    /// accounts if all are resident, for
    /// [`deduct_resident`](Self::deduct_resident): they are looked up
    /// together first ([`Meter::touch_resident_all`]), and a resident
    /// account's id is not checked again, since nothing becomes resident
    /// with an invalid id ([`Meter::touch_resident`]). The scan of
    /// an id for control characters was about 50 instructions of a batched
    /// deduction (callgrind). The checks run in the same order either way,
    /// so the first invalid request is the one refused.
    fn admit(&self, reqs: &[DeductRequest<'_>]) -> Result<(Ts, Option<Accounts>), Refused> {
        let refused = |index, error| Refused { index, error };
        if self.meter.gate().is_closed() {
            return Err(refused(0, MeterError::ShuttingDown));
        }
        if let Some(j) = self.journal.get() {
            // Refused before anything is deducted while the journal cannot
            // be written: nothing is acknowledged that is not durable.
            if !j.writable() {
                return Err(refused(
                    0,
                    MeterError::JournalUnavailable(
                        "the journal cannot be written (disk full or I/O error)".into(),
                    ),
                ));
            }
        }
        let now = self.clock.now();
        // A group's accounts, while all are resident; `None` for a single
        // request or in strict mode, whose paths look their accounts up
        // themselves.
        let group = reqs.len() >= 2 && self.meter.leases().is_none();
        let mut found = match group {
            true => {
                let ids: Vec<&str> = reqs.iter().map(|r| r.account_id).collect();
                self.meter.touch_resident_all(&ids, now).into_iter()
            }
            false => Vec::new().into_iter(),
        };
        let mut accounts = group.then(|| Vec::with_capacity(reqs.len()));
        for (i, r) in reqs.iter().enumerate() {
            // Once an account is missing, the group takes the loading path,
            // which looks every account up itself.
            let checked = match (&mut accounts, found.next().flatten()) {
                (Some(a), Some(acct)) => {
                    a.push(acct);
                    self.meter.validate_deduction(&r.deduction, now)
                }
                _ => {
                    accounts = None;
                    self.meter.validate(r.account_id, &r.deduction, now)
                }
            };
            checked.map_err(|e| refused(i, e))?;
        }
        Ok((now, accounts))
    }

    /// The common case of [`deduct_deferred`](Self::deduct_deferred),
    /// without an `.await`: every account is resident, no lease needs
    /// covering (strict mode is off) and no request id of the group is in
    /// flight elsewhere. Otherwise `None`, with nothing deducted, and the
    /// group takes [`deduct_loading`](Self::deduct_loading), which handles
    /// every case. Both deduct through [`Meter::deduct`] or
    /// [`Meter::deduct_all`] under [`attempt`](Self::attempt).
    fn deduct_resident(
        &self,
        reqs: &[DeductRequest<'_>],
        accounts: Option<Accounts>,
        now: Ts,
        atomicity: Atomicity,
    ) -> Option<Result<Deferred, Refused>> {
        if self.meter.leases().is_some() {
            return None;
        }
        let (deducted, commit) = match reqs {
            [one] => {
                let acct = self.meter.touch_resident(one.account_id, now)?;
                self.attempt(|now| {
                    self.meter
                        .deduct(&acct, &one.deduction, now)
                        .map(|o| smallvec::smallvec![o])
                        .map_err(|e| (0, e))
                })
            }
            _ => {
                // Looked up by `admit`.
                let accounts = accounts?;
                let charges = charges(reqs, &accounts);
                self.attempt(|now| {
                    self.meter
                        .deduct_all(&charges, now, atomicity)
                        .map(Outcomes::from)
                })
            }
        };
        match deducted {
            Ok(outcomes) => Some(Ok(Deferred { outcomes, commit })),
            // The loading path waits for the original.
            Err((_, MeterError::DuplicateInFlight(_))) => None,
            Err((index, error)) => Some(Err(Refused { index, error })),
        }
    }

    /// [`deduct_deferred`](Self::deduct_deferred) for a group that may need
    /// its accounts loaded from the store, leases covered, or a request id
    /// in flight elsewhere waited for.
    async fn deduct_loading(
        &self,
        reqs: &[DeductRequest<'_>],
        now: Ts,
        atomicity: Atomicity,
    ) -> Result<Deferred, Refused> {
        let refused = |index, error| Refused { index, error };
        if let [one] = reqs {
            return self.deduct_one(one, now).await.map(|(o, commit)| Deferred {
                outcomes: smallvec::smallvec![o],
                commit,
            });
        }
        let mut accounts = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            // `now` only stamps the account's last use here: the clock that
            // decides is read after the loads.
            let acct = self
                .meter
                .account_for_request(r.account_id, &r.deduction, now)
                .await
                .map_err(|e| refused(i, e))?;
            accounts.push(acct);
        }
        let charges = charges(reqs, &accounts);
        self.cover_leases(&charges).await;
        // Fresh: the loads above may have taken long enough for an hour to
        // close (R9).
        let (outcomes, commit) = self
            .until_not_in_flight(|now| self.meter.deduct_all(&charges, now, atomicity))
            .await?;
        Ok(Deferred {
            outcomes: outcomes.into(),
            commit,
        })
    }

    /// Acknowledges a deferred group: in journal mode, once its record is
    /// durable (this is where a deduction is acknowledged); then its
    /// outcomes count in the metrics. A journal write that failed refuses
    /// the whole group with UNAVAILABLE.
    pub async fn acknowledge(&self, deferred: Deferred) -> Result<Outcomes, Refused> {
        if let Some(commit) = deferred.commit {
            commit.wait().await.map_err(|e| Refused {
                index: 0,
                error: MeterError::JournalUnavailable(e.to_string()),
            })?;
        }
        self.metrics.record_deductions(&deferred.outcomes);
        Ok(deferred.outcomes)
    }

    /// Runs a deduction with a fresh clock (in journal mode handing its
    /// record to the journal), and runs it again while a request id it
    /// repeats is still being deducted elsewhere: the original is a few
    /// instructions from done, unless its thread was preempted, so let it
    /// finish, then ask again (bounded by `IN_FLIGHT_RETRIES`). The caller
    /// acknowledges it ([`App::acknowledge`]).
    async fn until_not_in_flight<T>(
        &self,
        mut deduct: impl FnMut(Ts) -> Result<T, (usize, MeterError)>,
    ) -> Result<(T, Option<Commit>), Refused> {
        let mut attempt = 0;
        loop {
            let (deducted, commit) = self.attempt(&mut deduct);
            match deducted {
                Ok(outcomes) => return Ok((outcomes, commit)),
                Err((_, MeterError::DuplicateInFlight(_))) if attempt < IN_FLIGHT_RETRIES => {
                    attempt += 1;
                    tokio::task::yield_now().await;
                }
                Err((index, error)) => return Err(Refused { index, error }),
            }
        }
    }

    /// One try of a group's deduction, with a fresh clock: the clock that
    /// decides is read here, after any loads. In journal mode the group's
    /// record goes to the journal (one record, so one group commit, for the
    /// whole group), and its commit comes back to wait for.
    fn attempt<T>(
        &self,
        deduct: impl FnOnce(Ts) -> Result<T, (usize, MeterError)>,
    ) -> (Result<T, (usize, MeterError)>, Option<Commit>) {
        match self.journal.get() {
            None => (deduct(self.clock.now()), None),
            Some(j) => j.capture(|| deduct(self.clock.now())),
        }
    }

    /// A group of one (validated at `now` already): no allocation on the
    /// unary path. The deciding clock is read after the load.
    async fn deduct_one(
        &self,
        r: &DeductRequest<'_>,
        now: Ts,
    ) -> Result<(DeductOutcome, Option<Commit>), Refused> {
        let refused = |error| Refused { index: 0, error };
        let acct = self
            .meter
            .account_for_request(r.account_id, &r.deduction, now)
            .await
            .map_err(refused)?;
        let charge = [Charge {
            account: &acct,
            deduction: r.deduction,
        }];
        // Strict mode: another call may spend the lease between covering
        // and deducting; a denied call changed nothing, so cover and ask
        // again (the retried denial is not counted in the metrics).
        let mut attempts = 0;
        loop {
            let covered = self.cover_leases(&charge).await;
            attempts += 1;
            let last = !covered || attempts >= LEASE_ATTEMPTS;
            let (attempt, commit) = self
                .until_not_in_flight(|now| {
                    self.meter
                        .deduct(&acct, &r.deduction, now)
                        .map(|o| {
                            let lease_spent = o.decision
                                == Decision::Deny(DenyReason::CallsExhausted)
                                && self.meter.needs_lease(&acct, r.deduction.calls)
                                && o.calls.remaining >= r.deduction.calls;
                            Attempt {
                                outcome: [o],
                                retry: lease_spent && !last,
                            }
                        })
                        .map_err(|e| (0, e))
                })
                .await?;
            if !attempt.retry {
                let [o] = attempt.outcome;
                return Ok((o, commit));
            }
        }
    }

    /// Packs valid at `at` (the server clock if `None`), with live usage.
    pub async fn usage(
        &self,
        account_id: &str,
        at: Option<Ts>,
    ) -> Result<Vec<PackView>, MeterError> {
        let at = at.unwrap_or_else(|| self.clock.now());
        Ok(self
            .list_packs(account_id)
            .await?
            .into_iter()
            .filter(|v| v.spec.valid_at(at))
            .collect())
    }

    // --- admin ---

    /// Creates an account or changes the settings `change` names: the store
    /// first, then memory. A new account that the change does not activate
    /// is activated now.
    ///
    /// Once the account has usage, its activation can no longer change
    /// (`ActivationLocked`, naming the first usage hour): the usage was
    /// split against the free-tier packs that activation defines, and some
    /// may be settled and exported already (R12). Rewriting it would change
    /// bills; an earlier event moves the activation back by itself (R1).
    /// Flushes are held off while this looks for usage, so none moves from
    /// memory to the store unseen, and memory is checked again while no
    /// deduction runs.
    pub async fn put_account(&self, change: AccountChange) -> Result<AccountRecord, MeterError> {
        validate_account_id(&change.account_id)?;
        let _w = self.admin_writes.lock().await;
        let now = self.clock.now();
        let acct = self
            .meter
            .account_for_admin(&change.account_id, now)
            .await?;
        let current = acct.record();
        // On a shared store another node may have changed the flags since
        // this one last read them (it reads changes once per flush
        // interval): a flag this change does not name keeps its stored
        // value. Only PutAccount writes them, so with one node the two agree.
        let current = match self.store.get_account(&change.account_id).await? {
            Some(s) => AccountRecord {
                suspended: s.suspended,
                deny_on_exhausted: s.deny_on_exhausted,
                ..current
            },
            None => current,
        };
        let implicit = current.activated_at.is_none() && change.activated_at.is_none();
        // The activation this request sets, if it is a change.
        let activation = change
            .activated_at
            .or(implicit.then_some(now))
            .filter(|a| Some(*a) != current.activated_at);
        let record = AccountRecord {
            account_id: change.account_id,
            activated_at: activation.or(current.activated_at),
            suspended: change.suspended.unwrap_or(current.suspended),
            deny_on_exhausted: change
                .deny_on_exhausted
                .unwrap_or(current.deny_on_exhausted),
        };
        self.flusher
            .quiesced(async {
                // The stored row, to put back if memory refuses the change.
                let mut stored = None;
                if activation.is_some() {
                    let unflushed = acct.pending_summary().0;
                    let flushed = self.first_stored_usage(&record.account_id).await?;
                    if let Some(hour) = unflushed.into_iter().chain(flushed).min() {
                        return Err(MeterError::ActivationLocked {
                            account: record.account_id.clone(),
                            first_usage: crate::calendar::to_datetime(hour).to_rfc3339(),
                        });
                    }
                    stored = self.store.get_account(&record.account_id).await?;
                }
                self.store.put_account(&record).await?;
                let (s, d) = (record.suspended, record.deny_on_exhausted);
                let now = self.clock.now();
                let applied = match self.meter.apply_account(&acct, activation, s, d, now) {
                    // A first deduction activated the account meanwhile:
                    // its activation stands, the flags still apply.
                    Err(MeterError::ActivationLocked { .. }) if implicit => {
                        self.meter.apply_account(&acct, None, s, d, now)
                    }
                    r => r,
                };
                if let Err(e) = applied {
                    // A deduction recorded usage since the check above: the
                    // change is refused, and the stored row goes back.
                    let back = stored.unwrap_or_else(|| acct.record());
                    self.store.put_account(&back).await?;
                    return Err(e);
                }
                // What memory holds (activated or moved back by a deduction
                // meanwhile) is what the store must hold.
                let now_record = acct.record();
                if now_record != record {
                    self.store.put_account(&now_record).await?;
                }
                Ok(now_record)
            })
            .await
    }

    /// Brings a resident account up to date with what the store holds
    /// after a change made through another node (see [`crate::changes`]):
    /// packs granted there become resident, and the stored settings
    /// (suspended, deny_on_exhausted, activation) apply, as
    /// [`grant_pack`](Self::grant_pack) and [`put_account`](Self::put_account)
    /// apply them on the node that made them. Returns false, reading
    /// nothing, if the account is not resident: its next load reads it fresh.
    ///
    /// A stored activation replaces this node's only while this node holds
    /// no unflushed usage for the account (R1: that usage was split against
    /// the current one); otherwise the flags still apply and the flush
    /// keeps the earlier activation.
    pub async fn apply_stored_account(&self, account_id: &str) -> Result<bool, MeterError> {
        if self.meter.resident_account(account_id).is_none() {
            return Ok(false);
        }
        // In the same order as this node's own admin writes.
        let _w = self.admin_writes.lock().await;
        let Some(acct) = self.meter.resident_account(account_id) else {
            return Ok(false);
        };
        let stored = self.store.get_account(account_id).await?;
        let packs = self.store.list_packs(account_id).await?;
        let now = self.clock.now();
        let missing: Vec<_> = {
            let resident = acct.packs();
            packs
                .iter()
                .filter(|p| {
                    p.spec.source == PackSource::Purchased
                        && !resident.iter().any(|r| *r.pack_id() == p.spec.pack_id)
                })
                .collect()
        };
        for p in missing {
            self.meter.add_pack(&acct, p, now);
        }
        // Another node may have moved the packs' totals (a plan change's
        // recalculation, R8): rebase the counters on the store, with no
        // flush of this node half-written (see `Meter::rebase`).
        self.flusher
            .quiesced(async {
                let packs = self.store.list_packs(account_id).await?;
                self.meter.rebase(&[(acct.clone(), &packs)], || {});
                Ok::<_, StoreError>(())
            })
            .await?;
        let Some(record) = stored else {
            return Ok(true);
        };
        let current = acct.record();
        // Only a stored activation moves this node's: a deduction here may
        // have activated the account and not flushed it yet.
        let activation = record
            .activated_at
            .filter(|a| Some(*a) != current.activated_at);
        let (s, d) = (record.suspended, record.deny_on_exhausted);
        if activation.is_none() && (s, d) == (current.suspended, current.deny_on_exhausted) {
            return Ok(true);
        }
        match self.meter.apply_account(&acct, activation, s, d, now) {
            Err(MeterError::ActivationLocked { .. }) => {
                self.meter.apply_account(&acct, None, s, d, now)?;
            }
            r => r?,
        }
        Ok(true)
    }

    /// The first hour with usage in the store for the account, if any.
    async fn first_stored_usage(&self, account_id: &str) -> Result<Option<Ts>, MeterError> {
        let first = self
            .store
            .usage_rows_page(Ts::MIN, Ts::MAX, Some(account_id), None, 1)
            .await?;
        Ok(first.first().map(|r| r.hour))
    }

    pub async fn get_account(&self, account_id: &str) -> Result<AccountRecord, MeterError> {
        let acct = self
            .meter
            .known_account(account_id, self.clock.now())
            .await?;
        Ok(acct.record())
    }

    /// Grants a purchased pack. A repeated `pack_id` with the same terms
    /// returns the existing pack; with other terms it is a conflict.
    pub async fn grant_pack(&self, g: Grant) -> Result<PackView, MeterError> {
        let now = self.clock.now();
        let zone = self.config().zone;
        let (valid_from, valid_until) = g.terms(now, &zone)?;
        let spec = PackSpec {
            pack_id: if g.pack_id.is_empty() {
                let n = self.next_pack.fetch_add(1, Ordering::Relaxed);
                format!("pk-{now:x}-{n:x}").into()
            } else {
                g.pack_id.as_str().into()
            },
            source: PackSource::Purchased,
            item: g.item,
            capacity: g.capacity,
            valid_from,
            valid_until,
            priority: g.priority,
            created_at: now,
        };
        let _w = self.admin_writes.lock().await;
        // As a deduction finds it: in reject mode only PutAccount creates
        // accounts, and a grant to an unknown one is refused (naming
        // PutAccount) before anything is written; in activate mode the
        // grant creates the account, which activates at its first deduction.
        let acct = self.meter.account_for_deduction(&g.account_id, now).await?;
        let stored = match self.store.grant_pack(&g.account_id, &spec).await? {
            Granted::New(p) => {
                self.meter.add_pack(&acct, &p, self.clock.now());
                p
            }
            Granted::Existing(p) if same_terms(&p.spec, &g, &zone) => p,
            Granted::Existing(p) => {
                return Err(MeterError::PackConflict(p.spec.pack_id.to_string()))
            }
        };
        let id = stored.spec.pack_id.clone();
        self.meter
            .pack_views(&acct, vec![stored])
            .into_iter()
            .find(|v| v.spec.pack_id == id)
            .ok_or_else(|| MeterError::InvalidPack(format!("granted pack `{id}` vanished")))
    }

    /// Every pack of the account, with live usage (R11).
    pub async fn list_packs(&self, account_id: &str) -> Result<Vec<PackView>, MeterError> {
        let acct = self
            .meter
            .known_account(account_id, self.clock.now())
            .await?;
        let stored = self.store.list_packs(account_id).await?;
        Ok(self.meter.pack_views(&acct, stored))
    }

    /// `account_id`'s usage in the last `days` days of the billing zone
    /// (1 to [`daily::MAX_DAYS`]), by day and item, covered and overage:
    /// the rows the store holds (settled or not) plus what this node has
    /// not flushed yet. Read while no flush runs, so no usage is in flight
    /// between the two and none is counted twice or missed. Other nodes'
    /// unflushed usage shows up once they flush.
    pub async fn daily_usage(
        &self,
        account_id: &str,
        days: u32,
    ) -> Result<Vec<daily::Day>, MeterError> {
        use futures_util::TryStreamExt;
        let days = days.clamp(1, daily::MAX_DAYS);
        let now = self.clock.now();
        let acct = self.meter.known_account(account_id, now).await?;
        let zone = &self.meter.config().zone;
        let (first, from, to) = daily::window(zone, now, days);
        let entries = self
            .flusher
            .quiesced(async {
                // Not a settled export: the bound is the window's end, and
                // rows of open hours are read as they stand.
                let stored: Vec<_> = crate::export::settled_rows(
                    self.store.clone(),
                    from,
                    to,
                    Some(account_id.to_string()),
                    crate::export::PAGE_ROWS,
                )
                // Days show usage as it was recorded: a plan change's
                // adjustment rows (R8) move amounts between packs and the
                // overage in the hour of its instant, and show in exports
                // and in the packs' used amounts instead.
                .try_filter(|r| std::future::ready(r.adjustment.is_none()))
                .map_ok(|r| daily::Entry {
                    hour: r.hour,
                    item: r.item,
                    covered: !r.pack_id.is_empty(),
                    amount: r.amount,
                })
                .try_collect()
                .await?;
                let mut entries = stored;
                entries.extend(acct.unflushed());
                entries.extend(self.flusher.retrying(account_id));
                Ok::<_, StoreError>(entries)
            })
            .await?;
        Ok(daily::by_day(zone, first, days, entries))
    }

    // --- flush and settlement ---

    /// Flushes everything acknowledged so far and returns once it is
    /// durable. Accounts whose usage the store refuses for good are set
    /// aside; while any are, this reports them as an error.
    pub async fn flush(&self) -> Result<FlushReport, MeterError> {
        let report = self.flusher.flush().await?;
        let aside = self.meter.set_aside_accounts();
        if let Some(first) = aside.first() {
            return Err(MeterError::SetAside {
                count: aside.len(),
                first: first.id().to_string(),
            });
        }
        Ok(report)
    }

    /// Settles what can be settled and returns the bound below which hours
    /// are settled: closed (R9), with nothing unflushed, and closed to any
    /// further deduction by the gate's settled mark. Rows below it never
    /// change again (R12).
    ///
    /// The gate's mark is written to the store before the bound is
    /// returned, so a restart (even with a longer `--late-grace`) keeps
    /// those hours closed; if the store refuses it, nothing is settled for
    /// the caller and the error says why.
    pub async fn settled_before(&self) -> Result<Ts, MeterError> {
        let (mark, bound) = self
            .flusher
            .quiesced(async {
                let closed = self.meter.closed_before(self.clock.now());
                let mark = self.meter.gate().settle(closed);
                let pending = self.meter.oldest_pending_hour();
                let bound = match pending
                    .into_iter()
                    .chain(self.flusher.retry_oldest_hour())
                    .min()
                {
                    Some(h) => mark.min(h),
                    None => mark,
                };
                (mark, bound)
            })
            .await;
        self.store.record_settled(mark).await?;
        Ok(bound)
    }

    /// Settled hourly rows with `from <= hour < to` (R12), optionally for
    /// one account, read lazily a page at a time: only hours below
    /// [`settled_before`](Self::settled_before), which never change again.
    /// If the settled mark cannot be recorded, the stream is that one error.
    pub async fn export(
        &self,
        from: Ts,
        to: Ts,
        account: Option<String>,
    ) -> impl futures_util::Stream<Item = Result<crate::ledger::UsageRow, MeterError>> + Send + 'static
    {
        use futures_util::StreamExt;
        let settled = match self.settled_before().await {
            Ok(settled) => settled,
            Err(e) => return futures_util::stream::once(async { Err(e) }).left_stream(),
        };
        crate::export::settled_rows(
            self.store.clone(),
            from,
            to.min(settled),
            account,
            crate::export::PAGE_ROWS,
        )
        .map(|row| row.map_err(MeterError::from))
        .right_stream()
    }

    /// Whether the store answers, within a short bound.
    pub async fn store_up(&self) -> bool {
        matches!(
            tokio::time::timeout(std::time::Duration::from_secs(1), self.store.ping()).await,
            Ok(Ok(()))
        )
    }

    /// The store, for tests that read back what was flushed. Transports
    /// go through the functions above.
    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    // --- shutdown ---

    /// Stops taking deductions. When this returns, no deduction is in
    /// progress and every later one is refused with `ShuttingDown`.
    pub fn close(&self) {
        self.meter.gate().close();
        self.closing.cancel();
    }

    /// Cancelled once [`close`](Self::close) has run.
    pub fn closing(&self) -> tokio_util::sync::CancellationToken {
        self.closing.clone()
    }
}

fn validate_pack_id(id: &str) -> Result<(), MeterError> {
    let bad = |m: &str| Err(MeterError::InvalidPack(format!("pack_id: {m}")));
    if id.len() > MAX_ACCOUNT_ID_BYTES {
        return bad("is longer than 128 bytes");
    }
    if id.chars().any(char::is_control) {
        return bad("contains a control character");
    }
    if id.starts_with("free-") {
        return bad("the prefix `free-` is reserved for free-tier packs");
    }
    Ok(())
}

/// Whether a stored pack has the terms a repeated grant asks for. A retry
/// that left `valid_from` unset ("from now") matches whatever instant the
/// first grant resolved it to, and a validity given as a length is measured
/// from there: resending `grant --valid-for 1month --pack-id X` later is the
/// same grant.
fn same_terms(stored: &PackSpec, asked: &Grant, zone: &BillingZone) -> bool {
    (stored.item, stored.capacity, stored.priority) == (asked.item, asked.capacity, asked.priority)
        && asked
            .valid_from
            .is_none_or(|from| from == stored.valid_from)
        && asked.validity.until(stored.valid_from, zone) == Some(stored.valid_until)
}

#[cfg(test)]
mod tests;
