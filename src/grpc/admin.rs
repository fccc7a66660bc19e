//! `packmeter.v1.Admin`: accounts, packs, flush and settled exports.

use std::{
    pin::Pin,
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc,
    },
};

use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::{convert, proto};
use crate::{
    calendar::{hour_start, now_ts, Ts},
    export,
    flush::Flusher,
    ledger::AccountRecord,
    meter::{validate_account_id, Meter, MeterError, MAX_ACCOUNT_ID_BYTES},
    packs::{PackSource, PackSpec},
    store::Granted,
};

pub struct AdminService {
    meter: Arc<Meter>,
    flusher: Arc<Flusher>,
    /// Serializes operator writes, so the store and memory apply them in
    /// the same order. Held across the store's await.
    writes: tokio::sync::Mutex<()>,
    next_pack: AtomicU64,
}

impl AdminService {
    pub fn new(meter: Arc<Meter>, flusher: Arc<Flusher>) -> Self {
        AdminService {
            meter,
            flusher,
            writes: tokio::sync::Mutex::new(()),
            next_pack: AtomicU64::new(0),
        }
    }

    /// A fresh pack id: the grant instant and a per-process counter.
    fn new_pack_id(&self, now: Ts) -> String {
        let n = self.next_pack.fetch_add(1, Ordering::Relaxed);
        format!("pk-{now:x}-{n:x}")
    }
}

fn validate_pack_id(id: &str) -> Result<(), Status> {
    if id.len() > MAX_ACCOUNT_ID_BYTES {
        return Err(Status::invalid_argument(
            "pack_id: is longer than 128 bytes",
        ));
    }
    if id.chars().any(char::is_control) {
        return Err(Status::invalid_argument(
            "pack_id: contains a control character",
        ));
    }
    if id.starts_with("free-") {
        return Err(Status::invalid_argument(
            "pack_id: the prefix `free-` is reserved for free-tier packs",
        ));
    }
    Ok(())
}

/// Whether a stored pack has the terms a repeated grant asks for. A retry
/// that left `valid_from` unset ("from now") matches whatever instant the
/// first grant resolved it to.
fn same_terms(stored: &PackSpec, asked: &PackSpec, from_given: bool) -> bool {
    (
        stored.item,
        stored.capacity,
        stored.valid_until,
        stored.priority,
    ) == (
        asked.item,
        asked.capacity,
        asked.valid_until,
        asked.priority,
    ) && (!from_given || stored.valid_from == asked.valid_from)
}

type RowStream = Pin<Box<dyn Stream<Item = Result<proto::UsageRow, Status>> + Send>>;

#[tonic::async_trait]
impl proto::admin_server::Admin for AdminService {
    /// Creates or replaces the account's settings. An unset `activated_at`
    /// keeps the current activation, or activates the account now.
    #[tracing::instrument(skip_all)]
    async fn put_account(
        &self,
        req: Request<proto::PutAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let now = now_ts();
        let a = req
            .into_inner()
            .account
            .ok_or_else(|| Status::invalid_argument("account: is required"))?;
        validate_account_id(&a.account_id)?;
        let activated_at = convert::ts("account.activated_at", a.activated_at.as_ref())?;
        let _w = self.writes.lock().await;
        let acct = self.meter.account_for_admin(&a.account_id, now).await?;
        let record = AccountRecord {
            account_id: a.account_id,
            activated_at: activated_at.or(acct.activated_at()).or(Some(now)),
            suspended: a.suspended,
            deny_on_exhausted: a.deny_on_exhausted,
        };
        self.meter
            .store()
            .put_account(&record)
            .await
            .map_err(MeterError::from)?;
        self.meter.apply_account(&acct, &record, now);
        Ok(Response::new(convert::account(&record)))
    }

    #[tracing::instrument(skip_all)]
    async fn get_account(
        &self,
        req: Request<proto::GetAccountRequest>,
    ) -> Result<Response<proto::Account>, Status> {
        let acct = self
            .meter
            .known_account(&req.get_ref().account_id, now_ts())
            .await?;
        Ok(Response::new(convert::account(&acct.record())))
    }

