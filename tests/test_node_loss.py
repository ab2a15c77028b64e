"""A node removed from a multi-node cluster mid-job: the job still ends with every row ok.

`ray.cluster_utils.Cluster` starts real raylets on this machine; it needs a driver of its
own, so the scenario runs in a subprocess beside the session's shared cluster.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.helpers import FAST, make_image, results, write_job


def hosts_a_worker(node) -> bool:  # type: ignore[no-untyped-def]
    import psutil

    raylet = psutil.Process(node.all_processes["raylet"][0].process.pid)
    return any("RayWorker" in " ".join(p.cmdline()) for p in raylet.children(recursive=True))


def scenario(spec_path: str) -> None:
    import pyarrow as pa
    import ray
    from ray.cluster_utils import Cluster

    from svd_batch import WORKER_ENV
    from svd_batch.driver import Job, load_spec

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    # Three worker nodes, one render slot each: two run workers, one is spare capacity.
    nodes = [cluster.add_node(num_cpus=1, resources={"svd_slot": 1}) for _ in range(3)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, runtime_env={"env_vars": WORKER_ENV}, log_to_driver=False)
    removed: list[str] = []
    made_on: list[str] = []  # the node ids (12 characters) of committed rows, in order

    def watched(commit: Callable[[pa.Table | list], None]) -> Callable[[pa.Table | list], None]:  # type: ignore[type-arg]
        def committing(rows: pa.Table | list) -> None:  # type: ignore[type-arg]
            commit(rows)
            if isinstance(rows, pa.Table):  # a batch the workers returned
                made_on.extend(node.rsplit("/", 1)[-1] for node in rows.column("node").to_pylist() if node)

        return committing

    def progress(counts: Counter[str], total: int) -> None:
        # The node whose worker made the first video: its rows must stay, the rest be made elsewhere.
        if removed or not made_on:
            return
        victim = next(node for node in nodes if node.node_id.startswith(made_on[0]))
        if hosts_a_worker(victim):
            cluster.remove_node(victim, allow_graceful=False)
            removed.append(victim.node_id)

    job = Job(load_spec(Path(spec_path)), progress=progress)
    job.tally.commit = watched(job.tally.commit)  # type: ignore[method-assign]
    counts = job.run()
    print(json.dumps({"counts": counts, "removed": removed}))
    ray.shutdown()
    cluster.shutdown()


@pytest.mark.slow
def test_node_removed_mid_job_every_row_ok(tmp_path: Path, tiny_model: Path) -> None:
    """`make test` covers a worker lost mid-job in
    test_devices.py::test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows;
    losing a whole node (and the actors Ray placed on it) needs a cluster of its own."""
    for i in range(8):
        make_image(tmp_path / "img" / f"{i}.png", seed=i)
    rows = [{"id": f"n{i}", "image": f"img/{i}.png"} for i in range(8)]
    workers = {"count": 2, "batch_size": 1, "resources": {"svd_slot": 1}, "cpus_per_worker": 0.5}
    spec = write_job(tmp_path, rows, tiny_model, workers=workers, defaults={**FAST, "num_inference_steps": 3})
    code = f"from tests.test_node_loss import scenario; scenario({str(spec)!r})"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    outcome = json.loads(next(line for line in done.stdout.splitlines() if line.startswith('{"counts"')))
    assert len(outcome["removed"]) == 1  # the node that made the first video was removed mid-job
    assert outcome["counts"] == {"ok": 8}, results(spec).error.dropna().tolist()
    df = results(spec)
    assert sorted(df[df.status == "ok"].id) == [f"n{i}" for i in range(8)]  # each row exactly once
    # The removed node's videos are kept, not made again; the others were made on other nodes.
    assert outcome["removed"][0][:12] in {node.rsplit("/", 1)[-1] for node in df.node}
    assert df.node.nunique() >= 2
