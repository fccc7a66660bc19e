//! Versioned free-tier plans (R8): the plans file, its validation, and the
//! free-tier months an account gets when plans follow one another.
//!
//! A plans file (`--plans FILE`, `PACKMETER_PLANS`, or `plans = "FILE"` in
//! the config file) holds one `[[plan]]` table per version, oldest first:
//!
//! ```toml
//! [[plan]]
//! name = "launch"
//! effective = "2019-01-01T00:00:00+08:00"
//! months = 6
//! calls = 500000
//! egress_bytes = "512MiB"
//!
//! [[plan]]
//! name = "2020-10"
//! effective = "2020-10-12T23:59:59+08:00"
//! months = 12
//! calls = 1000000
//! egress_bytes = "1GiB"
//! zone = "+08:00"        # optional; defaults to --timezone
//! ```
//!
//! **How plans combine.** An account activated at `A` starts under the plan
//! in effect at `A` (the first plan also governs activations before its own
//! instant: the file is the history the operator knows). Each later plan,
//! effective at `E`, is applied from the start of the calendar month holding
//! `E` (in that plan's zone): its months, computed from the account's
//! *original* activation, replace the earlier plan's from that cut onwards,
//! each one complete, not pro-rated; months before the cut do not change.
//! When two plans' zones differ, a month of the earlier plan that straddles
//! the cut ends at the cut, so that packs never overlap.
//!
//! **Pack ids.** The first plan's packs keep the ids packmeter has always
//! used (`free-2020-09-calls`), so adding a plans file whose first plan is the
//! one already in force changes no stored pack; a later plan's ids carry its
//! name (`free-2020-10-calls@2020-10`), so its packs never mix with an
//! earlier plan's pack of the same month.
//!
//! Without a file, one plan named `default` (the `--free-*` settings, by
//! default 1,000,000 calls, 1 GiB, 12 months) applies from the beginning of
//! time, exactly as before plans existed.

use std::{
    path::{Path, PathBuf},
    sync::Arc,
};

use arc_swap::ArcSwap;

use crate::{
    calendar::{self, from_datetime, BillingZone, FreeMonth, FreeTierPlan, Ts},
    store::RecordedPlan,
};

/// The name of the single plan in force when no plans file is given.
pub const DEFAULT_PLAN_NAME: &str = "default";

/// Longest free window a plan may have, as for `--free-months`.
pub const MAX_MONTHS: u32 = 1200;

/// Largest capacity: the stores keep amounts as signed 64-bit integers.
const MAX_AMOUNT: u64 = i64::MAX as u64;

/// Longest plan name, in bytes.
pub const MAX_NAME_BYTES: usize = 64;

/// One version of the free tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    /// Names the plan in views and in its packs' ids.
    pub name: Arc<str>,
    /// When it takes effect; [`Ts::MIN`] for the default plan.
    pub effective: Ts,
    pub tier: FreeTierPlan,
    /// The zone its months are cut in.
    pub zone: BillingZone,
}

/// The plans, in order of their effective instants (never empty).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plans {
    plans: Vec<Plan>,
}

/// Why a plans file was refused: names the plan (by name when it has a
/// valid one, always by position) and the field.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PlansError {
    #[error("cannot read {path}: {message}")]
    Read { path: String, message: String },
    #[error("{0}; fix the TOML syntax (one [[plan]] table per version)")]
    Syntax(String),
    #[error("unknown top-level key `{0}`; the file holds only [[plan]] tables")]
    UnknownTopLevel(String),
    #[error("no [[plan]] table; give at least one, or leave out the plans setting to use the default plan")]
    Empty,
    #[error("{0}")]
    Reload(String),
    /// The file disagrees with the plans recorded in force in the store
    /// (see [`reconcile`]).
    #[error("{0}")]
    InForce(String),
    /// The store could not be read or written.
    #[error("the plans in force could not be checked against the store: {0}")]
    Store(String),
    #[error("{plan}: {field}: {message}")]
    Field {
        /// `plan "2020-10" (#2)` or `plan #2`.
        plan: String,
        field: &'static str,
        message: String,
    },
}

impl PlansError {
    /// The plan field at fault, if one is (`months`, `effective`, ...).
    pub fn field(&self) -> Option<&'static str> {
        match self {
            PlansError::Field { field, .. } => Some(field),
            _ => None,
        }
    }
}

