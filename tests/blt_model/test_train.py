"""`blt-train` end to end: torchrun with 2 processes (gloo, CPU, FSDP2) training a tiny BLT from a
patches dataset on s3:// (the loopback S3 server), bit-identical resume, a resume on another
world size that reads every document of the epoch exactly once, eval, generate, and refusals.

Data: 48 short documents cut from stdlib modules (~46 KB), shuffled into 2 chunks + 4 val
documents, patched with the `space` rule by the real Ray patch job.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from blt_data.documents import iter_documents
from blt_data.download import DownloadConfig, download
from blt_data.patching import PatchRule
from blt_data.registry import Registry
from blt_data.shuffle import shuffle_documents
from blt_data.storage import Store
from blt_data.verify import verify
from cli.blt_train import app
from pipelines.patch_job import PatchJobConfig, run_patch_job
from tests.conftest import TEST_SECRET

REPO = Path(__file__).resolve().parents[2]
TRAIN = ["debug", "data.dataset=tiny-patches", "data.seq_len=512", "data.batch_size=2", "data.block_documents=4",
         "progress=false"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, store: str, *args: str, code: int = 0) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "cli.blt_train", "train", *args, "--store", store]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == code, out[-4000:]
    assert TEST_SECRET not in out
    return out


def metrics(dump_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (dump_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def data(s3_server, ray_local, tmp_path_factory):
    """A patches dataset `tiny-patches` on a fresh S3 bucket; returns (store url, train ids)."""
    import boto3

    bucket = f"blt-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_server).create_bucket(Bucket=bucket)
    store = f"s3://{bucket}/reg"
    reg = Registry(Store.open(store))
    src = tmp_path_factory.mktemp("src") / "docs.jsonl"
    texts = [p.read_text()[:400 + 37 * i] for i, p in enumerate(sorted(Path(os.__file__).parent.glob("[a-k]*.py"))[:48])]
    src.write_text("".join(json.dumps({"id": f"d{i:02d}", "text": t}) + "\n" for i, t in enumerate(texts)))
    download(reg, DownloadConfig(source=str(src), name="tiny"), progress=False)
    shuffle_documents(reg, "tiny", "tiny-sh", num_chunks=2, seed=0, memory_bytes=10**6, val_docs=4, progress=False)
    patches = run_patch_job(reg, PatchJobConfig(docs="tiny-sh", name="tiny-patches", rule=PatchRule(scheme="space"), workers=1))
    train_ids = [d["id"] for d in iter_documents(reg, reg.resolve("tiny-sh"), split="train")]
    assert patches.stats.splits == {"train": 44, "val": 4}
    return store, train_ids


def test_two_processes_train_and_resume_bit_identical(data, tmp_path):
    store, _ = data
    base = [*TRAIN, "steps=8", "warmup_steps=1", "log_every=4"]
    out = torchrun(2, store, *base, "name=whole", f"dump_dir={tmp_path / 'whole'}")
    assert "whole@v1 (blt-checkpoint)" in out
    whole = [m for m in metrics(tmp_path / "whole") if "loss" in m]
    assert [m["step"] for m in whole] == list(range(1, 9))
    assert whole[-1]["loss"] < whole[0]["loss"] - 0.5, "the loss does not fall"
    assert {"lr", "grad_norm", "bpb"} <= set(whole[0]) and {"bytes_per_s", "patches_per_s"} <= set(whole[3])

    # Stopped after 3 steps (a checkpoint), then the same command again: it resumes by itself.
    args = [*base, "name=split", f"dump_dir={tmp_path / 'split'}", "max_steps_this_run=3"]
    assert "stopped at step 3/8" in torchrun(2, store, *args)
    torchrun(2, store, *args)  # steps 4..6
    out = torchrun(2, store, *args)  # 7..8, then register
    assert "split@v1 (blt-checkpoint)" in out
    split = [m for m in metrics(tmp_path / "split") if "loss" in m]
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in split] == [(m["step"], m["loss"], m["grad_norm"]) for m in whole]
    final = lambda ms: [m["val_bpb"] for m in ms if m.get("final")]  # noqa: E731
    assert final(metrics(tmp_path / "split")) == final(metrics(tmp_path / "whole"))

    reg = Registry(Store.open(store))
    m = reg.resolve("split", area="models", kind="blt-checkpoint")
    assert m.parents == ["tiny-patches@v1"] and m.params["step"] == 8 and m.params["world_size"] == 2
    assert verify(reg, m) == []


def test_resume_on_one_process_reads_each_document_once(data, tmp_path):
    store, train_ids = data
    args = [*TRAIN, "steps=1000", "warmup_steps=1", "data.epochs=1", "log_documents=true", "name=ws",
            f"dump_dir={tmp_path}"]
    assert "stopped at step 3/1000" in torchrun(2, store, *args, "max_steps_this_run=3")
    out = torchrun(1, store, *args)
    assert "2 -> 1 processes" in out and "ws@v1 (blt-checkpoint)" in out
    seen = [line.split("\t")[1] for f in sorted(tmp_path.glob("documents-rank*.txt")) for line in f.read_text().splitlines()]
    assert sorted(seen) == sorted(train_ids), "a document was read twice or never in the epoch"
    steps = [m["step"] for m in metrics(tmp_path) if "loss" in m]
    assert steps == list(range(1, len(steps) + 1)) and len(steps) > 3


def blt_train(*args: str, code: int = 0) -> str:
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, list(args))
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert TEST_SECRET not in out
    return out


def test_eval_generate_and_refusals(data, tmp_path):
    store, _ = data
    args = [*TRAIN, "steps=4", "warmup_steps=1", "name=one", f"dump_dir={tmp_path}", "--store", store]
    assert "one@v1 (blt-checkpoint)" in blt_train("train", *args)
    again = blt_train("train", *args)
    assert "one@v1" in again and "@v2" not in again  # the same job is found, not retrained

    out = blt_train("eval", "one", "--store", store, "--json")
    result = json.loads(out)
    assert result["data"] == "tiny-patches@v1" and result["split"] == "val" and 1 < result["bpb"] < 9
    assert result["bytes"] > 1000
    text = blt_train("generate", "one", "--prompt", "def ", "--max-bytes", "12", "--store", store)
    assert text.startswith("def ") and len(text.encode()) >= 4 + 8

    # Refusals, each named.
    out = blt_train("train", *TRAIN, "data.dataset=tiny-sh", "--store", store, code=2)
    assert "tiny-sh" in out and "patches" in out
    out = blt_train("train", *TRAIN, "data.dataset=nothing", "--store", store, code=2)
    assert "nothing" in out
    out = blt_train("train", *TRAIN, "model.dim_global=-3", "--store", store, code=2)
    assert "dim_global" in out
    out = blt_train("train", *args, "steps=5", "--resume", "models/one/_jobs/none/checkpoints/step-00000001", code=2)
    assert "not a complete checkpoint" in out

    reg = Registry(Store.open(store))
    folder = f"{reg.dataset_dir('one', area='models')}/{reg.resolve('one', area='models').params['checkpoint']}"
    out = blt_train("train", *args, "steps=5", "--resume", folder, code=2)
    assert "belongs to job" in out  # another config: another job
    shard = next(f for f in reg.store.find(folder) if f.endswith(".distcp"))
    reg.store.write_bytes(shard, b"not a checkpoint")
    out = blt_train("eval", "one", "--store", store, code=2)
    assert "unreadable" in out or "sha256" in out


def test_activation_checkpointing_changes_nothing_and_accumulation_runs(data, tmp_path):
    store, _ = data
    base = [*TRAIN, "steps=3", "warmup_steps=1", "--store", store]
    blt_train("train", *base, "name=plain", f"dump_dir={tmp_path / 'plain'}")
    blt_train("train", *base, "name=ckpt", "parallel.activation_checkpointing=true", f"dump_dir={tmp_path / 'ckpt'}")
    losses = lambda run: [m["loss"] for m in metrics(tmp_path / run) if "loss" in m]  # noqa: E731
    assert losses("ckpt") == losses("plain") and len(losses("plain")) == 3
    out = blt_train("train", *base, "name=accum", "grad_accum=2", f"dump_dir={tmp_path / 'accum'}")
    assert "accum@v1" in out and len(losses("accum")) == 3


def test_compiled_blocks_train_like_eager(data, tmp_path):
    store, _ = data
    base = [*TRAIN, "steps=2", "warmup_steps=1", "--store", store]
    blt_train("train", *base, "name=eager", f"dump_dir={tmp_path / 'eager'}")
    blt_train("train", *base, "name=compiled", "parallel.compile=true", f"dump_dir={tmp_path / 'compiled'}")
    losses = lambda run: [m["loss"] for m in metrics(tmp_path / run) if "loss" in m]  # noqa: E731
    assert losses("compiled") == pytest.approx(losses("eager"), abs=1e-4) and len(losses("eager")) == 2


def write_release(folder: Path, seed: int) -> None:
    """A BLT of the debug preset's shape in Meta's hub layout, its output layer zeroed: a model
    that starts from it has uniform predictions, so its first loss is exactly ln(260) nats."""
    import torch
    from safetensors.torch import save_file

    from blt_model.blt import BLT, load_blt_preset
    from blt_model.interop import meta_args_from_config

    cfg = load_blt_preset("debug")
    torch.manual_seed(seed)
    state = BLT(cfg).state_dict()
    state["local_decoder.output.weight"].zero_()
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"args": meta_args_from_config(cfg)}))
    (folder / "train_args.json").write_text(json.dumps({"data": {"patcher_args": {"patching_mode": "space"}}}))


def test_continued_training_from_an_imported_checkpoint(data, tmp_path):
    import math

    store, _ = data
    write_release(tmp_path / "release", seed=123)
    assert "released@v1 (blt-checkpoint)" in blt_train("import", str(tmp_path / "release"), "--name", "released", "--store", store)
    base = [*TRAIN, "steps=6", "warmup_steps=1", "log_every=3", "init_from=released"]
    out = torchrun(2, store, *base, "name=cont", f"dump_dir={tmp_path / 'whole'}")
    assert "starts from the weights of released@v1" in out and "cont@v1 (blt-checkpoint)" in out
    whole = [m for m in metrics(tmp_path / "whole") if "loss" in m]
    assert abs(whole[0]["loss"] - math.log(260)) < 1e-5 and whole[-1]["loss"] < whole[0]["loss"]

    # Stopped at step 3 and rerun: it resumes from its own checkpoint, bit-identically.
    args = [*base, "name=cont-split", f"dump_dir={tmp_path / 'split'}", "max_steps_this_run=3"]
    assert "stopped at step 3/6" in torchrun(2, store, *args)
    out = torchrun(2, store, *args)
    assert "resumed" in out and "starts from the weights" not in out
    split = [m for m in metrics(tmp_path / "split") if "loss" in m]
    assert [(m["step"], m["loss"], m["grad_norm"]) for m in split] == [(m["step"], m["loss"], m["grad_norm"]) for m in whole]

    reg = Registry(Store.open(store))
    m = reg.resolve("cont", area="models", kind="blt-checkpoint")
    assert m.parents == ["tiny-patches@v1", "released@v1"] and m.params["init_from"] == "released@v1"
    # Its own job: the same config from scratch is another job id.
    plain = json.loads(blt_train("train", *[a for a in base if not a.startswith("init_from")], "name=cont", "--dry-run", "--store", store))
    with_init = json.loads(blt_train("train", *base, "name=cont", "--dry-run", "--store", store))
    assert plain["job_id"] != with_init["job_id"] == m.job_id

    # The imported checkpoint works with eval and generate (its released rule: space).
    result = json.loads(blt_train("eval", "released", "--data", "tiny-patches", "--max-batches", "1", "--store", store, "--json"))
    assert abs(result["bpb"] - math.log2(260)) < 1e-4
    assert blt_train("generate", "released", "--prompt", "def ", "--max-bytes", "3", "--store", store).startswith("def ")

    # A config of another shape is refused, naming the first field that differs.
    out = blt_train("train", *base, "name=other", "model.dim_global=128", "--store", store, code=2)
    assert "model.dim_global" in out and "128" in out and "64" in out
    out = blt_train("train", *base, "name=other", "init_from=nothing", "--store", store, code=2)
    assert "nothing" in out


def test_trained_checkpoint_exports_to_transformers(data, tmp_path):
    """A DCP checkpoint trained here, out to transformers' layout: the same logits."""
    import torch

    pytest.importorskip("transformers")
    from transformers import BltForCausalLM

    from blt_model.blt_registry import load_trained_blt
    from tests.blt_model.test_blt_oracle import document, hf_logits, ours_logits

    store, _ = data
    blt_train("train", *TRAIN, "steps=2", "warmup_steps=1", "name=out", f"dump_dir={tmp_path}", "--store", store)
    out = blt_train("export", "out", "--format", "hf", "--out", str(tmp_path / "hf"), "--store", store)
    assert "model.safetensors" in out
    hf = BltForCausalLM.from_pretrained(tmp_path / "hf", attn_implementation="eager", dtype=torch.float32).eval()
    assert not hf.config.patch_in_forward  # trained on space patches: transformers has no such rule
    for sub in ("encoder_config", "decoder_config", "global_config"):
        getattr(hf.config, sub)._attn_implementation = "eager"
    ours, _ = load_trained_blt(Registry(Store.open(store)), "out")
    tokens, lengths = document(b"def main():\n    return 0\n")
    want = hf_logits(hf, tokens, lengths)
    got = ours_logits(ours, tokens, lengths, [0] * len(tokens), flex=False)
    assert (got - want).abs().max() < 1e-4
