#!/usr/bin/env bash
# Runs every test: installs what they need on a fresh (Debian) machine (Envoy, PyYAML, openssl,
# the redis-server binary; PostgreSQL when none is reachable), then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
# PostgreSQL for the storage suite and the PostgreSQL end-to-end tests: the one at
# PORTCULLIS_TEST_POSTGRES (default 127.0.0.1:5432), else a private one started here.
# Redis for the shared counters: the one at PORTCULLIS_TEST_REDIS (default 127.0.0.1:6379), else a
# private one started here; PORTCULLIS_TEST_REDIS_SERVER names the redis-server binary (installed
# if missing) for the tests that start and stop a Redis of their own. Both stopped on exit.
source scripts/test-services.sh
# The TLS tests make their certificates with the openssl command-line tool.
command -v openssl >/dev/null || portcullis_apt_install openssl
# The console's browser tests (tests/console_browser.rs) drive Debian's Chromium with Playwright
# from console/node_modules; Playwright's own browser download cannot work here and is skipped.
[ -x "${PORTCULLIS_CHROMIUM:-/usr/bin/chromium}" ] || portcullis_apt_install chromium
(cd console && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund --loglevel=error)
# The committed console bundle and generated client must be what the sources build.
(cd console && npm run --silent check)
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
