#!/usr/bin/env python3
"""Validates docker-compose.yml against the repository (no Docker engine needed).

Checks, from the parsed YAML:
- the services exist: at least two portcullis replicas (services named portcullis-*),
  postgres, redis, fake-upstream and envoy; every file mounted from the repository exists,
  every named volume is declared, every build context has a Dockerfile;
- every replica runs the same image with the same PostgreSQL URL (the postgres service) and
  the same Redis URL (the redis service), a bootstrap token, its authz listener on the port
  Envoy calls, its admin port published on 127.0.0.1 (a port of its own), and starts only
  once PostgreSQL and Redis are healthy;
- PostgreSQL is the official image with a pg_isready healthcheck and its data on a volume;
  Redis is the official image with appendonly on, its data on a volume and a healthcheck;
- Envoy is the version the tests run; its config (the file mounted at /etc/envoy/envoy.yaml)
  lists every replica and nothing else in portcullis_authz, over HTTP/2, with an active gRPC
  health check (about every second, also without traffic), and points llm_upstream at the
  fake upstream; Envoy's listener is published.

Exits non-zero with one line per problem. `--root DIR` checks the files under DIR instead of
this repository (tests/deploy_files.rs uses it to prove broken copies are refused).
"""
import argparse
import os
import re
import sys
import urllib.parse

import yaml

AUTHZ_HEALTH_NAMES = ("", "envoy.service.auth.v3.Authorization")

parser = argparse.ArgumentParser()
parser.add_argument("--root", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
root = parser.parse_args().root
problems = []


def need(cond, msg):
    if not cond:
        problems.append(msg)
    return cond


def interpolate(value):
    """The value compose would use when the variables are unset: ${X:-d} -> d, ${X:?m} / ${X} -> X."""
    value = re.sub(r"\$\{(\w+):?-([^}]*)\}", lambda m: m.group(2), str(value))
    return re.sub(r"\$\{(\w+)(:?\?[^}]*)?\}", lambda m: m.group(1), value)


def env_of(svc):
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, "") for e in env)
    return {k: interpolate(v) for k, v in env.items()}


def command_of(svc):
    cmd = svc.get("command") or []
    return cmd.split() if isinstance(cmd, str) else [str(c) for c in cmd]


def setting(svc, flag, var):
    """A serve setting from the command line (--flag v, --flag=v), else the environment."""
    cmd = command_of(svc)
    for i, arg in enumerate(cmd):
        if arg == flag and i + 1 < len(cmd):
            return interpolate(cmd[i + 1])
        if arg.startswith(flag + "="):
            return interpolate(arg.split("=", 1)[1])
    return env_of(svc).get(var)


def depends_on(svc):
    deps = svc.get("depends_on") or {}
    if isinstance(deps, list):
        return {d: "service_started" for d in deps}
    return {d: (c or {}).get("condition", "service_started") for d, c in deps.items()}


def volume_targets(svc):
    """(source, target) of each volume, short or long syntax."""
    out = []
    for vol in svc.get("volumes", []):
        if isinstance(vol, dict):
            out.append((vol.get("source", ""), vol.get("target", "")))
        else:
            parts = vol.split(":")
            out.append((parts[0], parts[1] if len(parts) > 1 else parts[0]))
    return out


def seconds(d):
    m = re.fullmatch(r"([0-9.]+)s", str(d))
    return float(m.group(1)) if m else None


def published(svc):
    """(host ip, host port, container port) of each published port."""
    out = []
    for p in svc.get("ports", []):
        if isinstance(p, dict):
            out.append((p.get("host_ip", ""), str(p.get("published", "")), str(p.get("target", ""))))
            continue
        parts = str(p).split(":")
        if len(parts) == 3:
            out.append((parts[0], parts[1], parts[2]))
        elif len(parts) == 2:
            out.append(("", parts[0], parts[1]))
        else:
            out.append(("", "", parts[0]))
    return out


with open(os.path.join(root, "docker-compose.yml")) as f:
    compose = yaml.safe_load(f)

services = compose.get("services", {})
for name in ("postgres", "redis", "fake-upstream", "envoy"):
    need(name in services, f"service '{name}' is missing")
replicas = {n: s for n, s in services.items() if re.fullmatch(r"portcullis-\d+", n)}
need(len(replicas) >= 2, f"at least two portcullis replicas (portcullis-1, portcullis-2, ...) are needed, found {sorted(replicas)}")

