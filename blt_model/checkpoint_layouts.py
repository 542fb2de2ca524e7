"""Released BLT checkpoints as folders: the layouts users download, read and written.

Read (`read_blt_source`, layout detected from the files by `detect_blt_layout`):

    meta-consolidated  params.json {"model": ByteLatentTransformerArgs, "data": {"patcher_args"}}
                       + consolidated.pth {"model": state_dict} (or consolidated/consolidated.pth);
                       entropy_model/ (params.json + consolidated.pth) inside, or beside it as
                       in Meta's snapshot (facebook/blt: blt_1b/, blt_7b/, entropy_model/)
    meta-hub           config.json {"args": ByteLatentTransformerArgs} + model.safetensors
                       (+ train_args.json, a params.json)       facebook/blt-1b, PyTorchModelHubMixin
    hf-blt             config.json {"model_type": "blt", ...} + model.safetensors or a sharded set;
                       the patcher (entropy model) inside, under `model.patcher.`   transformers

Written (`write_hf_folder`, `write_meta_hub_folder`): the last two, such that transformers'
`BltForCausalLM.from_pretrained(DIR)` and Meta's `ByteLatentTransformer.from_pretrained(DIR)`
load them. A meta-hub export carries its entropy model in `entropy_model/` (Meta's hub layout of
`LMTransformer`, as `facebook/blt-entropy`), which our import finds there.

Invariant: a folder is read completely or not at all. Every tensor is consumed with the shape
`BLT(config)` has (interop.check_state_dict), every Meta option we do not compute is refused by
name, nothing is fetched from a network hub, and pickles load with `weights_only=True`.
The entropy model of a folder is read by `entropy_model.read_entropy_model_source`, which owns
those layouts; this module only says where it is.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Mapping

import fsspec
import torch
from safetensors.torch import save_file

from blt_data.patching import PatchRule
from blt_model.blt import BLTConfig
from blt_model.entropy_model import (
    _HF_LAYER_KEYS,
    _HF_TOP_KEYS,
    EntropyModel,
    EntropyModelConfig,
    official_weights,
)
from blt_model.interop import (
    InteropError,
    check_state_dict,
    config_from_hf_config,
    config_from_meta_args,
    hf_config_from_config,
    meta_args_from_config,
    state_dict_from_hf,
    state_dict_to_hf,
)
from blt_model.layers import ffn_hidden_dim
from blt_model.safetensors_files import SafetensorsError, join_url, read_safetensors_set

BLT_LAYOUTS = ("meta-consolidated", "meta-hub", "hf-blt")
ENTROPY_DIR = "entropy_model"  # Meta's snapshot keeps its entropy model here; so do our exports
# Meta's PatcherArgs defaults (bytelatent/data/patcher.py) for keys a patcher_args leaves out.
_META_PATCHER_DEFAULTS = {
    "patching_mode": "entropy", "threshold": 1.335442066192627, "threshold_add": None,
    "max_patch_length": None, "patch_size": 4.5, "monotonicity": False,
}  # fmt: skip


@dataclass
class BLTSource:
    """What `read_blt_source` found in a folder."""

    config: BLTConfig
    state_dict: dict[str, torch.Tensor]  # ours (= Meta's keys), dtypes as stored
    layout: str
    files: list[str]  # read, relative to the folder
    sha256: str  # consolidated.pth: of the file; safetensors: of the config and the tensors read
    patching: PatchRule | None  # the patch rule released with it, when the folder says
    entropy_url: str | None  # folder holding its entropy model (for read_entropy_model_source)


def _read_json(url: str) -> Any:
    try:
        with fsspec.open(url, "r") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise InteropError(f"{url} is not valid JSON ({e})") from None


def _exists(url: str) -> bool:
    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path)


def detect_blt_layout(url: str) -> str:
    """Which of `BLT_LAYOUTS` the folder `url` holds; FileNotFoundError / InteropError saying
    what was expected otherwise."""
    fs, path = fsspec.core.url_to_fs(url)
    if not fs.isdir(path):
        raise FileNotFoundError(f"no folder {url}")
    if fs.exists(join_url(path, "config.json")):
        config = _read_json(join_url(url, "config.json"))
        if isinstance(config, dict) and config.get("model_type") == "blt":
            return "hf-blt"
        if isinstance(config, dict) and isinstance(config.get("args"), dict):
            if "dim_global" not in config["args"]:
                raise InteropError(
                    f"{url} holds an entropy model in Meta's hub layout, not a BLT "
                    "(import it with blt-data import-entropy-model, or pass it as --entropy-model)"
                )
            return "meta-hub"
        model_type = config.get("model_type") if isinstance(config, dict) else None
        raise InteropError(
            f"{join_url(url, 'config.json')}: not a BLT (model_type {model_type!r}; expected "
            "transformers' 'blt' or Meta's hub layout {\"args\": ...})"
        )
    if fs.exists(join_url(path, "params.json")):
        params = _read_json(join_url(url, "params.json"))
        if not isinstance(params, dict) or not isinstance(params.get("model"), dict):
            raise InteropError(f"{join_url(url, 'params.json')} has no 'model' section (BLT args)")
        return "meta-consolidated"
    raise FileNotFoundError(
        f"no BLT under {url}: expected params.json + consolidated.pth (Meta's consolidated "
        "folder), or config.json + model.safetensors (Meta's hub layout or transformers')"
    )


def patch_rule_from_meta(patcher_args: Mapping[str, Any], source: str) -> PatchRule:
    """PatchRule from Meta's `PatcherArgs` dict (`params.json["data"]["patcher_args"]`)."""
    p = {**_META_PATCHER_DEFAULTS, **patcher_args}
    mode = p["patching_mode"]
    if p["threshold_add"] is not None:
        raise InteropError(f"{source}: patcher_args.threshold_add (Meta's combined rule) is not supported")
    try:
        if mode == "entropy":
            scheme = "monotonic" if p["monotonicity"] else "entropy"
            return PatchRule(scheme=scheme, threshold=p["threshold"], max_patch_length=p["max_patch_length"])
        if mode in ("space", "byte"):
            return PatchRule(scheme=mode, max_patch_length=p["max_patch_length"])
        if mode == "static" and float(p["patch_size"]).is_integer():
            return PatchRule(scheme="static", patch_size=int(p["patch_size"]))
    except ValueError as e:
        raise InteropError(f"{source}: patcher_args do not give a patch rule we apply: {e}") from None
    raise InteropError(
        f"{source}: patcher_args.patching_mode {mode!r} (patch_size {p['patch_size']}) is not supported"
    )


