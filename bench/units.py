"""Patch job overheads that grow with the unit count: per-unit wall time, and the driver's restart.

    python bench/units.py                                  # both, ~10 min on 2 cores
    python bench/units.py --skip-restart --mb 8            # per-unit slope only, a quick look
    python bench/units.py --skip-overhead --max-units 1000000   # restart up to 10^6 units
    PYTHONPATH=/work/main python bench/units.py --skip-restart --label before   # another checkout

overhead  `run_patch_job` (static scheme, no model, 2 actors on a Ray started once) on one corpus
          (Python stdlib sources cycled up to --mb MB, 4 MB input parts) cut into 10, 30, 100,
          300 and 1,000 units by unit size; the least-squares slope of wall time against the unit
          count is the per-unit overhead (the rest of the work is the same in every run).
restart   the driver's restart without Ray (`plan_patch_job` + `load_completion` + the units
          left) on a synthetic job folder: a documents manifest, the job's stored plan, N done
          units in batches of 10,000, then 37 batches of 100 and 63 loose records of the run in
          progress, written directly (no job runs). On local disk and on a moto S3 server on loopback (its own
          process, as a real store would be).

Writes bench/results/units.json (merged with what is there, keyed by --label).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blt_data.download import DownloadConfig, download
from blt_data.patching import PatchRule
from blt_data.registry import Manifest, PartInfo, Registry
from blt_data.stats import DatasetStats
from blt_data.storage import Store
from pipelines.patch_job import PatchJobConfig, plan_patch_job, run_patch_job

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "units.json"
UNIT_COUNTS = (10, 30, 100, 300, 1000)
BLOCKS = 37  # batches of the first level in the run of 10,000 units in progress
LOOSE = 63  # records of the block in progress, left loose


def slope(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x: (a, b)."""
    b, a = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(a), float(b)