declared_volumes = compose.get("volumes") or {}
for name, svc in services.items():
    for src, _ in volume_targets(svc):
        if src.startswith("./"):
            need(os.path.exists(os.path.join(root, src)), f"{name}: mounted file {src} does not exist")
        elif src and not src.startswith("/"):
            need(src in declared_volumes, f"{name}: named volume {src} is not declared")
    if "build" in svc:
        ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
        need(os.path.exists(os.path.join(root, ctx, "Dockerfile")), f"{name}: no Dockerfile in build context {ctx}")
    for dep in depends_on(svc):
        need(dep in services, f"{name}: depends on unknown service {dep}")

# The replicas: one image, one database, one Redis.
postgres_urls, redis_urls, images, admin_ports = set(), set(), set(), {}
for name, svc in sorted(replicas.items()):
    images.add((svc.get("image"), str(svc.get("build"))))
    db = setting(svc, "--database-url", "PORTCULLIS_DATABASE_URL") or ""
    if need(db.startswith(("postgres://", "postgresql://")), f"{name}: --database-url / PORTCULLIS_DATABASE_URL must be postgres://… (got {db or 'nothing'})"):
        host = urllib.parse.urlparse(db).hostname
        need(host == "postgres", f"{name}: the database URL names host {host}, not the postgres service")
        postgres_urls.add(db)
    redis = setting(svc, "--redis-url", "PORTCULLIS_REDIS_URL") or ""
    if need(redis.startswith(("redis://", "rediss://")), f"{name}: --redis-url / PORTCULLIS_REDIS_URL must be redis://… (got {redis or 'nothing'})"):
        host = urllib.parse.urlparse(redis).hostname
        need(host == "redis", f"{name}: the Redis URL names host {host}, not the redis service")
        redis_urls.add(redis)
    mode = setting(svc, "--counter-failure-mode", "PORTCULLIS_COUNTER_FAILURE_MODE")
    need(mode in (None, "local", "deny"), f"{name}: --counter-failure-mode must be local or deny (got {mode})")
    need(
        setting(svc, "--bootstrap-token", "PORTCULLIS_BOOTSTRAP_TOKEN"),
        f"{name}: no PORTCULLIS_BOOTSTRAP_TOKEN, the owner token would only be in the logs",
    )
    deps = depends_on(svc)
    for dep in ("postgres", "redis"):
        need(deps.get(dep) == "service_healthy", f"{name}: must depend on {dep} with condition service_healthy")
    admin = (setting(svc, "--admin-addr", "PORTCULLIS_ADMIN_ADDR") or "").rsplit(":", 1)[-1]
    ports = [(ip, hp) for ip, hp, cp in published(svc) if cp == admin]
    if need(ports, f"{name}: admin port {admin or '?'} is not published"):
        for ip, hp in ports:
            need(ip == "127.0.0.1", f"{name}: admin port published on {ip or 'every address'}, not 127.0.0.1")
            need(hp not in admin_ports, f"{name}: admin host port {hp} is also {admin_ports.get(hp)}'s")
            admin_ports[hp] = name
need(len(images) <= 1, f"the replicas run different images: {sorted(images)}")
need(len(postgres_urls) <= 1, "the replicas use different PostgreSQL URLs")
need(len(redis_urls) <= 1, "the replicas use different Redis URLs")

# PostgreSQL and Redis: official images, health checks, data on volumes.
pg = services.get("postgres", {})
need(re.fullmatch(r"postgres:[\w.-]+", str(pg.get("image", ""))) is not None, "postgres: must be the official postgres image")
need("pg_isready" in " ".join(map(str, (pg.get("healthcheck") or {}).get("test", []))), "postgres: no pg_isready healthcheck")
need(
    any(src in declared_volumes and dst.startswith("/var/lib/postgresql") for src, dst in volume_targets(pg)),
    "postgres: its data is not on a named volume",
)
rd = services.get("redis", {})
need(re.fullmatch(r"redis:[\w.-]+", str(rd.get("image", ""))) is not None, "redis: must be the official redis image")
need(" ".join(command_of(rd)).find("--appendonly yes") >= 0, "redis: counters must survive a restart (--appendonly yes)")
need(any(src in declared_volumes and dst == "/data" for src, dst in volume_targets(rd)), "redis: /data is not on a named volume")
need("ping" in " ".join(map(str, (rd.get("healthcheck") or {}).get("test", []))), "redis: no redis-cli ping healthcheck")

