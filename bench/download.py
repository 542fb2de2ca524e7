"""Benchmark ``blt-data download`` and reading a documents dataset back.

Each measured step runs in a child process so its peak RSS is its own. Prints a table and writes
bench/results/download.json.

    .venv/bin/python bench/download.py [--mb 200] [--store DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_data.download import DownloadConfig, download
from blt_data.documents import iter_part_lines
mode, store, arg = sys.argv[1:4]
reg = Registry(Store.open(store))
t = time.perf_counter()
if mode == "download":
    m = download(reg, DownloadConfig(source=arg, name=sys.argv[4]))
    n, nbytes = m.stats.documents, m.stats.bytes
else:
    m = reg.resolve(arg)
    n = nbytes = 0
    for line in iter_part_lines(reg, m):
        doc = json.loads(line)
        n += 1
        nbytes += len(doc["text"].encode())
secs = time.perf_counter() - t
rss = 0
for l in open("/proc/self/status"):
    if l.startswith("VmHWM:"):
        rss = int(l.split()[1]) * 1024
print(json.dumps({"docs": n, "text_bytes": nbytes, "seconds": secs, "peak_rss": rss}))
"""


def synth_corpus(folder: Path, mb: int) -> Path:
    """jsonl.zst files of documents with a realistic spread of sizes (mostly 1-20 KB)."""
    import zstandard

    rng = random.Random(0)
    vocab = [f"{w}{rng.randrange(1000)}" for w in "the of and to in is for on that with as by data byte model patch".split()]
    folder.mkdir(parents=True, exist_ok=True)
    target = mb * 10**6
    written = 0
    for f in range(8):
        lines = []
        while written < target * (f + 1) / 8:
            n = int(rng.lognormvariate(7.5, 1.0))
            text = " ".join(rng.choices(vocab, k=max(1, n // 6)))
            lines.append(json.dumps({"id": f"doc-{f}-{len(lines)}", "text": text}).encode())
            written += len(text)
        (folder / f"shard-{f}.jsonl.zst").write_bytes(
            zstandard.ZstdCompressor(level=3).compress(b"\n".join(lines) + b"\n")
        )
    return folder


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, *args], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=200, help="MB of synthetic text")
    ap.add_argument("--store", default=None, help="store URL (default: a temp folder)")
    ap.add_argument("--out", default=str(ROOT / "bench/results/download.json"))
    args = ap.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        store = args.store or f"{tmp}/store"
        corpus = synth_corpus(Path(tmp) / "corpus", args.mb)
        rows = []
        for label, mode, arg, name in [
            ("download stdlib", "download", "stdlib", f"std-{time.time_ns()}"),
            (f"download {args.mb} MB jsonl.zst", "download", str(corpus), f"synth-{time.time_ns()}"),
        ]:
            r = child(mode, store, arg, name)
            rows.append({"step": label, **r})
            r = child("read", store, name)
            rows.append({"step": f"read back ({label.split()[1]})", **r})

    print(f"{'step':<32} {'docs':>9} {'MB text':>9} {'s':>7} {'MB/s':>8} {'peak RSS MB':>12}")
    for r in rows:
        r["mb_per_s"] = r["text_bytes"] / 1e6 / r["seconds"]
        print(f"{r['step']:<32} {r['docs']:>9,} {r['text_bytes'] / 1e6:>9.1f} {r['seconds']:>7.2f} "
              f"{r['mb_per_s']:>8.1f} {r['peak_rss'] / 1e6:>12.0f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": f"{os.cpu_count()} cores", "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
