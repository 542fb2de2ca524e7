"""The benchmarks import, and the study builds a valid job config for every arm: bench/ is not run
in CI (hours), so this is what catches an API change that leaves a benchmark behind."""

from __future__ import annotations

import importlib.util
import json
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
            assert job.rule.scheme == arm.rstrip("0123456789") and job.docs == shuffled.ref
        assert study.patch_config(cfg, shuffled, "static8", None).rule.patch_size == 8
        assert study.patch_config(cfg, shuffled, "static", None).rule.patch_size == cfg.static_patch_size
        data = Manifest(name="p", version=1, kind="patches", job_id="j")
        run = study.train_config(cfg, data, "static", 0, 500, tmp_path, False)
        assert run.steps == 500 and run.data.dataset == data.ref
    with pytest.raises(ValueError, match="arms"):
        study.StudyConfig(arms=["static0"])


def test_study_summary_pairs_each_arm_with_static_by_seed(tmp_path):
    study = load("study")
    runs = [{"arm": arm, "seed": seed, "data": f"{arm}@v1", "val_bpb": bpb, "seconds": 60.0, "mean_patch": 4.0,
             "dataset_mean_patch_length": 4.0, "flops_per_byte": 3e6, "train_bytes": 10}
            for arm, seed, bpb in [("entropy", 0, 1.80), ("static", 0, 1.85), ("entropy", 1, 1.90),
                                   ("static", 1, 1.91), ("space", 0, 1.70)]]
    arms = {r["arm"]: r for r in study.summarise(runs, ["entropy", "static", "space"])}
    assert arms["entropy"]["val_bpb_mean"] == pytest.approx(1.85)
    assert arms["entropy"]["minus_static_mean"] == pytest.approx((-0.05 - 0.01) / 2)
    assert arms["space"]["minus_static_std"] is None and arms["space"]["minus_static_mean"] == pytest.approx(-0.15)
    assert "minus_static_mean" not in arms["static"]
    out = tmp_path / "study.json"
    out.write_text(json.dumps({"arms": list(arms.values()), "runs": runs}))
    study.main(["--markdown", "--out", str(out)])  # prints; a missing field would raise
    with pytest.raises(SystemExit, match="no finished study"):
        study.main(["--markdown", "--out", str(tmp_path / "missing.json")])
