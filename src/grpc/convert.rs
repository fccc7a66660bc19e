//! Proto ⇄ domain conversions. Malformed input becomes INVALID_ARGUMENT with
//! the field's name.

use prost_types::{FieldMask, Timestamp};
use tonic::Status;

use super::proto;
use crate::{
    app::{AccountChange, Validity},
    calendar::{Ts, SECOND},
    ledger::{AccountRecord, UsageRow},
    meter::{Decision, DeductOutcome, ItemOutcome, PackView},
    packs::{Item, PackSource},
};

/// Reads a timestamp field; `None` when unset.
///
/// Inline, so that an unset field (most deductions carry no `at`) costs a
/// test, not a call returning a `Result` as large as a `Status` (about 15
/// instructions a batched deduction, callgrind).
#[inline]
pub fn ts(field: &str, t: Option<&Timestamp>) -> Result<Option<Ts>, Status> {
    match t {
        None => Ok(None),
        Some(t) => ts_set(field, t).map(Some),
    }
}

/// [`ts`] of a field that is set.
fn ts_set(field: &str, t: &Timestamp) -> Result<Ts, Status> {
    if !(0..1_000_000_000).contains(&t.nanos) {
        return Err(Status::invalid_argument(format!(
            "{field}: nanos {} is outside 0..1e9",
            t.nanos
        )));
    }
    // Years 0001–9999, as google.protobuf.Timestamp defines.
    if !(-62_135_596_800..=253_402_300_799).contains(&t.seconds) {
        return Err(Status::invalid_argument(format!(
            "{field}: seconds {} is outside years 0001–9999",
            t.seconds
        )));
    }
    Ok(t.seconds * SECOND + i64::from(t.nanos) / 1000)
}

pub fn timestamp(ts: Ts) -> Timestamp {
    Timestamp {
        seconds: ts.div_euclid(SECOND),
        nanos: i32::try_from(ts.rem_euclid(SECOND) * 1000).unwrap_or(0),
    }
}

/// Reads a `Validity`: calendar months, then seconds.
pub fn validity(field: &str, v: &proto::Validity) -> Result<Validity, Status> {
    let extra = i64::try_from(v.seconds)
        .ok()
        .and_then(|s| s.checked_mul(SECOND))
        .ok_or_else(|| {
            Status::invalid_argument(format!("{field}.seconds: {} is too long", v.seconds))
        })?;
    Ok(Validity::For {
        months: v.months,
        extra,
    })
}

pub fn item(field: &str, v: i32) -> Result<Item, Status> {
    match proto::Item::try_from(v) {
        Ok(proto::Item::Calls) => Ok(Item::Calls),
        Ok(proto::Item::EgressBytes) => Ok(Item::EgressBytes),
        Ok(proto::Item::Unspecified) => Err(Status::invalid_argument(format!(
            "{field}: is ITEM_UNSPECIFIED; use CALLS or EGRESS_BYTES"
        ))),
        Err(_) => Err(Status::invalid_argument(format!(
            "{field}: unknown value {v}; use CALLS (1) or EGRESS_BYTES (2)"
        ))),
    }
}

pub fn item_to_proto(i: Item) -> proto::Item {
    match i {
        Item::Calls => proto::Item::Calls,
        Item::EgressBytes => proto::Item::EgressBytes,
    }
}

pub fn source_to_proto(s: Option<PackSource>) -> proto::PackSource {
    match s {
        Some(PackSource::FreeTier) => proto::PackSource::FreeTier,
        Some(PackSource::Purchased) => proto::PackSource::Purchased,
        None => proto::PackSource::Unspecified,
    }
}

fn outcome(o: &ItemOutcome) -> proto::Outcome {
    proto::Outcome {
        covered: o.covered,
        overage: o.overage,
        remaining: o.remaining,
    }
}

