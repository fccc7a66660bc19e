//! The pack page (R11) as a person sees it: headless Chromium loads
//! `/packs?account=acme` from the real binary, and the test reads the DOM it
//! rendered with CSS selectors: the summary cards against `ListPacks`, the
//! order of the rows, the usage chart's bars against `ExportUsage`, a
//! hostile account id as text, and no console error (a Content-Security-Policy
//! violation would be one). A screenshot is kept at
//! `$CARGO_TARGET_TMPDIR/pack_page.png` for a look.
//!
//! The account is activated 200 days ago (the server first runs with a long
//! late grace so that past event times are accepted), so the page holds
//! expired, current and upcoming free-tier packs, a used-up pack, and a
//! purchased one. The server is then restarted with a 30-day grace, so the
//! hours before that are settled and exported, while the last 30 days are
//! still open: the chart shows both.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::Server;
use packmeter::grpc::proto::{self, Item};
use prost_types::Timestamp;
use scraper::{ElementRef, Html, Selector};

const DAY: i64 = 86_400;

fn at(seconds: i64) -> Option<Timestamp> {
    Some(Timestamp { seconds, nanos: 0 })
}

fn deduct_at(account: &str, calls: u64, egress: u64, seconds: i64) -> proto::DeductRequest {
    proto::DeductRequest {
        account_id: account.into(),
        calls,
        egress_bytes: egress,
        at: at(seconds),
        request_id: String::new(),
    }
}

