"""Deployment artefacts: Dockerfile, docker-compose.yml, redis.conf, Kubernetes manifests.

No Docker engine or cluster runs here, so these are static checks:

- Kubernetes: every manifest is validated against the Kubernetes OpenAPI schemas with
  ``kubernetes-validate`` (strict: unknown fields fail), for an older and the newest
  supported version. KEDA's CRDs have no schema there and are checked field by field.
  When ``kubectl`` is on PATH, both kustomizations are also rendered with its built-in
  kustomize and the output validated the same way.
- Compose: ``docker compose config`` needs the Compose plugin (not on this machine), and
  Debian's ``docker-compose`` package is Compose v1 (end of life, an older schema) that
  pulls in 46 packages including the Docker engine. So the file is checked with PyYAML
  against a JSON Schema of the Compose keys this project uses (unknown keys fail), with
  ``${VAR:-default}`` interpolation applied as Compose does. If a ``docker compose`` or
  ``docker-compose`` binary is present, ``config -q`` runs too.
- Cross-checks: grace periods against the task time limits in Settings, commands against
  the real CLI parser, the KEDA trigger against the queue name and the Redis Service.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import redis
import yaml
from kubernetes_validate import utils as kv
from support.redis_server import free_port

from dspex_tasks.app import LM_QUEUE
from dspex_tasks.gateway.server import check_bind
from dspex_tasks.settings import Settings
from workers import heartbeat, liveness

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = {"keda": K8S, "hpa-cpu": K8S / "hpa-cpu"}
COMPOSE_FILE = ROOT / "docker-compose.yml"
APP_IMAGE = "dspex-tasks"
#: An older and the newest Kubernetes the validator knows.
K8S_VERSIONS = ("1.30.0", kv.latest_version())
CRD_GROUPS = ("keda.sh/",)
#: A SHA-256 digest, as DSPEX_API_TOKENS holds them.
DIGEST = "0" * 64

Doc = dict[str, Any]


# --- loading ------------------------------------------------------------------------------


def load_yaml_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomization(directory: Path) -> Doc:
    doc: Doc = yaml.safe_load((directory / "kustomization.yaml").read_text())
    return doc


def source_docs(directory: Path) -> list[Doc]:
    """The objects a kustomization builds, before transformers (namespace, images, hash
    suffixes), with configMapGenerator ConfigMaps included under their plain names."""
    kust = kustomization(directory)
    docs: list[Doc] = []
    for entry in kust.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(source_docs(path) if path.is_dir() else load_yaml_docs(path))
    for gen in kust.get("configMapGenerator", []):
        data = {}
        for item in gen.get("files", []):
            key, _, name = item.rpartition("=") if "=" in item else ("", "", item)
            data[key or Path(name).name] = (directory / name).read_text()
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": gen["name"]},
                "data": data,
            }
        )
    return docs


def find(docs: list[Doc], kind: str, name: str | None = None) -> Doc:
    matches = [
        d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


def pod_spec(doc: Doc) -> Doc:
    spec: Doc = doc["spec"]["template"]["spec"]
    return spec


def containers(doc: Doc) -> list[Doc]:
    return list(pod_spec(doc)["containers"])


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d["kind"] in {"Deployment", "StatefulSet"}]


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def build(request: pytest.FixtureRequest) -> tuple[str, list[Doc]]:
    return request.param, source_docs(KUSTOMIZATIONS[request.param])


@pytest.fixture(scope="module")
def k8s() -> list[Doc]:
    return source_docs(K8S)


# --- Kubernetes: schema validation --------------------------------------------------------


def test_every_manifest_file_is_in_a_kustomization() -> None:
    listed: set[Path] = set()
    for directory in [K8S, K8S / "base", K8S / "hpa-cpu"]:
        kust = kustomization(directory)
        for entry in kust.get("resources", []):
            path = (directory / entry).resolve()
            assert path.exists(), f"{directory}/kustomization.yaml lists missing {entry}"
            listed.add(path)
        for gen in kust.get("configMapGenerator", []):
            listed.update((directory / f.rpartition("=")[2]).resolve() for f in gen["files"])
    on_disk = {
        p.resolve()
        for p in K8S.rglob("*")
        if p.suffix in {".yaml", ".yml", ".conf"} and p.name != "kustomization.yaml"
    }
    assert on_disk - listed == set(), "manifests no kustomization applies"


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_kubernetes_schemas(
    build: tuple[str, list[Doc]], version: str
) -> None:
    _, docs = build
    for doc in docs:
        if doc["apiVersion"].startswith(CRD_GROUPS):
            continue  # KEDA: checked in test_keda_scaled_object
        kv.validate(doc, version, strict=True)


def test_strict_validation_catches_a_typo(k8s: list[Doc]) -> None:
    """The validator is not vacuous: an unknown field fails."""
    worker = yaml.safe_load(yaml.safe_dump(find(k8s, "Deployment", "dspex-worker")))
    pod_spec(worker)["terminationGracePeriodSecond"] = 330
    with pytest.raises(kv.ValidationError):
        kv.validate(worker, K8S_VERSIONS[-1], strict=True)


def test_manifests_carry_no_namespace(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    assert [d["metadata"]["name"] for d in docs if "namespace" in d["metadata"]] == []


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl (kustomize) not installed")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kustomize_build_renders_valid_objects(name: str) -> None:
    out = subprocess.run(
        ["kubectl", "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    docs = [d for d in yaml.safe_load_all(out) if d]
    namespace = kustomization(KUSTOMIZATIONS[name])["namespace"]
    for doc in docs:
        assert doc["metadata"].get("namespace") == namespace
        if not doc["apiVersion"].startswith(CRD_GROUPS):
            kv.validate(doc, K8S_VERSIONS[-1], strict=True)
    kinds = {d["kind"] for d in docs}
    if name == "hpa-cpu":
        assert "HorizontalPodAutoscaler" in kinds and "ScaledObject" not in kinds
    else:
        assert "ScaledObject" in kinds and "HorizontalPodAutoscaler" not in kinds
    # The generated Redis ConfigMap (hash-suffixed) is the one the StatefulSet mounts.
    redis_set = find(docs, "StatefulSet", "redis")
    mounted = {v["configMap"]["name"] for v in pod_spec(redis_set)["volumes"] if "configMap" in v}
    generated = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    assert mounted <= generated
    for workload in workloads(docs):
        for c in containers(workload):
            if c["name"] != "redis":
                assert c["image"].startswith(APP_IMAGE + ":"), "images: tag not applied"


# --- Kubernetes: references and selectors -------------------------------------------------


def test_references_resolve(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}

    def secret_keys(name: str) -> set[str]:
        s = secrets[name]
        return set(s.get("stringData", {})) | set(s.get("data", {}))

    for workload in workloads(docs):
        spec = pod_spec(workload)
        for c in containers(workload):
            for e in c.get("env", []):
                ref = e.get("valueFrom", {})
                if "secretKeyRef" in ref:
                    r = ref["secretKeyRef"]
                    assert r["key"] in secret_keys(r["name"]), f"{c['name']}: {r}"
                if "configMapKeyRef" in ref:
                    r = ref["configMapKeyRef"]
                    assert r["key"] in maps[r["name"]]["data"], f"{c['name']}: {r}"
            for src in c.get("envFrom", []):
                if "secretRef" in src:
                    assert src["secretRef"]["name"] in secrets
                if "configMapRef" in src:
                    assert src["configMapRef"]["name"] in maps
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in spec.get("volumes", [])} | {
                t["metadata"]["name"] for t in workload["spec"].get("volumeClaimTemplates", [])
            }
        for v in spec.get("volumes", []):
            if "configMap" in v:
                assert v["configMap"]["name"] in maps


def test_selectors_match_pods(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in workloads(docs)
    }
    for workload in workloads(docs):
        selector = workload["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods[workload["metadata"]["name"]].items()
    for svc in (d for d in docs if d["kind"] == "Service"):
        matched = [
            w
            for w in workloads(docs)
            if svc["spec"]["selector"].items() <= pods[w["metadata"]["name"]].items()
        ]
        assert len(matched) == 1, (
            f"Service {svc['metadata']['name']} selects {len(matched)} workloads"
        )
        port_names = {p.get("name") for c in containers(matched[0]) for p in c.get("ports", [])}
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names
    pdb = find(docs, "PodDisruptionBudget", "dspex-worker")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pods["dspex-worker"].items()


def test_app_pods_are_non_root_with_writable_tmp(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    for workload in workloads(docs):
        spec = pod_spec(workload)
        assert spec["securityContext"]["runAsNonRoot"] is True
        for c in containers(workload):
            if c["image"] != APP_IMAGE:
                continue
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert "/tmp" in {m["mountPath"] for m in c.get("volumeMounts", [])}


def test_processes_get_the_redis_url_from_the_secret(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    redis_svc = find(docs, "Service", "redis")
    port = redis_svc["spec"]["ports"][0]["port"]
    for workload in workloads(docs):
        for c in containers(workload):
            if c["image"] != APP_IMAGE:
                continue
            env = env_of(c)
            assert env["REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "dspex-redis"
            url = urlsplit(env["DSPEX_REDIS_URL"]["value"])
            # $(REDIS_PASSWORD) is expanded by Kubernetes: it must be defined before use.
            assert list(env).index("REDIS_PASSWORD") < list(env).index("DSPEX_REDIS_URL")
            assert url.password == "$(REDIS_PASSWORD)"
            assert (url.hostname, url.port) == ("redis", port)


# --- Kubernetes: the processes ------------------------------------------------------------


def configmap_settings(docs: list[Doc]) -> Settings:
    data = find(docs, "ConfigMap", "dspex-config")["data"]
    assert all(k.startswith("DSPEX_") for k in data)
    return Settings.from_env(data)  # parses: no ConfigError


def test_worker_outlives_its_tasks_on_shutdown(k8s: list[Doc]) -> None:
    worker = find(k8s, "Deployment", "dspex-worker")
    grace = pod_spec(worker)["terminationGracePeriodSeconds"]
    assert grace > Settings().task_soft_time_limit_s
    configured = configmap_settings(k8s)
    # Warm shutdown waits for running tasks, which may run up to the hard limit.
    assert grace > configured.task_time_limit_s > configured.task_soft_time_limit_s
    assert "replicas" not in worker["spec"], "the autoscaler owns the worker's replicas"
    assert worker["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_worker_probes_use_the_heartbeat_file(k8s: list[Doc]) -> None:
    (worker,) = containers(find(k8s, "Deployment", "dspex-worker"))
    assert worker["args"] == ["worker"]
    assert set(worker["resources"]) == {"requests", "limits"}
    ages = {}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        command = worker[probe]["exec"]["command"]
        assert command[:3] == ["python", "-m", "workers.liveness"]
        assert "--ping" not in command, "probes must not depend on the broker"
        ages[probe] = float(command[command.index("--max-age-s") + 1])
    # Heartbeats come every 2 s: every limit leaves room for many missed beats.
    assert min(ages.values()) >= 10 * 2
    assert ages["livenessProbe"] > ages["readinessProbe"]
    # The probe's default path is the file the worker writes, under the /tmp emptyDir.
    assert heartbeat.DEFAULT_PATH == liveness._DEFAULT_PATH
    assert "--path" not in worker["livenessProbe"]["exec"]["command"]
    assert str(heartbeat.DEFAULT_PATH).startswith("/tmp/")


def test_beat_is_a_singleton(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    beat = find(docs, "Deployment", "dspex-beat")
    assert beat["spec"]["replicas"] == 1
    assert beat["spec"]["strategy"] == {"type": "Recreate"}
    for doc in docs:
        if doc["kind"] in {"HorizontalPodAutoscaler", "ScaledObject"}:
            assert doc["spec"]["scaleTargetRef"]["name"] != "dspex-beat"


def test_flower_requires_auth_and_stays_inside(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    (flower,) = containers(find(docs, "Deployment", "dspex-flower"))
    ref = env_of(flower)["DSPEX_FLOWER_PASSWORD"]["valueFrom"]["secretKeyRef"]
    secret = find(docs, "Secret", ref["name"])
    assert ref["key"] in secret["stringData"]
    assert "--allow-no-auth" not in flower["args"]
    for workload in workloads(docs):
        for c in containers(workload):
            assert "DSPEX_FLOWER_ALLOW_NO_AUTH" not in env_of(c)
    assert "DSPEX_FLOWER_ALLOW_NO_AUTH" not in find(docs, "ConfigMap", "dspex-config")["data"]
    for doc in docs:
        assert doc["kind"] not in {"Ingress", "Route", "Gateway", "HTTPRoute"}
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") == "ClusterIP"


def test_exporter_is_scrapable(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    (exporter,) = containers(find(docs, "Deployment", "dspex-exporter"))
    svc = find(docs, "Service", "dspex-exporter")
    notes = svc["metadata"]["annotations"]
    (port,) = [p["containerPort"] for p in exporter["ports"]]
    assert notes["prometheus.io/scrape"] == "true"
    assert int(notes["prometheus.io/port"]) == port == svc["spec"]["ports"][0]["port"]
    assert notes["prometheus.io/path"] == "/metrics"
    assert exporter["args"][exporter["args"].index("--port") + 1] == str(port)


def test_redis_statefulset_persists_with_aof(k8s: list[Doc]) -> None:
    redis_set = find(k8s, "StatefulSet", "redis")
    (c,) = containers(redis_set)
    assert c["image"].startswith("redis:7")
    assert c["args"][:2] == ["redis-server", "/etc/redis/redis.conf"]
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    (claim,) = redis_set["spec"]["volumeClaimTemplates"]
    assert "/data" in {
        m["mountPath"] for m in c["volumeMounts"] if m["name"] == claim["metadata"]["name"]
    }
    conf = find(k8s, "ConfigMap", "dspex-redis-config")["data"]["redis.conf"]
    assert redis_conf(conf)["dir"] == "/data"


# --- KEDA and the HPA alternative ---------------------------------------------------------


def test_keda_scaled_object(k8s: list[Doc]) -> None:
    scaled = find(k8s, "ScaledObject")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    target = scaled["spec"]["scaleTargetRef"]
    worker = find(k8s, "Deployment", target["name"])
    assert target.get("kind", "Deployment") == "Deployment"
    assert (
        worker["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"
    )
    # Never scale to zero: the workers also consume the maintenance queue (expiry sweeps).
    assert scaled["spec"]["minReplicaCount"] >= 1
    assert scaled["spec"]["maxReplicaCount"] > scaled["spec"]["minReplicaCount"]

    (trigger,) = scaled["spec"]["triggers"]
    assert trigger["type"] == "redis"
    meta = trigger["metadata"]
    assert meta["listName"] == LM_QUEUE
    assert int(meta["listLength"]) >= 1
    assert all(isinstance(v, str) for v in meta.values()), "KEDA metadata values are strings"

    # The address names the Redis Service by its full DNS name (KEDA's operator resolves
    # it from its own namespace), in the namespace the kustomization deploys to.
    redis_svc = find(k8s, "Service", "redis")
    host, _, port = meta["address"].rpartition(":")
    service, namespace, *rest = host.split(".")
    assert service == redis_svc["metadata"]["name"]
    assert (
        namespace == kustomization(K8S)["namespace"] == kustomization(K8S / "hpa-cpu")["namespace"]
    )
    assert rest[:1] == ["svc"]
    assert int(port) == redis_svc["spec"]["ports"][0]["port"]

    # Same database as the workers' broker.
    (c,) = containers(worker)
    assert int(meta["databaseIndex"]) == int(
        urlsplit(env_of(c)["DSPEX_REDIS_URL"]["value"]).path[1:]
    )

    # Password from the Secret via a TriggerAuthentication, never inline.
    assert not {"password", "passwordFromEnv"} & set(meta)
    auth = find(k8s, "TriggerAuthentication", trigger["authenticationRef"]["name"])
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    (ref,) = auth["spec"]["secretTargetRef"]
    assert ref["parameter"] == "password"
    assert ref["key"] in find(k8s, "Secret", ref["name"])["stringData"]
    # listLength follows one replica's concurrency.
    assert int(meta["listLength"]) == configmap_settings(k8s).worker_concurrency


def test_hpa_cpu_alternative() -> None:
    docs = source_docs(K8S / "hpa-cpu")
    assert not [d for d in docs if d["apiVersion"].startswith(CRD_GROUPS)]
    hpa = find(docs, "HorizontalPodAutoscaler", "dspex-worker")
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "dspex-worker",
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert hpa["spec"]["minReplicas"] >= 1
    # CPU utilization needs a CPU request on the target.
    (c,) = containers(find(docs, "Deployment", "dspex-worker"))
    assert "cpu" in c["resources"]["requests"]
    assert "hpa-cpu" not in [str(r) for r in kustomization(K8S).get("resources", [])]


# --- commands against the real CLI --------------------------------------------------------


def app_commands() -> Iterator[tuple[str, list[str]]]:
    for name, directory in KUSTOMIZATIONS.items():
        for workload in workloads(source_docs(directory)):
            for c in containers(workload):
                if c["image"] == APP_IMAGE:
                    yield f"k8s:{name}:{workload['metadata']['name']}", list(c["args"])
    compose = yaml.safe_load(COMPOSE_FILE.read_text())
    for name, svc in compose["services"].items():
        if svc.get("build"):
            yield f"compose:{name}", list(svc["command"])


_COMMANDS = list(app_commands())


@pytest.mark.parametrize(("where", "argv"), _COMMANDS, ids=[w for w, _ in _COMMANDS])
def test_commands_parse_with_the_cli(where: str, argv: list[str]) -> None:
    from dspex_tasks.cli import build_parser

    build_parser().parse_args(argv)


# --- docker-compose.yml -------------------------------------------------------------------

_DURATION = r"^([0-9]+(\.[0-9]+)?(us|ms|s|m|h))+$"
_STRINGS = {"type": "array", "items": {"type": "string"}}
_ENV = {
    "type": "object",
    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
}
_HEALTHCHECK = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "test": {"oneOf": [{"type": "string"}, _STRINGS]},
        "interval": {"type": "string", "pattern": _DURATION},
        "timeout": {"type": "string", "pattern": _DURATION},
        "start_period": {"type": "string", "pattern": _DURATION},
        "start_interval": {"type": "string", "pattern": _DURATION},
        "retries": {"type": "integer", "minimum": 0},
        "disable": {"type": "boolean"},
    },
}
_SERVICE = {
    "type": "object",
    "additionalProperties": False,
    "patternProperties": {"^x-": {}},
    "properties": {
        "image": {"type": "string"},
        "build": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "context": {"type": "string"},
                "dockerfile": {"type": "string"},
                "args": _ENV,
                "target": {"type": "string"},
            },
            "required": ["context"],
        },
        "command": {"oneOf": [{"type": "string"}, _STRINGS]},
        "entrypoint": {"oneOf": [{"type": "string"}, _STRINGS]},
        "environment": _ENV,
        "env_file": {"oneOf": [{"type": "string"}, _STRINGS]},
        "ports": _STRINGS,
        "expose": _STRINGS,
        "volumes": _STRINGS,
        "tmpfs": {"oneOf": [{"type": "string"}, _STRINGS]},
        "depends_on": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "condition": {
                        "enum": [
                            "service_started",
                            "service_healthy",
                            "service_completed_successfully",
                        ]
                    },
                    "restart": {"type": "boolean"},
                    "required": {"type": "boolean"},
                },
            },
        },
        "healthcheck": _HEALTHCHECK,
        "restart": {"enum": ["no", "always", "on-failure", "unless-stopped"]},
        "init": {"type": "boolean"},
        "read_only": {"type": "boolean"},
        "user": {"type": "string"},
        "stop_grace_period": {"type": "string", "pattern": _DURATION},
        "stop_signal": {"type": "string"},
        "deploy": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "resources": {"type": "object"},
                "restart_policy": {"type": "object"},
            },
        },
    },
}
COMPOSE_SCHEMA = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "additionalProperties": False,
    "patternProperties": {"^x-": {}},
    "properties": {
        "name": {"type": "string"},
        "services": {"type": "object", "additionalProperties": _SERVICE},
        "volumes": {
            "type": "object",
            "additionalProperties": {"type": ["object", "null"]},
        },
        "networks": {"type": "object"},
    },
    "required": ["services"],
}

_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\})")


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable substitution: ``$$``, ``${V}``, ``${V:-d}``, ``${V-d}``, ``${V:?e}``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match[str]) -> str:
        if m.group(1):
            return "$"
        name, op, arg = m.group(2), m.group(3), m.group(4) or ""
        current = env.get(name)
        if op == ":-":
            return current or arg
        if op == "-":
            return arg if current is None else current
        if op in {":?", "?"} and (current is None or (op == ":?" and not current)):
            raise ValueError(f"required variable {name}: {arg}")
        return current or ""

    return _VAR.sub(sub, value)


def seconds(duration: str) -> float:
    units = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"([0-9.]+)(us|ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration
    return sum(float(n) * units[u] for n, u in parts)


@pytest.fixture(scope="module")
def compose_raw() -> Doc:
    doc: Doc = yaml.safe_load(COMPOSE_FILE.read_text())
    return doc


@pytest.fixture(scope="module")
def compose(compose_raw: Doc) -> Doc:
    """Interpolated as Compose would with only the required secrets set (FLOWER_PASSWORD,
    API_TOKEN_DIGESTS; everything else default)."""
    doc: Doc = interpolate(compose_raw, {"FLOWER_PASSWORD": "s3cret", "API_TOKEN_DIGESTS": DIGEST})
    return doc


def test_compose_matches_schema(compose_raw: Doc) -> None:
    jsonschema.Draft202012Validator.check_schema(COMPOSE_SCHEMA)
    jsonschema.validate(compose_raw, COMPOSE_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):  # the schema is not vacuous
        jsonschema.validate({"services": {"w": {"stop_grace_period": "330"}}}, COMPOSE_SCHEMA)


def test_compose_services(compose: Doc) -> None:
    services = compose["services"]
    assert set(services) == {"redis", "worker", "beat", "flower", "api", "exporter"}
    for name, svc in services.items():
        if name != "redis":
            assert svc["build"] == {"context": ".", "dockerfile": "deploy/Dockerfile"}
            assert svc["image"] == services["worker"]["image"]  # built once, used five times
            assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
        assert "container_name" not in svc
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"


def test_compose_worker_is_scalable_and_drains(compose: Doc) -> None:
    worker = compose["services"]["worker"]
    assert "ports" not in worker and "container_name" not in worker and "hostname" not in worker
    assert "replicas" not in worker.get("deploy", {})
    env = worker["environment"]
    limits = Settings.from_env(
        {k: str(v) for k, v in env.items() if k.startswith("DSPEX_") and v is not None}
    )
    assert seconds(worker["stop_grace_period"]) > limits.task_time_limit_s
    assert seconds(worker["stop_grace_period"]) > Settings().task_soft_time_limit_s
    assert worker["healthcheck"]["test"][:4] == ["CMD", "python", "-m", "workers.liveness"]


def test_compose_beat_single_flower_authenticated(compose_raw: Doc, compose: Doc) -> None:
    services = compose["services"]
    assert services["beat"]["deploy"]["replicas"] == 1
    flower = services["flower"]
    assert flower["environment"]["DSPEX_FLOWER_PASSWORD"] == "s3cret"
    assert "DSPEX_FLOWER_ALLOW_NO_AUTH" not in flower["environment"]
    assert flower["ports"] == ["127.0.0.1:5555:5555"]
    # No default password: without FLOWER_PASSWORD, compose refuses to start.
    with pytest.raises(ValueError, match="FLOWER_PASSWORD"):
        interpolate(compose_raw, {"API_TOKEN_DIGESTS": DIGEST})
    assert services["exporter"]["ports"] == ["127.0.0.1:9808:9808"]


def test_compose_redis_and_urls_agree(compose: Doc) -> None:
    services = compose["services"]
    redis_svc = services["redis"]
    assert redis_svc["image"].startswith("redis:7")
    assert "ports" not in redis_svc
    command = redis_svc["command"]
    password = command[command.index("--requirepass") + 1]
    assert password  # dev default when REDIS_PASSWORD is unset
    conf_mount = next(v for v in redis_svc["volumes"] if v.startswith("./deploy/redis.conf:"))
    assert conf_mount.split(":")[1] in command
    data_volume = next(v.split(":")[0] for v in redis_svc["volumes"] if v.endswith(":/data"))
    assert data_volume in compose["volumes"]
    assert (
        "redis-cli" in redis_svc["healthcheck"]["test"][1]
        and "ping" in redis_svc["healthcheck"]["test"][1]
    )
    for name, svc in services.items():
        if name == "redis":
            continue
        url = urlsplit(svc["environment"]["DSPEX_REDIS_URL"])
        assert (url.hostname, url.port, url.password) == ("redis", 6379, password)


@pytest.mark.parametrize("tool", [("docker", "compose"), ("docker-compose",)])
def test_compose_config_with_docker_tooling(tool: tuple[str, ...], tmp_path: Path) -> None:
    if shutil.which(tool[0]) is None:
        pytest.skip(f"{tool[0]} not installed")
    probe = subprocess.run([*tool, "version"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or ["?"])[0]
        pytest.skip(f"{' '.join(tool)} not available: {reason}")
    done = subprocess.run(
        [*tool, "-f", str(COMPOSE_FILE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "FLOWER_PASSWORD": "x", "HOME": str(tmp_path)},
    )
    assert done.returncode == 0, done.stderr


# --- Dockerfile, .dockerignore, redis.conf ------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile() -> None:
    steps = dockerfile_instructions()
    args = dict(a.split("=", 1) for op, a in steps if op == "ARG" and "=" in a)
    froms = [
        rest.split()[0].replace("${PYTHON_IMAGE}", args.get("PYTHON_IMAGE", ""))
        for op, rest in steps
        if op == "FROM"
    ]
    assert len(froms) >= 2, "multi-stage: build wheels, then install"
    assert all(f.startswith("python:3.11-slim") for f in froms)
    ops = [op for op, _ in steps]
    final = len(ops) - ops[::-1].index("FROM")  # instructions of the last stage
    last = steps[final:]
    user = [rest for op, rest in last if op == "USER"]
    assert user and user[-1].split(":")[0] not in {"0", "root"}
    assert user[-1].split(":")[0].isdigit(), "numeric USER, so runAsNonRoot can verify it"
    env = " ".join(rest for op, rest in last if op == "ENV")
    for setting in (
        "LITELLM_LOCAL_MODEL_COST_MAP=True",
        "LITELLM_OFFLINE_MODE=true",
        "PYTHONUNBUFFERED=1",
    ):
        assert setting in env
    assert ("ENTRYPOINT", '["dspex-tasks"]') in last
    assert ("CMD", '["worker"]') in last
    health = [rest for op, rest in last if op == "HEALTHCHECK"]
    assert health and "workers.liveness" in health[0]
    installs = " ".join(rest for op, rest in steps if op == "RUN")
    extras = set(re.findall(r"\[([a-z,-]+)\]", installs)[0].split(","))
    assert extras == {"worker", "flower", "metrics", "api"}
    assert extras <= pyproject_extras()
    copied = {rest.split()[0] for op, rest in steps if op == "COPY"}
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert ignore[[line.startswith("#") for line in ignore].index(False)] == "*", "allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert copied <= allowed


def pyproject_extras() -> set[str]:
    """Names in ``[project.optional-dependencies]`` (no tomllib: Python 3.10 is supported)."""
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    return set(re.findall(r"^([A-Za-z0-9_-]+)\s*=", section, re.MULTILINE))


def redis_conf(text: str) -> dict[str, str]:
    conf = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition(" ")
            conf[key.lower()] = value.strip()
    return conf


def test_redis_conf() -> None:
    text = (DEPLOY / "redis.conf").read_text()
    assert (K8S / "base" / "redis.conf").read_text() == text, "k8s copy drifted"
    conf = redis_conf(text)
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] == "everysec"
    assert conf["maxmemory-policy"] == "noeviction"
    assert "requirepass" not in conf, "the password comes from the command line"
    # The reason is written next to the setting.
    assert re.search(r"#.*noeviction.*\n(#.*\n)*.*evict", text, re.IGNORECASE)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")
def test_redis_conf_runs_with_aof_and_a_password(tmp_path: Path) -> None:
    """The real server accepts the file (``dir`` pointed at a temp dir) plus the
    command-line password, as compose and the StatefulSet start it."""
    conf = tmp_path / "redis.conf"
    conf.write_text((DEPLOY / "redis.conf").read_text().replace("dir /data", f"dir {tmp_path}"))
    port = free_port()
    proc = subprocess.Popen(
        [
            "redis-server",
            str(conf),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--requirepass",
            "pw",
            "--daemonize",
            "no",
            "--logfile",
            str(tmp_path / "log"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    client = redis.Redis(port=port, password="pw", socket_timeout=2)
    try:
        for _ in range(100):
            assert proc.poll() is None, (proc.stdout.read() if proc.stdout else "") + (
                tmp_path / "log"
            ).read_text(errors="replace")
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.05)
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong").ping()
        assert (tmp_path / "appendonlydir").is_dir()
    finally:
        client.close()
        proc.terminate()
        proc.wait(timeout=10)
        if proc.stdout:
            proc.stdout.close()


# --- the HTTP API --------------------------------------------------------------------------


def test_k8s_api_needs_tokens_and_is_ready_on_healthz(build: tuple[str, list[Doc]]) -> None:
    _, docs = build
    deployment = find(docs, "Deployment", "dspex-api")
    (api,) = containers(deployment)
    args = build_parser_args(api["args"])
    assert args.command == "api" and args.address == "0.0.0.0"
    ref = env_of(api)["DSPEX_API_TOKENS"]["valueFrom"]["secretKeyRef"]
    assert ref["key"] in find(docs, "Secret", ref["name"])["stringData"]
    (port,) = api["ports"]
    assert api["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": port["name"]}
    assert "httpGet" not in api["livenessProbe"], "a Redis outage must not restart the API"
    svc = find(docs, "Service", "dspex-api")
    assert svc["spec"]["ports"][0]["targetPort"] == port["name"]
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_compose_api_needs_token_digests(compose_raw: Doc, compose: Doc) -> None:
    api = compose["services"]["api"]
    assert api["environment"]["DSPEX_API_TOKENS"] == DIGEST
    assert build_parser_args(api["command"]).address == "0.0.0.0"
    assert api["ports"] == ["127.0.0.1:8000:8000"]
    assert "/healthz" in api["healthcheck"]["test"][-1]
    with pytest.raises(ValueError, match="API_TOKEN_DIGESTS"):
        interpolate(compose_raw, {"FLOWER_PASSWORD": "x"})
    # The API refuses a non-loopback bind without digests: these settings start it.
    settings = Settings.from_env({"DSPEX_API_TOKENS": api["environment"]["DSPEX_API_TOKENS"]})
    check_bind("0.0.0.0", settings)


def build_parser_args(argv: list[str]) -> Any:
    from dspex_tasks.cli import build_parser

    return build_parser().parse_args(argv)
