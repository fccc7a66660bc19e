//! The pack page (R11): an account's resource packs as HTML, the way a cloud
//! console lists them, with a chart of its usage by day, served by
//! [`admin_http`](crate::admin_http) at `/packs?account=ID`, plus the admin
//! port's index page and error pages.
//!
//! The pages are [maud](https://maud.lambda.xyz) templates: checked at
//! compile time, and every interpolated value is HTML-escaped unless it is
//! wrapped in `PreEscaped` (only the compile-time style sheet is), so an
//! account id (which may hold any printable character) cannot inject
//! markup. They are pure functions from data to a `String`, tested without
//! a server. They need no external asset: the style sheet
//! (`pack_page.css`, included at compile time) is inline, the chart is
//! inline SVG, and there is no script, so they work offline and under a
//! `default-src 'none'` Content-Security-Policy.

use maud::{html, Markup, PreEscaped, DOCTYPE};

use crate::{
    calendar::{to_datetime, BillingZone, Ts},
    daily::Day,
    meter::PackView,
    packs::{deduction_order, Item, PackSource},
};

/// The pages' only style sheet. System fonts only: nothing is fetched.
const CSS: &str = include_str!("pack_page.css");

// === amounts ===

/// How full a pack is, in tenths of a percent, floored and clamped to
/// 0..=1000. Floored so that a pack shows 100% only when it is really used up;
/// clamped because a store may hold more than a capacity that a plan later
/// shrank. A pack without capacity has nothing to use up and shows 0.
pub fn used_permille(used: u128, capacity: u128) -> u32 {
    if capacity == 0 {
        return 0;
    }
    // u128: a summary card adds up packs whose capacities pass 2^64, and
    // `used * 1000` of a pack near 2^64 passes it too.
    let p = used.min(capacity).saturating_mul(1000) / capacity;
    // p <= 1000 because used <= capacity.
    u32::try_from(p).unwrap_or(1000)
}

/// The bar's CSS width for `used` of `capacity`, e.g. `45.2%`; never over 100%.
pub fn bar_width(used: u128, capacity: u128) -> String {
    let p = used_permille(used, capacity);
    format!("{}.{}%", p / 10, p % 10)
}

/// The usage as text: like [`bar_width`], but a pack with any usage never
/// reads as empty.
fn used_text(used: u128, capacity: u128) -> String {
    if used > 0 && used_permille(used, capacity) == 0 && capacity > 0 {
        return "<0.1%".to_string();
    }
    bar_width(used, capacity)
}

/// A byte count in binary units with two decimals: `1.00 GiB`, `512 B`.
pub fn human_bytes(bytes: u128) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut unit = 0;
    let mut scale = 1u128;
    while unit + 1 < UNITS.len() && bytes / scale >= 1024 {
        unit += 1;
        scale *= 1024;
    }
    let text = format!("{:.2}", bytes as f64 / scale as f64);
    // 1023.999 KiB rounds to "1024.00"; say 1.00 MiB instead.
    if text.starts_with("1024") && unit + 1 < UNITS.len() {
        return format!("1.00 {}", UNITS[unit + 1]);
    }
    format!("{text} {}", UNITS[unit])
}

/// A count with thousands separators: `1,000,000`.
pub fn grouped(n: u128) -> String {
    if n < 1000 {
        return n.to_string();
    }
    format!("{},{:03}", grouped(n / 1000), n % 1000)
}

/// An amount of `item` as text: calls as a grouped count, egress in binary
/// units.
fn amount_text(item: Item, n: u128) -> String {
    match item {
        Item::Calls => grouped(n),
        Item::EgressBytes => human_bytes(n),
    }
}

/// An amount of `item`: calls as a grouped count, egress in binary units
/// with the exact byte count in a tooltip.
fn amount(item: Item, n: u128) -> Markup {
    match item {
        Item::Calls => html! { (grouped(n)) },
        Item::EgressBytes => html! { span title={ (grouped(n)) " bytes" } { (human_bytes(n)) } },
    }
}

// === time ===