    /// Grants a purchased pack. A repeated `pack_id` with the same terms
    /// returns the existing pack; with other terms it is ALREADY_EXISTS.
    #[tracing::instrument(skip_all)]
    async fn grant_pack(
        &self,
        req: Request<proto::GrantPackRequest>,
    ) -> Result<Response<proto::Pack>, Status> {
        let now = now_ts();
        let r = req.into_inner();
        validate_account_id(&r.account_id)?;
        let item = convert::item("item", r.item)?;
        if r.capacity == 0 {
            return Err(Status::invalid_argument("capacity: must be at least 1"));
        }
        if i64::try_from(r.capacity).is_err() {
            return Err(Status::invalid_argument("capacity: must be below 2^63"));
        }
        validate_pack_id(&r.pack_id)?;
        let from_given = r.valid_from.is_some();
        let valid_from = convert::ts("valid_from", r.valid_from.as_ref())?.unwrap_or(now);
        let valid_until = convert::ts("valid_until", r.valid_until.as_ref())?
            .ok_or_else(|| Status::invalid_argument("valid_until: is required"))?;
        if valid_until <= valid_from {
            return Err(Status::invalid_argument(
                "valid_until: must be after valid_from (valid_until is exclusive)",
            ));
        }
        let spec = PackSpec {
            pack_id: if r.pack_id.is_empty() {
                self.new_pack_id(now).into()
            } else {
                r.pack_id.as_str().into()
            },
            source: PackSource::Purchased,
            item,
            capacity: r.capacity,
            valid_from,
            valid_until,
            priority: r.priority,
            created_at: now,
        };
        let _w = self.writes.lock().await;
        let acct = self.meter.account_for_admin(&r.account_id, now).await?;
        let granted = self
            .meter
            .store()
            .grant_pack(&r.account_id, &spec)
            .await
            .map_err(MeterError::from)?;
        let stored = match granted {
            Granted::New(p) => {
                self.meter.add_pack(&acct, &p, now);
                p
            }
            Granted::Existing(p) if same_terms(&p.spec, &spec, from_given) => p,
            Granted::Existing(p) => {
                return Err(MeterError::PackConflict(p.spec.pack_id.to_string()).into())
            }
        };
        let view = self
            .meter
            .pack_views(&acct, vec![stored.clone()])
            .into_iter()
            .find(|v| v.spec.pack_id == stored.spec.pack_id)
            .ok_or_else(|| Status::internal("granted pack vanished"))?;
        Ok(Response::new(convert::pack(&view)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_packs(
        &self,
        req: Request<proto::ListPacksRequest>,
    ) -> Result<Response<proto::ListPacksResponse>, Status> {
        let id = &req.get_ref().account_id;
        let acct = self.meter.known_account(id, now_ts()).await?;
        let stored = self
            .meter
            .store()
            .list_packs(id)
            .await
            .map_err(MeterError::from)?;
        let packs = self
            .meter
            .pack_views(&acct, stored)
            .iter()
            .map(convert::pack)
            .collect();
        Ok(Response::new(proto::ListPacksResponse { packs }))
    }

    /// Returns once everything acknowledged before the call is durable.
    #[tracing::instrument(skip_all)]
    async fn flush(
        &self,
        _req: Request<proto::FlushRequest>,
    ) -> Result<Response<proto::FlushResponse>, Status> {
        let report = self.flusher.flush().await.map_err(MeterError::from)?;
        Ok(Response::new(proto::FlushResponse {
            accounts_flushed: report.accounts as u64,
        }))
    }

    type ExportUsageStream = RowStream;

    /// Streams settled rows: hours that are closed (R9) and have nothing
    /// left unflushed. Such rows never change again (R12).
    #[tracing::instrument(skip_all)]
    async fn export_usage(
        &self,
        req: Request<proto::ExportUsageRequest>,
    ) -> Result<Response<Self::ExportUsageStream>, Status> {
        let r = req.into_inner();
        let from = convert::ts("from", r.from.as_ref())?
            .ok_or_else(|| Status::invalid_argument("from: is required"))?;
        let to = convert::ts("to", r.to.as_ref())?
            .ok_or_else(|| Status::invalid_argument("to: is required"))?;
        if to < from {
            return Err(Status::invalid_argument("to: must not be before from"));
        }
        let account = (!r.account_id.is_empty()).then_some(r.account_id);
        if let Some(a) = &account {
            validate_account_id(a)?;
        }
        let meter = &self.meter;
        let settled = self
            .flusher
            .quiesced(async {
                let now = now_ts();
                // Hours before this have closed ...
                let mut settled = hour_start(now.saturating_sub(meter.config().late_grace));
                // ... and are settled once nothing of theirs waits for a flush.
                if let Some(h) = meter.oldest_pending_hour() {
                    settled = settled.min(h);
                }
                settled
            })
            .await;
        // Read outside the flusher's lock, a page at a time as the client
        // takes rows: rows before `settled` no longer change, and a slow
        // client holds up neither flushes nor account loads.
        let out = export::settled_rows(
            meter.store().clone(),
            from,
            to.min(settled),
            account,
            export::PAGE_ROWS,
        )
        .map(|row| {
            row.map(|row| convert::usage_row(&row))
                .map_err(|e| MeterError::from(e).into())
        });
        Ok(Response::new(Box::pin(out)))
    }
}
