#!/usr/bin/env bash
# A/B through the performance rig's Envoy, wrk and fake provider (../shared/rig): runs each
# variant in turn, ROUNDS times interleaved, and prints every variant against the first one:
# Envoy RPS, Envoy's extra CPU per request, the auth service's CPU per request, and the
# c=1 p50 latency. Use it to price one change (a second binary, an Envoy option) in one run.
#
#   scripts/rig-ab.sh VARIANT...        VARIANT = SCENARIO[@PORTCULLIS_BIN][:ENVOY_CONFIG]
#
# SCENARIO: floor (the rig's ideal ext_authz, bare OK), floor-md (the same with the key_id
# metadata), observe (the floor's metering scenario), nobody (Portcullis, keys without limits,
# body not sent), body (keys without limits, body sent), limits (requests/min + token + USD),
# meter (limits + metering). ENVOY_CONFIG replaces the scenario's rig config (a path).
# Needs: nginx, wrk, Envoy (ENVOY_BIN), the rig's floor built (FLOOR_BIN) and
# portcullis-setup.sh run (RIG_WORK). Knobs: ROUNDS (3), DURATION (10 s), PORTCULLIS_BIN.
# Example (what the body costs Envoy, and what a build without the metadata would save):
#   scripts/rig-ab.sh floor nobody body limits limits@/tmp/portcullis-experiment
set -euo pipefail
cd "$(dirname "$0")/.."
RIG=${RIG_DIR:-../shared/rig}
WORK=${RIG_WORK:-/tmp/rig}
ENVOY=${ENVOY_BIN:-$(python3 -c 'import envoy,os;print(os.path.dirname(envoy.__file__))')/_bin/envoy}
FLOOR=${FLOOR_BIN:-$WORK/target/release/floor-authz}
DEFAULT_BIN=${PORTCULLIS_BIN:-target/release/portcullis}
ROUNDS=${ROUNDS:-3} DURATION=${DURATION:-10}
TICK=$(getconf CLK_TCK)
OUT=$WORK/ab/$(date +%Y%m%d-%H%M%S)
mkdir -p "$OUT/nginx"
[[ -x $FLOOR ]] || { echo "no floor at $FLOOR: run the rig once (it builds it) or set FLOOR_BIN" >&2; exit 1; }
[[ -s $WORK/portcullis/keys-limits.txt ]] || { echo "run $RIG/portcullis-setup.sh first" >&2; exit 1; }

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
up() { # PORT: wait until something listens
  for _ in $(seq 200); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done
  echo "nothing listens on $1" >&2; return 1
}
ticks() { # utime+stime of PID
  local f; read -r -a f < <(sed 's/^.*) //' "/proc/$1/stat"); echo $((f[11] + f[12]))
}
load() { # SECONDS CONNS KEYS OUTFILE
  RIG_KEYS=$3 wrk -t1 -c"$2" -d"$1"s --timeout 5s -s "$RIG/wrk-keys.lua" \
    http://127.0.0.1:10000/v1/chat/completions >"$4" 2>&1
}

