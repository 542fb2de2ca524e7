"""Throughput of Meta's layout out and in, in MB of document text per second, on a local disk:
`export --format meta` (Parquet parts -> Arrow IPC shards, with the per-document check of Meta's
rule) and `import-preprocessed` (shards -> patched Parquet parts), next to `repatch` (Parquet in,
patch, Parquet out: the same kind of work without the layout change) and a bare read of the parts.
Target: >= 100 MB/s for export and import (issue 12): bound by the store, not by Python.

    python bench/meta_layout.py              # ~200 MB of text, best of 2
    python bench/meta_layout.py --mb 20 --repeat 1

The first three rows are floors, not steps: the parts' bytes read from the store, pyarrow
decoding every column of them, and encoding them again as parts (``write_part``: the last step of
import and repatch). Float16 entropies are 2/3 of a part's bytes and most of its encoding: the
last table writes that column alone in other layouts to show why. Any list column costs Arrow's
Parquet writer a per-value path (repetition and definition levels, ~100 M values per CPU-second
here), float16 or float32, compressed or not; only a non-list column (a blob of float16 bytes
per document) escapes it, and DuckDB, Polars and `datasets` would read that as opaque bytes, not
numbers. Run it with another checkout on PYTHONPATH for a before/after on the same machine state
(the script only uses names both have).

Documents: lognormal lengths (mean ~5 KB) of ASCII text, float16 entropies from a gamma
distribution, threshold calibrated to 4.5 bytes per patch. Prints a table (wall time, and CPU
time of this process, which stays meaningful on a shared machine), writes
bench/results/meta_layout.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pds
import pyarrow.parquet as pq

from blt_data.calibrate import calibrate_threshold
from blt_data.meta_layout import MetaExportConfig, MetaImportConfig, export_meta, import_preprocessed
from blt_data.patches import arrow_schema_summary, build_table, part_name, write_part
from blt_data.patching import PatchRule, patch_lengths_arrow
from blt_data.registry import Manifest, Registry
from blt_data.repatch import RepatchConfig, repatch
from blt_data.stats import DatasetStats
from blt_data.storage import Store

PART_BYTES = 64 * 10**6


def make_dataset(reg: Registry, total_bytes: int, seed: int) -> tuple[Manifest, float]:
    rng = np.random.default_rng(seed)
    mean = 5000
    n = int(total_bytes / mean * 1.2) + 10
    lengths = np.maximum(1, rng.lognormal(np.log(mean) - 0.5, 1.0, n)).astype(np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), total_bytes)) + 1]
    alphabet = np.frombuffer(b"abcdefghijklmnopqrstuvwxyz     ,.\n0123456789", np.uint8)
    utf8 = alphabet[rng.integers(0, alphabet.size, int(lengths.sum()))]
    entropies = rng.gamma(2.0, 0.8, int(lengths.sum())).astype(np.float16)
    threshold = calibrate_threshold(entropies[: 2 * 10**6], 4.5, byte_lengths=_head(lengths, 2 * 10**6)).threshold
    cfg = PatchRule(scheme="entropy", threshold=threshold)
    offsets = np.r_[0, np.cumsum(lengths)]
    infos, stats, job = [], DatasetStats(), "bench"
    bounds = np.searchsorted(offsets, np.arange(0, offsets[-1], PART_BYTES))
    bounds = np.unique(np.r_[bounds, lengths.size])
    for index, (d0, d1) in enumerate(zip(bounds[:-1], bounds[1:])):
        b0, b1 = offsets[d0], offsets[d1]
        text = pa.LargeStringArray.from_buffers(int(d1 - d0), pa.py_buffer((offsets[d0:d1 + 1] - b0).astype(np.int64)),
                                                pa.py_buffer(utf8[b0:b1].tobytes()))
        ents = pa.ListArray.from_arrays(pa.array((offsets[d0:d1 + 1] - b0).astype(np.int32)), pa.array(entropies[b0:b1]))
        pl = patch_lengths_arrow(text, ents, cfg)
        eos = pa.array(rng.gamma(2.0, 0.8, int(d1 - d0)).astype(np.float16))
        table = build_table([f"doc-{i}" for i in range(d0, d1)], text, pl, ents, eos)
        infos.append(write_part(reg.store, f"{reg.job_dir('src', job)}/{part_name(index)}", f"_jobs/{job}/{part_name(index)}",
                                table, dataset="src", job_id=job))
        stats = stats + DatasetStats.of(pl, None)
    m = reg.commit(Manifest(name="src", kind="patches", job_id=job, arrow_schema=arrow_schema_summary(True, True), parts=infos,
                            params={"scheme": "entropy", "threshold": threshold, "max_patch_length": None,
                                    "model": {"ref": "bench@v1", "sha256": "0" * 64}},
                            stats=stats.model_copy(update={"splits": {"train": stats.documents}})))
    return m, threshold


def _head(lengths: np.ndarray, nbytes: int) -> np.ndarray:
    k = int(np.searchsorted(np.cumsum(lengths), nbytes))
    head = lengths[:k].copy()
    return np.r_[head, nbytes - int(head.sum())] if nbytes > head.sum() else head


def timed(repeat: int, setup, fn) -> tuple[float, float]:
    """Best (wall seconds, CPU seconds of this process) of `repeat` runs. CPU time says what the
    step costs when the machine is shared (wall time then measures the neighbours too)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeat):
        setup()
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def entropy_layouts(entropies: pa.ListArray, repeat: int) -> dict[str, dict]:
    """CPU seconds of Parquet encoding the entropies column alone, per layout (one thread)."""
    flat = entropies.flatten().to_numpy(zero_copy_only=False)
    offsets = entropies.offsets.to_numpy()
    layouts = {
        "list<float16>, zstd (ours)": (entropies, "zstd"),
        "list<float16>, uncompressed": (entropies, "none"),
        "list<float32>, uncompressed": (pa.ListArray.from_arrays(entropies.offsets, pa.array(flat.astype(np.float32))), "none"),
        "binary float16 blob, zstd": (pa.array([flat[a:b].tobytes() for a, b in zip(offsets[:-1], offsets[1:])], pa.large_binary()), "zstd"),
    }
    out = {}
    for name, (column, codec) in layouts.items():
        table = pa.table({"entropies": column})
        _, cpu = timed(repeat, lambda: None, lambda: pq.write_table(table, pa.BufferOutputStream(), compression=codec,
                                                                     use_dictionary=False, write_statistics=False))
        out[name] = {"cpu_seconds": cpu, "m_values_per_cpu_s": flat.size / cpu / 1e6}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=200.0, help="MB of document text")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--chunks", type=int, default=4, help="chunks (so shards) of the export, which import reads")
    parser.add_argument("--tmp", default=None, help="folder on the disk to measure [default: the system temp folder]")
    parser.add_argument("--out", default="bench/results/meta_layout.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-meta-", dir=args.tmp))
    try:
        reg = Registry(Store.open(str(root / "store")))
        m, threshold = make_dataset(reg, int(args.mb * 1e6), args.seed)
        text_mb = m.stats.bytes / 1e6
        export_dir = root / "meta"
        counter = iter(range(10**6))
        rows = []

        def clear_export():
            shutil.rmtree(export_dir, ignore_errors=True)

        files = [reg.store.path(reg.part_path(m, p)) for p in m.parts]
        # The store's own bound: the parts' bytes read back (from the page cache after the first
        # run), then pyarrow decoding every column, the floor of any step that reads the parts.
        t = timed(args.repeat, lambda: None, lambda: [Path(f).read_bytes() for f in files])
        rows.append(("read part bytes (store)", t))
        t = timed(args.repeat, lambda: None, lambda: pds.dataset(files, format="parquet").to_table())
        rows.append(("decode parts (pyarrow)", t))
        tables = [pds.dataset(f, format="parquet").to_table() for f in files]
        t = timed(args.repeat, lambda: None, lambda: [write_part(reg.store, f"floor/{i}.parquet", "x", table, dataset="x", job_id="x")
                                                     for i, table in enumerate(tables)])
        rows.append(("encode parts (pyarrow)", t))
        layouts = entropy_layouts(tables[0].column("entropies").combine_chunks(), args.repeat)
        tables = []  # free the decoded parts before the steps
        t = timed(args.repeat, clear_export, lambda: export_meta(reg, MetaExportConfig(patches="src", out=str(export_dir),
                                                                                      chunks=args.chunks)))
        rows.append(("export --format meta", t))
        shard_bytes = sum(p.stat().st_size for p in export_dir.rglob("*.arrow"))
        for workers in (1, 2):  # shards converted at once
            t = timed(args.repeat, lambda: None, lambda: import_preprocessed(reg, MetaImportConfig(
                source=str(export_dir), name=f"imp{next(counter)}", rule=PatchRule(threshold=threshold), workers=workers)))
            rows.append((f"import-preprocessed, {workers} worker{'s' if workers > 1 else ''}", t))
        t = timed(args.repeat, lambda: None, lambda: repatch(
            reg, RepatchConfig(patches="src", name=f"rep{next(counter)}", rule=PatchRule(threshold=threshold + 0.01))))
        rows.append(("repatch (reference)", t))
    finally:
        shutil.rmtree(root, ignore_errors=True)

    print(f"{text_mb:.0f} MB of text in {m.stats.documents:,} documents, {len(m.parts)} parts; "
          f"{args.chunks} shards, {shard_bytes / 1e6:.0f} MB; best of {args.repeat}; {os.cpu_count()} CPUs")
    print(f"{'step':<30} {'wall s':>8} {'MB/s':>8} {'CPU s':>8} {'MB/CPU-s':>9}")
    for name, (wall, cpu) in rows:
        print(f"{name:<30} {wall:>8.2f} {text_mb / wall:>8.1f} {cpu:>8.2f} {text_mb / cpu:>9.1f}")
    print(f"{'entropies alone, encoded as':<30} {'M values/CPU-s':>15}")
    for name, row in layouts.items():
        print(f"{name:<30} {row['m_values_per_cpu_s']:>15.1f}")
    print(f"load average {os.getloadavg()[0]:.1f} (wall times measure the neighbours too when it is above the CPUs)")
    result = {
        "text_mb": text_mb, "documents": m.stats.documents, "parts": len(m.parts), "shard_mb": shard_bytes / 1e6,
        "repeat": args.repeat, "cpus": os.cpu_count(), "platform": platform.platform(),
        "load_average": os.getloadavg(),
        "steps": {name: {"seconds": w, "mb_per_s": text_mb / w, "cpu_seconds": c, "mb_per_cpu_s": text_mb / c}
                  for name, (w, c) in rows},
        "entropy_layouts_first_part": layouts,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