const KEYS: [&str; 6] = [
    "name",
    "effective",
    "months",
    "calls",
    "egress_bytes",
    "zone",
];

impl Plans {
    /// One plan from the beginning of time: packmeter's behaviour without a
    /// plans file.
    pub fn single(tier: FreeTierPlan, zone: BillingZone) -> Plans {
        Plans {
            plans: vec![Plan {
                name: DEFAULT_PLAN_NAME.into(),
                effective: Ts::MIN,
                tier,
                zone,
            }],
        }
    }

    /// Reads and validates a plans file; `default_zone` is `--timezone`.
    pub fn load(path: &Path, default_zone: BillingZone) -> Result<Plans, PlansError> {
        let text = std::fs::read_to_string(path).map_err(|e| PlansError::Read {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Plans::parse(&text, default_zone)
    }

    /// Parses and validates the text of a plans file.
    pub fn parse(text: &str, default_zone: BillingZone) -> Result<Plans, PlansError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| PlansError::Syntax(e.message().to_string()))?;
        if let Some(k) = table.keys().find(|k| *k != "plan") {
            return Err(PlansError::UnknownTopLevel(k.clone()));
        }
        let Some(list) = table.get("plan") else {
            return Err(PlansError::Empty);
        };
        let toml::Value::Array(list) = list else {
            return Err(PlansError::Syntax(
                "`plan` must be an array of tables, written [[plan]]".into(),
            ));
        };
        if list.is_empty() {
            return Err(PlansError::Empty);
        }
        let mut plans: Vec<Plan> = Vec::with_capacity(list.len());
        for (i, v) in list.iter().enumerate() {
            let position = i + 1;
            let toml::Value::Table(t) = v else {
                return Err(PlansError::Syntax(format!(
                    "plan #{position} is not a table; write each plan as a [[plan]] table"
                )));
            };
            let plan = parse_plan(t, position, default_zone)?;
            if let Some(prev) = plans.last() {
                let label = label(Some(&plan.name), position);
                if plan.effective <= prev.effective {
                    return Err(PlansError::Field {
                        plan: label,
                        field: "effective",
                        message: format!(
                            "{} is {} plan \"{}\"'s {}; plans must be listed in order, each effective strictly after the one before",
                            rfc3339(plan.effective),
                            if plan.effective == prev.effective { "the same instant as" } else { "before" },
                            prev.name,
                            rfc3339(prev.effective),
                        ),
                    });
                }
            }
            if let Some(dup) = plans.iter().find(|p| p.name == plan.name) {
                return Err(PlansError::Field {
                    plan: label(Some(&plan.name), position),
                    field: "name",
                    message: format!(
                        "\"{}\" is already the name of an earlier plan; names must be unique",
                        dup.name
                    ),
                });
            }
            plans.push(plan);
        }
        Ok(Plans { plans })
    }

    pub fn plans(&self) -> &[Plan] {
        &self.plans
    }

    /// The plan behind a [`FreeMonth`] this set computed.
    pub fn plan(&self, index: u16) -> &Plan {
        &self.plans[usize::from(index).min(self.plans.len() - 1)]
    }

    /// The plan in effect at `ts` (the first plan before any instant).
    pub fn in_effect_at(&self, ts: Ts) -> usize {
        self.plans
            .iter()
            .rposition(|p| p.effective <= ts)
            .unwrap_or(0)
    }

    /// Each plan that shapes the months of an account activated at `a`,
    /// with the span `[from, until)` its months are clipped to.
    fn segments(&self, a: Ts) -> impl Iterator<Item = (usize, Ts, Ts)> + '_ {
        let first = self.in_effect_at(a);
        let mut cut = Ts::MIN;
        (first..self.plans.len()).map(move |k| {
            let from = cut;
            let until = match self.plans.get(k + 1) {
                Some(next) => next.zone.month_start(next.effective).max(from),
                None => Ts::MAX,
            };
            cut = until;
            (k, from, until)
        })
    }

    /// Every free-tier month of an account activated at `a`, in order, each
    /// naming the plan that issued it ([`FreeMonth::plan`]). Months never
    /// overlap, and cover each plan's window within its span.
    pub fn free_months(&self, a: Ts) -> Vec<FreeMonth> {
        let mut out = Vec::new();
        for (k, from, until) in self.segments(a) {
            if from >= until {
                continue;
            }
            let p = &self.plans[k];
            for m in calendar::free_months(a, &p.tier, &p.zone) {
                if let Some(m) = clip(m, k, from, until) {
                    out.push(m);
                }
            }
        }
        out
    }

    /// The free-tier month valid at `ts`, if any.
    pub fn free_month_at(&self, a: Ts, ts: Ts) -> Option<FreeMonth> {
        let (k, from, until) = self
            .segments(a)
            .find(|(_, from, until)| *from <= ts && ts < *until)?;
        let p = &self.plans[k];
        let m = calendar::free_month_at(a, ts, &p.tier, &p.zone)?;
        clip(m, k, from, until).filter(|m| m.contains(ts))
    }

    /// The end of the account's free window: the end of its last month, or
    /// `a` when it has none.
    pub fn window_end(&self, a: Ts) -> Ts {
        self.free_months(a).last().map_or(a, |m| m.valid_until)
    }
}