/// Runs headless Chromium with a fresh profile and `args`; returns stdout
/// and stderr (where `--enable-logging=stderr` puts the console).
fn chromium(browser: &Path, profile: &Path, args: &[&str]) -> (String, String) {
    let mut child = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--window-size=1280,900",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start chromium");
    // Chromium has hung on broken setups; never let it hang the suite.
    let deadline = Instant::now() + Duration::from_secs(90);
    while child.try_wait().expect("poll chromium").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("chromium did not finish within 90 s: {args:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().expect("chromium output");
    assert!(
        out.status.success(),
        "chromium {args:?} failed: {:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The DOM Chromium rendered for `url`, and the console messages it logged
/// while loading it.
fn rendered(browser: &Path, profile: &Path, url: &str) -> (Html, Vec<String>) {
    let (dom, log) = chromium(
        browser,
        profile,
        &["--enable-logging=stderr", "--v=0", "--dump-dom", url],
    );
    let console = log
        .lines()
        .filter(|l| l.contains(":CONSOLE"))
        .map(str::to_string)
        .collect();
    (Html::parse_document(&dom), console)
}

fn sel(css: &str) -> Selector {
    Selector::parse(css).unwrap_or_else(|e| panic!("selector {css}: {e}"))
}

/// The text a person reads in `e`, whitespace collapsed.
fn text(e: ElementRef) -> String {
    e.text()
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// A count with thousands separators, as the page shows calls.
fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Screenshots `url` into `file` with a profile of its own; returns the PNG.
fn screenshot(browser: &Path, dir: &Path, name: &str, url: &str) -> Vec<u8> {
    let file = dir.join(format!("{name}.png"));
    let _ = chromium(
        browser,
        &dir.join(format!("profile-{name}")),
        &[&format!("--screenshot={}", file.display()), url],
    );
    std::fs::read(&file).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", file.display()))
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

#[tokio::test]
async fn chromium_shows_the_packs_and_the_usage_chart_as_listed_and_exported() {
    let Some(browser) = common::tool("chromium", "apt-get install -y chromium") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(
        dir.path(),
        &["--late-grace", "3650d", "--dedup-window", "3650d"],
    );
    let mut meter = server.meter().await;
    let mut admin = server.admin().await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // Activated 200 days ago, with usage in a few past months, some of it
    // in the chart's 90 days ...
    let activated = now - 200 * DAY;
    for (days, calls, egress) in [
        (0, 120_000, 300 << 20),
        (40, 1_000_000, 1 << 30),
        (100, 730_000, 90 << 20),
        (125, 250_000, 7 << 20),
        (150, 300_000, 0),
        (150, 900_000, 2 << 20),
        (165, 40_000, 3 << 30),
        (190, 1_234, 5_678),
    ] {
        meter
            .deduct(deduct_at("acme", calls, egress, activated + days * DAY))
            .await
            .unwrap();
    }
    // ... a purchased pack valid for the next 90 days ...
    admin
        .grant_pack(proto::GrantPackRequest {
            account_id: "acme".into(),
            item: Item::Calls as i32,
            capacity: 5_000_000,
            valid_from: at(now - DAY),
            valid_until: at(now + 90 * DAY),
            pack_id: "pk-spring-promo".into(),
            priority: 10,
            valid_for: None,
        })
        .await
        .unwrap();
    // ... and this month's free calls used up, the rest going to the purchased pack.
    let r = meter
        .deduct(deduct_at("acme", 1_600_000, 800 << 20, now))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.decision, proto::Decision::Allow as i32);
    // A hostile account id, to be shown as text.
    let hostile = r#"<script>alert(1)</script><img src=x onerror=alert(2)>"'&"#;
    meter.deduct(deduct_at(hostile, 1, 0, now)).await.unwrap();
    admin.flush(proto::FlushRequest {}).await.unwrap();

    // Restarted with a 30-day grace: the hours before it are settled.
    let (status, log) = server.terminate();
    assert!(status.success(), "{log}");
    let server = Server::start_on(&dir.path().join("packmeter.db"), &["--late-grace", "30d"]);
    let mut admin = server.admin().await;
    let packs = admin
        .list_packs(proto::ListPacksRequest {
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .packs;
    let (dom, console) = rendered(
        &browser,
        &dir.path().join("profile-dom"),
        &format!("http://{}/packs?account=acme", server.admin),
    );
    assert!(console.is_empty(), "console messages: {console:#?}");
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;

    // The summary cards: what the packs valid now have left, per item.
    let valid_now = |p: &&proto::Pack| {
        p.valid_from.as_ref().unwrap().seconds <= now
            && now < p.valid_until.as_ref().unwrap().seconds
    };
    let remaining = |item: Item| -> u64 {
        packs
            .iter()
            .filter(valid_now)
            .filter(|p| p.item == item as i32)
            .map(|p| p.capacity - p.used.min(p.capacity))
            .sum()
    };
    let cards: Vec<ElementRef> = dom.select(&sel(".card")).collect();
    assert_eq!(cards.len(), 2);
    let big = |card: ElementRef| card.select(&sel(".card-big")).next().map(text).unwrap();
    assert_eq!(big(cards[0]), grouped(remaining(Item::Calls)), "calls card");
    let egress_title = cards[1]
        .select(&sel(".card-big span"))
        .next()
        .and_then(|e| e.value().attr("title"))
        .unwrap();
    assert_eq!(
        egress_title,
        format!("{} bytes", grouped(remaining(Item::EgressBytes))),
        "egress card"
    );
    assert_eq!(
        remaining(Item::Calls),
        4_400_000,
        "this month: 1,000,000 free + 5,000,000 bought - 1,600,000"
    );

    // The rows: every pack once, valid now first in R6 order (ListPacks'
    // order) per item, then upcoming soonest first, then expired latest first.
    let shown: Vec<String> = dom
        .select(&sel("tbody tr:not(.group) code"))
        .map(text)
        .collect();
    let from = |p: &proto::Pack| p.valid_from.as_ref().unwrap().seconds;
    let mut current: Vec<(i32, usize, &proto::Pack)> = packs
        .iter()
        .enumerate()
        .filter(|(_, p)| valid_now(p))
        .map(|(i, p)| (p.item, i, p))
        .collect();
    current.sort_by_key(|(item, i, _)| (*item, *i));
    let mut upcoming: Vec<&proto::Pack> = packs.iter().filter(|p| from(p) > now).collect();
    upcoming.sort_by_key(|p| (from(p), p.item));
    let mut expired: Vec<&proto::Pack> = packs
        .iter()
        .filter(|p| p.valid_until.as_ref().unwrap().seconds <= now)
        .collect();
    expired.sort_by_key(|p| (std::cmp::Reverse(from(p)), p.item));
    let expected: Vec<String> = current
        .iter()
        .map(|(_, _, p)| *p)
        .chain(upcoming)
        .chain(expired)
        .map(|p| p.pack_id.clone())
        .collect();
    assert_eq!(shown, expected);
    assert_eq!(shown.len(), packs.len());
    assert!(shown.contains(&"pk-spring-promo".to_string()));
    let groups: Vec<String> = dom.select(&sel("tr.group th")).map(text).collect();
    assert!(groups[0].starts_with("Valid now"), "{groups:?}");
    // The used-up free calls of this month say so.
    let used_up = dom
        .select(&sel("tr.current"))
        .find(|r| text(*r).contains("Used up"))
        .map(text)
        .expect("a used-up pack");
    assert!(
        used_up.contains("Free tier") && used_up.contains("100.0%"),
        "{used_up}"
    );

    // The chart: one bar per day and item, matching the exported rows for
    // settled days, and what was deducted for the open ones.
    let mut exported: std::collections::BTreeMap<(String, i32, bool), u64> = Default::default();
    let mut rows = admin
        .export_usage(proto::ExportUsageRequest {
            from: at(now - 100 * DAY),
            to: at(now + DAY),
            account_id: "acme".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let zone = chrono::FixedOffset::east_opt(8 * 3600).unwrap();
    let day_of = |seconds: i64| {
        chrono::DateTime::from_timestamp(seconds, 0)
            .unwrap()
            .with_timezone(&zone)
            .date_naive()
            .to_string()
    };
    let mut settled_days = std::collections::BTreeSet::new();
    while let Some(row) = rows.message().await.unwrap() {
        let day = day_of(row.hour.unwrap().seconds);
        settled_days.insert(day.clone());
        *exported
            .entry((day, row.item, !row.pack_id.is_empty()))
            .or_default() += row.amount;
    }
    assert!(
        settled_days.len() >= 3,
        "the 125, 150 and 165-day events are settled and exported: {settled_days:?}"
    );
    for (item, label) in [(Item::Calls, "calls"), (Item::EgressBytes, "egress_bytes")] {
        let figure = dom
            .select(&sel(&format!("figure[data-item={label}]")))
            .next()
            .unwrap_or_else(|| panic!("no {label} chart"));
        let bars: Vec<ElementRef> = figure.select(&sel("g.day")).collect();
        assert_eq!(bars.len(), 90, "{label}: one bar per day");
        let num = |e: &ElementRef, a: &str| -> u64 { e.value().attr(a).unwrap().parse().unwrap() };
        let max = bars
            .iter()
            .map(|b| num(b, "data-covered") + num(b, "data-overage"))
            .max()
            .unwrap();
        for bar in &bars {
            let day = bar.value().attr("data-date").unwrap().to_string();
            let (covered, overage) = (num(bar, "data-covered"), num(bar, "data-overage"));
            if settled_days.contains(&day) {
                let want = |c| {
                    exported
                        .get(&(day.clone(), item as i32, c))
                        .copied()
                        .unwrap_or(0)
                };
                assert_eq!(
                    (covered, overage),
                    (want(true), want(false)),
                    "{label} on {day}"
                );
            }
            // The bars are as tall as the amounts, on one scale.
            for (class, amount) in [("covered", covered), ("overage", overage)] {
                let rect = bar.select(&sel(&format!("rect.{class}"))).next();
                match rect {
                    None => assert_eq!(amount, 0, "{label} {class} on {day} has no bar"),
                    Some(r) => {
                        let h: f64 = r.value().attr("height").unwrap().parse().unwrap();
                        let want = amount as f64 / max as f64 * 120.0;
                        assert!(
                            (h - want).abs() < 0.06,
                            "{label} {class} on {day}: height {h}, want {want}"
                        );
                    }
                }
            }
        }
        // Every deduction in the window is in the chart: the settled ones
        // as exported, the open ones (today's) as deducted.
        let sum = |a: &str| bars.iter().map(|b| num(b, a)).sum::<u64>();
        let in_window: u64 = exported
            .iter()
            .filter(|((_, i, _), _)| *i == item as i32)
            .map(|(_, v)| v)
            .sum::<u64>()
            + match item {
                Item::Calls => 1_600_000 + 1_234,
                _ => (800 << 20) + 5_678,
            };
        assert_eq!(
            sum("data-covered") + sum("data-overage"),
            in_window,
            "{label}"
        );
    }

    // A hostile account id is text in the DOM, never markup.
    let (dom, console) = rendered(
        &browser,
        &dir.path().join("profile-hostile"),
        &format!(
            "http://{}/packs?account={}",
            server.admin,
            url_encode(hostile)
        ),
    );
    assert!(console.is_empty(), "console messages: {console:#?}");
    let shown = dom.select(&sel("h1 .account")).next().map(text).unwrap();
    assert_eq!(shown, hostile);
    assert_eq!(dom.select(&sel("script")).count(), 0);
    assert_eq!(dom.select(&sel("main img")).count(), 0);
    let title = dom.select(&sel("title")).next().map(text).unwrap();
    assert_eq!(title, format!("Resource packs · {hostile}"));

    // What a person sees: a real picture, not an empty page.
    let url = format!("http://{}/packs?account=acme", server.admin);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let page = screenshot(&browser, dir.path(), "pack_page", &url);
    std::fs::write(shots.join("pack_page.png"), &page).unwrap();
    assert!(page.starts_with(PNG_MAGIC), "not a PNG");
    eprintln!(
        "pack page screenshot: {}",
        shots.join("pack_page.png").display()
    );
}

/// Percent-encodes everything but unreserved characters.
fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}
