"""Peak memory of ``blt-data download`` on a single huge line (issue 14, README limits).

A .jsonl holding a few small documents and one document of ``--mb`` MB of text is downloaded in
a child process (so its peak RSS is its own). Kinds of text: ``ascii``; ``brackets`` (every
line full of ``[`` and ``{`` inside the string, so the nesting scan runs over the whole line);
``utf8`` (3-byte characters). Prints a table and writes bench/results/huge_line.json.

    .venv/bin/python bench/huge_line.py [--mb 200] [--kinds ascii,brackets,utf8]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_data.download import DownloadConfig, download
src, store = sys.argv[1:3]
t = time.perf_counter()
m = download(Registry(Store.open(store)), DownloadConfig(source=src, name="huge"))
secs = time.perf_counter() - t
rss = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"docs": m.stats.documents, "quarantined": m.stats.quarantined, "text_bytes": m.stats.bytes,
                  "seconds": secs, "peak_rss": rss}))
"""

BASELINE = "import blt_data.download, sys; print(next(int(l.split()[1]) * 1024 for l in open('/proc/self/status') if l.startswith('VmHWM:')))"


def write_source(path: Path, mb: int, kind: str) -> None:
    unit = {"ascii": "byte latent transformer ", "brackets": "[{x}] ", "utf8": "日本語のテキスト"}[kind]
    n = mb * 10**6 // len(unit.encode())
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps({"id": "small-1", "text": "before"}) + "\n")
        f.write('{"id": "huge", "text": "')
        chunk = unit * 10_000
        for _ in range(n // 10_000):
            f.write(chunk)
        f.write(unit * (n % 10_000))
        f.write('"}\n')
        f.write(json.dumps({"id": "small-2", "text": "after"}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--kinds", default="ascii,brackets,utf8")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    baseline = int(subprocess.run([sys.executable, "-c", BASELINE], env=env, capture_output=True, text=True, check=True).stdout)
    rows = []
    for kind in args.kinds.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            src = Path(tmp) / f"{kind}.jsonl"
            write_source(src, args.mb, kind)
            out = subprocess.run([sys.executable, "-c", CHILD, str(src), f"{tmp}/store"], env=env,
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r.update(kind=kind, line_mb=src.stat().st_size / 1e6)
            rows.append(r)
    print(f"baseline (python + imports): {baseline / 2**20:.0f} MiB")
    print(f"{'text':<10}{'line MB':>10}{'docs':>6}{'peak RSS MiB':>14}{'x line':>8}{'seconds':>9}")
    for r in rows:
        print(f"{r['kind']:<10}{r['line_mb']:>10.0f}{r['docs']:>6}{r['peak_rss'] / 2**20:>14.0f}"
              f"{(r['peak_rss'] - baseline) / (r['line_mb'] * 1e6):>8.1f}{r['seconds']:>9.1f}")
    results = ROOT / "bench" / "results"
    results.mkdir(parents=True, exist_ok=True)
    (results / "huge_line.json").write_text(json.dumps({"baseline_rss": baseline, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