nginx -p "$OUT/nginx" -c "$(realpath "$RIG/nginx-upstream.conf")" -e "$OUT/nginx/error.log" &
PIDS+=($!)
up 18080
printf 'round\tvariant\trps\tenvoy_us\tauth_us\tc1_p50_us\n' >"$OUT/results.tsv"
for round in $(seq "$ROUNDS"); do
  for variant in "$@"; do
    spec=${variant%%:*} config=""
    [[ $variant == *:* ]] && config=${variant#*:}
    scenario=${spec%%@*} bin=$DEFAULT_BIN
    [[ $spec == *@* ]] && bin=${spec#*@}
    keys=$RIG/keys.txt md=()
    case $scenario in
      floor | floor-md | observe)
        [[ $scenario == floor ]] || md=(--metadata)
        default=envoy-floor-ext-authz.yaml
        [[ $scenario == observe ]] && default=envoy-extproc-observe.yaml
        "$FLOOR" serve --listen 127.0.0.1:50051 --keys "$keys" --threads 1 "${md[@]}" >"$OUT/auth.log" 2>&1 & ;;
      nobody | body | limits | meter)
        kind=limits default=envoy-portcullis.yaml
        case $scenario in
          nobody) kind=nolimits default=envoy-portcullis-nobody.yaml ;;
          body) kind=nolimits ;;
          meter) default=envoy-portcullis-meter.yaml ;;
        esac
        keys=$WORK/portcullis/keys-$kind.txt
        python3 -c 'import sqlite3,sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
          "$WORK/portcullis/$kind.db" "$OUT/portcullis.db"
        PORTCULLIS_BOOTSTRAP_TOKEN=pcm_rig_bootstrap_owner_token_00000001 "$bin" serve \
          --database-url "sqlite://$OUT/portcullis.db" --authz-addr 127.0.0.1:50051 \
          --admin-addr 127.0.0.1:50062 --authz-threads 1 --log warn >"$OUT/auth.log" 2>&1 & ;;
      *) echo "unknown scenario $scenario" >&2; exit 2 ;;
    esac
    auth=$!
    PIDS+=("$auth")
    up 50051
    "$ENVOY" -c "${config:-$RIG/$default}" --concurrency 1 --disable-hot-restart --log-level warn \
      >"$OUT/envoy.log" 2>&1 &
    envoy=$!
    PIDS+=("$envoy")
    up 10000
    load 3 32 "$keys" /dev/null
    e0=$(ticks "$envoy") a0=$(ticks "$auth")
    load "$DURATION" 32 "$keys" "$OUT/wrk.txt"
    e1=$(ticks "$envoy") a1=$(ticks "$auth")
    load 3 1 "$keys" "$OUT/wrk-c1.txt"
    kill "$envoy" "$auth"
    wait "$envoy" "$auth" 2>/dev/null || true
    python3 - "$OUT" "$round" "$variant" "$TICK" "$e0" "$e1" "$a0" "$a1" >>"$OUT/results.tsv" <<'PY'
import re, sys
out, rnd, variant, tick, e0, e1, a0, a1 = sys.argv[1:]
def stats(path):
    return dict(kv.split("=") for kv in re.search(r"RIGSTATS (.*)", open(path).read()).group(1).split())
st, c1 = stats(f"{out}/wrk.txt"), stats(f"{out}/wrk-c1.txt")
if st["non2xx3xx"] != "0":
    sys.exit(f"{variant}: {st['non2xx3xx']} responses were not 2xx")
n = int(st["requests"])
per = lambda t0, t1: (int(t1) - int(t0)) / int(tick) * 1e6 / n
print(f"{rnd}\t{variant}\t{st['rps']}\t{per(e0, e1):.1f}\t{per(a0, a1):.1f}\t{c1['p50_us']}")
PY
    tail -n1 "$OUT/results.tsv" >&2
  done
done
python3 - "$OUT/results.tsv" <<'PY'
import csv, sys, statistics
rows = list(csv.DictReader(open(sys.argv[1]), delimiter="\t"))
order = list(dict.fromkeys(r["variant"] for r in rows))
base = {r["round"]: r for r in rows if r["variant"] == order[0]}
print(f"against {order[0]} in the same round (median of {len(base)} rounds; each round in brackets)")
for v in order:
    mine = [r for r in rows if r["variant"] == v]
    rps = [float(r["rps"]) / float(base[r["round"]]["rps"]) for r in mine]
    envoy = [float(r["envoy_us"]) - float(base[r["round"]]["envoy_us"]) for r in mine]
    auth = [float(r["auth_us"]) / float(base[r["round"]]["auth_us"]) for r in mine]
    c1 = [float(r["c1_p50_us"]) - float(base[r["round"]]["c1_p50_us"]) for r in mine]
    each = lambda xs, f: " ".join(f.format(x) for x in xs)
    print(f"{v}\n  RPS {statistics.median(rps):.3f} ({each(rps, '{:.2f}')})"
          f"  Δ Envoy {statistics.median(envoy):+.1f} µs ({each(envoy, '{:+.1f}')})"
          f"  auth CPU {statistics.median(auth):.2f}× ({each(auth, '{:.2f}')})"
          f"  c=1 p50 {statistics.median(c1):+.0f} µs ({each(c1, '{:+.0f}')})")
PY
echo "results: $OUT/results.tsv"
