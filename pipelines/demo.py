"""The demo on embedded defaults (`blt-data demo`, `make demo`):

    stdlib corpus → documents → shuffled (chunks + val) → patches (shipped entropy model, local
    Ray, one chunk + val) → a small BLT trained on CPU → validation bits per byte → inspect page

Every step is a registry job, so a second run finds each committed version and reuses it: only
what is missing is computed. Sizes are chosen for a 2-core machine to finish in a few minutes;
`DemoConfig` fields (as `key=value` overrides) make it smaller (tests) or bigger.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from pydantic import BaseModel, ConfigDict, Field

from blt_data.download import DownloadConfig, download
from blt_data.inspection import write_inspect_page
from blt_data.patching import PatchRule
from blt_data.registry import Manifest, Registry
from blt_data.shuffle import shuffle_documents
from blt_model.train import build_train_config, train
from pipelines.patch_job import PatchJobConfig, run_patch_job

class DemoConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    limit: int | None = Field(None, ge=1, description="stdlib documents to download; None: all (1,786, 31.5 MB)")
    num_chunks: int = Field(10, ge=1, description="train chunks of the shuffled corpus")
    val_docs: int = Field(40, ge=1, description="documents in the val split")
    chunks: list[int] = Field([0], description="train chunks to patch (with all of val)")
    threshold: float | None = Field(None, description="entropy threshold, nats; None: the one recorded with the shipped model (2.551, a mean patch of 4.5 bytes)")
    workers: int = Field(2, ge=1, description="scoring actors")
    train_preset: str = Field("demo", description="blt-train preset (blt_model/presets/train)")
    train: list[str] = Field(default_factory=list, description="overrides for the training config, e.g. ['steps=20']")
    inspect_dir: str = Field("blt-inspect", description="local folder for the inspect page")


@dataclass
class Step:
    name: str
    manifest: Manifest
    seconds: float
    reused: bool
    input_bytes: int  # bytes this step processed (for MB/s)


@dataclass
class DemoResult:
    steps: list[Step] = field(default_factory=list)
    inspect_page: Path | None = None


def _timed(result: DemoResult, name: str, registry: Registry, area: str, run: Callable[[], Manifest],
           processed: Callable[[Manifest], int]) -> Manifest:
    """Run one step; `processed(manifest)` is how many bytes it went through (for MB/s)."""
    versions = {n: registry.versions(n, area) for n in registry.names(area)}
    start = time.perf_counter()
    manifest = run()
    seconds = time.perf_counter() - start
    reused = manifest.version in versions.get(manifest.name, [])
    result.steps.append(Step(name, manifest, seconds, reused, processed(manifest)))
    return manifest


def run_demo(registry: Registry, cfg: DemoConfig | None = None, progress: bool = True) -> DemoResult:
    cfg = cfg or DemoConfig()
    result = DemoResult()
    text_bytes = lambda m: m.stats.bytes  # noqa: E731
    docs = _timed(result, "download", registry, "datasets", lambda: download(
        registry, DownloadConfig(source="stdlib", name="stdlib", limit=cfg.limit), progress=progress), text_bytes)
    shuffled = _timed(result, "shuffle", registry, "datasets", lambda: shuffle_documents(
        registry, docs.ref, "stdlib-shuffled", num_chunks=cfg.num_chunks, seed=0, memory_bytes=64 * 10**6,
        val_docs=cfg.val_docs, progress=progress), text_bytes)
    patch_cfg = PatchJobConfig(
        docs=shuffled.ref, name="stdlib-patches", model="default", rule=PatchRule(threshold=cfg.threshold), chunks=cfg.chunks,
        workers=cfg.workers,
    )
    patches = _timed(result, "patch", registry, "datasets", lambda: run_patch_job(registry, patch_cfg, progress=progress), text_bytes)
    train_cfg = build_train_config(cfg.train_preset, [f"data.dataset={patches.ref}", f"progress={progress}", *cfg.train])
    tokens = lambda m: m.params["step"] * train_cfg.data.batch_size * train_cfg.data.seq_len  # noqa: E731
    _timed(result, "train", registry, "models", lambda: _train(registry, train_cfg), tokens)
    result.inspect_page = write_inspect_page(registry, patches.ref, Path(cfg.inspect_dir), n_docs=3)
    return result


def _train(registry: Registry, cfg) -> Manifest:
    outcome = train(registry, cfg)
    if outcome.manifest is None:  # only with max_steps_this_run, which the demo does not set
        raise RuntimeError(f"training stopped at step {outcome.step}")
    return outcome.manifest
