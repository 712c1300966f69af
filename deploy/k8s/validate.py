"""Offline checks of the deployment files: every Kubernetes overlay and docker-compose.yml.

``kubectl kustomize`` renders each overlay in ``deploy/k8s/overlays``; kubernetes-validate checks
every built-in kind against the Kubernetes schemas, strict (unknown fields are errors), for the
oldest version the manifests need (native gRPC probes are GA in 1.27) and the newest it ships.
Strimzi's KafkaTopic has no schema there, so it is checked by structure, and against the
topics the code declares (``services.common.kafka.all_topics``). What no schema sees is checked
against the code too: every ``KS_*`` variable is a real setting with a valid value, the hosts
and ports the services dial are Services of the render, probes hit the service's own port.

    python -m deploy.k8s.validate                 # what `make lint-k8s` runs
    python -m deploy.k8s.validate --write-topics  # regenerate the production KafkaTopics

Over 400 lines because it is a list of independent checks, each a small function, over the same
rendered documents.
"""

from __future__ import annotations

import argparse
import base64
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from pydantic import ValidationError
from pydantic_settings import BaseSettings

from services.common.auth import TokenError, parse_tokens
from services.common.kafka import all_topics
from services.common.settings import MAX_RECORD_BYTES, REPO_ROOT, CommonSettings
from services.embed.settings import EmbedSettings
from services.engine.settings import EngineSettings
from services.infer.settings import InferSettings
from services.ingest.settings import IngestSettings
from services.monitor.settings import MonitorSettings
from services.openai_api.settings import OpenAISettings
from services.retrieve.settings import RetrieveSettings
from services.trainer.settings import TrainerSettings

K8S = Path(__file__).resolve().parent
COMPOSE = REPO_ROOT / "docker-compose.yml"
TOPICS_FILE = K8S / "overlays" / "production" / "kafka-topics.yaml"
# Oldest Kubernetes with GA gRPC probes, and the newest schemas kubernetes-validate ships.
KUBERNETES_VERSIONS = ("1.27", kubernetes_validate.latest_version())
GPU_OVERLAYS = {"gpu"}
GPU = "nvidia.com/gpu"

SERVICE_SETTINGS: dict[str, type[CommonSettings]] = {
    "ingest": IngestSettings,
    "embed": EmbedSettings,
    "retrieve": RetrieveSettings,
    "infer": InferSettings,
    "monitor": MonitorSettings,
    "trainer": TrainerSettings,
    "openai_api": OpenAISettings,
}
# The HTTP front: its port setting is not named after its package, and it has no gRPC health.
HTTP_SERVICES = {"openai_api": "openai_port"}
ALL_SETTINGS: list[type[CommonSettings]] = [
    CommonSettings,
    EngineSettings,
    *SERVICE_SETTINGS.values(),
]
KNOWN_SETTINGS = {f"KS_{name.upper()}" for cls in ALL_SETTINGS for name in cls.model_fields}
# Service hosts the services dial, and the port setting each one goes with.
HOST_PORTS = {
    "KS_EMBED_HOST": "embed_port",
    "KS_RETRIEVE_HOST": "retrieve_port",
    "KS_INFER_HOST": "infer_port",
    "KS_TRITON_HOST": "triton_grpc_port",
}
DEFAULTS = CommonSettings.model_validate({})
KAFKA_TOPIC_SPEC = {"partitions", "replicas", "config", "topicName"}


def int_setting(env: dict[str, str], field: str) -> int:
    """An integer setting as the services read it (a bad value is reported as a setting)."""
    default = int(getattr(DEFAULTS, field))
    try:
        return int(env.get(f"KS_{field.upper()}", default))
    except ValueError:
        return default


def partitions_of(settings: dict[str, str]) -> int:
    return int_setting(settings, "topic_partitions")


class Problems(list[str]):
    def add(self, where: str, message: str) -> None:
        self.append(f"{where}: {message}")


