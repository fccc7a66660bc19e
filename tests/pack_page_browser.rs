//! The pack page (R11) as a person sees it: headless Chromium loads
//! `/packs?account=acme` from the real binary, dumps the DOM it rendered and
//! takes a screenshot.
//!
//! The account is activated 200 days ago (the server runs with a long late
//! grace so that past event times are accepted), so the page holds expired,
//! current and upcoming free-tier packs, a used-up pack, and a purchased one.
//! The screenshot is kept at `$CARGO_TARGET_TMPDIR/pack_page.png` for a look.

mod common;

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use common::Server;
use packmeter::grpc::proto::{self, Item};
use prost_types::Timestamp;

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

/// Runs headless Chromium with a fresh profile and `args`; returns stdout.
fn chromium(browser: &Path, profile: &Path, args: &[&str]) -> String {
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
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Screenshots `url` into `file` with a profile of its own; returns the PNG.
fn screenshot(browser: &Path, dir: &Path, name: &str, url: &str) -> Vec<u8> {
    let file = dir.join(format!("{name}.png"));
    chromium(
        browser,
        &dir.join(format!("profile-{name}")),
        &[&format!("--screenshot={}", file.display()), url],
    );
    std::fs::read(&file).unwrap_or_else(|e| panic!("no screenshot at {}: {e}", file.display()))
}

const PNG_MAGIC: &[u8] = b"\x89PNG\r\n\x1a\n";

#[tokio::test]
async fn chromium_renders_the_pack_page_as_a_console_table() {
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

    // Activated 200 days ago, with usage in a few past months ...
    let activated = now - 200 * DAY;
    for (days, calls, egress) in [
        (0, 120_000, 300 << 20),
        (40, 1_000_000, 1 << 30),
        (100, 730_000, 90 << 20),
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

    let url = format!("http://{}/packs?account=acme", server.admin);
    let shots = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));

    // What the browser rendered.
    let dom = chromium(
        &browser,
        &dir.path().join("profile-dom"),
        &["--dump-dom", &url],
    );
    for want in [
        "<h1>Resource packs",
        r#"<tr class="current">"#,
        r#"<tr class="expired">"#,
        r#"<tr class="upcoming">"#,
        "Valid now",
        "Expired",
        "Upcoming",
        "Used up",
        "Free tier",
        "Purchased",
        "<code>pk-spring-promo</code>",
        "<td>Calls</td>",
        "<td>Egress</td>",
        ">100.0%<",
        ">12.0%<",
        ">78.1%<",
        ">600,000<",
        ">4,400,000<",
        "800.00 MiB",
        r#"role="progressbar""#,
    ] {
        assert!(
            dom.contains(want),
            "the rendered DOM lacks {want:?}:\n{dom}"
        );
    }
    // 13 monthly free-tier packs per item, plus the purchased one.
    let rows = ["current", "upcoming", "expired"]
        .map(|c| dom.matches(&format!(r#"<tr class="{c}">"#)).count());
    assert_eq!(rows.iter().sum::<usize>(), 27, "{rows:?}\n{dom}");
    // Packs valid now come first, under their group heading.
    let first_group = dom.find(r#"<tr class="group">"#).unwrap();
    assert!(
        dom[first_group..]
            .starts_with(r#"<tr class="group"><th scope="rowgroup" colspan="9">Valid now"#),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");

    // What a person sees: a real picture, not an empty page.
    let page = screenshot(&browser, dir.path(), "pack_page", &url);
    let blank = screenshot(&browser, dir.path(), "blank", "about:blank");
    std::fs::write(shots.join("pack_page.png"), &page).unwrap();
    assert!(page.starts_with(PNG_MAGIC), "not a PNG");
    assert!(blank.starts_with(PNG_MAGIC), "blank: not a PNG");
    assert!(
        page.len() > 10 * 1024,
        "the screenshot is {} bytes: nothing drawn?",
        page.len()
    );
    assert!(
        page.len() > 4 * blank.len(),
        "the page's screenshot ({} bytes) compresses like a blank page ({} bytes)",
        page.len(),
        blank.len()
    );
    eprintln!(
        "pack page screenshot: {} ({} bytes; blank page {} bytes)",
        shots.join("pack_page.png").display(),
        page.len(),
        blank.len()
    );
}
