"""Benchmark: external shuffle throughput and peak memory, and documents read speed.

Generates a synthetic documents dataset (log-normal document sizes, some non-ASCII text) in a
temporary local store, shuffles it with memory = 1/10 of the input, then reads the result back
with ``iter_part_lines`` + ``json.loads``. The shuffle and the read each run in a child process
so that the generator's memory does not count in their peak RSS (read from
/proc/self/status, see ``peak_rss_mb``).

    python bench/shuffle.py [--mb 400] [--memory-fraction 0.1] [--chunks 8] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from blt_data.documents import DocumentWriter, encode_line, iter_part_lines
from blt_data.registry import Manifest, Registry
from blt_data.shuffle import shuffle_documents
from blt_data.storage import Store

RESULTS = Path(__file__).parent / "results" / "shuffle.json"


def generate(registry: Registry, name: str, text_mb: float, seed: int) -> Manifest:
    """Documents of log-normal size (median ~2.5 KB, long tail to 200 KB) cut from a word pool."""
    rng = np.random.default_rng(seed)
    vocab = [
        "".join(chr(c) for c in rng.integers(97, 123, int(rng.integers(1, 11))))
        for _ in range(30_000)
    ] + ["naïve", "café", "Zürich", "日本語", "данные", "emoji🙂"]
    words = [vocab[i] for i in (rng.zipf(1.2, 3_000_000) - 1) % len(vocab)]
    pool = " ".join(words)
    target = int(text_mb * 1e6)
    writer = DocumentWriter(registry.store, registry.job_dir(name, "bench"), "_jobs/bench", target_part_bytes=64 << 20)
    text_bytes = docs = 0
    while text_bytes < target:
        size = int(np.clip(rng.lognormal(np.log(2500), 1.0), 50, 200_000))
        start = int(rng.integers(0, len(pool) - size))
        text = pool[start : start + size]
        writer.write_line(encode_line({"id": f"bench-{docs:09d}", "text": text, "url": f"https://example.com/{docs}"}))
        text_bytes += len(text.encode())
        docs += 1
    manifest = Manifest(
        name=name,
        kind="documents",
        job_id="bench",
        parts=writer.close(),
        arrow_schema={"id": "string", "text": "large_string", "url": "string"},
        stats={"documents": docs, "bytes": text_bytes, "splits": {"train": docs}},
    )
    return registry.commit(manifest)


def child_shuffle(store: str, ref: str, name: str, memory: int, chunks: int, val_docs: int, seed: int) -> dict:
    registry = Registry(Store.open(store))
    t0 = time.perf_counter()
    out = shuffle_documents(
        registry, ref, name, num_chunks=chunks, seed=seed, memory_bytes=memory, val_docs=val_docs, progress=True
    )
    return {"seconds": time.perf_counter() - t0, "ref": out.ref, "num_runs": out.params["num_runs"]}


def child_read(store: str, ref: str) -> dict:
    registry = Registry(Store.open(store))
    manifest = registry.resolve(ref)
    t0 = time.perf_counter()
    docs = 0
    for line in iter_part_lines(registry, manifest):
        json.loads(line)
        docs += 1
    return {"seconds": time.perf_counter() - t0, "documents": docs, "text_bytes": manifest.stats.bytes}


def peak_rss_mb() -> float:
    """This process's peak RSS. VmHWM belongs to the address space, which exec replaces; a
    child's ru_maxrss would also count its parent's peak (Linux carries it across exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(args: list[str]) -> dict:
    """Run this script as a child process; returns the JSON result it prints last."""
    out = subprocess.run([sys.executable, __file__, *args], stdout=subprocess.PIPE, check=True).stdout
    return json.loads(out.decode().strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=float, default=400, help="MB of document text to generate")
    p.add_argument("--memory-fraction", type=float, default=0.1, help="shuffle memory / input JSONL bytes")
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--val-docs", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--store", help="store folder (default: a temporary one, removed after)")
    p.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        kind, *rest = args.child
        if kind == "shuffle":
            result = child_shuffle(rest[0], rest[1], rest[2], *map(int, rest[3:]))
        else:
            result = child_read(*rest)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return

    with tempfile.TemporaryDirectory(prefix="blt-bench-shuffle-") as tmp:
        store = args.store or tmp
        registry = Registry(Store.open(store))
        t0 = time.perf_counter()
        source = generate(registry, "bench-raw", args.mb, args.seed)
        gen_s = time.perf_counter() - t0
        input_bytes = sum(len(line) + 1 for line in iter_part_lines(registry, source))
        compressed = sum(p.bytes for p in source.parts)
        memory = int(input_bytes * args.memory_fraction)

        shuffle_args = [source.ref, "bench-shuffled", memory, args.chunks, args.val_docs, args.seed]
        shuffled = run_child(["--child", "shuffle", store, *map(str, shuffle_args)])
        read = run_child(["--child", "read", store, shuffled["ref"]])

    result = {
        "documents": source.stats.documents,
        "text_mb": source.stats.bytes / 1e6,
        "input_jsonl_mb": input_bytes / 1e6,
        "input_zstd_mb": compressed / 1e6,
        "memory_mb": memory / 1e6,
        "num_runs": shuffled["num_runs"],
        "num_chunks": args.chunks,
        "generate_s": gen_s,
        "shuffle_s": shuffled["seconds"],
        "shuffle_jsonl_mb_per_s": input_bytes / 1e6 / shuffled["seconds"],
        "shuffle_text_mb_per_s": source.stats.bytes / 1e6 / shuffled["seconds"],
        "shuffle_peak_rss_mb": shuffled["peak_rss_mb"],
        "shuffle_rss_over_memory_mb": shuffled["peak_rss_mb"] - memory / 1e6,
        "read_s": read["seconds"],
        "read_text_mb_per_s": read["text_bytes"] / 1e6 / read["seconds"],
        "read_docs_per_s": read["documents"] / read["seconds"],
        "read_peak_rss_mb": read["peak_rss_mb"],
        "cpu_count": os.cpu_count(),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    width = max(map(len, result))
    for key, value in result.items():
        print(f"{key:<{width}}  {value:,.1f}" if isinstance(value, float) else f"{key:<{width}}  {value:,}")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
