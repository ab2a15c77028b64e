"""The documentation a user reads: the README stays short and its first job valid; the docs
site builds in strict mode (a broken link, anchor or picture, or a page out of the nav, fails)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import cli, make_image

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def test_the_docs_site_builds_in_strict_mode(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pages = {p.relative_to(tmp_path / "site").as_posix() for p in (tmp_path / "site").rglob("index.html")}
    assert {"index.html", "jobs/index.html", "ledger/index.html", "benchmark/index.html"} <= pages
    # The report's pictures are taken by docs/screenshots.py, and the pipeline's diagram is drawn.
    assert (tmp_path / "site" / "img" / "report-hour.jpg").is_file()
    assert 'class="mermaid"' in (tmp_path / "site" / "architecture" / "index.html").read_text()


def test_the_readme_is_short_and_every_link_in_it_is_a_file() -> None:
    assert len(README.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    assert links and all((ROOT / link).is_file() for link in links), links


def test_the_readmes_first_job_is_valid(tmp_path: Path, tiny_model: Path) -> None:
    """The spec and manifest the README shows, with three images where it says, pass `validate`."""
    spec = re.search(r"```yaml\n# my-job/job.yaml\n(.*?)```", README, re.S)
    manifest = re.search(r"```json\n(.*?)```", README, re.S)
    assert spec and manifest
    job = tmp_path / "my-job"
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "tiny-svd").symlink_to(tiny_model)  # where `make demo` builds it, beside the job
    job.mkdir()
    (job / "job.yaml").write_text(spec.group(1))
    (job / "manifest.jsonl").write_text(manifest.group(1))
    for n, name in enumerate(("cat.jpg", "dog.png", "sea.webp")):
        make_image(job / name, seed=n)
    done = cli("validate", str(job / "job.yaml"))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "spec and manifest are valid" in done.stdout
