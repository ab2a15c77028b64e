"""The render stage: work items through Ray Data, over one actor per device, to result rows.

Ray Data streams the planning stage's blocks to the pool with backpressure, restarts a
worker that dies and retries its batch; the run's JobControl actor (control.py) carries
drain requests, planning counts and per-row death counts between driver, planning and workers.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from svd_batch.schema import JobSpec


class Stalled(RuntimeError):
    """No worker made progress for `workers.no_progress_timeout_s`; the message says what to check."""


def start_control(run_id: str, draining: bool) -> Any:
    """The run's JobControl actor, on the driver's own node: one elsewhere would die with its node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from svd_batch.control import JobControl

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(num_cpus=0)(JobControl)
    # Drained from its constructor: a later drain call from here could reach it after a plan
    # task's first question (calls from different callers are not ordered), starting the
    # workers of a run stopped before it began.
    return actor.options(name=JobControl.name(run_id), scheduling_strategy=here).remote(draining=draining)


def configure_ray_data(spec: JobSpec) -> None:
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.print_on_execution_start = False
    context.execution_no_progress_timeout_s = spec.workers.no_progress_timeout_s
    # A worker whose node dies mid-batch fails its task with ActorUnavailableError: retry it on
    # the restarted worker. A batch that still fails is skipped, not fatal: its rows are
    # accounted as failed by the driver and the other rows go on.
    context.actor_task_retry_on_errors = [ray.exceptions.ActorUnavailableError]
    context.max_errored_blocks = -1


def worker_resources(spec: JobSpec) -> tuple[dict[str, float], float]:
    """What each worker asks Ray for: (custom resources, CPUs). A simulated device is a custom
    resource of its own and reserves no CPU: its CPU work still runs, so where the cores run
    short it shows as lost throughput, which is what a simulation is there to measure."""
    from svd_batch.engine import simulated

    workers = spec.workers
    if spec.simulate is not None:
        return {**workers.resources, simulated.RESOURCE: 1}, 0.0
    return {**workers.resources, **({"NPU": 1} if workers.device == "npu" else {})}, workers.cpus_per_worker


def render(spec: JobSpec, run_id: str, planned: Any, worker_memory: int) -> Iterator[pa.Table]:
    """Result rows of the planned dataset, a batch at a time, as workers return them; raises Stalled."""
    import ray
    from ray.data.exceptions import ExecutionTimeoutError

    from svd_batch.worker import worker_class

    workers = spec.workers
    resources, cpus = worker_resources(spec)
    ds = planned.map_batches(
        worker_class(spec.model_dump_json(), run_id),
        batch_size=workers.batch_size,
        batch_format="pyarrow",
        # Each worker runs `calls` calls at once, one on its device while another is written
        # (worker.py); Ray Data then keeps 2 x calls batches in flight per worker.
        compute=ray.data.ActorPoolStrategy(
            size=workers.count, max_concurrent_calls_per_actor=workers.calls, enable_true_multi_threading=True
        ),
        num_cpus=cpus,
        # What the loaded model holds: Ray places no worker where it would not fit.
        memory=worker_memory,
        resources=resources or None,
        # Ray Data restarts a worker that dies and retries its batch on it (a restart reloads
        # the model), without bound: the bound is per row, kept by the run's JobControl, so a
        # row that kills its worker every time fails alone after workers.max_attempts.
    )
    try:
        # No prefetch: Ray Data's prefetcher waits for the next block before it hands on the
        # current one, so each batch of results would reach the ledger a batch late.
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0)
    except ExecutionTimeoutError:
        wanted = {"CPU": cpus, **resources}
        raise Stalled(
            f"no worker made progress for {workers.no_progress_timeout_s:.0f} s; check that the cluster "
            f"has {workers.count} x {wanted} free (`ray status`)"
        ) from None
