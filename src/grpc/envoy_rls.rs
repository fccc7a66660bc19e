//! `envoy.service.ratelimit.v3.RateLimitService`: Envoy's global rate-limit
//! protocol, answered from the account's packs.
//!
//! A request's descriptors are one all-or-nothing group through
//! [`App::deduct`], the path every deduction takes:
//!
//! - the entry whose key is `rls_account_key` (default `account`) names the
//!   account; a descriptor without it is INVALID_ARGUMENT;
//! - the entry whose key is `rls_item_key` (default `item`) names the item,
//!   `calls` or `egress_bytes`; `calls` when absent;
//! - the amount is the descriptor's `hits_addend` if set, else the request's
//!   `hits_addend`, where 0 means 1 as in Envoy. An amount of 0 (only a
//!   descriptor can say so) checks without deducting, like `Meter.Deduct`
//!   with nothing to deduct;
//! - other entries (`generic_key`, `remote_address`, …) are ignored, and so
//!   is a descriptor's `limit` override: the packs are the limit.
//!
//! The answer is OVER_LIMIT only where R7 denies (`Decision::Deny`). Running
//! out of packs is otherwise overage, billed, and OK. Envoy refuses the
//! whole request when one descriptor is over the limit, so then no
//! descriptor of it is deducted. A store failure or shutdown is
//! UNAVAILABLE, so Envoy's `failure_mode_deny` decides.

use std::sync::Arc;

use envoy_types::pb::{
    envoy::{
        config::core::v3::HeaderValue,
        extensions::common::ratelimit::v3::RateLimitDescriptor,
        service::ratelimit::v3::{
            rate_limit_response::{
                rate_limit::Unit, Code, DescriptorStatus, RateLimit as CurrentLimit,
            },
            RateLimitRequest, RateLimitResponse,
        },
    },
    google::protobuf::Duration as PbDuration,
};
use tonic::{Request, Response, Status};

use crate::grpc::rls_server::rate_limit_service_server::RateLimitService;
use crate::{
    app::{App, DeductRequest, Refused},
    calendar::{Ts, SECOND},
    config::RlsConfig,
    meter::{Atomicity, Decision, DeductOutcome, Deduction},
    packs::Item,
};

/// The response header that carries why a descriptor was denied.
const DENY_REASON_HEADER: &str = "x-packmeter-deny-reason";

pub struct RlsService {
    app: Arc<App>,
    mapping: RlsConfig,
    /// For each answer's reset time (the next month's start).
    month: crate::calendar::MonthCache,
}

impl RlsService {
    pub fn new(app: Arc<App>, mapping: RlsConfig) -> Self {
        RlsService {
            app,
            mapping,
            month: Default::default(),
        }
    }
}

/// One descriptor, mapped to the domain.
#[doc(hidden)]
pub struct Wanted<'a> {
    pub account_id: &'a str,
    pub item: Item,
    pub deduction: Deduction<'a>,
}

/// What a request's descriptors ask for, in their order. Inline for one
/// descriptor, what Envoy sends per request in the common setup: the
/// handler's two lists then allocate nothing (about 90 instructions a
/// call, callgrind).
#[doc(hidden)]
pub type WantedList<'a> = smallvec::SmallVec<[Wanted<'a>; 1]>;

/// Adds the descriptor's position to a status, keeping the code.
fn at_index(i: usize, s: Status) -> Status {
    Status::new(s.code(), format!("descriptors[{i}]: {}", s.message()))
}

