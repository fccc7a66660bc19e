//! Load from concurrent clients on shared accounts for tests of several
//! nodes on one PostgreSQL database, and the check that the stored ledger
//! is exactly what the nodes acknowledged.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use packmeter::grpc::proto::{self, meter_client::MeterClient, Decision};
use tonic::transport::{Channel, Endpoint};

use super::pg::TestDb;

/// One answer a node gave.
#[derive(Clone, Debug)]
pub struct Ack {
    pub node: usize,
    pub account: String,
    pub id: String,
    pub calls: u64,
    pub allowed: bool,
    pub covered: u64,
    pub overage: u64,
    /// Why it was denied, empty when allowed.
    pub reason: String,
    pub at: Instant,
}

/// What one client saw: the answers, and the errors it failed over on.
#[derive(Default)]
pub struct ClientLog {
    pub acks: Vec<Ack>,
    pub errors: Vec<(usize, tonic::Code, String)>,
}

/// Clients sending deductions until stopped.
pub struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<ClientLog>>,
}

/// How the clients behave.
#[derive(Clone, Copy)]
pub struct LoadPlan {
    /// Clients per node and account.
    pub lanes: usize,
    /// Every `dup_every`-th request is sent again, with the same request
    /// id, to the next node: a retry that reached another node.
    pub dup_every: u64,
    /// On an error, send the same request to the next node (the node is
    /// restarting); without it an error fails the test.
    pub failover: bool,
}

/// A channel that connects on first use and reconnects after the node
/// restarts; a request gives up after 10 s rather than hang the test.
fn channel(grpc: &str) -> Channel {
    Endpoint::from_shared(format!("http://{grpc}"))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

impl Load {
    /// Starts `plan.lanes` clients per node in `grpc` (their addresses)
    /// and account, each sending one deduction of 1 to 4 calls every 5 ms
    /// to its own node, with a request id of its own.
    pub fn start(grpc: &[String], accounts: &[&str], plan: LoadPlan) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let channels: Vec<Channel> = grpc.iter().map(|g| channel(g)).collect();
        let mut tasks = Vec::new();
        for home in 0..grpc.len() {
            for account in accounts {
                for lane in 0..plan.lanes {
                    let meters = channels.iter().cloned().map(MeterClient::new).collect();
                    tasks.push(tokio::spawn(client(
                        meters,
                        home,
                        account.to_string(),
                        format!("{account}-n{home}-l{lane}"),
                        stop.clone(),
                        plan,
                    )));
                }
            }
        }
        Load { stop, tasks }
    }

    /// Stops the clients and returns what they saw.
    pub async fn stop(self) -> ClientLog {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = ClientLog::default();
        for t in self.tasks {
            let log = t.await.expect("a client failed");
            all.acks.extend(log.acks);
            all.errors.extend(log.errors);
        }
        all
    }
}

async fn client(
    mut meters: Vec<MeterClient<Channel>>,
    home: usize,
    account: String,
    prefix: String,
    stop: Arc<AtomicBool>,
    plan: LoadPlan,
) -> ClientLog {
    let n = meters.len();
    let mut log = ClientLog::default();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) {
        tick.tick().await;
        let calls = 1 + i % 4;
        let dup = plan.dup_every > 0 && i % plan.dup_every == plan.dup_every - 1;
        let id = format!("{prefix}-{i}{}", if dup { "-dup" } else { "" });
        let request = proto::DeductRequest {
            account_id: account.clone(),
            calls,
            egress_bytes: 0,
            at: None,
            request_id: id.clone(),
        };
        let mut target = home;
        for send in 0..if dup { 2 } else { 1 } {
            if send == 1 {
                target = (target + 1) % n;
            }
            let mut failures = 0;
            loop {
                match meters[target].deduct(request.clone()).await {
                    Ok(r) => {
                        let r = r.into_inner();
                        let (covered, overage, _) = super::split(&r.calls);
                        log.acks.push(Ack {
                            node: target,
                            account: account.clone(),
                            id: id.clone(),
                            calls,
                            allowed: r.decision == Decision::Allow as i32,
                            covered,
                            overage,
                            reason: r.deny_reason.clone(),
                            at: Instant::now(),
                        });
                        break;
                    }
                    Err(e) => {
                        assert!(plan.failover, "node {target} failed {id}: {e:?}");
                        log.errors.push((target, e.code(), format!("{e:?}")));
                        failures += 1;
                        // One node restarts at a time: another answers.
                        assert!(failures < 50, "no node answered {id}: {e:?}");
                        target = (target + 1) % n;
                    }
                }
            }
        }
        i += 1;
    }
    log
}

/// Per request id, its account, calls and whether some node admitted it.
/// Checks that each answer is consistent (covered + overage = calls when
/// allowed, nothing when denied) and that a request id always names the
/// same amount.
pub fn requests(acks: &[Ack]) -> BTreeMap<String, (String, u64, bool)> {
    let mut out: BTreeMap<String, (String, u64, bool)> = BTreeMap::new();
    for a in acks {
        if a.allowed {
            assert_eq!(a.covered + a.overage, a.calls, "{a:?}");
        } else {
            assert_eq!(a.covered, 0, "{a:?}");
        }
        let e = out
            .entry(a.id.clone())
            .or_insert_with(|| (a.account.clone(), a.calls, false));
        assert_eq!((&e.0, e.1), (&a.account, a.calls));
        e.2 |= a.allowed;
    }
    out
}

