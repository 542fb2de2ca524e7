"""The Byte Latent Transformer (BLT paper, "Byte Latent Transformer: Patches Scale Better Than
Tokens", section 3): bytes -> local encoder -> patches -> global transformer -> local decoder ->
next-byte logits.

Letters used in shape comments:
    B        rows in a batch
    T        bytes (token ids) per row
    P        patches per row (the batch's `patch_lengths.shape[1]`, zero-padded on the right)
    D_local  width of the local encoder and decoder (`dim_local`)
    D_global width of the global transformer and of patch representations (`dim_global`)
    V        vocabulary: 256 bytes + 4 special ids = 260

Token ids follow BLT: byte b is b + 4; 0 pad, 1 BOS, 2 EOS, 3 reserved. A row packs documents
back to back; `doc_ids` (B, T) numbers them along the row and `patch_lengths` (B, P) cuts the
row into patches that never span two documents.

Invariant: nothing crosses a document. Byte self-attention, patch self-attention, both
cross-attentions and the n-gram hashes only see the token's own document within the row, and
everything is causal in bytes: the logits at byte t depend only on bytes <= t of its document
(and on the patch lengths). So a document's logits do not depend on what it is packed with.
All visibility is built once per batch by `BLT.build_masks`; FlexAttention on CUDA and masked
SDPA (the plain reference path) elsewhere compute the same thing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from blt_model.layers import (
    AttentionMask,
    RMSNorm,
    Rope,
    TransformerBlock,
    attend,
    build_attention_mask,
    build_cross_attention_mask,
    rope_cos_sin,
)

PRESET_DIR = Path(__file__).resolve().parent / "presets" / "blt"  # package data: works installed
IGNORE_INDEX = -100
# Rolling polynomial hash mod the Mersenne prime 2^31 - 1: every partial sum and product stays
# far below 2^63, so the int64 arithmetic is exact on every device (no overflow wrap-around).
HASH_MODULUS = 2**31 - 1
HASH_BASE = 1_000_003


class BLTConfig(BaseModel):
    """Shape of the BLT. Defaults are the `100m` preset."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(260, gt=0, description="256 bytes + 4 special ids")
    dim_local: int = Field(384, gt=0, description="width of the local encoder and decoder")
    dim_global: int = Field(768, gt=0, description="width of the global transformer and patches")
    n_heads_local: int = Field(6, gt=0, description="attention heads in the local models")
    n_heads_global: int = Field(12, gt=0, description="attention heads in the global transformer")
    n_layers_local_encoder: int = Field(1, ge=0, description="byte blocks before pooling")
    n_layers_global: int = Field(12, ge=0, description="transformer blocks over patches")
    n_layers_local_decoder: int = Field(4, ge=0, description="byte blocks after cross-attention")
    window_local: int = Field(512, gt=0, description="local attention window, bytes, self included")
    hash_ngram_sizes: list[int] = Field(
        [3, 4, 5, 6, 7, 8], min_length=1, description="n of each hash n-gram embedding table"
    )
    hash_table_size: int = Field(8192, gt=0, description="rows per hash n-gram embedding table")
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (bytes and patches)")
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    ffn_dim_multiplier: float | None = Field(1.0, description="scales the SwiGLU width")

    @model_validator(mode="after")
    def _check_shapes(self) -> "BLTConfig":
        for name, dim, heads in (
            ("dim_local", self.dim_local, self.n_heads_local),
            ("dim_global", self.dim_global, self.n_heads_global),
        ):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(f"{name} {dim} must split into {heads} heads of even size")
        if any(n < 1 for n in self.hash_ngram_sizes):
            raise ValueError(f"hash_ngram_sizes must be >= 1, got {self.hash_ngram_sizes}")
        if len(set(self.hash_ngram_sizes)) != len(self.hash_ngram_sizes):
            raise ValueError(f"hash_ngram_sizes has duplicates: {self.hash_ngram_sizes}")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size {self.vocab_size} cannot hold 256 bytes + 4 special ids")
        return self


def load_blt_preset(name: str, overrides: Sequence[str] = ()) -> BLTConfig:
    """`blt_model/presets/blt/<name>.yaml` (debug, small, 100m), with `key=value` overrides."""
    # The only non-torch import, kept local so that the model module stays free of I/O.
    from blt_model.configs import build_config

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ValueError(f"no BLT preset {name!r} (known: {known})")
    return build_config(BLTConfig, path, overrides)