/// Maps one descriptor to an account, an item and an amount. Changes nothing.
fn map_descriptor<'a>(
    mapping: &RlsConfig,
    d: &'a RateLimitDescriptor,
    request_hits: u32,
) -> Result<Wanted<'a>, Status> {
    let mut account_id = None;
    let mut item_name = None;
    for e in &d.entries {
        let slot = if e.key == mapping.account_key {
            &mut account_id
        } else if e.key == mapping.item_key {
            &mut item_name
        } else {
            continue;
        };
        // Two values for one key would make the deduction ambiguous.
        if slot.replace(e.value.as_str()).is_some() {
            return Err(Status::invalid_argument(format!(
                "entry `{}` appears more than once",
                e.key
            )));
        }
    }
    let account_id = account_id.ok_or_else(|| {
        Status::invalid_argument(format!(
            "has no `{}` entry naming the account",
            mapping.account_key
        ))
    })?;
    let item = match item_name {
        None | Some("calls") => Item::Calls,
        Some("egress_bytes") => Item::EgressBytes,
        Some(other) => {
            return Err(Status::invalid_argument(format!(
                "entry `{}`: unknown item `{other}`; use calls or egress_bytes",
                mapping.item_key
            )))
        }
    };
    if d.is_negative_hits {
        // Giving usage back would let a client refill packs it has used.
        return Err(Status::invalid_argument(
            "is_negative_hits is not supported: recorded usage is never given back",
        ));
    }
    // Descriptor first; then the request, where 0 means "not set", i.e. 1.
    let amount = match &d.hits_addend {
        Some(h) => h.value,
        None => u64::from(request_hits.max(1)),
    };
    let deduction = match item {
        Item::Calls => Deduction {
            calls: amount,
            ..Deduction::default()
        },
        Item::EgressBytes => Deduction {
            egress_bytes: amount,
            ..Deduction::default()
        },
    };
    Ok(Wanted {
        account_id,
        item,
        deduction,
    })
}

/// Checks a request's domain and maps every descriptor. Changes nothing.
/// Public for the fuzz targets (`fuzz/fuzz_targets/grpc_request.rs`).
#[doc(hidden)]
pub fn map_request<'a>(
    mapping: &RlsConfig,
    r: &'a RateLimitRequest,
) -> Result<WantedList<'a>, Status> {
    if let Some(want) = &mapping.domain {
        if &r.domain != want {
            return Err(Status::invalid_argument(format!(
                "domain: `{}` is not the configured rls_domain `{want}`",
                r.domain
            )));
        }
    }
    if r.descriptors.is_empty() {
        return Err(Status::invalid_argument(
            "descriptors: is empty; send at least one",
        ));
    }
    let mut wanted = WantedList::with_capacity(r.descriptors.len());
    for (i, d) in r.descriptors.iter().enumerate() {
        wanted.push(map_descriptor(mapping, d, r.hits_addend).map_err(|s| at_index(i, s))?);
    }
    Ok(wanted)
}

fn status(item: Item, o: &DeductOutcome, until_reset: &PbDuration) -> DescriptorStatus {
    let item_outcome = match item {
        Item::Calls => &o.calls,
        Item::EgressBytes => &o.egress_bytes,
    };
    let code = match o.decision {
        Decision::Allow => Code::Ok,
        Decision::Deny(_) => Code::OverLimit,
    };
    DescriptorStatus {
        code: code as i32,
        current_limit: Some(CurrentLimit {
            name: item.as_str().to_string(),
            requests_per_unit: u32::try_from(item_outcome.limit).unwrap_or(u32::MAX),
            unit: Unit::Month as i32,
        }),
        limit_remaining: u32::try_from(item_outcome.remaining).unwrap_or(u32::MAX),
        duration_until_reset: Some(*until_reset),
        quota: None,
    }
}

#[tonic::async_trait]
impl RateLimitService for RlsService {
    /// All descriptors are mapped and validated, and their accounts
    /// loaded, before anything is deducted, so a bad one changes nothing.
    /// If R7 denies one descriptor, none is deducted: Envoy refuses the
    /// whole request, so charging the others would bill refused traffic.
    // Debug, not info: an enabled span costs about 1.3 µs per request
    // (10% of a unary RPC on loopback), measured with `packmeter loadgen`.
    #[tracing::instrument(level = "debug", skip_all, fields(n = req.get_ref().descriptors.len()))]
    async fn should_rate_limit(
        &self,
        req: Request<RateLimitRequest>,
    ) -> Result<Response<RateLimitResponse>, Status> {
        let r = req.get_ref();
        let wanted = map_request(&self.mapping, r)?;
        let group: smallvec::SmallVec<[DeductRequest<'_>; 1]> = wanted
            .iter()
            .map(|w| DeductRequest {
                account_id: w.account_id,
                deduction: w.deduction,
            })
            .collect();
        let outcomes = self
            .app
            .deduct(&group, Atomicity::AllOrNothing)
            .await
            .map_err(|Refused { index, error }| at_index(index, error.into()))?;

        let now = self.app.now();
        let reset = self.month.next_month_start(&self.app.config().zone, now);
        let until_reset = duration(reset.saturating_sub(now));
        let denied = outcomes.iter().find_map(|o| match o.decision {
            Decision::Deny(reason) => Some(reason),
            Decision::Allow => None,
        });
        let response_headers_to_add = denied
            .map(|reason| HeaderValue {
                key: DENY_REASON_HEADER.into(),
                value: reason.as_str().into(),
                raw_value: Vec::new(),
            })
            .into_iter()
            .collect();
        let overall = if denied.is_some() {
            Code::OverLimit
        } else {
            Code::Ok
        };
        let statuses = wanted
            .iter()
            .zip(&outcomes)
            .map(|(w, o)| status(w.item, o, &until_reset))
            .collect();
        Ok(Response::new(RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add,
            ..RateLimitResponse::default()
        }))
    }
}

