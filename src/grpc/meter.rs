//! `packmeter.v1.Meter`: the hot path over gRPC. Converts and calls
//! [`App`]; every deduction goes through [`App::deduct`].

use std::{collections::VecDeque, pin::Pin, sync::Arc};

use futures_util::{FutureExt, Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{convert, proto};
use crate::{
    app::{App, DeductRequest, Deferred, Refused},
    drain::Drain,
    meter::{Atomicity, Deduction, MeterError},
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
    /// one after the other, in order, and then acknowledged: in journal
    /// mode one group commit covers them, not one per message.
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
            /// Deducted, not yet answered, in order; an error last.
            ready: VecDeque<Result<Deferred, Status>>,
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
            _in_flight: self.drain.enter(),
        });
        let out = futures_util::stream::unfold(state, |mut s| async move {
            if s.ready.is_empty() {
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
                let mut msg = msg?;
                // This message and those already received behind it.
                loop {
                    let deferred = match msg {
                        Err(status) => Err(status),
                        Ok(r) => deduct_deferred(&s.app, &r).await,
                    };
                    let failed = deferred.is_err();
                    s.ready.push_back(deferred);
                    if failed {
                        break;
                    }
                    match s.inbound.next().now_or_never() {
                        Some(Some(_)) if s.ready.len() >= s.max_in_flight => {
                            // One more than the limit has arrived unanswered.
                            s.ready.push_back(Err(too_many_in_flight(s.max_in_flight)));
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
            }
            let reply = match s.ready.pop_front()? {
                Err(status) => Err(status),
                Ok(deferred) => s
                    .app
                    .acknowledge(deferred)
                    .await
                    .map(|o| convert::deduct_response(&o[0]))
                    .map_err(|e| Status::from(e.error)),
            }
            .map_err(|st| at_index(s.next, st));
            s.next += 1;
            // Stop after the first error, which tonic sends as the trailer.
            if reply.is_err() {
                s.done = true;
                s.ready.clear();
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
