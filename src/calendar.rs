//! The billing calendar (R2–R4): the free window and its monthly packs.
//!
//! Every calendar cut (start of a month, end of a day) is made in the
//! [`BillingZone`]; every instant is a [`Ts`], microseconds since the Unix
//! epoch in UTC. Month *n* is always computed as `anchor + n months` from the
//! activation month, never by adding one month repeatedly, so month ends and
//! 29 February come out right.
//!
//! The seed document's example: activation at 2019-11-10 17:13:14 +08:00
//! gives 13 monthly packs, the last one ending at 00:00 on 11 November 2020.
//!
//! ```
//! use packmeter::calendar::{free_months, from_datetime, BillingZone, FreeTierPlan};
//!
//! let at = |s| from_datetime(&chrono::DateTime::parse_from_rfc3339(s).unwrap());
//! let activation = at("2019-11-10T17:13:14+08:00");
//! let months = free_months(activation, &FreeTierPlan::default(), &BillingZone::default());
//! assert_eq!(months.len(), 13);
//! assert_eq!(months[1].valid_from, at("2019-12-01T00:00:00+08:00"));
//! assert_eq!(months[12].valid_until, at("2020-11-11T00:00:00+08:00"));
//! ```

use std::{fmt, str::FromStr};

use chrono::{
    DateTime, Datelike, FixedOffset, LocalResult, Months, NaiveDate, NaiveDateTime, NaiveTime,
    TimeZone, Utc,
};

/// An instant: microseconds since 1970-01-01T00:00:00Z.
pub type Ts = i64;

/// Microseconds in one second.
pub const SECOND: Ts = 1_000_000;
/// Microseconds in one hour.
pub const HOUR: Ts = 3_600 * SECOND;

/// Converts a [`Ts`] to a chrono UTC instant. Out-of-range values clamp to
/// chrono's limits rather than panic.
pub fn to_datetime(ts: Ts) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(ts).unwrap_or(if ts < 0 {
        DateTime::<Utc>::MIN_UTC
    } else {
        DateTime::<Utc>::MAX_UTC
    })
}

/// Converts a chrono instant to a [`Ts`].
pub fn from_datetime<Tz: TimeZone>(dt: &DateTime<Tz>) -> Ts {
    dt.timestamp_micros()
}

/// The server clock. Only the edges (gRPC handlers, the flusher) read it;
/// the domain takes time as a parameter.
///
/// Read from `SystemTime` directly: `Utc::now()` also builds a calendar
/// date, which cost about 250 instructions of the ~360 a clock read took
/// (callgrind), and a stream message reads the clock three times.
pub fn now_ts() -> Ts {
    use std::time::{SystemTime, UNIX_EPOCH};
    let micros = |d: std::time::Duration| Ts::try_from(d.as_micros()).unwrap_or(Ts::MAX);
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(after) => micros(after),
        Err(before) => -micros(before.duration()),
    }
}

/// Start of the UTC hour holding `ts`. Settlement rows (R12) are keyed by it.
pub fn hour_start(ts: Ts) -> Ts {
    ts.div_euclid(HOUR) * HOUR
}

/// The zone in which months and days are cut: a fixed offset or an IANA zone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingZone {
    Fixed(FixedOffset),
    Named(chrono_tz::Tz),
}

/// Why a zone string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{0}` is neither a UTC offset like +08:00 nor an IANA zone name like Asia/Shanghai")]
pub struct InvalidZone(pub String);

impl Default for BillingZone {
    /// UTC+08:00, the provider's own zone.
    fn default() -> Self {
        BillingZone::Fixed(FixedOffset::east_opt(8 * 3600).expect("+08:00 is a valid offset"))
    }
}

impl FromStr for BillingZone {
    type Err = InvalidZone;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("z") {
            return Ok(BillingZone::Fixed(
                FixedOffset::east_opt(0).expect("0 is valid"),
            ));
        }
        let signed = (t.strip_prefix('+').map(|rest| (rest, false)))
            .or_else(|| t.strip_prefix('-').map(|rest| (rest, true)));
        if let Some((rest, negative)) = signed {
            return parse_offset(rest, negative)
                .map(BillingZone::Fixed)
                .ok_or_else(|| InvalidZone(s.to_string()));
        }
        t.parse::<chrono_tz::Tz>()
            .map(BillingZone::Named)
            .map_err(|_| InvalidZone(s.to_string()))
    }
}

