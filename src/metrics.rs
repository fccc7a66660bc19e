//! Prometheus metrics, served on the admin port at `/metrics`.
//!
//! No metric is labelled by account: label values are drawn from small fixed
//! sets (decision, item, method), so cardinality stays bounded. Hot-path
//! counters are resolved once at start-up, so recording one is a single
//! atomic add.

use std::sync::atomic::AtomicU64;

use prometheus_client::{
    encoding::{text::encode, EncodeLabelSet},
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};

use crate::{
    flush::{FlushObserver, FlushReport},
    meter::{Decision, DeductOutcome},
    store::StoreError,
};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabel {
    decision: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ItemLabel {
    item: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AuthLabel {
    interface: &'static str,
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabel {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabel {
    method: &'static str,
}

/// The RPC names the latency histogram is labelled with; any other path
/// counts as `other`, so a client cannot inflate the metric's cardinality
/// with made-up paths.
const RPC_METHODS: &[&str] = &[
    "Deduct",
    "DeductBatch",
    "DeductStream",
    "GetUsage",
    "PutAccount",
    "GetAccount",
    "GrantPack",
    "ListPacks",
    "Flush",
    "ExportUsage",
    "GetDailyUsage",
    "ShouldRateLimit",
    "Check",
    "Watch",
    "ServerReflectionInfo",
    "other",
];

/// Which histogram a request path goes to, for [`Metrics::observe_rpc`].
pub fn rpc_method(path: &str) -> usize {
    let name = path.rsplit('/').next().unwrap_or("");
    RPC_METHODS
        .iter()
        .position(|k| *k == name)
        .unwrap_or(RPC_METHODS.len() - 1)
}

pub struct Metrics {
    registry: Registry,
    allow: Counter,
    deny: Counter,
    duplicate: Counter,
    covered_calls: Counter,
    covered_egress: Counter,
    overage_calls: Counter,
    overage_egress: Counter,
    /// One histogram per entry of `RPC_METHODS`, resolved at start-up so an
    /// observation takes no lock and allocates nothing.
    rpc_duration: Vec<Histogram>,
    flush_duration: Histogram,
    flush_accounts: Histogram,
    flush_failures: Counter,
    flush_late_batches: Counter,
    oldest_unflushed: Gauge<f64, AtomicU64>,
    store_up: Gauge,
    /// Whether the last flush the store was asked to take succeeded.
    last_flush_ok: std::sync::atomic::AtomicBool,
    resident_accounts: Gauge,
    dirty_accounts: Gauge,
    set_aside_accounts: Gauge,
    set_aside_total: Counter,
    journal: JournalMetrics,
    /// Admin calls refused, by interface (grpc, http) and reason.
    admin_auth_failures: Family<AuthLabel, Counter>,
    /// Re-reads of a changed admin token file, by result (ok, error).
    admin_token_reloads: Family<ResultLabel, Counter>,
    /// Re-reads of changed TLS files, by result (ok, error).
    tls_reloads: Family<ResultLabel, Counter>,
    /// Reloads of the plans file on SIGHUP, by result (ok, error).
    plans_reloads: Family<ResultLabel, Counter>,
    /// Plans switched in (R8), and accounts whose usage they re-deducted.
    plan_switches: Counter,
    plan_accounts_recalculated: Counter,
    /// TLS handshakes on the gRPC port that failed or timed out.
    tls_handshake_failures: Counter,
}

/// `--durability journal`: the journal's size and its group commits.
struct JournalMetrics {
    bytes: Gauge,
    fsync: Histogram,
    group_records: Histogram,
    writable: Gauge,
}

impl JournalMetrics {
    fn register(registry: &mut Registry) -> JournalMetrics {
        let bytes = Gauge::default();
        registry.register(
            "journal_bytes",
            "Size of the journal's segments on disk (durability = journal)",
            bytes.clone(),
        );
        let fsync = Histogram::new([
            0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
        ]);
        registry.register(
            "journal_fsync_duration_seconds",
            "Time of one journal fsync (one per group commit)",
            fsync.clone(),
        );
        let group_records = Histogram::new([
            1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 1024.0, 4096.0,
        ]);
        registry.register(
            "journal_group_commit_records",
            "Deduction groups (a unary call, a batch, a stream message) made durable by one fsync",
            group_records.clone(),
        );
        let writable = Gauge::default();
        registry.register(
            "journal_writable",
            "1 while the journal takes writes; 0 while deductions are refused because it cannot",
            writable.clone(),
        );
        JournalMetrics {
            bytes,
            fsync,
            group_records,
            writable,
        }
    }
}

impl crate::journal::JournalObserver for Metrics {
    fn committed(&self, records: usize, _bytes: usize, fsync: std::time::Duration) {
        self.journal.fsync.observe(fsync.as_secs_f64());
        self.journal.group_records.observe(records as f64);
    }
    fn size(&self, bytes: u64) {
        self.journal
            .bytes
            .set(i64::try_from(bytes).unwrap_or(i64::MAX));
    }
    fn writable(&self, writable: bool) {
        self.journal.writable.set(i64::from(writable));
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("packmeter");
        let deductions = Family::<DecisionLabel, Counter>::default();
        registry.register(
            "deductions",
            "Deductions answered, by decision (allow, deny, duplicate)",
            deductions.clone(),
        );
        let covered = Family::<ItemLabel, Counter>::default();
        registry.register(
            "covered",
            "Amount covered by packs, by item",
            covered.clone(),
        );
        let overage = Family::<ItemLabel, Counter>::default();
        registry.register(
            "overage",
            "Amount billed as overage, by item",
            overage.clone(),
        );
        let rpc_family = Family::<MethodLabel, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25, 1.0,
            ])
        });
        registry.register(
            "rpc_duration_seconds",
            "gRPC request latency, by method",
            rpc_family.clone(),
        );
        let rpc_duration = RPC_METHODS
            .iter()
            .map(|m| rpc_family.get_or_create(&MethodLabel { method: m }).clone())
            .collect();
        let flush_duration = Histogram::new([
            0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
        ]);
        registry.register(
            "flush_duration_seconds",
            "Time to write one flush to the store",
            flush_duration.clone(),
        );
        let flush_accounts =
            Histogram::new([1.0, 10.0, 100.0, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0]);
        registry.register(
            "flush_batch_accounts",
            "Accounts written per flush",
            flush_accounts.clone(),
        );
        let flush_failures = Counter::default();
        registry.register(
            "flush_failures",
            "Flushes the store refused (their usage was kept and retried)",
            flush_failures.clone(),
        );
        let flush_late_batches = Counter::default();
        registry.register(
            "flush_late_batches",
            "Flush batches written at the calls' priority because the oldest unflushed usage \
             was older than flush_max_lag (by default 3 flush intervals; a core saturated by calls)",
            flush_late_batches.clone(),
        );
        let oldest_unflushed = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "oldest_unflushed_seconds",
            "Age of the oldest usage not yet durable in the store",
            oldest_unflushed.clone(),
        );
        let store_up = Gauge::default();
        registry.register(
            "store_up",
            "1 if the store answered the scrape's check and took the last flush, else 0",
            store_up.clone(),
        );
        let resident_accounts = Gauge::default();
        registry.register(
            "resident_accounts",
            "Accounts held in memory",
            resident_accounts.clone(),
        );
        let dirty_accounts = Gauge::default();
        registry.register(
            "dirty_accounts",
            "Accounts with usage waiting for a flush",
            dirty_accounts.clone(),
        );
        let set_aside_accounts = Gauge::default();
        registry.register(
            "flush_set_aside_accounts",
            "Accounts whose usage the store refuses for good: kept in memory, out of the flush \
             queue, and written to the spill file at shutdown",
            set_aside_accounts.clone(),
        );
        let set_aside_total = Counter::default();
        registry.register(
            "flush_set_aside",
            "Accounts set aside after a permanent store error",
            set_aside_total.clone(),
        );
        let journal = JournalMetrics::register(&mut registry);
        let admin_auth_failures = Family::<AuthLabel, Counter>::default();
        registry.register(
            "admin_auth_failures",
            "Admin calls refused, by interface (grpc, http) and reason (missing, malformed, \
             wrong, not_loopback)",
            admin_auth_failures.clone(),
        );
        let admin_token_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "admin_token_reloads",
            "Re-reads of the changed --admin-token-file, by result (ok; error: unreadable or \
             empty, the tokens read before are kept)",
            admin_token_reloads.clone(),
        );
        let tls_reloads = Family::<ResultLabel, Counter>::default();
        registry.register(
            "tls_reloads",
            "Re-reads of the changed --tls-cert-file, --tls-key-file or --tls-client-ca-file, by \
             result (ok; error: unreadable, unparsable or a key that does not match, the \
             certificate served before is kept)",
            tls_reloads.clone(),
        );
        let plans_reloads = Family::<ResultLabel, Counter>::default();
        // Both results exposed from the start, at 0: a reload checks the
        // store (it takes a moment), and a dashboard sees no gap.
        for result in ["ok", "error"] {
            let _ = plans_reloads.get_or_create(&ResultLabel { result });
        }
        registry.register(
            "plans_reloads",
            "Reloads of the --plans file on SIGHUP, by result (ok; error: unreadable, invalid, or \
             a change to a plan in force, a new plan whose hour has closed, or one the store records in force disagreeing, \
             the plans in force before are kept)",
            plans_reloads.clone(),
        );
        let plan_switches = Counter::default();
        registry.register(
            "plan_switches",
            "Plans of the --plans file switched in when their instant passed, counted once \
             their recalculation finished on this node (R8)",
            plan_switches.clone(),
        );
        let plan_accounts_recalculated = Counter::default();
        registry.register(
            "plan_accounts_recalculated",
            "Accounts whose usage recorded under an earlier plan this node re-deducted against \
             a new plan's packs (R8)",
            plan_accounts_recalculated.clone(),
        );
        let tls_handshake_failures = Counter::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes on the gRPC port that failed (a plaintext or untrusting client, no \
             or an unknown client certificate) or did not finish in time",
            tls_handshake_failures.clone(),
        );
        let d = |v| {
            deductions
                .get_or_create(&DecisionLabel { decision: v })
                .clone()
        };
        let c = |v| covered.get_or_create(&ItemLabel { item: v }).clone();
        let o = |v| overage.get_or_create(&ItemLabel { item: v }).clone();
        Metrics {
            allow: d("allow"),
            deny: d("deny"),
            duplicate: d("duplicate"),
            covered_calls: c("calls"),
            covered_egress: c("egress_bytes"),
            overage_calls: o("calls"),
            overage_egress: o("egress_bytes"),
            registry,
            rpc_duration,
            flush_duration,
            flush_accounts,
            flush_failures,
            flush_late_batches,
            oldest_unflushed,
            store_up,
            last_flush_ok: true.into(),
            resident_accounts,
            dirty_accounts,
            set_aside_accounts,
            set_aside_total,
            journal,
            admin_auth_failures,
            admin_token_reloads,
            tls_reloads,
            plans_reloads,
            plan_switches,
            plan_accounts_recalculated,
            tls_handshake_failures,
        }
    }

    /// Counts one plan switched in and recalculated, with its accounts.
    pub fn plan_switched(&self, accounts: u64) {
        self.plan_switches.inc();
        self.plan_accounts_recalculated.inc_by(accounts);
    }

    /// Counts one re-read of the changed TLS files: `ok` or `error`.
    pub fn tls_reloaded(&self, result: &'static str) {
        self.tls_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one reload of the plans file; `result` is `ok` or `error`.
    pub fn plans_reloaded(&self, result: &'static str) {
        self.plans_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one failed TLS handshake on the gRPC port.
    pub fn tls_handshake_failed(&self) {
        self.tls_handshake_failures.inc();
    }

    /// Counts one re-read of the admin token file: `ok` or `error`.
    pub fn admin_token_reloaded(&self, result: &'static str) {
        self.admin_token_reloads
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    /// Counts one refused admin call; both labels come from fixed sets.
    pub fn admin_auth_failed(&self, interface: &'static str, reason: &'static str) {
        self.admin_auth_failures
            .get_or_create(&AuthLabel { interface, reason })
            .inc();
    }

    /// Counts one outcome, counter by counter: the reference that
    /// [`record_deductions`](Self::record_deductions), which every path
    /// counts with, is tested against.
    #[cfg(test)]
    fn record_deduction(&self, o: &DeductOutcome) {
        if o.duplicate {
            self.duplicate.inc();
            return;
        }
        match o.decision {
            Decision::Allow => self.allow.inc(),
            Decision::Deny(_) => self.deny.inc(),
        };
        self.covered_calls.inc_by(o.calls.covered);
        self.overage_calls.inc_by(o.calls.overage);
        self.covered_egress.inc_by(o.egress_bytes.covered);
        self.overage_egress.inc_by(o.egress_bytes.overage);
    }

    /// Counts a group's outcomes: summed first, then one add per counter
    /// that changes. The counters are atomics every worker thread adds to,
    /// so one add per outcome (five per deduction) cost a batched
    /// deduction about 25 instructions and a contended cache line each
    /// (callgrind, issue 10).
    pub fn record_deductions(&self, outcomes: &[DeductOutcome]) {
        let (mut allow, mut deny, mut duplicate) = (0u64, 0u64, 0u64);
        let mut sums = [0u64; 4];
        for o in outcomes {
            if o.duplicate {
                duplicate += 1;
                continue;
            }
            match o.decision {
                Decision::Allow => allow += 1,
                Decision::Deny(_) => deny += 1,
            }
            // Wrapping, as the counters' own adds one by one would.
            for (s, v) in sums.iter_mut().zip([
                o.calls.covered,
                o.calls.overage,
                o.egress_bytes.covered,
                o.egress_bytes.overage,
            ]) {
                *s = s.wrapping_add(v);
            }
        }
        for (counter, n) in [
            (&self.allow, allow),
            (&self.deny, deny),
            (&self.duplicate, duplicate),
            (&self.covered_calls, sums[0]),
            (&self.overage_calls, sums[1]),
            (&self.covered_egress, sums[2]),
            (&self.overage_egress, sums[3]),
        ] {
            if n > 0 {
                counter.inc_by(n);
            }
        }
    }

    /// Records one RPC's latency; `method` comes from [`rpc_method`].
    pub fn observe_rpc(&self, method: usize, seconds: f64) {
        if let Some(h) = self.rpc_duration.get(method) {
            h.observe(seconds);
        }
    }

    /// Sets `store_up` from the scrape's check and the last flush: a store
    /// that answers reads but refuses writes is not up.
    pub fn set_store_up(&self, answered: bool) {
        let flushed = self
            .last_flush_ok
            .load(std::sync::atomic::Ordering::Relaxed);
        self.store_up.set(i64::from(answered && flushed));
    }

    /// Renders the registry after setting the gauges read at scrape time.
    pub fn render(
        &self,
        oldest_unflushed_s: f64,
        resident: usize,
        dirty: usize,
        set_aside: usize,
    ) -> String {
        self.oldest_unflushed.set(oldest_unflushed_s);
        self.set_aside_accounts
            .set(i64::try_from(set_aside).unwrap_or(i64::MAX));
        self.resident_accounts
            .set(i64::try_from(resident).unwrap_or(i64::MAX));
        self.dirty_accounts
            .set(i64::try_from(dirty).unwrap_or(i64::MAX));
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

impl FlushObserver for Metrics {
    fn flushed(&self, r: &FlushReport) {
        self.last_flush_ok
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.store_up.set(1);
        if r.accounts > 0 {
            self.flush_duration.observe(r.elapsed.as_secs_f64());
            self.flush_accounts.observe(r.accounts as f64);
        }
        self.flush_late_batches.inc_by(r.late_batches as u64);
    }

    fn failed(&self, _: &StoreError) {
        self.last_flush_ok
            .store(false, std::sync::atomic::Ordering::Relaxed);
        self.store_up.set(0);
        self.flush_failures.inc();
    }

    fn set_aside(&self, _account: &str, _error: &StoreError) {
        self.set_aside_total.inc();
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use prost::Message;

    use super::RPC_METHODS;

    /// Every method of the services the server registers, read from their
    /// descriptors, so the metric's label list cannot drift from them.
    fn served_methods() -> BTreeSet<String> {
        let sets = [
            crate::grpc::proto::FILE_DESCRIPTOR_SET,
            tonic_health::pb::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
            tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
        ];
        let mut names: BTreeSet<String> = sets
            .iter()
            .flat_map(|bytes| prost_types::FileDescriptorSet::decode(*bytes).unwrap().file)
            .flat_map(|file| file.service)
            .flat_map(|service| service.method)
            .filter_map(|method| method.name)
            .collect();
        // Envoy's service is generated from a hand-declared route in
        // build.rs (envoy-types ships no descriptor): its one method.
        names.insert("ShouldRateLimit".into());
        names
    }

    #[test]
    fn the_latency_labels_are_exactly_the_served_methods() {
        let labelled: BTreeSet<String> = RPC_METHODS
            .iter()
            .filter(|m| **m != "other")
            .map(|m| m.to_string())
            .collect();
        assert_eq!(labelled, served_methods());
        assert_eq!(RPC_METHODS.last(), Some(&"other"));
    }

    proptest::proptest! {
        /// A group counted at once renders what its outcomes counted one
        /// by one render: allowed, denied and duplicate outcomes, with
        /// amounts, zeros among them.
        #[test]
        fn a_group_counts_what_its_outcomes_count_one_by_one(
            outcomes in proptest::collection::vec(
                (0u8..5, proptest::array::uniform4(proptest::prop_oneof![proptest::strategy::Just(0u64), 0u64..1 << 40])),
                0..40,
            ),
        ) {
            use crate::meter::{Decision, DeductOutcome, DenyReason, ItemOutcome};
            let outcomes: Vec<DeductOutcome> = outcomes
                .iter()
                .map(|&(kind, [cc, co, ec, eo])| DeductOutcome {
                    decision: match kind {
                        1 => Decision::Deny(DenyReason::CallsExhausted),
                        2 => Decision::Deny(DenyReason::Suspended),
                        _ => Decision::Allow,
                    },
                    calls: ItemOutcome { covered: cc, overage: co, remaining: 7, limit: 9 },
                    egress_bytes: ItemOutcome { covered: ec, overage: eo, remaining: 7, limit: 9 },
                    duplicate: kind == 3,
                })
                .collect();
            let (one_by_one, grouped) = (super::Metrics::new(), super::Metrics::new());
            for o in &outcomes {
                one_by_one.record_deduction(o);
            }
            grouped.record_deductions(&outcomes);
            // Line by line, sorted: a family's labels render in hash order.
            let render = |m: &super::Metrics| {
                let mut lines: Vec<String> =
                    m.render(0.0, 0, 0, 0).lines().map(String::from).collect();
                lines.sort();
                lines
            };
            proptest::prop_assert_eq!(render(&grouped), render(&one_by_one));
            // Not vacuous: the one-by-one side counted something.
            if !outcomes.is_empty() {
                proptest::prop_assert_ne!(render(&one_by_one), render(&super::Metrics::new()));
            }
        }
    }
}
