#!/usr/bin/env bash
# Runs every test: installs what they need (Envoy, PyYAML, openssl, PostgreSQL when none is reachable),
# then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
# The TLS tests make their certificates with the openssl command-line tool.
command -v openssl >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl >/dev/null
# PostgreSQL for the storage suite and the PostgreSQL end-to-end test: the one at
# PORTCULLIS_TEST_POSTGRES (default 127.0.0.1:5432), else a private one started here.
source scripts/test-services.sh
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
