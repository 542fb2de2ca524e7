"""The ``blt-data`` commands as users type them, on a local folder and on S3 (loopback server)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from blt_data.registry import Registry
from blt_data.storage import Store
from cli.blt_data import app
from tests.conftest import TEST_SECRET

runner = CliRunner()


def blt(*args: str, code: int = 0) -> str:
    result = runner.invoke(app, list(args))
    out = result.output + (result.stderr if result.stderr_bytes is not None else "")
    assert result.exit_code == code, f"exit {result.exit_code}: {out}\n{result.exception!r}"
    assert TEST_SECRET not in out, "a credential leaked into the output"
    return out


def test_download_shuffle_registry_roundtrip(store_url):
    out = blt("download", "stdlib", "--name", "std", "--limit", "300", "--part-size", "1MB", "--store", store_url, "-q")
    assert "std@v1 (documents): 300 documents" in out
    out = blt("shuffle", "std", "--name", "shuf", "--chunks", "3", "--seed", "7", "--memory", "2MB",
              "--val-docs", "20", "--store", store_url, "-q")
    assert "shuf@v1 (documents): 300 documents" in out and "val: 20" in out

    listing = json.loads(blt("registry", "list", "--json", "--store", store_url))
    assert {m["name"]: m["version"] for m in listing} == {"shuf": 1, "std": 1}
    shown = json.loads(blt("registry", "show", "shuf@v1", "--json", "--store", store_url))
    assert shown["parents"] == ["std@v1"] and shown["params"]["seed"] == 7
    assert sum(p["rows"] for p in shown["parts"] if p["split"] == "val") == 20
    text = blt("registry", "show", "shuf", "--store", store_url)
    assert "parents   std@v1" in text
    assert "verified" in blt("registry", "verify", "shuf", "--store", store_url, "-q")
    table = blt("registry", "list", "--store", store_url)
    assert "shuf@v1" in table and "std@v1" in table


def test_verify_exits_nonzero_on_mismatch(local_store_url):
    from blt_data.registry import Registry
    from blt_data.storage import Store

    blt("download", "stdlib", "--name", "std", "--limit", "50", "--store", local_store_url, "-q")
    reg = Registry(Store.open(local_store_url))
    m = reg.resolve("std")
    reg.store.write_bytes(reg.part_path(m, m.parts[0]), b"not the part")
    out = blt("registry", "verify", "std", "--store", local_store_url, "-q", code=1)
    assert "MISMATCH std@v1" in out and "sha256" in out


def test_clear_errors(local_store_url, tmp_path):
    out = blt("download", str(tmp_path / "nothing.jsonl"), "--name", "x", "--store", local_store_url, code=2)
    assert "error: source not found" in out
    out = blt("shuffle", "ghost", "--name", "y", "--store", local_store_url, code=2)
    assert "error: no dataset named 'ghost'" in out
    out = blt("download", "stdlib", "--name", "x", "--part-size", "lots", "--store", local_store_url, code=2)
    assert "--part-size: cannot read 'lots' as a size" in out
    out = blt("registry", "show", "x@v3", "--store", local_store_url, code=2)
    assert "error:" in out
    blt("download", "stdlib", "--name", "x", "--limit", "5", "--store", local_store_url, "-q")
    out = blt("shuffle", "x", "--name", "y", "--val-docs", "99", "--store", local_store_url, code=2)
    assert "error:" in out and "99" in out


def test_unreachable_store_says_where_and_hides_credentials(s3_server, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    out = blt("download", "stdlib", "--name", "x", "--store", "s3://some-bucket/reg", code=2)
    assert "cannot reach store s3://some-bucket/reg at http://127.0.0.1:9" in out
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    out = blt("registry", "list", "--store", "s3://bucket-that-is-not-there", code=2)
    assert "bucket s3://bucket-that-is-not-there does not exist" in out


def test_store_from_environment(local_store_url, monkeypatch):
    monkeypatch.setenv("BLT_STORE", local_store_url)
    blt("download", "stdlib", "--name", "envstd", "--limit", "10", "-q")
    assert "envstd@v1" in blt("registry", "list")


def test_demo_runs_and_second_run_reuses(local_store_url, ray_local, tmp_path):
    # The whole chain, made small: 20 stdlib modules, 2 chunks, 3 training steps of the debug BLT.
    small = ["limit=20", "num_chunks=2", "val_docs=4", "workers=1", "train_preset=debug", "train=[steps=3]",
             f"inspect_dir={tmp_path / 'inspect'}"]
    first = blt("demo", *small, "--store", local_store_url, "-q")
    for made in ("stdlib@v1", "stdlib-shuffled@v1", "stdlib-patches@v1", "blt-debug@v1"):
        assert made in first, first
    assert "val " in first and "bpb" in first and "mean patch" in first
    page = tmp_path / "inspect" / "index.html"
    assert page.exists() and page.as_uri() in first
    reg = Registry(Store.open(local_store_url))
    patches = reg.resolve("stdlib-patches")
    assert patches.params["chunks"] == [0] and patches.params["model"]["ref"] == "default"
    assert reg.resolve("blt-debug", area="models").parents == ["stdlib-patches@v1"]
    second = blt("demo", *small, "--store", local_store_url, "-q")
    assert second.count("reused") == 4 and "@v2" not in second


@pytest.mark.parametrize("command", [[], ["download"], ["shuffle"], ["registry"], ["registry", "verify"], ["registry", "gc"], ["demo"], ["train-entropy"], ["import-entropy-model"], ["patch"], ["repatch"], ["inspect"], ["export"], ["import-preprocessed"], ["submit"], ["jobs"], ["jobs", "logs"]])
def test_help(command):
    out = blt(*command, "--help")
    assert "Usage" in out


def test_options_snapshot():
    """New flags are a deliberate choice (STYLE.md §7): this list changes only on purpose."""
    import typer.main

    group = typer.main.get_command(app)
    options = {
        name: sorted(p.name for p in cmd.params)
        for name, cmd in group.commands.items()
        if name not in ("registry", "jobs")
    }
    assert options == {
        "download": sorted(["source", "name", "overrides", "split", "text_field", "id_field", "limit", "part_size", "config", "store", "quiet", "as_json"]),
        "shuffle": sorted(["ref", "name", "overrides", "chunks", "seed", "memory", "val_docs", "config", "store", "quiet", "as_json"]),
        "demo": sorted(["overrides", "config", "store", "quiet", "as_json"]),
        # resume: as blt-train's (a damaged checkpoint's remedy, and starting over)
        "train-entropy": sorted(["docs", "name", "overrides", "config", "resume", "dry_run", "store", "quiet", "as_json"]),
        "import-entropy-model": sorted(["source", "name", "store", "quiet", "as_json"]),
        "patch": sorted(["docs", "name", "overrides", "model", "scheme", "threshold", "target_patch_size", "max_patch_length",
                         "entropies", "ray_address", "workers", "gpus_per_worker", "unit_size", "config", "dry_run",
                         "store", "quiet", "as_json"]),
        "repatch": sorted(["patches", "name", "overrides", "threshold", "target_patch_size", "scheme", "max_patch_length", "config", "store", "quiet", "as_json"]),
        "inspect": sorted(["ref", "out", "doc", "docs", "max_bytes", "store", "quiet", "as_json"]),
        "submit": sorted(["command", "address", "follow", "store"]),
        "export": sorted(["patches", "out", "format", "overrides", "chunks", "split", "entropy_model_name",
                          "accept_monotonic_difference", "config", "store", "quiet", "as_json"]),
        "import-preprocessed": sorted(["source", "name", "overrides", "threshold", "target_patch_size", "scheme", "max_patch_length",
                                       "model", "skip_incomplete", "workers", "config", "store", "quiet", "as_json"]),
    }
    jobs = {name: sorted(p.name for p in cmd.params) for name, cmd in group.commands["jobs"].commands.items()}
    assert jobs == {
        "status": sorted(["submission_id", "address", "as_json"]),
        "logs": sorted(["submission_id", "address", "follow"]),
        "stop": sorted(["submission_id", "address"]),
        "list": sorted(["address", "as_json"]),
    }


def test_registry_gc_collects_only_what_no_manifest_needs(store_url):
    blt("download", "stdlib", "--name", "g", "--limit", "12", "--part-size", "40KB", "-q", "--store", store_url)
    blt("shuffle", "g", "--name", "gs", "--chunks", "2", "--val-docs", "2", "-q", "--store", store_url)
    reg = Registry(Store.open(store_url))
    kept = {m.ref: [reg.part_path(m, p) for p in m.parts] for m in reg.list()}
    # An abandoned job (no manifest) and one still running: the same, but written just now.
    reg.store.write_bytes("datasets/g/_jobs/deadbeefdeadbeef/part-000000.jsonl.zst", b"x" * 1000)

    out = blt("registry", "gc", "--older-than", "0", "--json", "--store", store_url)
    listed = {g["job_dir"]: g for g in json.loads(out)}
    assert "datasets/g/_jobs/deadbeefdeadbeef" in listed
    loose = [f for g in listed.values() for f in g["files"]]
    assert loose and not set(loose) & {p for parts in kept.values() for p in parts}
    assert "left over by job" in blt("registry", "gc", "--older-than", "0", "--store", store_url)
    # A job that wrote something within the grace period may be running: spared.
    assert "deadbeefdeadbeef" not in blt("registry", "gc", "--older-than", "1h", "--store", store_url)

    assert "deleted" in blt("registry", "gc", "--older-than", "0", "--delete", "--store", store_url)
    assert not reg.store.exists("datasets/g/_jobs/deadbeefdeadbeef/part-000000.jsonl.zst")
    for ref in kept:
        assert "verified" in blt("registry", "verify", ref, "--store", store_url)
    assert "nothing to collect" in blt("registry", "gc", "--older-than", "0", "--store", store_url)
    # The same jobs run again find their manifests: nothing is redone or lost.
    again = blt("shuffle", "g", "--name", "gs", "--chunks", "2", "--val-docs", "2", "--store", store_url)
    assert "gs@v1" in again and "@v2" not in again
    assert "--older-than: cannot read 'soon'" in blt("registry", "gc", "--older-than", "soon", "--store", store_url, code=2)


def test_registry_commands_on_a_100k_part_dataset(store_url, tmp_path):
    """A 10^5-part dataset (synthetic: bench/registry.py) through show, list, verify --sample,
    inspect and the reader on 64 ranks; its times are printed, not asserted (bench/ measures)."""
    import time

    from bench.registry import synthetic_patches
    from blt_data.reader import Reader, ReaderConfig

    times = {}
    start = time.perf_counter()
    m = synthetic_patches(Registry(Store.open(store_url)), "big", 100_000)
    times["make"] = time.perf_counter() - start
    assert m.format_version == 2 and m.parts_file.count == 100_000

    start = time.perf_counter()
    out = blt("registry", "show", "big", "--store", store_url)
    times["show"] = time.perf_counter() - start
    assert "big@v1 (patches): 500,000,000 documents" in out and "in 100,000 parts" in out
    assert "100,000 parts and 0 quarantine parts listed in" in out and "  part  " not in out
    shown = json.loads(blt("registry", "show", "big", "--json", "--store", store_url))
    assert shown["parts_file"]["count"] == 100_000 and "parts" not in shown
    assert "100000" in blt("registry", "list", "--store", store_url)

    start = time.perf_counter()
    out = blt("registry", "verify", "big", "--sample", "100", "--store", store_url, "-q")
    times["verify --sample 100"] = time.perf_counter() - start
    assert "big@v1: 100 of 100,000 parts verified" in out

    start = time.perf_counter()
    reader = Reader(ReaderConfig(dataset="big", seq_len=4096, batch_size=2, prefetch=0), Registry(Store.open(store_url)),
                    rank=63, world_size=64)
    times["reader open"] = time.perf_counter() - start
    batch, state = next(iter(reader))
    times["first batch"] = time.perf_counter() - start
    assert batch["tokens"].shape == (2, 4096) and state["dataset"] == "big@v1:synthetic-100000"

    page = tmp_path / "page"
    blt("inspect", "big", "--out", str(page), "--docs", "2", "--store", store_url)
    assert "p0-0" in (page / "index.html").read_text()
    print("\n100,000 parts on " + ("s3" if store_url.startswith("s3://") else "local disk") + ": " + ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))

    # A changed part list fails verify with a clear message; show does not read the list.
    reg = Registry(Store.open(store_url))
    listing = f"{reg.version_dir('big', 1)}/{m.parts_file.path}"
    reg.store.write_bytes(listing, reg.store.read_bytes(listing)[:-8])
    out = blt("registry", "verify", "big", "--sample", "3", "--store", store_url, "-q", code=1)
    assert "MISMATCH big@v1: part list" in out and "does not match its manifest" in out
    assert "big@v1 (patches)" in blt("registry", "show", "big", "--store", store_url)

    # A manifest of a newer format: a one-line error, no traceback.
    stored = json.loads(reg.store.read_bytes(reg.manifest_path("big", 1)))
    reg.store.write_bytes(reg.manifest_path("big", 2), json.dumps({**stored, "format_version": 9}).encode())
    out = blt("registry", "show", "big", "--store", store_url, code=2)
    assert "error: big@v2: manifest format version 9 is newer than this blt-data" in out and "Traceback" not in out
