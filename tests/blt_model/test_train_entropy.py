"""Training the entropy model on a real documents dataset, on a local folder and on S3."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from blt_data.download import DownloadConfig, download
from blt_data.entropy import score_entropies
from blt_data.registry import Registry, RegistryError, find_garbage
from blt_data.shuffle import shuffle_documents
from blt_data.storage import Store
from blt_data.verify import verify
from blt_model.checkpoint import latest_checkpoint, step_dir
from blt_model.configs import ConfigError
from blt_model.distributed import Distributed
from blt_model.entropy_model import EntropyModel
from blt_model.entropy_registry import load_entropy_model_ref, load_registered_entropy_model
from blt_model.train_entropy import (
    LEGACY_CHECKPOINT,
    PRESET_DIR,
    TrainingError,
    build_train_entropy_config,
    evaluate_bpb,
    learning_rate,
    plan_job,
    train_entropy,
    training_rows,
    validation_rows,
)

REPO = Path(__file__).resolve().parents[2]


def make_docs(store_url: str, val_docs: int = 10) -> Registry:
    reg = Registry(Store.open(store_url))
    download(reg, DownloadConfig(source="stdlib", name="std", limit=60))
    shuffle_documents(reg, "std", "docs", num_chunks=2, seed=0, memory_bytes=4 << 20, val_docs=val_docs)
    return reg


def debug_config(*overrides: str):
    return build_train_entropy_config("debug", list(overrides))


def weights_of(reg: Registry, ref: str) -> dict[str, torch.Tensor]:
    return load_registered_entropy_model(reg, ref).state_dict()


def test_every_preset_loads():
    names = sorted(p.stem for p in PRESET_DIR.glob("*.yaml"))
    assert {"debug", "default", "paper"} <= set(names)
    for name in names:
        build_train_entropy_config(name, [])
    paper = build_train_entropy_config("paper", [])
    assert (paper.model.dim, paper.model.n_layers, paper.model.n_heads, paper.model.window) == (768, 14, 12, 512)


def test_overrides_are_typed_and_strict():
    cfg = debug_config("steps=9", "model.dim=48", "lr=1e-3", "device=cpu")
    assert (cfg.steps, cfg.model.dim, cfg.lr, cfg.device) == (9, 48, 1e-3, "cpu")
    with pytest.raises(ConfigError, match="unknown config key 'model.width'"):
        debug_config("model.width=3")
    with pytest.raises(ConfigError, match="steps"):
        debug_config("steps=many")
    with pytest.raises(ConfigError, match="not KEY=VALUE"):
        debug_config("steps")
    with pytest.raises(ConfigError, match="warmup_steps 50 exceeds steps 6"):
        debug_config("warmup_steps=50")
    with pytest.raises(ConfigError, match="config file not found"):
        build_train_entropy_config("/nowhere/x.yaml", [])


def test_learning_rate_warms_up_then_decays_to_the_floor():
    cfg = debug_config("steps=100", "warmup_steps=10", "lr=1.0", "min_lr_ratio=0.1")
    lrs = [learning_rate(s, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3)


def test_training_rows_resume_from_any_cursor():
    texts = [b"abc", b"", b"defghij", b"k" * 20]
    open_texts = lambda start: iter(texts[start:])  # noqa: E731
    stream = training_rows(open_texts, 8)
    first = [next(stream) for _ in range(12)]  # several epochs
    # Targets are the bytes themselves, every byte once per epoch, in order.
    epoch = np.concatenate([r.targets[0] for r, _ in first])[:30] - 4
    assert bytes(epoch.astype(np.uint8)) == b"".join(texts)
    for i in (0, 3, 7):
        resumed = training_rows(open_texts, 8, first[i][1])
        for (row, cursor), (again, again_cursor) in zip(first[i + 1 :], resumed):
            assert cursor == again_cursor
            for field in ("tokens", "targets", "doc_ids", "positions"):
                assert np.array_equal(getattr(row, field), getattr(again, field))


def test_validation_bits_per_byte_count_every_byte_once_and_no_pad():
    """The validation loop (shared summing with the BLT's) against log-softmax by hand, row by row."""
    cfg = debug_config("row_len=64", "device=cpu")
    texts = [bytes(range(32, 32 + n)) for n in (50, 7, 90, 1, 33)]
    rows = validation_rows(iter(texts), cfg.row_len, max_bytes=150)  # the 3rd text is cut, the rest is pad
    torch.manual_seed(0)
    model = EntropyModel(cfg.model)
    bpb = evaluate_bpb(model, rows, 2, Distributed(0, 1, torch.device("cpu")), cfg)
    nats = 0.0
    with torch.no_grad():
        for r in range(len(rows.tokens)):
            one = [torch.from_numpy(a[r : r + 1]) for a in (rows.tokens, rows.targets, rows.doc_ids, rows.positions)]
            logp = torch.log_softmax(model(one[0], one[2], one[3]).double(), -1)[0]
            for t, target in enumerate(one[1][0].tolist()):
                if target >= 0:
                    nats -= float(logp[t, target])
    assert int((rows.targets >= 0).sum()) == 150
    assert bpb == pytest.approx(nats / np.log(2) / 150, rel=1e-5)


def test_train_register_load_round_trip(store_url):
    reg = make_docs(store_url)
    result = train_entropy(reg, "docs", "em", debug_config(), progress=False)
    m = result.manifest
    assert result.finished and m.ref == "em@v1" and m.kind == "entropy-model"
    assert m.parents == ["docs@v1"] and m.params["val_source"] == "val split"
    assert 0 < m.params["val_bpb"] < 9 and m.params["config"]["steps"] == 6
    weights = next(p for p in m.parts if p.path.endswith("model.safetensors"))
    assert m.params["sha256"] == weights.sha256
    data = reg.store.read_bytes(reg.part_path(m, weights))
    assert hashlib.sha256(data).hexdigest() == weights.sha256
    assert verify(reg, m) == []

    model = load_registered_entropy_model(reg, "em@v1")
    [entropies] = list(score_entropies(model, ["hello world"]))
    assert entropies.shape == (11,) and np.isfinite(entropies).all()
    # A rerun of the same job reuses the registered version.
    again = train_entropy(reg, "docs", "em", debug_config(), progress=False)
    assert again.manifest.ref == "em@v1"


def test_interrupted_run_resumes_bit_for_bit(local_store_url):
    reg = make_docs(local_store_url)
    whole = train_entropy(reg, "docs", "whole", debug_config(), progress=False)
    first = train_entropy(reg, "docs", "parts", debug_config("max_steps_this_run=3"), progress=False)
    assert not first.finished and first.step == 3 and first.manifest is None
    with pytest.raises(RegistryError):
        reg.resolve("parts", area="models")  # nothing visible before the manifest
    job_dir = reg.job_dir("parts", first.job_id, "models")
    assert latest_checkpoint(reg.store, job_dir) == step_dir(job_dir, 3)
    second = train_entropy(reg, "docs", "parts", debug_config("max_steps_this_run=2"), progress=False)
    assert second.step == 5 and not second.finished
    last = train_entropy(reg, "docs", "parts", debug_config(), progress=False)
    assert last.finished and last.job_id == whole.job_id
    assert last.manifest.params["sha256"] == whole.manifest.params["sha256"]
    a, b = weights_of(reg, "whole"), weights_of(reg, "parts")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert last.manifest.params["val_history"] == whole.manifest.params["val_history"]


def test_an_earlier_versions_checkpoint_restarts_the_job_and_says_so(local_store_url, caplog):
    reg = make_docs(local_store_url)
    cfg = debug_config("max_steps_this_run=3")
    legacy = f"{reg.job_dir('em', plan_job(reg, 'docs', 'em', cfg)[1], 'models')}/{LEGACY_CHECKPOINT}"
    reg.store.write_bytes(legacy, b"a torch.save file of an earlier version")
    with caplog.at_level("WARNING", logger="blt_model"):
        result = train_entropy(reg, "docs", "em", cfg, progress=False)
    assert result.step == 3  # from step 0, not from the old file
    assert "checkpoint.pt is an earlier version's checkpoint" in caplog.text and "step 0" in caplog.text
    assert reg.store.exists(legacy)  # left for `registry gc`, not deleted by training
    caplog.clear()
    with caplog.at_level("WARNING", logger="blt_model"):
        assert train_entropy(reg, "docs", "em", debug_config(), progress=False).finished
    assert "earlier version" not in caplog.text  # its own checkpoint now: resumed, no warning
    garbage = find_garbage(reg, older_than_s=0, now=time.time())
    assert any(legacy in g.files for g in garbage)  # the job is committed: `registry gc` removes the old file


def test_without_val_split_holds_out_train_documents(local_store_url):
    reg = make_docs(local_store_url, val_docs=0)
    m = train_entropy(reg, "docs", "em", debug_config("steps=2", "warmup_steps=1"), progress=False).manifest
    assert m.params["val_source"].startswith("first 6 train documents")


def test_clear_errors(local_store_url):
    reg = make_docs(local_store_url)
    with pytest.raises(RegistryError, match="no dataset named 'ghost'"):
        train_entropy(reg, "ghost", "em", debug_config(), progress=False)
    first = train_entropy(reg, "docs", "em", debug_config("max_steps_this_run=2"), progress=False)
    checkpoint = latest_checkpoint(reg.store, reg.job_dir("em", first.job_id, "models"))
    shard = next(f for f in reg.store.find(checkpoint) if f.endswith(".distcp"))
    reg.store.write_bytes(shard, b"not a checkpoint")
    with pytest.raises(TrainingError, match="unreadable.*delete it"):
        train_entropy(reg, "docs", "em", debug_config(), progress=False)
    reg.store.delete(checkpoint, recursive=True)
    m = train_entropy(reg, "docs", "em", debug_config(), progress=False).manifest
    with pytest.raises(RegistryError, match="is a entropy-model dataset, expected documents|no dataset"):
        train_entropy(reg, "em", "em2", debug_config(), progress=False)
    # A model file changed after commit is refused on load.
    weights = next(p for p in m.parts if p.path.endswith("model.safetensors"))
    reg.store.write_bytes(reg.part_path(m, weights), b"tampered")
    with pytest.raises(RegistryError, match="does not match the sha256"):
        load_registered_entropy_model(reg, "em")
    with pytest.raises(RegistryError, match="no model named 'docs'"):
        load_registered_entropy_model(reg, "docs")


def test_default_model_ships():
    model = load_entropy_model_ref(None, "default")
    assert sum(p.numel() for p in model.parameters()) < 2_500_000
    [entropies] = list(score_entropies(model, ["def f(x):\n    return x\n"]))
    assert np.isfinite(entropies).all()


def test_torchrun_two_processes_gloo(local_store_url, tmp_path):
    make_docs(local_store_url)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [str(torchrun), "--standalone", "--nproc-per-node", "2", "-m", "cli.blt_data",
           "train-entropy", "docs", "--name", "ddp", "--config", "debug", "--store", local_store_url, "-q"]
    # Stopped at step 3 (every rank saves its part of the DCP checkpoint), then resumed by both.
    stopped = subprocess.run([*cmd, "max_steps_this_run=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert stopped.returncode == 0 and "stopped at step 3/6" in stopped.stdout, stopped.stdout + stopped.stderr
    reg = Registry(Store.open(local_store_url))
    [job] = reg.store.list("models/ddp/_jobs")
    state = json.loads(reg.store.read_bytes(f"{latest_checkpoint(reg.store, job)}/train_state.json"))
    assert state["step"] == 3 and state["world_size"] == 2 and len(state["rng"]) == 2
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("ddp@v1 (entropy-model)") == 1  # only rank 0 reports and registers
    m = reg.resolve("ddp", area="models")
    assert m.params["world_size"] == 2 and reg.versions("ddp", "models") == [1]