/// Parses `HH:MM`, `HHMM` or `HH` (after the sign) into an offset of less
/// than 24 hours either way (chrono's range for a [`FixedOffset`]).
///
/// Matches on bytes, never slicing the `str`: `rest` is user input, and a
/// byte index inside a multibyte character (`+0é0`) would panic. Non-ASCII
/// bytes are simply not digits.
fn parse_offset(rest: &str, negative: bool) -> Option<FixedOffset> {
    let two_digits = |[tens, ones]: [u8; 2]| -> Option<i32> {
        (tens.is_ascii_digit() && ones.is_ascii_digit())
            .then(|| i32::from(tens - b'0') * 10 + i32::from(ones - b'0'))
    };
    let (h, m) = match *rest.as_bytes() {
        [h1, h2] => ([h1, h2], [b'0', b'0']),
        [h1, h2, m1, m2] | [h1, h2, b':', m1, m2] => ([h1, h2], [m1, m2]),
        _ => return None,
    };
    let (h, m) = (two_digits(h)?, two_digits(m)?);
    if m >= 60 {
        return None;
    }
    let secs = (h * 3600 + m * 60) * if negative { -1 } else { 1 };
    FixedOffset::east_opt(secs)
}

impl fmt::Display for BillingZone {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BillingZone::Fixed(o) => write!(f, "{o}"),
            BillingZone::Named(tz) => write!(f, "{}", tz.name()),
        }
    }
}

impl BillingZone {
    /// The local calendar date of `ts` in this zone.
    pub fn local_date(&self, ts: Ts) -> NaiveDate {
        let dt = to_datetime(ts);
        match self {
            BillingZone::Fixed(o) => dt.with_timezone(o).date_naive(),
            BillingZone::Named(tz) => dt.with_timezone(tz).date_naive(),
        }
    }

    /// The first instant of local date `d`. Where midnight falls in a DST gap
    /// (some zones have changed clocks at 00:00), the day starts at the first
    /// local time that exists.
    pub fn start_of_day(&self, d: NaiveDate) -> Ts {
        let midnight = d.and_time(NaiveTime::MIN);
        match self {
            BillingZone::Fixed(o) => first_valid(o, midnight),
            BillingZone::Named(tz) => first_valid(tz, midnight),
        }
    }

    /// The start of the calendar month holding `ts`.
    pub fn month_start(&self, ts: Ts) -> Ts {
        let d = self.local_date(ts);
        self.start_of_day(first_of_month(d))
    }

    /// The start of the calendar month after the one holding `ts`: when the
    /// free-tier counters reset (R4).
    pub fn next_month_start(&self, ts: Ts) -> Ts {
        let d = first_of_month(self.local_date(ts));
        self.start_of_day(add_months(d, 1))
    }

    /// `ts + n` calendar months in this zone: the same local time of day on
    /// the same day of the month, clamped to the month's last day (31
    /// January + 1 month is 28 or 29 February). A local time that the
    /// target day skips (a DST gap) moves forward past the gap; one it has
    /// twice is the earlier. Saturates at chrono's maximum date.
    pub fn add_months(&self, ts: Ts, n: u32) -> Ts {
        let utc = to_datetime(ts);
        let local = match self {
            BillingZone::Fixed(o) => utc.with_timezone(o).naive_local(),
            BillingZone::Named(tz) => utc.with_timezone(tz).naive_local(),
        };
        let target = add_months(local.date(), n).and_time(local.time());
        match self {
            BillingZone::Fixed(o) => first_valid(o, target),
            BillingZone::Named(tz) => first_valid(tz, target),
        }
    }
}

