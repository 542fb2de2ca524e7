"""`blt-data train-entropy` and `blt-data import-entropy-model` as users type them."""

from __future__ import annotations

import json

import torch

from blt_data.registry import Registry
from blt_data.storage import Store
from blt_model.entropy_registry import load_registered_entropy_model
from blt_model.checkpoint import latest_checkpoint
from tests.blt_model.test_entropy_model import official_params, official_state_dict, write_official
from tests.cli.test_blt_data_cli import blt


def docs(store: str) -> None:
    blt("download", "stdlib", "--name", "std", "--limit", "60", "--store", store, "-q")
    blt("shuffle", "std", "--name", "docs", "--chunks", "2", "--val-docs", "10", "--memory", "4MB", "--store", store, "-q")


def test_train_entropy_resume_and_register(store_url):
    docs(store_url)
    out = blt("train-entropy", "docs", "--name", "em", "--config", "debug", "--store", store_url, "-q",
              "max_steps_this_run=4", "model.dim=48", "model.n_heads=4")
    assert "stopped at step 4/6" in out and "run the same command again" in out
    out = blt("train-entropy", "docs", "--name", "em", "--config", "debug", "--store", store_url, "-q",
              "model.dim=48", "model.n_heads=4")
    assert "em@v1 (entropy-model)" in out and "bits/byte" in out and "parents   docs@v1" in out
    shown = json.loads(blt("registry", "show", "em", "--json", "--store", store_url))
    assert shown["kind"] == "entropy-model" and shown["params"]["model"]["dim"] == 48
    assert "verified" in blt("registry", "verify", "em", "--store", store_url, "-q")
    assert "em@v1" in blt("registry", "list", "--store", store_url)
    model = load_registered_entropy_model(Registry(Store.open(store_url)), "em@v1")
    assert model.config.dim == 48


def test_train_entropy_dry_run_writes_nothing(local_store_url):
    docs(local_store_url)
    out = json.loads(blt("train-entropy", "docs", "--name", "em", "-c", "debug", "--dry-run", "steps=3",
                         "warmup_steps=1", "--store", local_store_url))
    assert out["docs"] == "docs@v1" and out["config"]["steps"] == 3 and len(out["job_id"]) == 16
    assert Registry(Store.open(local_store_url)).names("models") == []


def test_train_entropy_clear_errors(local_store_url, tmp_path):
    out = blt("train-entropy", "ghost", "--name", "em", "-c", "debug", "--store", local_store_url, code=2)
    assert "error: no dataset named 'ghost'" in out
    docs(local_store_url)
    out = blt("train-entropy", "docs", "--name", "em", "-c", "debug", "model.width=3", "--store", local_store_url, code=2)
    assert "error: unknown config key 'model.width'" in out
    out = blt("train-entropy", "docs", "--name", "em", "-c", "debug", "lr=fast", "--store", local_store_url, code=2)
    assert "error: invalid TrainEntropyConfig: lr:" in out and "'fast'" in out
    out = blt("train-entropy", "docs", "--name", "em", "-c", str(tmp_path / "none.yaml"), "--store", local_store_url, code=2)
    assert "error: config file not found" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 64\n  depth: 3\n")
    out = blt("train-entropy", "docs", "--name", "em", "-c", str(bad), "--store", local_store_url, code=2)
    assert "model.depth: Extra inputs are not permitted" in out
    blt("train-entropy", "docs", "--name", "em", "-c", "debug", "max_steps_this_run=2", "--store", local_store_url, "-q")
    reg = Registry(Store.open(local_store_url))
    [job] = reg.store.list("models/em/_jobs")
    shard = next(f for f in reg.store.find(latest_checkpoint(reg.store, job)) if f.endswith(".distcp"))
    reg.store.write_bytes(shard, b"\x00garbage")
    out = blt("train-entropy", "docs", "--name", "em", "-c", "debug", "--store", local_store_url, "-q", code=2)
    assert "error: checkpoint" in out and "unreadable" in out
    # --resume, as blt-train's: a folder that is no checkpoint is refused; 'none' starts over.
    out = blt("train-entropy", "docs", "--name", "em", "-c", "debug", "--resume", f"{job}/checkpoints/step-00000001",
              "--store", local_store_url, "-q", code=2)
    assert "not a complete checkpoint" in out
    out = blt("train-entropy", "docs", "--name", "em", "-c", "debug", "--resume", "none", "max_steps_this_run=1",
              "--store", local_store_url, "-q")
    assert "stopped at step 1/6" in out


def test_import_entropy_model(store_url, tmp_path):
    source = write_official(tmp_path, official_params(), official_state_dict())
    out = blt("import-entropy-model", source, "--name", "meta", "--store", store_url)
    assert "meta@v1 (entropy-model)" in out
    shown = json.loads(blt("registry", "show", "meta", "--json", "--store", store_url))
    assert shown["params"]["source"] == source and len(shown["params"]["source_sha256"]) == 64
    assert shown["params"]["source_file"] == "consolidated.pth" and shown["params"]["model"]["window"] == 8
    # The same checkpoint again: the existing version is reused.
    assert "meta@v1" in blt("import-entropy-model", source, "--name", "meta", "--store", store_url)
    model = load_registered_entropy_model(Registry(Store.open(store_url)), "meta")
    expected = official_state_dict()["output.weight"].float()
    assert torch.equal(model.output.weight, expected)


def test_import_entropy_model_errors(local_store_url, tmp_path):
    out = blt("import-entropy-model", str(tmp_path / "nothing"), "--name", "meta", "--store", local_store_url, code=2)
    assert "error: no consolidated.pth" in out
    state = official_state_dict()
    del state["norm.weight"]
    source = write_official(tmp_path, official_params(), state)
    out = blt("import-entropy-model", source, "--name", "meta", "--store", local_store_url, code=2)
    assert "missing key 'norm.weight'" in out


def test_import_entropy_model_from_transformers_blt(local_store_url, tmp_path):
    """The patcher of a (sharded) transformers BLT checkpoint, with its released threshold."""
    from tests.blt_model.test_entropy_import import save_blt

    save_blt(tmp_path / "blt", threshold=1.25)
    out = blt("import-entropy-model", str(tmp_path / "blt"), "--name", "hf", "--store", local_store_url)
    assert "hf@v1 (entropy-model)" in out and "released threshold 1.25 nats" in out
    shown = json.loads(blt("registry", "show", "hf", "--json", "--store", local_store_url))
    assert shown["params"]["format"] == "hf-blt" and shown["params"]["threshold"] == 1.25
    # A damaged config is a clear error, not a traceback.
    (tmp_path / "blt" / "config.json").write_text("{not json")
    out = blt("import-entropy-model", str(tmp_path / "blt"), "--name", "hf2", "--store", local_store_url, code=2)
    assert "error:" in out and "config.json is not valid JSON" in out and "Traceback" not in out
