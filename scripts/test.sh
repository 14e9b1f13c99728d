#!/usr/bin/env bash
# Runs every test: installs what they need (Envoy, PyYAML), then format, lints and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install-envoy.sh
python3 -c 'import yaml' 2>/dev/null || python3 -m pip install --quiet --disable-pip-version-check pyyaml
cargo fmt --all -- --check
cargo clippy --all-targets --locked -- -D warnings
cargo test --locked "$@"
