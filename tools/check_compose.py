#!/usr/bin/env python3
"""Validates docker-compose.yml against the repository (no Docker engine needed).

Checks that the three services exist, that every file mounted from the repository
exists, that Envoy's compose config points at the ports portcullis and the fake
upstream listen on, and that the Envoy image is the version the tests run.
Exits non-zero with one line per problem.
"""
import os
import re
import sys

import yaml

root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
problems = []


def need(cond, msg):
    if not cond:
        problems.append(msg)


with open(os.path.join(root, "docker-compose.yml")) as f:
    compose = yaml.safe_load(f)

services = compose.get("services", {})
for name in ("portcullis", "fake-upstream", "envoy"):
    need(name in services, f"service '{name}' is missing")

for name, svc in services.items():
    for vol in svc.get("volumes", []):
        src = vol.split(":", 1)[0]
        if src.startswith("./"):
            need(os.path.exists(os.path.join(root, src)), f"{name}: mounted file {src} does not exist")
    if "build" in svc:
        ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
        need(os.path.exists(os.path.join(root, ctx, "Dockerfile")), f"{name}: no Dockerfile in build context {ctx}")
    for dep in svc.get("depends_on", []):
        need(dep in services, f"{name}: depends on unknown service {dep}")
    for vol in svc.get("volumes", []):
        src = vol.split(":", 1)[0]
        if not src.startswith(("./", "/")):
            need(src in (compose.get("volumes") or {}), f"{name}: named volume {src} is not declared")

envoy = services.get("envoy", {})
need(re.search(r":v1\.40\.", envoy.get("image", "")) is not None, "envoy: image must be Envoy v1.40.x")
mount = next((v for v in envoy.get("volumes", []) if v.endswith(":/etc/envoy/envoy.yaml:ro")), None)
need(mount is not None, "envoy: envoy config is not mounted at /etc/envoy/envoy.yaml")

if mount:
    with open(os.path.join(root, mount.split(":", 1)[0])) as f:
        cfg = yaml.safe_load(f)
    clusters = {c["name"]: c for c in cfg["static_resources"]["clusters"]}

    def endpoint(cluster):
        ep = clusters[cluster]["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        return ep["socket_address"]["address"], ep["socket_address"]["port_value"]

    host, port = endpoint("portcullis_authz")
    need(host == "portcullis", f"envoy: portcullis_authz points at {host}, not the portcullis service")
    cmd = " ".join(services.get("portcullis", {}).get("command", []))
    need(f"0.0.0.0:{port}" in cmd, f"portcullis: authz listener is not on 0.0.0.0:{port} ({cmd})")
    host, port = endpoint("llm_upstream")
    need(host == "fake-upstream", f"envoy: llm_upstream points at {host}, not fake-upstream")
    cmd = services.get("fake-upstream", {}).get("command", [])
    need(str(port) in cmd and "0.0.0.0" in cmd, f"fake-upstream: does not listen on 0.0.0.0:{port}")
    listeners = cfg["static_resources"]["listeners"]
    port = listeners[0]["address"]["socket_address"]["port_value"]
    need(any(str(p).endswith(f"{port}:{port}") for p in envoy.get("ports", [])), f"envoy: listener {port} not published")

env = services.get("portcullis", {}).get("environment", {})
need("PORTCULLIS_BOOTSTRAP_TOKEN" in env, "portcullis: no PORTCULLIS_BOOTSTRAP_TOKEN, the owner token would only be in the logs")

for p in problems:
    print(p)
sys.exit(1 if problems else 0)
