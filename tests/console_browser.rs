//! The web console in a real browser: `portcullis serve` (as a process, SQLite in a temporary
//! directory, an owner bootstrap token) serving the console and gRPC-Web on its admin listener,
//! the fake upstream and a real Envoy; the Playwright suite in console/tests drives Debian's
//! Chromium against them. It needs `npm ci` in console/ and the `chromium` package (scripts/test.sh
//! installs both); without them this test fails and says so: it never skips.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::process::Proc;
use common::{Envoy, FakeUpstream, OWNER_TOKEN, free_port, manifest_dir};

fn chromium() -> PathBuf {
    PathBuf::from(std::env::var("PORTCULLIS_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into()))
}

/// What the suite needs before anything is started, or a panic naming the missing piece.
fn prerequisites(console: &Path) {
    let chrome = chromium();
    assert!(
        chrome.is_file(),
        "no Chromium at {} (set PORTCULLIS_CHROMIUM, or `apt-get install -y chromium`; scripts/test.sh does)",
        chrome.display()
    );
    assert!(
        console.join("node_modules/@playwright/test/package.json").is_file(),
        "console/node_modules is missing: run `npm ci` in console/ (scripts/test.sh does)"
    );
    assert!(console.join("dist/index.html").is_file(), "console/dist is missing: run `npm run build` in console/");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_console_hands_out_keys_that_work_through_envoy() {
    let console = manifest_dir().join("console");
    prerequisites(&console);

    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}?mode=rwc", dir.path().join("portcullis.db").display());
    let (authz, admin) = (free_port(), free_port());
    let mut server = Proc::spawn(&db, authz, admin, &[("PORTCULLIS_BOOTSTRAP_TOKEN", OWNER_TOKEN)]);
    server.wait_for("admin listener").await;
    let upstream = FakeUpstream::start().await;
    let envoy = Envoy::start(authz, upstream.port).await;

    let console_url = format!("http://127.0.0.1:{admin}");
    let envoy_port = envoy.port.to_string();
    let upstream_port = upstream.port.to_string();
    let status = tokio::task::spawn_blocking(move || {
        Command::new("npx")
            .args(["--no-install", "playwright", "test"])
            .current_dir(&console)
            .env("CONSOLE_URL", &console_url)
            .env("ENVOY_PORT", &envoy_port)
            .env("UPSTREAM_PORT", &upstream_port)
            .env("OWNER_TOKEN", OWNER_TOKEN)
            .env("PORTCULLIS_CHROMIUM", chromium())
            .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
            .env("CI", "1")
            .status()
            .expect("npx runs (Node.js and npm installed)")
    })
    .await
    .unwrap();
    drop(envoy);
    drop(upstream);
    let (_, log) = server.sigterm().await;
    assert!(!log.iter().any(|l| holds_secret(l)), "a key or token secret reached the server log");
    assert!(status.success(), "the console's browser suite failed ({status}); its report is above");
}

/// Whether `line` holds a whole secret: `pcs_` or `pcm_` and 38 base62 characters.
fn holds_secret(line: &str) -> bool {
    ["pcs_", "pcm_"].iter().any(|p| {
        line.match_indices(p).any(|(i, _)| {
            let rest = &line[i + p.len()..];
            rest.len() >= 38 && rest.bytes().take(38).all(|b| b.is_ascii_alphanumeric())
        })
    })
}
