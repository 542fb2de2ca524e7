"""BLT checkpoints in the registry beyond the ones trained here: import from released folders
(`blt-train import`), export to them (`blt-train export`), and the weights and patch rule of any
registered `blt-checkpoint`, whichever way it was made.

A `blt-checkpoint` manifest holds its weights in one of two formats (`params.format`):

    dcp          trained here (train.register_checkpoint): the DCP folder of the final step,
                 `_jobs/<job-id>/checkpoints/step-NNNNNNNN/`, named by `params.checkpoint`
    safetensors  imported: `_jobs/<job-id>/model.safetensors` (our = Meta's keys, the dtypes the
                 release had) + `config.json` (the BLTConfig), DESIGN.md §5's model layout;
                 manifests without `format` are dcp

Lineage of an import: the release's entropy model is registered first (kind `entropy-model`,
`entropy_registry.import_entropy_model`) and is the BLT's parent; the BLT's params record the
patch rule released with them (`patching`: scheme, threshold in nats, max patch length) and the
entropy model's reference, which is what `blt-train generate` patches with. (The entropy model
is committed first, so it cannot name the BLT's version.)

Invariant: an imported checkpoint is complete and exact when its manifest exists: every tensor
was checked against `BLT(config)` before any file was written, its files are written before the
manifest, and loading re-checks their sha256. Importing the same release under the same name
again finds the existing version.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from typing import Any

import torch
from safetensors.torch import load as safetensors_load
from safetensors.torch import save_file

from blt_data.patching import ENTROPY_SCHEMES, PatchRule
from blt_data.registry import Manifest, PartInfo, Registry, RegistryError, job_hash
from blt_model.blt import BLT, BLTConfig
from blt_model.checkpoint import load_checkpoint
from blt_model.checkpoint_layouts import read_blt_source, write_hf_folder, write_meta_hub_folder
from blt_model.entropy_model import EntropyModel
from blt_model.entropy_registry import import_entropy_model, load_entropy_model_ref
from blt_model.interop import InteropError, check_state_dict

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FORMATS = ("hf", "meta")


def _write_weights(registry: Registry, rel: str, path_in_manifest: str, state_dict: dict[str, torch.Tensor]) -> PartInfo:
    """model.safetensors at `rel`, streamed into the store through a local temp file; its part
    entry names it `path_in_manifest`."""
    fd, tmp = tempfile.mkstemp(prefix="blt-import-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file({k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, tmp, metadata={"format": "pt"})
        with registry.store.create(rel) as out, open(tmp, "rb") as f:
            while chunk := f.read(8 << 20):
                out.write(chunk)
        size = os.path.getsize(tmp)
    finally:
        os.unlink(tmp)
    return PartInfo(path=path_in_manifest, rows=0, bytes=size, sha256=out.sha256, split="model")


def import_blt(
    registry: Registry,
    url: str,
    name: str,
    entropy_url: str | None = None,
    entropy_name: str | None = None,
) -> tuple[Manifest, Manifest | None]:
    """Register the BLT in the folder `url` (any layout of `checkpoint_layouts`) as `name`, and
    its entropy model (from `entropy_url`, else the one the folder carries) as `entropy_name`
    (default `<name>-entropy`). Returns (BLT manifest, entropy model manifest or None)."""
    source = read_blt_source(url)
    entropy_url = entropy_url or source.entropy_url
    entropy = None
    if entropy_url is not None:
        entropy = import_entropy_model(registry, entropy_url, entropy_name or f"{name}-entropy")
    patching = source.patching
    if patching is None and entropy is not None and entropy.params.get("threshold") is not None:
        patching = PatchRule(scheme="entropy", threshold=entropy.params["threshold"])
    # The rule as applied (no calibration fields: a release's threshold is given).
    patching_json = None if patching is None else patching.model_dump(
        mode="json", include={"scheme", "threshold", "max_patch_length", "patch_size"})
    job_id = job_hash({
        "step": "import-blt", "sha256": source.sha256, "patching": patching_json,
        "entropy_model": entropy.id if entropy is not None else None,
    })  # fmt: skip
    existing = registry.find_job(name, job_id, area="models")
    if existing is not None:
        return existing, entropy
    job_dir = registry.job_dir(name, job_id, area="models")
    weights = _write_weights(registry, f"{job_dir}/{WEIGHTS_FILE}", f"_jobs/{job_id}/{WEIGHTS_FILE}", source.state_dict)
    config_json = source.config.model_dump_json(indent=2).encode()
    registry.store.write_bytes(f"{job_dir}/{CONFIG_FILE}", config_json)
    parts = [
        weights,
        PartInfo(path=f"_jobs/{job_id}/{CONFIG_FILE}", rows=0, bytes=len(config_json),
                 sha256=hashlib.sha256(config_json).hexdigest(), split="model"),
    ]  # fmt: skip
    params: dict[str, Any] = {
        "format": "safetensors",
        "weights": f"_jobs/{job_id}/{WEIGHTS_FILE}",
        "model": source.config.model_dump(mode="json"),
        "num_params": sum(v.numel() for v in source.state_dict.values()),
        "dtype": str(next(iter(source.state_dict.values())).dtype).removeprefix("torch."),
        "source": url,
        "source_layout": source.layout,
        "source_files": source.files,
        "source_sha256": source.sha256,
        "patching": patching_json,
        "entropy_model": entropy.ref if entropy is not None else None,
    }
    manifest = Manifest(
        name=name, kind="blt-checkpoint", job_id=job_id,
        parents=[entropy.ref] if entropy is not None else [], params=params, parts=parts,
    )  # fmt: skip
    return registry.commit(manifest), entropy


def _read_part(registry: Registry, manifest: Manifest, rel_in_model: str) -> bytes:
    part = next((p for p in manifest.parts if p.path == rel_in_model), None)
    if part is None:
        raise RegistryError(f"{manifest.ref} lists no part {rel_in_model}")
    return registry.read_part(manifest, part)


def checkpoint_config(manifest: Manifest) -> BLTConfig:
    try:
        return BLTConfig.model_validate(manifest.params["model"])
    except ValueError as err:  # e.g. saved by the BLT-like architecture before Meta's
        raise RegistryError(
            f"{manifest.ref}: its model config does not describe a BLT this version builds "
            f"(an earlier architecture?): {err}"
        ) from None


def checkpoint_state_dict(registry: Registry, manifest: Manifest) -> dict[str, torch.Tensor]:
    """The weights of a registered `blt-checkpoint` (either format), our = Meta's keys."""
    config = checkpoint_config(manifest)
    if manifest.params.get("format") == "safetensors":
        state_dict = safetensors_load(_read_part(registry, manifest, manifest.params["weights"]))
        try:
            check_state_dict(state_dict, config)
        except InteropError as e:
            raise RegistryError(f"{manifest.ref}: {e}") from None
        return state_dict
    model = BLT(config)
    load_blt_weights(registry, manifest, model)
    return model.state_dict()