/// An instant as local time in the billing zone: (`2019-11-10 17:13:14`,
/// RFC 3339 with the zone's offset for the `datetime` attribute).
fn local_time(zone: &BillingZone, ts: Ts) -> (String, String) {
    const SHOWN: &str = "%Y-%m-%d %H:%M:%S";
    let utc = to_datetime(ts);
    match zone {
        BillingZone::Fixed(o) => {
            let t = utc.with_timezone(o);
            (t.format(SHOWN).to_string(), t.to_rfc3339())
        }
        BillingZone::Named(tz) => {
            let t = utc.with_timezone(tz);
            (t.format(SHOWN).to_string(), t.to_rfc3339())
        }
    }
}

fn time(zone: &BillingZone, ts: Ts) -> Markup {
    let (shown, machine) = local_time(zone, ts);
    html! { time datetime=(machine) { (shown) } }
}

/// `UTC+08:00`, or an IANA name as is.
fn zone_label(zone: &BillingZone) -> String {
    match zone {
        BillingZone::Fixed(o) => format!("UTC{o}"),
        BillingZone::Named(tz) => tz.name().to_string(),
    }
}

// === the pack list ===

/// Where a pack stands at `now`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Validity {
    /// Not valid yet.
    Upcoming,
    /// Valid at `now`: deductions go to it.
    Current,
    /// Its validity has ended (`valid_until` is exclusive).
    Expired,
}

impl Validity {
    pub fn of(v: &PackView, now: Ts) -> Validity {
        if now < v.spec.valid_from {
            Validity::Upcoming
        } else if now < v.spec.valid_until {
            Validity::Current
        } else {
            Validity::Expired
        }
    }

    fn label(self) -> &'static str {
        match self {
            Validity::Upcoming => "Upcoming",
            Validity::Current => "Valid now",
            Validity::Expired => "Expired",
        }
    }

    fn class(self) -> &'static str {
        match self {
            Validity::Upcoming => "upcoming",
            Validity::Current => "current",
            Validity::Expired => "expired",
        }
    }
}

fn source_label(s: PackSource) -> (&'static str, &'static str) {
    match s {
        PackSource::FreeTier => ("Free tier", "free"),
        PackSource::Purchased => ("Purchased", "purchased"),
    }
}

fn item_label(i: Item) -> &'static str {
    match i {
        Item::Calls => "Calls",
        Item::EgressBytes => "Egress",
    }
}

/// The page listing `account_id`'s packs as they stand at `now`, with times
/// shown in the billing `zone`, and a chart of its usage over `days`
/// (oldest first, as [`App::daily_usage`](crate::app::App::daily_usage)
/// returns them).
pub fn render(
    account_id: &str,
    packs: &[PackView],
    days: &[Day],
    zone: &BillingZone,
    now: Ts,
) -> String {
    let (as_of, as_of_machine) = local_time(zone, now);
    let main = html! {
        main {
            h1 { "Resource packs " span.account { (account_id) } }
            p.meta {
                "As of " time datetime=(as_of_machine) { (as_of) }
                " · times in the billing zone " b { (zone_label(zone)) }
                " · each validity ends just before its end time"
            }
            (summary(packs, now))
            (usage_charts(days, zone))
            @if packs.is_empty() {
                p.empty { "This account has no packs: it has not been activated yet, so it has no free-tier packs, and no pack has been purchased for it." }
            } @else {
                (table(packs, zone, now))
            }
        }
    };
    page(&format!("Resource packs · {account_id}"), account_id, main)
}

