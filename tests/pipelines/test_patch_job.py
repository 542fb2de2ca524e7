"""The Ray patch job end to end on a real local Ray (one per test session) with the shipped model:
layout and lineage, every scheme, repatch equivalence, a worker process killed mid-unit, a unit
that keeps failing, and the driver killed with SIGKILL and started again.

Data: the first 12 stdlib modules (99 KB) in 3 parts of 30 KB, units of 16 KB (6 units), so
each scoring run takes a few seconds on 2 CPU cores.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.dataset as pds
import pytest

from blt_data.documents import iter_documents
from blt_data.download import DownloadConfig, download
from blt_data.entropy import score_document_alone
from blt_data.patches import read_patches
from blt_data.patching import PatchRule, patch_lengths
from blt_data.registry import Registry
from blt_data.repatch import RepatchConfig, repatch
from blt_data.storage import Store
from blt_data.verify import verify
from blt_model.entropy_registry import load_default_entropy_model
from blt_data import patch_units
from pipelines.patch_job import FaultInjection, PatchJobConfig, PatchJobError, PatchWorker, plan_patch_job, run_patch_job

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SHA256 = "bf4326e9c435f334d19c3bd80d4661c88de9f7245f4b57fd26bd1dcc1c416827"


def stdlib_docs(store_url: str) -> Registry:
    reg = Registry(Store.open(store_url))
    download(reg, DownloadConfig(source="stdlib", name="std", limit=12, part_bytes=30_000))
    return reg


def job(**kw) -> PatchJobConfig:
    rule = PatchRule(**{k: kw.pop(k) for k in list(kw) if k in PatchRule.model_fields})
    return PatchJobConfig(**{"docs": "std", "name": "p", "unit_bytes": 16_000, "workers": 2, "rule": rule, **kw})


@pytest.fixture(scope="module")
def base(tmp_path_factory, ray_local):
    """An uninterrupted reference run: entropy scheme, threshold 2.5 nats."""
    store = str(tmp_path_factory.mktemp("patch") / "store")
    reg = stdlib_docs(store)
    return SimpleNamespace(store=store, reg=reg, patched=run_patch_job(reg, job(threshold=2.5)))


def test_end_to_end_layout_lineage_and_content(base):
    reg, m = base.reg, base.patched
    docs = reg.resolve("std")
    assert m.ref == "p@v1" and m.kind == "patches"
    assert m.parents == ["std@v1", "default"]
    assert m.params["model"] == {"ref": "default", "sha256": DEFAULT_SHA256}
    assert m.params["threshold"] == 2.5 and m.params["num_units"] == len(m.parts) == 6
    job_dir = reg.job_dir("p", m.job_id)
    files = reg.store.find(job_dir)
    assert [f.rsplit("/", 1)[1] for f in files if f.endswith(".parquet")] == [f"part-{i:06d}.parquet" for i in range(6)]
    assert len([f for f in files if "/_done/unit-" in f]) == 6
    assert verify(reg, m) == []

    table = read_patches(reg, m)
    assert table.column("id").to_pylist() == [d["id"] for d in iter_documents(reg, docs)]
    s = m.stats
    assert (s.documents, s.bytes, s.quarantined) == (12, docs.stats.bytes, 0)
    assert sum(s.patch_length_histogram) == s.patches and s.mean_patch_length == pytest.approx(s.bytes / s.patches)
    assert set(s.entropy_quantiles) == {"q01", "q10", "q25", "q50", "q75", "q90", "q99", "mean"}

    # The stored entropies are the model's (float16 of scoring the document alone), and the
    # patch lengths are the rule applied to exactly what is stored.
    model = load_default_entropy_model()
    row = table.column("id").to_pylist().index("__future__")
    text = table.column("text")[row].as_py()
    stored = np.array(table.column("entropies")[row].as_py(), np.float16)
    np.testing.assert_allclose(stored.astype(np.float32), score_document_alone(model, text), atol=2e-2, rtol=2e-3)
    for text, pl, ent in zip(*(table.column(c).to_pylist() for c in ("text", "patch_lengths", "entropies"))):
        assert pl == patch_lengths(text, np.array(ent, np.float16), PatchRule(threshold=2.5)).tolist()

    parts = [reg.store.path(reg.part_path(m, p)) for p in m.parts]
    assert pds.dataset(parts, format="parquet").count_rows() == 12
    assert run_patch_job(reg, job(threshold=2.5)).ref == "p@v1"  # a rerun finds the committed job


def test_repatch_equals_patching_again(base):
    reg = base.reg
    repatched = repatch(reg, RepatchConfig(patches="p", name="r3", rule=PatchRule(threshold=3.0)))
    again = run_patch_job(reg, job(name="p3", threshold=3.0))
    assert repatched.parents == ["p@v1"] and repatched.params["model"]["sha256"] == DEFAULT_SHA256
    assert read_patches(reg, repatched).equals(read_patches(reg, again))
    assert repatched.stats == again.stats
    assert verify(reg, repatched) == []


@pytest.mark.parametrize("scheme,extra", [("space", {}), ("static", {"patch_size": 6, "max_patch_length": 4}), ("byte", {})])
def test_schemes_without_a_model(base, scheme, extra):
    reg = base.reg
    m = run_patch_job(reg, job(name=f"s-{scheme}", scheme=scheme, **extra))
    assert m.parents == ["std@v1"] and m.params["model"] is None and "entropies" not in m.arrow_schema
    table = read_patches(reg, m)
    assert "entropies" not in table.column_names
    cfg = PatchRule(scheme=scheme, **extra)
    for text, pl in zip(table.column("text").to_pylist(), table.column("patch_lengths").to_pylist()):
        assert pl == patch_lengths(text, None, cfg).tolist()
    assert verify(reg, m) == []


def test_worker_killed_mid_unit(base, caplog):
    """Unit 1's first attempt kills its worker process (os._exit) after scoring one document: the
    actor is replaced, the unit redone, and the result is what the rule gives on the stored
    entropies (monotonic scheme, checked against a repatch of the reference run)."""
    reg = base.reg
    with caplog.at_level(logging.WARNING, logger="pipelines.patch_job"):
        m = run_patch_job(reg, job(name="mono", scheme="monotonic", threshold=0.5, fault=FaultInjection(unit=1, kind="exit")))
    assert "worker of unit 1 died" in caplog.text
    assert verify(reg, m) == []  # ids equal the input's, none doubled, every length adds up
    expected = repatch(reg, RepatchConfig(patches="p", name="mono-ref", rule=PatchRule(scheme="monotonic", threshold=0.5)))
    assert read_patches(reg, m, ["id", "patch_lengths"]).equals(read_patches(reg, expected, ["id", "patch_lengths"]))


def test_unit_that_keeps_failing_fails_the_job_naming_it(base):
    reg = base.reg
    with pytest.raises(PatchJobError, match=r"unit 2 \(.*lines .*\) failed 2 times; last error: RuntimeError: injected fault"):
        run_patch_job(reg, job(name="doomed", scheme="byte", retries=1, fault=FaultInjection(unit=2, kind="raise", attempts=99)))
    assert reg.versions("doomed") == []


def test_driver_killed_then_rerun_recomputes_nothing_and_matches(base, ray_local, tmp_path):
    store = str(tmp_path / "store")
    reg = stdlib_docs(store)
    cmd = [sys.executable, "-m", "cli.blt_data", "patch", "std", "--name", "p", "--threshold", "2.5",
           "--unit-size", "16000", "--workers", "1", "--ray-address", ray_local, "--store", store, "-q"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    done_dir = Path(store) / "datasets/p/_jobs" / base.patched.job_id / "_done"
    deadline = time.monotonic() + 120
    while len(list(done_dir.glob("unit-*.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.monotonic() < deadline, "no progress from the driver"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()

    records = sorted(done_dir.glob("unit-*.json"))
    finished = records + [done_dir.parent / f"part-{r.stem.split('-')[1]}.parquet" for r in records]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    assert 2 <= len(records) < 6
    assert reg.versions("p") == []  # nothing committed by the killed driver

    m = run_patch_job(reg, job(threshold=2.5))
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == before  # not recomputed
    assert m.job_id == base.patched.job_id
    assert m.parts == base.patched.parts and m.stats == base.patched.stats
    assert verify(reg, m) == []


def test_other_execution_settings_resume_the_same_job(base):
    """Workers, batch sizes, retries and threads are execution settings: a job planned with other
    ones has the same id, and finishes the units another run left instead of starting over."""
    reg = base.reg
    first = job(name="moved", threshold=2.5, workers=1, batch_rows=8, retries=0,
                fault=FaultInjection(unit=3, kind="raise", attempts=99))
    later = job(name="moved", threshold=2.5, workers=2, batch_rows=3, retries=5, cpus_per_worker=0.25,
                threads_per_worker=1)
    assert plan_patch_job(reg, first).job_id == plan_patch_job(reg, later).job_id == base.patched.job_id
    assert plan_patch_job(reg, job(name="moved", threshold=2.5, row_len=64)).job_id != base.patched.job_id
    with pytest.raises(PatchJobError, match="unit 3"):
        run_patch_job(reg, first)
    done_dir = Path(base.store) / "datasets/moved/_jobs" / base.patched.job_id / "_done"
    records = sorted(done_dir.glob("unit-*.json"))
    finished = records + [done_dir.parent / f"part-{r.stem.split('-')[1]}.parquet" for r in records]
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished}
    assert 1 <= len(records) < 6 and reg.versions("moved") == []

    m = run_patch_job(reg, later)
    assert {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in finished} == before  # not recomputed
    assert m.job_id == base.patched.job_id and len(m.parts) == 6
    assert m.params["scoring"]["batch_rows"] == 3  # the run that finished it
    assert verify(reg, m) == []


def test_chunks_patch_a_subset_of_a_shuffled_dataset(base):
    from blt_data.shuffle import shuffle_documents

    reg = base.reg
    shuffled = shuffle_documents(reg, "std", "std-sh", num_chunks=3, seed=0, memory_bytes=10**6, val_docs=2)
    m = run_patch_job(reg, job(docs="std-sh", name="sub", scheme="static", chunks=[1]))
    by_split = {s: sum(p.rows for p in shuffled.parts_of(s) if s == "val" or "chunk-000001" in p.path) for s in ("train", "val")}
    assert m.stats.splits == by_split and m.params["chunks"] == [1]
    assert verify(reg, m) == []
    whole = run_patch_job(reg, job(docs="std-sh", name="sub", scheme="static"))
    assert whole.job_id != m.job_id and whole.stats.documents == shuffled.stats.documents
    with pytest.raises(PatchJobError, match=r"chunks \[7\] are not in std-sh@v1, which has chunks 0..2"):
        run_patch_job(reg, job(docs="std-sh", name="sub", scheme="static", chunks=[7]))
    with pytest.raises(PatchJobError, match="std@v1 has no train chunks"):
        run_patch_job(reg, job(name="sub", scheme="static", chunks=[0]))


def test_small_input_is_cut_for_every_worker(tmp_path):
    """A corpus far under one default unit (16 MB) is cut into at least 4 units per actor; the
    plan is the same whatever the execution settings, and its own output field changes the job."""
    reg = Registry(Store.open(str(tmp_path / "store")))
    docs = download(reg, DownloadConfig(source="stdlib", name="small", limit=30))
    assert len(docs.parts) == 1 and 300_000 < docs.stats.bytes < 10**6
    cfg = PatchJobConfig(docs="small", name="ps", rule=PatchRule(scheme="static", patch_size=6))
    plan = plan_patch_job(reg, cfg)
    assert len(plan.units) >= 4 * cfg.workers and plan.unit_size < cfg.unit_bytes
    assert all(u.bytes <= plan.unit_size or u.stop - u.start == 1 for u in plan.units)
    wider = plan_patch_job(reg, cfg.model_copy(update={"workers": 8}))
    assert wider.job_id == plan.job_id and wider.units == plan.units
    fewer = plan_patch_job(reg, cfg.model_copy(update={"min_units": 2}))
    assert fewer.job_id != plan.job_id and len(fewer.units) < len(plan.units)


def test_resume_across_compaction_is_byte_identical(base, monkeypatch, tmp_path):
    """Records compacted in batches of 2 units, then 4 (by the driver, in this process). A job
    stops at unit 5 with units 0-3 in one batch; units 2 and 3 are then redone as if the driver
    had crashed between writing that batch and deleting their loose records. The restart finishes
    unit 5 only, drops the duplicates, and commits what an uninterrupted run commits: the same
    parts and statistics (entropies stored, so float sums are compared too)."""
    monkeypatch.setattr(patch_units, "BATCH_LEVELS", (2, 4))
    reg = base.reg
    whole_reg = stdlib_docs(str(tmp_path / "store"))  # the same job, uninterrupted, in another store
    whole = run_patch_job(whole_reg, job(name="c", scheme="static", patch_size=6, model="default"))
    cfg = job(name="c", scheme="static", patch_size=6, model="default", workers=1, retries=0,
              fault=FaultInjection(unit=5, kind="raise", attempts=99))
    with pytest.raises(PatchJobError, match="unit 5"):
        run_patch_job(reg, cfg)
    plan = plan_patch_job(reg, cfg)
    assert plan.stored and plan.job_id == whole.job_id
    done_dir = Path(base.store) / "datasets/c/_jobs" / plan.job_id / "_done"
    assert {"batch-000000-000003.json", "unit-000004.json"} <= {p.name for p in done_dir.iterdir()}
    worker = PatchWorker(reg.store.root, plan.model, cfg)
    for unit in plan.units[2:4]:
        worker.run(unit, plan.spec, attempt=0)
    assert {"unit-000002.json", "unit-000003.json"} <= {p.name for p in done_dir.iterdir()}
    parts = Path(base.store) / "datasets/c/_jobs" / plan.job_id
    before = {p: p.stat().st_mtime_ns for p in parts.glob("part-00000[0-4].parquet")}

    m = run_patch_job(reg, cfg.model_copy(update={"fault": None}))
    assert {p: p.stat().st_mtime_ns for p in before} == before  # only unit 5 was done again
    assert sorted(p.name for p in done_dir.iterdir()) == ["batch-000000-000003.json", "batch-000004-000005.json"]
    assert m.parts == whole.parts  # byte-identical parts (sha256)
    assert m.stats == whole.stats and m.stats.entropy_sum is not None
    assert verify(reg, m) == []
