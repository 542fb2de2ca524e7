"""The entropy model: a small Llama-style byte LM whose next-byte entropies place patch
boundaries (BLT paper, section 2.3).

Token ids follow BLT: byte b is b + 4; 0 is pad/BOE, 1 BOS, 2 EOS, 3 reserved; vocab 260.
Attention is local block-causal: a token sees the previous `window - 1` tokens of its own
document and itself (Meta's `local_block_causal` with `sliding_window=512`).

On storage a model is a directory (any fsspec URL) holding `config.json` and
`model.safetensors`. `read_entropy_model_source` reads the layouts released models come in,
detected from the files (`detect_layout`):

    meta-consolidated  params.json (+ its `entropy_model` section) + consolidated.pth
    meta-hub           config.json = {"args": LMTransformerArgs} + model.safetensors
                       (`facebook/blt-entropy`, PyTorchModelHubMixin)
    hf-blt-patcher     config.json with model_type "blt_patcher" + safetensors (transformers'
                       `BltPatcher`)
    hf-blt             config.json with model_type "blt" and a `patcher_config`; the patcher's
                       tensors under `model.patcher.` (BltForCausalLM) or `patcher.` (BltModel)
                       of a safetensors set, possibly sharded (only those tensors are read)
    blt-data           our own config.json + model.safetensors

Hugging Face's patcher is the same function under other names: its RoPE rotates adjacent pairs
(`repeat_interleave`, not Llama's half split), so q/k weights need no permutation.

Invariant: every loaded tensor is consumed, and shaped as the model expects; anything else is a
`CheckpointMismatchError` naming the key and the shapes.

Length: the model itself is ~150 lines; the rest is the layouts it loads from (Meta, Meta hub,
transformers) and the incremental stream. TODO(entropy-layouts): move the layouts beside
checkpoint_layouts.py.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from blt_data.entropy import HIDDEN_DOC_ID, Carry, entropies_from_hidden
from blt_model.layers import (
    KVSlot,
    RMSNorm,
    TransformerBlock,
    build_attention_mask,
    ffn_hidden_dim,
    rope_cos_sin,
)
from blt_model.safetensors_files import SafetensorsError, read_safetensors_set

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


class EntropyModelConfig(BaseModel):
    """Shape of the entropy model. Defaults are the released BLT entropy model (~100M params)."""

    model_config = ConfigDict(extra="forbid")

    dim: int = Field(768, gt=0, description="model width")
    n_layers: int = Field(14, ge=0, description="transformer blocks")
    n_heads: int = Field(12, gt=0, description="attention heads; head_dim = dim / n_heads")
    window: int = Field(512, gt=0, description="sliding attention window in tokens, self included")
    max_seqlen: int = Field(8192, gt=0, description="row length in tokens used for scoring")
    vocab_size: int = Field(260, gt=0, description="256 bytes + 4 special ids")
    ffn_dim_multiplier: float | None = Field(1.0, description="scales the SwiGLU width")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")

    @model_validator(mode="after")
    def _heads_divide_dim(self) -> "EntropyModelConfig":
        if self.dim % self.n_heads or (self.dim // self.n_heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.n_heads} heads of even size")
        return self


class EntropyModel(nn.Module):
    """Byte LM: tok_embeddings -> layers -> norm -> output (untied)."""

    def __init__(self, config: EntropyModelConfig):
        super().__init__()
        self.config = config
        # Read by the scorer (blt_data.entropy.ScoringModel).
        self.window = config.window
        self.max_seqlen = config.max_seqlen
        # Stacked sliding windows: a token's output depends on up to this many tokens before it.
        self.context_tokens = self.context_tokens_of(config)
        self.head_dim = config.dim // config.n_heads
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(
            TransformerBlock(config.dim, config.n_heads, config.ffn_dim_multiplier, config.norm_eps)
            for _ in range(config.n_layers)
        )
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        self.reset_parameters()

    @staticmethod
    def context_tokens_of(config: EntropyModelConfig) -> int:
        return config.n_layers * (config.window - 1)

    def reset_parameters(self) -> None:
        # Meta's init: truncated normals with std dim^-0.5 (fan-in for the FFN output).
        std = self.config.dim**-0.5
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)
        self.norm.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()

    def hidden(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor,
        positions: torch.Tensor,
        carry: Any = None,
    ) -> torch.Tensor:
        """Final hidden states (after the final norm), (B, S, dim), for packed rows.

        tokens, doc_ids, positions: (B, S) integers. Tokens with equal doc id form one document
        segment whose positions count up by one; `output` maps the result to logits.
        carry: rows that continue the previous batch's rows (`blt_data.entropy.Carry`): its
            `rows`, `doc_ids` and `positions` (B, window) describe the `window` keys each row
            carries in; its `layers` (one `KVSlot` per layer, of the previous batch, or None)
            are read, then replaced by this batch's, for the next batch.
        """
        slots = [None] * len(self.layers)
        carried_doc_ids = carried_positions = None
        if carry is not None:
            previous = carry.layers or [KVSlot(self.window) for _ in self.layers]
            slots = [slot.select(carry.rows) for slot in previous]
            carried_doc_ids, carried_positions = carry.doc_ids, carry.positions
        mask = build_attention_mask(
            doc_ids,
            positions,
            self.window,
            carried_doc_ids=carried_doc_ids,
            carried_positions=carried_positions,
        )
        rope = rope_cos_sin(positions, self.head_dim, self.config.rope_theta)
        h = self.tok_embeddings(tokens)
        for layer, slot in zip(self.layers, slots, strict=True):
            h = layer(h, rope, mask, slot)
        if carry is not None:
            carry.layers = slots
        return self.norm(h)

    def forward(
        self,
        tokens: torch.Tensor,
        doc_ids: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits (B, S, vocab). Without doc_ids/positions each row is one document."""
        if doc_ids is None:
            doc_ids = torch.zeros_like(tokens)
        if positions is None:
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        return self.output(self.hidden(tokens, doc_ids, positions))


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the model they are loaded into."""


def load_checked_state_dict(model: nn.Module, state_dict: Mapping[str, Any], source: str) -> None:
    """Load `state_dict` into `model`, refusing unknown keys, missing keys and wrong shapes."""
    expected = model.state_dict()
    problems = [
        f"missing key {key!r} (model expects shape {tuple(expected[key].shape)})"
        for key in sorted(expected.keys() - state_dict.keys())
    ]
    for key in sorted(state_dict.keys() - expected.keys()):
        value = state_dict[key]
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        problems.append(f"unknown key {key!r} (checkpoint shape {shape})")
    for key in sorted(expected.keys() & state_dict.keys()):
        value = state_dict[key]
        if not isinstance(value, torch.Tensor) or not value.is_floating_point():
            problems.append(f"key {key!r} is not a floating-point tensor ({type(value).__name__})")
        elif value.shape != expected[key].shape:
            problems.append(
                f"shape mismatch for {key!r}: checkpoint {tuple(value.shape)}, "
                f"model {tuple(expected[key].shape)}"
            )
    if problems:
        raise CheckpointMismatchError(
            f"{source} does not fit the entropy model: " + "; ".join(problems)
        )
    model.load_state_dict(state_dict, strict=True)


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def save_entropy_model(model: EntropyModel, url: str) -> None:
    """Write `config.json` and `model.safetensors` under the directory `url` (any fsspec URL)."""
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(path, exist_ok=True)
    tensors = {key: value.detach().cpu().contiguous() for key, value in model.state_dict().items()}
    # Weights first, config last: a directory with a config.json is complete.
    with fsspec.open(_join(url, WEIGHTS_FILE), "wb") as f:
        f.write(safetensors_save(tensors))
    with fsspec.open(_join(url, CONFIG_FILE), "w") as f:
        f.write(model.config.model_dump_json(indent=2))


def entropy_model_to_bytes(model: EntropyModel) -> tuple[bytes, bytes]:
    """(config.json, model.safetensors) contents of a model, fp32 on CPU."""
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in model.state_dict().items()}
    return model.config.model_dump_json(indent=2).encode(), safetensors_save(tensors)


def entropy_model_from_bytes(config_json: bytes | str, weights: bytes, source: str) -> EntropyModel:
    """The inverse of `entropy_model_to_bytes`; returned on CPU in eval mode, fp32."""
    config = EntropyModelConfig.model_validate_json(config_json)
    try:
        state_dict = safetensors_load(weights)
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise CheckpointMismatchError(f"{source} is not a readable safetensors file: {e}") from None
    model = EntropyModel(config)
    load_checked_state_dict(model, state_dict, source)
    return model.eval()


def load_entropy_model(url: str, device: str | torch.device = "cpu") -> EntropyModel:
    """Read a model written by `save_entropy_model`; returned in eval mode, fp32."""
    with fsspec.open(_join(url, CONFIG_FILE), "r") as f:
        config_json = f.read()
    with fsspec.open(_join(url, WEIGHTS_FILE), "rb") as f:
        weights = f.read()
    return entropy_model_from_bytes(config_json, weights, _join(url, WEIGHTS_FILE)).to(device)


def official_config(params: Mapping[str, Any]) -> EntropyModelConfig:
    """EntropyModelConfig from a released `params.json` (its `entropy_model` section, or the
    section itself). Shapes the official LMTransformer could build but we cannot are refused."""
    p = params.get("entropy_model", params)

    def refuse(message: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"params.json: {message}")

    for key in ("dim", "n_layers", "vocab_size"):
        if p.get(key) is None:
            raise refuse(f"entropy_model.{key} is missing")
    dim = p["dim"]
    n_heads = p.get("n_heads") or (dim // p["head_dim"] if p.get("head_dim") else None)
    if n_heads is None:
        raise refuse("needs n_heads or head_dim")
    if p.get("head_dim") not in (None, dim // n_heads):
        raise refuse(f"head_dim {p['head_dim']} != dim / n_heads = {dim // n_heads}")
    if p.get("n_kv_heads") not in (None, n_heads):
        raise refuse(f"grouped-query attention (n_kv_heads={p['n_kv_heads']}) is not supported")
    if p.get("multiple_of", 256) != 256:
        raise refuse(f"multiple_of {p['multiple_of']} is not supported (only 256)")
    if p.get("weight_tying"):
        raise refuse("tied input/output embeddings are not supported")
    # Meta's loader (bytelatent/entropy_model.py) hard-codes sliding_window=512 whatever the
    # params say; prefer the params when they name a window, fall back to 512 like Meta.
    window = p.get("sliding_window") or p.get("attn_window") or 512
    return EntropyModelConfig(
        dim=dim,
        n_layers=p["n_layers"],
        n_heads=n_heads,
        window=window,
        max_seqlen=p.get("max_seqlen") or 8192,
        vocab_size=p["vocab_size"],
        ffn_dim_multiplier=p.get("ffn_dim_multiplier"),
        rope_theta=p.get("rope_theta") or 10000.0,
        norm_eps=p.get("norm_eps") or 1e-5,
    )


def official_weights(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """Filesystem and path of a released `consolidated.pth` (top level or nested)."""
    fs, path = fsspec.core.url_to_fs(url)
    candidates = [_join(path, "consolidated.pth"), _join(path, "consolidated/consolidated.pth")]
    weights = next((c for c in candidates if fs.exists(c)), None)
    if weights is None:
        raise FileNotFoundError(f"no consolidated.pth under {url}")
    return fs, weights


def import_official_entropy_model(url: str) -> EntropyModel:
    """Build an EntropyModel from Meta's released directory: `params.json` plus
    `consolidated.pth` or `consolidated/consolidated.pth` (a dict whose `model` entry is the
    state dict). Weights are cast to fp32; the model is returned on CPU in eval mode."""
    try:
        with fsspec.open(_join(url, "params.json"), "r") as f:
            config = official_config(json.load(f))
    except FileNotFoundError:
        raise FileNotFoundError(f"no params.json under {url}") from None
    fs, weights = official_weights(url)
    with fs.open(weights, "rb") as f:
        checkpoint = torch.load(f, map_location="cpu", weights_only=True)
    state_dict = checkpoint.get("model", checkpoint) if isinstance(checkpoint, dict) else None
    if not isinstance(state_dict, dict):
        raise CheckpointMismatchError(f"{weights}: expected a dict with a 'model' state dict")
    model = EntropyModel(config)
    load_checked_state_dict(model, state_dict, weights)
    return model.eval()


ENTROPY_LAYOUTS = ("meta-consolidated", "meta-hub", "hf-blt-patcher", "hf-blt", "blt-data")


def _read_json(url: str) -> Any:
    with fsspec.open(url, "r") as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointMismatchError(f"{url} is not valid JSON ({e})") from None


def detect_layout(url: str) -> str:
    """Which of `ENTROPY_LAYOUTS` the folder `url` holds, from its files (see the module
    docstring); a folder holding none of them is a FileNotFoundError saying what was expected."""
    fs, path = fsspec.core.url_to_fs(url)
    if fs.exists(_join(path, CONFIG_FILE)):
        config = _read_json(_join(url, CONFIG_FILE))
        if not isinstance(config, dict):
            raise CheckpointMismatchError(f"{_join(url, CONFIG_FILE)} is not a JSON object")
        model_type = config.get("model_type")
        if model_type == "blt_patcher":
            return "hf-blt-patcher"
        if model_type == "blt":
            return "hf-blt"
        if isinstance(config.get("args"), dict):
            if "dim_global" in config["args"] or "patch_size" in config["args"]:
                raise CheckpointMismatchError(
                    f"{url} holds a BLT in Meta's hub layout, not an entropy model; its entropy "
                    "model is a separate folder (facebook/blt-entropy)"
                )
            return "meta-hub"
        if model_type is None and "dim" in config and "n_layers" in config:
            return "blt-data"
        raise CheckpointMismatchError(
            f"{_join(url, CONFIG_FILE)}: model_type {model_type!r} is not an entropy model layout "
            "(expected 'blt_patcher', 'blt', or Meta's {\"args\": ...})"
        )
    if fs.exists(_join(path, "params.json")):
        return "meta-consolidated"
    raise FileNotFoundError(
        f"no consolidated.pth (Meta's layout) or config.json (Hugging Face's or Meta's hub "
        f"layout) under {url}"
    )


def hf_patcher_config(p: Mapping[str, Any], source: str) -> EntropyModelConfig:
    """EntropyModelConfig from transformers' `BltPatcherConfig` (a config.json or a BLT's
    `patcher_config`); shapes the patcher could have but our model cannot are refused."""

    def refuse(message: str) -> CheckpointMismatchError:
        return CheckpointMismatchError(f"{source}: {message}")

    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads"):
        if not isinstance(p.get(key), int):
            raise refuse(f"{key} is missing")
    dim, n_heads = p["hidden_size"], p["num_attention_heads"]
    if p.get("num_key_value_heads") not in (None, n_heads):
        raise refuse(f"grouped-query attention (num_key_value_heads={p['num_key_value_heads']}) is not supported")
    if p.get("head_dim") not in (None, dim // n_heads):
        raise refuse(f"head_dim {p['head_dim']} != hidden_size / num_attention_heads = {dim // n_heads}")
    if p.get("hidden_act", "silu") != "silu":
        raise refuse(f"hidden_act {p['hidden_act']!r} is not supported (only silu)")
    if p.get("tie_word_embeddings"):
        raise refuse("tied input/output embeddings are not supported")
    rope = p.get("rope_parameters") or {}
    if rope.get("rope_type", "default") != "default":
        raise refuse(f"rope_type {rope['rope_type']!r} is not supported (only default)")
    theta = rope.get("rope_theta") or p.get("rope_theta") or 10000.0
    window = p.get("sliding_window", 512)
    if window is None:
        raise refuse("sliding_window is null (full causal attention); the scorer needs a sliding window")
    # Our SwiGLU width is Meta's formula (2/3 * 4 * dim * multiplier, rounded up to 256); HF
    # stores the width itself. Find the multiplier that gives it, or refuse.
    intermediate = p.get("intermediate_size") or int(8 * dim / 3)
    multiplier = None
    for candidate in (1.0, None, intermediate / int(2 * (4 * dim) / 3)):
        if ffn_hidden_dim(dim, candidate) == intermediate:
            multiplier = candidate
            break
    else:
        raise refuse(
            f"intermediate_size {intermediate} is not a width our SwiGLU can take (a multiple of "
            "256 from Meta's formula)"
        )
    try:
        return EntropyModelConfig(
            dim=dim,
            n_layers=p["num_hidden_layers"],
            n_heads=n_heads,
            window=window,
            max_seqlen=p.get("max_position_embeddings") or 8192,
            vocab_size=p.get("vocab_size") or 260,
            ffn_dim_multiplier=multiplier,
            rope_theta=theta,
            norm_eps=p.get("rms_norm_eps") or 1e-5,
        )
    except ValueError as e:
        raise refuse(str(e)) from None


_HF_LAYER_KEYS = {
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.up_proj": "feed_forward.w3",
    "mlp.down_proj": "feed_forward.w2",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
}
_HF_TOP_KEYS = {"embed_tokens": "tok_embeddings", "norm": "norm", "lm_head": "output"}
_HF_KEY = re.compile(r"^(?:layers\.(\d+)\.)?(.+)\.weight$")


def hf_patcher_state_dict(tensors: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Rename a `BltPatcher` state dict (prefix already stripped) to ours, as fp32; a tensor
    with no counterpart is an error naming it."""
    state_dict = {}
    for key, value in tensors.items():
        match = _HF_KEY.match(key)
        names = _HF_LAYER_KEYS if match and match.group(1) is not None else _HF_TOP_KEYS
        ours = names.get(match.group(2)) if match else None
        if ours is None:
            raise CheckpointMismatchError(f"{source}: unknown patcher tensor {key!r} (shape {tuple(value.shape)})")
        prefix = f"layers.{match.group(1)}." if match.group(1) is not None else ""
        state_dict[f"{prefix}{ours}.weight"] = value.float()
    return state_dict


