//! `packmeter.v1.Admin`: accounts, packs, flush and settled exports.
//! Converts and calls [`App`], which owns every admin change.

use std::{pin::Pin, sync::Arc};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{convert, proto};
use crate::{
    app::{App, Grant, Validity},
    daily,
    meter::validate_account_id,
};

pub struct AdminService {
    app: Arc<App>,
    /// `--max-export-range`, in microseconds.
    max_export_range: crate::calendar::Ts,
}

impl AdminService {
    pub fn new(app: Arc<App>, max_export_range: crate::calendar::Ts) -> Self {
        AdminService {
            app,
            max_export_range,
        }
    }
}

type RowStream = Pin<Box<dyn Stream<Item = Result<proto::UsageRow, Status>> + Send>>;

/// A duration as the flag would be written: whole days as `731d`.
fn flag_duration(us: crate::calendar::Ts) -> String {
    const DAY: u64 = 86_400_000_000;
    let us = us.unsigned_abs();
    if us.is_multiple_of(DAY) {
        format!("{}d", us / DAY)
    } else {
        humantime::format_duration(std::time::Duration::from_micros(us)).to_string()
    }
}

/// A required field, or INVALID_ARGUMENT naming it.
fn required<T>(field: &str, v: Option<T>) -> Result<T, Status> {
    v.ok_or_else(|| Status::invalid_argument(format!("{field}: is required")))
}

/// Converts a `GrantPack` request; changes nothing. Public for the fuzz
/// targets (`fuzz/fuzz_targets/grpc_request.rs`), which run what the server runs.
#[doc(hidden)]
pub fn grant(r: proto::GrantPackRequest) -> Result<Grant, Status> {
    validate_account_id(&r.account_id)?;
    let until = convert::ts("valid_until", r.valid_until.as_ref())?;
    let validity = match (until, r.valid_for) {
        (Some(t), None) => Validity::Until(t),
        (None, Some(v)) => convert::validity("valid_for", &v)?,
        (Some(_), Some(_)) => {
            return Err(Status::invalid_argument(
                "valid_for: set valid_until or valid_for, not both",
            ))
        }
        (None, None) => {
            return Err(Status::invalid_argument(
                "valid_until: is required (or give valid_for)",
            ))
        }
    };
    Ok(Grant {
        item: convert::item("item", r.item)?,
        valid_from: convert::ts("valid_from", r.valid_from.as_ref())?,
        validity,
        account_id: r.account_id,
        pack_id: r.pack_id,
        capacity: r.capacity,
        priority: r.priority,
    })
}

