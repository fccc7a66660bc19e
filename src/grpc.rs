//! The gRPC edge: converts proto types to domain types and back, and maps
//! domain errors to status codes in one place.

pub mod admin;
pub mod codec;
pub mod convert;
pub mod envoy_rls;
pub mod meter;
pub mod noop;
pub mod rls_server;

use tonic::Status;

use crate::meter::MeterError;

/// Code generated from `proto/packmeter/v1/packmeter.proto`.
#[allow(clippy::all, clippy::pedantic, missing_docs)]
pub mod proto {
    tonic::include_proto!("packmeter.v1");

    /// The encoded descriptors, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("packmeter_descriptor");
}

/// Every status the server returns for a domain error comes from here.
impl From<MeterError> for Status {
    fn from(e: MeterError) -> Status {
        let msg = e.to_string();
        match e {
            // The request itself is malformed: retrying it cannot help.
            MeterError::InvalidAccountId(_)
            | MeterError::InvalidRequestId(_)
            | MeterError::AmountTooLarge { .. }
            | MeterError::TooFarInFuture { .. }
            | MeterError::InvalidPack(_) => Status::invalid_argument(msg),
            // Well-formed, but the system is not in a state to take it: the
            // hour is settled, or the account must be created first.
            // Or the account's usage fixes its activation (R1).
            MeterError::HourClosed { .. }
            | MeterError::UnknownAccount(_)
            | MeterError::ActivationLocked { .. } => Status::failed_precondition(msg),
            MeterError::NotFound(_) => Status::not_found(msg),
            MeterError::PackConflict(_) => Status::already_exists(msg),
            // Retryable: the original request is about to finish.
            MeterError::DuplicateInFlight(_) => Status::aborted(msg),
            // The account-hour's ledger is full: a quota of the store, which
            // the next hour no longer holds against the account.
            MeterError::LedgerFull { .. } => Status::resource_exhausted(msg),
            // The gateway should send the request to another node.
            MeterError::ShuttingDown => Status::unavailable(msg),
            // Not ready yet (start-up replays the journal): health says
            // NOT_SERVING, and the call may be retried here shortly or sent
            // to another node.
            MeterError::Starting => Status::unavailable(msg),
            // Nothing may be acknowledged that is not durable; another node
            // (or this one, once its disk takes writes again) can take it.
            MeterError::JournalUnavailable(_) => Status::unavailable(msg),
            // The store refuses data for good: an operator must look.
            MeterError::SetAside { .. } => Status::internal(msg),
            // UNAVAILABLE rather than INTERNAL or UNKNOWN: the store is
            // outside this process and may come back, and gateways (Envoy's
            // failure_mode_deny among them) treat UNAVAILABLE as retryable.
            MeterError::Store(_) => Status::unavailable(msg),
        }
    }
}

/// Refuses every call with UNAVAILABLE ([`MeterError::Starting`]) until
/// start-up is done: while the journal and the spill file are replayed, the
/// store (and so the meter's view of it) lacks acknowledged usage, and no
/// call may be answered from that state. Health and reflection are not
/// behind it. Once `started` is set it never clears (shutdown has its own
/// gate, [`crate::meter::gate::Gate`]).
#[derive(Clone)]
pub struct StartGate(pub std::sync::Arc<std::sync::atomic::AtomicBool>);

impl tonic::service::Interceptor for StartGate {
    fn call(&mut self, req: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if self.0.load(std::sync::atomic::Ordering::Acquire) {
            Ok(req)
        } else {
            Err(MeterError::Starting.into())
        }
    }
}
