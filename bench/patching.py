"""Patch-rule throughput: applying each scheme to stored entropies, in MB of document bytes per
second on one core (numpy runs these passes single-threaded). Target: >= 50 MB/s.

    python bench/patching.py                 # ~50 MB, best of 3, about half a minute
    python bench/patching.py --mb 10 --repeat 1

Three paths over the same documents:
  batched   patch_lengths_batch on the whole batch (concatenated entropies + document lengths)
  arrow     patch_lengths_arrow on a text + list<float16> table, building list<int32>
  per-doc   patch_lengths called once per document (a Python loop)
Documents: lognormal lengths (mean ~5 KB), bytes from the Python stdlib's sources (for `space`),
float16 entropies drawn from a gamma distribution. Entropy thresholds come from calibration on a
sample (target 4.5 bytes per patch), which is timed too. Prints a table, writes
bench/results/patching.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sysconfig
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from blt_data.calibrate import calibrate_threshold
from blt_data.patching import PatchRule, patch_lengths, patch_lengths_arrow, patch_lengths_batch


def make_documents(total_bytes: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(byte_lengths, utf8 concatenated, float16 entropies concatenated)."""
    rng = np.random.default_rng(seed)
    mean = 5000
    n = int(total_bytes / mean * 1.2) + 10
    lengths = np.maximum(1, rng.lognormal(np.log(mean) - 0.5, 1.0, n)).astype(np.int64)
    lengths = lengths[: int(np.searchsorted(np.cumsum(lengths), total_bytes)) + 1]
    source = b"".join(p.read_bytes() for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))
    reps = -(-int(lengths.sum()) // len(source))
    utf8 = np.frombuffer((source * reps)[: int(lengths.sum())], np.uint8)
    entropies = rng.gamma(2.0, 0.8, int(lengths.sum())).astype(np.float16)
    return lengths, utf8, entropies


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--mb", type=float, default=50.0, help="MB of document bytes")
    parser.add_argument("--repeat", type=int, default=3, help="best of this many runs (per-doc: fewer)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="bench/results/patching.json")
    args = parser.parse_args()

    lengths, utf8, entropies = make_documents(int(args.mb * 1e6), args.seed)
    total = int(lengths.sum())
    offsets = np.r_[0, np.cumsum(lengths)]

    sample_docs = min(len(lengths), 400)  # ~2 MB
    sample_bytes = int(offsets[sample_docs])
    calibrations = {}
    for scheme in ("entropy", "monotonic"):
        start = time.perf_counter()
        cal = calibrate_threshold(entropies[:sample_bytes], 4.5, scheme, byte_lengths=lengths[:sample_docs])
        calibrations[scheme] = {**cal.model_dump(), "seconds": time.perf_counter() - start}

    configs = {
        "entropy": PatchRule(scheme="entropy", threshold=calibrations["entropy"]["threshold"]),
        "entropy+max8": PatchRule(scheme="entropy", threshold=calibrations["entropy"]["threshold"], max_patch_length=8),
        "monotonic": PatchRule(scheme="monotonic", threshold=calibrations["monotonic"]["threshold"]),
        "space": PatchRule(scheme="space"),
        "space+max16": PatchRule(scheme="space", max_patch_length=16),
        "static": PatchRule(scheme="static", patch_size=4),
        "byte": PatchRule(scheme="byte"),
    }
    text = pa.LargeStringArray.from_buffers(len(lengths), pa.py_buffer(offsets.astype(np.int64)), pa.py_buffer(utf8))
    entropy_column = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(entropies))
    data = utf8.tobytes()

    rows = []
    for name, cfg in configs.items():
        batch = patch_lengths_batch(lengths, entropies, cfg, utf8=utf8)
        assert int(batch.patch_lengths.sum()) == total
        timings = {
            "batched": best_of(args.repeat, lambda: patch_lengths_batch(lengths, entropies, cfg, utf8=utf8)),
            "arrow": best_of(args.repeat, lambda: patch_lengths_arrow(text, entropy_column, cfg)),
        }

        def per_doc():
            for i in range(len(lengths)):
                lo, hi = offsets[i], offsets[i + 1]
                patch_lengths(data[lo:hi], entropies[lo:hi], cfg)

        timings["per-doc"] = best_of(max(1, args.repeat - 1), per_doc)
        for path, seconds in timings.items():
            rows.append(
                {
                    "scheme": name,
                    "path": path,
                    "seconds": seconds,
                    "mb_per_s": total / seconds / 1e6,
                    "mean_patch_length": total / batch.patch_lengths.size,
                    "config": cfg.model_dump(),
                }
            )

    print(f"{len(lengths)} documents, {total / 1e6:.1f} MB (mean {total / len(lengths):.0f} B), best of {args.repeat}")
    print(f"{'scheme':<14}{'path':<10}{'seconds':>9}{'MB/s':>9}{'bytes/patch':>13}")
    for r in rows:
        print(f"{r['scheme']:<14}{r['path']:<10}{r['seconds']:>9.3f}{r['mb_per_s']:>9.1f}{r['mean_patch_length']:>13.2f}")
    for scheme, c in calibrations.items():
        print(f"calibrate {scheme}: θ={c['threshold']:.4f} nats, {c['mean_patch_size_reached']:.3f} B/patch on {c['sample_bytes'] / 1e6:.1f} MB in {c['seconds']:.2f} s")

    result = {
        "documents": int(len(lengths)),
        "bytes": total,
        "repeat": args.repeat,
        "rows": rows,
        "calibration": calibrations,
        "machine": {
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "processor": platform.processor() or platform.machine(),
        },
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