/// The plans file, which a reload (SIGHUP) may replace, and the plans in
/// force: the file's first plans up to the last one whose instant has
/// passed and been switched in ([`switch_through`](LivePlans::switch_through),
/// [`crate::recalc`]). The meter issues packs under the plans in force only.
#[derive(Debug)]
pub struct LivePlans {
    file: ArcSwap<Plans>,
    current: ArcSwap<Plans>,
    path: PathBuf,
    default_zone: BillingZone,
}

impl LivePlans {
    /// Reads and validates the plans file at `path`. The plans whose
    /// instant has passed on the system clock are in force; `serve`
    /// switches with its own clock before it serves.
    pub fn open(path: &Path, default_zone: BillingZone) -> Result<LivePlans, PlansError> {
        let file = Plans::load(path, default_zone)?;
        let current = file.through(file.effective_by(calendar::now_ts()));
        Ok(LivePlans {
            file: ArcSwap::from_pointee(file),
            current: ArcSwap::from_pointee(current),
            path: path.to_path_buf(),
            default_zone,
        })
    }

    /// The plans in force now.
    pub fn load(&self) -> Arc<Plans> {
        self.current.load_full()
    }

    /// Every plan of the file, in force or still ahead.
    pub fn file(&self) -> Arc<Plans> {
        self.file.load_full()
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Puts in force every plan of the file whose instant is at or before
    /// `now`, and returns the positions of those it added (in order).
    pub fn switch_through(&self, now: Ts) -> Vec<usize> {
        let file = self.file.load_full();
        let had = self.current.load().plans.len();
        let n = file.effective_by(now);
        if n <= had {
            return Vec::new();
        }
        self.current.store(Arc::new(file.through(n)));
        (had..n).collect()
    }

    /// The instant of the next plan to switch in, if the file has one.
    pub fn next_instant(&self) -> Option<Ts> {
        let had = self.current.load().plans.len();
        self.file.load().plans.get(had).map(|p| p.effective)
    }

    /// Re-reads the file. The new plans replace the file's only if every
    /// plan in force is unchanged and in its place, and each plan after
    /// them takes effect in an hour that has not closed (`closed_before`,
    /// see [`reconcile`]): its adjustment rows go in that hour (R12).
    /// Otherwise the current plans stay, and the error says which plan and
    /// why. Returns the number of plans in the file now; a plan whose
    /// instant has passed is switched in by the caller
    /// ([`switch_through`](Self::switch_through)).
    ///
    /// The new plans are then checked against, and recorded in, the store
    /// ([`reconcile`]), so a reload on one node agrees with every other.
    pub async fn reload(
        &self,
        store: &dyn crate::store::Store,
        default: &Plan,
        late_grace: Ts,
        now: Ts,
    ) -> Result<usize, PlansError> {
        let new = Plans::load(&self.path, self.default_zone)?;
        let current = self.load();
        current.check_reload(&new)?;
        reconcile(store, &new, default, late_grace, now).await?;
        let n = new.plans.len();
        self.file.store(Arc::new(new));
        Ok(n)
    }
}

impl Plans {
    /// How many plans take effect at or before `now` (at least the first,
    /// which covers everything before its instant).
    fn effective_by(&self, now: Ts) -> usize {
        1 + self.plans[1..]
            .iter()
            .take_while(|p| p.effective <= now)
            .count()
    }

    /// The first `n` plans.
    fn through(&self, n: usize) -> Plans {
        Plans {
            plans: self.plans[..n.clamp(1, self.plans.len())].to_vec(),
        }
    }