@dataclass
class EntropyModelSource:
    """What `read_entropy_model_source` found: the model and what to record about it."""

    model: EntropyModel
    layout: str
    files: list[str]  # the files read, relative to the source folder
    sha256: str  # consolidated.pth: of the file; otherwise of the config and the tensors read
    threshold: float | None = None  # nats: the patch threshold the checkpoint was released with
    patching: dict[str, Any] = field(default_factory=dict)  # HF BLT: patching_mode etc.


def read_entropy_model_source(url: str) -> EntropyModelSource:
    """Read an entropy model in any of `ENTROPY_LAYOUTS` from the folder `url` (local or any
    fsspec URL); fp32, CPU, eval mode. Nothing is fetched from a network hub."""
    layout = detect_layout(url)
    if layout == "meta-consolidated":
        fs, weights = official_weights(url)
        h = hashlib.sha256()
        with fs.open(weights, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        model = import_official_entropy_model(url)
        return EntropyModelSource(model, layout, ["params.json", posixpath.basename(weights)], h.hexdigest())

    config = _read_json(_join(url, CONFIG_FILE))
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode())
    threshold, patching = None, {}
    select, strip = None, 0
    if layout == "blt-data":
        try:
            model_config = EntropyModelConfig.model_validate(config)
        except ValueError as e:
            raise CheckpointMismatchError(f"{_join(url, CONFIG_FILE)}: {e}") from None
    elif layout == "meta-hub":
        model_config = official_config(config["args"])
    elif layout == "hf-blt-patcher":
        model_config = hf_patcher_config(config, _join(url, CONFIG_FILE))
    else:
        if not config.get("patch_in_forward", True) or not isinstance(config.get("patcher_config"), dict):
            raise CheckpointMismatchError(
                f"{url}: this BLT checkpoint carries no patcher (patch_in_forward is false or "
                "patcher_config is missing)"
            )
        model_config = hf_patcher_config(config["patcher_config"], f"{_join(url, CONFIG_FILE)} patcher_config")
        patching = {k: config.get(k) for k in ("patching_mode", "patching_threshold", "max_patch_length", "patch_size")}
        if config.get("patching_mode", "entropy") == "entropy" and config.get("patching_threshold") is not None:
            threshold = float(config["patching_threshold"])
        # BltForCausalLM saves `model.patcher.*`, BltModel `patcher.*`; the rest is the BLT.
        prefixes = ("model.patcher.", "patcher.")
        select = lambda key: key.startswith(prefixes)  # noqa: E731
    try:
        tensors, files = read_safetensors_set(url, select, digest)
    except SafetensorsError as e:
        raise CheckpointMismatchError(str(e)) from None
    source = f"{url} ({files[-1] if len(files) == 1 else files[0]})"
    if layout == "hf-blt":
        if not tensors:
            raise CheckpointMismatchError(f"{source}: no tensor under 'model.patcher.' or 'patcher.'")
        found = {key.split("patcher.", 1)[0] + "patcher." for key in tensors}
        if len(found) > 1:
            raise CheckpointMismatchError(f"{source}: patcher tensors under two prefixes {sorted(found)}")
        strip = len(found.pop())
        tensors = {key[strip:]: value for key, value in tensors.items()}
    if layout in ("hf-blt-patcher", "hf-blt"):
        state_dict = hf_patcher_state_dict(tensors, source)
    else:
        state_dict = {key: value.float() for key, value in tensors.items()}
    model = EntropyModel(model_config)
    load_checked_state_dict(model, state_dict, source)
    return EntropyModelSource(model.eval(), layout, [CONFIG_FILE, *files], digest.hexdigest(), threshold, patching)


