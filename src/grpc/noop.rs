//! `serve --noop`: the benchmark baseline.
//!
//! These services answer every `Meter` and Envoy rate-limit RPC with a fixed
//! response of the same shape the real services send (one result per
//! deduction, one status per descriptor), without touching the meter. They
//! run behind the same tonic builder and layers as the real ones, so
//! `packmeter loadgen` against `serve` and against `serve --noop` isolates
//! what metering itself costs.

use std::pin::Pin;

use envoy_types::pb::{
    envoy::service::ratelimit::v3::{
        rate_limit_response::{rate_limit::Unit, Code, DescriptorStatus, RateLimit},
        RateLimitRequest, RateLimitResponse,
    },
    google::protobuf::Duration,
};
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use super::proto;
use super::rls_server::rate_limit_service_server::RateLimitService;

/// The fixed answers, built once.
pub struct NoopService {
    deduct: proto::DeductResponse,
    status: DescriptorStatus,
}

impl Default for NoopService {
    fn default() -> Self {
        let outcome = proto::Outcome {
            covered: 1,
            overage: 0,
            remaining: 999_999,
        };
        NoopService {
            deduct: proto::DeductResponse {
                decision: proto::Decision::Allow as i32,
                calls: Some(outcome),
                egress_bytes: Some(proto::Outcome::default()),
                duplicate: false,
                deny_reason: String::new(),
            },
            status: DescriptorStatus {
                code: Code::Ok as i32,
                current_limit: Some(RateLimit {
                    name: "calls".into(),
                    requests_per_unit: 1_000_000,
                    unit: Unit::Month as i32,
                }),
                limit_remaining: 999_999,
                duration_until_reset: Some(Duration {
                    seconds: 86_400,
                    nanos: 0,
                }),
                quota: None,
            },
        }
    }
}

type DeductStream = Pin<Box<dyn Stream<Item = Result<proto::DeductResponse, Status>> + Send>>;

#[tonic::async_trait]
impl proto::meter_server::Meter for NoopService {
    async fn deduct(
        &self,
        _req: Request<proto::DeductRequest>,
    ) -> Result<Response<proto::DeductResponse>, Status> {
        Ok(Response::new(self.deduct.clone()))
    }

    async fn deduct_batch(
        &self,
        req: Request<proto::DeductBatchRequest>,
    ) -> Result<Response<proto::DeductBatchResponse>, Status> {
        let n = req.get_ref().deductions.len();
        Ok(Response::new(proto::DeductBatchResponse {
            results: vec![self.deduct.clone(); n],
        }))
    }

    type DeductStreamStream = DeductStream;

    async fn deduct_stream(
        &self,
        req: Request<Streaming<proto::DeductRequest>>,
    ) -> Result<Response<Self::DeductStreamStream>, Status> {
        let answer = self.deduct.clone();
        let out = req.into_inner().map(move |r| r.map(|_| answer.clone()));
        Ok(Response::new(Box::pin(out)))
    }

    async fn get_usage(
        &self,
        _req: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::GetUsageResponse>, Status> {
        Ok(Response::new(proto::GetUsageResponse::default()))
    }
}

#[tonic::async_trait]
impl RateLimitService for NoopService {
    async fn should_rate_limit(
        &self,
        req: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let n = req.get_ref().descriptors.len();
        Ok(Response::new(RateLimitResponse {
            overall_code: Code::Ok as i32,
            statuses: vec![self.status.clone(); n],
            ..RateLimitResponse::default()
        }))
    }
}