    /// Whether `new` may replace the file while these plans are in force
    /// (see [`LivePlans::reload`]); the hours are checked by [`reconcile`].
    fn check_reload(&self, new: &Plans) -> Result<(), PlansError> {
        for (i, old) in self.plans.iter().enumerate() {
            if new.plans.get(i) != Some(old) {
                return Err(PlansError::Reload(format!(
                    "plan \"{}\" (#{}) is in force (since {}): a reload must keep it as it is, in its place; the plans file was not reloaded",
                    old.name,
                    i + 1,
                    if i == 0 { "the first activation".to_string() } else { rfc3339(old.effective) },
                )));
            }
        }
        Ok(())
    }
}

impl Plan {
    /// This plan as the store records it, at `position` (0-based).
    pub fn record(&self, position: usize) -> RecordedPlan {
        RecordedPlan {
            position: i64::try_from(position).unwrap_or(i64::MAX),
            name: self.name.to_string(),
            effective: self.effective,
            months: i64::from(self.tier.months),
            calls: i64::try_from(self.tier.calls).unwrap_or(i64::MAX),
            egress_bytes: i64::try_from(self.tier.egress_bytes).unwrap_or(i64::MAX),
            zone: self.zone.to_string(),
        }
    }
}

/// The first field in which `file` differs from `recorded`, with both values.
fn changed_field(
    recorded: &RecordedPlan,
    file: &RecordedPlan,
) -> Option<(&'static str, String, String)> {
    let when = |ts: Ts| rfc3339(ts);
    [
        (
            "name",
            format!("{:?}", recorded.name),
            format!("{:?}", file.name),
        ),
        ("effective", when(recorded.effective), when(file.effective)),
        (
            "months",
            recorded.months.to_string(),
            file.months.to_string(),
        ),
        ("calls", recorded.calls.to_string(), file.calls.to_string()),
        (
            "egress_bytes",
            recorded.egress_bytes.to_string(),
            file.egress_bytes.to_string(),
        ),
        ("zone", recorded.zone.clone(), file.zone.clone()),
    ]
    .into_iter()
    .find(|(_, a, b)| a != b)
}

/// Checks every plan the store records as in force against the file's:
/// each must be there, unchanged, at the same place.
fn check_recorded(recorded: &[RecordedPlan], file: &[RecordedPlan]) -> Result<(), PlansError> {
    for r in recorded {
        let place = usize::try_from(r.position).unwrap_or(usize::MAX);
        let Some(f) = file.get(place) else {
            return Err(PlansError::InForce(format!(
                "plan \"{}\" (#{}) is recorded in the store as in force but is not in the plans file; a plan in force cannot be removed: put it back, unchanged, in its place",
                r.name,
                place.saturating_add(1),
            )));
        };
        if let Some((field, from, to)) = changed_field(r, f) {
            return Err(PlansError::InForce(format!(
                "plan \"{}\" (#{}): {field} changed from {from} to {to}; a plan in force cannot change (the store records it as in force): put it back as it was, and add a new plan, effective in an hour that has not closed, instead",
                r.name,
                place.saturating_add(1),
            )));
        }
    }
    Ok(())
}

/// Compares a plans file with the plans the store records as in force (R8,
/// issue 11), at start and on each reload, so that every node and every
/// restart agrees, and records the file's new plans:
///
/// - a plan the store records must be in the file unchanged, at its place;
/// - a plan the store does not record is recorded if the hour holding its
///   instant has not closed at `now` (with `late_grace`, or by the store's
///   settled mark): when it takes effect, usage already recorded under the
///   earlier plan is re-deducted by adjustment rows in that hour
///   ([`crate::recalc`]), and a closed hour never changes (R12);
/// - a new store (no plan recorded, no usage row, no activated account)
///   records every plan of the file as it is: there is nothing to recalculate;
/// - a store with usage but no plan recorded was run without a plans file,
///   under `default` (the `--free-*` settings): the file's first plan must
///   have its months, calls, egress_bytes and zone (its name and instant are
///   free), and the others must take effect in hours that have not closed.
///
/// Recording is `INSERT ... ON CONFLICT DO NOTHING` then a read-back and a
/// second comparison, so two nodes starting at once with different files
/// cannot both win: the later one is refused.
pub async fn reconcile(
    store: &dyn crate::store::Store,
    plans: &Plans,
    default: &Plan,
    late_grace: Ts,
    now: Ts,
) -> Result<(), PlansError> {
    let failed = |e: crate::store::StoreError| PlansError::Store(e.to_string());
    // Hours that start before this are closed (R9), or settled by an
    // export under another grace (R12): no adjustment row may go in them.
    let closed_before = crate::recalc::hour_floor(now.saturating_sub(late_grace))
        .max(store.settled_before().await.map_err(failed)?);
    let file: Vec<RecordedPlan> = plans
        .plans
        .iter()
        .enumerate()
        .map(|(i, p)| p.record(i))
        .collect();
    let recorded = store.recorded_plans().await.map_err(failed)?;
    let new: Vec<RecordedPlan> = if recorded.is_empty()
        && !store.holds_usage().await.map_err(failed)?
    {
        file.clone()
    } else {
        let mut new = Vec::new();
        let first_new = if recorded.is_empty() {
            let implicit = RecordedPlan {
                name: file[0].name.clone(),
                effective: file[0].effective,
                ..default.record(0)
            };
            if let Some((field, from, to)) = changed_field(&implicit, &file[0]) {
                return Err(PlansError::InForce(format!(
                    "plan \"{}\" (#1): {field} is {to}, but the store holds usage recorded without a plans file, under the default plan ({field} {from}); the first plan of a plans file added later must keep the default plan's months, calls, egress_bytes and zone (it is the plan that usage was recorded under): make the first plan equal the default plan, and add the new one after it, effective in an hour that has not closed",
                    file[0].name,
                )));
            }
            new.push(file[0].clone());
            1
        } else {
            check_recorded(&recorded, &file)?;
            recorded.len()
        };
        for (i, p) in file.iter().enumerate().skip(first_new) {
            let hour = crate::recalc::hour_floor(p.effective);
            if hour < closed_before {
                return Err(PlansError::InForce(format!(
                    "plan \"{}\" (#{}) is not recorded in the store as in force, and the hour holding its instant ({}) has closed: the re-deduction of usage recorded under the earlier plan is written as adjustment rows in that hour, and a closed hour never changes (R12); give it an effective instant in an hour that has not closed",
                    p.name,
                    i + 1,
                    rfc3339(p.effective),
                )));
            }
            new.push(p.clone());
        }
        new
    };
    if !new.is_empty() {
        store.record_plans(&new, now).await.map_err(failed)?;
    }
    // Another node may have recorded other plans meanwhile.
    let recorded = store.recorded_plans().await.map_err(failed)?;
    check_recorded(&recorded, &file)
}

fn clip(m: FreeMonth, plan: usize, from: Ts, until: Ts) -> Option<FreeMonth> {
    let valid_from = m.valid_from.max(from);
    let valid_until = m.valid_until.min(until);
    (valid_from < valid_until).then_some(FreeMonth {
        valid_from,
        valid_until,
        plan: u16::try_from(plan).unwrap_or(u16::MAX),
        ..m
    })
}

fn rfc3339(ts: Ts) -> String {
    calendar::to_datetime(ts).to_rfc3339()
}

fn label(name: Option<&str>, position: usize) -> String {
    match name {
        Some(n) => format!("plan \"{n}\" (#{position})"),
        None => format!("plan #{position}"),
    }
}

/// Most plans a file may hold (pack months carry the index as a `u16`).
const MAX_PLANS: usize = 1000;

fn parse_plan(
    t: &toml::Table,
    position: usize,
    default_zone: BillingZone,
) -> Result<Plan, PlansError> {
    if position > MAX_PLANS {
        return Err(PlansError::Syntax(format!(
            "more than {MAX_PLANS} plans; keep at most {MAX_PLANS}"
        )));
    }
    // The name first, so that every other error can name the plan.
    let name = match t.get("name") {
        None => {
            return Err(PlansError::Field {
                plan: label(None, position),
                field: "name",
                message: "missing; give each plan a name".into(),
            })
        }
        Some(toml::Value::String(s)) => check_name(s).map_err(|message| PlansError::Field {
            plan: label(None, position),
            field: "name",
            message,
        })?,
        Some(other) => {
            return Err(PlansError::Field {
                plan: label(None, position),
                field: "name",
                message: format!("must be a string, not {}", other.type_str()),
            })
        }
    };
    let fail = |field: &'static str, message: String| PlansError::Field {
        plan: label(Some(&name), position),
        field,
        message,
    };
    if let Some(k) = t.keys().find(|k| !KEYS.contains(&k.as_str())) {
        return Err(PlansError::Field {
            plan: label(Some(&name), position),
            field: "plan",
            message: format!(
                "unknown key `{k}`; a plan has name, effective, months, calls, egress_bytes and zone"
            ),
        });
    }
    let required = |field: &'static str| {
        t.get(field)
            .ok_or_else(|| fail(field, "missing; every plan needs it".into()))
    };
    let effective = match required("effective")? {
        toml::Value::String(s) => parse_instant(s).map_err(|m| fail("effective", m))?,
        toml::Value::Datetime(d) => {
            parse_instant(&d.to_string()).map_err(|m| fail("effective", m))?
        }
        other => {
            return Err(fail(
                "effective",
                format!(
                    "must be an RFC 3339 instant like \"2020-10-12T23:59:59+08:00\", not {}",
                    other.type_str()
                ),
            ))
        }
    };
    let months = match required("months")? {
        toml::Value::Integer(n) if *n < 1 => {
            return Err(fail(
                "months",
                format!(
                "{n}: must be at least 1 (a plan without free months has no free tier to issue)"
            ),
            ))
        }
        toml::Value::Integer(n) => u32::try_from(*n)
            .ok()
            .filter(|m| *m <= MAX_MONTHS)
            .ok_or_else(|| fail("months", format!("{n}: must be at most {MAX_MONTHS}")))?,
        other => {
            return Err(fail(
                "months",
                format!("must be a whole number, not {}", other.type_str()),
            ))
        }
    };
    let calls = match required("calls")? {
        toml::Value::Integer(n) => {
            u64::try_from(*n).map_err(|_| fail("calls", format!("{n}: must not be negative")))?
        }
        other => {
            return Err(fail(
                "calls",
                format!("must be a whole number, not {}", other.type_str()),
            ))
        }
    };
    let egress_bytes = match required("egress_bytes")? {
        toml::Value::Integer(n) => u64::try_from(*n)
            .map_err(|_| fail("egress_bytes", format!("{n}: must not be negative")))?,
        toml::Value::String(s) => parse_size(s).map_err(|m| fail("egress_bytes", m))?,
        other => {
            return Err(fail(
                "egress_bytes",
                format!(
                    "must be a number of bytes or a size like \"1GiB\", not {}",
                    other.type_str()
                ),
            ))
        }
    };
    if egress_bytes > MAX_AMOUNT {
        return Err(fail(
            "egress_bytes",
            format!(
                "{egress_bytes} is above {MAX_AMOUNT} (i64::MAX), the most the stores can hold"
            ),
        ));
    }
    let zone = match t.get("zone") {
        None => default_zone,
        Some(toml::Value::String(s)) => s
            .parse::<BillingZone>()
            .map_err(|e| fail("zone", e.to_string()))?,
        Some(other) => {
            return Err(fail(
                "zone",
                format!(
                    "must be a string like \"+08:00\" or \"Asia/Shanghai\", not {}",
                    other.type_str()
                ),
            ))
        }
    };
    Ok(Plan {
        name,
        effective,
        tier: FreeTierPlan {
            months,
            calls,
            egress_bytes,
        },
        zone,
    })
}