def patch_rule_from_hf(config: Mapping[str, Any]) -> PatchRule | None:
    """PatchRule from a transformers `BltConfig` dict; None when it does not patch in forward.
    transformers' rule is ours: BOS and byte 0 start patches, byte j > 0 when its entropy is
    above the threshold (`BltPatcher.patch_lengths_from_entropies`)."""
    if not config.get("patch_in_forward"):
        return None
    mode = config.get("patching_mode") or "entropy"
    if mode != "entropy":
        raise InteropError(f"transformers BLT config: patching_mode {mode!r} is not supported in forward")
    return PatchRule(
        scheme="entropy",
        threshold=config.get("patching_threshold"),
        max_patch_length=config.get("max_patch_length"),
    )


def _check_tensors(state_dict: Mapping[str, Any], source: str) -> None:
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            raise InteropError(f"{source}: {key} is not a floating-point tensor ({type(value).__name__})")


def _read_meta_consolidated(url: str) -> BLTSource:
    params = _read_json(join_url(url, "params.json"))
    config = config_from_meta_args(params["model"])
    patcher_args = (params.get("data") or {}).get("patcher_args")
    patching = None if patcher_args is None else patch_rule_from_meta(patcher_args, join_url(url, "params.json"))
    fs, weights = official_weights(url)
    rel = weights[len(fsspec.core.url_to_fs(url)[1].rstrip("/")) + 1 :]
    source = join_url(url, rel)
    h = hashlib.sha256()
    with fs.open(weights, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))
    try:
        if local:  # mmap: a 7B snapshot is not read into memory twice
            checkpoint = torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
        else:
            with fs.open(weights, "rb") as f:
                checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise InteropError(f"{source} is not a readable torch checkpoint ({type(e).__name__}: {e})") from None
    state_dict = checkpoint.get("model") if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise InteropError(f"{source}: expected a dict with a 'model' state dict")
    _check_tensors(state_dict, source)
    check_state_dict(state_dict, config)
    # Meta's snapshot (facebook/blt: blt_1b/, blt_7b/, entropy_model/) keeps the entropy model
    # beside the BLT folders; a folder of its own may hold it inside.
    parent = url.rstrip("/").rsplit("/", 1)[0]
    entropy = next(
        (e for e in (join_url(url, ENTROPY_DIR), join_url(parent, ENTROPY_DIR))
         if _exists(join_url(e, "params.json")) or _exists(join_url(e, "config.json"))),
        None,
    )  # fmt: skip
    return BLTSource(config, dict(state_dict), "meta-consolidated", ["params.json", rel], h.hexdigest(), patching, entropy)


def _read_safetensors(url: str, select, digest) -> tuple[dict[str, torch.Tensor], list[str]]:
    try:
        return read_safetensors_set(url, select, digest)
    except SafetensorsError as e:
        raise InteropError(str(e)) from None