def segment_positions(ids: torch.Tensor) -> torch.Tensor:
    """(B, S) ids -> (B, S) index of each element within its run of equal ids along the row."""
    idx = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    starts = torch.ones_like(ids, dtype=torch.bool)
    starts[:, 1:] = ids[:, 1:] != ids[:, :-1]
    return idx - torch.where(starts, idx, 0).cummax(dim=1).values


def patch_ids_from_lengths(patch_lengths: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B, P) patch lengths summing to T per row -> (B, T) index of the patch holding each byte.

    One repeat_interleave over the flattened batch: O(B*T + B*P) work, no T x P comparison.
    """
    num_rows, num_patches = patch_lengths.shape
    flat = torch.arange(num_rows * num_patches, device=patch_lengths.device)
    flat = flat.repeat_interleave(patch_lengths.flatten().long(), output_size=num_rows * seq_len)
    return flat.view(num_rows, seq_len) % num_patches


def hash_ngram_ids(
    tokens: torch.Tensor, positions: torch.Tensor, ngram_sizes: Sequence[int], table_size: int
) -> list[torch.Tensor]:
    """Table rows of the n-grams ending at each token, one (B, T) tensor per n (BLT §3.2.1).

    Hash(g) = sum_j token[t - j] * HASH_BASE^j mod HASH_MODULUS over j = 0 .. n-1, then mod
    `table_size`. Tokens before the first token of the document in this row count as 0
    (`positions` is the index within the document segment), so no hash reaches into the
    previous document. One vectorised step per j: O(T * max n), no loop over positions.
    """
    h = torch.zeros_like(tokens)
    found: dict[int, torch.Tensor] = {}
    for j in range(max(ngram_sizes, default=0)):
        back = F.pad(tokens, (j, 0))[:, : tokens.shape[1]]  # token j places back
        back = torch.where(positions >= j, back, 0)
        h = (h + back * pow(HASH_BASE, j, HASH_MODULUS)) % HASH_MODULUS
        if j + 1 in ngram_sizes:
            found[j + 1] = h % table_size
    return [found[n] for n in ngram_sizes]


@dataclass
class BLTMasks:
    """Everything a forward pass needs besides activations, built from patch_lengths and
    doc_ids by `BLT.build_masks`: positions, RoPE rotations and the five attention masks."""

    positions: torch.Tensor  # (B, T) byte index within its document segment
    patch_ids: torch.Tensor  # (B, T) patch holding each byte
    num_patches: int  # P
    byte_rope: Rope  # local encoder/decoder self-attention, by byte position
    patch_rope: Rope  # global transformer, by patch index within its document
    local: AttentionMask  # bytes -> bytes: same document, causal, sliding window
    global_: AttentionMask  # patches -> patches: same document, causal
    encoder_cross: AttentionMask  # patches (queries) -> bytes of that patch (B, 1, P, T)
    decoder_cross: AttentionMask  # bytes -> [null] + earlier patches of the document (B, 1, T, 1+P)


class HashNgramEmbedding(nn.Module):
    """One embedding table per n-gram size, indexed by `hash_ngram_ids`; returns their sum."""

    def __init__(self, ngram_sizes: Sequence[int], table_size: int, dim: int):
        super().__init__()
        self.ngram_sizes = tuple(ngram_sizes)
        self.table_size = table_size
        self.tables = nn.ModuleList(nn.Embedding(table_size, dim) for _ in self.ngram_sizes)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ids = hash_ngram_ids(tokens, positions, self.ngram_sizes, self.table_size)
        out = None
        for table, rows in zip(self.tables, ids):
            out = table(rows) if out is None else out + table(rows)  # (B, T, D_local)
        return out

    def reset_parameters(self) -> None:
        for table in self.tables:
            std = table.embedding_dim**-0.5
            nn.init.trunc_normal_(table.weight, std=std, a=-3 * std, b=3 * std)


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention without RoPE (BLT §3.2.2, §3.3.1):
    x + wo(attention(wq norm(x), wk norm(kv), wv norm(kv))), computed in x's width.

    With `null_kv`, one learned key/value pair is put in front of the keys (index 0), so that a
    query whose every real key is masked still has something to attend to.
    """

    def __init__(self, dim: int, kv_dim: int, n_heads: int, norm_eps: float, null_kv: bool = False):
        super().__init__()
        self.n_heads = n_heads
        self.query_norm = RMSNorm(dim, norm_eps)
        self.kv_norm = RMSNorm(kv_dim, norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(kv_dim, dim, bias=False)
        self.wv = nn.Linear(kv_dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)
        self.null_k = nn.Parameter(torch.empty(dim)) if null_kv else None
        self.null_v = nn.Parameter(torch.empty(dim)) if null_kv else None

    def forward(self, x: torch.Tensor, kv: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
        num_rows, q_len, dim = x.shape
        kv = self.kv_norm(kv)
        q, k, v = self.wq(self.query_norm(x)), self.wk(kv), self.wv(kv)
        if self.null_k is not None:
            k = torch.cat((self.null_k.to(k.dtype).expand(num_rows, 1, dim), k), dim=1)
            v = torch.cat((self.null_v.to(v.dtype).expand(num_rows, 1, dim), v), dim=1)
        split = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(q), split(k), split(v)  # (B, H, len, head_dim)
        out = attend(q, k, v, mask)  # (B, H, q_len, head_dim)
        return x + self.wo(out.transpose(1, 2).reshape(num_rows, q_len, dim))

    def reset_parameters(self) -> None:
        self.query_norm.reset_parameters()
        self.kv_norm.reset_parameters()
        for linear in (self.wq, self.wk, self.wv, self.wo):
            std = linear.in_features**-0.5
            nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)
        if self.null_k is not None:
            std = self.null_k.shape[0] ** -0.5
            nn.init.trunc_normal_(self.null_k, std=std, a=-3 * std, b=3 * std)
            nn.init.trunc_normal_(self.null_v, std=std, a=-3 * std, b=3 * std)


def byte_block(config: BLTConfig) -> TransformerBlock:
    """A transformer block of the local encoder or decoder (width D_local)."""
    return TransformerBlock(
        config.dim_local, config.n_heads_local, config.ffn_dim_multiplier, config.norm_eps
    )


def max_pool_patches(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, T, D) byte states -> (B, P, D) elementwise max over each patch's bytes (0 if empty)."""
    index = patch_ids[..., None].expand_as(h)
    out = h.new_zeros(h.shape[0], num_patches, h.shape[2])
    return out.scatter_reduce(1, index, h, reduce="amax", include_self=False)


class LocalEncoder(nn.Module):
    """Bytes -> byte states and patch representations (BLT §3.2).

    Byte embedding plus hash n-gram embeddings, averaged; sliding-window transformer blocks
    over bytes; then each patch's query is the max-pool of its bytes' states, projected to
    D_global, and cross-attends (in D_global, global heads) to its own bytes only.
    """

    def __init__(self, config: BLTConfig):
        super().__init__()
        d_local, d_global = config.dim_local, config.dim_global
        # Mean of the byte embedding and the len(hash_ngram_sizes) hash embeddings: the paper
        # sums them and normalises; dividing by the count keeps the input scale of one table.
        self.embedding_scale = 1.0 / (1 + len(config.hash_ngram_sizes))
        self.tok_embeddings = nn.Embedding(config.vocab_size, d_local)
        self.layers = nn.ModuleList(
            byte_block(config) for _ in range(config.n_layers_local_encoder)
        )
        self.patch_projection = nn.Linear(d_local, d_global, bias=False)
        self.cross_attention = CrossAttention(
            d_global, d_local, config.n_heads_global, config.norm_eps
        )

    def forward(
        self, tokens: torch.Tensor, ngram_embeds: torch.Tensor, masks: BLTMasks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h = (self.tok_embeddings(tokens) + ngram_embeds) * self.embedding_scale  # (B, T, D_local)
        for layer in self.layers:
            h = layer(h, masks.byte_rope, masks.local)  # (B, T, D_local)
        pooled = max_pool_patches(h, masks.patch_ids, masks.num_patches)  # (B, P, D_local)
        patches = self.patch_projection(pooled)  # (B, P, D_global)
        patches = self.cross_attention(patches, h, masks.encoder_cross)  # (B, P, D_global)
        return h, patches

    def reset_parameters(self) -> None:
        std = self.tok_embeddings.embedding_dim**-0.5
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        for layer in self.layers:
            layer.reset_parameters()
        std = self.patch_projection.in_features**-0.5
        nn.init.trunc_normal_(self.patch_projection.weight, std=std, a=-3 * std, b=3 * std)
        self.cross_attention.reset_parameters()


class GlobalTransformer(nn.Module):
    """Causal transformer over patch representations, within documents (BLT §3.1)."""

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            TransformerBlock(
                config.dim_global, config.n_heads_global, config.ffn_dim_multiplier, config.norm_eps
            )
            for _ in range(config.n_layers_global)
        )

    def forward(self, patches: torch.Tensor, masks: BLTMasks) -> torch.Tensor:
        for layer in self.layers:
            patches = layer(patches, masks.patch_rope, masks.global_)  # (B, P, D_global)
        return patches

    def reset_parameters(self) -> None:
        for layer in self.layers:
            layer.reset_parameters()


class LocalDecoder(nn.Module):
    """Byte states + global patch outputs -> next-byte logits (BLT §3.3).

    Each byte cross-attends (in D_local, local heads) to the global outputs of the patches of
    its document strictly before its own patch, plus a learned null key/value; then
    sliding-window transformer blocks, a final norm and the V-way output.
    """

    def __init__(self, config: BLTConfig):
        super().__init__()
        d_local = config.dim_local
        self.cross_attention = CrossAttention(
            d_local, config.dim_global, config.n_heads_local, config.norm_eps, null_kv=True
        )
        self.layers = nn.ModuleList(
            byte_block(config) for _ in range(config.n_layers_local_decoder)
        )
        self.norm = RMSNorm(d_local, config.norm_eps)
        self.output = nn.Linear(d_local, config.vocab_size, bias=False)

    def forward(self, h: torch.Tensor, patches: torch.Tensor, masks: BLTMasks) -> torch.Tensor:
        h = self.cross_attention(h, patches, masks.decoder_cross)  # (B, T, D_local)
        for layer in self.layers:
            h = layer(h, masks.byte_rope, masks.local)  # (B, T, D_local)
        return self.output(self.norm(h))  # (B, T, V)

    def reset_parameters(self) -> None:
        self.cross_attention.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()
        self.norm.reset_parameters()
        std = self.output.in_features**-0.5
        nn.init.trunc_normal_(self.output.weight, std=std, a=-3 * std, b=3 * std)


class BLT(nn.Module):
    """hash_embeddings + local_encoder -> global_transformer -> local_decoder."""

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        self.hash_embeddings = HashNgramEmbedding(
            config.hash_ngram_sizes, config.hash_table_size, config.dim_local
        )
        self.local_encoder = LocalEncoder(config)
        self.global_transformer = GlobalTransformer(config)
        self.local_decoder = LocalDecoder(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter (after `to_empty` when built on the meta device).
        Truncated normals with std fan_in^-0.5, norms at 1, as Meta's BLT code."""
        self.hash_embeddings.reset_parameters()
        self.local_encoder.reset_parameters()
        self.global_transformer.reset_parameters()
        self.local_decoder.reset_parameters()

    def build_masks(
        self,
        patch_lengths: torch.Tensor,
        doc_ids: torch.Tensor,
        flex: bool | None = None,
        local: bool | None = None,
    ) -> BLTMasks:
        """All visibility for a batch. flex (default: on CUDA) gives FlexAttention BlockMasks;
        otherwise SDPA masks, where byte self-attention uses the blocked `LocalMask` when
        `local` (default: window under half the row) and dense masks elsewhere."""
        cfg = self.config
        num_rows, seq_len = doc_ids.shape
        num_patches = patch_lengths.shape[1]
        device = doc_ids.device
        lengths = patch_lengths.long()
        starts = lengths.cumsum(1) - lengths  # (B, P) first byte of each patch
        first_doc = doc_ids.gather(1, starts.clamp(max=seq_len - 1))
        last_doc = doc_ids.gather(1, (starts + lengths - 1).clamp(0, seq_len - 1))
        bad = (
            (lengths.sum(1) != seq_len).any()
            | (lengths < 0).any()
            | ((lengths[:, 1:] > 0) & (lengths[:, :-1] == 0)).any()  # zeros only on the right
            | ((lengths > 0) & (first_doc != last_doc)).any()  # a patch inside one document
        )
        if bad:  # one host sync per batch
            raise ValueError(
                "patch_lengths must be non-negative, zero-padded on the right, sum to "
                f"{seq_len} per row, and no patch may span two documents"
            )
        if flex is None:
            flex = device.type == "cuda"
        if local is None:
            local = not flex and seq_len > 2 * cfg.window_local

        positions = segment_positions(doc_ids)  # (B, T)
        patch_ids = patch_ids_from_lengths(lengths, seq_len)  # (B, T)
        # A patch belongs to its bytes' document; empty (padding) patches get document -1,
        # which no byte has, so nothing real ever sees them.
        patch_doc = torch.where(lengths > 0, first_doc, -1)  # (B, P)
        patch_positions = segment_positions(patch_doc)  # (B, P)
        empty = lengths == 0  # (B, P)

        def encoder_cross(b, h, q_idx, kv_idx):
            # A patch sees its own bytes. An empty patch sees every byte of its row: a finite,
            # never-read value instead of an empty softmax row (NaN).
            return (patch_ids[b, kv_idx] == q_idx) | empty[b, q_idx]

        def decoder_cross(b, h, q_idx, kv_idx):
            # Key 0 is the null key; key k > 0 is patch k - 1. A byte sees the patches of its
            # document strictly before its own: a patch's global state pools all its bytes.
            patch = (kv_idx - 1).clamp(min=0)
            earlier = (patch < patch_ids[b, q_idx]) & (patch_doc[b, patch] == doc_ids[b, q_idx])
            return (kv_idx == 0) | earlier

        head_local = cfg.dim_local // cfg.n_heads_local
        head_global = cfg.dim_global // cfg.n_heads_global
        return BLTMasks(
            positions=positions,
            patch_ids=patch_ids,
            num_patches=num_patches,
            byte_rope=rope_cos_sin(positions, head_local, cfg.rope_theta),
            patch_rope=rope_cos_sin(patch_positions, head_global, cfg.rope_theta),
            local=build_attention_mask(doc_ids, positions, cfg.window_local, flex, local),
            global_=build_attention_mask(patch_doc, patch_positions, None, flex, local=False),
            encoder_cross=build_cross_attention_mask(
                encoder_cross, num_rows, num_patches, seq_len, device, flex
            ),
            decoder_cross=build_cross_attention_mask(
                decoder_cross, num_rows, seq_len, num_patches + 1, device, flex
            ),
        )

    def forward(
        self,
        tokens: torch.Tensor,
        patch_lengths: torch.Tensor,
        doc_ids: torch.Tensor,
        flex: bool | None = None,
        local: bool | None = None,
    ) -> torch.Tensor:
        """Next-byte logits (B, T, V) for tokens (B, T), patch_lengths (B, P), doc_ids (B, T)."""
        masks = self.build_masks(patch_lengths, doc_ids, flex, local)
        ngram_embeds = self.hash_embeddings(tokens, masks.positions)  # (B, T, D_local)
        # (B, T, D_local) byte states, (B, P, D_global) patch representations
        h, patches = self.local_encoder(tokens, ngram_embeds, masks)
        patches = self.global_transformer(patches, masks)  # (B, P, D_global)
        return self.local_decoder(h, patches, masks)  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self, mean_patch_size: float, seq_len: int = 8192) -> float:
        """Approximate training FLOPs per byte (forward + backward), for MFU.

        6 * (matmul weights applied per byte) + 6 * (matmul weights applied per patch) /
        mean_patch_size, plus attention at 12 * layers * width * context (PaLM's convention:
        QK^T and AV, forward and backward, masks not discounted): local context
        min(window, seq_len) bytes, global and decoder cross-attention context
        seq_len / mean_patch_size patches, encoder cross-attention one patch of bytes.
        Embedding lookups cost nothing. seq_len is the row length in bytes.
        """
        cfg = self.config
        enc, dec = self.local_encoder, self.local_decoder

        def weights(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)

        per_byte = weights(enc.layers, dec.layers, dec.output)
        per_byte += weights(enc.cross_attention.wk, enc.cross_attention.wv)
        per_byte += weights(dec.cross_attention.wq, dec.cross_attention.wo)
        per_patch = weights(self.global_transformer.layers, enc.patch_projection)
        per_patch += weights(enc.cross_attention.wq, enc.cross_attention.wo)
        per_patch += weights(dec.cross_attention.wk, dec.cross_attention.wv)
        num_patches = seq_len / mean_patch_size
        local_layers = cfg.n_layers_local_encoder + cfg.n_layers_local_decoder
        local_context = local_layers * min(cfg.window_local, seq_len) + num_patches
        attention_per_byte = 12 * cfg.dim_local * local_context
        attention_per_byte += 12 * cfg.dim_global  # encoder cross: a patch sees its ~mps bytes
        attention_per_patch = 12 * cfg.n_layers_global * cfg.dim_global * num_patches
        per_patch_total = 6 * per_patch + attention_per_patch
        return 6 * per_byte + attention_per_byte + per_patch_total / mean_patch_size


def byte_loss(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(mean loss, sum of nats, number of targets) of next-byte cross-entropy in fp32.

    logits (B, T, V), targets (B, T) with IGNORE_INDEX (-100) for no target. Bits per byte over
    any set of batches or ranks: sum(nats) / ln 2 / sum(targets). The mean is 0 (not NaN)
    when there is no target.
    """
    nats = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    num_targets = (targets != IGNORE_INDEX).sum()
    return nats / num_targets.clamp(min=1), nats.detach(), num_targets


def bits_per_byte(nats_sum: float, num_targets: int) -> float:
    return nats_sum / math.log(2) / max(num_targets, 1)
