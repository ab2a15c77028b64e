"""One function per kind of fault. Each takes the world and a random source of its own (so a
replay makes the same choices), does its harm, and says in a line what it did, or returns None
when the world offers nothing to harm yet (no worker up, no part written): the run tries it
again at its next look. Adding a kind is adding a function to KINDS."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from chaos.world import World
from svd_batch.metadata import part_keys
from svd_batch.storage import open_storage


def kill_worker(world: World, rng: random.Random) -> str | None:
    """SIGKILL a worker wherever it is: rendering, writing, uploading."""
    workers = world.workers()
    if not workers:
        return None
    victim = rng.choice(sorted(workers, key=lambda p: p.pid))
    with contextlib.suppress(ProcessLookupError):
        os.kill(victim.pid, signal.SIGKILL)
    return f"killed worker pid {victim.pid}"


def kill_worker_with_open_shard(world: World, rng: random.Random) -> str | None:
    """SIGKILL a worker whose shard holds samples not yet committed."""
    holding = set()
    for tar in Path(tempfile.gettempdir()).glob("svd-batch-shard-*/*.tar"):
        pid = tar.parent.name.removeprefix("svd-batch-shard-").split("-", 1)[0]
        if pid.isdigit() and tar.stat().st_size > 0:
            holding.add(int(pid))
    pids = sorted(holding & {p.pid for p in world.workers()})
    if not pids:
        return None
    pid = rng.choice(pids)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    return f"killed worker pid {pid} holding an open shard"


def stall_worker(world: World, rng: random.Random) -> str | None:
    """SIGSTOP a worker; a few seconds later SIGCONT it, or SIGKILL it."""
    workers = world.workers()
    if not workers:
        return None
    pid = rng.choice(sorted(p.pid for p in workers))
    seconds, then = rng.uniform(2, 8), rng.choice([signal.SIGCONT, signal.SIGKILL])
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    world.stopped.append(pid)

    def resume() -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, then)
            if then == signal.SIGKILL:
                os.kill(pid, signal.SIGCONT)  # a stopped process dies only once resumed
        world.stopped.remove(pid)

    world.later(seconds, resume)
    return f"stopped worker pid {pid} for {seconds:.1f} s, then {then.name}"


def kill_node(world: World, rng: random.Random) -> str | None:
    """SIGKILL a worker node's raylet and everything on it; a fresh node joins after."""
    nodes = world.worker_nodes()
    if not nodes:
        return None
    node = rng.choice(nodes)
    world.cluster.remove_node(node, allow_graceful=False)  # type: ignore[attr-defined]
    world.add_node()
    return "killed a worker node (raylet and its workers); a new node joined"


def kill_driver(world: World, rng: random.Random) -> str | None:
    """SIGKILL the driver; the same command starts again at once, its old lease still warm."""
    driver = world.driver
    if driver is None or driver.poll() is not None:
        return None
    driver.kill()
    driver.communicate()
    world.driver = world.start_driver()
    return f"killed the driver pid {driver.pid} and started it again"


def kill_driver_mid_commit(world: World, rng: random.Random) -> str | None:
    """SIGKILL the driver while its upload of a metadata part hangs, then start it again."""
    driver, proxy = world.driver, world.proxy
    if driver is None or driver.poll() is not None or proxy is None:
        return None
    proxy.held.clear()
    proxy.release.clear()
    proxy.hold_puts = ".parquet"
    deadline = time.monotonic() + 60
    while not proxy.held and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    held = list(proxy.held)
    if driver.poll() is None:
        driver.kill()
        driver.communicate()
    proxy.hold_puts = ""
    proxy.release.set()
    world.driver = world.start_driver()
    where = f"mid-upload of {held[0].rsplit('/', 1)[-1]}" if held else "(no commit came within 60 s)"
    return f"killed the driver pid {driver.pid} {where} and started it again"


def second_run(world: World, rng: random.Random) -> str | None:
    """Start a second run of the same output while one runs: it must leave it alone."""
    driver = world.driver
    if driver is None or driver.poll() is not None:
        return None
    second = world.start_driver(capture=True)
    _, err = second.communicate(timeout=600)
    said = next((line for line in err.splitlines() if line.startswith("error:")), "")
    return f"a second run started beside pid {driver.pid}: exit {second.returncode} {said[:160]}"


def _proxy_for(world: World, rng: random.Random, knob: str, value: object, what: str) -> str:
    """Set a proxy knob for a few seconds. The run looks on meanwhile, so the next fault may land
    inside this one (a node lost while S3 throttles); a later burst of the same knob wins."""
    seconds = rng.uniform(2, 6)
    setattr(world.proxy, knob, value)

    def end() -> None:
        if getattr(world.proxy, knob) == value:
            setattr(world.proxy, knob, 0)

    world.later(seconds, end)
    return f"{what} for {seconds:.1f} s"


def s3_throttle(world: World, rng: random.Random) -> str | None:
    every = rng.choice([2, 3, 4])
    return _proxy_for(world, rng, "slowdown_every", every, f"S3 answered 503 SlowDown to 1 request in {every}")


def s3_errors(world: World, rng: random.Random) -> str | None:
    every = rng.choice([2, 3, 5])
    return _proxy_for(world, rng, "error_every", every, f"S3 answered 500 InternalError to 1 request in {every}")


def s3_slow(world: World, rng: random.Random) -> str | None:
    delay = round(rng.uniform(0.5, 2.0), 1)
    return _proxy_for(world, rng, "delay_s", delay, f"S3 answered {delay} s late")


def s3_outage(world: World, rng: random.Random) -> str | None:
    proxy = world.proxy
    if proxy is None or not proxy.up:
        return None  # down already: this outage starts once it is back
    seconds = rng.uniform(3, 10)
    proxy.stop()
    world.later(seconds, proxy.start)
    return f"S3 down (connections refused) for {seconds:.1f} s"


def junk_part(world: World, rng: random.Random) -> str | None:
    """A part file that is not Parquet at all, as a foreign tool or a broken copy leaves."""
    meta = open_storage(world.spec.metadata_uri)
    name = f"part-junk{rng.randrange(10**6):06d}-00000.parquet"
    meta.put_bytes(rng.randbytes(rng.randrange(1, 2000)), name)
    world.broken.add(name)
    return f"wrote junk metadata part {name}"


def truncated_part(world: World, rng: random.Random) -> str | None:
    """A committed part cut short: its rows are lost to the ledger and must be made again."""
    meta = open_storage(world.spec.metadata_uri)
    parts = sorted(k for k in part_keys(meta) if "junk" not in k)
    if not parts:
        return None
    key = rng.choice(parts)
    data = meta.get_bytes(key)
    meta.put_bytes(data[: rng.randrange(1, max(len(data) // 2, 2))], key)
    world.broken.add(key.rsplit("/", 1)[-1])
    return f"truncated metadata part {key.rsplit('/', 1)[-1]} ({len(data)} bytes)"


KINDS: dict[str, Callable[[World, random.Random], str | None]] = {
    f.__name__: f
    for f in (
        kill_worker,
        kill_worker_with_open_shard,
        stall_worker,
        kill_node,
        kill_driver,
        kill_driver_mid_commit,
        second_run,
        s3_throttle,
        s3_errors,
        s3_slow,
        s3_outage,
        junk_part,
        truncated_part,
    )
}