/// Checks an `ExportUsage` request against `--max-export-range`: its
/// range and the account, if one is named. Changes nothing. Public for the
/// fuzz targets.
#[doc(hidden)]
pub fn export_range(
    r: proto::ExportUsageRequest,
    max_export_range: crate::calendar::Ts,
) -> Result<(crate::calendar::Ts, crate::calendar::Ts, Option<String>), Status> {
    let from = required("from", convert::ts("from", r.from.as_ref())?)?;
    let to = required("to", convert::ts("to", r.to.as_ref())?)?;
    if to < from {
        return Err(Status::invalid_argument("to: must not be before from"));
    }
    if to.saturating_sub(from) > max_export_range {
        return Err(Status::invalid_argument(format!(
            "to: the range from `from` to `to` is longer than the server's maximum of {} \
             (--max-export-range); export it in shorter ranges",
            flag_duration(max_export_range)
        )));
    }
    let account = (!r.account_id.is_empty()).then_some(r.account_id);
    if let Some(a) = &account {
        validate_account_id(a)?;
    }
    Ok((from, to, account))
}

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    /// Creates an account or changes the settings its `update_mask` names
    /// (without one: the populated fields, AIP-134); every other setting
    /// keeps its value.
    #[tracing::instrument(skip_all)]
    async fn put_account(
        &self,
        req: Request<proto::PutAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let r = req.into_inner();
        let a = required("account", r.account)?;
        validate_account_id(&a.account_id)?;
        let change = convert::account_change(a, r.update_mask.as_ref())?;
        let record = self.app.put_account(change).await?;
        Ok(Response::new(convert::account(
            &record,
            &self.app.config().zone,
        )))
    }

    #[tracing::instrument(skip_all)]
    async fn get_account(
        &self,
        req: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let record = self.app.get_account(&req.get_ref().account_id).await?;
        Ok(Response::new(convert::account(
            &record,
            &self.app.config().zone,
        )))
    }

    /// Grants a purchased pack. A repeated `pack_id` with the same terms
    /// returns the existing pack; with other terms it is ALREADY_EXISTS.
    /// The end is `valid_until`, or `valid_for` after `valid_from`.
    #[tracing::instrument(skip_all)]
    async fn grant_pack(
        &self,
        req: Request<proto::GrantPackRequest>,
    ) -> Result<Response<proto::Pack>, Status> {
        let grant = grant(req.into_inner())?;
        let view = self.app.grant_pack(grant).await?;
        Ok(Response::new(convert::pack(&view, &self.app.config().zone)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_packs(
        &self,
        req: Request<proto::ListPacksRequest>,
    ) -> Result<Response<proto::ListPacksResponse>, Status> {
        let packs = self
            .app
            .list_packs(&req.get_ref().account_id)
            .await?
            .iter()
            .map(|v| convert::pack(v, &self.app.config().zone))
            .collect();
        Ok(Response::new(proto::ListPacksResponse { packs }))
    }

    /// An account's usage by day (`days` 0 means [`daily::DEFAULT_DAYS`]).
    async fn get_daily_usage(
        &self,
        req: Request<proto::GetDailyUsageRequest>,
    ) -> Result<Response<proto::GetDailyUsageResponse>, Status> {
        let req = req.get_ref();
        let days = match req.days {
            0 => daily::DEFAULT_DAYS,
            n if n > daily::MAX_DAYS => {
                return Err(Status::invalid_argument(format!(
                    "days = {n} is over the maximum of {}; ask for fewer days",
                    daily::MAX_DAYS
                )))
            }
            n => n,
        };
        let days = self.app.daily_usage(&req.account_id, days).await?;
        let n = |v: u128| u64::try_from(v).unwrap_or(u64::MAX);
        Ok(Response::new(proto::GetDailyUsageResponse {
            zone: self.app.config().zone.to_string(),
            days: days
                .iter()
                .map(|d| proto::DailyUsage {
                    date: d.date.to_string(),
                    calls_covered: n(d.calls.covered),
                    calls_overage: n(d.calls.overage),
                    egress_bytes_covered: n(d.egress_bytes.covered),
                    egress_bytes_overage: n(d.egress_bytes.overage),
                })
                .collect(),
        }))
    }

    /// Returns once everything acknowledged before the call is durable.
    #[tracing::instrument(skip_all)]
    async fn flush(
        &self,
        _req: Request<proto::FlushRequest>,
    ) -> Result<Response<proto::FlushResponse>, Status> {
        let report = self.app.flush().await?;
        Ok(Response::new(proto::FlushResponse {
            accounts_flushed: report.accounts as u64,
        }))
    }

    type ExportUsageStream = RowStream;

    /// Streams settled rows: hours that are closed (R9), have nothing left
    /// unflushed, and that the settled mark closes to further deductions.
    /// Such rows never change again (R12).
    #[tracing::instrument(skip_all)]
    async fn export_usage(
        &self,
        req: Request<proto::ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        let (from, to, account) = export_range(req.into_inner(), self.max_export_range)?;
        // Read outside the flusher's lock, a page at a time as the client
        // takes rows: a slow client holds up neither flushes nor loads.
        let out = self.app.export(from, to, account).await.map(|row| {
            row.map(|row| convert::usage_row(&row))
                .map_err(Status::from)
        });
        Ok(Response::new(Box::pin(out)))
    }
}
