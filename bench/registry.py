"""Benchmark: registry operations against part count (issue 13, item 3).

Makes synthetic patches datasets of 10^4, 10^5 and 10^6 parts without running a job, committed
through `Registry.commit` like any job's manifest: one path and one sha256 per part (the part
list is as large as a real one), real part files (5,000 tiny documents each, the patch job's part
writer) for the parts the timed operations read, and no file for the others
(`synthetic_patches`). Then times, on a local folder and on a loopback S3 server (moto, as
the tests use):

    show     `blt-data registry show NAME` in-process (typer's runner; no subprocess start-up)
    verify   `blt-data registry verify NAME --sample 100`
    open     `Reader(..., rank=r, world_size=64)` for r in 0, 31, 63: construct (mean of the
             three), and construct + first batch (rank 0)

Every operation starts from a fresh Store (fsspec's listing caches emptied), as a new process
would. ``--format 1`` writes the old inline format (the "before"); ``--code DIR`` runs the
measurements in a child process with DIR first on PYTHONPATH, e.g. the main checkout before
this change, against datasets this code wrote in format 1 (verify then re-hashes every part:
that code has no --sample).

    nice -n 5 python bench/registry.py [--sizes 10000,100000,1000000] [--stores local,s3]
        [--format 2] [--code DIR] [--out bench/results/registry.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

RESULTS = Path(__file__).parent / "results" / "registry.json"
RANKS = (0, 31, 63)
WORLD = 64


def synthetic_patches(reg, name: str, parts: int, rows: int = 5000, val_every: int = 100, inline: bool = False,
                      sample: int = 100, ranks: tuple[int, ...] = RANKS, world_size: int = WORLD, blocks: int = 3):
    """A committed patches dataset of ``parts`` parts (every ``val_every``-th in split val),
    ``rows`` tiny documents each: a part list as large and as incompressible as a real one
    (one path and one sha256 per part). Only the parts that `measure` reads are real files:
    part 0, those that ``verify --sample`` draws, and the first ``blocks`` blocks of each of ``ranks``'
    shards of epoch 0; the others are listed with a random sha256 and have no file (a full
    verify reports them missing)."""
    from blt_data import registry as registry_module
    from blt_data.patches import arrow_schema_summary, build_table, write_part
    from blt_data.patching import PatchRule, patch_lengths_arrow
    from blt_data.reader_state import EpochOrder
    from blt_data.registry import Manifest, PartTable
    from blt_data.stats import DatasetStats
    from blt_data.verify import sample_parts
    from pydantic import BaseModel

    if reg.versions(name):
        raise SystemExit(f"{name} exists in {reg.store.url}: the parts to write are chosen for its v1")
    job = f"synthetic-{parts}"
    rng = np.random.default_rng(parts)
    paths = [f"_jobs/{job}/part-{i:07d}.parquet" for i in range(parts)]
    split = np.where(np.arange(parts) % val_every == val_every - 1, "val", "train")
    sha = [bytes(row) for row in rng.integers(0, 256, (parts, 32), dtype=np.uint8)]
    size = rng.integers(15_000_000, 17_000_000, parts)

    def table() -> PartTable:
        return PartTable(pa.table({
            "path": pa.array(paths, pa.string()), "rows": pa.array(np.full(parts, rows, np.int64)),
            "bytes": pa.array(size, pa.int64()), "sha256": pa.array(sha, pa.binary(32)),
            "split": pa.array(split, pa.string()), "quarantine": pa.array(np.zeros(parts, bool)),
        }, schema=registry_module.PARTS_SCHEMA))

    rule = PatchRule(scheme="static", patch_size=4)
    text = pa.array([f"document {i} of a synthetic dataset" for i in range(rows)], pa.large_string())
    lengths = patch_lengths_arrow(text, None, rule)
    one = DatasetStats.of(lengths, None)
    docs = {s: int((split == s).sum()) * rows for s in ("train", "val")}
    manifest = Manifest(
        name=name, kind="patches", job_id=job, arrow_schema=arrow_schema_summary(False),
        params={"synthetic": {"parts": parts, "rows": rows}},
        stats=DatasetStats(documents=parts * rows, bytes=parts * one.bytes, patches=parts * (one.patches or 0),
                           splits=docs),
    )
    # The parts the measured operations read: chosen on the manifest as it will be committed (v1;
    # its format decides the block order).
    fmt = 2 if parts > registry_module.INLINE_PARTS and not inline else 1
    planned = BaseModel.model_copy(manifest.with_parts(table()), update={"version": 1, "format_version": fmt})
    needed = {0} | set(sample_parts(planned, parts, sample).tolist())  # part 0: `inspect`'s first documents
    order = EpochOrder(planned, "train", 0, 4096)
    train = np.flatnonzero(split == "train")
    for rank in ranks:
        needed |= {int(train[b.part]) for b in order.shard(0, world_size, rank)[0][:blocks]}
    for i in sorted(needed):
        ids = [f"p{i}-{j}" for j in range(rows)]  # unique content: one sha256 per part
        info = write_part(reg.store, f"{reg.dataset_dir(name)}/{paths[i]}", paths[i],
                          build_table(ids, text, lengths, None), dataset=name, job_id=job, split=str(split[i]))
        sha[i], size[i] = bytes.fromhex(info.sha256), info.bytes
    old = registry_module.INLINE_PARTS
    registry_module.INLINE_PARTS = 1 << 62 if inline else old  # the old format: every part inline
    try:
        committed = reg.commit(manifest.with_parts(table()))
    finally:
        registry_module.INLINE_PARTS = old
    assert (committed.version, committed.format_version) == (1, fmt), (committed.ref, committed.format_version)
    return committed


def _fresh(url: str):
    """A Registry as a new process would open it (fsspec's instance and listing caches emptied)."""
    import fsspec

    from blt_data.registry import Registry
    from blt_data.storage import Store

    if url.startswith("s3://"):
        fsspec.filesystem("s3").invalidate_cache()
    return Registry(Store.open(url))


def measure(url: str, name: str, sample: bool = True) -> dict:
    """Seconds of show, verify and reader open on a committed dataset; only APIs that the code
    before the part-list format has too (so ``--code`` can time that code)."""
    from typer.testing import CliRunner

    from blt_data.reader import Reader, ReaderConfig
    from cli.blt_data import app

    runner = CliRunner()
    out: dict = {}

    def cli(*args: str) -> tuple[float, float]:
        _fresh(url)
        start, cpu = time.perf_counter(), time.process_time()
        result = runner.invoke(app, [*args, "--store", url, "-q"])
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
        if result.exit_code != 0:
            raise RuntimeError(f"blt-data {' '.join(args)} exited {result.exit_code}: {result.output[-2000:]}")
        return seconds, cpu

    out["show_s"], out["show_cpu_s"] = min(cli("registry", "show", name) for _ in range(2))
    # The code before this change has no --sample, and the synthetic parts not sampled have no file.
    out["verify_s"] = cli("registry", "verify", name, "--sample", "100")[0] if sample else None
    cfg = ReaderConfig(dataset=name, seq_len=4096, batch_size=2, prefetch=0)
    opens, cpus = [], []
    for rank in RANKS:
        reg = _fresh(url)
        start, cpu = time.perf_counter(), time.process_time()
        reader = Reader(cfg, reg, rank=rank, world_size=WORLD)
        reader.start_state  # noqa: B018 - the state is part of "open"
        opens.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
        if rank == RANKS[0]:
            next(iter(reader))
            out["open_first_batch_s"] = time.perf_counter() - start
    out["open_s"], out["open_cpu_s"], out["open_max_s"] = statistics.mean(opens), statistics.mean(cpus), max(opens)
    return out


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}"


