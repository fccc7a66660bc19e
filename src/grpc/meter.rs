//! `packmeter.v1.Meter`: the hot path over gRPC. Converts and calls
//! [`App`]; every deduction goes through [`App::deduct`].

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use futures_util::{FutureExt, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{convert, proto};
use crate::{
    app::{App, DeductRequest, Deferred, Outcomes, Refused},
    drain::Drain,
    meter::{Atomicity, DeductOutcome, Deduction, MeterError},
};

pub struct MeterService {
    app: Arc<App>,
    max_batch: usize,
    /// `--max-stream-in-flight`: see [`Meter::deduct_stream`](proto::meter_server::Meter::deduct_stream).
    max_in_flight: usize,
    /// A DeductStream counts as in flight until it ends, so shutdown lets
    /// it finish (within the grace period).
    drain: Arc<Drain>,
}

impl MeterService {
    pub fn new(app: Arc<App>, max_batch: usize, max_in_flight: usize, drain: Arc<Drain>) -> Self {
        MeterService {
            app,
            max_batch,
            max_in_flight: max_in_flight.max(1),
            drain,
        }
    }
}

/// Converts one request; changes nothing. Public for the fuzz targets
/// (`fuzz/fuzz_targets/grpc_request.rs`), which run what the server runs.
#[doc(hidden)]
pub fn request(r: &proto::DeductRequest) -> Result<DeductRequest<'_>, Status> {
    Ok(DeductRequest {
        account_id: &r.account_id,
        deduction: Deduction {
            calls: r.calls,
            egress_bytes: r.egress_bytes,
            at: convert::ts("at", r.at.as_ref())?,
            request_id: &r.request_id,
        },
    })
}

/// Adds the position of a bad element to its status, keeping the code.
fn at_index(i: usize, s: Status) -> Status {
    Status::new(s.code(), format!("deductions[{i}]: {}", s.message()))
}

/// The status of a DeductStream that has more messages in flight than
/// `--max-stream-in-flight`.
fn too_many_in_flight(max: usize) -> Status {
    Status::resource_exhausted(format!(
        "more than {max} messages in flight on this DeductStream (the server's \
         --max-stream-in-flight): the replies above answer the first {max}; this message and \
         the ones after it were not deducted. Read replies before sending more, and resend \
         the rest with their request_ids"
    ))
}

/// The messages a stream received together, deducted in order into
/// `ready`; `false` if one was refused (its status is last in `ready`, and
/// the messages after it were not deducted). As one group when every
/// account is resident and nothing is refused, which is what deducting them
/// one after the other gives: `Atomicity::Each` deducts a group's charges
/// in order, each seeing the ones before it, and a repeated request id
/// answers as a duplicate, as a later message would. Otherwise one by one,
/// as the group changed nothing.
async fn deduct_received(
    app: &App,
    received: &[proto::DeductRequest],
    ready: &mut VecDeque<Result<Deferred, Status>>,
) -> bool {
    if received.len() > 1 {
        let group = received
            .iter()
            .map(request)
            .collect::<Result<Vec<_>, _>>()
            .ok()
            .and_then(|reqs| app.deduct_deferred_now(&reqs, Atomicity::Each));
        if let Some(deferred) = group {
            ready.push_back(Ok(deferred));
            return true;
        }
    }
    for r in received {
        let deferred = deduct_deferred(app, r).await;
        let refused = deferred.is_err();
        ready.push_back(deferred);
        if refused {
            return false;
        }
    }
    true
}

/// One stream message, deducted; answered through [`App::acknowledge`].
async fn deduct_deferred(app: &App, r: &proto::DeductRequest) -> Result<Deferred, Status> {
    let req = request(r)?;
    app.deduct_deferred(&[req], Atomicity::Each)
        .await
        .map_err(|e| Status::from(e.error))
}

/// One deduction, end to end: a unary call.
async fn deduct_one(app: &App, r: &proto::DeductRequest) -> Result<proto::DeductResponse, Status> {
    let req = request(r)?;
    let outcomes = app
        .deduct(&[req], Atomicity::Each)
        .await
        .map_err(|e| Status::from(e.error))?;
    Ok(convert::deduct_response(&outcomes[0]))
}

