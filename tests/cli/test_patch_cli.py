"""`blt-data patch` and `blt-data repatch` as users type them: on S3 through the loopback server
(workers get the endpoint through the Ray runtime env), calibration, dry runs and clear errors."""

from __future__ import annotations

import json

from blt_data.registry import Registry
from blt_data.storage import Store
from tests.cli.test_blt_data_cli import blt


def docs(store: str) -> None:
    blt("download", "stdlib", "--name", "std", "--limit", "12", "--part-size", "30KB", "--store", store, "-q")


def test_patch_on_s3_calibrated_then_repatch(s3_bucket, ray_local):
    store = f"{s3_bucket}/reg"
    docs(store)
    args = ("patch", "std", "--name", "cal", "--target-patch-size", "5", "--unit-size", "16KB", "--store", store, "-q")
    m = json.loads(blt(*args, "--json"))
    c = m["params"]["calibration"]
    assert c["target"] == 5 and abs(c["mean_patch_size_reached"] - 5) <= 0.02 * 5
    assert c["sample_bytes"] > 0 and m["params"]["threshold"] == c["threshold"]
    # 12 documents (99 KB) are within a few samples' size: calibrated on all of them, so the whole
    # dataset lands on the target up to the float noise between two scorings
    assert c["sample_documents"] == c["population_documents"] == 12 and c["relative_standard_error"] == 0
    assert c["dataset_mean_patch_size"] == m["stats"]["mean_patch_length"]
    assert abs(m["stats"]["mean_patch_length"] - 5) <= 0.02 * 5
    reg = Registry(Store.open(store))
    assert reg.store.exists(f"datasets/cal/_jobs/{m['job_id']}/calibration.json")
    again = blt(*args)
    assert "cal@v1 (patches): 12 documents" in again and "calibrated for 5 bytes on all 12 documents" in again
    shown = blt("registry", "show", "cal", "--store", store)
    assert f"dataset {c['dataset_mean_patch_size']:.3f}" in shown and f"sample {c['mean_patch_size_reached']:.3f}" in shown

    out = blt("repatch", "cal", "--name", "cal2", "--threshold", "3", "--store", store, "-q")
    assert "cal2@v1 (patches): 12 documents" in out and "threshold 3 nats" in out
    assert json.loads(blt("registry", "show", "cal2", "--json", "--store", store))["parents"] == ["cal@v1"]
    for ref in ("cal", "cal2"):
        assert "verified" in blt("registry", "verify", ref, "--store", store, "-q")


def test_patch_dry_run_writes_nothing(local_store_url):
    docs(local_store_url)
    plan = json.loads(blt("patch", "std", "--name", "p", "--threshold", "2", "--unit-size", "16KB", "--dry-run",
                          "cpus_per_worker=0.25", "--store", local_store_url))
    assert plan["input"] == "std@v1" and len(plan["job_id"]) == 16 and plan["model"]["ref"] == "default"
    assert plan["config"]["cpus_per_worker"] == 0.25 and plan["num_units"] == len(plan["units"]) == 6
    assert Registry(Store.open(local_store_url)).names() == ["std"]


def test_patch_without_a_rule_option_uses_the_models_recorded_threshold(local_store_url):
    docs(local_store_url)
    out = blt("patch", "std", "--name", "p", "--unit-size", "16KB", "--dry-run", "--store", local_store_url)
    assert "using threshold 2.551 nats, recorded with entropy model default" in out
    plan = json.JSONDecoder().raw_decode(out[out.index("{"):])[0]  # the note goes to stderr
    explicit = json.loads(blt("patch", "std", "--name", "p", "--threshold", "2.551", "--unit-size", "16KB", "--dry-run",
                              "--store", local_store_url))
    assert plan["config"]["rule"]["threshold"] == 2.551 and plan["job_id"] == explicit["job_id"]


def test_every_job_command_reads_a_config_file_under_its_flags(local_store_url, tmp_path):
    config = tmp_path / "patch.yaml"
    config.write_text("rule:\n  threshold: 3.0\nworkers: 3\nunit_bytes: 20000\n")
    docs(local_store_url)
    plan = json.loads(blt("patch", "std", "--name", "p", "--config", str(config), "--workers", "1", "retries=7",
                          "--dry-run", "--store", local_store_url))
    assert plan["config"]["rule"]["threshold"] == 3.0 and plan["config"]["unit_bytes"] == 20000
    assert plan["config"]["workers"] == 1 and plan["config"]["retries"] == 7  # flags over the file, overrides last
    shuffle = tmp_path / "shuffle.yaml"
    shuffle.write_text("num_chunks: 2\nval_docs: 3\nseed: 5\n")
    out = blt("shuffle", "std", "--name", "sh", "--config", str(shuffle), "seed=6", "--store", local_store_url, "-q", "--json")
    m = json.loads(out)
    assert m["stats"]["splits"] == {"train": 9, "val": 3} and len([p for p in m["parts"] if p["split"] == "train"]) == 2


def test_patch_and_repatch_clear_errors(local_store_url, s3_server, monkeypatch, ray_local):
    store = local_store_url
    docs(store)
    out = blt("patch", "std", "--name", "p", "--scheme", "monotonic", "--store", store, code=2)
    assert "needs exactly one of threshold (--threshold) and target_patch_size" in out
    out = blt("patch", "std", "--name", "p", "--threshold", "2", "--model", "ghost", "--store", store, code=2)
    assert "error: no model named 'ghost'" in out
    out = blt("patch", "std", "--name", "p", "--scheme", "space", "--threshold", "2", "--store", store, code=2)
    assert "takes no threshold" in out
    out = blt("patch", "nothing", "--name", "p", "--threshold", "2", "--store", store, code=2)
    assert "error: no dataset named 'nothing'" in out
    out = blt("patch", "std", "--name", "p", "--threshold", "2", "wrkers=3", "--store", store, code=2)
    assert "unknown config key 'wrkers'" in out

    blt("patch", "std", "--name", "st", "--scheme", "static", "--unit-size", "64KB", "--store", store, "-q")
    out = blt("repatch", "st", "--name", "r", "--threshold", "2", "--store", store, code=2)
    assert "st@v1 has no stored entropies" in out and "repatch needs them" in out
    out = blt("repatch", "std", "--name", "r", "--threshold", "2", "--store", store, code=2)
    assert "std@v1 is a documents dataset; repatch takes a patches dataset" in out
    out = blt("patch", "st", "--name", "p", "--threshold", "2", "--store", store, code=2)
    assert "st@v1 is a patches dataset, expected documents" in out
    out = blt("repatch", "st", "--name", "r", "--store", store, code=2)
    assert "exactly one of threshold and target_patch_size" in out

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    out = blt("patch", "std", "--name", "p", "--threshold", "2", "--store", "s3://some-bucket/reg", code=2)
    assert "cannot reach store s3://some-bucket/reg at http://127.0.0.1:9" in out


def test_unreachable_ray_address_fails_at_once(tmp_path):
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    store = str(tmp_path / "store")
    blt("download", "stdlib", "--name", "few", "--limit", "2", "-q", "--store", store)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.blt_data", "patch", "few", "--name", "p", "--scheme", "static",
         "--ray-address", f"127.0.0.1:{port}", "--store", store],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot reach Ray at 127.0.0.1:{port}" in proc.stderr
    assert time.monotonic() - started < 60
