"""Entropy models in the registry: register, import Meta's release, load by reference, and the
shipped default (DESIGN.md §5).

A registered model's files are written first under the job folder and listed as the
manifest's parts, exactly like a dataset's::

    models/<name>/_jobs/<job-id>/{model.safetensors, config.json}   written first
    models/<name>/v<NNNN>/manifest.json                             written last, put-if-absent

NOTE: DESIGN.md §5 sketches the files inside `v<NNNN>/`; but the version number is only known
when the manifest wins its put-if-absent, and a `v<NNNN>/` folder without a manifest would be
listed as a version. Files under `_jobs/` keep the rule "nothing exists until its manifest
does", and a rerun of the same job finds its files again.

Invariant: a model loaded by reference is byte-for-byte the one its manifest hashed (sha256 of
every file is checked on load).
"""

from __future__ import annotations

import hashlib
import posixpath
from pathlib import Path
from typing import Any

import torch

from blt_data.registry import Manifest, PartInfo, Registry, RegistryError, job_hash
from blt_model.entropy_model import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    EntropyModel,
    entropy_model_from_bytes,
    entropy_model_to_bytes,
    load_entropy_model,
    read_entropy_model_source,
)

DEFAULT_MODEL = "default"
DEFAULT_MODEL_DIR = Path(__file__).parent / "assets" / "entropy-default"
# `format` recorded in an imported model's manifest, per detected layout.
LAYOUT_FORMATS = {
    "meta-consolidated": "meta-blt-consolidated",
    "meta-hub": "meta-blt-hub",
    "hf-blt-patcher": "hf-blt-patcher",
    "hf-blt": "hf-blt",
    "blt-data": "blt-data",
}


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def register_entropy_model(
    registry: Registry,
    model: EntropyModel,
    name: str,
    job_id: str,
    parents: list[str],
    params: dict[str, Any],
) -> Manifest:
    """Write the model's files under `_jobs/<job_id>/`, then commit its manifest (kind
    "entropy-model"); params gain the weights' sha256 and the parameter count."""
    config_json, weights = entropy_model_to_bytes(model)
    job_dir = registry.job_dir(name, job_id, area="models")
    parts = []
    for file_name, data in ((WEIGHTS_FILE, weights), (CONFIG_FILE, config_json)):
        registry.store.write_bytes(f"{job_dir}/{file_name}", data)
        parts.append(
            PartInfo(
                path=f"_jobs/{job_id}/{file_name}",
                rows=0,
                bytes=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
                split="model",
            )
        )
    params = {
        **params,
        "sha256": parts[0].sha256,
        "num_params": num_params(model),
        "model": model.config.model_dump(mode="json"),
    }
    manifest = Manifest(
        name=name, kind="entropy-model", job_id=job_id, parents=parents, params=params, parts=parts
    )
    return registry.commit(manifest)


def load_registered_entropy_model(
    registry: Registry, ref: str, device: str | torch.device = "cpu"
) -> EntropyModel:
    """The entropy model a reference (`name` or `name@vN`) names, checked against its manifest."""
    manifest = registry.resolve(ref, area="models", kind="entropy-model")
    files: dict[str, bytes] = {}
    for part in manifest.parts:
        files[posixpath.basename(part.path)] = registry.read_part(manifest, part)
    if CONFIG_FILE not in files or WEIGHTS_FILE not in files:
        raise RegistryError(f"{manifest.ref} lists no {CONFIG_FILE} and {WEIGHTS_FILE}")
    source = f"{manifest.ref} ({WEIGHTS_FILE})"
    return entropy_model_from_bytes(files[CONFIG_FILE], files[WEIGHTS_FILE], source).to(device)


def load_default_entropy_model(device: str | torch.device = "cpu") -> EntropyModel:
    """The model shipped with the package (`blt_model/assets/entropy-default/`)."""
    if not (DEFAULT_MODEL_DIR / WEIGHTS_FILE).exists():
        raise FileNotFoundError(f"the shipped entropy model is missing from {DEFAULT_MODEL_DIR}")
    return load_entropy_model(str(DEFAULT_MODEL_DIR), device)


def load_entropy_model_ref(
    registry: Registry | None, ref: str, device: str | torch.device = "cpu"
) -> EntropyModel:
    """`--model REF`: "default" is the shipped model; anything else a registry reference."""
    if ref == DEFAULT_MODEL:
        return load_default_entropy_model(device)
    if registry is None:
        raise RegistryError(f"model {ref!r} needs a registry (only {DEFAULT_MODEL!r} ships)")
    return load_registered_entropy_model(registry, ref, device)


def import_entropy_model(registry: Registry, url: str, name: str) -> Manifest:
    """Import a released entropy model from the folder `url`, in any layout
    `read_entropy_model_source` detects (Meta's, Meta's hub, Hugging Face's patcher or BLT), and
    register it; importing the same checkpoint under the same name again returns the existing
    version. The release's patch threshold (HF `patching_threshold`) is recorded as `threshold`."""
    source = read_entropy_model_source(url)
    job_id = job_hash({"step": "import-entropy-model", "sha256": source.sha256})
    existing = registry.find_job(name, job_id, area="models")
    if existing is not None:
        return existing
    params: dict[str, Any] = {
        "source": url,
        "source_file": source.files[-1],
        "source_files": source.files,
        "source_sha256": source.sha256,
        "format": LAYOUT_FORMATS[source.layout],
    }
    if source.threshold is not None:
        params["threshold"] = source.threshold
    if source.patching:
        params["patching"] = source.patching
    return register_entropy_model(registry, source.model, name, job_id, parents=[], params=params)
