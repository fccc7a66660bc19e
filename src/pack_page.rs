//! The pack page (R11): an account's resource packs as HTML, the way a cloud
//! console lists them, served by [`admin_http`](crate::admin_http) at
//! `/packs?account=ID`, plus the admin port's index page and error pages.
//!
//! Everything here is a pure function from data to a `String`, so the pages
//! are tested without a server. The pages need no external asset: the CSS is
//! inline and there is no script, so they work offline and under a
//! `default-src 'none'` Content-Security-Policy. Every interpolated value goes
//! through [`Esc`], which escapes `& < > " '`, so an account id (which may hold
//! any printable character) cannot inject markup.

use std::fmt::{self, Write};

use crate::{
    calendar::{to_datetime, BillingZone, Ts},
    meter::PackView,
    packs::{deduction_order, Item, PackSource},
};

// === escaping ===

/// Displays a string with the HTML special characters escaped. Safe both in
/// text and in a quoted attribute value.
pub struct Esc<'a>(pub &'a str);

impl fmt::Display for Esc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut rest = self.0;
        while let Some(i) = rest.find(['&', '<', '>', '"', '\'']) {
            f.write_str(&rest[..i])?;
            f.write_str(match rest.as_bytes()[i] {
                b'&' => "&amp;",
                b'<' => "&lt;",
                b'>' => "&gt;",
                b'"' => "&quot;",
                _ => "&#39;",
            })?;
            rest = &rest[i + 1..];
        }
        f.write_str(rest)
    }
}

/// `s` with `& < > " '` escaped, for HTML text and quoted attributes.
pub fn escape_html(s: &str) -> String {
    Esc(s).to_string()
}

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

