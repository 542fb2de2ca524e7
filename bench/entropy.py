"""Entropy scoring throughput: `score_entropies` on a mix of real documents vs the bare forward
of the same model on full rows (one document per row, nothing packed, no context re-read).

    python bench/entropy.py --device cpu --model default --seconds 20
    python bench/entropy.py --device cpu --model tiny --seconds 20
    python bench/entropy.py --device cuda --model paper --dtype bf16

Prints a table and writes bench/results/entropy.json. Documents are the Python stdlib's sources
(sizes from a few hundred bytes to a few hundred KB), shuffled with a fixed seed, cycled.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import resource
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

from blt_data.entropy import entropies_from_hidden, pack_batches, score_entropies
from blt_model.entropy_model import EntropyModel, EntropyModelConfig, load_entropy_model
from blt_model.entropy_registry import DEFAULT_MODEL, load_default_entropy_model

PRESETS = {
    "tiny": EntropyModelConfig(dim=128, n_layers=4, n_heads=4, window=64, max_seqlen=1024),
    "paper": EntropyModelConfig(),  # dim 768, 14 layers, 12 heads, window 512, rows of 8192
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def stdlib_documents(max_bytes: int, seed: int = 0) -> list[str]:
    """Stdlib sources cut to `max_bytes` characters: a few giant files would otherwise make
    the document the unit of timing."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    docs = [p.read_text(encoding="utf-8", errors="replace")[:max_bytes] for p in paths]
    random.Random(seed).shuffle(docs)
    return docs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def packing_counts(model, docs, row_len, batch_rows, carry=True) -> np.ndarray:
    """[row tokens, pad tokens, kept tokens] of packing `docs`."""
    counts = np.zeros(3, dtype=np.int64)
    for batch in pack_batches(
        docs,
        context_tokens=model.context_tokens,
        row_len=row_len,
        batch_rows=batch_rows,
        carry=model.window if carry else None,
    ):
        counts += [batch.num_tokens, batch.num_pad_tokens, batch.output_index.numel()]
    return counts


def bench(model, docs, row_len, batch_rows, device, dtype, seconds, rounds=4, carry=True) -> dict:
    """Scoring and the bare forward, measured in alternating slices so that load from other
    processes hits both alike."""
    scored = score_entropies(
        model,
        itertools.cycle(docs),
        row_len=row_len,
        batch_rows=batch_rows,
        device=device,
        dtype=dtype,
        carry=carry,
    )
    tokens = torch.randint(4, 260, (batch_rows, row_len), device=device)
    doc_ids = torch.zeros_like(tokens)
    positions = torch.arange(row_len, device=device).expand_as(tokens)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)

    def bare_step():
        with torch.inference_mode(), autocast:
            hidden = model.hidden(tokens, doc_ids, positions)
            return entropies_from_hidden(model.output, hidden.flatten(0, 1))

    # Warm-up: allocations, kernel selection, flex compilation.
    num_warmup_docs = 4
    for _ in range(num_warmup_docs):
        next(scored)
    bare_step()
    synchronize(device)

    num_docs = num_bytes = bare_steps = 0
    scoring_s = bare_s = 0.0
    for _ in range(rounds):
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            num_bytes += len(next(scored))
            num_docs += 1
        synchronize(device)
        scoring_s += time.perf_counter() - start
        start = time.perf_counter()
        while time.perf_counter() - start < seconds / rounds:
            bare_step()
            bare_steps += 1
        synchronize(device)
        bare_s += time.perf_counter() - start
    scored.close()

    # Packing of all documents read as one stream (warm-up included): padding is then only the
    # tails of the last rows; context re-reads (without carry) are what cuts at row edges cost.
    read = itertools.islice(itertools.cycle(docs), num_warmup_docs + num_docs)
    total, pad, kept = packing_counts(model, read, row_len, batch_rows, carry)
    scoring = {
        "documents": num_docs,
        "bytes": num_bytes,
        "seconds": scoring_s,
        "bytes_per_s": num_bytes / scoring_s,
        "row_tokens_per_s": num_bytes / scoring_s * total / kept,
        "pad_fraction": pad / total,
        "context_fraction": (total - pad - kept) / total,
    }
    bare = {"steps": bare_steps, "seconds": bare_s}
    bare["bytes_per_s"] = bare_steps * tokens.numel() / bare_s
    return {"scoring": scoring, "bare_forward": bare}