/// One card per item: what the packs valid now hold in total.
fn summary(packs: &[PackView], now: Ts) -> Markup {
    html! {
        section.cards aria-label="Valid now" {
            @for item in Item::ALL {
                @let current = packs.iter().filter(|p| p.spec.item == item && Validity::of(p, now) == Validity::Current);
                // u128: the capacities of a few packs near 2^63 already pass
                // 2^64, and a saturated total would misstate what remains.
                @let (capacity, used, n) = current.fold((0u128, 0u128, 0usize), |(c, u, n), p| {
                    (c + u128::from(p.spec.capacity), u + u128::from(p.used.min(p.spec.capacity)), n + 1)
                });
                div.card {
                    div.card-title { (item_label(item)) " · valid now" }
                    @if n == 0 {
                        div.card-big { "–" }
                        div.card-sub { "No pack is valid now: usage is billed as overage." }
                    } @else {
                        div.card-big { (amount(item, capacity - used)) }
                        div.card-sub {
                            "remaining of " (amount(item, capacity)) " in " (n) " pack" @if n != 1 { "s" }
                        }
                        (bar(used, capacity))
                    }
                }
            }
        }
    }
}

/// The usage bar: a track, a fill as wide as the used share, and the share
/// as text; screen readers get it as a labelled progress bar.
fn bar(used: u128, capacity: u128) -> Markup {
    let p = used_permille(used, capacity);
    let level = match p {
        1000 => "full",
        800..=999 => "high",
        _ => "ok",
    };
    let text = used_text(used, capacity);
    html! {
        div.usage {
            div.bar role="progressbar" aria-valuemin="0" aria-valuemax="100"
                aria-valuenow={ (p / 10) "." (p % 10) } aria-label={ (text) " used" } {
                div.fill.(level) style={ "width:" (bar_width(used, capacity)) } {}
            }
            span.pct { (text) }
        }
    }
}

/// The rows' order: packs valid now first, in the order deductions reach
/// them (R6) per item; then upcoming packs, soonest first; then expired
/// packs, latest first. Like a console, what matters now is on top.
fn display_order(packs: &[PackView], now: Ts) -> Vec<(Validity, &PackView)> {
    let mut rows: Vec<(Validity, &PackView)> =
        packs.iter().map(|p| (Validity::of(p, now), p)).collect();
    rows.sort_by(|(va, a), (vb, b)| {
        let rank = |v: &Validity| match v {
            Validity::Current => 0,
            Validity::Upcoming => 1,
            Validity::Expired => 2,
        };
        rank(va).cmp(&rank(vb)).then_with(|| match va {
            Validity::Current => a
                .spec
                .item
                .cmp(&b.spec.item)
                .then_with(|| deduction_order(&a.spec, &b.spec)),
            Validity::Upcoming => a
                .spec
                .valid_from
                .cmp(&b.spec.valid_from)
                .then(a.spec.item.cmp(&b.spec.item)),
            Validity::Expired => b
                .spec
                .valid_from
                .cmp(&a.spec.valid_from)
                .then(a.spec.item.cmp(&b.spec.item)),
        })
    });
    rows
}

const COLUMNS: usize = 9;

fn table(packs: &[PackView], zone: &BillingZone, now: Ts) -> Markup {
    let rows = display_order(packs, now);
    let groups = [Validity::Current, Validity::Upcoming, Validity::Expired];
    html! {
        div.table-wrap {
            table {
                caption { "Every pack of the account, free tier and purchased: valid now (in the order deductions use them), upcoming, then expired." }
                thead { tr {
                    th scope="col" { "Status" }
                    th scope="col" { "Source" }
                    th scope="col" { "Pack ID" }
                    th scope="col" { "Item" }
                    th.num scope="col" { "Capacity" }
                    th.num scope="col" { "Used" }
                    th.num scope="col" { "Remaining" }
                    th scope="col" { "Validity" }
                    th scope="col" { "Usage" }
                } }
                @for validity in groups {
                    @let group: Vec<&PackView> = rows.iter().filter(|(v, _)| *v == validity).map(|(_, p)| *p).collect();
                    @if !group.is_empty() {
                        tbody {
                            tr.group {
                                th scope="rowgroup" colspan=(COLUMNS) {
                                    (validity.label()) " " span.count { (group.len()) }
                                }
                            }
                            @for p in group { (row(validity, p, zone)) }
                        }
                    }
                }
            }
        }
    }
}