pub fn deduct_response(o: &DeductOutcome) -> proto::DeductResponse {
    let (decision, reason) = match o.decision {
        // `String::new()`, not `"".to_string()`, which still went through
        // a copy of nothing (about 10 instructions a batched deduction).
        Decision::Allow => (proto::Decision::Allow, String::new()),
        Decision::Deny(r) => (proto::Decision::Deny, r.as_str().to_string()),
    };
    proto::DeductResponse {
        decision: decision as i32,
        calls: Some(outcome(&o.calls)),
        egress_bytes: Some(outcome(&o.egress_bytes)),
        duplicate: o.duplicate,
        deny_reason: reason,
    }
}

/// A pack as the API shows it; `zone` is the server's billing zone.
pub fn pack(v: &PackView, zone: &crate::calendar::BillingZone) -> proto::Pack {
    proto::Pack {
        pack_id: v.spec.pack_id.to_string(),
        account_id: v.account_id.clone(),
        source: source_to_proto(Some(v.spec.source)) as i32,
        item: item_to_proto(v.spec.item) as i32,
        capacity: v.spec.capacity,
        used: v.used,
        valid_from: Some(timestamp(v.spec.valid_from)),
        valid_until: Some(timestamp(v.spec.valid_until)),
        priority: v.spec.priority,
        billing_zone: zone.to_string(),
        plan: v.plan.as_deref().unwrap_or_default().to_string(),
    }
}

/// An account as the API shows it; `zone` is the server's billing zone.
pub fn account(r: &AccountRecord, zone: &crate::calendar::BillingZone) -> proto::Account {
    proto::Account {
        account_id: r.account_id.clone(),
        activated_at: r.activated_at.map(timestamp),
        suspended: r.suspended,
        deny_on_exhausted: r.deny_on_exhausted,
        billing_zone: zone.to_string(),
    }
}

/// The settings a `PutAccount` changes: those its `update_mask` names, or,
/// without a mask, the populated ones (AIP-134): an activation that is set,
/// flags that are true. A field outside the mask is never a change.
pub fn account_change(
    a: proto::Account,
    mask: Option<&FieldMask>,
) -> Result<AccountChange, Status> {
    let activated_at = ts("account.activated_at", a.activated_at.as_ref())?;
    let (mut set_activation, mut set_suspended, mut set_deny) = match mask {
        None => (activated_at.is_some(), a.suspended, a.deny_on_exhausted),
        Some(_) => (false, false, false),
    };
    for path in mask.map_or(&[][..], |m| &m.paths[..]) {
        match path.as_str() {
            "activated_at" => set_activation = true,
            "suspended" => set_suspended = true,
            "deny_on_exhausted" => set_deny = true,
            "*" => (set_activation, set_suspended, set_deny) = (true, true, true),
            other => {
                return Err(Status::invalid_argument(format!(
                    "update_mask: unknown path `{}`; use activated_at, suspended, \
                     deny_on_exhausted or *",
                    other.escape_debug()
                )))
            }
        }
    }
    if set_activation && activated_at.is_none() {
        return Err(Status::invalid_argument(
            "account.activated_at: is in update_mask but not set; an activation cannot be \
             cleared, so set it or leave it out of the mask",
        ));
    }
    Ok(AccountChange {
        account_id: a.account_id,
        activated_at: activated_at.filter(|_| set_activation),
        suspended: set_suspended.then_some(a.suspended),
        deny_on_exhausted: set_deny.then_some(a.deny_on_exhausted),
    })
}

pub fn usage_row(r: &UsageRow) -> proto::UsageRow {
    proto::UsageRow {
        account_id: r.account_id.clone(),
        hour: Some(timestamp(r.hour)),
        item: item_to_proto(r.item) as i32,
        pack_id: r.pack_id.clone(),
        source: source_to_proto(r.source) as i32,
        amount: r.amount,
        adjustment: r.adjustment.is_some(),
        plan: r
            .adjustment
            .as_ref()
            .map(|a| a.plan.clone())
            .unwrap_or_default(),
        signed_amount: r
            .adjustment
            .as_ref()
            .map_or_else(|| i64::try_from(r.amount).unwrap_or(i64::MAX), |a| a.amount),
    }
}
