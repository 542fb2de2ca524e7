"""Storage of a patches dataset, column by column: what each column costs per byte of text, and so
what `--no-entropies` saves. Read from the Parquet footers (each column chunk's compressed size),
so nothing is decompressed and the numbers are exact for the dataset given.

    python bench/storage.py stdlib-patches --store ./blt-store      # e.g. after `make demo`

Prints a table, writes bench/results/storage.json. The `--no-entropies` saving is the entropies
and eos_entropy columns' share (a part written without them has the other columns unchanged).
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq

from blt_data.registry import Registry
from blt_data.storage import Store


def column_bytes(registry: Registry, ref: str) -> tuple[dict, int, int]:
    """(compressed bytes per top-level column, text bytes, part bytes) over every part."""
    manifest = registry.resolve(ref, kind="patches")
    sizes: Counter[str] = Counter()
    for part in manifest.parts:
        with registry.store.open_input(registry.part_path(manifest, part)) as f:
            meta = pq.ParquetFile(f).metadata
        for g in range(meta.num_row_groups):
            group = meta.row_group(g)
            for c in range(group.num_columns):
                col = group.column(c)
                sizes[col.path_in_schema.split(".")[0]] += col.total_compressed_size
    return dict(sizes), manifest.stats.bytes, sum(p.bytes for p in manifest.parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dataset", help="a patches dataset with entropies: NAME or NAME@vN")
    ap.add_argument("--store", default="./blt-store")
    ap.add_argument("--out", default="bench/results/storage.json")
    args = ap.parse_args()

    sizes, text, total = column_bytes(Registry(Store.open(args.store)), args.dataset)
    entropy = sizes.get("entropies", 0) + sizes.get("eos_entropy", 0)
    rows = [(name, n, n / text) for name, n in sorted(sizes.items(), key=lambda kv: -kv[1])]
    print(f"{args.dataset}: {text:,} bytes of text in {total:,} bytes of Parquet ({total / text:.3f} B per byte of text)")
    print(f"{'column':<16}{'bytes':>14}{'B per text byte':>18}")
    for name, n, per in rows:
        print(f"{name:<16}{n:>14,}{per:>18.3f}")
    print(f"--no-entropies saves {entropy:,} bytes: {entropy / total:.1%} of the dataset, "
          f"{entropy / text:.3f} B per byte of text (float16 holds 2.000 before compression)")
    out = {"dataset": args.dataset, "text_bytes": text, "parquet_bytes": total,
           "columns": {name: {"bytes": n, "per_text_byte": per} for name, n, per in rows},
           "no_entropies_saves_bytes": entropy, "no_entropies_saves_fraction": entropy / total}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