def _read_meta_hub(url: str) -> BLTSource:
    config_json = _read_json(join_url(url, "config.json"))
    config = config_from_meta_args(config_json["args"])
    digest = hashlib.sha256(json.dumps(config_json, sort_keys=True).encode())
    state_dict, files = _read_safetensors(url, None, digest)
    _check_tensors(state_dict, url)
    check_state_dict(state_dict, config)
    patching, files = None, ["config.json", *files]
    if _exists(join_url(url, "train_args.json")):  # a copy of the training params.json
        train_args = _read_json(join_url(url, "train_args.json"))
        patcher_args = ((train_args or {}).get("data") or {}).get("patcher_args")
        if patcher_args is not None:
            patching = patch_rule_from_meta(patcher_args, join_url(url, "train_args.json"))
        files.append("train_args.json")
    entropy = join_url(url, ENTROPY_DIR)
    return BLTSource(
        config, state_dict, "meta-hub", files, digest.hexdigest(), patching,
        entropy if _exists(join_url(entropy, "config.json")) else None,
    )  # fmt: skip


def _read_hf(url: str) -> BLTSource:
    hf = _read_json(join_url(url, "config.json"))
    config = config_from_hf_config(hf)
    digest = hashlib.sha256(json.dumps(hf, sort_keys=True).encode())
    # The patcher is the entropy model's business (read_entropy_model_source reads it).
    tensors, files = _read_safetensors(url, lambda key: not key.startswith("model.patcher."), digest)
    if tensors and not any(key.startswith("model.") for key in tensors):
        raise InteropError(f"{url}: no tensor under 'model.': a BltModel, not a BltForCausalLM (no lm_head)")
    _check_tensors(tensors, url)
    state_dict, _ = state_dict_from_hf(tensors, config)
    patching = patch_rule_from_hf(hf)
    has_patcher = bool(hf.get("patch_in_forward")) and isinstance(hf.get("patcher_config"), dict)
    return BLTSource(config, state_dict, "hf-blt", ["config.json", *files], digest.hexdigest(), patching,
                     url if has_patcher else None)


def read_blt_source(url: str) -> BLTSource:
    """The BLT in the folder `url` (local or any fsspec URL), in any of `BLT_LAYOUTS`."""
    layout = detect_blt_layout(url)
    return {"meta-consolidated": _read_meta_consolidated, "meta-hub": _read_meta_hub, "hf-blt": _read_hf}[layout](url)


# --- writing ---------------------------------------------------------------------------------


def hf_patcher_config_from(config: EntropyModelConfig) -> dict[str, Any]:
    """transformers' `BltPatcherConfig` dict for our entropy model (inverse of
    `entropy_model.hf_patcher_config`)."""
    return {
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "intermediate_size": ffn_hidden_dim(config.dim, config.ffn_dim_multiplier),
        "sliding_window": config.window,
        "max_position_embeddings": config.max_seqlen,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }


def hf_patcher_state_dict_from(model: EntropyModel) -> dict[str, torch.Tensor]:
    """Our entropy model's tensors under `BltForCausalLM`'s `model.patcher.` names."""
    layer_names = {ours: theirs for theirs, ours in _HF_LAYER_KEYS.items()}
    top_names = {ours: theirs for theirs, ours in _HF_TOP_KEYS.items()}
    out = {}
    for key, value in model.state_dict().items():
        stem = key.removesuffix(".weight")
        if stem.startswith("layers."):
            _, index, rest = stem.split(".", 2)
            name = f"layers.{index}.{layer_names[rest]}"
        else:
            name = top_names[stem]
        out[f"model.patcher.{name}.weight"] = value
    return out


def meta_entropy_args_from(config: EntropyModelConfig) -> dict[str, Any]:
    """Meta's `LMTransformerArgs` dict for our entropy model (what `official_config` reads)."""
    return {
        "dim": config.dim, "n_layers": config.n_layers, "n_heads": config.n_heads,
        "head_dim": None, "n_kv_heads": None, "ffn_dim_multiplier": config.ffn_dim_multiplier,
        "multiple_of": 256, "norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
        "max_seqlen": config.max_seqlen, "vocab_size": config.vocab_size, "weight_tying": False,
        "sliding_window": config.window, "attn_impl": "xformers",
        "attn_bias_type": "local_block_causal",
    }  # fmt: skip