fn row(validity: Validity, p: &PackView, zone: &BillingZone) -> Markup {
    let used = p.used.min(p.spec.capacity);
    let (source, source_class) = source_label(p.spec.source);
    let item = p.spec.item;
    html! {
        tr.(validity.class()) {
            td { div.status {
                span.badge.(validity.class()) { (validity.label()) }
                @if validity == Validity::Current && used >= p.spec.capacity {
                    span.badge.exhausted { "Used up" }
                }
            } }
            td { span.src.(source_class) { (source) } }
            td {
                code { (p.spec.pack_id) }
                @if p.spec.source == PackSource::Purchased {
                    div.sub { "priority " (p.spec.priority) }
                }
                @if let Some(plan) = &p.plan {
                    div.sub { "plan " (plan) }
                }
            }
            td { (item_label(item)) }
            td.num { (amount(item, p.spec.capacity.into())) }
            td.num { (amount(item, used.into())) }
            td.num { (amount(item, (p.spec.capacity - used).into())) }
            td.validity {
                (time(zone, p.spec.valid_from)) " " span.to { "–" } " " (time(zone, p.spec.valid_until))
            }
            td { (bar(used.into(), p.spec.capacity.into())) }
        }
    }
}

// === the usage chart ===

/// The chart's drawing area, in SVG user units (the SVG scales to the
/// page's width).
const CHART_W: f64 = 960.0;
const CHART_H: f64 = 120.0;
/// Room on the left for the axis labels, above for the top label, and
/// below for the dates.
const CHART_LEFT: f64 = 72.0;
const CHART_TOP: f64 = 10.0;
const CHART_BOTTOM: f64 = 20.0;

/// The usage of the last days, one stacked-bar chart per item: covered
/// (solid) under overage (hatched), so the two read apart without colour;
/// every bar carries its date and amounts as a tooltip and as `data-`
/// attributes, and a table below lists the days with usage as text.
fn usage_charts(days: &[Day], zone: &BillingZone) -> Markup {
    let (Some(first), Some(last)) = (days.first(), days.last()) else {
        return html! {};
    };
    html! {
        section.chart-panel aria-labelledby="usage-title" {
            h2 #usage-title { "Usage by day" }
            p.meta {
                "The last " (days.len()) " days, " (first.date) " to " (last.date)
                ", by day in the billing zone " (zone_label(zone))
                ": settled and open hours, and what this node has not flushed yet."
            }
            // The hatch pattern, defined once for every chart and the legend.
            svg.defs width="0" height="0" aria-hidden="true" focusable="false" { (hatch_defs()) }
            div.charts {
                @for item in Item::ALL { (chart(days, item)) }
            }
            ul.legend {
                li { (swatch("covered")) "Covered by packs (solid)" }
                li { (swatch("overage")) "Overage, billed pay-as-you-go (hatched)" }
            }
            (daily_table(days))
        }
    }
}

fn swatch(class: &str) -> Markup {
    html! {
        svg.swatch viewBox="0 0 14 10" aria-hidden="true" {
            rect class=(class) x="0" y="0" width="14" height="10" {}
        }
    }
}

/// The hatch pattern that marks overage, `#hatch-overage`.
fn hatch_defs() -> Markup {
    html! {
        defs {
            pattern #hatch-overage width="6" height="6" patternUnits="userSpaceOnUse" patternTransform="rotate(45)" {
                rect width="6" height="6" fill="#fdecec" {}
                line x1="0" y1="0" x2="0" y2="6" stroke="#d64545" stroke-width="3" {}
            }
        }
    }
}

/// A number for an SVG attribute: one decimal is plenty at this scale.
fn px(v: f64) -> String {
    format!("{v:.1}")
}

