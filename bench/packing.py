"""Packing efficiency of entropy scoring: the fraction of computed token positions that are new
document bytes. The packer alone decides it, so no forward pass runs and no GPU is needed.

    python bench/packing.py                                  # paper + default on anchor + stdlib
    python bench/packing.py --model paper --corpus anchor --mb 64
    python bench/packing.py --model my.yaml --corpus docs.jsonl --row-len 16384

Computed positions are every token of every row a forward pass reads: new bytes, context
re-read at cuts (carry off) and padding. Documents are scored in units of `--unit-mb` of text
each (one `score_entropies` call per unit, as the patch job does), so each unit ends with a
ragged tail.

Paths on the same documents:
  ours   blt_data.entropy.pack_batches with the model's context and the given row shape,
         with keys/values carried across batches (`carry`) and without (`reread` context);
         `long`: the alternative to carry, re-read context in one row of --long-rows rows'
         tokens (O(S*W) attention makes long rows cost no more per token)
  meta   Meta's per-document path (bytelatent/preprocess/preprocess_entropies.py ->
         calculate_entropies): each document's n + 2 tokens (BOS, bytes, EOS) padded up to a
         multiple of max_seqlen, rows scored independently

Corpora:
  anchor  the anchor's length distribution: 97% lognormal (median 2,048 B, sigma 0.9), 3%
          uniform 20-50 KB; the text is consecutive slices of the Python stdlib's sources
  stdlib  the stdlib's .py files, whole, one document each (what `blt-data download stdlib` reads)
  PATH    a .txt file (one document) or a .jsonl / .jsonl.zst file of {"text": ...} lines

Prints a table, writes bench/results/packing.json.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from blt_data.download import _stdlib_source
from blt_data.entropy import pack_batches
from blt_model.entropy_model import EntropyModel
from blt_model.train_entropy import build_train_entropy_config


def stdlib_sources() -> list[Path]:
    """The files `blt-data download stdlib` reads (site-packages left out)."""
    return [Path(f) for f in _stdlib_source().files]


def anchor_documents(total_bytes: int, seed: int = 0) -> list[bytes]:
    """Documents with the anchor corpus's length distribution, cut from real text."""
    rng = np.random.default_rng(seed)
    lengths: list[int] = []
    total = 0
    while total < total_bytes:
        if rng.random() < 0.03:
            n = int(rng.integers(20_000, 50_001))
        else:
            n = max(1, int(rng.lognormal(np.log(2048), 0.9)))
        lengths.append(n)
        total += n
    text = b"".join(p.read_bytes() for p in stdlib_sources())
    docs, offset = [], 0
    for n in lengths:
        if offset + n > len(text):
            offset = 0
        docs.append(text[offset : offset + n])
        offset += n
    return docs


def stdlib_documents() -> list[bytes]:
    docs = [p.read_bytes() for p in stdlib_sources()]
    return [d for d in docs if _utf8(d)]  # the download step quarantines the others


def _utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def file_documents(path: str) -> list[bytes]:
    if path.endswith(".txt"):
        return [Path(path).read_bytes()]
    raw = Path(path).read_bytes()
    if path.endswith(".zst"):
        import zstandard

        raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(raw)).read()
    return [json.loads(line)["text"].encode("utf-8") for line in raw.splitlines() if line.strip()]


def corpus_documents(name: str, mb: float) -> list[bytes]:
    if name == "anchor":
        return anchor_documents(int(mb * 1e6))
    if name == "stdlib":
        return stdlib_documents()
    return file_documents(name)


def units(docs: list[bytes], unit_bytes: int) -> Iterator[list[bytes]]:
    """Consecutive documents, about `unit_bytes` of text each (the patch job's units)."""
    unit, size = [], 0
    for doc in docs:
        unit.append(doc)
        size += len(doc)
        if size >= unit_bytes:
            yield unit
            unit, size = [], 0
    if unit:
        yield unit