# Envoy and its config.
envoy = services.get("envoy", {})
need(re.search(r":v1\.40\.", envoy.get("image", "")) is not None, "envoy: image must be Envoy v1.40.x")
for name in replicas:
    need(name in depends_on(envoy), f"envoy: does not depend on {name}")
mount = next((v for v in envoy.get("volumes", []) if isinstance(v, str) and v.endswith(":/etc/envoy/envoy.yaml:ro")), None)
need(mount is not None, "envoy: envoy config is not mounted at /etc/envoy/envoy.yaml")

if mount and os.path.exists(os.path.join(root, mount.split(":", 1)[0])):
    with open(os.path.join(root, mount.split(":", 1)[0])) as f:
        cfg = yaml.safe_load(f)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}

    def endpoints(cluster):
        out = []
        for group in clusters.get(cluster, {}).get("load_assignment", {}).get("endpoints", []):
            for lb in group.get("lb_endpoints", []):
                a = lb["endpoint"]["address"]["socket_address"]
                out.append((a["address"], a["port_value"]))
        return out

    authz = clusters.get("portcullis_authz")
    if need(authz is not None, "envoy: no portcullis_authz cluster"):
        listed = endpoints("portcullis_authz")
        need(len(listed) == len(set(listed)), f"envoy: portcullis_authz lists an endpoint twice: {listed}")
        for name, svc in sorted(replicas.items()):
            addr = setting(svc, "--authz-addr", "PORTCULLIS_AUTHZ_ADDR") or ""
            need(addr.startswith("0.0.0.0:"), f"{name}: authz listener is not on 0.0.0.0 ({addr or 'default 127.0.0.1'})")
            port = addr.rsplit(":", 1)[-1]
            need((name, int(port) if port.isdigit() else 0) in listed, f"envoy: portcullis_authz does not list {name}:{port or '?'}")
        for host, port in listed:
            need(host in replicas, f"envoy: portcullis_authz lists {host}:{port}, which is no portcullis replica")
        opts = (authz.get("typed_extension_protocol_options") or {}).get(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions", {}
        )
        need("http2_protocol_options" in (opts.get("explicit_http_config") or {}), "envoy: portcullis_authz is not HTTP/2")
        checks = [hc for hc in authz.get("health_checks") or [] if "grpc_health_check" in hc]
        if need(checks, "envoy: portcullis_authz has no gRPC health check"):
            hc = checks[0]
            service = (hc["grpc_health_check"] or {}).get("service_name", "")
            need(service in AUTHZ_HEALTH_NAMES, f"envoy: the health check asks for service {service!r}")
            interval, no_traffic = seconds(hc.get("interval")), seconds(hc.get("no_traffic_interval"))
            need(interval is not None and interval <= 2, f"envoy: health check interval {hc.get('interval')} (about 1s)")
            need(
                no_traffic is not None and no_traffic <= 5,
                f"envoy: no_traffic_interval {hc.get('no_traffic_interval')} (unset is 60s: a replica gone while idle is found late)",
            )
            need(hc.get("timeout") is not None, "envoy: the health check has no timeout")
            need(1 <= int(hc.get("unhealthy_threshold", 0)) <= 3, "envoy: unhealthy_threshold should be 1 to 3")
            need(int(hc.get("healthy_threshold", 0)) == 1, "envoy: healthy_threshold should be 1")

    if need("llm_upstream" in clusters, "envoy: no llm_upstream cluster"):
        host, port = endpoints("llm_upstream")[0]
        need(host == "fake-upstream", f"envoy: llm_upstream points at {host}, not fake-upstream")
        cmd = command_of(services.get("fake-upstream", {}))
        need(str(port) in cmd and "0.0.0.0" in cmd, f"fake-upstream: does not listen on 0.0.0.0:{port}")
    listeners = cfg["static_resources"]["listeners"]
    port = listeners[0]["address"]["socket_address"]["port_value"]
    need(any(str(p).endswith(f"{port}:{port}") for p in envoy.get("ports", [])), f"envoy: listener {port} not published")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