type DeductStream = Pin<Box<dyn Stream<Item = Result<proto::DeductResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::meter_server::Meter for MeterService {
    // The hot RPCs' spans are at DEBUG: an INFO span costs about 1.3 µs per
    // request (BENCHMARKS.md), a tenth of a unary call, at the default level.
    #[tracing::instrument(level = "debug", skip_all, fields(account = %req.get_ref().account_id))]
    async fn deduct(
        &self,
        req: Request<proto::DeductRequest>,
    ) -> Result<Response<proto::DeductResponse>, Status> {
        Ok(Response::new(deduct_one(&self.app, req.get_ref()).await?))
    }

    /// All elements are validated and their accounts loaded before the first
    /// is deducted, so a bad element rejects the batch and changes nothing.
    #[tracing::instrument(level = "debug", skip_all, fields(n = req.get_ref().deductions.len()))]
    async fn deduct_batch(
        &self,
        req: Request<proto::DeductBatchRequest>,
    ) -> Result<Response<proto::DeductBatchResponse>, Status> {
        let reqs = &req.get_ref().deductions;
        if reqs.len() > self.max_batch {
            return Err(Status::invalid_argument(format!(
                "deductions: {} elements is over the maximum of {} per batch (the server's \
                 --max-batch); send them in smaller batches",
                reqs.len(),
                self.max_batch
            )));
        }
        let mut batch = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            batch.push(request(r).map_err(|s| at_index(i, s))?);
        }
        let outcomes = self
            .app
            .deduct(&batch, Atomicity::Each)
            .await
            .map_err(|Refused { index, error }| at_index(index, error.into()))?;
        let results = outcomes.iter().map(convert::deduct_response).collect();
        Ok(Response::new(proto::DeductBatchResponse { results }))
    }

    type DeductStreamStream = DeductStream;

    /// Replies in order. A bad message ends the stream with its status;
    /// the deductions before it stand. At shutdown the stream answers what
    /// it has taken and then ends with UNAVAILABLE.
    ///
    /// Messages that have arrived together (a client's window) are deducted
    /// as one group, in order (see `deduct_received`), and then
    /// acknowledged: one journal record and one group commit cover them,
    /// not one per message.
    ///
    /// **In flight** are the messages the server has received and not yet
    /// answered (a reply counts as answered once the connection has taken
    /// it, which HTTP/2 flow control allows only as fast as the client
    /// reads). The server reads only while fewer than
    /// `--max-stream-in-flight` are in flight; if the next message is
    /// already there when that many are, the client is sending ahead of
    /// the limit: the stream answers those in flight and ends with
    /// RESOURCE_EXHAUSTED, and the extra message and any after it are not
    /// deducted. A client that keeps at most that many unanswered is never
    /// refused.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn deduct_stream(
        &self,
        req: Request<Streaming<proto::DeductRequest>>,
    ) -> Result<Response<Self::DeductStreamStream>, Status> {
        struct State {
            inbound: Streaming<proto::DeductRequest>,
            app: Arc<App>,
            max_in_flight: usize,
            next: usize,
            done: bool,
            /// Deducted, not yet acknowledged, in order; an error last.
            ready: VecDeque<Result<Deferred, Status>>,
            /// The outcomes of an acknowledged group not yet answered.
            answering: smallvec::IntoIter<[DeductOutcome; 1]>,
            // Owned by the stream: dropped when the stream ends.
            _in_flight: crate::drain::InFlight,
        }
        // Boxed: `unfold` moves its state into and out of each step's
        // future, and the inbound stream makes it large (four copies of it
        // were about 260 instructions a message in callgrind).
        let state = Box::new(State {
            inbound: req.into_inner(),
            app: self.app.clone(),
            max_in_flight: self.max_in_flight,
            next: 0,
            done: false,
            ready: VecDeque::new(),
            answering: Outcomes::new().into_iter(),
            _in_flight: self.drain.enter(),
        });
        let out = futures_util::stream::unfold(state, |mut s| async move {
            // Every message received was answered: read more.
            if s.answering.as_slice().is_empty() && s.ready.is_empty() {
                if s.done {
                    return None;
                }
                let closing = s.app.closing();
                let msg = tokio::select! {
                    biased;
                    _ = closing.cancelled() => {
                        s.done = true;
                        return Some((Err(MeterError::ShuttingDown.into()), s));
                    }
                    msg = s.inbound.next() => msg,
                };
                // This message and those already received behind it, up
                // to the first that does not decode.
                let mut received = Vec::new();
                let mut last = None;
                let mut msg = msg?;
                loop {
                    match msg {
                        Ok(r) => received.push(r),
                        Err(status) => {
                            last = Some(status);
                            break;
                        }
                    }
                    match s.inbound.next().now_or_never() {
                        Some(Some(_)) if received.len() >= s.max_in_flight => {
                            // One more than the limit has arrived unanswered.
                            last = Some(too_many_in_flight(s.max_in_flight));
                            break;
                        }
                        Some(Some(m)) => msg = m,
                        Some(None) => {
                            s.done = true;
                            break;
                        }
                        None => break,
                    }
                }
                let deducted = deduct_received(&s.app, &received, &mut s.ready).await;
                if let (true, Some(status)) = (deducted, last) {
                    s.ready.push_back(Err(status));
                }
            }
            let reply = match s.answering.next() {
                Some(o) => Ok(convert::deduct_response(&o)),
                None => match s.ready.pop_front()? {
                    Err(status) => Err(status),
                    Ok(deferred) => match s.app.acknowledge(deferred).await {
                        Ok(outcomes) => {
                            s.answering = outcomes.into_iter();
                            s.answering
                                .next()
                                .map(|o| convert::deduct_response(&o))
                                .ok_or_else(|| Status::internal("a deduction without an outcome"))
                        }
                        Err(e) => Err(Status::from(e.error)),
                    },
                },
            }
            .map_err(|st| at_index(s.next, st));
            s.next += 1;
            // Stop after the first error, which tonic sends as the trailer.
            if reply.is_err() {
                s.done = true;
                s.ready.clear();
                s.answering = Outcomes::new().into_iter();
            }
            Some((reply, s))
        });
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn get_usage(
        &self,
        req: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let r = req.get_ref();
        let at = convert::ts("at", r.at.as_ref())?;
        let packs = self
            .app
            .usage(&r.account_id, at)
            .await?
            .iter()
            .map(|v| convert::pack(v, &self.app.config().zone))
            .collect();
        Ok(Response::new(proto::GetUsageResponse { packs }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        app::AccountChange,
        calendar::{from_datetime, FreeTierPlan, Ts},
        clock::ManualClock,
        meter::{Decision, MeterConfig},
        metrics::Metrics,
        store::sqlite::SqliteStore,
    };

    fn at(s: &str) -> Ts {
        from_datetime(&chrono::DateTime::parse_from_rfc3339(s).unwrap())
    }

    /// An app over a real SQLite file, 10 free calls a month, at
    /// 2024-05-10T10:30Z, with `acme`, `bolt` and `deny` resident and
    /// activated (`deny` refuses calls beyond its packs).
    async fn app(dir: &std::path::Path) -> App {
        let store = SqliteStore::open(dir.join("pm.db").to_str().unwrap()).unwrap();
        let cfg = MeterConfig {
            plan: FreeTierPlan {
                calls: 10,
                ..FreeTierPlan::default()
            },
            ..MeterConfig::default()
        };
        let clock = Arc::new(ManualClock::new(at("2024-05-10T10:30:00Z")));
        let app = App::new(cfg, Arc::new(store), Arc::new(Metrics::new()), clock, 100);
        app.put_account(AccountChange {
            account_id: "deny".into(),
            activated_at: None,
            suspended: None,
            deny_on_exhausted: Some(true),
        })
        .await
        .unwrap();
        for account in ["acme", "bolt", "deny"] {
            let r = proto::DeductRequest {
                account_id: account.into(),
                calls: 1,
                ..Default::default()
            };
            deduct_one(&app, &r).await.unwrap();
        }
        app
    }

    fn msg(account: &str, calls: u64, request_id: &str, at: Option<&str>) -> proto::DeductRequest {
        proto::DeductRequest {
            account_id: account.into(),
            calls,
            egress_bytes: 100,
            request_id: request_id.into(),
            at: at.map(|s| prost_types::Timestamp {
                seconds: at_secs(s),
                nanos: 0,
            }),
        }
    }

    fn at_secs(s: &str) -> i64 {
        chrono::DateTime::parse_from_rfc3339(s).unwrap().timestamp()
    }

    /// What a stream answers for `received`: the outcomes in order, then
    /// the refusal's message if one ended it.
    async fn answers(
        app: &App,
        received: &[proto::DeductRequest],
        grouped: bool,
    ) -> (Vec<DeductOutcome>, Option<String>, usize) {
        let mut ready = VecDeque::new();
        if grouped {
            deduct_received(app, received, &mut ready).await;
        } else {
            for r in received {
                let d = deduct_deferred(app, r).await;
                let refused = d.is_err();
                ready.push_back(d);
                if refused {
                    break;
                }
            }
        }
        let groups = ready.len();
        let mut out = Vec::new();
        for d in ready {
            match d {
                Ok(d) => out.extend(app.acknowledge(d).await.unwrap()),
                Err(s) => return (out, Some(s.message().to_string()), groups),
            }
        }
        (out, None, groups)
    }

    /// Messages that arrive together are deducted as one group, and the
    /// group answers exactly what deducting them one by one answers: each
    /// message sees the ones before it (a pack running out, then
    /// overage; a `deny` account refused past its pack), and a repeated
    /// request id is a duplicate.
    #[tokio::test]
    async fn messages_received_together_answer_as_one_by_one() {
        let received = [
            msg("acme", 4, "a1", None),
            msg("bolt", 2, "", None),
            msg("deny", 6, "d1", None),
            msg("acme", 4, "a2", None),
            msg("deny", 6, "d2", None),
            msg("acme", 4, "a1", None),
            msg("acme", 3, "", Some("2024-05-10T10:10:00Z")),
            msg("deny", 3, "d2", None),
        ];
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (grouped, by_one) = (app(one.path()).await, app(two.path()).await);
        let (g, g_err, groups) = answers(&grouped, &received, true).await;
        let (b, b_err, _) = answers(&by_one, &received, false).await;
        assert_eq!(groups, 1, "one group for the whole window");
        assert_eq!((&g, &g_err), (&b, &b_err));
        // The cases the window was made to cover did occur.
        assert!(g[6].calls.overage > 0, "{:?}", g[6]);
        assert!(g[4].decision != Decision::Allow, "{:?}", g[4]);
        assert!(g[5].duplicate, "{:?}", g[5]);
        assert_eq!(g.len(), received.len());
    }

    /// A refused message in the window (an event in a closed hour): the
    /// messages before it stand, its status names it, the ones after it
    /// are not deducted, as one by one.
    #[tokio::test]
    async fn a_refused_message_keeps_the_ones_before_it_and_stops_the_rest() {
        let received = [
            msg("acme", 2, "", None),
            msg("bolt", 1, "", None),
            msg("acme", 1, "", Some("2024-05-10T07:00:00Z")),
            msg("bolt", 5, "", None),
        ];
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (grouped, by_one) = (app(one.path()).await, app(two.path()).await);
        let (g, g_err, _) = answers(&grouped, &received, true).await;
        let (b, b_err, _) = answers(&by_one, &received, false).await;
        assert_eq!((&g, &g_err), (&b, &b_err));
        assert_eq!(g.len(), 2);
        assert!(g_err.is_some_and(|e| e.contains("closed")));
        let used = |app: &App| {
            let packs = app.meter().resident_account("bolt").unwrap().packs();
            packs.iter().map(|p| p.used()).sum::<u64>()
        };
        assert_eq!(used(&grouped), used(&by_one));
    }

    /// A window one of whose request ids is in flight elsewhere (another
    /// stream's group has claimed it and not finished): the group deducts
    /// nothing, and the window is taken message by message, answering what
    /// one by one answers. The messages before it stand, once each; it is
    /// refused as retryable when its original stays in flight past the
    /// retry bound; the ones after it are not deducted.
    #[tokio::test]
    async fn a_window_meeting_an_id_in_flight_elsewhere_is_taken_one_by_one() {
        let received = [
            msg("acme", 1, "r1", None),
            msg("bolt", 2, "", None),
            msg("acme", 1, "r2", None),
            msg("acme", 1, "r3", None),
        ];
        let (one, two) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let (grouped, by_one) = (app(one.path()).await, app(two.path()).await);
        for app in [&grouped, &by_one] {
            let acme = app.meter().resident_account("acme").unwrap();
            acme.claim_in_flight("r2", at("2024-05-10T10:30:00Z"));
        }
        let (g, g_err, groups) = answers(&grouped, &received, true).await;
        let (b, b_err, _) = answers(&by_one, &received, false).await;
        assert_eq!((&g, &g_err), (&b, &b_err));
        assert_eq!(
            groups, 3,
            "one answer each for r1 and bolt, then r2's refusal"
        );
        assert_eq!(g.len(), 2);
        assert!(
            g_err.as_deref().is_some_and(|e| e.contains("`r2`")),
            "{g_err:?}"
        );
        let used = |app: &App, account: &str| {
            let packs = app.meter().resident_account(account).unwrap().packs();
            packs
                .iter()
                .filter(|p| p.item() == crate::packs::Item::Calls)
                .map(|p| p.used())
                .sum::<u64>()
        };
        for app in [&grouped, &by_one] {
            // Calls: the setup's, then r1 once; bolt's setup and 2.
            assert_eq!((used(app, "acme"), used(app, "bolt")), (2, 3));
        }
    }
}
