"""The patching study (issue 11, item 6): entropy vs static vs space patches for the same BLT.

    python bench/study.py --store ./blt-store              # the full study: hours on 2 CPU cores
    python bench/study.py --quick --store /tmp/study-smoke # smoke check: minutes, 1 seed
    python bench/study.py --estimate                       # what the full study would take here, now
    python bench/study.py --markdown                       # the last finished study as a Markdown table
    python bench/train.py --study [the same options]       # the same program

Steps, each a registry job (download, shuffle, train-entropy, patch, blt-train), so a rerun of
the same command finds what is committed and continues with what is not; an interrupted BLT run
resumes from its last checkpoint (every `checkpoint_every` steps of the `study` train preset):

  1. the stdlib corpus, downloaded and shuffled (seed 0) into train chunks and a val split;
  2. an entropy model trained on the train split with the `study` entropy preset (~3.5M
     parameters, about an hour of CPU), its val bits per byte printed next to the shipped
     default's on the same val bytes;
  3. four patches datasets of the same documents (the chosen train chunks, >= 10 MB, and val):
     `entropy` (global threshold calibrated to a mean of `target_patch_size` = 4 bytes),
     `static` (`static_patch_size` = 4), `space`, and `static8` (about space's mean patch on this
     corpus, so space also meets a static arm of its own FLOPs per byte; any `static<N>` arm works);
  4. the `study` BLT (train preset `study`) trained on each arm with every seed: the same steps x
     batch x seq_len tokens for every arm, `steps` = 2,442 (10 M tokens, the first 84% of an epoch
     of the train split; `steps=None` trains one whole epoch); every arm holds the same documents,
     and the table reports the bytes each arm trained on; a seed sets the model initialisation and
     the reader's block order (`seed`, `data.seed`);
  5. val bits per byte of each run on the whole val split; per arm the mean, the sample standard
     deviation and the range over seeds, the paired difference to `static` (same seed), the
     measured mean patch size and FLOPs per byte (`BLT.flops_per_byte`). Entropy and static
     patches have (about) the same mean patch size and so the same FLOPs per byte; space patches
     are shorter or longer as the text has it, so that arm trains on the same bytes with
     *other* FLOPs per byte (reported, not equalised): static8 is its FLOP-matched partner.

Bits per byte, as counted here: the one count of the trainer (README, "Bits per byte"; the
targets come from `blt_data.packing`): every non-pad next token of the packed stream is a target,
so each byte, each document's EOS and the BOS that follows an EOS; that is Meta's convention
(bytelatent/eval.py, train.py). The reader, not this file, decides which targets exist; a change
there changes the count here with no edit.

Writes bench/results/study.json (study-quick.json for --quick, labelled as a smoke run) and prints
a table. Before any training it prints an estimate of the wall time of what is left, from step
times measured on this machine at that moment (on a loaded machine they are loaded too).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Annotated, Literal

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from blt_data.calibrate import MAX_SAMPLE_GROWTH
from blt_data.download import DownloadConfig, download
from blt_data.patching import PatchRule
from blt_data.reader import Reader
from blt_data.registry import Manifest, Registry
from blt_data.shuffle import chunk_parts, shuffle_documents
from blt_data.storage import Store
from blt_data.tokens import IGNORE_INDEX
from blt_model.blt import BLT, byte_loss
from blt_model.checkpoint import checkpoint_steps
from blt_model.distributed import Distributed
from blt_model.entropy_model import EntropyModel
from blt_model.entropy_registry import load_default_entropy_model, load_registered_entropy_model
from blt_model.train import TrainConfig, build_train_config, plan_job, train
from blt_model.train_entropy import (
    TrainEntropyConfig, build_train_entropy_config, document_texts, evaluate_bpb, next_byte_loss,
    plan_job as plan_entropy_job, train_entropy, validation_rows,
)
from pipelines.patch_job import PatchJobConfig, plan_patch_job, run_patch_job

REPO = Path(__file__).resolve().parents[1]
# "static" is static_patch_size; "static<N>" another size (static8: about the space arm's patch
# length, so space is compared with a static arm of its own FLOPs per byte too).
Arm = Annotated[str, StringConstraints(pattern=r"^(entropy|space|static([1-9][0-9]*)?)$")]


class StudyConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scale: Literal["full", "quick"] = Field("full", description="quick: a smoke check, not a result")
    prefix: str = Field("study", description="registry names: <prefix>-shuffled, <prefix>-entropy-model, ...")
    limit: int | None = Field(None, ge=1, description="stdlib documents to download; None: all (1,786, 31.5 MB)")
    num_chunks: int = Field(5, ge=1, description="train chunks of the shuffle (5: ~6 MB each)")
    chunks: list[int] = Field([0, 1], description="train chunks every arm is patched and trained on (with val)")
    val_docs: int = Field(100, ge=1, description="documents in the val split")
    entropy_preset: str = Field("study", description="train-entropy preset (blt_model/presets/entropy)")
    entropy_overrides: list[str] = Field(default_factory=list)
    target_patch_size: float = Field(4.0, gt=0, description="entropy arm: calibrated mean patch size, bytes")
    static_patch_size: int = Field(4, ge=1, description="static arm: patch size, bytes")
    arms: list[Arm] = Field(["entropy", "static", "space", "static8"], description="entropy, static, space, static<N>")
    seeds: list[int] = Field([0, 1, 2])
    train_preset: str = Field("study", description="blt-train preset (blt_model/presets/train)")
    train_overrides: list[str] = Field(default_factory=list)
    steps: int | None = Field(2442, ge=1, description="BLT steps per run (2,442 x 4 x 1,024 tokens: the 10 M bytes "
                              "of min_train_bytes, 84% of an epoch of the default chunks); None: one epoch of the train split")
    min_train_bytes: int = Field(10**7, ge=0, description="refuse a study that trains on fewer bytes")
    workers: int = Field(2, ge=1, description="patch-job scoring actors")


QUICK = StudyConfig(
    scale="quick", prefix="study-quick", limit=30, num_chunks=2, chunks=[0], val_docs=2,  # val: 7.4 KB
    entropy_overrides=["steps=12", "warmup_steps=2", "batch_rows=2", "row_len=256", "model.dim=64",
                       "model.n_layers=2", "model.window=32", "model.max_seqlen=1024", "eval_every=0",
                       "eval_bytes=20000", "checkpoint_every=4"],
    seeds=[0], steps=6, min_train_bytes=0,
    train_overrides=["data.seq_len=256", "data.batch_size=2", "warmup_steps=2", "checkpoint_every=3",
                     "eval_batches=2"],
)


# --- the steps --------------------------------------------------------------------------------


def documents(reg: Registry, cfg: StudyConfig, progress: bool) -> Manifest:
    name = "stdlib" if cfg.limit is None else f"{cfg.prefix}-stdlib"  # the full corpus is the demo's
    docs = download(reg, DownloadConfig(source="stdlib", name=name, limit=cfg.limit), progress=progress)
    return shuffle_documents(reg, docs.ref, f"{cfg.prefix}-shuffled", num_chunks=cfg.num_chunks, seed=0,
                             memory_bytes=64 * 10**6, val_docs=cfg.val_docs, progress=progress)


def entropy_config(cfg: StudyConfig) -> TrainEntropyConfig:
    return build_train_entropy_config(cfg.entropy_preset, ["device=cpu", *cfg.entropy_overrides])


def patch_config(cfg: StudyConfig, shuffled: Manifest, arm: Arm, model_ref: str | None) -> PatchJobConfig:
    common = dict(docs=shuffled.ref, chunks=cfg.chunks, workers=cfg.workers, local_cpus=os.cpu_count())
    if arm == "entropy":
        return PatchJobConfig(name=f"{cfg.prefix}-entropy{cfg.target_patch_size:g}", model=model_ref,
                              rule=PatchRule(scheme="entropy", target_patch_size=cfg.target_patch_size), **common)
    if arm.startswith("static"):
        size = int(arm.removeprefix("static") or cfg.static_patch_size)
        return PatchJobConfig(name=f"{cfg.prefix}-static{size}", entropies=False,
                              rule=PatchRule(scheme="static", patch_size=size), **common)
    return PatchJobConfig(name=f"{cfg.prefix}-space", rule=PatchRule(scheme="space"), entropies=False, **common)


def train_config(cfg: StudyConfig, data: Manifest, arm: Arm, seed: int, steps: int, runs_dir: Path,
                 progress: bool) -> TrainConfig:
    name = f"{cfg.prefix}-{arm}-s{seed}"
    return build_train_config(cfg.train_preset, [
        f"data.dataset={data.ref}", f"name={name}", f"steps={steps}", f"seed={seed}", f"data.seed={seed}",
        "device=cpu", f"progress={str(progress).lower()}", f"dump_dir={runs_dir / name}", *cfg.train_overrides,
    ])


def split_tokens(reg: Registry, data: Manifest, split: str) -> tuple[int, int]:
    """(documents, tokens) of a split as the reader streams it: BOS + bytes + EOS per document."""
    docs = text_bytes = 0
    for part in data.parts_of(split):
        with reg.store.open_input(reg.part_path(data, part)) as f:
            text = pq.read_table(f, columns=["text"]).column("text")
        docs += len(text)
        text_bytes += int(pc.sum(pc.binary_length(text)).as_py() or 0)
    return docs, text_bytes + 2 * docs


def stream_patches(reg: Registry, tcfg: TrainConfig, steps: int) -> dict:
    """Bytes and patches of the batches a run trains on, counted as the trainer counts them
    (`n_bytes`: byte tokens; `n_patches`: patches over BOS, bytes and EOS, a patch cut by a row
    edge counting twice), so bytes / patches is the mean patch size its FLOPs depend on."""
    read = tcfg.data.model_copy(update={"prefetch": 0})
    n_bytes = n_patches = batches = 0
    for batch, _ in Reader(read, reg):
        n_bytes, n_patches, batches = n_bytes + batch["n_bytes"], n_patches + batch["n_patches"], batches + 1
        if batches == steps:
            break
    return {"train_bytes": n_bytes, "train_patches": n_patches, "mean_patch": n_bytes / max(n_patches, 1)}


def entropy_val_bpb(reg: Registry, shuffled: Manifest, ecfg: TrainEntropyConfig, model: EntropyModel) -> tuple[float, int]:
    """(bits per byte, bytes) of `model` on the first `eval_bytes` of val, as train-entropy measures it."""
    rows = validation_rows(document_texts(reg, shuffled, "val"), ecfg.row_len, ecfg.eval_bytes)
    bpb = evaluate_bpb(model.eval(), rows, ecfg.batch_rows, Distributed(0, 1, torch.device("cpu")), ecfg)
    return bpb, int((rows.targets != IGNORE_INDEX).sum())


# --- time estimate ----------------------------------------------------------------------------


def _timed_steps(step, warmup: int = 1, timed: int = 2) -> float:
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(timed):
        step()
    return (time.perf_counter() - start) / timed


def measure_blt_step(tcfg: TrainConfig, patch_size: int) -> float:
    """Seconds of one forward + backward + AdamW step of the run's BLT on one batch (fp32 CPU)."""
    torch.manual_seed(0)
    model = BLT(tcfg.model)
    opt = tcfg.optimizer(model)
    B, T = tcfg.data.batch_size, tcfg.data.seq_len
    tokens = torch.randint(4, 260, (B, T))
    lengths = torch.full((B, -(-T // patch_size)), patch_size, dtype=torch.int32)
    lengths[:, -1] = T - patch_size * (lengths.shape[1] - 1)
    doc_ids = torch.zeros(B, T, dtype=torch.int32)

    def step():
        loss, _, _ = byte_loss(model(tokens, lengths, doc_ids), tokens)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_steps(step)


def measure_entropy_step(ecfg: TrainEntropyConfig) -> float:
    torch.manual_seed(0)
    model = EntropyModel(ecfg.model)
    opt = ecfg.optimizer(model)
    R, S = ecfg.batch_rows, ecfg.row_len
    tokens = torch.randint(4, 260, (R, S))
    batch = (tokens, tokens, torch.zeros(R, S, dtype=torch.long), torch.arange(S).expand(R, S))

    def step():
        loss = next_byte_loss(model, batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return _timed_steps(step)


def estimate(reg: Registry, cfg: StudyConfig, shuffled: Manifest, ecfg: TrainEntropyConfig, tcfg: TrainConfig,
             steps: int, train_tokens: int, val_tokens: int, runs_dir: Path) -> dict:
    """Seconds each step that is not in the registry yet should take, from step times measured
    now. A forward pass is taken as a third of a training step (scoring, validation)."""
    blt_step = measure_blt_step(tcfg, cfg.static_patch_size)
    ent_step = measure_entropy_step(ecfg)
    ent_tokens_per_step = ecfg.batch_rows * ecfg.row_len
    blt_tokens_per_step = tcfg.data.batch_size * tcfg.data.seq_len
    rows = {}
    model = reg.find_job(*(entropy_job := _entropy_job(reg, cfg, shuffled, ecfg)), area="models")
    if model is None and "entropy" in cfg.arms:
        rows["train entropy model"] = (ecfg.steps - _steps_done(reg, *entropy_job)) * ent_step
    patched = {}  # arm -> its committed patches dataset
    for arm in cfg.arms:
        if arm != "entropy" or model is not None:
            job = patch_config(cfg, shuffled, arm, model.ref if model else None)
            if (found := reg.find_job(job.name, plan_patch_job(reg, job).job_id)) is not None:
                patched[arm] = found
    if "entropy" in cfg.arms and "entropy" not in patched:
        context = 1 + ecfg.model.n_layers * (ecfg.model.window - 1) / ecfg.model.max_seqlen
        # Calibrating to a target patch size scores a draw of whole documents first; on a dataset
        # this small the draw grows towards all of it (calibrate.MAX_SAMPLE_GROWTH), then the
        # job scores every document again: an upper bound of twice the dataset.
        job_tokens = train_tokens + val_tokens
        draw = min(job_tokens, MAX_SAMPLE_GROWTH * PatchRule().calibration_bytes)
        rows["score entropy arm: calibration + job (forward ~ step/3)"] = (
            (draw + job_tokens) * context * ent_step / 3 / ent_tokens_per_step)
    left = steps_left = 0
    for arm in cfg.arms:
        for seed in cfg.seeds:
            if arm in patched:
                data = patched[arm]
                arm_steps = cfg.steps or split_tokens(reg, data, "train")[1] // blt_tokens_per_step
                job = _run_job(reg, train_config(cfg, data, arm, seed, arm_steps, runs_dir, False))
                if reg.find_job(*job, area="models") is None:
                    left, steps_left = left + 1, steps_left + arm_steps - _steps_done(reg, *job)
            else:
                left, steps_left = left + 1, steps_left + steps
    if left:
        run = steps_left * blt_step + left * val_tokens / blt_tokens_per_step * blt_step / 3
        rows[f"train + validate {left} of {len(cfg.arms) * len(cfg.seeds)} BLT runs (~{steps} steps each)"] = run
    return {"blt_step_s": blt_step, "entropy_step_s": ent_step, "load_average": os.getloadavg()[0],
            "seconds": rows, "total_s": sum(rows.values())}


def _entropy_job(reg: Registry, cfg: StudyConfig, shuffled: Manifest, ecfg: TrainEntropyConfig) -> tuple[str, str]:
    name = f"{cfg.prefix}-entropy-model"
    return name, plan_entropy_job(reg, shuffled.ref, name, ecfg)[1]


def _steps_done(reg: Registry, name: str, job_id: str) -> int:
    """Steps of the job's latest checkpoint: where a rerun resumes (0 when it has none)."""
    steps = checkpoint_steps(reg.store, reg.job_dir(name, job_id, area="models"))
    return steps[-1] if steps else 0


def _run_job(reg: Registry, tcfg: TrainConfig) -> tuple[str, str]:
    return tcfg.name, plan_job(reg, tcfg)[1]


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


# --- the study --------------------------------------------------------------------------------


def summarise(runs: list[dict], arms: list[str]) -> list[dict]:
    """Per arm: mean, sample standard deviation and range of val bpb over seeds; the paired
    difference to static (same seed) when there is a static arm."""
    static = {r["seed"]: r["val_bpb"] for r in runs if r["arm"] == "static"}
    out = []
    for arm in arms:
        mine = [r for r in runs if r["arm"] == arm]
        values = [r["val_bpb"] for r in mine]
        row = {"arm": arm, "data": mine[0]["data"], "seeds": len(values), "val_bpb_mean": statistics.fmean(values),
               "val_bpb_std": statistics.stdev(values) if len(values) > 1 else None,
               "val_bpb_min": min(values), "val_bpb_max": max(values), "mean_patch": mine[0]["mean_patch"],
               "dataset_mean_patch_length": mine[0]["dataset_mean_patch_length"],
               "flops_per_byte": mine[0]["flops_per_byte"], "train_bytes": mine[0]["train_bytes"]}
        deltas = [r["val_bpb"] - static[r["seed"]] for r in mine if r["seed"] in static]
        if arm != "static" and deltas:
            row["minus_static_mean"] = statistics.fmean(deltas)
            row["minus_static_std"] = statistics.stdev(deltas) if len(deltas) > 1 else None
        out.append(row)
    return out


def run_study(reg: Registry, cfg: StudyConfig, runs_dir: Path, progress: bool, out: Path,
              estimate_only: bool = False) -> dict:
    results: dict = {"scale": cfg.scale, "config": cfg.model_dump(mode="json")}
    if cfg.scale == "quick":
        results["smoke_run"] = "a tiny run that checks the program end to end; its numbers mean nothing"
    t0 = time.perf_counter()

    shuffled = documents(reg, cfg, progress)
    parts = chunk_parts(shuffled, cfg.chunks)
    ecfg = entropy_config(cfg)
    tcfg0 = build_train_config(cfg.train_preset, ["device=cpu", *cfg.train_overrides])  # shapes, before data
    # Before patching: the train split's size from the documents (chunk rows x mean document).
    mean_doc = shuffled.stats.bytes / max(shuffled.stats.documents, 1)
    train_docs = sum(p.rows for p in parts if p.split == "train")
    val_docs = sum(p.rows for p in parts if p.split == "val")
    train_tokens_est = int(train_docs * (mean_doc + 2))
    steps_est = cfg.steps or train_tokens_est // (tcfg0.data.batch_size * tcfg0.data.seq_len)
    if steps_est * tcfg0.data.batch_size * tcfg0.data.seq_len < 0.95 * cfg.min_train_bytes:  # fail before the hours
        raise SystemExit(f"chunks {cfg.chunks} of {shuffled.ref} hold ~{train_tokens_est / 1e6:.1f} M tokens, under "
                         f"min_train_bytes={cfg.min_train_bytes}: patch more chunks (chunks=...) or set steps")
    est = estimate(reg, cfg, shuffled, ecfg, tcfg0, steps_est, train_tokens_est, int(val_docs * (mean_doc + 2)), runs_dir)
    results["estimate"] = est
    print(f"study ({cfg.scale}): {shuffled.ref}, chunks {cfg.chunks} ({train_docs} train documents, "
          f"~{train_tokens_est / 1e6:.1f} M tokens) + {val_docs} val; load average {est['load_average']:.1f} on "
          f"{os.cpu_count()} CPUs; measured now: BLT step {est['blt_step_s']:.2f} s, entropy-model step "
          f"{est['entropy_step_s']:.2f} s")
    for what, seconds in est["seconds"].items():
        print(f"  estimate  {what:<58} {_hours(seconds):>9}")
    print(f"  estimate  {'what is left, in all':<58} {_hours(est['total_s']):>9}", flush=True)
    if estimate_only:
        return results

    model_ref = None
    if "entropy" in cfg.arms:
        name, _ = _entropy_job(reg, cfg, shuffled, ecfg)
        trained = train_entropy(reg, shuffled.ref, name, ecfg, progress=progress)
        model_ref = trained.manifest.ref
        shipped, val_bytes = entropy_val_bpb(reg, shuffled, ecfg, load_default_entropy_model())
        results["entropy_model"] = {
            "ref": model_ref, "params": sum(p.numel() for p in load_registered_entropy_model(reg, model_ref).parameters()),
            "val_bpb": trained.val_bpb, "shipped_default_val_bpb": shipped, "val_bytes": val_bytes,
        }
        print(f"entropy model {model_ref}: val {trained.val_bpb:.3f} bits/byte; shipped default on the same "
              f"{val_bytes / 1e6:.3f} MB of val: {shipped:.3f}", flush=True)

    datasets: dict[str, Manifest] = {}
    jobs = [patch_config(cfg, shuffled, arm, model_ref) for arm in cfg.arms]
    pending = [j for j in jobs if reg.find_job(j.name, plan_patch_job(reg, j).job_id) is None]
    started_ray = False
    if pending:  # one local Ray for every patch job (each would start and stop its own)
        import ray

        if not ray.is_initialized():
            ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")
            started_ray = True
    try:
        for arm, job in zip(cfg.arms, jobs):
            datasets[arm] = run_patch_job(reg, job, progress=progress)
    finally:
        if started_ray:
            import ray

            ray.shutdown()

    # Equal bytes: the same token count for every arm (`steps`, or one epoch of the train split).
    tokens = {arm: split_tokens(reg, m, "train") for arm, m in datasets.items()}
    if len(set(tokens.values())) != 1:
        raise SystemExit(f"the arms do not hold the same documents: (documents, tokens) {tokens}")
    _, train_tokens = next(iter(tokens.values()))
    per_step = tcfg0.data.batch_size * tcfg0.data.seq_len
    steps = cfg.steps or train_tokens // per_step
    if steps * per_step < cfg.min_train_bytes:
        raise SystemExit(f"{steps} steps x {per_step} tokens is under min_train_bytes={cfg.min_train_bytes}: "
                         "patch more chunks (chunks=...) or set steps")
    print(f"arms: {', '.join(m.ref for m in datasets.values())}; {steps} steps x {per_step} tokens per run "
          f"({steps * per_step / 1e6:.2f} M; the train split holds {train_tokens / 1e6:.2f} M)", flush=True)

    todo = [(arm, seed) for seed in cfg.seeds for arm in cfg.arms
            if reg.find_job(*_run_job(reg, train_config(cfg, datasets[arm], arm, seed, steps, runs_dir, progress)),
                            area="models") is None]
    val_tokens = split_tokens(reg, datasets[cfg.arms[0]], "val")[1]
    per_run = steps * est["blt_step_s"] + val_tokens / per_step * est["blt_step_s"] / 3
    print(f"runs left: {len(todo)} of {len(cfg.arms) * len(cfg.seeds)}, about {_hours(len(todo) * per_run)} "
          f"at the BLT step time measured at the start", flush=True)

    # A run an earlier invocation trained is found, not trained, here: keep the time that invocation
    # measured (from the JSON it left), not the fraction of a second it takes to find it.
    earlier = {r["job_id"]: r.get("seconds") for r in _read_json(out).get("runs", [])}
    runs, measured = [], {}
    for seed in cfg.seeds:
        for arm in cfg.arms:
            data = datasets[arm]
            tcfg = train_config(cfg, data, arm, seed, steps, runs_dir, progress)
            if arm not in measured:
                stream = stream_patches(reg, tcfg, steps)
                stream["flops_per_byte"] = BLT(tcfg.model).flops_per_byte(stream["mean_patch"], tcfg.data.seq_len)
                measured[arm] = stream
            found = (arm, seed) not in todo
            start = time.perf_counter()
            result = train(reg, tcfg)
            seconds = earlier.get(result.job_id) if found else time.perf_counter() - start
            row = {"arm": arm, "seed": seed, "data": data.ref, "model": result.manifest.ref, "job_id": result.job_id,
                   "steps": steps, "val_bpb": result.val_bpb, "seconds": seconds,
                   "dataset_mean_patch_length": data.stats.mean_patch_length, **measured[arm]}
            runs.append(row)
            took = "trained earlier" if seconds is None else f"{seconds:.0f} s" + (", earlier" if found else "")
            print(f"  {arm:<8} seed {seed}: val {result.val_bpb:.4f} bits/byte ({result.manifest.ref}, {took})",
                  flush=True)
            results["runs"] = runs
            write_json(out, results)  # a partial table survives an interrupted study

    results["arms"] = summarise(runs, cfg.arms)
    results["invocation_seconds"] = time.perf_counter() - t0  # this command only: a rerun finds earlier work
    write_json(out, results)
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(path)


def _num(x: float | None, fmt: str) -> str:
    """A table cell: "-" where there is no value (a spread over one seed, static's own difference)."""
    return "-" if x is None else format(x, fmt)


def print_table(results: dict) -> None:
    print(f"{'arm':<8} {'data':<26} {'seeds':>5} {'val bpb':>8} {'std':>7} {'min..max':>15} {'-static':>8} "
          f"{'patch B':>7} {'(dataset)':>9} {'MFLOP/B':>8} {'train bytes':>12}")
    for r in results["arms"]:
        print(f"{r['arm']:<8} {r['data']:<26} {r['seeds']:>5} {r['val_bpb_mean']:>8.4f} {_num(r['val_bpb_std'], '.4f'):>7} "
              f"{r['val_bpb_min']:>7.4f}..{r['val_bpb_max']:.4f} {_num(r.get('minus_static_mean'), '+.4f'):>8} "
              f"{r['mean_patch']:>7.2f} {r['dataset_mean_patch_length']:>9.2f} {r['flops_per_byte'] / 1e6:>8.2f} "
              f"{r['train_bytes']:>12,}")
    print("patch B: bytes per patch over the trained batches (BOS/EOS patches and row-edge cuts included: what the "
          "FLOPs see); (dataset): over all text bytes of the patches dataset")
    if results["scale"] == "quick":
        print("(a smoke run: the numbers check the program, they are not a result)")


def markdown_table(results: dict) -> str:
    """The per-arm table as Markdown (README's study section is pasted from this), then each run."""
    lines = ["| arm | seeds | val bits/byte, mean ± std | min..max | minus static (paired by seed) | bytes/patch trained "
             "| MFLOP/byte |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["arms"]:
        diff = "-" if r.get("minus_static_mean") is None else (
            f"{r['minus_static_mean']:+.4f} ± {_num(r.get('minus_static_std'), '.4f')}")
        lines.append(f"| {r['arm']} | {r['seeds']} | **{r['val_bpb_mean']:.4f}** ± {_num(r['val_bpb_std'], '.4f')} "
                     f"| {r['val_bpb_min']:.4f}..{r['val_bpb_max']:.4f} | {diff} | {r['mean_patch']:.2f} "
                     f"| {r['flops_per_byte'] / 1e6:.2f} |")
    runs = "; ".join(f"{r['arm']} {r['seed']}: {r['val_bpb']:.4f}"
                     + ("" if r.get("seconds") is None else f" ({r['seconds'] / 60:.1f} min)")
                     for r in sorted(results["runs"], key=lambda r: (r["arm"], r["seed"])))
    return "\n".join(lines) + f"\n\nEach run (arm seed: val bits/byte): {runs}."


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--store", default="blt-store", help="registry store (local folder or s3://...)")
    p.add_argument("--quick", action="store_true", help="a tiny smoke version: few documents, few steps, 1 seed")
    p.add_argument("--runs-dir", default="runs/study", help="local folder for each run's metrics.jsonl")
    p.add_argument("--out", default=None, help="JSON result (default bench/results/study.json, study-quick.json)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--estimate", action="store_true", help="download and shuffle, print the time estimate, stop")
    p.add_argument("--markdown", action="store_true",
                   help="print the results of the last finished study (--out) as a Markdown table; runs nothing")
    p.add_argument("overrides", nargs="*", help="StudyConfig fields as key=value (e.g. seeds=[0,1] chunks=[0])")
    args = p.parse_args(argv)
    base = QUICK if args.quick else StudyConfig()
    try:
        cfg = StudyConfig.model_validate({**base.model_dump(), **_parse_overrides(args.overrides)})
    except ValidationError as e:
        raise SystemExit(f"invalid study config: {e}") from None
    out = Path(args.out) if args.out else REPO / "bench" / "results" / ("study-quick.json" if args.quick else "study.json")
    if args.markdown:
        results = _read_json(out)
        if "arms" not in results:
            raise SystemExit(f"{out}: no finished study there (run the study first)")
        print(markdown_table(results))
        return
    torch.set_num_threads(os.cpu_count() or 1)
    # The patch job's and trainer's progress lines (calibration draws, units, checkpoints) show
    # that a step of hours is moving, also with --no-progress.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    reg = Registry(Store.open(args.store))
    results = run_study(reg, cfg, Path(args.runs_dir), not args.no_progress, out, args.estimate)
    if args.estimate:
        return
    print_table(results)
    print(f"wrote {out}")


def _parse_overrides(items: list[str]) -> dict:
    import yaml

    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in StudyConfig.model_fields:
            raise SystemExit(f"{item!r}: expected KEY=VALUE with KEY one of {', '.join(StudyConfig.model_fields)}")
        out[key] = yaml.safe_load(value)
    return out


if __name__ == "__main__":
    sys.exit(main())
