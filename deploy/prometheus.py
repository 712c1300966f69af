"""A real Prometheus for the embedded stack (``make up PROMETHEUS=1`` or ``KS_PROMETHEUS=1``):
Debian's ``prometheus`` package, installed with apt-get on first use, scraping every service's
``/metrics`` and Triton's, with its configuration and data under ``<run dir>/prometheus/``.

Each target carries a ``component`` label (the stack's component name: ``embed-2`` for a second
embed worker). Not ``service``: the services' own metrics have a ``service`` label, which a
target label of that name would rename to ``exported_service``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Protocol

import yaml

from services.common.settings import CommonSettings

PACKAGE = "prometheus"


class StackLike(Protocol):
    settings: CommonSettings
    run_dir: Path

    @property
    def services(self) -> list[str]: ...

    def metrics_port(self, name: str) -> int: ...


def ensure_installed() -> str:
    """The prometheus binary, installed from Debian's package when it is missing. Raises with
    apt-get's own words when that fails (no root, no mirror): nothing is skipped silently."""
    found = shutil.which("prometheus")
    if found:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("prometheus is not installed: run `apt-get install -y prometheus`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", PACKAGE]
    print("installing Prometheus (apt-get install prometheus) ...")
    done = subprocess.run(install, env=env, capture_output=True, text=True)
    if done.returncode != 0:  # a stale package list is the usual cause
        subprocess.run(["apt-get", "update"], env=env, capture_output=True, text=True)
        done = subprocess.run(install, env=env, capture_output=True, text=True)
    found = shutil.which("prometheus")
    if done.returncode != 0 or not found:
        raise RuntimeError(
            f"apt-get install {PACKAGE} failed:\n{(done.stdout + done.stderr)[-2000:]}"
        )
    return found


def scrape_targets(stack: StackLike) -> list[dict[str, Any]]:
    """One static config per component with a metrics port, and Triton's."""
    host = stack.settings.host
    targets = [
        {"targets": [f"{host}:{port}"], "labels": {"component": name}}
        for name in stack.services
        if (port := stack.metrics_port(name))
    ]
    triton = f"{host}:{stack.settings.triton_metrics_port}"
    return [*targets, {"targets": [triton], "labels": {"component": "triton"}}]


def write_config(stack: StackLike) -> Path:
    interval = f"{stack.settings.prometheus_scrape_s:g}s"
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval},
        "scrape_configs": [
            {"job_name": "knowstream", "static_configs": scrape_targets(stack)},
        ],
    }
    path = stack.run_dir / "prometheus" / "prometheus.yml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# Written by deploy/prometheus.py at every start.\n" + yaml.safe_dump(config),
        encoding="utf-8",
    )
    return path


def command(stack: StackLike, binary: str) -> list[str]:
    s, data = stack.settings, stack.run_dir / "prometheus" / "data"
    return [
        binary,
        f"--config.file={write_config(stack)}",
        f"--storage.tsdb.path={data}",
        "--storage.tsdb.retention.time=7d",
        f"--web.listen-address={s.host}:{s.prometheus_port}",
    ]


def url(settings: CommonSettings, path: str) -> str:
    return f"http://{settings.host}:{settings.prometheus_port}{path}"


def ready(settings: CommonSettings) -> bool:
    try:
        with urllib.request.urlopen(url(settings, "/-/ready"), timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def query(settings: CommonSettings, promql: str) -> list[dict[str, Any]]:
    """An instant query's result vector (raises on an HTTP or query error)."""
    q = urllib.parse.urlencode({"query": promql})
    with urllib.request.urlopen(url(settings, f"/api/v1/query?{q}"), timeout=5) as reply:
        body = json.loads(reply.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query {promql!r} failed: {body}")
    return list(body["data"]["result"])


def up_by_component(settings: CommonSettings) -> dict[str, float]:
    """The last scrape's ``up`` (1 = scraped) of every target, by component."""
    return {
        r["metric"].get("component", "?"): float(r["value"][1])
        for r in query(settings, 'up{job="knowstream"}')
    }


def wait_scraped(settings: CommonSettings, components: list[str], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    up: dict[str, float] = {}
    while time.monotonic() < deadline:
        up = up_by_component(settings)
        if all(up.get(c) == 1 for c in components):
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus has not scraped {components} within {timeout_s}s: {up}")