fn first_valid<Tz: TimeZone>(tz: &Tz, local: NaiveDateTime) -> Ts {
    // A DST gap lasts at most a few hours; step through it a quarter hour at a time.
    let mut t = local;
    for _ in 0..=96 {
        match tz.from_local_datetime(&t) {
            LocalResult::Single(dt) => return from_datetime(&dt),
            LocalResult::Ambiguous(early, _) => return from_datetime(&early),
            LocalResult::None => t += chrono::Duration::minutes(15),
        }
    }
    // Unreachable for real zones; fall back to reading the local time as UTC.
    from_datetime(&local.and_utc())
}

fn first_of_month(d: NaiveDate) -> NaiveDate {
    d.with_day(1).expect("day 1 exists in every month")
}

/// `d + n` calendar months, clamping to the month's last day (29 Feb + 12 = 28 Feb).
/// Saturates at chrono's maximum date instead of panicking.
fn add_months(d: NaiveDate, n: u32) -> NaiveDate {
    d.checked_add_months(Months::new(n))
        .unwrap_or(NaiveDate::MAX)
}

/// The free tier as a plan fixes it (R8): items, capacities and months.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeTierPlan {
    /// Length of the free window in calendar months (12).
    pub months: u32,
    /// Calls per monthly pack (1,000,000).
    pub calls: u64,
    /// Egress bytes per monthly pack (1 GiB = 2^30).
    pub egress_bytes: u64,
}

impl Default for FreeTierPlan {
    fn default() -> Self {
        FreeTierPlan {
            months: 12,
            calls: 1_000_000,
            egress_bytes: 1 << 30,
        }
    }
}

/// One month's free-tier validity: `[valid_from, valid_until)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FreeMonth {
    /// 0 for the activation month, 1 for the next, and so on.
    pub index: u32,
    /// Calendar year and month of the pack, in the billing zone.
    pub year: i32,
    pub month: u32,
    pub valid_from: Ts,
    pub valid_until: Ts,
    /// Which plan issued it: an index into [`crate::plans::Plans`], 0 for
    /// the first (and, without a plans file, only) plan.
    pub plan: u16,
}

impl FreeMonth {
    pub fn contains(&self, ts: Ts) -> bool {
        self.valid_from <= ts && ts < self.valid_until
    }
}

/// The free window of an account activated at `activated_at` (R2): from the
/// activation instant to 00:00 of the day after `date(A) + months`, exclusive.
pub fn free_window(activated_at: Ts, plan: &FreeTierPlan, zone: &BillingZone) -> (Ts, Ts) {
    let anniversary = add_months(zone.local_date(activated_at), plan.months);
    let end_day = anniversary.succ_opt().unwrap_or(NaiveDate::MAX);
    (activated_at, zone.start_of_day(end_day))
}

/// Month `index` of the free window, if it overlaps the window (R3).
pub fn free_month(
    activated_at: Ts,
    index: u32,
    plan: &FreeTierPlan,
    zone: &BillingZone,
) -> Option<FreeMonth> {
    // `--free-months 0` turns the free tier off: without this, month 0
    // would cover the rest of the activation day (R2's window ends at the
    // day after date(A) + 0 months).
    if plan.months == 0 {
        return None;
    }
    let (start, end) = free_window(activated_at, plan, zone);
    let anchor = first_of_month(zone.local_date(activated_at));
    let first = add_months(anchor, index);
    let month_from = zone.start_of_day(first);
    if month_from >= end {
        return None;
    }
    let month_until = zone.start_of_day(add_months(anchor, index.checked_add(1)?));
    let valid_from = month_from.max(start);
    let valid_until = month_until.min(end);
    (valid_from < valid_until).then_some(FreeMonth {
        index,
        year: first.year(),
        month: first.month(),
        valid_from,
        valid_until,
        plan: 0,
    })
}

/// Every monthly free-tier pack of the account, in order (R3). The seed's
/// example (activation 2019-11-10) yields 13.
pub fn free_months(activated_at: Ts, plan: &FreeTierPlan, zone: &BillingZone) -> Vec<FreeMonth> {
    (0..=plan.months)
        .map_while(|i| free_month(activated_at, i, plan, zone))
        .collect()
}