def overhead(args) -> dict:
    import ray
    from patch import write_corpus  # bench/patch.py: this script's folder is on sys.path

    tmp = Path(tempfile.mkdtemp(prefix="bench-units-"))
    try:
        reg = Registry(Store.open(str(tmp / "store")))
        corpus = tmp / "corpus.jsonl"
        write_corpus(corpus, int(args.mb * 10**6), max_doc_bytes=200_000)
        docs = download(reg, DownloadConfig(source=str(corpus), name="std", part_bytes=4 * 10**6))
        json_bytes = corpus.stat().st_size
        print(f"corpus: {docs.stats.bytes / 1e6:.1f} MB of text, {len(docs.parts)} parts, {docs.stats.documents} documents")
        os.environ.setdefault("RAY_worker_niceness", "0")  # as bench/patch.py: actors compete like the driver
        ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
        rows = []
        try:
            for count in args.units:
                extra = {"min_units": 1} if "min_units" in PatchJobConfig.model_fields else {}  # older checkouts lack it
                cfg = PatchJobConfig(docs="std", name=f"u{count}", rule=PatchRule(scheme="static", patch_size=6),
                                     unit_bytes=max(1024, -(-json_bytes // count)), workers=2, **extra)
                start = time.perf_counter()
                m = run_patch_job(reg, cfg)
                seconds = time.perf_counter() - start
                rows.append({"target": count, "units": m.params["num_units"], "seconds": round(seconds, 3)})
                print(f"  {m.params['num_units']:>6} units  {seconds:8.2f} s", flush=True)
        finally:
            ray.shutdown()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    a, b = slope([r["units"] for r in rows], [r["seconds"] for r in rows])
    return {"mb": args.mb, "rows": rows, "fixed_s": round(a, 3), "per_unit_ms": round(b * 1000, 2)}


# --- restart ------------------------------------------------------------------------------------


def _sha(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def _unit_stats(rng: np.random.Generator) -> DatasetStats:
    """A unit's statistics as a scored job records them (both histograms filled)."""
    from blt_data.stats import ENTROPY_BINS, HISTOGRAM_BINS

    entropy = rng.integers(0, 1000, ENTROPY_BINS)
    return DatasetStats(documents=2000, bytes=16_000_000, splits={}, patches=3_000_000,
                        patch_length_histogram=rng.integers(0, 10**5, HISTOGRAM_BINS).tolist(),
                        entropy_histogram=entropy.tolist(), entropy_sum=float(entropy.sum()) * 1.7)


def make_job_folder(reg: Registry, done: int) -> tuple[PatchJobConfig, int]:
    """A documents manifest of 1,000 units per part, and a patch job folder whose plan has
    done + 10,000 units: the first `done` in batches of 10,000 units, BLOCKS more in batches of
    100 and LOOSE more loose (a driver stopped mid-way through a run of 10,000 units).
    Written directly, concurrently on S3; returns the config and the plan's unit count."""
    from blt_data import patch_units as pu
    from pipelines.patch_job import resolve_job

    small, wide = pu.BATCH_LEVELS
    per_part = 1000
    num_units = done + wide
    nparts = num_units // per_part
    doc_parts = [PartInfo(path=f"_jobs/syn/part-{p:06d}.jsonl.zst", rows=per_part * 100, bytes=10**9, sha256=_sha(p)) for p in range(nparts)]
    reg.commit(Manifest(name="syn", kind="documents", job_id=f"syn-{done}", parts=doc_parts,
                        stats=DatasetStats(documents=nparts * per_part * 100, bytes=nparts * per_part * 16 * 10**6)))
    cfg = PatchJobConfig(docs="syn", name="syn-p", rule=PatchRule(scheme="static", patch_size=6))
    cfg, docs, model, spec, parts = resolve_job(reg, cfg)
    units = [pu.Unit(index=i, part=doc_parts[i // per_part].path, split="train",
                                     start=(i % per_part) * 100, stop=(i % per_part + 1) * 100, bytes=16 * 10**6)
             for i in range(num_units)]
    pu.save_plan(reg.store, spec.job_dir, units)
    rng = np.random.default_rng(0)
    stats = _unit_stats(rng)

    def part(i: int) -> PartInfo:
        return PartInfo(path=f"_jobs/{spec.job_id}/part-{i:06d}.parquet", rows=100, bytes=5 * 10**6, sha256=_sha(i))

    objects = {}
    batches = [(first, wide) for first in range(0, done, wide)] + [(done + k * small, small) for k in range(BLOCKS)]
    for first, size in batches:
        batch = pu.RecordBatch.of(first, first + size - 1, [part(i) for i in range(first, first + size)], stats)
        objects[pu.batch_path(spec.job_dir, first, first + size - 1)] = batch.model_dump_json().encode()
    for i in range(done + BLOCKS * small, done + BLOCKS * small + LOOSE):
        record = pu.UnitRecord(unit=i, part=part(i), stats=stats)
        objects[f"{spec.job_dir}/_done/unit-{i:06d}.json"] = record.model_dump_json().encode()
    _write_all(reg.store, objects)
    return cfg, num_units


def _write_all(store: Store, objects: dict[str, bytes]) -> None:
    if store.is_local:
        for rel, data in objects.items():
            path = Path(store.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        return
    items = list(objects.items())
    for i in range(0, len(items), 500):  # s3fs pipes a dict concurrently
        store.fs.pipe({store.path(rel): data for rel, data in items[i:i + 500]})


def time_restart(reg: Registry, cfg: PatchJobConfig, done: int, num_units: int) -> dict:
    from pipelines.patch_job import load_completion

    start = time.perf_counter()
    plan = plan_patch_job(reg, cfg)
    planned = time.perf_counter()
    completion = load_completion(reg, plan)
    todo = [u for u in plan.units if u.index not in completion]
    end = time.perf_counter()
    found = done + BLOCKS * 100 + LOOSE
    if len(plan.units) != num_units or len(completion) != found or [u.index for u in todo] != list(range(found, num_units)):
        raise SystemExit(f"restart found {len(completion)} units done of {len(plan.units)}, expected {found} of {num_units}")
    return {"plan_s": round(planned - start, 3), "records_s": round(end - planned, 3), "seconds": round(end - start, 3)}


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc, endpoint
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("moto_server did not start")


def restart(args) -> list[dict]:
    sizes = [n for n in (10**4, 10**5, 10**6) if n <= args.max_units]
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench-restart-"))
    moto = None
    try:
        stores = {"local": lambda n: str(tmp / f"store-{n}")}
        if not args.skip_s3:
            moto, endpoint = start_moto()
            os.environ.update(AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
                              AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
            stores["s3"] = lambda n: f"s3://bench/store-{n}"
        for n in sizes:
            for where, url in stores.items():
                reg = Registry(Store.open(url(n)))
                t = time.perf_counter()
                cfg, num_units = make_job_folder(reg, n)
                made = time.perf_counter() - t
                row = {"store": where, "done_units": n, "objects_read": n // 10_000 + BLOCKS + LOOSE + 2, **time_restart(reg, cfg, n, num_units)}
                rows.append(row)
                print(f"  {where:>5} {n:>9,} units done: restart {row['seconds']:6.2f} s (plan {row['plan_s']:.2f} s, "
                      f"records {row['records_s']:.2f} s; folder made in {made:.1f} s)", flush=True)
                if where == "local":
                    shutil.rmtree(tmp / f"store-{n}", ignore_errors=True)
                else:
                    reg.store.delete("", recursive=True)
    finally:
        if moto is not None:
            moto.kill()
            moto.wait()
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=31.5, help="corpus size for the per-unit slope (MB of text)")
    p.add_argument("--units", type=int, nargs="+", default=list(UNIT_COUNTS), help="unit counts to time")
    p.add_argument("--max-units", type=int, default=10**5, help="largest synthetic job for the restart (10^4, 10^5, 10^6)")
    p.add_argument("--label", default="after", help="key of this run's overhead row in the JSON (e.g. before, after)")
    p.add_argument("--skip-overhead", action="store_true")
    p.add_argument("--skip-restart", action="store_true")
    p.add_argument("--skip-s3", action="store_true")
    args = p.parse_args()

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    if not args.skip_overhead:
        print(f"per-unit overhead ({args.label}): static scheme, no model, 2 actors")
        results.setdefault("overhead", {})[args.label] = out = overhead(args)
        print(f"\n{'units':>6} {'wall s':>8}")
        for r in out["rows"]:
            print(f"{r['units']:>6} {r['seconds']:>8.2f}")
        print(f"slope: {out['per_unit_ms']:.1f} ms per unit (fixed {out['fixed_s']:.1f} s)")
    if not args.skip_restart:
        print("driver restart (no Ray): plan + records + units left")
        results["restart"] = rows = restart(args)
        print(f"\n{'store':>6} {'done units':>11} {'plan s':>7} {'records s':>10} {'total s':>8}")
        for r in rows:
            print(f"{r['store']:>6} {r['done_units']:>11,} {r['plan_s']:>7.2f} {r['records_s']:>10.2f} {r['seconds']:>8.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