fn chart(days: &[Day], item: Item) -> Markup {
    let max = days.iter().map(|d| d.item(item).total()).max().unwrap_or(0);
    let slot = (CHART_W - CHART_LEFT) / days.len() as f64;
    let width = (slot * 0.75).max(1.0);
    let height = |v: u128| -> f64 {
        if max == 0 {
            0.0
        } else {
            (v as f64 / max as f64) * CHART_H
        }
    };
    let total: u128 = days.iter().map(|d| d.item(item).total()).sum();
    let label = format!(
        "{} per day: {} in all over {} days, at most {} in one day",
        item_label(item),
        amount_text(item, total),
        days.len(),
        amount_text(item, max),
    );
    // Dates under the axis: the first, then about every two weeks, and the last.
    let every = (days.len() / 6).max(1);
    html! {
        figure.chart-figure data-item=(item.as_str()) {
            figcaption.chart-title { (item_label(item)) }
            svg.chart viewBox={ "0 0 " (CHART_W) " " (CHART_TOP + CHART_H + CHART_BOTTOM + 4.0) }
                role="img" aria-label=(label) {
                @for (frac, text) in [(0.0, "0".to_string()), (0.5, amount_text(item, max / 2)), (1.0, amount_text(item, max))] {
                    @let y = CHART_TOP + CHART_H - frac * CHART_H;
                    line.grid x1=(px(CHART_LEFT)) x2=(px(CHART_W)) y1=(px(y)) y2=(px(y)) {}
                    text.axis x=(px(CHART_LEFT - 6.0)) y=(px(y + 4.0)) text-anchor="end" { (text) }
                }
                @if max == 0 {
                    text.empty-note x=(px(CHART_LEFT + 12.0)) y=(px(CHART_TOP + CHART_H / 2.0)) { "No usage in these days." }
                }
                @for (i, d) in days.iter().enumerate() {
                    @let s = d.item(item);
                    @let x = CHART_LEFT + slot * i as f64 + (slot - width) / 2.0;
                    @let hc = height(s.covered);
                    @let ho = height(s.overage);
                    g.day data-date=(d.date) data-covered=(s.covered) data-overage=(s.overage) {
                        title {
                            (d.date) ": " (amount_text(item, s.covered)) " covered, "
                            (amount_text(item, s.overage)) " overage"
                        }
                        @if s.covered > 0 {
                            rect.covered x=(px(x)) width=(px(width)) y=(px(CHART_TOP + CHART_H - hc)) height=(px(hc)) {}
                        }
                        @if s.overage > 0 {
                            rect.overage x=(px(x)) width=(px(width)) y=(px(CHART_TOP + CHART_H - hc - ho)) height=(px(ho)) {}
                        }
                    }
                    @if i % every == 0 || i + 1 == days.len() {
                        // The last date ends at the bar, so it is not cut off.
                        text.axis x=(px(x + width / 2.0)) y=(px(CHART_TOP + CHART_H + CHART_BOTTOM))
                            text-anchor=(if i + 1 == days.len() && days.len() > 1 { "end" } else { "middle" }) {
                            (d.date.format("%m-%d"))
                        }
                    }
                }
            }
        }
    }
}

/// The chart's numbers as text, for readers and screen readers: the days
/// with any usage, newest first.
fn daily_table(days: &[Day]) -> Markup {
    let used: Vec<&Day> = days
        .iter()
        .rev()
        .filter(|d| d.calls.total() + d.egress_bytes.total() > 0)
        .collect();
    html! {
        details.daily-table {
            summary { "The numbers (" (used.len()) " days with usage)" }
            @if !used.is_empty() {
                table {
                    thead { tr {
                        th scope="col" { "Day" }
                        th.num scope="col" { "Calls covered" }
                        th.num scope="col" { "Calls overage" }
                        th.num scope="col" { "Egress covered" }
                        th.num scope="col" { "Egress overage" }
                    } }
                    tbody {
                        @for d in used {
                            tr {
                                td { (d.date) }
                                td.num { (amount(Item::Calls, d.calls.covered)) }
                                td.num { (amount(Item::Calls, d.calls.overage)) }
                                td.num { (amount(Item::EgressBytes, d.egress_bytes.covered)) }
                                td.num { (amount(Item::EgressBytes, d.egress_bytes.overage)) }
                            }
                        }
                    }
                }
            }
        }
    }
}

// === index and error pages ===