fn check_name(s: &str) -> Result<Arc<str>, String> {
    if s.is_empty() {
        return Err("must not be empty".into());
    }
    if s.len() > MAX_NAME_BYTES {
        return Err(format!("is {} bytes; at most {MAX_NAME_BYTES}", s.len()));
    }
    if let Some(c) = s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(format!(
            "{s:?} holds {c:?}; use letters, digits, `-`, `_` and `.` (the name goes into pack ids)"
        ));
    }
    Ok(s.into())
}

fn parse_instant(s: &str) -> Result<Ts, String> {
    chrono::DateTime::parse_from_rfc3339(s.trim())
        .map(|d| from_datetime(&d))
        .map_err(|e| {
            format!("`{s}` is not an RFC 3339 instant with an offset, like \"2020-10-12T23:59:59+08:00\" ({e})")
        })
}

/// A size: a whole number of bytes, or a number with a unit (`512MiB`,
/// `1 GiB`; `KiB`/`MiB`/`GiB` are powers of 1024, `kB`/`MB`/`GB` powers of 1000).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    if t.is_empty() || t.starts_with(['-', '+']) {
        return Err(format!(
            "`{s}` is not a size; write a number of bytes or a size like \"512MiB\" or \"1GiB\""
        ));
    }
    t.parse::<bytesize::ByteSize>()
        .map(|b| b.as_u64())
        .map_err(|e| {
            format!(
                "`{s}` is not a size ({e}); write a number of bytes or a size like \"512MiB\" or \"1GiB\""
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn at(s: &str) -> Ts {
        from_datetime(&chrono::DateTime::parse_from_rfc3339(s).unwrap())
    }

    const SEED: &str = include_str!("../docs/plans.example.toml");

    fn seed() -> Plans {
        Plans::parse(SEED, BillingZone::default()).unwrap()
    }

    #[test]
    fn the_issues_example_parses() {
        let p = seed();
        assert_eq!(p.plans().len(), 2);
        assert_eq!(p.plans()[0].tier.egress_bytes, 512 << 20);
        assert_eq!(p.plans()[1].tier.egress_bytes, 1 << 30);
        assert_eq!(p.plans()[1].effective, at("2020-10-12T23:59:59+08:00"));
    }

    #[test]
    fn the_seed_account_keeps_launch_months_and_gets_complete_new_ones_from_october() {
        let p = seed();
        let a = at("2019-11-10T17:13:14+08:00");
        let months = p.free_months(a);
        // Launch: Nov 2019 (from A) .. Apr 2020, and 1–10 May 2020 (6 months).
        let launch: Vec<_> = months.iter().filter(|m| m.plan == 0).collect();
        assert_eq!(launch.len(), 7);
        assert_eq!(launch[6].valid_until, at("2020-05-11T00:00:00+08:00"));
        // 2020-10: October from its first instant, complete; November to the 10th.
        let new: Vec<_> = months.iter().filter(|m| m.plan == 1).collect();
        assert_eq!(new.len(), 2);
        assert_eq!(new[0].valid_from, at("2020-10-01T00:00:00+08:00"));
        assert_eq!(new[0].valid_until, at("2020-11-01T00:00:00+08:00"));
        assert_eq!(new[1].valid_until, at("2020-11-11T00:00:00+08:00"));
        // September 2020 has no pack under either plan.
        assert!(p
            .free_month_at(a, at("2020-09-15T00:00:00+08:00"))
            .is_none());
        assert_eq!(
            p.free_month_at(a, at("2020-10-02T00:00:00+08:00"))
                .map(|m| m.plan),
            Some(1)
        );
    }

    #[test]
    fn an_account_activated_after_the_change_gets_only_the_new_plan() {
        let p = seed();
        let months = p.free_months(at("2021-03-05T08:00:00+08:00"));
        assert_eq!(months.len(), 13);
        assert!(months.iter().all(|m| m.plan == 1));
    }

    fn refused(text: &str) -> PlansError {
        Plans::parse(text, BillingZone::default()).unwrap_err()
    }

    fn plan(name: &str, effective: &str, extra: &str) -> String {
        format!(
            "[[plan]]\nname = \"{name}\"\neffective = \"{effective}\"\nmonths = 12\ncalls = 1\negress_bytes = 1\n{extra}\n"
        )
    }

    #[test]
    fn bad_files_name_the_plan_and_the_field() {
        let a = plan("a", "2020-01-01T00:00:00Z", "");
        let cases = [
            (
                format!("{a}{}", plan("b", "2019-01-01T00:00:00Z", "")),
                "plan \"b\" (#2): effective",
            ),
            (
                format!("{a}{}", plan("b", "2020-01-01T00:00:00Z", "")),
                "plan \"b\" (#2): effective",
            ),
            (
                a.replace("months = 12", "months = 0"),
                "plan \"a\" (#1): months",
            ),
            (
                format!("{a}colour = \"red\"\n"),
                "plan \"a\" (#1): plan: unknown key `colour`",
            ),
            (
                a.replace("egress_bytes = 1", "egress_bytes = \"lots\""),
                "plan \"a\" (#1): egress_bytes",
            ),
            (
                a.replace("egress_bytes = 1", "egress_bytes = \"1QiB\""),
                "plan \"a\" (#1): egress_bytes",
            ),
            (
                a.replace("calls = 1", "calls = -1"),
                "plan \"a\" (#1): calls",
            ),
            (
                a.replace("calls = 1\n", ""),
                "plan \"a\" (#1): calls: missing",
            ),
            (
                a.replace("2020-01-01T00:00:00Z", "2020-01-01"),
                "plan \"a\" (#1): effective",
            ),
            (
                format!("{a}zone = \"Mars/Base\"\n"),
                "plan \"a\" (#1): zone",
            ),
            (a.replace("name = \"a\"", "name = \"a b\""), "plan #1: name"),
            (
                format!("{a}{}", plan("a", "2021-01-01T00:00:00Z", "")),
                "plan \"a\" (#2): name",
            ),
        ];
        for (text, want) in cases {
            let e = refused(&text).to_string();
            assert!(
                e.starts_with(want),
                "{e:?} should start with {want:?}\n{text}"
            );
        }
        assert_eq!(refused(""), PlansError::Empty);
        assert!(matches!(refused("plan = 3"), PlansError::Syntax(_)));
        assert!(matches!(refused("[[plan]\n"), PlansError::Syntax(_)));
        assert_eq!(
            refused(&format!("other = 1\n{a}")),
            PlansError::UnknownTopLevel("other".into())
        );
    }

    #[test]
    fn without_a_file_the_default_plan_gives_exactly_the_calendar_months() {
        let a = at("2019-11-10T17:13:14+08:00");
        let p = Plans::single(FreeTierPlan::default(), BillingZone::default());
        assert_eq!(
            p.free_months(a),
            calendar::free_months(a, &FreeTierPlan::default(), &BillingZone::default())
        );
    }

    const ZONES: [&str; 4] = ["+08:00", "-05:00", "Europe/Berlin", "+14:00"];
    // 2015-01-01 .. 2030-01-01
    const LO: Ts = 1_420_070_400 * calendar::SECOND;
    const HI: Ts = 1_893_456_000 * calendar::SECOND;

    fn arb_plans() -> impl Strategy<Value = Plans> {
        prop::collection::vec((1u32..=30, 0usize..4, 1i64..(400 * 86_400)), 1..5).prop_flat_map(
            |steps| {
                (LO..HI).prop_map(move |start| {
                    let mut effective = start;
                    let plans = steps
                        .iter()
                        .enumerate()
                        .map(|(i, (months, zone, gap))| {
                            effective += gap * calendar::SECOND;
                            Plan {
                                name: format!("p{i}").into(),
                                effective,
                                tier: FreeTierPlan {
                                    months: *months,
                                    calls: 1,
                                    egress_bytes: 1,
                                },
                                zone: ZONES[*zone].parse().unwrap(),
                            }
                        })
                        .collect();
                    Plans { plans }
                })
            },
        )
    }

    proptest! {
        /// For arbitrary plan sequences and activations, the months never
        /// overlap, and they cover exactly each plan's window within its
        /// span: every instant of it, and nothing else.
        #[test]
        fn months_never_overlap_and_cover_the_window_exactly(
            plans in arb_plans(),
            a in LO..HI,
            probes in prop::collection::vec(LO..(HI + 40 * 366 * 86_400 * calendar::SECOND), 40),
        ) {
            let months = plans.free_months(a);
            for w in months.windows(2) {
                prop_assert!(w[0].valid_until <= w[1].valid_from, "overlap: {:?}", w);
            }
            for m in &months {
                prop_assert!(m.valid_from < m.valid_until);
                prop_assert!(m.valid_from >= a);
            }
            // Every month boundary, and random instants, as probes.
            let mut probes = probes;
            for m in &months {
                probes.extend([m.valid_from - 1, m.valid_from, m.valid_until - 1, m.valid_until]);
            }
            for t in probes {
                // Expected: the plan whose span holds t, if t is in its window.
                let expected = plans.segments(a).find(|(_, f, u)| *f <= t && t < *u).and_then(|(k, _, _)| {
                    let p = &plans.plans[k];
                    let (from, until) = calendar::free_window(a, &p.tier, &p.zone);
                    (from <= t && t < until).then_some(k)
                });
                let holding: Vec<_> = months.iter().filter(|m| m.contains(t)).collect();
                prop_assert!(holding.len() <= 1);
                prop_assert_eq!(holding.first().map(|m| usize::from(m.plan)), expected, "at {}", t);
                prop_assert_eq!(plans.free_month_at(a, t), holding.first().map(|m| **m));
            }
        }

        /// Whatever the text, parsing returns a plan set or an error; never a panic.
        #[test]
        fn any_text_is_parsed_or_refused(text in "(\\[\\[plan\\]\\]\n)?([a-z_]{1,12} = (\"[^\"\n]{0,20}\"|-?[0-9]{1,20})\n){0,8}") {
            let _ = Plans::parse(&text, BillingZone::default());
        }
    }
}