def kubectl() -> str:
    path = shutil.which("kubectl")
    if path is None:
        sys.exit(
            "kubectl not found: the Kubernetes checks render the overlays with `kubectl "
            "kustomize` (kubectl >= 1.27, kustomize v5); install kubectl and run again"
        )
    return path


def render(overlay: Path) -> list[dict[str, Any]]:
    done = subprocess.run(
        [kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip() or f"kubectl kustomize exited {done.returncode}")
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def name_of(doc: dict[str, Any]) -> str:
    meta = doc.get("metadata", {})
    return f"{doc.get('kind')}/{meta.get('name')}"


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    if doc.get("kind") in {"Deployment", "StatefulSet", "Job"}:
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    return None


def containers(doc: dict[str, Any]) -> Iterator[dict[str, Any]]:
    spec = pod_spec(doc)
    if spec:
        yield from spec.get("initContainers", [])
        yield from spec.get("containers", [])


def service_module(container: dict[str, Any]) -> str | None:
    """``ingest`` for ``python -m services.ingest``; None for anything else."""
    command = [*container.get("command", []), *container.get("args", [])]
    for i, word in enumerate(command[:-1]):
        if word == "-m" and command[i + 1].startswith("services."):
            return str(command[i + 1].split(".")[1])
    return None


def settings_class(container: dict[str, Any]) -> type[CommonSettings] | None:
    module = service_module(container)
    if module is not None:
        return SERVICE_SETTINGS.get(module)
    command = " ".join([*container.get("command", []), *container.get("args", [])])
    if "tritonserver" in command:
        return EngineSettings
    if "services.common" in command:
        return CommonSettings
    return None


# --- settings --------------------------------------------------------------------------------


def check_settings(
    where: str, env: dict[str, str], cls: type[BaseSettings], problems: Problems
) -> None:
    """Every KS_* name is a setting of some service, and the values are valid for ``cls``."""
    for key in env:
        if key.startswith("KS_") and key not in KNOWN_SETTINGS:
            problems.add(where, f"{key} is not a setting of any service")
    values = {k[3:].lower(): v for k, v in env.items() if k.startswith("KS_")}
    try:
        cls.model_validate({k: v for k, v in values.items() if k in cls.model_fields})
    except ValidationError as e:
        for error in e.errors():
            field = ".".join(str(p) for p in error["loc"])
            problems.add(where, f"KS_{field.upper()}: {error['msg']}")


def container_env(
    container: dict[str, Any], config_maps: dict[str, dict[str, str]], where: str, p: Problems
) -> dict[str, str]:
    """The container's environment as the kubelet builds it: envFrom first, then env in
    order, with $(NAME) expanded from what came before (secrets stand in as placeholders)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source.get("configMapRef", {}).get("name")
        if ref is not None:
            if ref not in config_maps:
                p.add(where, f"envFrom names ConfigMap {ref}, not in the render")
            env.update(config_maps.get(ref, {}))
    for item in container.get("env", []):
        value = item.get("value")
        if value is None:
            env[item["name"]] = "secret"
            continue
        for ref in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value):
            if ref not in env:
                p.add(where, f"{item['name']} expands $({ref}), which is not defined before it")
        env[item["name"]] = re.sub(
            r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), ""), value
        )
    return env


# --- one overlay -----------------------------------------------------------------------------


def check_schemas(docs: list[dict[str, Any]], where: str, p: Problems) -> tuple[int, int]:
    validated = topics = 0
    for doc in docs:
        if doc.get("kind") == "KafkaTopic":
            topics += 1
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(x) for x in e.path)
                p.add(f"{where} {name_of(doc)}", f"Kubernetes {version}: {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                p.add(f"{where} {name_of(doc)}", e.message)
        validated += 1
    return validated, topics


def check_kafka_topics(
    docs: list[dict[str, Any]], settings: dict[str, str], where: str, p: Problems
) -> None:
    topics = [d for d in docs if d.get("kind") == "KafkaTopic"]
    if not topics:
        return
    clusters = set()
    declared: dict[str, int] = {}
    for doc in topics:
        at = f"{where} {name_of(doc)}"
        if doc.get("apiVersion") != "kafka.strimzi.io/v1beta2":
            p.add(at, f"apiVersion {doc.get('apiVersion')}, want kafka.strimzi.io/v1beta2")
        cluster = doc.get("metadata", {}).get("labels", {}).get("strimzi.io/cluster")
        if not cluster:
            p.add(at, "no strimzi.io/cluster label (the Topic Operator ignores it)")
        clusters.add(cluster)
        spec = doc.get("spec", {})
        if set(spec) - KAFKA_TOPIC_SPEC:
            p.add(at, f"unknown spec fields {sorted(set(spec) - KAFKA_TOPIC_SPEC)}")
        for field in ("partitions", "replicas"):
            if not isinstance(spec.get(field), int) or spec[field] < 1:
                p.add(at, f"spec.{field} must be an integer >= 1")
        # A kustomize name prefix or suffix must not rename the Kafka topic itself.
        name = spec.get("topicName")
        if not name:
            p.add(at, "no spec.topicName")
            continue
        declared[name] = spec.get("partitions", 0)
        max_bytes = int(spec.get("config", {}).get("max.message.bytes", 0))
        if max_bytes < MAX_RECORD_BYTES:
            p.add(at, f"max.message.bytes {max_bytes} < the producers' {MAX_RECORD_BYTES}")
    if len(clusters) > 1:
        p.add(where, f"KafkaTopics name several clusters: {sorted(map(str, clusters))}")
    cluster = next(iter(clusters))
    bootstrap = settings.get("KS_KAFKA_BOOTSTRAP", "")
    if not bootstrap.startswith(f"{cluster}-kafka-bootstrap."):
        p.add(where, f"KS_KAFKA_BOOTSTRAP {bootstrap} is not cluster {cluster}'s bootstrap")
    partitions = partitions_of(settings)
    wanted = all_topics(CommonSettings.model_validate({"topic_partitions": partitions}))
    if declared != wanted:
        missing = sorted(set(wanted) - set(declared))
        extra = sorted(set(declared) - set(wanted))
        wrong = sorted(t for t in set(wanted) & set(declared) if wanted[t] != declared[t])
        p.add(
            where,
            f"KafkaTopics differ from all_topics() with {partitions} partitions (missing "
            f"{missing}, extra {extra}, partitions {wrong}): python -m deploy.k8s.validate "
            "--write-topics",
        )


def check_triton_readiness(doc: dict[str, Any], overlay: str, p: Problems) -> None:
    triton = doc["spec"]["template"]["spec"]["containers"][0]
    ready = triton.get("readinessProbe", {}).get("httpGet", {})
    if ready.get("path") != "/v2/health/ready":
        p.add(f"{overlay} {name_of(doc)}", "readiness is not GET /v2/health/ready")


def check_dialled_addresses(
    settings: dict[str, str], reachable: Callable[[str, str], None]
) -> None:
    """The service hosts and the Kafka bootstrap the shared settings name."""
    for key, port_field in HOST_PORTS.items():
        if key in settings:
            reachable(key, f"{settings[key]}:{int_setting(settings, port_field)}")
    bootstrap = settings.get("KS_KAFKA_BOOTSTRAP", "")
    if "." not in bootstrap.split(":")[0]:  # in-cluster short name: must be in the render
        for address in bootstrap.split(","):
            reachable("KS_KAFKA_BOOTSTRAP", address)


def check_workloads(docs: list[dict[str, Any]], overlay: str, p: Problems) -> dict[str, str]:
    """Settings, probes, addresses, volumes and GPUs of every workload; returns the shared
    settings (the knowstream-settings ConfigMap)."""
    config_maps = {
        d["metadata"]["name"]: dict(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"
    }
    settings = next(
        (v for k, v in config_maps.items() if k.startswith("knowstream-settings")), None
    )
    if settings is None:
        p.add(overlay, "no knowstream-settings ConfigMap")
        return {}
    services = {
        d["metadata"]["name"]: {port["port"] for port in d["spec"].get("ports", [])}
        for d in docs
        if d["kind"] == "Service"
    }

    def reachable(what: str, host_port: str) -> None:
        host, _, port = host_port.rpartition(":")
        if host.split(".")[0] not in services:
            p.add(overlay, f"{what} {host_port}: no Service {host} in the render")
        elif int(port) not in services[host.split(".")[0]]:
            p.add(overlay, f"{what} {host_port}: Service {host} has no port {port}")

    check_dialled_addresses(settings, reachable)
    for doc in docs:
        for c in containers(doc):
            where = f"{overlay} {name_of(doc)} {c['name']}"
            cls = settings_class(c)
            if cls is None:
                continue
            env = container_env(c, config_maps, where, p)
            check_settings(where, env, cls, p)
            redis = re.match(r"redis://:([^@]+)@([^/]+)/", env.get("KS_REDIS_URL", ""))
            if "KS_REDIS_URL" in env and not redis:
                p.add(where, "KS_REDIS_URL carries no password")
            elif redis:
                reachable("KS_REDIS_URL", redis.group(2))
            module = service_module(c)
            if module in HTTP_SERVICES:
                port = int_setting(env, HTTP_SERVICES[module])
                check_http_probes(where, c, port, p)
                reachable(f"{module} port", f"{HTTP_SERVICES[module].removesuffix('_port')}:{port}")
            elif module is not None:
                port = int_setting(env, f"{module}_port")
                check_probes(where, c, port, p)
                reachable(f"{module} port", f"{module}:{port}")
        if name_of(doc) == "Deployment/triton":
            check_triton_readiness(doc, overlay, p)

    check_volumes(docs, overlay, p)
    check_gpus(docs, overlay, p)
    check_scaling(docs, settings, overlay, p)
    return settings


def check_probes(where: str, c: dict[str, Any], port: int, p: Problems) -> None:
    ports = {cp.get("name"): cp["containerPort"] for cp in c.get("ports", [])}
    if ports.get("grpc") != port:
        p.add(where, f"containerPort grpc is {ports.get('grpc')}, the service listens on {port}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_port = c.get(probe, {}).get("grpc", {}).get("port")
        if grpc_port != port:
            p.add(where, f"{probe} is not a gRPC health probe on {port}")


def check_http_probes(where: str, c: dict[str, Any], port: int, p: Problems) -> None:
    ports = {cp.get("name"): cp["containerPort"] for cp in c.get("ports", [])}
    if ports.get("http") != port:
        p.add(where, f"containerPort http is {ports.get('http')}, the service listens on {port}")
    ready = c.get("readinessProbe", {}).get("httpGet", {})
    if ready.get("path") != "/health" or ready.get("port") not in ("http", port):
        p.add(where, "readiness is not GET /health on the service's port")


def check_volumes(docs: list[dict[str, Any]], overlay: str, p: Problems) -> None:
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    users = set()
    for doc in docs:
        spec = pod_spec(doc)
        for volume in (spec or {}).get("volumes", []):
            claim = volume.get("persistentVolumeClaim", {}).get("claimName")
            if claim is None:
                continue
            if claim not in claims:
                p.add(f"{overlay} {name_of(doc)}", f"mounts PVC {claim}, not in the render")
            if claim == "adapters":
                users.add(doc["metadata"]["name"])
    if users != {"infer", "triton", "trainer"}:
        p.add(overlay, f"the adapters volume is mounted by {sorted(users)}")


def check_gpus(docs: list[dict[str, Any]], overlay: str, p: Problems) -> None:
    with_gpu = set()
    for doc in docs:
        for c in containers(doc):
            resources = c.get("resources", {})
            requested = resources.get("requests", {}).get(GPU)
            if requested is not None or GPU in resources.get("limits", {}):
                # Extended resources cannot be overcommitted: requests must equal limits.
                if requested != resources.get("limits", {}).get(GPU):
                    p.add(f"{overlay} {name_of(doc)}", f"{GPU} requests differ from limits")
                with_gpu.add(doc["metadata"]["name"])
    expected = {"triton", "trainer"} if overlay in GPU_OVERLAYS else set()
    if with_gpu != expected:
        p.add(overlay, f"GPUs requested by {sorted(with_gpu)}, expected {sorted(expected)}")


def check_scaling(
    docs: list[dict[str, Any]], settings: dict[str, str], overlay: str, p: Problems
) -> None:
    workloads = {name_of(d): d for d in docs}
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        workload = workloads.get(f"{target['kind']}/{target['name']}")
        if workload is None:
            p.add(f"{overlay} {name_of(hpa)}", f"scales {target['name']}, not in the render")
        elif "replicas" in workload["spec"]:
            p.add(f"{overlay} {name_of(hpa)}", "its Deployment sets replicas (an apply resets it)")
        if target["name"] == "embed":
            partitions = partitions_of(settings)
            if hpa["spec"]["maxReplicas"] > partitions:
                p.add(f"{overlay} {name_of(hpa)}", f"more workers than {partitions} partitions")


def check_secrets(docs: list[dict[str, Any]], overlay: str, p: Problems) -> None:
    """Every secret key a pod reads exists (a production secrets.env may lack one), and only
    dev carries the base's dev-only placeholders."""
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    for name, data in secrets.items():
        for key, value in data.items():
            if overlay != "dev" and "dev-only" in base64.b64decode(value).decode():
                p.add(f"{overlay} Secret/{name}", f"{key} is the base's dev-only placeholder")
    for doc in docs:
        wanted = [
            (ref["name"], ref["key"])
            for c in containers(doc)
            for item in c.get("env", [])
            if (ref := item.get("valueFrom", {}).get("secretKeyRef"))
        ]
        for volume in (pod_spec(doc) or {}).get("volumes", []):
            if "secret" in volume:
                name = volume["secret"]["secretName"]
                wanted += [(name, item["key"]) for item in volume["secret"].get("items", [])]
        for name, key in wanted:
            if key not in secrets.get(name, {}):
                p.add(f"{overlay} {name_of(doc)}", f"reads key {key} of Secret {name}: missing")


def check_auth(docs: list[dict[str, Any]], overlay: str, p: Problems) -> None:
    """Every service pod starts with auth on: its token file (KS_AUTH_TOKENS_FILE) is a key of
    a Secret mounted where the setting says, and that key is a valid token set holding the
    token the services present to each other."""
    config_maps = {
        d["metadata"]["name"]: dict(d.get("data", {})) for d in docs if d["kind"] == "ConfigMap"
    }
    secrets = {d["metadata"]["name"]: d.get("data", {}) for d in docs if d["kind"] == "Secret"}
    for doc in docs:
        volumes = {v["name"]: v for v in (pod_spec(doc) or {}).get("volumes", [])}
        for c in containers(doc):
            if service_module(c) is None:
                continue
            where = f"{overlay} {name_of(doc)} {c['name']}"
            env = container_env(c, config_maps, where, Problems())
            if env.get("KS_AUTH") == "off":
                p.add(where, "KS_AUTH=off: the service would run without authentication")
            if "KS_AUTH_TOKENS" in env:
                continue  # inline, from a secretKeyRef (check_secrets checks the key exists)
            path = env.get("KS_AUTH_TOKENS_FILE", "")
            if not path.startswith("/"):
                p.add(where, "neither KS_AUTH_TOKENS nor an absolute KS_AUTH_TOKENS_FILE")
                continue
            folder, _, file = path.rpartition("/")
            mount = next((m for m in c.get("volumeMounts", []) if m["mountPath"] == folder), None)
            secret = volumes.get(mount["name"], {}).get("secret") if mount else None
            item = next((i for i in (secret or {}).get("items", []) if i.get("path") == file), None)
            if secret is None or item is None:
                p.add(where, f"KS_AUTH_TOKENS_FILE {path} is not a Secret key mounted there")
                continue
            raw = secrets.get(secret["secretName"], {}).get(item["key"])
            if raw is None:
                continue  # check_secrets reports the missing key
            cls = settings_class(c) or CommonSettings
            service_token = cls.model_fields["auth_service_token"].default
            try:
                tokens = parse_tokens(base64.b64decode(raw).decode(), f"{item['key']}")
            except TokenError as e:
                p.add(where, f"Secret {secret['secretName']}: {e}")
                continue
            if tokens.by_name(env.get("KS_AUTH_SERVICE_TOKEN", service_token)) is None:
                p.add(where, f"the token set has no {service_token!r} token (service to service)")


def check_overlay(tree: Path, overlay: str, p: Problems) -> str:
    try:
        docs = render(tree / "overlays" / overlay)
    except RuntimeError as e:
        p.add(overlay, f"kubectl kustomize failed: {e}")
        return f"{overlay}: does not render"
    validated, topics = check_schemas(docs, overlay, p)
    settings = check_workloads(docs, overlay, p)
    check_kafka_topics(docs, settings, overlay, p)
    check_secrets(docs, overlay, p)
    check_auth(docs, overlay, p)
    versions = " and ".join(KUBERNETES_VERSIONS)
    return (
        f"{overlay}: {len(docs)} documents, {validated} validated (Kubernetes {versions}, "
        f"strict), {topics} KafkaTopics checked"
    )


def check_kubernetes(p: Problems) -> list[str]:
    """Renders from a copy of deploy/k8s, where each missing secrets.env (never committed) is
    its example, so the checks run without real secrets."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "k8s"
        shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
        for example in tree.glob("overlays/*/secrets.env.example"):
            real = example.with_name("secrets.env")
            if not real.exists():
                shutil.copy(example, real)
        overlays = sorted(d.name for d in (tree / "overlays").iterdir() if d.is_dir())
        return [check_overlay(tree, overlay, p) for overlay in overlays]


# --- docker-compose --------------------------------------------------------------------------

PUBLISH_HOSTS = {"127.0.0.1", "${KS_PUBLISH_HOST:-127.0.0.1}"}


def check_compose(p: Problems) -> str:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    services: dict[str, dict[str, Any]] = compose["services"]
    for name, svc in services.items():
        where = f"docker-compose {name}"
        one_shot = svc.get("restart") == "no"
        test = svc.get("healthcheck", {}).get("test")
        if not one_shot and not test:
            p.add(where, "no healthcheck")
        command = " ".join(map(str, svc.get("command", [])))
        module = re.search(r"-m services\.(\w+)", command)
        if module and test:
            setting = HTTP_SERVICES.get(module.group(1), f"{module.group(1)}_port")
            port = getattr(DEFAULTS, setting)
            if str(port) not in " ".join(test):
                p.add(where, f"the healthcheck does not probe the service's port {port}")
        depends = svc.get("depends_on", {})
        if not isinstance(depends, dict):
            p.add(where, "depends_on without conditions (starts before its dependencies)")
            depends = {}
        for dep, condition in depends.items():
            wanted = (
                "service_completed_successfully"
                if services.get(dep, {}).get("restart") == "no"
                else "service_healthy"
            )
            if dep not in services:
                p.add(where, f"depends on {dep}, which is not a service")
            elif condition.get("condition") != wanted:
                p.add(where, f"depends on {dep} without condition {wanted}")
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 2)[0] if str(port).count(":") >= 2 else ""
            if host not in PUBLISH_HOSTS:
                p.add(where, f"port {port} is published beyond loopback by default")
        env = {k: str(v) for k, v in svc.get("environment", {}).items()}
        cls = SERVICE_SETTINGS.get(module.group(1)) if module else None
        if env:
            check_settings(where, _without_interpolation(env), cls or CommonSettings, p)
        if "KS_REDIS_URL" in env and "${KS_REDIS_PASSWORD" not in env["KS_REDIS_URL"]:
            p.add(where, "KS_REDIS_URL carries no password")
        if module and not {"KS_AUTH_TOKENS", "KS_AUTH_TOKENS_FILE"} & set(env):
            p.add(where, "no KS_AUTH_TOKENS: the service would not start (auth is on)")
        if env.get("KS_AUTH") == "off":
            p.add(where, "KS_AUTH=off: the service would run without authentication")
    redis = " ".join(map(str, services.get("redis", {}).get("command", [])))
    for flag in ("--requirepass", "--appendonly yes", "--appendfsync everysec"):
        if flag not in redis:
            p.add("docker-compose redis", f"not started with {flag}")
    triton = " ".join(map(str, services.get("triton", {}).get("command", [])))
    for flag in ("--grpc-restricted-protocol", "--http-restricted-api"):
        if flag not in triton:
            p.add("docker-compose triton", f"not started with {flag}")
    return f"docker-compose.yml: {len(services)} services checked"


def _without_interpolation(env: dict[str, str]) -> dict[str, str]:
    """Compose fills ${VAR:-default} in; validate with the default (or a placeholder)."""

    def fill(m: re.Match[str]) -> str:
        return m.group(2) if m.group(1) == ":-" else "x"

    return {k: re.sub(r"\$\{\w+(:-|:\?|-|\?)?([^}]*)\}", fill, v) for k, v in env.items()}


# --- topics ----------------------------------------------------------------------------------


def write_topics(partitions: int, cluster: str, namespace: str, replicas: int) -> None:
    topics = all_topics(CommonSettings.model_validate({"topic_partitions": partitions}))
    docs = [
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaTopic",
            "metadata": {
                "name": topic.replace(".", "-"),
                "namespace": namespace,
                "labels": {"strimzi.io/cluster": cluster},
            },
            "spec": {
                "topicName": topic,
                "partitions": count,
                "replicas": replicas,
                "config": {
                    "max.message.bytes": str(MAX_RECORD_BYTES),
                    "min.insync.replicas": str(min(2, replicas)),
                },
            },
        }
        for topic, count in topics.items()
    ]
    header = (
        "# Generated by `python -m deploy.k8s.validate --write-topics` from\n"
        "# services.common.kafka.all_topics (every topic, its partitions, its .dlq); the\n"
        "# validation fails when the code's topics and these differ.\n"
    )
    body = yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
    TOPICS_FILE.write_text(header + body, encoding="utf-8")
    print(f"wrote {len(docs)} KafkaTopics to {TOPICS_FILE.relative_to(REPO_ROOT)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--write-topics", action="store_true")
    parser.add_argument("--partitions", type=int, default=8)
    parser.add_argument("--cluster", default="knowstream", help="Strimzi Kafka cluster name")
    parser.add_argument("--namespace", default="kafka", help="the Kafka cluster's namespace")
    parser.add_argument("--replicas", type=int, default=3)
    args = parser.parse_args()
    if args.write_topics:
        write_topics(args.partitions, args.cluster, args.namespace, args.replicas)
        return
    problems = Problems()
    summary = [*check_kubernetes(problems), check_compose(problems)]
    print("\n".join(summary))
    if problems:
        print(f"\n{len(problems)} problems:", *problems, sep="\n  ")
        sys.exit(1)
    print("deployment files: OK")


if __name__ == "__main__":
    main()
