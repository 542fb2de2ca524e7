"""BLT training throughput, the reader against what the trainer consumes, and the patching study.

    python bench/train.py --device cuda --preset 100m        # one H100: bytes/s, MFU, peak memory
    python bench/train.py --device cpu --preset small        # this kind of machine (a few minutes)
    python bench/train.py --study [--quick] --store ./blt-store   # bench/study.py (hours; --quick: minutes)

Rows:
  trainer   forward + backward + AdamW steps of a BLT preset in one process (bf16 autocast and
            compiled blocks on CUDA, fp32 on CPU) on rows of stdlib bytes with patches of mean
            --patch-size bytes; bytes/s after --warmup steps, MFU against the GPU's bf16 peak,
            peak memory. No reader: the model alone.
  reader    `blt_data.reader.Reader` packing the same rows from a patches dataset on a local store
            (Parquet parts written with the patch job's own writers), bytes/s with the consumer
            doing nothing; ratio = reader / trainer (target >= 20x).
  study     (--study) entropy vs static vs space patches, 3 seeds each, equal bytes: every other
            option goes to bench/study.py (see its docstring).
Writes bench/results/train.json (bench/study.py writes study.json).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from blt_data.patches import arrow_schema_summary, build_table, part_name, write_part
from blt_data.patching import PatchRule, patch_lengths_arrow
from blt_data.reader import Reader, ReaderConfig
from blt_data.registry import Manifest, Registry
from blt_data.stats import DatasetStats
from blt_data.storage import Store
from blt_model.blt import BLT, byte_loss, load_blt_preset
from blt_model.optim import adamw
from blt_model.parallelize import ParallelConfig, parallelize_blt
from blt_model.distributed import Distributed

REPO = Path(__file__).resolve().parents[1]


def stdlib_texts(max_bytes: int, seed: int = 0) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    random.Random(seed).shuffle(files)
    texts, total = [], 0
    for f in files:
        if total >= max_bytes:
            break
        t = f.read_text(encoding="utf-8", errors="replace")
        if t:
            texts.append(t)
            total += len(t.encode())
    return texts


def patches_dataset(reg: Registry, texts: list[str], patch_size: int, name: str = "bench") -> Manifest:
    """A patches dataset (static patches, no entropies) written with the patch job's writers."""
    cfg = PatchRule(scheme="static", patch_size=patch_size)
    job, infos, stats = "bench", [], DatasetStats()
    for index, chunk in enumerate(np.array_split(np.arange(len(texts)), max(1, len(texts) // 200))):
        text = pa.array([texts[i] for i in chunk], pa.large_string())
        lengths = patch_lengths_arrow(text, None, cfg)
        table = build_table([f"d{i}" for i in chunk], text, lengths, None)
        infos.append(write_part(reg.store, f"{reg.job_dir(name, job)}/{part_name(index)}", f"_jobs/{job}/{part_name(index)}",
                                table, dataset=name, job_id=job))
        stats = stats + DatasetStats.of(lengths, None)
    return reg.commit(Manifest(name=name, kind="patches", job_id=job, arrow_schema=arrow_schema_summary(False),
                               parts=infos, stats=stats.model_copy(update={"splits": {"train": len(texts)}})))


def measure_reader(reg: Registry, name: str, seq_len: int, batch_size: int, max_batches: int) -> dict:
    cfg = ReaderConfig(dataset=name, seq_len=seq_len, batch_size=batch_size, block_documents=64, epochs=1)
    n_bytes, start, batches = 0, time.perf_counter(), 0
    for batch, _ in Reader(cfg, reg):
        n_bytes += batch["n_bytes"]
        batches += 1
        if batches >= max_batches:
            break
    seconds = time.perf_counter() - start
    return {"bytes_per_s": n_bytes / seconds, "batches": batches, "seconds": seconds}


def measure_trainer(args, reg: Registry, name: str) -> dict:
    device = torch.device(args.device)
    cfg = load_blt_preset(args.preset)
    torch.manual_seed(0)
    model = BLT(cfg).to(device)
    env = Distributed(0, 1, device)
    model = parallelize_blt(model, env, ParallelConfig(compile=device.type == "cuda" and not args.no_compile), bf16=device.type == "cuda")
    optimizer = adamw(model, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    rcfg = ReaderConfig(dataset=name, seq_len=args.seq_len, batch_size=args.batch_size, block_documents=64,
                        patches_multiple=256 if device.type == "cuda" else 1)
    batches = iter(Reader(rcfg, reg))
    bf16 = device.type == "cuda"
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timed_bytes = timed_patches = 0
    start = None
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
        batch, _ = next(batches)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(batch["tokens"].to(device), batch["patch_lengths"].to(device), batch["doc_ids"].to(device))
        loss, _, _ = byte_loss(logits, batch["targets"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step >= args.warmup:
            timed_bytes += batch["n_bytes"]
            timed_patches += batch["n_patches"]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    bytes_per_s = timed_bytes / seconds
    mean_patch = timed_bytes / max(timed_patches, 1)
    out = {"bytes_per_s": bytes_per_s, "params": model.num_params(), "mean_patch": mean_patch,
           "flops_per_byte": model.flops_per_byte(mean_patch, args.seq_len), "loss": loss.item()}
    if device.type == "cuda":
        peak = args.peak_tflops * 1e12
        out["mfu"] = bytes_per_s * out["flops_per_byte"] / peak
        out["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    return out


def main() -> None:
    if "--study" in sys.argv[1:]:
        sys.argv.remove("--study")
        from study import main as study_main  # bench/study.py: this script's folder is on sys.path

        return study_main()
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--preset", default=None, help="BLT preset (default: 100m on cuda, small on cpu)")
    p.add_argument("--seq-len", type=int, default=None, help="default: 8192 on cuda, 1024 on cpu")
    p.add_argument("--batch-size", type=int, default=None, help="default: 8 on cuda, 4 on cpu")
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 30 cuda / 8 cpu)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 10 cuda / 2 cpu)")
    p.add_argument("--patch-size", type=int, default=5, help="static patch size of the synthetic dataset (BOS and EOS are patches of 1, so the mean is a little under it)")
    p.add_argument("--corpus-mb", type=float, default=None, help="stdlib text in the dataset (default 30 cuda / 6 cpu)")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--study", action="store_true", help="run the patching study (bench/study.py; its options follow)")
    args = p.parse_args()
    cuda = args.device == "cuda"
    args.preset = args.preset or ("100m" if cuda else "small")
    args.seq_len = args.seq_len or (8192 if cuda else 1024)
    args.batch_size = args.batch_size or (8 if cuda else 4)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 2)
    corpus_mb = args.corpus_mb or (30 if cuda else 6)
    results: dict = {"device": torch.cuda.get_device_name() if cuda else f"cpu ({torch.get_num_threads()} threads)",
                     "preset": args.preset, "seq_len": args.seq_len, "batch_size": args.batch_size}
    args.steps = args.steps or (30 if cuda else 8)
    with tempfile.TemporaryDirectory() as tmp:
        reg = Registry(Store.open(tmp))
        texts = stdlib_texts(int(corpus_mb * 1e6))
        patches_dataset(reg, texts, args.patch_size)
        trainer = measure_trainer(args, reg, "bench")
        needed = max(300, math.ceil(trainer["bytes_per_s"] * 20 * 5 / (args.seq_len * args.batch_size)))
        reader = measure_reader(reg, "bench", args.seq_len, args.batch_size, needed)
    results.update(trainer=trainer, reader=reader, reader_over_trainer=reader["bytes_per_s"] / trainer["bytes_per_s"])
    print(f"{'what':<10} {'KB/s':>10} {'ratio':>8} {'MFU':>6} {'peak GB':>8}  notes")
    mfu = f"{trainer['mfu']:.1%}" if "mfu" in trainer else "-"
    memory = f"{trainer['peak_memory_gb']:.1f}" if "peak_memory_gb" in trainer else "-"
    print(f"{'trainer':<10} {trainer['bytes_per_s'] / 1e3:>10.1f} {'':>8} {mfu:>6} {memory:>8}  "
          f"{args.preset}: {trainer['params'] / 1e6:.1f}M params, mean patch {trainer['mean_patch']:.2f} B, "
          f"{trainer['flops_per_byte'] / 1e6:.0f} MFLOP/byte")
    print(f"{'reader':<10} {reader['bytes_per_s'] / 1e3:>10.1f} {results['reader_over_trainer']:>8.1f}x")
    out = REPO / "bench" / "results" / "train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
