"""The benchmarks import, and the study builds a valid job config for every arm: bench/ is not run
in CI (hours), so this is what catches an API change that leaves a benchmark behind."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPTS = sorted(p.stem for p in BENCH.glob("*.py"))


def load(name: str):
    sys.path.insert(0, str(BENCH))  # bench scripts import each other as siblings (train -> study)
    try:
        spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


@pytest.mark.parametrize("name", SCRIPTS)
def test_benchmark_imports(name):
    assert callable(load(name).main)


def test_study_builds_every_job_config(tmp_path):
    from blt_data.registry import Manifest

    study = load("study")
    for cfg in (study.StudyConfig(), study.QUICK):
        shuffled = Manifest(name=f"{cfg.prefix}-shuffled", version=1, kind="documents", job_id="j")
        for arm in cfg.arms:
            job = study.patch_config(cfg, shuffled, arm, "m@v1" if arm == "entropy" else None)
            assert job.rule.scheme == arm and job.docs == shuffled.ref
        data = Manifest(name="p", version=1, kind="patches", job_id="j")
        run = study.train_config(cfg, data, "static", 0, 500, tmp_path, False)
        assert run.steps == 500 and run.data.dataset == data.ref
