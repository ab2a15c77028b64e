"""A short night of faults (chaos/): every kind, at moments of the job's progress, then the
invariants from storage alone."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from chaos.faults import KINDS
from chaos.schedule import draw


def test_a_seed_draws_every_kind_at_moments_of_progress_and_replays_the_same() -> None:
    faults = draw(7, 24)
    assert {f.kind for f in faults} == set(KINDS) and len(faults) == 24
    assert all(0 < f.at < 1 for f in faults) and [f.at for f in faults] == sorted(f.at for f in faults)
    assert draw(7, 24) == faults and draw(8, 24) != faults
    assert faults[0].rng().random() == faults[0].rng().random()  # a fault's own choices replay too


@pytest.mark.slow
def test_a_short_night_of_faults_loses_nothing_and_makes_nothing_twice(tmp_path: Path) -> None:
    """`make test` covers exactly-once through a worker kill and a driver kill in
    test_job.py::test_driver_killed_mid_job_is_resumed_by_rerunning and
    test_devices.py::test_a_worker_killed_with_a_batch_written_and_one_rendering_loses_just_those_rows;
    this one throws every kind of fault at one job."""
    night = [sys.executable, "-m", "chaos.run", "--seed", "7", "--rows", "100", "--faults", str(len(KINDS))]
    done = subprocess.run([*night, "--results", str(tmp_path)], capture_output=True, text=True, timeout=1200)
    result = json.loads((tmp_path / "7.json").read_text())
    assert done.returncode == 0 and result["passed"], result["violations"]
    assert result["lost"] == result["duplicated"] == result["orphans"] == 0
    assert result["ok"] + result["rejected"] == result["videos"] == 100
    assert result["faults"] + len(result["skipped"]) == len(KINDS)  # a kind left when the job ended is skipped