def matmul_peak_flops(
    device: torch.device, dtype: torch.dtype, n: int = 8192, reps: int = 20
) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    synchronize(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def forward_flops_per_token(config: EntropyModelConfig, row_len: int) -> float:
    """Matmul FLOPs of one token's forward incl. the entropy head; attention counts the keys a
    token really sees (min(position + 1, window)) averaged over a row."""
    model = EntropyModel(config)
    params = sum(p.numel() for n, p in model.named_parameters() if "tok_embeddings" not in n)
    mean_keys = float(np.minimum(np.arange(row_len) + 1, config.window).mean())
    return 2 * params + 4 * config.n_layers * config.dim * mean_keys


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="tiny", help="tiny | paper | default (the shipped model) | a saved model directory")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU"
    )
    parser.add_argument("--seconds", type=float, default=20.0, help="per side (scoring, bare)")
    parser.add_argument("--row-len", type=int, default=None, help="default: the model's max_seqlen")
    parser.add_argument("--batch-rows", type=int, default=None, help="default: 8 on CUDA, 2 on CPU")
    parser.add_argument("--max-doc-bytes", type=int, default=16384, help="cut longer documents")
    parser.add_argument(
        "--no-carry", action="store_true", help="re-read context at cuts instead of carrying keys/values"
    )
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "entropy.json"))
    args = parser.parse_args()

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    if args.model in PRESETS:
        torch.manual_seed(0)
        model = EntropyModel(PRESETS[args.model]).eval()
    elif args.model == DEFAULT_MODEL:
        model = load_default_entropy_model()
    else:
        model = load_entropy_model(args.model)
    model.to(device)
    config = model.config
    row_len = args.row_len or config.max_seqlen
    batch_rows = args.batch_rows or (8 if device.type == "cuda" else 2)
    docs = stdlib_documents(args.max_doc_bytes)

    carry = not args.no_carry
    measured = bench(model, docs, row_len, batch_rows, device, dtype, args.seconds, carry=carry)
    scoring, bare = measured["scoring"], measured["bare_forward"]
    lengths = np.array([len(d.encode("utf-8")) for d in docs])
    result = {
        "documents_mean_bytes": float(lengths.mean()),
        "documents_median_bytes": float(np.median(lengths)),
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu x{torch.get_num_threads()} threads",
        "torch": torch.__version__,
        "model": args.model,
        "config": config.model_dump(),
        "dtype": str(dtype).removeprefix("torch."),
        "row_len": row_len,
        "batch_rows": batch_rows,
        "context_tokens": model.context_tokens,
        "carry": carry,
        "scoring": scoring,
        "bare_forward": bare,
        "scoring_over_bare": scoring["bytes_per_s"] / bare["bytes_per_s"],
        "peak_memory_bytes": peak_memory_bytes(device),
    }
    if device.type == "cuda":
        peak = matmul_peak_flops(device, torch.bfloat16)
        flops = forward_flops_per_token(config, row_len)
        result["matmul_peak_flops"] = peak
        result["mfu_bare_forward"] = flops * bare["bytes_per_s"] / peak
        result["mfu_scoring_row_tokens"] = flops * scoring["row_tokens_per_s"] / peak

    rows = [
        ("device", result["device"]),
        (
            "model / dtype",
            f"{args.model} ({config.dim}d x {config.n_layers}L, window {config.window})"
            f" / {result['dtype']}",
        ),
        (
            "rows",
            f"{batch_rows} x {row_len} tokens, "
            + (f"keys/values carried ({config.window})" if carry else f"context re-read {model.context_tokens}"),
        ),
        (
            "documents",
            f"stdlib sources, mean {lengths.mean():.0f} B, median {np.median(lengths):.0f} B",
        ),
        (
            "score_entropies",
            f"{scoring['bytes_per_s'] / 1e3:10.1f} KB/s  "
            f"({scoring['documents']} docs, {scoring['bytes'] / 1e6:.2f} MB)",
        ),
        ("bare forward", f"{bare['bytes_per_s'] / 1e3:10.1f} KB/s"),
        ("scoring / bare", f"{result['scoring_over_bare']:10.3f}"),
        ("padding fraction", f"{scoring['pad_fraction']:10.4f}"),
        ("context fraction", f"{scoring['context_fraction']:10.4f}"),
        ("peak memory", f"{result['peak_memory_bytes'] / 2**20:10.0f} MiB"),
    ]
    if device.type == "cuda":
        rows += [
            ("bf16 matmul peak", f"{result['matmul_peak_flops'] / 1e12:10.0f} TFLOP/s"),
            (
                "MFU bare / scoring",
                f"{result['mfu_bare_forward']:.3f} / {result['mfu_scoring_row_tokens']:.3f}",
            ),
        ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
