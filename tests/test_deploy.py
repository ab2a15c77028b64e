"""Every YAML in cluster/ and jobs/ parses, and says what the code relies on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from svd_batch.driver import load_spec, validate
from svd_batch.limits import next_deadline

ROOT = Path(__file__).resolve().parents[1]


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


@pytest.mark.parametrize("path", sorted(ROOT.glob("jobs/*/job.yaml")), ids=lambda p: p.parent.name)
def test_every_job_spec_is_valid(path: Path) -> None:
    spec = load_spec(path)
    if "://" not in spec.manifest:
        assert list(validate(spec)) == []


def containers(document: dict) -> list[dict]:
    found = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            found.extend(node.get("containers", []))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(document)
    return found


KUBE = [d for p in ROOT.glob("cluster/kuberay/*.yaml") for d in documents(p) if d.get("kind") != "Secret"]


@pytest.mark.parametrize("doc", KUBE, ids=lambda d: d["kind"])
def test_images_are_pinned_and_credentials_come_from_a_secret(doc: dict) -> None:
    for container in containers(doc):
        image = container["image"]
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), image
        assert {"secretRef": {"name": "svd-batch-s3"}} in container["envFrom"]
        assert not any("SECRET" in str(e.get("name", "")) for e in container.get("env", []))


API_VERSIONS = {"RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "CronJob": "batch/v1", "Secret": "v1"}
ALL_KUBE = [d for p in sorted(ROOT.glob("cluster/kuberay/*.yaml")) for d in documents(p)]


def test_kubernetes_documents_are_the_kinds_kuberay_takes_and_match_the_ray_we_pin() -> None:
    import ray

    assert sorted(d["kind"] for d in ALL_KUBE) == ["CronJob", "RayCluster", "RayJob", "Secret"]
    for doc in ALL_KUBE:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]] and doc["metadata"]["name"], doc["kind"]
    for doc in (d for d in ALL_KUBE if d["kind"] in ("RayCluster", "RayJob")):
        spec = doc["spec"].get("rayClusterSpec", doc["spec"])
        assert spec["rayVersion"] == ray.__version__  # the cluster runs the Ray the workers are built for
        assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # the head renders nothing


def test_the_cronjob_reaches_the_clusters_jobs_api_with_the_credentials_storage_reads() -> None:
    (cluster,) = [d for d in ALL_KUBE if d["kind"] == "RayCluster"]
    (cron,) = [d for d in ALL_KUBE if d["kind"] == "CronJob"]
    (secret,) = [d for d in ALL_KUBE if d["kind"] == "Secret"]
    command = containers(cron)[0]["command"]
    # KubeRay names the head's service <cluster>-head-svc; the Jobs API is the dashboard port.
    assert command[command.index("--address") + 1] == f"http://{cluster['metadata']['name']}-head-svc:8265"
    (head,) = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert {"containerPort": 8265, "name": "dashboard"} in head["ports"]
    assert {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret["stringData"])
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"  # one night's run at a time


def worker_groups(doc: dict) -> list[dict]:
    spec = doc["spec"].get("rayClusterSpec", doc["spec"])
    return spec["workerGroupSpecs"]


@pytest.mark.parametrize("doc", [d for d in KUBE if d["kind"] in ("RayCluster", "RayJob")], ids=lambda d: d["kind"])
def test_workers_ask_for_ascend_npus_as_ray_npu_resources(doc: dict) -> None:
    for group in worker_groups(doc):
        npus = json.loads(json.loads(group["rayStartParams"]["resources"]))["NPU"]
        (container,) = group["template"]["spec"]["containers"]
        assert int(container["resources"]["limits"]["huawei.com/Ascend910"]) == npus


def test_rayjob_runs_a_job_spec_that_exists() -> None:
    (doc,) = [d for d in KUBE if d["kind"] == "RayJob"]
    command, verb, spec = doc["spec"]["entrypoint"].split()
    assert (command, verb) == ("svd-batch", "run")
    assert (ROOT / spec.removeprefix("/app/")).is_file()


def test_cronjob_submits_the_overnight_job_with_a_deadline() -> None:
    from typer.main import get_command

    from svd_batch.cli import app

    (doc,) = [d for d in KUBE if d["kind"] == "CronJob"]
    (container,) = containers(doc)
    command = container["command"]
    assert command[:2] == ["svd-batch", "submit"]
    assert (ROOT / command[2].removeprefix("/app/")).is_file()
    submit = get_command(app).commands["submit"]
    options = {opt for param in submit.params for opt in param.opts}
    assert {o for o in command if o.startswith("--")} <= options
    # The driver runs on the cluster, in its nodes' zone: the deadline names the operator's.
    deadline = command[command.index("--deadline") + 1]
    assert deadline.endswith("@" + doc["spec"]["timeZone"]) and next_deadline(deadline)
    assert load_spec(ROOT / "jobs/overnight/job.yaml").workers.device == "npu"


def test_cluster_launcher_declares_npus() -> None:
    (doc,) = documents(ROOT / "cluster/ray-cluster.yaml")
    worker = doc["available_node_types"]["ascend-910"]
    assert worker["resources"]["NPU"] == 8
    assert any('"NPU": 8' in c for c in doc["worker_start_ray_commands"])
    assert ":" in doc["docker"]["image"].rsplit("/", 1)[-1]
