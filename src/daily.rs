//! An account's usage by day: what the pack page's chart and
//! `packmeter usage ACCOUNT --daily` show.
//!
//! The ledger keeps usage per UTC hour ([`crate::ledger::UsageRow`]); a day
//! here is a calendar day in the billing zone, the same days the pack page
//! and the free-tier months use. An hour belongs to the day its start falls
//! in: with a zone whose offset is not a whole number of hours (+05:30), the
//! hour that straddles midnight counts for the day it starts in.
//!
//! Each day splits each item into what packs covered and what was overage,
//! summed in `u128`, so no sum of hourly rows (each below 2^63) can
//! overflow.

use chrono::{Days, NaiveDate};

use crate::{
    calendar::{BillingZone, Ts},
    packs::Item,
};

/// How many days the pack page's chart shows, and the CLI's default.
pub const DEFAULT_DAYS: u32 = 90;

/// The most days one request may ask for: two years, the longest an
/// account's free tier and the settled exports usually matter.
pub const MAX_DAYS: u32 = 731;

/// One item's usage in one day.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Split {
    /// Taken from packs (free tier or purchased).
    pub covered: u128,
    /// Billed pay-as-you-go.
    pub overage: u128,
}

impl Split {
    pub fn total(&self) -> u128 {
        self.covered + self.overage
    }
}

/// One day in the billing zone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Day {
    pub date: NaiveDate,
    pub calls: Split,
    pub egress_bytes: Split,
}

impl Day {
    pub fn item(&self, item: Item) -> &Split {
        match item {
            Item::Calls => &self.calls,
            Item::EgressBytes => &self.egress_bytes,
        }
    }

    fn item_mut(&mut self, item: Item) -> &mut Split {
        match item {
            Item::Calls => &mut self.calls,
            Item::EgressBytes => &mut self.egress_bytes,
        }
    }
}

/// One amount of usage: from a stored hourly row, or from a delta not yet
/// flushed.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// Start of the UTC hour.
    pub hour: Ts,
    pub item: Item,
    /// Whether a pack covered it (else it is overage).
    pub covered: bool,
    pub amount: u64,
}

/// The days a request covers: `days` whole days in `zone` ending with the
/// one that contains `now`, as (first day, start instant, end instant).
pub fn window(zone: &BillingZone, now: Ts, days: u32) -> (NaiveDate, Ts, Ts) {
    let today = zone.local_date(now);
    let first = today
        .checked_sub_days(Days::new(u64::from(days.max(1) - 1)))
        .unwrap_or(NaiveDate::MIN);
    let end = today
        .checked_add_days(Days::new(1))
        .map_or(Ts::MAX, |d| zone.start_of_day(d));
    (first, zone.start_of_day(first), end)
}

/// Sums `entries` into `days` consecutive days from `first`, oldest first.
/// Entries outside those days are left out; every day is present, with
/// zeros where nothing was used.
pub fn by_day(
    zone: &BillingZone,
    first: NaiveDate,
    days: u32,
    entries: impl IntoIterator<Item = Entry>,
) -> Vec<Day> {
    let mut out: Vec<Day> = first
        .iter_days()
        .take(days as usize)
        .map(|date| Day {
            date,
            calls: Split::default(),
            egress_bytes: Split::default(),
        })
        .collect();
    for e in entries {
        let date = zone.local_date(e.hour);
        let Ok(i) = usize::try_from((date - first).num_days()) else {
            continue;
        };
        let Some(day) = out.get_mut(i) else { continue };
        let split = day.item_mut(e.item);
        let amount = u128::from(e.amount);
        if e.covered {
            split.covered += amount;
        } else {
            split.overage += amount;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn zone(s: &str) -> BillingZone {
        s.parse().unwrap()
    }

    fn date(s: &str) -> NaiveDate {
        s.parse().unwrap()
    }

    fn at(rfc3339: &str) -> Ts {
        crate::calendar::from_datetime(&chrono::DateTime::parse_from_rfc3339(rfc3339).unwrap())
    }

    #[test]
    fn the_window_ends_with_the_local_day_that_holds_now() {
        let z = zone("+08:00");
        // 2026-12-05 18:30 UTC is 2026-12-06 02:30 at +08:00.
        let (first, start, end) = window(&z, at("2026-12-05T18:30:00Z"), 3);
        assert_eq!(first, date("2026-12-04"));
        assert_eq!(start, at("2026-12-04T00:00:00+08:00"));
        assert_eq!(end, at("2026-12-07T00:00:00+08:00"));
    }

    #[test]
    fn hours_fall_in_the_billing_zones_days_split_by_coverage() {
        let z = zone("+08:00");
        let first = date("2026-12-01");
        let e = |t: &str, item, covered, amount| Entry {
            hour: at(t),
            item,
            covered,
            amount,
        };
        let days = by_day(
            &z,
            first,
            3,
            [
                // 2026-11-30 23:00 local: the day before the window.
                e("2026-11-30T15:00:00Z", Item::Calls, true, 1_000),
                // 2026-12-01 07:00 local, twice, and overage.
                e("2026-11-30T23:00:00Z", Item::Calls, true, 5),
                e("2026-11-30T23:00:00Z", Item::Calls, true, 7),
                e("2026-11-30T23:00:00Z", Item::Calls, false, 2),
                // 2026-12-03 00:00 local: the last day.
                e("2026-12-02T16:00:00Z", Item::EgressBytes, false, u64::MAX),
                e("2026-12-02T17:00:00Z", Item::EgressBytes, false, u64::MAX),
                // 2026-12-04: after the window.
                e("2026-12-03T16:00:00Z", Item::Calls, true, 9),
            ],
        );
        assert_eq!(days.len(), 3);
        assert_eq!(days[0].date, date("2026-12-01"));
        assert_eq!(
            days[0].calls,
            Split {
                covered: 12,
                overage: 2
            }
        );
        assert_eq!(days[1].calls, Split::default());
        assert_eq!(days[1].date, date("2026-12-02"));
        // Two near-maximal rows add up without overflow.
        assert_eq!(
            days[2].egress_bytes.overage,
            2 * u128::from(u64::MAX),
            "summed in u128"
        );
        assert_eq!(days[2].calls.total(), 0);
    }

    #[test]
    fn a_half_hour_zone_counts_the_straddling_hour_for_the_day_it_starts_in() {
        let z = zone("+05:30");
        // 18:00 UTC is 23:30 local on the 1st; the hour runs into the 2nd.
        let days = by_day(
            &z,
            date("2026-12-01"),
            2,
            [Entry {
                hour: at("2026-12-01T18:00:00Z"),
                item: Item::Calls,
                covered: true,
                amount: 4,
            }],
        );
        assert_eq!(days[0].calls.covered, 4);
        assert_eq!(days[1].calls.covered, 0);
    }
}
