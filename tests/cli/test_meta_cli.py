"""`blt-data export --format meta` and `blt-data import-preprocessed` as users type them: the
printed `data:` block, the round trip, an end-to-end `blt-data patch` with the shipped model,
and clear errors (no traceback) for bad arguments and inputs."""

from __future__ import annotations

import json

import yaml

from blt_data.meta_layout import CONFIG_FILE, meta_threshold
from blt_data.patches import has_eos_entropy, read_patches
from blt_data.registry import Registry
from blt_data.storage import Store
from tests.blt_data.test_meta_layout import THRESHOLD, commit_dataset, make_docs
from tests.cli.test_blt_data_cli import blt


def test_export_prints_the_block_and_import_brings_it_back(store_url, tmp_path):
    reg = Registry(Store.open(store_url))
    commit_dataset(reg, "corpus", make_docs(30, seed=11), max_len=7)
    out = f"{store_url}-meta" if store_url.startswith("s3://") else str(tmp_path / "meta")
    printed = blt("export", "corpus", "--format", "meta", "--out", out, "--chunks", "2", "--store", store_url, "-q")
    assert "corpus@v1: 30 documents" in printed and "in 2 shards of 2 chunks" in printed
    block = yaml.safe_load(printed.split("config block written to", 1)[1].split(":\n", 1)[1])["data"]
    assert block == yaml.safe_load(Store.open(out).read_text(CONFIG_FILE))["data"]
    assert block["patcher_args"]["threshold"] == meta_threshold(THRESHOLD) and block["patcher_args"]["max_patch_length"] == 7

    m = json.loads(blt("import-preprocessed", out, "--name", "back", "--threshold", str(THRESHOLD), "--max-patch-length", "7",
                       "--model", "transformer_100m", "--store", store_url, "-q", "--json"))
    assert m["params"]["entropy_model_name"] == "transformer_100m" and m["stats"]["documents"] == 30
    assert read_patches(reg, reg.resolve("back")).to_pylist() == read_patches(reg, reg.resolve("corpus")).to_pylist()
    text = blt("import-preprocessed", out, "--name", "back", "--threshold", str(THRESHOLD), "--max-patch-length", "7",
               "--model", "transformer_100m", "--store", store_url, "-q")
    assert "back@v1 (patches): 30 documents" in text and "threshold 1.3 nats" in text


def test_clear_errors(local_store_url, tmp_path):
    reg = Registry(Store.open(local_store_url))
    commit_dataset(reg, "old", make_docs(5, seed=12), eos=False)
    out = str(tmp_path / "meta")
    err = blt("export", "old", "--format", "parquet", "--out", out, "--store", local_store_url, code=2)
    assert "error: --format: 'parquet' is not a layout blt-data writes (meta)" in err
    err = blt("export", "old", "--format", "meta", "--out", out, "--store", local_store_url, code=2)
    assert "no end-of-document entropy" in err and "run blt-data patch again" in err and "Traceback" not in err
    err = blt("export", "ghost", "--format", "meta", "--out", out, "--store", local_store_url, code=2)
    assert "error: no dataset named 'ghost'" in err
    err = blt("import-preprocessed", out, "--name", "x", "--store", local_store_url, code=2)
    assert "needs exactly one of threshold and target_patch_size" in err
    err = blt("import-preprocessed", str(tmp_path / "nothing"), "--name", "x", "--threshold", "1", "--store", local_store_url, code=2)
    assert "error: no *.shard_*.arrow files under" in err
    err = blt("import-preprocessed", out, "--name", "bad/name", "--threshold", "1", "--store", local_store_url, code=2)
    assert "invalid name 'bad/name'" in err


def test_patch_with_the_shipped_model_then_export(local_store_url, tmp_path, ray_local):
    """End to end on what `blt-data patch` writes: the end-of-document entropy is scored with the
    others, so the export succeeds (Meta's rule replayed on it gives our patch lengths, checked
    by the export itself) and imports back unchanged."""
    store = local_store_url
    blt("download", "stdlib", "--name", "std", "--limit", "12", "--part-size", "30KB", "--store", store, "-q")
    blt("patch", "std", "--name", "p", "--threshold", "2", "--unit-size", "16KB", "--store", store, "-q")
    reg = Registry(Store.open(store))
    m = reg.resolve("p")
    assert has_eos_entropy(m) and m.params["eos_entropy"] is True
    eos = read_patches(reg, m).column("eos_entropy")
    assert eos.null_count == 0 and len(eos) == 12
    out = str(tmp_path / "meta")
    blt("export", "p", "--format", "meta", "--out", out, "--store", store, "-q")
    blt("import-preprocessed", out, "--name", "back", "--threshold", "2", "--store", store, "-q")
    assert read_patches(reg, reg.resolve("back")).to_pylist() == read_patches(reg, m).to_pylist()