/// The free-tier month valid at `ts`, if `ts` lies in the free window.
pub fn free_month_at(
    activated_at: Ts,
    ts: Ts,
    plan: &FreeTierPlan,
    zone: &BillingZone,
) -> Option<FreeMonth> {
    if ts < activated_at {
        return None;
    }
    let a = first_of_month(zone.local_date(activated_at));
    let t = first_of_month(zone.local_date(ts));
    let diff = (t.year() - a.year()) * 12 + t.month() as i32 - a.month() as i32;
    let month = free_month(activated_at, u32::try_from(diff).ok()?, plan, zone)?;
    month.contains(ts).then_some(month)
}

/// The month holding the last instant asked about, so that asking for the
/// next month's start on every request costs one load and two comparisons
/// instead of the calendar arithmetic (about 440 instructions, measured
/// with callgrind, on each Envoy `ShouldRateLimit` answer's reset time).
#[derive(Debug, Default)]
pub struct MonthCache(arc_swap::ArcSwapOption<(Ts, Ts)>);

impl MonthCache {
    /// `zone.next_month_start(ts)`, from the cache when `ts` falls in the
    /// month it holds. `zone` must be the same on every call.
    pub fn next_month_start(&self, zone: &BillingZone, ts: Ts) -> Ts {
        if let Some(m) = &*self.0.load() {
            if m.0 <= ts && ts < m.1 {
                return m.1;
            }
        }
        let month = (zone.month_start(ts), zone.next_month_start(ts));
        self.0.store(Some(std::sync::Arc::new(month)));
        month.1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use proptest::prelude::*;

    #[test]
    fn the_server_clock_reads_utc_in_microseconds() {
        let before = from_datetime(&Utc::now());
        let now = now_ts();
        let after = from_datetime(&Utc::now());
        assert!(
            before <= now && now <= after,
            "{before} <= {now} <= {after}"
        );
    }

    #[test]
    fn the_month_cache_answers_as_the_zone_does_across_month_ends() {
        let zone: BillingZone = "Europe/Paris".parse().unwrap();
        let cache = MonthCache::default();
        let start = zone.month_start(from_datetime(
            &DateTime::parse_from_rfc3339("2026-01-01T00:00:00+01:00").unwrap(),
        ));
        // Every 7 hours for 14 months, forwards, then a few going back.
        let mut ts = start;
        let mut seen = Vec::new();
        while ts < zone.add_months(start, 14) {
            assert_eq!(cache.next_month_start(&zone, ts), zone.next_month_start(ts));
            seen.push(ts);
            ts += 7 * HOUR;
        }
        for ts in seen.iter().rev().step_by(97) {
            assert_eq!(
                cache.next_month_start(&zone, *ts),
                zone.next_month_start(*ts)
            );
        }
        // The instants either side of a boundary.
        let b = zone.next_month_start(start);
        assert_eq!(cache.next_month_start(&zone, b - 1), b);
        assert_eq!(cache.next_month_start(&zone, b), zone.next_month_start(b));
        assert_eq!(cache.next_month_start(&zone, b - 1), b);
    }

    fn zone(s: &str) -> BillingZone {
        s.parse().unwrap()
    }

    fn at(s: &str) -> Ts {
        from_datetime(&DateTime::parse_from_rfc3339(s).unwrap())
    }

    #[test]
    fn parses_offsets_and_iana_names() {
        assert_eq!(zone("+08:00"), BillingZone::default());
        assert_eq!(zone("+0800"), BillingZone::default());
        assert_eq!(zone("+08"), BillingZone::default());
        assert_eq!(zone("-05:30").to_string(), "-05:30");
        assert_eq!(zone("Z").to_string(), "+00:00");
        assert_eq!(zone("Europe/Berlin").to_string(), "Europe/Berlin");
        for bad in [
            "",
            "+8",
            "+08:60",
            "+25:00",
            "Mars/Olympus",
            "08:00",
            "+0a:00",
        ] {
            assert!(
                bad.parse::<BillingZone>().is_err(),
                "{bad:?} should be refused"
            );
        }
    }

    #[test]
    fn multibyte_characters_in_an_offset_are_refused_not_a_panic() {
        // Each of these once sliced the string inside a character and panicked.
        for bad in [
            "+0é0",
            "+é",
            "-é0",
            "+é:00",
            "+0\u{1F600}",
            "-0\u{301}8",
            "+\u{660}\u{668}",
            "+08\u{FF1A}00",
        ] {
            assert_eq!(
                bad.parse::<BillingZone>(),
                Err(InvalidZone(bad.to_string())),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn seed_example_window_ends_at_midnight_after_the_anniversary() {
        let a = at("2019-11-10T17:13:14+08:00");
        let (from, until) = free_window(a, &FreeTierPlan::default(), &BillingZone::default());
        assert_eq!(from, a);
        assert_eq!(until, at("2020-11-11T00:00:00+08:00"));
    }

    #[test]
    fn seed_example_yields_thirteen_packs() {
        let a = at("2019-11-10T17:13:14+08:00");
        let months = free_months(a, &FreeTierPlan::default(), &BillingZone::default());
        assert_eq!(months.len(), 13);
        assert_eq!(months[0].valid_from, a);
        assert_eq!(months[0].valid_until, at("2019-12-01T00:00:00+08:00"));
        assert_eq!(months[1].valid_from, at("2019-12-01T00:00:00+08:00"));
        assert_eq!(months[3].valid_from, at("2020-02-01T00:00:00+08:00"));
        assert_eq!(months[3].valid_until, at("2020-03-01T00:00:00+08:00"));
        assert_eq!((months[12].year, months[12].month), (2020, 11));
        assert_eq!(months[12].valid_from, at("2020-11-01T00:00:00+08:00"));
        assert_eq!(months[12].valid_until, at("2020-11-11T00:00:00+08:00"));
    }

    #[test]
    fn resets_at_midnight_on_the_first_in_billing_zone() {
        let a = at("2019-11-10T17:13:14+08:00");
        let (p, z) = (FreeTierPlan::default(), BillingZone::default());
        let last = free_month_at(a, at("2019-11-30T23:59:59+08:00"), &p, &z).unwrap();
        let first = free_month_at(a, at("2019-12-01T00:00:00+08:00"), &p, &z).unwrap();
        assert_eq!((last.index, first.index), (0, 1));
        // 23:30 +08:00 on 30 November resets at local midnight, 16:00 UTC.
        assert_eq!(
            z.next_month_start(at("2019-11-30T15:30:00Z")),
            at("2019-12-01T00:00:00+08:00")
        );
    }

    #[test]
    fn last_second_of_the_window_is_covered_and_the_next_is_not() {
        let a = at("2019-11-10T17:13:14+08:00");
        let (p, z) = (FreeTierPlan::default(), BillingZone::default());
        assert!(free_month_at(a, at("2020-11-10T23:59:59+08:00"), &p, &z).is_some());
        assert!(free_month_at(a, at("2020-11-11T00:00:00+08:00"), &p, &z).is_none());
        assert!(free_month_at(a, a - 1, &p, &z).is_none());
    }

    #[test]
    fn leap_day_anniversary_clamps_to_february_28() {
        let a = at("2020-02-29T12:00:00+08:00");
        let (_, until) = free_window(a, &FreeTierPlan::default(), &BillingZone::default());
        assert_eq!(until, at("2021-03-01T00:00:00+08:00"));
        let months = free_months(a, &FreeTierPlan::default(), &BillingZone::default());
        let last = months.last().unwrap();
        assert_eq!((last.year, last.month), (2021, 2));
        assert_eq!(last.valid_until, at("2021-03-01T00:00:00+08:00"));
    }

    #[test]
    fn activation_on_the_31st_keeps_later_month_ends_right() {
        let a = at("2021-01-31T08:00:00+08:00");
        let months = free_months(a, &FreeTierPlan::default(), &BillingZone::default());
        assert_eq!(months.len(), 13);
        // February is the whole of February, not 28 Feb .. 28 Mar.
        assert_eq!(months[1].valid_from, at("2021-02-01T00:00:00+08:00"));
        assert_eq!(months[1].valid_until, at("2021-03-01T00:00:00+08:00"));
        assert_eq!(months[12].valid_until, at("2022-02-01T00:00:00+08:00"));
    }

    #[test]
    fn a_dst_gap_at_midnight_starts_the_day_at_the_first_real_instant() {
        // Santiago skipped 2022-09-11 00:00–01:00 local time.
        let z = zone("America/Santiago");
        let d = NaiveDate::from_ymd_opt(2022, 9, 11).unwrap();
        assert_eq!(z.start_of_day(d), at("2022-09-11T01:00:00-03:00"));
    }

    fn any_zone() -> impl Strategy<Value = BillingZone> {
        prop_oneof![
            (-14 * 4..=14 * 4i32)
                .prop_map(|q| BillingZone::Fixed(FixedOffset::east_opt(q * 900).unwrap())),
            prop::sample::select(vec![
                "Asia/Shanghai",
                "Europe/Berlin",
                "America/New_York",
                "America/Santiago",
                "Australia/Lord_Howe",
                "Asia/Kolkata",
                "Pacific/Apia",
                "UTC",
            ])
            .prop_map(|n| BillingZone::Named(n.parse().unwrap())),
        ]
    }

    proptest! {
        #[test]
        fn months_tile_the_free_window_without_gaps_or_overlaps(
            secs in 0i64..4_000_000_000,
            z in any_zone(),
        ) {
            let a = secs * SECOND;
            let p = FreeTierPlan::default();
            let (start, end) = free_window(a, &p, &z);
            let months = free_months(a, &p, &z);
            prop_assert_eq!(months.len(), 13);
            prop_assert_eq!(months[0].valid_from, start);
            prop_assert_eq!(months.last().unwrap().valid_until, end);
            for w in months.windows(2) {
                prop_assert_eq!(w[0].valid_until, w[1].valid_from);
                prop_assert_eq!(w[0].index + 1, w[1].index);
            }
            for m in &months {
                prop_assert!(m.valid_from < m.valid_until);
                // Every pack but the first starts on the 1st, at local midnight.
                if m.index > 0 {
                    prop_assert_eq!(z.local_date(m.valid_from).day(), 1);
                    prop_assert_eq!(z.month_start(m.valid_from), m.valid_from);
                }
            }
            // The window ends at the first instant of the day after the anniversary.
            let end_day = z.local_date(end);
            let anniversary = add_months(z.local_date(a), 12);
            prop_assert_eq!(end_day, anniversary.succ_opt().unwrap());
            prop_assert!(z.local_date(end - 1) <= anniversary);
        }

        #[test]
        fn the_month_found_for_an_instant_contains_it(
            secs in 0i64..4_000_000_000,
            offset in 0i64..(400 * 86_400),
            z in any_zone(),
        ) {
            let a = secs * SECOND;
            let t = a + offset * SECOND;
            let p = FreeTierPlan::default();
            let (_, end) = free_window(a, &p, &z);
            match free_month_at(a, t, &p, &z) {
                Some(m) => {
                    prop_assert!(m.contains(t));
                    prop_assert_eq!(free_months(a, &p, &z)[m.index as usize], m);
                }
                None => prop_assert!(t >= end),
            }
        }
    }

    /// The offset grammar, written independently of `parse_offset` and over
    /// chars rather than bytes: a sign, two ASCII digits of hours, then
    /// optionally two of minutes, with or without a colon; under 24 hours.
    fn offset_model(s: &str) -> Option<i32> {
        let c: Vec<char> = s.trim().chars().collect();
        let sign = match c.first()? {
            '+' => 1,
            '-' => -1,
            _ => return None,
        };
        let digits: Vec<char> = match c.len() {
            3 => vec![c[1], c[2], '0', '0'],
            5 => c[1..5].to_vec(),
            6 if c[3] == ':' => vec![c[1], c[2], c[4], c[5]],
            _ => return None,
        };
        let d = digits
            .iter()
            .map(|c| c.to_digit(10).filter(|_| c.is_ascii_digit()))
            .collect::<Option<Vec<u32>>>()?;
        let (h, m) = ((d[0] * 10 + d[1]) as i32, (d[2] * 10 + d[3]) as i32);
        (h < 24 && m < 60).then_some(sign * (h * 3600 + m * 60))
    }

    /// Any string at all: arbitrary chars (controls, NUL, surrogate-free
    /// Unicode of every plane) as well as proptest's printable strings.
    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<String>(),
            prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter),
        ]
    }

    /// Strings near the offset grammar: a sign, then digits, colons and
    /// arbitrary characters, with optional whitespace around.
    fn near_offset() -> impl Strategy<Value = String> {
        let piece = prop_oneof![
            4 => prop::char::range('0', '9'),
            2 => Just(':'),
            2 => any::<char>(),
            1 => prop::sample::select(vec!['é', '\u{301}', '\u{660}', '\u{FF1A}', '\u{1F600}']),
        ];
        (
            prop::sample::select(vec!["", " "]),
            prop::sample::select(vec!['+', '-']),
            prop::collection::vec(piece, 0..7),
            prop::sample::select(vec!["", " ", "\t"]),
        )
            .prop_map(|(pre, sign, rest, post)| {
                format!("{pre}{sign}{}{post}", String::from_iter(rest))
            })
    }

    /// Valid IANA names with one character inserted, replaced or removed.
    fn near_zone_name() -> impl Strategy<Value = String> {
        (
            prop::sample::select(chrono_tz::TZ_VARIANTS.to_vec()),
            any::<prop::sample::Index>(),
            any::<char>(),
            0..3u8,
        )
            .prop_map(|(tz, at, c, edit)| {
                let mut chars: Vec<char> = tz.name().chars().collect();
                let i = at.index(chars.len() + 1);
                match edit {
                    0 => chars.insert(i, c),
                    1 if i < chars.len() => chars[i] = c,
                    _ if i < chars.len() => {
                        chars.remove(i);
                    }
                    _ => {}
                }
                String::from_iter(chars)
            })
    }

    /// A zone string gives a zone or an error carrying the input, never a panic.
    fn check_zone(s: &str) -> Result<(), TestCaseError> {
        match s.parse::<BillingZone>() {
            Ok(BillingZone::Fixed(o)) => {
                prop_assert!(o.local_minus_utc().abs() < 86_400);
            }
            Ok(BillingZone::Named(tz)) => prop_assert_eq!(tz.name(), s.trim()),
            Err(e) => {
                prop_assert_eq!(&e.0, s);
                prop_assert!(e.to_string().contains(s), "{}", e);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(4096))]

        #[test]
        fn zone_parsing_never_panics_on_any_string(s in any_text()) {
            check_zone(&s)?;
        }

        #[test]
        fn zone_names_one_edit_away_parse_or_are_refused(s in near_zone_name()) {
            check_zone(&s)?;
        }

        #[test]
        fn signed_strings_parse_exactly_as_the_offset_grammar_says(s in near_offset()) {
            check_zone(&s)?;
            match (s.parse::<BillingZone>(), offset_model(&s)) {
                (Ok(BillingZone::Fixed(o)), Some(secs)) => {
                    prop_assert_eq!(o.local_minus_utc(), secs)
                }
                (Err(_), None) => {}
                (got, want) => prop_assert!(false, "{:?}: got {:?}, grammar says {:?}", s, got, want),
            }
        }

        #[test]
        fn every_offset_under_24_hours_parses_in_all_three_forms(
            negative in any::<bool>(),
            h in 0..24i32,
            m in 0..60i32,
        ) {
            let sign = if negative { '-' } else { '+' };
            let secs = (h * 3600 + m * 60) * if negative { -1 } else { 1 };
            for s in [format!("{sign}{h:02}:{m:02}"), format!("{sign}{h:02}{m:02}")] {
                prop_assert_eq!(
                    s.parse::<BillingZone>(),
                    Ok(BillingZone::Fixed(FixedOffset::east_opt(secs).unwrap()))
                );
            }
            let hours_only = format!("{sign}{h:02}").parse::<BillingZone>();
            prop_assert_eq!(
                hours_only,
                Ok(BillingZone::Fixed(FixedOffset::east_opt(secs - secs % 3600).unwrap()))
            );
        }
    }
}