def _s3_server() -> subprocess.Popen:
    """moto's S3 server on loopback in its own process (as a real S3 is: its CPU is not ours)."""
    import socket

    import boto3

    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_EC2_METADATA_DISABLED="true")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
    client = boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"])
    for _ in range(200):
        try:
            client.create_bucket(Bucket="bench")
            return server
        except Exception:  # noqa: BLE001 - not listening yet
            time.sleep(0.1)
    server.kill()
    raise SystemExit("moto's S3 server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--stores", default="local,s3")
    ap.add_argument("--format", type=int, choices=(1, 2), default=2, help="1: every part inline (the old format)")
    ap.add_argument("--code", help="time with this checkout's code (a child process), e.g. /work/main")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--measure", nargs=2, metavar=("URL", "NAME"), help=argparse.SUPPRESS)
    ap.add_argument("--no-sample", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:  # the child of --code
        print(json.dumps(measure(*args.measure, sample=not args.no_sample)))
        return

    from blt_data.registry import Registry
    from blt_data.storage import Store

    server = _s3_server() if "s3" in args.stores.split(",") else None
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-registry-") as tmp:
        for size in (int(s) for s in args.sizes.split(",")):
            for where in args.stores.split(","):
                url = f"{tmp}/store" if where == "local" else f"s3://bench/f{args.format}-{size}"
                name = f"synthetic-{size}"
                start = time.perf_counter()
                m = synthetic_patches(_fresh(url), name, size, inline=args.format == 1)
                made = time.perf_counter() - start
                manifest_bytes = Registry(Store.open(url)).store.size(Registry(Store.open(url)).manifest_path(name, m.version))
                print(f"[{time.strftime('%H:%M:%S')}] {size:,} parts on {where}: made in {made:.1f} s "
                      f"(format {m.format_version}, manifest {manifest_bytes:,} B"
                      + (f", part list {m.parts_file.bytes:,} B)" if m.parts_file else ")"), flush=True)
                if args.code:
                    child = subprocess.run(
                        [sys.executable, __file__, "--measure", url, name, "--no-sample"],
                        env={**os.environ, "PYTHONPATH": args.code}, capture_output=True, text=True, check=False)
                    if child.returncode:
                        raise SystemExit(f"measuring with {args.code} failed:\n{child.stderr[-3000:]}")
                    result = json.loads(child.stdout.strip().splitlines()[-1])
                else:
                    result = measure(url, name)
                row = {"parts": size, "store": where, "format": m.format_version, "code": args.code or "this",
                       "manifest_bytes": manifest_bytes, "parts_file_bytes": m.parts_file.bytes if m.parts_file else None,
                       "make_s": made, "load_avg": os.getloadavg()[0], **result}
                rows.append(row)
                print(f"    show {row['show_s']:.3f} s (cpu {row['show_cpu_s']:.3f}) · verify --sample 100 {_s(row['verify_s'])} · "
                      f"open (64 ranks) {row['open_s']:.3f} s (cpu {row['open_cpu_s']:.3f}, max {row['open_max_s']:.3f}) · "
                      f"first batch {row['open_first_batch_s']:.3f} s · load {os.getloadavg()[0]:.1f}", flush=True)
    if server is not None:
        server.terminate()
        server.wait()

    print(f"\n{'parts':>9} {'store':<6} {'fmt':>3} {'code':<10} {'manifest B':>12} {'list B':>11} {'show s':>8} "
          f"{'show cpu':>8} {'verify s':>9} {'open s':>8} {'open cpu':>8} {'batch s':>8}")
    for r in rows:
        print(f"{r['parts']:>9,} {r['store']:<6} {r['format']:>3} {Path(r['code']).name[:10]:<10} {r['manifest_bytes']:>12,} "
              f"{r['parts_file_bytes'] or 0:>11,} {r['show_s']:>8.3f} {r['show_cpu_s']:>8.3f} {_s(r['verify_s']):>9} "
              f"{r['open_s']:>8.3f} {r['open_cpu_s']:>8.3f} {r['open_first_batch_s']:>8.3f}")
    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {"runs": []}
    key = (args.format, args.code or "this")
    previous["runs"] = [r for r in previous["runs"] if (r["format"], r["code"]) != key or r["parts"] not in
                        {x["parts"] for x in rows}] + rows
    previous["note"] = ("synthetic patches datasets (bench/registry.py); show/verify through the CLI in-process; "
                        "open = Reader construction for ranks 0, 31, 63 of 64 (mean), batch = rank 0 to its first batch; "
                        "*_cpu_s: this process's CPU seconds (the S3 server runs in its own process); "
                        "load_avg: the machine's 1-minute load when measured")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(previous, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
