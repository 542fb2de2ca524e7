"""The entropy model: a small Llama-style byte LM whose next-byte entropies place patch
boundaries (BLT paper, section 2.3).

Token ids follow BLT: byte b is b + 4; 0 is pad/BOE, 1 BOS, 2 EOS, 3 reserved; vocab 260.
Attention is local block-causal: a token sees the previous `window - 1` tokens of its own
document and itself (Meta's `local_block_causal` with `sliding_window=512`).

On storage a model is a directory (any fsspec URL) holding `config.json` and
`model.safetensors`. Meta's released layout (`params.json` + `consolidated.pth`) is read by
`import_official_entropy_model`.

Invariant: every loaded tensor is consumed, and shaped as the model expects; anything else is a
`CheckpointMismatchError` naming the key and the shapes.
"""

from __future__ import annotations

import json
from typing import Any, Mapping

import fsspec
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from torch import nn

from blt_model.layers import KVSlot, RMSNorm, TransformerBlock, build_attention_mask, rope_cos_sin

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
