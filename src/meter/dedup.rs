//! Remembered request ids (R10).
//!
//! An id is claimed before its deduction runs and completed with the
//! deduction's result once it is in the ledger. A claim that is still open
//! (the original is in flight) is reported as such, never answered with a
//! made-up outcome: the caller retries and gets the original's result.
//!
//! An id is kept until the later of two moments: `dedup_window` after it
//! was processed, and the close of its event's hour. Until its hour closes
//! the event itself is still acceptable (R9), so forgetting the id earlier
//! would bill a late retry twice.

use std::collections::HashMap;

use crate::{
    calendar::{Ts, SECOND},
    ledger::DedupRecord,
};

/// What a deduction did, as a duplicate is told: calls covered and
/// overage, egress covered and overage.
pub type Amounts = [u64; 4];

/// A remembered request id. `result` is `None` while its deduction is in
/// flight.
#[derive(Debug)]
struct Entry {
    expires_at: Ts,
    result: Option<Amounts>,
}

#[derive(Debug, Default)]
pub struct DedupTable {
    entries: HashMap<Box<str>, Entry>,
    next_prune: Ts,
}

/// What a claim found.
#[derive(Debug, PartialEq, Eq)]
pub enum Claim {
    /// Not seen: claimed for this deduction.
    Fresh,
    /// Seen and done: the original's amounts.
    Duplicate(Amounts),
    /// Claimed by a deduction that has not finished.
    InFlight,
}

impl DedupTable {
    /// Claims `id` for a deduction at `now`, unless it is remembered.
    pub fn claim(&mut self, id: &str, now: Ts, expires_at: Ts, prune_every: Ts) -> Claim {
        if now >= self.next_prune {
            self.entries
                .retain(|_, e| e.expires_at > now || e.result.is_none());
            self.next_prune = now.saturating_add(prune_every.max(SECOND));
        }
        match self.entries.get(id) {
            Some(e) if e.expires_at > now || e.result.is_none() => match e.result {
                Some(r) => Claim::Duplicate(r),
                None => Claim::InFlight,
            },
            _ => {
                self.entries.insert(
                    id.into(),
                    Entry {
                        expires_at,
                        result: None,
                    },
                );
                Claim::Fresh
            }
        }
    }

    /// Records the result of a claimed id's deduction.
    pub fn complete(&mut self, id: &str, result: Amounts) {
        if let Some(e) = self.entries.get_mut(id) {
            e.result = Some(result);
        }
    }

    /// Forgets a claim whose deduction was denied or abandoned: a denial
    /// does not consume its request id.
    pub fn release(&mut self, id: &str) {
        if self.entries.get(id).is_some_and(|e| e.result.is_none()) {
            self.entries.remove(id);
        }
    }

    /// Remembers an id loaded from the store.
    pub fn remember(&mut self, r: DedupRecord) {
        let result = [
            r.calls_covered,
            r.calls_overage,
            r.egress_covered,
            r.egress_overage,
        ];
        self.entries.insert(
            r.request_id,
            Entry {
                expires_at: r.expires_at,
                result: Some(result),
            },
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_in_flight_is_reported_not_answered() {
        let mut t = DedupTable::default();
        assert_eq!(t.claim("r", 0, 100, SECOND), Claim::Fresh);
        assert_eq!(t.claim("r", 1, 100, SECOND), Claim::InFlight);
        t.complete("r", [1, 2, 3, 4]);
        assert_eq!(t.claim("r", 2, 100, SECOND), Claim::Duplicate([1, 2, 3, 4]));
        // Expired: claimed afresh.
        assert_eq!(t.claim("r", 100, 200, SECOND), Claim::Fresh);
    }

    #[test]
    fn a_released_claim_is_forgotten_but_a_completed_one_is_not() {
        let mut t = DedupTable::default();
        t.claim("a", 0, 100, SECOND);
        t.release("a");
        assert_eq!(t.claim("a", 1, 100, SECOND), Claim::Fresh);
        t.complete("a", [1, 0, 0, 0]);
        t.release("a");
        assert_eq!(t.claim("a", 2, 100, SECOND), Claim::Duplicate([1, 0, 0, 0]));
        assert_eq!(t.entries.len(), 1);
    }
}