/// Writes an amount of `item`: calls as a grouped count, egress in binary
/// units with the exact byte count in a tooltip.
fn amount(out: &mut String, item: Item, n: u128) -> fmt::Result {
    match item {
        Item::Calls => write!(out, "{}", grouped(n)),
        Item::EgressBytes => write!(
            out,
            r#"<span title="{} bytes">{}</span>"#,
            grouped(n),
            human_bytes(n)
        ),
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

fn time(out: &mut String, zone: &BillingZone, ts: Ts) -> fmt::Result {
    let (shown, machine) = local_time(zone, ts);
    write!(
        out,
        r#"<time datetime="{}">{}</time>"#,
        Esc(&machine),
        Esc(&shown)
    )
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
/// shown in the billing `zone`.
pub fn render(account_id: &str, packs: &[PackView], zone: &BillingZone, now: Ts) -> String {
    let mut out = String::with_capacity(8192 + packs.len() * 1024);
    write_pack_page(&mut out, account_id, packs, zone, now)
        .expect("writing to a String cannot fail");
    out
}

fn write_pack_page(
    out: &mut String,
    account_id: &str,
    packs: &[PackView],
    zone: &BillingZone,
    now: Ts,
) -> fmt::Result {
    let id = Esc(account_id);
    head(out, &format!("Resource packs · {account_id}"))?;
    nav(out, account_id)?;
    let (as_of, as_of_machine) = local_time(zone, now);
    write!(
        out,
        r#"<main>
<h1>Resource packs <span class="account">{id}</span></h1>
<p class="meta">As of <time datetime="{}">{}</time> · times in the billing zone <b>{}</b> · each validity ends just before its end time</p>
"#,
        Esc(&as_of_machine),
        Esc(&as_of),
        Esc(&zone_label(zone)),
    )?;
    summary(out, packs, now)?;
    if packs.is_empty() {
        out.push_str(
            r#"<p class="empty">This account has no packs: it has not been activated yet, so it has no free-tier packs, and no pack has been purchased for it.</p>
"#,
        );
    } else {
        table(out, packs, zone, now)?;
    }
    out.push_str("</main>\n");
    foot(out)
}

/// `UTC+08:00`, or an IANA name as is.
fn zone_label(zone: &BillingZone) -> String {
    match zone {
        BillingZone::Fixed(o) => format!("UTC{o}"),
        BillingZone::Named(tz) => tz.name().to_string(),
    }
}

/// One card per item: what the packs valid now hold in total.
fn summary(out: &mut String, packs: &[PackView], now: Ts) -> fmt::Result {
    out.push_str(r#"<section class="cards" aria-label="Valid now">"#);
    for item in Item::ALL {
        let current = packs
            .iter()
            .filter(|p| p.spec.item == item && Validity::of(p, now) == Validity::Current);
        // u128: the capacities of a few packs near 2^63 already pass 2^64,
        // and a saturated total would misstate what remains.
        let (mut capacity, mut used, mut n) = (0u128, 0u128, 0usize);
        for p in current {
            capacity += u128::from(p.spec.capacity);
            used += u128::from(p.used.min(p.spec.capacity));
            n += 1;
        }
        write!(
            out,
            r#"<div class="card"><div class="card-title">{} · valid now</div><div class="card-big">"#,
            item_label(item)
        )?;
        if n == 0 {
            out.push_str(
                r#"–</div><div class="card-sub">No pack is valid now: usage is billed as overage.</div></div>"#,
            );
            continue;
        }
        amount(out, item, capacity - used)?;
        out.push_str(r#"</div><div class="card-sub">remaining of "#);
        amount(out, item, capacity)?;
        write!(out, " in {n} pack{}</div>", if n == 1 { "" } else { "s" })?;
        bar(out, used, capacity)?;
        out.push_str("</div>");
    }
    out.push_str("</section>\n");
    Ok(())
}

/// The usage bar: a track, a fill as wide as the used share, and the share
/// as text; screen readers get it as a labelled progress bar.
fn bar(out: &mut String, used: u128, capacity: u128) -> fmt::Result {
    let p = used_permille(used, capacity);
    let level = match p {
        1000 => "full",
        800..=999 => "high",
        _ => "ok",
    };
    let text = used_text(used, capacity);
    write!(
        out,
        r#"<div class="usage"><div class="bar" role="progressbar" aria-valuemin="0" aria-valuemax="100" aria-valuenow="{}.{}" aria-label="{} used"><div class="fill {level}" style="width:{}"></div></div><span class="pct">{}</span></div>"#,
        p / 10,
        p % 10,
        Esc(&text),
        bar_width(used, capacity),
        Esc(&text),
    )
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

fn table(out: &mut String, packs: &[PackView], zone: &BillingZone, now: Ts) -> fmt::Result {
    out.push_str(
        r#"<div class="table-wrap"><table>
<caption>Every pack of the account, free tier and purchased: valid now (in the order deductions use them), upcoming, then expired.</caption>
<thead><tr><th scope="col">Status</th><th scope="col">Source</th><th scope="col">Pack ID</th><th scope="col">Item</th><th scope="col" class="num">Capacity</th><th scope="col" class="num">Used</th><th scope="col" class="num">Remaining</th><th scope="col">Validity</th><th scope="col">Usage</th></tr></thead>
"#,
    );
    let rows = display_order(packs, now);
    let mut group = None;
    for (validity, p) in rows.iter().copied() {
        if group != Some(validity) {
            if group.is_some() {
                out.push_str("</tbody>\n");
            }
            group = Some(validity);
            let n = rows.iter().filter(|(v, _)| *v == validity).count();
            writeln!(
                out,
                r#"<tbody><tr class="group"><th scope="rowgroup" colspan="{COLUMNS}">{} <span class="count">{n}</span></th></tr>"#,
                validity.label()
            )?;
        }
        row(out, validity, p, zone)?;
    }
    if group.is_some() {
        out.push_str("</tbody>");
    }
    out.push_str("</table></div>\n");
    Ok(())
}

fn row(out: &mut String, validity: Validity, p: &PackView, zone: &BillingZone) -> fmt::Result {
    let used = p.used.min(p.spec.capacity);
    let (source, source_class) = source_label(p.spec.source);
    write!(
        out,
        r#"<tr class="{}"><td><div class="status"><span class="badge {}">{}</span>"#,
        validity.class(),
        validity.class(),
        validity.label()
    )?;
    if validity == Validity::Current && used >= p.spec.capacity {
        out.push_str(r#"<span class="badge exhausted">Used up</span>"#);
    }
    write!(
        out,
        r#"</div></td><td><span class="src {source_class}">{source}</span></td><td><code>{}</code>"#,
        Esc(&p.spec.pack_id)
    )?;
    if p.spec.source == PackSource::Purchased {
        write!(
            out,
            r#"<div class="sub">priority {}</div>"#,
            p.spec.priority
        )?;
    }
    write!(
        out,
        r#"</td><td>{}</td><td class="num">"#,
        item_label(p.spec.item)
    )?;
    amount(out, p.spec.item, p.spec.capacity.into())?;
    out.push_str(r#"</td><td class="num">"#);
    amount(out, p.spec.item, used.into())?;
    out.push_str(r#"</td><td class="num">"#);
    amount(out, p.spec.item, (p.spec.capacity - used).into())?;
    out.push_str(r#"</td><td class="validity">"#);
    time(out, zone, p.spec.valid_from)?;
    out.push_str(r#" <span class="to">–</span> "#);
    time(out, zone, p.spec.valid_until)?;
    out.push_str("</td><td>");
    bar(out, used.into(), p.spec.capacity.into())?;
    out.push_str("</td></tr>\n");
    Ok(())
}

// === index and error pages ===

/// The admin port's front page: what this is, a form to look an account up,
/// and the operational endpoints.
pub fn render_index() -> String {
    let mut out = String::with_capacity(4096);
    write_index(&mut out).expect("writing to a String cannot fail");
    out
}

fn write_index(out: &mut String) -> fmt::Result {
    head(out, "packmeter")?;
    nav(out, "")?;
    out.push_str(
        r#"<main>
<h1>packmeter</h1>
<p class="lead">packmeter meters API-gateway usage, calls and public-network egress bytes, against each account's resource packs: the monthly free-tier packs of the first year after activation, then purchased packs, then pay-as-you-go overage.</p>
<section class="panel">
<h2>Look up an account's packs</h2>
"#,
    );
    lookup_form(out, "")?;
    out.push_str(
        r#"</section>
<section class="panel">
<h2>Operations</h2>
<ul class="links">
<li><a href="/metrics">/metrics</a> · Prometheus metrics</li>
<li><a href="/livez">/livez</a> · liveness: 200 while the process runs</li>
<li><a href="/readyz">/readyz</a> · readiness: 503 while start-up replays the journal, 200 while serving, 503 once shutdown begins</li>
</ul>
</section>
</main>
"#,
    );
    foot(out)
}

/// An error page: `title` as the heading, `message` below it, and the lookup
/// form prefilled with what was asked for.
pub fn render_error(title: &str, message: &str, account_id: &str) -> String {
    let mut out = String::with_capacity(4096);
    write_error(&mut out, title, message, account_id).expect("writing to a String cannot fail");
    out
}

fn write_error(out: &mut String, title: &str, message: &str, account_id: &str) -> fmt::Result {
    head(out, title)?;
    nav(out, account_id)?;
    write!(
        out,
        r#"<main>
<h1>{}</h1>
<p class="error">{}</p>
<section class="panel">
<h2>Look up an account's packs</h2>
"#,
        Esc(title),
        Esc(message)
    )?;
    lookup_form(out, account_id)?;
    out.push_str("</section>\n</main>\n");
    foot(out)
}

fn lookup_form(out: &mut String, account_id: &str) -> fmt::Result {
    writeln!(
        out,
        r#"<form class="lookup" method="get" action="/packs"><label for="account">Account ID</label> <input id="account" name="account" type="text" maxlength="128" required autofocus value="{}"> <button type="submit">Show packs</button></form>"#,
        Esc(account_id),
    )
}

// === shared chrome ===

fn head(out: &mut String, title: &str) -> fmt::Result {
    write!(
        out,
        r#"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>{}</title>
<style>{CSS}</style>
</head>
<body>
"#,
        Esc(title)
    )
}

fn nav(out: &mut String, account_id: &str) -> fmt::Result {
    writeln!(
        out,
        r#"<header class="top"><a class="brand" href="/">packmeter</a><form class="search" method="get" action="/packs"><input name="account" type="text" maxlength="128" placeholder="Account ID" aria-label="Account ID" value="{}"><button type="submit">Go</button></form></header>"#,
        Esc(account_id)
    )
}

fn foot(out: &mut String) -> fmt::Result {
    out.push_str(
        r#"<footer>packmeter · <a href="/metrics">metrics</a> · <a href="/livez">livez</a> · <a href="/readyz">readyz</a></footer>
</body>
</html>
"#,
    );
    Ok(())
}

/// The pages' only style sheet. System fonts only: nothing is fetched.
const CSS: &str = r#"
:root{--bg:#f3f5f8;--card:#fff;--ink:#1f2933;--muted:#66727f;--line:#e1e6ec;--accent:#1467d6;--ok:#1f9d55;--warn:#e08a00;--bad:#d64545}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--ink);font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans","Liberation Sans",sans-serif}
a{color:var(--accent);text-decoration:none}a:hover{text-decoration:underline}
.top{display:flex;align-items:center;gap:24px;background:#16202c;color:#fff;padding:10px 24px}
.brand{color:#fff;font-weight:600;font-size:16px;letter-spacing:.2px}
.search{margin-left:auto;display:flex;gap:6px}
.search input{width:260px;padding:5px 8px;border:1px solid #3b4a5c;border-radius:4px;background:#233140;color:#fff}
.search input::placeholder{color:#9aa8b6}
button{padding:5px 12px;border:1px solid var(--accent);border-radius:4px;background:var(--accent);color:#fff;font:inherit;cursor:pointer}
main{max-width:1280px;margin:0 auto;padding:20px 24px 32px}
h1{font-size:20px;font-weight:600;margin:4px 0 4px}
h1 .account{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"Liberation Mono",monospace;font-weight:500;background:#e7edf5;border-radius:4px;padding:1px 8px;margin-left:6px;word-break:break-all}
h2{font-size:15px;font-weight:600;margin:0 0 10px}
.meta,.lead{color:var(--muted);margin:0 0 16px}
.lead{max-width:760px;color:var(--ink)}
.panel{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:16px 20px;margin-bottom:16px;max-width:760px}
.lookup input{width:320px;padding:6px 8px;border:1px solid #c3ccd6;border-radius:4px;font:inherit}
.links{margin:0;padding-left:18px}.links li{margin:4px 0}
.error{background:#fdecec;border:1px solid #f3c2c2;color:#8a1f1f;border-radius:6px;padding:10px 14px;max-width:760px;word-break:break-all}
.cards{display:flex;gap:16px;margin-bottom:16px;flex-wrap:wrap}
.card{background:var(--card);border:1px solid var(--line);border-radius:6px;padding:14px 18px;min-width:280px}
.card-title{color:var(--muted);font-size:12px;text-transform:uppercase;letter-spacing:.5px}
.card-big{font-size:24px;font-weight:600;margin:2px 0}
.card-sub{color:var(--muted);font-size:12px;margin-bottom:8px}
.table-wrap{background:var(--card);border:1px solid var(--line);border-radius:6px;overflow-x:auto}
table{border-collapse:collapse;width:100%}
caption{caption-side:top;text-align:left;color:var(--muted);font-size:12px;padding:10px 14px;border-bottom:1px solid var(--line)}
th{background:#f7f9fb;color:var(--muted);font-weight:600;font-size:12px;text-align:left;padding:8px 10px;border-bottom:1px solid var(--line);white-space:nowrap}
td{padding:7px 10px;border-bottom:1px solid var(--line);vertical-align:middle;white-space:nowrap}
tbody:last-child tr:last-child td{border-bottom:0}
tbody tr:hover td{background:#f9fbfd}
tr.group th{background:#eef2f6;color:var(--ink);font-size:12px;padding:6px 10px;border-top:1px solid var(--line)}
tr.group .count{display:inline-block;min-width:18px;text-align:center;background:#d9e1ea;color:#3d4b59;border-radius:9px;padding:0 6px;margin-left:4px;font-weight:600}
.status{display:flex;flex-direction:column;align-items:flex-start;gap:3px}
tr.current td:first-child{box-shadow:inset 3px 0 0 var(--ok)}
tr.expired td{color:#8a96a3}
tr.upcoming td{color:#4a5866}
.num{text-align:right;font-variant-numeric:tabular-nums}
code{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,"Liberation Mono",monospace;font-size:12px}
.sub{color:var(--muted);font-size:11px}
.validity{font-variant-numeric:tabular-nums;font-size:12px}.to{color:var(--muted)}
.badge{display:inline-block;font-size:11px;font-weight:600;border-radius:10px;padding:1px 8px;border:1px solid}
.badge.current{color:#17693c;background:#e6f6ec;border-color:#b7e2c7}
.badge.expired{color:#6b7682;background:#eef1f4;border-color:#d9dee4}
.badge.upcoming{color:#1c5aa8;background:#e8f0fb;border-color:#c0d5f2}
.badge.exhausted{color:#9b2c2c;background:#fdecec;border-color:#f3c2c2}
.src{font-size:12px}.src.free{color:#0f7b6c}.src.purchased{color:#6b3fb5}
.src::before{content:"";display:inline-block;width:8px;height:8px;border-radius:50%;margin-right:6px;background:currentColor}
.usage{display:flex;align-items:center;gap:8px}
.bar{width:96px;height:8px;background:#e4e9ef;border-radius:4px;overflow:hidden;flex:none}
.fill{height:100%;background:var(--accent);border-radius:4px}
.fill.high{background:var(--warn)}.fill.full{background:var(--bad)}
.pct{font-size:12px;font-variant-numeric:tabular-nums;min-width:42px;color:inherit}
.card .bar{width:160px}
.empty{background:var(--card);border:1px dashed #c3ccd6;border-radius:6px;padding:24px;color:var(--muted);text-align:center}
footer{max-width:1280px;margin:0 auto;padding:0 24px 24px;color:var(--muted);font-size:12px}
"#;

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
        }
    }

    #[test]
    fn escapes_the_five_special_characters() {
        assert_eq!(
            escape_html(r#"<script>alert(1)</script>"'&"#),
            "&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"
        );
        assert_eq!(escape_html("plain-id_1"), "plain-id_1");
        assert_eq!(escape_html("ü→✓"), "ü→✓");
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
            assert!(page.contains("&lt;script&gt;alert(1)&lt;/script&gt;&quot;&#39;&amp;"));
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
}