/// A non-negative span in microseconds as a protobuf duration.
fn duration(us: Ts) -> PbDuration {
    let us = us.max(0);
    PbDuration {
        seconds: us / SECOND,
        // Under 10^9, so it fits.
        nanos: i32::try_from((us % SECOND) * 1000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use envoy_types::pb::{
        envoy::extensions::common::ratelimit::v3::rate_limit_descriptor::Entry,
        google::protobuf::UInt64Value,
    };

    fn descriptor(entries: &[(&str, &str)], hits: Option<u64>) -> RateLimitDescriptor {
        RateLimitDescriptor {
            entries: entries
                .iter()
                .map(|(k, v)| Entry {
                    key: (*k).into(),
                    value: (*v).into(),
                })
                .collect(),
            hits_addend: hits.map(|value| UInt64Value { value }),
            ..RateLimitDescriptor::default()
        }
    }

    #[test]
    fn descriptor_hits_win_over_request_hits_and_request_zero_means_one() {
        let m = RlsConfig::default();
        let d = descriptor(&[("account", "a")], Some(7));
        assert_eq!(map_descriptor(&m, &d, 3).unwrap().deduction.calls, 7);
        let d = descriptor(&[("account", "a")], None);
        assert_eq!(map_descriptor(&m, &d, 3).unwrap().deduction.calls, 3);
        assert_eq!(map_descriptor(&m, &d, 0).unwrap().deduction.calls, 1);
    }

    #[test]
    fn the_item_entry_picks_egress_and_unknown_items_are_refused() {
        let m = RlsConfig::default();
        let d = descriptor(&[("account", "a"), ("item", "egress_bytes")], Some(512));
        let w = map_descriptor(&m, &d, 0).unwrap();
        assert_eq!(
            (w.item, w.deduction.calls, w.deduction.egress_bytes),
            (Item::EgressBytes, 0, 512)
        );
        let d = descriptor(&[("account", "a"), ("item", "gpu")], None);
        let e = map_descriptor(&m, &d, 0).err().unwrap();
        assert_eq!(e.code(), tonic::Code::InvalidArgument);
        assert!(e.message().contains("gpu"), "{}", e.message());
    }

    #[test]
    fn configured_keys_name_account_and_item_and_others_are_ignored() {
        let m = RlsConfig {
            domain: None,
            account_key: "tenant".into(),
            item_key: "kind".into(),
        };
        let d = descriptor(
            &[("generic_key", "x"), ("tenant", "t1"), ("kind", "calls")],
            None,
        );
        let w = map_descriptor(&m, &d, 0).unwrap();
        assert_eq!((w.account_id, w.item), ("t1", Item::Calls));
        let d = descriptor(&[("account", "a")], None);
        let e = map_descriptor(&m, &d, 0).err().unwrap();
        assert!(e.message().contains("`tenant`"), "{}", e.message());
    }

    #[test]
    fn a_repeated_account_entry_or_negative_hits_is_refused() {
        let m = RlsConfig::default();
        let d = descriptor(&[("account", "a"), ("account", "b")], None);
        assert!(map_descriptor(&m, &d, 0).is_err());
        let mut d = descriptor(&[("account", "a")], Some(1));
        d.is_negative_hits = true;
        assert!(map_descriptor(&m, &d, 0).is_err());
    }

    #[test]
    fn durations_split_into_seconds_and_nanos() {
        let d = duration(3 * SECOND + 250);
        assert_eq!((d.seconds, d.nanos), (3, 250_000));
        assert_eq!(duration(-5).seconds, 0);
    }
}
