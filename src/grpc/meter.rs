//! `packmeter.v1.Meter`: the hot path over gRPC.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::{convert, proto};
use crate::{
    calendar::{now_ts, Ts},
    drain::Drain,
    meter::{DeductOutcome, Deduction, Meter},
    metrics::Metrics,
};

pub struct MeterService {
    meter: Arc<Meter>,
    metrics: Arc<Metrics>,
    max_batch: usize,
    /// A DeductStream counts as in flight until it ends, so shutdown lets
    /// it finish (within the grace period).
    drain: Arc<Drain>,
}

impl MeterService {
    pub fn new(
        meter: Arc<Meter>,
        metrics: Arc<Metrics>,
        max_batch: usize,
        drain: Arc<Drain>,
    ) -> Self {
        MeterService {
            meter,
            metrics,
            max_batch,
            drain,
        }
    }
}

/// Converts and validates one request; changes nothing.
fn deduction(r: &proto::DeductRequest) -> Result<Deduction<'_>, Status> {
    Ok(Deduction {
        calls: r.calls,
        egress_bytes: r.egress_bytes,
        at: convert::ts("at", r.at.as_ref())?,
        request_id: &r.request_id,
    })
}

/// Adds the position of a bad element to its status, keeping the code.
fn at_index(i: usize, s: Status) -> Status {
    Status::new(s.code(), format!("deductions[{i}]: {}", s.message()))
}

/// One deduction, end to end. Shared by the unary, batch and stream RPCs.
pub(crate) async fn deduct_one(
    meter: &Meter,
    metrics: &Metrics,
    r: &proto::DeductRequest,
    now: Ts,
) -> Result<DeductOutcome, Status> {
    let d = deduction(r)?;
    meter.validate(&r.account_id, &d, now)?;
    let acct = meter.account_for_deduction(&r.account_id, now).await?;
    let o = meter.deduct(&acct, &d, now);
    metrics.record_deduction(&o);
    Ok(o)
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
        let o = deduct_one(&self.meter, &self.metrics, req.get_ref(), now_ts()).await?;
        Ok(Response::new(convert::deduct_response(&o)))
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
                "deductions: {} elements is over the maximum of {} per batch",
                reqs.len(),
                self.max_batch
            )));
        }
        let now = now_ts();
        let mut work = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let d = deduction(r).map_err(|s| at_index(i, s))?;
            self.meter
                .validate(&r.account_id, &d, now)
                .map_err(|e| at_index(i, e.into()))?;
            work.push(d);
        }
        let mut accounts = Vec::with_capacity(reqs.len());
        for (i, r) in reqs.iter().enumerate() {
            let acct = self
                .meter
                .account_for_deduction(&r.account_id, now)
                .await
                .map_err(|e| at_index(i, e.into()))?;
            accounts.push(acct);
        }
        let results = work
            .iter()
            .zip(&accounts)
            .map(|(d, acct)| {
                let o = self.meter.deduct(acct, d, now);
                self.metrics.record_deduction(&o);
                convert::deduct_response(&o)
            })
            .collect();
        Ok(Response::new(proto::DeductBatchResponse { results }))
    }

    type DeductStreamStream = DeductStream;

    /// Replies in order. A bad message ends the stream with its status;
    /// the deductions before it stand.
    #[tracing::instrument(level = "debug", skip_all)]
    async fn deduct_stream(
        &self,
        req: Request<Streaming<proto::DeductRequest>>,
    ) -> Result<Response<Self::DeductStreamStream>, Status> {
        let (meter, metrics) = (self.meter.clone(), self.metrics.clone());
        let in_flight = self.drain.enter();
        let out = req
            .into_inner()
            .enumerate()
            .then(move |(i, r)| {
                let (meter, metrics) = (meter.clone(), metrics.clone());
                async move {
                    let r = r?;
                    deduct_one(&meter, &metrics, &r, now_ts())
                        .await
                        .map(|o| convert::deduct_response(&o))
                        .map_err(|s| at_index(i, s))
                }
            })
            // Stop after the first error, which tonic sends as the trailer.
            .scan(false, move |failed, r| {
                // Owned by the stream: dropped when the stream ends.
                let _held = &in_flight;
                let stop = *failed;
                *failed = r.is_err();
                futures_util::future::ready((!stop).then_some(r))
            });
        Ok(Response::new(Box::pin(out)))
    }

    #[tracing::instrument(skip_all, fields(account = %req.get_ref().account_id))]
    async fn get_usage(
        &self,
        req: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        let now = now_ts();
        let r = req.get_ref();
        let at = convert::ts("at", r.at.as_ref())?.unwrap_or(now);
        let acct = self.meter.known_account(&r.account_id, now).await?;
        let stored = self
            .meter
            .store()
            .list_packs(&r.account_id)
            .await
            .map_err(crate::meter::MeterError::from)?;
        let packs = self
            .meter
            .pack_views(&acct, stored)
            .iter()
            .filter(|v| v.spec.valid_at(at))
            .map(convert::pack)
            .collect();
        Ok(Response::new(proto::GetUsageResponse { packs }))
    }
}
