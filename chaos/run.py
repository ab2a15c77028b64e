"""`make chaos` (`python -m chaos.run --seed N`): one night of faults per seed, then the check.

The job runs on a fresh world (S3 behind the fault proxy, a 3-node Ray cluster, simulated
devices, shards and gates on). The seed's faults fire as the ledger reaches their moments; a
driver that ends while videos are left, is killed, or cannot start (a warm lease) is started
again, as a scheduler would. Once every video is done and the last driver has ended, the
checker reads storage. The figures, the schedule and what each fault did go to
chaos/results/<seed>.json; a violation exits 1 and names the seed that replays it.
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

import svd_batch  # noqa: F401  (protobuf implementation, before ray)
from chaos.check import check
from chaos.faults import KINDS
from chaos.schedule import Fault, draw
from chaos.world import World, wait_until

RESULTS = Path(__file__).parent / "results"
LOOK_EVERY_S = 0.5


def night(seed: int, rows: int, faults: int, limit_s: float, results: Path = RESULTS) -> dict[str, Any]:
    schedule = draw(seed, faults)
    print(f"seed {seed}: {rows} rows, {len(schedule)} faults", flush=True)
    for fault in schedule:
        print(f"  at {fault.at:5.1%} {fault.kind}", flush=True)
    world = World(Path(tempfile.mkdtemp(prefix=f"chaos-{seed}-")), rows)
    started = time.monotonic()
    log: list[dict[str, Any]] = []
    unfinished: str | None = None
    skipped: list[str] = []
    try:
        world.start()
        ready = time.monotonic()
        world.driver = world.start_driver()
        pending = list(schedule)
        while True:
            done = world.done()
            if time.monotonic() - ready > limit_s:
                unfinished = f"not done after {limit_s:.0f} s: {done} of {rows} videos, {len(pending)} faults to go"
                break
            while pending and pending[0].at * rows <= done:
                if _fire(world, pending[0], done, started, log) is None:
                    break  # nothing to harm yet: try at the next look
                pending.pop(0)
            driver = world.driver
            if driver is not None and driver.poll() is not None:
                if done >= rows:
                    # The job ended before these faults found anything to harm at their moment:
                    # each gets one try on what is left, and is skipped if there is nothing.
                    for fault in pending:
                        if _fire(world, fault, done, started, log) is None:
                            skipped.append(fault.kind)
                    pending = []
                    if world.done() >= rows:  # a part a late fault broke leaves videos to make again
                        break
                world.driver = world.start_driver()  # as a scheduler reruns a night
            time.sleep(LOOK_EVERY_S)
        wall_s = time.monotonic() - ready
        wait_until(world.settled, "the faults to end")  # a worker still stopped, S3 still down
        verdict = check(world)
        if unfinished:
            verdict.fail(unfinished)
    finally:
        world.close()
    fired = Counter(entry["kind"] for entry in log)
    result = {
        "seed": seed,
        "rows": rows,
        "passed": not verdict.violations,
        "violations": verdict.violations,
        **verdict.figures,
        "faults": len(log),
        "faults_by_kind": dict(sorted(fired.items())),
        "skipped": skipped,  # left when the job ended, with nothing to harm
        "driver_starts": len(world.drivers) - fired.get("second_run", 0),
        "wall_s": round(wall_s, 1),
        "set_up_s": round(ready - started, 1),
        "schedule": [f.as_dict() for f in schedule],
        "log": log,
        "replay": f"make chaos SEED={seed}",
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / f"{seed}.json").write_text(json.dumps(result, indent=2) + "\n")
    if verdict.violations:  # what storage held, to find the interleaving without replaying it
        assert verdict.ledger is not None
        pq.write_table(verdict.ledger, results / f"{seed}-ledger.parquet")
        (results / f"{seed}-shards.json").write_text(json.dumps(verdict.shards, indent=1) + "\n")
    return result


def _fire(world: World, fault: Fault, done: int, started: float, log: list[dict[str, Any]]) -> str | None:
    said = KINDS[fault.kind](world, fault.rng())
    if said is not None:
        log.append({"kind": fault.kind, "at": fault.at, "done": done, "t_s": round(time.monotonic() - started, 1),
                    "did": said})  # fmt: skip
        print(f"  {time.monotonic() - started:6.1f} s, {done} done: {said}", flush=True)
    return said


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m chaos.run", description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, help="one night, this seed's (a replay, when it ran before)")
    parser.add_argument("--seeds", type=int, default=5, help="without --seed: this many nights, seeds 1 to N")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--limit", type=float, default=900, help="seconds a night may take before it fails")
    parser.add_argument("--results", type=Path, default=RESULTS, help="where <seed>.json goes")
    args = parser.parse_args(argv)
    if args.seed is None:  # each night in a process of its own: its own cluster, S3 server and clients
        sizes = ["--rows", str(args.rows), "--faults", str(args.faults), "--limit", str(args.limit)]
        sizes += ["--results", str(args.results)]
        failed = [
            seed
            for seed in range(1, args.seeds + 1)
            if subprocess.run([sys.executable, "-m", "chaos.run", "--seed", str(seed), *sizes]).returncode != 0
        ]
        print(f"{args.seeds - len(failed)} of {args.seeds} nights passed" + (f"; failed: {failed}" if failed else ""))
        return 1 if failed else 0
    logging.getLogger("svd_batch").setLevel(logging.ERROR)  # the checker names what it finds itself
    result = night(args.seed, args.rows, args.faults, args.limit, args.results)
    shown = ("videos", "ok", "rejected", "lost", "duplicated", "orphans", "rendered_again")
    print(f"seed {args.seed}: {'passed' if result['passed'] else 'FAILED'} in {result['wall_s']} s, "
          f"{result['faults']} faults {result['faults_by_kind']}, {result['driver_starts']} driver starts, "
          f"{ {k: result[k] for k in shown} }", flush=True)  # fmt: skip
    for line in result["violations"]:
        print(f"  violation: {line}  (replay: make chaos SEED={args.seed})", flush=True)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
