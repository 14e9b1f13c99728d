#!/usr/bin/env bash
# Makes sure the PostgreSQL and the Redis the tests need are reachable. Sourced by scripts/test.sh.
#
# PORTCULLIS_TEST_POSTGRES (default postgres://postgres@127.0.0.1:5432/test) names the PostgreSQL.
# When nothing answers there, a private server is started from Debian's packages
# (installed if missing) in a temporary directory on a free port, as the `postgres`
# user, and stopped when the tests end; PORTCULLIS_TEST_POSTGRES then points at it.
#
# PORTCULLIS_TEST_REDIS (default redis://127.0.0.1:6379) names the Redis. When nothing answers
# PING there, a private redis-server (no persistence) is started in a temporary directory on a
# free port and stopped when the tests end; PORTCULLIS_TEST_REDIS then points at it.
# PORTCULLIS_TEST_REDIS_SERVER is the path of the redis-server binary, for tests that start
# (and stop) a Redis of their own; Debian's redis-server package is installed if it is missing.
#
# Servers started here are stopped by the shell's EXIT trap, added to any EXIT trap already set.

pg_url=${PORTCULLIS_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/test}
redis_url=${PORTCULLIS_TEST_REDIS:-redis://127.0.0.1:6379}

# Runs the commands in "$1" when the shell exits, after those its EXIT trap already runs.
# In a subshell, `trap -p` also lists the parent's EXIT trap, which does not run there: it is
# carried over only if this shell set it (so a parent's cleanup never runs early in a subshell).
portcullis_at_exit() {
  local add=$1 prev=
  if [ "$BASH_SUBSHELL" -eq 0 ] || [ "${_portcullis_exit_shell:-}" = "$BASHPID" ]; then
    prev=$(trap -p EXIT)
    if [ -n "$prev" ]; then
      eval "set -- $prev" # trap -- 'commands' EXIT
      prev=$3
    fi
  fi
  _portcullis_exit_shell=$BASHPID
  # `|| true`: a cleanup that fails (under set -e) does not skip the ones after it.
  trap "${prev:+$prev; }{ $add; } || true" EXIT
}

# Installs Debian packages, refreshing the package lists once if they are missing or stale.
portcullis_apt_install() {
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null 2>&1 ||
    { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null; }
}

portcullis_free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

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
    portcullis_apt_install postgresql
    bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
  fi
  local user=postgres
  id "$user" >/dev/null 2>&1 || user=$(id -un)
  local dir port
  dir=$(mktemp -d /tmp/portcullis-pg.XXXXXX)
  port=$(portcullis_free_port)
  chown "$user" "$dir"
  as_pg() { if [ "$(id -un)" = "$user" ]; then "$@"; else runuser -u "$user" -- "$@"; fi; }
  as_pg "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 >/dev/null
  as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/log" -w \
    -o "-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories=$dir -c fsync=off" start >/dev/null
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres test
  export PORTCULLIS_TEST_POSTGRES="postgres://postgres@127.0.0.1:$port/test"
  echo "started a private PostgreSQL for the tests on 127.0.0.1:$port" >&2
  # Spelled out now: at exit, as_pg's $user (a local) is gone, an unbound variable under set -u.
  local as=""
  [ "$(id -un)" = "$user" ] || as="runuser -u '$user' --"
  portcullis_at_exit "$as '$bin/pg_ctl' -D '$dir/data' -m immediate stop >/dev/null 2>&1; rm -rf '$dir'"
}

if pg_reachable "$pg_url"; then
  export PORTCULLIS_TEST_POSTGRES=$pg_url
else
  start_private_postgres
fi

# Does a Redis answer PING at this URL (redis://[user:password@]host:port)?
redis_answers() {
  python3 - "$1" <<'PY'
import socket, sys, urllib.parse
u = urllib.parse.urlparse(sys.argv[1])
def cmd(*args):
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args))
try:
    s = socket.create_connection((u.hostname or "127.0.0.1", u.port or 6379), timeout=2)
    if u.password:
        s.sendall(cmd("AUTH", *([urllib.parse.unquote(u.username)] if u.username else []), urllib.parse.unquote(u.password)))
        s.recv(256)
    s.sendall(cmd("PING"))
    sys.exit(0 if s.recv(256).startswith(b"+PONG") else 1)
except OSError:
    sys.exit(1)
PY
}

# Stops the process a pidfile names and waits (up to 5 s) until it is gone.
portcullis_stop_pidfile() {
  local pid i
  pid=$(cat "$1" 2>/dev/null) || return 0
  kill "$pid" 2>/dev/null || return 0
  for i in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || return 0
    sleep 0.05
  done
}

start_private_redis() {
  local dir port
  dir=$(mktemp -d /tmp/portcullis-redis.XXXXXX)
  port=$(portcullis_free_port)
  "$PORTCULLIS_TEST_REDIS_SERVER" --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
    --dir "$dir" --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/log"
  portcullis_at_exit "portcullis_stop_pidfile '$dir/redis.pid'; rm -rf '$dir'"
  local i
  for i in $(seq 100); do
    redis_answers "redis://127.0.0.1:$port" && break
    sleep 0.1
  done
  redis_answers "redis://127.0.0.1:$port" || { echo "the private redis-server did not start:" >&2; cat "$dir/log" >&2; return 1; }
  export PORTCULLIS_TEST_REDIS="redis://127.0.0.1:$port"
  echo "started a private Redis for the tests on 127.0.0.1:$port" >&2
}

if ! command -v redis-server >/dev/null 2>&1; then
  echo "installing Redis (Debian's redis-server package) for the tests" >&2
  portcullis_apt_install redis-server
fi
PORTCULLIS_TEST_REDIS_SERVER=$(command -v redis-server) || { echo "no redis-server binary, and installing it failed" >&2; return 1; }
export PORTCULLIS_TEST_REDIS_SERVER
if redis_answers "$redis_url"; then
  export PORTCULLIS_TEST_REDIS=$redis_url
else
  start_private_redis
fi
