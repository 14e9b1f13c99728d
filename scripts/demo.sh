#!/usr/bin/env bash
# One command, a working local gateway: fake upstream + portcullis (embedded SQLite, --dev)
# + Envoy. Creates gateway "demo" and a key, shows it accepted, refused when disabled,
# accepted again, then keeps everything running until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
LISTEN=${DEMO_LISTEN_PORT:-10000} ENVOY_ADMIN=${DEMO_ENVOY_ADMIN_PORT:-9901}
AUTHZ=${DEMO_AUTHZ_PORT:-50051} ADMIN=${DEMO_ADMIN_PORT:-50052} UPSTREAM=${DEMO_UPSTREAM_PORT:-8081}

scripts/install-envoy.sh
cargo build --quiet --bin portcullis
bin=$root/target/debug/portcullis
mkdir -p .demo
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_for() { # wait_for what command...
  local what=$1; shift
  for _ in $(seq 1 150); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "demo: $what did not come up; logs are in .demo/" >&2; exit 1
}

python3 tools/fake_upstream.py --port "$UPSTREAM" > .demo/upstream.log 2>&1 & pids+=($!)
# Run from .demo so the default database URL (sqlite://portcullis.db) lands in .demo/.
(cd .demo && exec "$bin" serve --dev --authz-addr "127.0.0.1:$AUTHZ" --admin-addr "127.0.0.1:$ADMIN") > .demo/portcullis.log 2>&1 & pids+=($!)
sed -e "s/__LISTEN_PORT__/$LISTEN/" -e "s/__ADMIN_PORT__/$ENVOY_ADMIN/" \
    -e "s/__AUTHZ_PORT__/$AUTHZ/" -e "s/__UPSTREAM_PORT__/$UPSTREAM/" envoy/loopback.yaml > .demo/envoy.yaml
envoy -c .demo/envoy.yaml --use-dynamic-base-id --concurrency 1 -l warning > .demo/envoy.log 2>&1 & pids+=($!)

export PORTCULLIS_ADMIN_URL=http://127.0.0.1:$ADMIN PORTCULLIS_TOKEN=test-token
wait_for portcullis "$bin" gateways list
wait_for envoy curl -sf "http://127.0.0.1:$ENVOY_ADMIN/ready"

"$bin" gateways get demo >/dev/null 2>&1 || \
  PORTCULLIS_UPSTREAM_VALUE="Bearer sk-demo-provider-key" "$bin" gateways create demo --upstream-header authorization >/dev/null
"$bin" prices set gpt-4o-mini --input 0.15 --output 0.60 >/dev/null
created=$("$bin" keys create "token-user-$(date +%H%M%S)" --gateway demo --rpm 60 --token-limit 100000 \
  --cost-limit 5 --reset-period monthly --json)
id=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])' <<<"$created")
secret=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["secret"])' <<<"$created")

call() {
  curl -s -o .demo/last-body -w '%{http_code}' "http://127.0.0.1:$LISTEN/v1/chat/completions" \
    -H 'Host: demo.gateway.local' -H "x-api-key: $secret" -H 'content-type: application/json' \
    -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hello"}]}'
}
step() { printf '\n== %s\n' "$1"; }

step "1. a request with the new key"
echo "HTTP $(call)"; cat .demo/last-body; echo
step "2. after: portcullis keys disable $id"
"$bin" keys disable "$id" >/dev/null
echo "HTTP $(call)"; cat .demo/last-body; echo
step "3. after: portcullis keys enable $id"
"$bin" keys enable "$id" >/dev/null
echo "HTTP $(call)"; cat .demo/last-body; echo
step "4. the key's usage, metered from the responses: portcullis keys usage $id"
# Metering records each response as it completes: wait until both are counted.
wait_for metering sh -c "\"$bin\" keys usage \"$id\" --json | grep -q '\"requests\": 2'"
"$bin" keys usage "$id"

cat <<MSG

Portcullis demo is running (logs in .demo/). Try it:

  curl -s http://127.0.0.1:$LISTEN/v1/chat/completions \\
    -H 'Host: demo.gateway.local' -H 'x-api-key: $secret' \\
    -H 'content-type: application/json' -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Hi"}]}'

Manage it (dev mode accepts the management token "test-token"), in the browser:

  http://127.0.0.1:$ADMIN/   (paste test-token)

or with the CLI:

  export PORTCULLIS_ADMIN_URL=http://127.0.0.1:$ADMIN PORTCULLIS_TOKEN=test-token
  $bin keys list --gateway demo
  $bin keys usage $id
  $bin keys disable $id

Press Ctrl-C to stop.
MSG
if [ "${DEMO_EXIT:-0}" = 1 ]; then exit 0; fi
wait