/// What the store holds for calls of one account.
#[derive(Debug, Default)]
pub struct Stored {
    /// Sum of the usage rows.
    pub total: i64,
    /// The overage row's sum.
    pub overage: i64,
    /// Per pack: (used, capacity, sum of its usage rows).
    pub packs: BTreeMap<String, (i64, i64, i64)>,
    /// Request ids recorded.
    pub ids: BTreeSet<String>,
}

pub async fn stored(db: &TestDb) -> BTreeMap<String, Stored> {
    let c = db.client().await;
    let mut out: BTreeMap<String, Stored> = BTreeMap::new();
    for r in c
        .query(
            "SELECT account_id, pack_id, SUM(amount)::BIGINT FROM usage_hourly \
             WHERE item = 1 GROUP BY account_id, pack_id",
            &[],
        )
        .await
        .unwrap()
    {
        let e = out.entry(r.get(0)).or_default();
        let (pack, amount): (String, i64) = (r.get(1), r.get(2));
        e.total += amount;
        if pack.is_empty() {
            e.overage = amount;
        } else {
            e.packs.entry(pack).or_default().2 = amount;
        }
    }
    for r in c
        .query(
            "SELECT account_id, pack_id, used, capacity FROM packs WHERE item = 1",
            &[],
        )
        .await
        .unwrap()
    {
        let e = out.entry(r.get(0)).or_default();
        let p = e.packs.entry(r.get(1)).or_default();
        (p.0, p.1) = (r.get(2), r.get(3));
    }
    for r in c
        .query("SELECT account_id, request_id FROM dedup", &[])
        .await
        .unwrap()
    {
        out.entry(r.get(0)).or_default().ids.insert(r.get(1));
    }
    out
}

/// The checks of issue 8 after every node has flushed: per account the
/// stored usage equals the sum of the admitted requests, each request id
/// once; no pack's `used` passes its capacity and the usage rows agree
/// with it; every admitted request id is recorded once. `deny` names
/// accounts that must never be admitted more than `holds` calls (and so
/// have no overage). Returns per account (admitted calls, what the nodes
/// covered in real time, what the packs hold).
pub async fn check_ledger(
    db: &TestDb,
    acks: &[Ack],
    deny: &[(&str, u64)],
) -> BTreeMap<String, (i64, u64, i64)> {
    let requests = requests(acks);
    let mut expected: BTreeMap<String, i64> = BTreeMap::new();
    let mut admitted_ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (id, (account, calls, allowed)) in &requests {
        let e = expected.entry(account.clone()).or_default();
        if *allowed {
            *e += *calls as i64;
            admitted_ids
                .entry(account.clone())
                .or_default()
                .insert(id.clone());
        }
    }
    let stored = stored(db).await;
    let mut out = BTreeMap::new();
    for (account, want) in &expected {
        let s = stored
            .get(account)
            .unwrap_or_else(|| panic!("{account}: nothing stored"));
        assert_eq!(
            s.total, *want,
            "{account}: the stored usage is the admitted calls, each request id once"
        );
        let mut used = 0;
        for (pack, (u, capacity, rows)) in &s.packs {
            assert!(
                u <= capacity,
                "{account}/{pack}: used {u} > capacity {capacity}"
            );
            assert_eq!(u, rows, "{account}/{pack}: pack used and usage rows agree");
            used += u;
        }
        assert_eq!(s.total, used + s.overage, "{account}: packs plus overage");
        let ids = admitted_ids.remove(account).unwrap_or_default();
        // Request ids a node denied may be recorded too; every admitted one
        // must be.
        assert!(
            ids.is_subset(&s.ids),
            "{account}: {} admitted request ids not recorded",
            ids.difference(&s.ids).count()
        );
        let covered: u64 = acks
            .iter()
            .filter(|a| &a.account == account)
            .map(|a| a.covered)
            .sum();
        let holds: i64 = s.packs.values().map(|p| p.1).sum();
        out.insert(account.clone(), (*want, covered, holds));
    }
    for (account, holds) in deny {
        let (admitted, _, _) = out.get(*account).copied().unwrap_or_default();
        assert!(
            admitted <= *holds as i64,
            "{account}: a deny account was admitted {admitted} calls of {holds}"
        );
        let s = stored.get(*account);
        assert_eq!(
            s.map_or(0, |s| s.overage),
            0,
            "{account}: a deny account has no overage; admitted {admitted}, stored {:?}",
            s.map(|s| (s.total, &s.packs))
        );
    }
    out
}

/// Per node, the longest time between two answers within `from..to`
/// (including from `from` to the first and from the last to `to`).
pub fn longest_silence(acks: &[Ack], nodes: usize, from: Instant, to: Instant) -> Vec<Duration> {
    (0..nodes)
        .map(|n| {
            let mut times: Vec<Instant> = acks
                .iter()
                .filter(|a| a.node == n && a.at >= from && a.at <= to)
                .map(|a| a.at)
                .collect();
            times.sort();
            let mut last = from;
            let mut longest = Duration::ZERO;
            for t in times.into_iter().chain([to]) {
                longest = longest.max(t - last);
                last = t;
            }
            longest
        })
        .collect()
}