class EntropyStream:
    """One document scored a few tokens at a time, for generation: each `feed` runs the model
    on the new tokens only, as a row that continues the previous feed's row with the keys and
    values it carries (`hidden(carry=...)`, the same carry that packed scoring uses across
    batches), so the cost per token does not grow with the document.

    Exact, not approximate: in every layer a token attends to itself and the `window - 1`
    tokens before it, all of them carried. So `feed` gives the entropies
    `score_document_alone` gives, up to float rounding (tested to 1e-5 in fp32). Token i is at
    RoPE position i, as in the full forward.
    """

    def __init__(self, model: EntropyModel):
        self.model = model
        self.position = 0  # tokens fed so far
        self._layers: list | None = None  # the carried keys/values (one KVSlot per layer)

    @torch.no_grad()
    def feed(self, tokens: list[int] | torch.Tensor) -> torch.Tensor:
        """Entropies (nats, fp32, on the model's device) of the prediction at each new token:
        the value at token i is H(token i + 1 | tokens <= i); with BOS first that is
        `entropies[i]` of DESIGN.md §4. Long inputs go in pieces of one window."""
        tokens = torch.as_tensor(tokens, dtype=torch.int64).reshape(-1)
        out = [self._feed(tokens[i : i + self.model.config.window]) for i in range(0, tokens.numel(), self.model.config.window)]
        return torch.cat(out) if out else torch.zeros(0)

    def _feed(self, tokens: torch.Tensor) -> torch.Tensor:
        model, window = self.model, self.model.window
        device = model.output.weight.device
        new = tokens.numel()
        # The `window` carried keys are the tokens just before this feed; those before the
        # document's start do not exist and are hidden.
        carried = torch.arange(self.position - window, self.position, device=device)[None]
        carry = Carry(
            rows=torch.tensor([0 if self.position else -1], device=device),
            doc_ids=torch.where(carried >= 0, 0, HIDDEN_DOC_ID),
            positions=carried.clamp(min=0),
            layers=self._layers,
        )
        positions = torch.arange(self.position, self.position + new, device=device)[None]
        h = model.hidden(tokens.to(device)[None], torch.zeros_like(positions), positions, carry=carry)
        self._layers = carry.layers
        self.position += new
        return entropies_from_hidden(model.output, h[0])