/// The admin port's front page: what this is, a form to look an account up,
/// and the operational endpoints.
pub fn render_index() -> String {
    let main = html! {
        main {
            h1 { "packmeter" }
            p.lead { "packmeter meters API-gateway usage, calls and public-network egress bytes, against each account's resource packs: the monthly free-tier packs of the first year after activation, then purchased packs, then pay-as-you-go overage." }
            section.panel {
                h2 { "Look up an account's packs" }
                (lookup_form(""))
            }
            section.panel {
                h2 { "Operations" }
                ul.links {
                    li { a href="/metrics" { "/metrics" } " · Prometheus metrics" }
                    li { a href="/livez" { "/livez" } " · liveness: 200 while the process runs" }
                    li { a href="/readyz" { "/readyz" } " · readiness: 503 while start-up replays the journal, 200 while serving, 503 once shutdown begins" }
                }
            }
        }
    };
    page("packmeter", "", main)
}

/// An error page: `title` as the heading, `message` below it, and the lookup
/// form prefilled with what was asked for.
pub fn render_error(title: &str, message: &str, account_id: &str) -> String {
    let main = html! {
        main {
            h1 { (title) }
            p.error { (message) }
            section.panel {
                h2 { "Look up an account's packs" }
                (lookup_form(account_id))
            }
        }
    };
    page(title, account_id, main)
}

fn lookup_form(account_id: &str) -> Markup {
    html! {
        form.lookup method="get" action="/packs" {
            label for="account" { "Account ID" } " "
            input #account name="account" type="text" maxlength="128" required autofocus value=(account_id);
            " "
            button type="submit" { "Show packs" }
        }
    }
}

// === shared chrome ===