def meta_patcher_args_from(patching: PatchRule | None) -> dict[str, Any] | None:
    """Meta's `PatcherArgs` dict for a patch rule (None for rules Meta has no name for)."""
    if patching is None:
        return None
    if patching.scheme in ("entropy", "monotonic"):
        return {"patching_mode": "entropy", "threshold": patching.threshold,
                "monotonicity": patching.scheme == "monotonic", "max_patch_length": patching.max_patch_length}
    if patching.scheme == "static":
        return {"patching_mode": "static", "patch_size": patching.patch_size}
    return {"patching_mode": patching.scheme, "max_patch_length": patching.max_patch_length}


def _put_safetensors(tensors: Mapping[str, torch.Tensor], url: str, metadata: dict[str, str] | None = None) -> None:
    """Write one safetensors file to any fsspec URL (through a local temp file: safetensors
    writes paths, and the store then sees one whole object)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix="blt-export-", suffix=".safetensors")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        fs, path = fsspec.core.url_to_fs(url)
        fs.put_file(tmp, path)
    finally:
        os.unlink(tmp)


def _put_json(data: Any, url: str) -> None:
    with fsspec.open(url, "w") as f:
        f.write(json.dumps(data, indent=2) + "\n")


def _make_dir(url: str) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    # A sharded set left there would win over the new single file when the folder is loaded.
    if fs.exists(join_url(path, "model.safetensors.index.json")):
        raise InteropError(f"{url} holds a sharded checkpoint (model.safetensors.index.json); export into another folder")
    fs.makedirs(path, exist_ok=True)


def write_hf_folder(
    url: str,
    config: BLTConfig,
    state_dict: Mapping[str, torch.Tensor],
    entropy_model: EntropyModel | None = None,
    patching: PatchRule | None = None,
) -> list[str]:
    """transformers' layout: config.json + model.safetensors (`BltForCausalLM`); with an entropy
    model, its patcher inside and `patch_in_forward` on (entropy rule only). Returns the files."""
    patcher_config = None
    if entropy_model is not None:
        if patching is None or patching.scheme != "entropy" or patching.threshold is None:
            raise InteropError(
                "transformers' BLT patches in forward by the global-threshold entropy rule only; "
                f"this checkpoint's rule is {patching.scheme if patching else 'unknown'!s}"
            )
        patcher_config = hf_patcher_config_from(entropy_model.config)
    hf = hf_config_from_config(config, patcher_config)
    tensors = state_dict_to_hf(state_dict, config)
    if patcher_config is not None:
        hf |= {"patching_threshold": patching.threshold, "max_patch_length": patching.max_patch_length,
               "patching_mode": "entropy"}  # fmt: skip
        tensors |= hf_patcher_state_dict_from(entropy_model)
    _make_dir(url)
    # Weights first, config last: a folder with a config.json is complete.
    _put_safetensors(tensors, join_url(url, "model.safetensors"), {"format": "pt"})
    _put_json(hf, join_url(url, "config.json"))
    return ["model.safetensors", "config.json"]


def write_meta_hub_folder(
    url: str,
    config: BLTConfig,
    state_dict: Mapping[str, torch.Tensor],
    entropy_model: EntropyModel | None = None,
    patching: PatchRule | None = None,
    name: str = "blt",
) -> list[str]:
    """Meta's hub layout (what `PyTorchModelHubMixin.save_pretrained` writes for
    `ByteLatentTransformer`): config.json {"args"} + model.safetensors + train_args.json (a
    `TrainArgs` dict holding the patcher args, read by Meta's `BltTokenizerAndPatcher`); the
    entropy model, if any, in entropy_model/ in the same layout. Returns the files."""
    check_state_dict(state_dict, config)
    args = meta_args_from_config(config)
    patcher_args = meta_patcher_args_from(patching)
    if patcher_args is not None:  # Meta's model args repeat the patch rule (patch_in_forward reads them)
        args |= {("patching_threshold" if k == "threshold" else k): v for k, v in patcher_args.items()}
    files = []
    _make_dir(url)
    if entropy_model is not None:
        entropy_url = join_url(url, ENTROPY_DIR)
        _make_dir(entropy_url)
        _put_safetensors(entropy_model.state_dict(), join_url(entropy_url, "model.safetensors"), {"format": "pt"})
        _put_json({"args": meta_entropy_args_from(entropy_model.config)}, join_url(entropy_url, "config.json"))
        files += [f"{ENTROPY_DIR}/model.safetensors", f"{ENTROPY_DIR}/config.json"]
    data: dict[str, Any] = {"tokenizer_args": {"name": "blt"}}
    if patcher_args is not None:
        data["patcher_args"] = patcher_args
    _put_json({"name": name, "model": args, "data": data}, join_url(url, "train_args.json"))
    _put_safetensors(state_dict, join_url(url, "model.safetensors"), {"format": "pt"})
    _put_json({"args": args}, join_url(url, "config.json"))
    return [*files, "train_args.json", "model.safetensors", "config.json"]