def load_blt_weights(registry: Registry, manifest: Manifest, model: BLT) -> None:
    """Load a registered checkpoint's weights into a plain (not yet parallelized) BLT, in place,
    in this process alone (every rank reads them itself)."""
    if manifest.params.get("format") == "safetensors":
        model.load_state_dict(checkpoint_state_dict(registry, manifest), strict=True)
        return
    folder = f"{registry.dataset_dir(manifest.name, area='models')}/{manifest.params['checkpoint']}"
    load_checkpoint(registry.store, folder, model, None, collective=False)


def checkpoint_patching(registry: Registry, manifest: Manifest) -> tuple[str | None, PatchRule | None]:
    """(entropy model reference or None, patch rule or None) of a registered checkpoint: the
    rule an import was released with, or the rule that patched a trained one's data."""
    if manifest.params.get("format") == "safetensors":
        patching = manifest.params.get("patching")
        return manifest.params.get("entropy_model"), None if patching is None else PatchRule(**patching)
    params = registry.resolve(manifest.parents[0], kind="patches").params
    cfg = PatchRule(
        scheme=params["scheme"], threshold=params.get("threshold"),
        max_patch_length=params.get("max_patch_length"), patch_size=params.get("patch_size") or 4,
    )  # fmt: skip
    ref = (params.get("model") or {}).get("ref") if cfg.scheme in ENTROPY_SCHEMES else None
    return ref, cfg


def load_checkpoint_patcher(registry: Registry, manifest: Manifest) -> tuple[EntropyModel | None, PatchRule]:
    """The entropy model (None for rules without one) and patch rule to patch new text with."""
    ref, cfg = checkpoint_patching(registry, manifest)
    if cfg is None:
        raise RegistryError(f"{manifest.ref} records no patch rule (its release named none); cannot patch text for it")
    if cfg.scheme in ENTROPY_SCHEMES and ref is None:
        raise RegistryError(f"{manifest.ref} patches by entropy but records no entropy model; import it with --entropy-model")
    return (load_entropy_model_ref(registry, ref) if cfg.scheme in ENTROPY_SCHEMES else None), cfg


def export_blt(registry: Registry, ref: str, fmt: str, out_url: str) -> list[str]:
    """Write the registered checkpoint `ref` to the folder `out_url` as transformers' layout
    (`hf`) or Meta's hub layout (`meta`), with its entropy model and patch rule when its lineage
    has them. Returns the files written."""
    if fmt not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {fmt!r} (expected one of {', '.join(EXPORT_FORMATS)})")
    manifest = registry.resolve(ref, area="models", kind="blt-checkpoint")
    config = checkpoint_config(manifest)
    entropy_ref, patching = checkpoint_patching(registry, manifest)
    entropy = load_entropy_model_ref(registry, entropy_ref) if entropy_ref is not None else None
    state_dict = checkpoint_state_dict(registry, manifest)
    if fmt == "hf":
        if entropy is not None and (patching is None or patching.scheme != "entropy"):
            entropy = None  # transformers patches in forward by the plain threshold rule only
        return write_hf_folder(out_url, config, state_dict, entropy, patching)
    return write_meta_hub_folder(out_url, config, state_dict, entropy, patching, name=manifest.name)


def load_trained_blt(registry: Registry, ref: str, device: str | torch.device = "cpu") -> tuple[BLT, Manifest]:
    """A registered `blt-checkpoint`, trained here (DCP, resharded) or imported (safetensors),
    as a plain fp32 BLT in one process."""
    manifest = registry.resolve(ref, area="models", kind="blt-checkpoint")
    model = BLT(checkpoint_config(manifest))
    load_blt_weights(registry, manifest, model)
    return model.to(device).eval(), manifest