/// A whole page: head, the top bar with its search box (prefilled with
/// `account_id`), `main`, and the footer.
fn page(title: &str, account_id: &str, main: Markup) -> String {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta name="referrer" content="no-referrer";
                title { (title) }
                style { (PreEscaped(CSS)) }
            }
            body {
                header.top {
                    a.brand href="/" { "packmeter" }
                    form.search method="get" action="/packs" {
                        input name="account" type="text" maxlength="128" placeholder="Account ID" aria-label="Account ID" value=(account_id);
                        button type="submit" { "Go" }
                    }
                }
                (main)
                footer {
                    "packmeter · " a href="/metrics" { "metrics" } " · " a href="/livez" { "livez" } " · " a href="/readyz" { "readyz" }
                }
            }
        }
    }
    .into_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packs::PackSpec;

    const T0: Ts = 1_700_000_000_000_000; // 2023-11-14 22:13:20 UTC
    const DAY: Ts = 86_400_000_000;

    fn pack(id: &str, source: PackSource, item: Item, capacity: u64, used: u64) -> PackView {
        PackView {
            account_id: "acme".into(),
            spec: PackSpec {
                pack_id: id.into(),
                source,
                item,
                capacity,
                valid_from: T0,
                valid_until: T0 + 30 * DAY,
                priority: 0,
                created_at: T0,
            },
            used,
            plan: (source == PackSource::FreeTier).then(|| "default".into()),
        }
    }

    /// `render` with no usage chart.
    fn render(account_id: &str, packs: &[PackView], zone: &BillingZone, now: Ts) -> String {
        super::render(account_id, packs, &[], zone, now)
    }

    #[test]
    fn a_hostile_account_id_never_reaches_the_page_unescaped() {
        let hostile = r#"<script>alert(1)</script>"'&"#;
        let packs = [pack(hostile, PackSource::Purchased, Item::Calls, 10, 1)];
        let zone = BillingZone::default();
        for page in [
            render(hostile, &packs, &zone, T0),
            render(hostile, &[], &zone, T0),
            render_error(hostile, hostile, hostile),
        ] {
            assert!(!page.contains("<script"), "{page}");
            assert!(!page.contains(hostile));
            assert!(
                page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;"),
                "{page}"
            );
            // In an attribute too: the quote cannot end the value early.
            assert!(page.contains(r#"value="&lt;script&gt;alert(1)&lt;/script&gt;&quot;'&amp;""#));
        }
    }

    #[test]
    fn bar_width_is_the_used_share_and_never_over_100_percent() {
        assert_eq!(bar_width(0, 1_000_000), "0.0%");
        assert_eq!(bar_width(452_000, 1_000_000), "45.2%");
        assert_eq!(bar_width(1_000_000, 1_000_000), "100.0%");
        assert_eq!(bar_width(1, 1), "100.0%");
        // Floored: a pack reads 100% only when nothing is left.
        assert_eq!(bar_width(999_999, 1_000_000), "99.9%");
        // A store may hold more than a capacity a plan later shrank.
        assert_eq!(bar_width(7, 5), "100.0%");
        let max = u128::from(u64::MAX);
        assert_eq!(bar_width(max, max), "100.0%");
        assert_eq!(bar_width(max - 1, max), "99.9%");
        // A pack without capacity has nothing to use up.
        assert_eq!(bar_width(0, 0), "0.0%");
        assert_eq!(bar_width(3, 0), "0.0%");
    }

    #[test]
    fn a_little_usage_never_reads_as_none() {
        assert_eq!(used_text(1, 1_000_000), "<0.1%");
        assert_eq!(used_text(0, 1_000_000), "0.0%");
    }

    #[test]
    fn the_rendered_bar_matches_the_row() {
        let page = render(
            "acme",
            &[pack("p1", PackSource::FreeTier, Item::Calls, 5, 5)],
            &BillingZone::default(),
            T0,
        );
        assert!(page.contains(r#"style="width:100.0%""#), "{page}");
        assert!(page.contains(r#"aria-label="100.0% used""#));
        assert!(page.contains("Used up"));
    }

    #[test]
    fn an_empty_pack_list_says_so() {
        let page = render("acme", &[], &BillingZone::default(), T0);
        assert!(page.contains("This account has no packs"), "{page}");
        assert!(page.contains("No pack is valid now"));
        assert!(!page.contains("<table"));
    }

    #[test]
    fn packs_valid_now_come_first_then_upcoming_then_expired() {
        let mut expired = pack("old", PackSource::FreeTier, Item::Calls, 1, 1);
        expired.spec.valid_until = T0;
        expired.spec.valid_from = T0 - DAY;
        let mut upcoming = pack("next", PackSource::FreeTier, Item::Calls, 1, 0);
        upcoming.spec.valid_from = T0 + 30 * DAY;
        upcoming.spec.valid_until = T0 + 60 * DAY;
        let mut bought = pack("bought", PackSource::Purchased, Item::Calls, 9, 0);
        bought.spec.priority = 3;
        let free = pack("free", PackSource::FreeTier, Item::Calls, 1, 0);
        let page = render(
            "acme",
            &[expired, free, bought, upcoming],
            &BillingZone::default(),
            T0,
        );
        let at = |id: &str| page.find(&format!("<code>{id}</code>")).unwrap();
        assert!(at("free") < at("bought"), "R6: free tier is deducted first");
        assert!(at("bought") < at("next"));
        assert!(at("next") < at("old"));
        assert!(page.contains("priority 3"));
        assert_eq!(page.matches(r#"<tr class="group">"#).count(), 3);
    }

    #[test]
    fn egress_is_human_readable_with_exact_bytes_in_the_title() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1023), "1023 B");
        assert_eq!(human_bytes(1024), "1.00 KiB");
        assert_eq!(human_bytes(1 << 30), "1.00 GiB");
        assert_eq!(human_bytes((1 << 30) + (1 << 29)), "1.50 GiB");
        assert_eq!(human_bytes((1 << 20) - 1), "1.00 MiB");
        assert_eq!(human_bytes(u64::MAX.into()), "16.00 EiB");
        let page = render(
            "acme",
            &[pack(
                "e",
                PackSource::FreeTier,
                Item::EgressBytes,
                1 << 30,
                0,
            )],
            &BillingZone::default(),
            T0,
        );
        assert!(
            page.contains(r#"<span title="1,073,741,824 bytes">1.00 GiB</span>"#),
            "{page}"
        );
        assert_eq!(grouped(1_000_000), "1,000,000");
        assert_eq!(grouped(999), "999");
        assert_eq!(grouped(1_000), "1,000");
        assert_eq!(grouped(1_001_010), "1,001,010");
        assert_eq!(grouped(u64::MAX.into()), "18,446,744,073,709,551,615");
    }

    #[test]
    fn packs_are_marked_upcoming_current_or_expired_with_an_exclusive_end() {
        let p = pack("p", PackSource::FreeTier, Item::Calls, 1, 0);
        assert_eq!(Validity::of(&p, T0 - 1), Validity::Upcoming);
        assert_eq!(Validity::of(&p, T0), Validity::Current);
        assert_eq!(Validity::of(&p, T0 + 30 * DAY - 1), Validity::Current);
        assert_eq!(Validity::of(&p, T0 + 30 * DAY), Validity::Expired);
    }

    #[test]
    fn validity_is_shown_in_the_billing_zone() {
        let page = render(
            "acme",
            &[pack("p", PackSource::FreeTier, Item::Calls, 1, 0)],
            &BillingZone::default(),
            T0,
        );
        // 22:13:20 UTC is 06:13:20 the next day at +08:00.
        assert!(
            page.contains(
                r#"<time datetime="2023-11-15T06:13:20+08:00">2023-11-15 06:13:20</time>"#
            ),
            "{page}"
        );
        let utc: BillingZone = "UTC".parse().unwrap();
        let page = render(
            "acme",
            &[pack("p", PackSource::FreeTier, Item::Calls, 1, 0)],
            &utc,
            T0,
        );
        assert!(page.contains(">2023-11-14 22:13:20</time>"));
    }
    fn day(date: &str, calls: (u128, u128), egress: (u128, u128)) -> Day {
        use crate::daily::Split;
        Day {
            date: date.parse().unwrap(),
            calls: Split {
                covered: calls.0,
                overage: calls.1,
            },
            egress_bytes: Split {
                covered: egress.0,
                overage: egress.1,
            },
        }
    }

    #[test]
    fn the_chart_has_a_bar_per_day_with_overage_stacked_on_covered() {
        let days = [
            day("2026-12-01", (600, 200), (0, 0)),
            day("2026-12-02", (0, 0), (0, 0)),
            day("2026-12-03", (400, 0), (1 << 30, 0)),
        ];
        let page = super::render("acme", &[], &days, &BillingZone::default(), T0);
        assert_eq!(page.matches(r#"<g class="day""#).count(), 6, "{page}");
        assert!(page.contains(
            r#"<g class="day" data-date="2026-12-01" data-covered="600" data-overage="200">"#
        ));
        // The busiest day (800 calls) fills the chart's height; its covered
        // part is 600/800 of it, and the overage sits on top.
        assert!(
            page.contains(r#"class="covered" x="109.0" width="222.0" y="40.0" height="90.0""#),
            "{page}"
        );
        assert!(page.contains(r#"class="overage" x="109.0" width="222.0" y="10.0" height="30.0""#));
        // A day without usage has no rect, only its tooltip.
        assert!(page.contains("2026-12-02: 0 covered, 0 overage"));
        assert!(page.contains("2026-12-03: 1.00 GiB covered, 0 B overage"));
        // Overage is hatched, defined once, and the legend says which is which.
        assert_eq!(page.matches(r#"id="hatch-overage""#).count(), 1);
        assert!(page.contains("Overage, billed pay-as-you-go (hatched)"));
        // The numbers as text, newest first, only days with usage.
        assert!(page.contains("The numbers (2 days with usage)"));
        assert!(
            page.find("<td>2026-12-03</td>").unwrap() < page.find("<td>2026-12-01</td>").unwrap()
        );
    }

    #[test]
    fn a_chart_without_usage_says_so() {
        let days = [day("2026-12-01", (0, 0), (0, 0))];
        let page = super::render("acme", &[], &days, &BillingZone::default(), T0);
        assert_eq!(page.matches("No usage in these days.").count(), 2);
        // Only the legend's swatch: no bar.
        assert_eq!(page.matches(r#"<rect class="covered""#).count(), 1);
    }
}