def ours(docs, config, row_len, batch_rows, unit_bytes, carry) -> dict:
    counts = dict(positions=0, new=0, pad=0, batches=0)
    for unit in units(docs, unit_bytes):
        for batch in pack_batches(
            unit,
            context_tokens=EntropyModel.context_tokens_of(config),
            row_len=row_len,
            batch_rows=batch_rows,
            carry=config.window if carry else None,
        ):
            counts["positions"] += batch.num_tokens
            counts["new"] += batch.output_index.numel()
            counts["pad"] += int((batch.doc_ids.numpy() < 0).sum())
            counts["batches"] += 1
    counts["context"] = counts["positions"] - counts["new"] - counts["pad"]
    return counts


def meta(docs, max_seqlen) -> dict:
    tokens = np.array([len(d) + 2 for d in docs], dtype=np.int64)  # BOS + bytes + EOS
    positions = int((-(-tokens // max_seqlen) * max_seqlen).sum())
    new = int(tokens.sum()) - 2 * len(docs)
    pad = positions - int(tokens.sum())
    # patching_batch_size = 32 rows in preprocess_entropies.py (the batch shape changes nothing here)
    return dict(positions=positions, new=new, pad=pad, context=0, row_len=max_seqlen, batch_rows=32)


def fractions(counts: dict) -> dict:
    total = counts["positions"]
    return {
        **counts,
        "new_fraction": counts["new"] / total,
        "context_fraction": counts["context"] / total,
        "pad_fraction": counts["pad"] / total,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", action="append", help="entropy preset name or YAML (repeat); default: paper, default")
    parser.add_argument("--corpus", action="append", help="anchor | stdlib | PATH (repeat); default: anchor, stdlib")
    parser.add_argument("--mb", type=float, default=64.0, help="size of the anchor corpus, MB")
    parser.add_argument("--unit-mb", type=float, default=16.0, help="text per scoring call, MB")
    parser.add_argument("--row-len", type=int, default=None, help="default: the model's max_seqlen")
    parser.add_argument("--batch-rows", type=int, default=8)
    parser.add_argument("--long-rows", type=int, default=32, help="rows per long row (path `long`)")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "packing.json"))
    args = parser.parse_args()

    results = []
    corpora = {name: corpus_documents(name, args.mb) for name in args.corpus or ["anchor", "stdlib"]}
    for model_name in args.model or ["paper", "default"]:
        config = build_train_entropy_config(model_name, []).model
        context_tokens = EntropyModel.context_tokens_of(config)
        row_len = args.row_len or config.max_seqlen
        for corpus, docs in corpora.items():
            lengths = np.array([len(d) for d in docs])
            result = {
                "model": model_name,
                "config": config.model_dump(),
                "context_tokens": context_tokens,
                "row_len": row_len,
                "batch_rows": args.batch_rows,
                "unit_bytes": int(args.unit_mb * 1e6),
                "corpus": corpus,
                "documents": len(docs),
                "bytes": int(lengths.sum()),
                "median_bytes": float(np.median(lengths)),
                "mean_bytes": float(lengths.mean()),
            }
            paths = {
                "ours_carry": (row_len, args.batch_rows, True),
                "ours_reread": (row_len, args.batch_rows, False),
                "ours_long": (row_len * args.long_rows, 1, False),
            }
            for path, (length, rows, carry) in paths.items():
                start = time.perf_counter()
                counts = ours(docs, config, length, rows, result["unit_bytes"], carry)
                counts["pack_seconds"] = time.perf_counter() - start
                result[path] = fractions(counts) | {"row_len": length, "batch_rows": rows}
            result["meta"] = fractions(meta(docs, config.max_seqlen))
            results.append(result)

    header = f"{'model':<8} {'corpus':<8} {'docs':>7} {'MB':>7} {'rows':>12} {'path':<7} {'new':>6} {'context':>8} {'pad':>6}"
    print(header)
    print("-" * len(header))
    for r in results:
        for path in ("ours_carry", "ours_reread", "ours_long", "meta"):
            f = r[path]
            shape = f"{f.get('batch_rows', 1)}x{f.get('row_len', r['config']['max_seqlen'])}"
            print(
                f"{r['model']:<8} {Path(r['corpus']).name[:8]:<8} {r['documents']:>7} "
                f"{r['bytes'] / 1e6:>7.1f} {shape:>12} {path.removeprefix('ours_'):<7} "
                f"{f['new_fraction']:>6.3f} {f['context_fraction']:>8.3f} {f['pad_fraction']:>6.3f}"
            )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
