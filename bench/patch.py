"""Patch job throughput: end-to-end `blt-data patch` against the bare scoring throughput of the
same model, measured in one run, plus how the job scales with actors and with input size.

    python bench/patch.py                                   # CPU, shipped model, ~4 min on 2 cores
    python bench/patch.py --base-kb 64 --skip-command       # a quick look
    python bench/patch.py --device cuda --model paper       # one GPU, paper-sized random model, bf16

Rows of the table (MB/s of document bytes):
  bare          score_entropies in this process on the documents held in memory: no store, no
                Ray, no Parquet, every core's threads (the ceiling the job is measured against)
  command       `blt-data patch` as a subprocess on the largest input: starts its own local Ray,
                reads the input from the store, scores in actors, writes parts and commits
  job           run_patch_job on a Ray already started (as on a cluster): actor start and
                model load, reading, scoring, Parquet writing, records, commit
Documents: Python stdlib sources cut to --max-doc-kb, cycled with fresh ids up to each size, as
a documents dataset on a local store (the input size sweep uses 1x, 4x, 16x of --base-kb).
Ray starts its workers at nice 15 (to keep the raylet responsive); on a machine shared with
other work that alone halves their share of the CPU against a bare run at nice 0. The bench
starts Ray with RAY_worker_niceness=0 so both sides compete alike. Bare scoring is measured
before and after the job runs; the ratio uses their mean, and the spread is reported.
Writes bench/results/patch.json.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

import ray
import torch

from blt_data.documents import iter_documents
from blt_data.download import DownloadConfig, download
from blt_data.entropy import score_entropies
from blt_data.patching import PatchRule
from blt_data.registry import Registry
from blt_data.storage import Store
from blt_model.entropy_model import EntropyModel, EntropyModelConfig
from blt_model.entropy_registry import load_default_entropy_model, register_entropy_model
from pipelines.patch_job import PatchJobConfig, run_patch_job

REPO = Path(__file__).resolve().parents[1]


def write_corpus(path: Path, total_bytes: int, max_doc_bytes: int, seed: int = 0) -> None:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))
    texts = [f.read_text(encoding="utf-8", errors="replace")[:max_doc_bytes] for f in files]
    texts = [t for t in texts if t]
    random.Random(seed).shuffle(texts)
    written = i = 0
    with open(path, "w") as f:
        while written < total_bytes:
            text = texts[i % len(texts)]
            f.write(json.dumps({"id": f"doc-{i}", "text": text}) + "\n")
            written += len(text.encode())
            i += 1


def make_docs(reg: Registry, tmp: Path, name: str, total_bytes: int, max_doc_bytes: int):
    path = tmp / f"{name}.jsonl"
    write_corpus(path, total_bytes, max_doc_bytes)
    return download(reg, DownloadConfig(source=str(path), name=name, part_bytes=4 * 10**6))


def load_model(reg: Registry, name: str, device: str):
    """The model and its registry reference ('default' for the shipped one)."""
    if name == "default":
        return load_default_entropy_model(device), "default"
    torch.manual_seed(0)
    config = EntropyModelConfig() if name == "paper" else EntropyModelConfig(dim=128, n_layers=4, n_heads=4, window=64, max_seqlen=1024)
    model = EntropyModel(config).eval()
    m = register_entropy_model(reg, model, f"bench-{name}", job_id=f"bench-{name}", parents=[], params={"random_init": True})
    return model.to(device), m.ref


class GpuSampler:
    """nvidia-smi utilisation samples every 0.5 s while running (GPU runs only)."""

    def __init__(self, enabled: bool):
        self.enabled, self.samples, self._stop = enabled, [], threading.Event()

    def __enter__(self):
        if self.enabled:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            try:
                out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                     capture_output=True, text=True, timeout=5).stdout
                self.samples.append(float(out.split()[0]))
            except (OSError, ValueError, IndexError, subprocess.SubprocessError):
                return
            time.sleep(0.5)

    def __exit__(self, *exc):
        self._stop.set()

    @property
    def mean(self):
        return sum(self.samples) / len(self.samples) if self.samples else None


def bare(model, texts, args, dtype) -> dict:
    torch.set_num_threads(args.threads)
    list(score_entropies(model, texts[:4], row_len=args.row_len, batch_rows=args.batch_rows, device=args.device, dtype=dtype))
    start = time.perf_counter()
    n = sum(e.size for e in score_entropies(model, texts, row_len=args.row_len, batch_rows=args.batch_rows, device=args.device, dtype=dtype))
    seconds = time.perf_counter() - start
    return {"bytes": n, "seconds": seconds, "mb_per_s": n / seconds / 1e6}


def job_config(args, docs: str, out: str, workers: int, model_ref: str) -> PatchJobConfig:
    gpu = args.device == "cuda"
    return PatchJobConfig(
        docs=docs, name=out, model=model_ref, rule=PatchRule(threshold=args.threshold), unit_bytes=args.unit_kb * 1000,
        workers=workers, gpus_per_worker=(1 / workers if gpu else 0),
        cpus_per_worker=args.threads / workers, threads_per_worker=max(1, args.threads // workers),
        row_len=args.row_len, batch_rows=args.batch_rows,
    )


def job(reg: Registry, cfg: PatchJobConfig, num_bytes: int, gpu: bool) -> dict:
    with GpuSampler(gpu) as sampler:
        start = time.perf_counter()
        m = run_patch_job(reg, cfg)
        seconds = time.perf_counter() - start
    return {"workers": cfg.workers, "bytes": num_bytes, "units": len(m.parts), "seconds": seconds,
            "mb_per_s": num_bytes / seconds / 1e6, "gpu_util_mean": sampler.mean}


def command(store: str, docs: str, num_bytes: int, args, model_ref: str) -> dict:
    cmd = [sys.executable, "-m", "cli.blt_data", "patch", docs, "--name", "cmd-out", "--model", model_ref,
           "--threshold", str(args.threshold), "--unit-size", str(args.unit_kb * 1000), "--workers", "1",
           "--gpus-per-worker", "1" if args.device == "cuda" else "0", "--store", store, "-q",
           f"cpus_per_worker={args.threads}", f"threads_per_worker={args.threads}", f"batch_rows={args.batch_rows}"]
    if args.row_len:
        cmd.append(f"row_len={args.row_len}")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    start = time.perf_counter()
    subprocess.run(cmd, cwd=REPO, env=env, check=True, capture_output=True)
    seconds = time.perf_counter() - start
    return {"bytes": num_bytes, "seconds": seconds, "mb_per_s": num_bytes / seconds / 1e6}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--model", default="default", help="default (shipped) | tiny | paper (random weights)")
    parser.add_argument("--base-kb", type=int, default=256, help="input size 1x (KB of document bytes)")
    parser.add_argument("--unit-kb", type=int, default=64, help="unit size of the job")
    parser.add_argument("--max-doc-kb", type=int, default=16)
    parser.add_argument("--threshold", type=float, default=2.5)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="CPU threads in all (bare; split among actors)")
    parser.add_argument("--row-len", type=int, default=None)
    parser.add_argument("--batch-rows", type=int, default=None, help="default: 2 on CPU, 8 on CUDA")
    parser.add_argument("--workers", default=None, help="actor counts to sweep, e.g. 1,2,4 (default: 1,2,4 on CPU, 1,2 on CUDA)")
    parser.add_argument("--skip-command", action="store_true", help="skip the subprocess `blt-data patch` run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "patch.json"))
    args = parser.parse_args()
    args.batch_rows = args.batch_rows or (8 if args.device == "cuda" else 2)
    workers = [int(w) for w in (args.workers or ("1,2" if args.device == "cuda" else "1,2,4")).split(",")]
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    gpu = args.device == "cuda"

    tmp = Path(tempfile.mkdtemp(prefix="bench-patch-"))
    store = str(tmp / "store")
    reg = Registry(Store.open(store))
    model, model_ref = load_model(reg, args.model, args.device)
    sizes = {f"{k}x": make_docs(reg, tmp, f"docs-{k}x", k * args.base_kb * 1000, args.max_doc_kb * 1000) for k in (1, 4, 16)}

    texts = [d["text"] for d in iter_documents(reg, sizes["4x"])]
    result = {"device": torch.cuda.get_device_name() if gpu else f"cpu, {args.threads} threads", "model": args.model,
              "torch": torch.__version__, "ray": ray.__version__, "args": vars(args)}
    os.environ["RAY_worker_niceness"] = "0"  # read by the raylet that ray.init starts (see above)
    first_bare = bare(model, texts, args, dtype)
    if not args.skip_command:
        result["command"] = command(store, "docs-16x", sizes["16x"].stats.bytes, args, model_ref)
    ray.init(num_cpus=max(4, os.cpu_count() or 1), include_dashboard=False, log_to_driver=False)
    result["actors"] = [job(reg, job_config(args, "docs-4x", f"out-4x-w{w}", w, model_ref), sizes["4x"].stats.bytes, gpu) for w in workers]
    result["sizes"] = []
    for tag, docs in sizes.items():
        if tag == "4x" and 1 in workers:
            r = dict(result["actors"][workers.index(1)])
        else:
            r = job(reg, job_config(args, docs.name, f"out-{tag}-w1", 1, model_ref), docs.stats.bytes, gpu)
        result["sizes"].append({"size": tag, **r})
    ray.shutdown()
    last_bare = bare(model, texts, args, dtype)
    result["bare"] = {
        "bytes": first_bare["bytes"], "seconds": (first_bare["seconds"] + last_bare["seconds"]) / 2,
        "mb_per_s": (first_bare["mb_per_s"] + last_bare["mb_per_s"]) / 2,
        "mb_per_s_before": first_bare["mb_per_s"], "mb_per_s_after": last_bare["mb_per_s"],
    }
    bare_mb = result["bare"]["mb_per_s"]
    if "command" in result:
        result["command"]["ratio_to_bare"] = result["command"]["mb_per_s"] / bare_mb
    for r in result["actors"] + result["sizes"]:
        r["ratio_to_bare"] = r["mb_per_s"] / bare_mb

    print(f"\npatch job, {result['device']}, model {args.model}, unit {args.unit_kb} KB, batch_rows {args.batch_rows}")
    print(f"{'run':<28} {'MB':>8} {'s':>8} {'MB/s':>9} {'/ bare':>7} {'GPU %':>6}")
    print(f"{'bare scoring (4x)':<28} {result['bare']['bytes'] / 1e6:>8.2f} {result['bare']['seconds']:>8.1f} {bare_mb:>9.4f} {1:>7.2f}"
          f"   (before {first_bare['mb_per_s']:.4f}, after {last_bare['mb_per_s']:.4f})")
    if "command" in result:
        c = result["command"]
        print(f"{'blt-data patch (16x, 1 actor)':<28} {c['bytes'] / 1e6:>8.2f} {c['seconds']:>8.1f} {c['mb_per_s']:>9.4f} {c['ratio_to_bare']:>7.2f}")
    for r in result["actors"]:
        gpu_util = f"{r['gpu_util_mean']:.0f}" if r["gpu_util_mean"] is not None else "-"
        print(f"{'job 4x, ' + str(r['workers']) + ' actor(s)':<28} {r['bytes'] / 1e6:>8.2f} {r['seconds']:>8.1f} {r['mb_per_s']:>9.4f} {r['ratio_to_bare']:>7.2f} {gpu_util:>6}")
    for r in result["sizes"]:
        gpu_util = f"{r['gpu_util_mean']:.0f}" if r["gpu_util_mean"] is not None else "-"
        print(f"{'job ' + r['size'] + ', 1 actor':<28} {r['bytes'] / 1e6:>8.2f} {r['seconds']:>8.1f} {r['mb_per_s']:>9.4f} {r['ratio_to_bare']:>7.2f} {gpu_util:>6}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
