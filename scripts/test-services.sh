#!/usr/bin/env bash
# Makes sure the PostgreSQL the tests need is reachable. Sourced by scripts/test.sh.
#
# PORTCULLIS_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432/test) names it.
# When nothing answers there, a private server is started from Debian's packages
# (installed if missing) in a temporary directory on a free port, as the `postgres`
# user, and stopped when the tests end; PORTCULLIS_TEST_POSTGRES then points at it.

pg_url=${PORTCULLIS_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}

pg_reachable() {
  python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
try:
    socket.create_connection((u.hostname or "127.0.0.1", u.port or 5432), timeout=2).close()
except OSError:
    sys.exit(1)
PY
}

start_private_postgres() {
  local bin
  bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
  if [ -z "$bin" ]; then
    echo "installing PostgreSQL (Debian packages) for the tests" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql >/dev/null
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  local user=postgres
  id "$user" >/dev/null 2>&1 || user=$(id -un)
  local dir port
  dir=$(mktemp -d /tmp/portcullis-pg.XXXXXX)
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  chown "$user" "$dir"
  as_pg() { if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off" start >/dev/null
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres test
  export PORTCULLIS_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/test"
  echo "started a private PostgreSQL for the tests on 127.0.0.1:$port" >&2
  trap "as_pg '$bin/pg_ctl' -D '$dir/data' -m immediate stop >/dev/null 2>&1; rm -rf '$dir'" EXIT
}

if pg_reachable "$pg_url"; then
  export PORTCULLIS_TEST_POSTGRES=$pg_url
else
  start_private_postgres
fi
