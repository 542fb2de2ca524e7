"""The patch driver's restart on a large job folder, without Ray: the stored plan, compacted
completion records and the units left, on a synthetic job of 10^4 done units (written directly
by bench/units.py's maker, no job runs). Its time is printed, not asserted (bench/units.py
measures it up to 10^6)."""

from __future__ import annotations

import time

from bench.units import BLOCKS, LOOSE, make_job_folder
from blt_data.registry import Registry
from blt_data.storage import Store
from pipelines.patch_job import load_completion, plan_patch_job

DONE = 10_000


def test_restart_of_a_large_job_finds_exactly_what_is_left(store_url, capsys):
    reg = Registry(Store.open(store_url))
    cfg, num_units = make_job_folder(reg, DONE)  # DONE units in one batch, then BLOCKS batches of 100, LOOSE loose
    start = time.perf_counter()
    plan = plan_patch_job(reg, cfg)
    done = load_completion(reg, plan)
    todo = [u.index for u in plan.units if u.index not in done]
    seconds = time.perf_counter() - start
    with capsys.disabled():
        print(f"\nrestart of {DONE:,} done units on {store_url.split(':')[0] if '://' in store_url else 'local'}: {seconds:.2f} s")

    found = DONE + BLOCKS * 100 + LOOSE
    assert plan.stored and len(plan.units) == num_units == DONE + 10_000
    assert len(done) == found and todo == list(range(found, num_units))
    for unit in (0, DONE - 1, DONE, found - 1):
        assert done.part(unit).path == f"_jobs/{plan.job_id}/part-{unit:06d}.parquet"
    assert done.part(found) is None
    names = [rel.rsplit("/", 1)[1] for rel in reg.store.list(f"{plan.spec.job_dir}/_done")]
    assert sum(n.startswith("batch-") for n in names) == DONE // 10_000 + BLOCKS
    assert sum(n.startswith("unit-") for n in names) == LOOSE
