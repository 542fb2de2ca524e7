"""The Byte Latent Transformer (BLT paper, "Byte Latent Transformer: Patches Scale Better Than
Tokens", section 3): bytes -> local encoder -> patches -> global transformer -> local decoder ->
next-byte logits. It computes the same function as Meta's `bytelatent.model.blt.
ByteLatentTransformer` (and transformers' `BltForCausalLM`) for the options the released BLT-1B
and BLT-7B use, and its state_dict has Meta's keys and shapes, so Meta's weights load as they are.

Letters used in shape comments:
    B        rows in a batch
    T        bytes (token ids) per row
    P        patches per row (the batch's `patch_lengths.shape[1]`, zero-padded on the right)
    K        patch slots per patch (`cross_attn_k`): each patch is K vectors in the local models
    D_local  width of the local encoder and decoder (`dim_local_encoder` = `dim_local_decoder`)
    D_global width of the global transformer (`dim_global`)
    V        vocabulary: 256 bytes + 4 special ids = 260

Token ids follow BLT: byte b is b + 4; 0 pad, 1 BOS, 2 EOS, 3 reserved. A row packs documents
back to back; `doc_ids` (B, T) numbers them along the row and `patch_lengths` (B, P) cuts the
row into patches that never span two documents.

Decoder alignment (Meta's `decoder_patch_ids_from_lengths`, i.e. `patch_lengths[:, 1:]`): the
byte at t, which predicts t + 1, cross-attends to the global state of the patch just before the
patch of t + 1. At the last byte of patch p that is p itself (just completed); inside p it is
p - 1. Bytes inside the first patch of a document segment see no patch: Meta asserts that a
row's first patch is one byte (BOS), where this cannot happen; for a continuation whose first
patch is longer we stay causal and their cross-attention adds nothing (flex attention's
output for a query with no key).

Invariant: nothing crosses a document. Byte self-attention, patch self-attention, both
cross-attentions and the n-gram hashes only see the token's own document within the row, and
everything is causal in bytes: the logits at byte t depend only on bytes <= t of its document
(and on the patch lengths). So a document's logits equal Meta's on that document alone, whatever
it is packed with. All visibility is built once per batch by `BLT.build_masks`; FlexAttention
on CUDA and masked SDPA (the plain reference path) elsewhere compute the same thing.

Length: the whole model in reading order, as STYLE.md asks ("the full BLT under about 700"); the
interop mappings live in interop.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from blt_data.tokens import IGNORE_INDEX
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
# Meta's hash n-gram primes (`bytelatent.model.blt.primes`): hash function f uses HASH_PRIMES[f].
HASH_PRIMES = (
    1000000007, 5915587277, 1500450271, 3267000013, 5754853343, 4093082899,
    9576890767, 3628273133, 2860486313, 5463458053, 3367900313,
)  # fmt: skip


class BLTConfig(BaseModel):
    """Shape of the BLT, under the names of Meta's `ByteLatentTransformerArgs`. Defaults are
    the `100m` preset (the `blt-1b` preset is the released shape); only the options the released
    models use exist."""

    model_config = ConfigDict(extra="forbid")

    vocab_size: int = Field(260, gt=0, description="256 bytes + 4 special ids")
    dim_global: int = Field(768, gt=0, description="width of the global transformer")
    dim_local_encoder: int = Field(384, gt=0, description="width of the local encoder")
    dim_local_decoder: int = Field(384, gt=0, description="width of the local decoder (= encoder)")
    n_layers_global: int = Field(12, ge=0, description="transformer blocks over patches")
    n_layers_local_encoder: int = Field(1, ge=1, description="byte blocks in the local encoder")
    n_layers_local_decoder: int = Field(4, ge=1, description="byte blocks in the local decoder")
    n_heads_global: int = Field(12, gt=0, description="attention heads, global transformer")
    n_heads_local_encoder: int = Field(6, gt=0, description="self-attention heads, local encoder")
    n_heads_local_decoder: int = Field(6, gt=0, description="self-attention heads, local decoder")
    cross_attn_k: int = Field(2, gt=0, description="K: slots (vectors of D_local) per patch")
    cross_attn_nheads: int = Field(6, gt=0, description="heads of every cross-attention")
    cross_attn_all_layers_encoder: bool = Field(
        False, description="a cross-attention after every encoder block (else after the last)"
    )
    cross_attn_all_layers_decoder: bool = Field(
        True, description="a cross-attention before every decoder block (else before the first)"
    )
    cross_attn_init_by_pooling: Literal[True] = Field(
        True, description="patch queries start as pooled byte states (the only mode supported)"
    )
    downsampling_by_pooling: Literal["max"] = Field(
        "max", description="pooling of byte states into patch queries (the only mode supported)"
    )
    encoder_hash_byte_group_size: list[int] = Field(
        [3, 4, 5, 6, 7, 8], min_length=1, description="n of each hash n-gram embedding table"
    )
    encoder_hash_byte_group_vocab: int = Field(8192, gt=0, description="rows per hash table")
    encoder_hash_byte_group_nb_functions: int = Field(
        1, ge=1, le=len(HASH_PRIMES), description="hash functions (tables per n)"
    )
    rope_theta: float = Field(500000.0, gt=0, description="RoPE base of all three transformers")
    local_attention_window_len: int = Field(
        512, gt=0, description="local self-attention window in bytes, self included"
    )
    norm_eps: float = Field(1e-5, gt=0, description="RMSNorm epsilon")
    multiple_of: int = Field(256, gt=0, description="SwiGLU width is rounded up to this")
    ffn_dim_multiplier: float | None = Field(1.0, description="scales the SwiGLU width")
    init_std_factor: Literal["disabled", "current_depth"] = Field(
        "disabled", description="Meta's init std scaling by block depth"
    )

    @model_validator(mode="after")
    def _check_shapes(self) -> "BLTConfig":
        # Meta feeds encoder states to the decoder and reshapes the decoder's patch slots with
        # the encoder's width: its code only computes a model whose two local widths agree.
        if self.dim_local_encoder != self.dim_local_decoder:
            raise ValueError(
                f"dim_local_encoder {self.dim_local_encoder} must equal dim_local_decoder "
                f"{self.dim_local_decoder} (Meta's BLT does not run otherwise)"
            )
        for name, dim, heads in (
            ("dim_global", self.dim_global, self.n_heads_global),
            ("dim_local_encoder", self.dim_local_encoder, self.n_heads_local_encoder),
            ("dim_local_decoder", self.dim_local_decoder, self.n_heads_local_decoder),
            ("dim_local_encoder", self.dim_local_encoder, self.cross_attn_nheads),
        ):
            if dim % heads or (dim // heads) % 2:
                raise ValueError(f"{name} {dim} must split into {heads} heads of even size")
        sizes = self.encoder_hash_byte_group_size
        if any(n < 1 for n in sizes) or len(set(sizes)) != len(sizes):
            raise ValueError(f"encoder_hash_byte_group_size must be distinct n >= 1, got {sizes}")
        if self.vocab_size < 260:
            raise ValueError(f"vocab_size {self.vocab_size} cannot hold 256 bytes + 4 special ids")
        return self

    @property
    def dim_local(self) -> int:
        return self.dim_local_encoder

    @property
    def global_input_dim(self) -> int:
        """Width of a patch entering the global transformer: its K slots side by side. The
        global transformer projects it to D_global when they differ (the 7B)."""
        return self.cross_attn_k * self.dim_local_encoder


def load_blt_preset(name: str, overrides: Sequence[str] = ()) -> BLTConfig:
    """`blt_model/presets/blt/<name>.yaml` (debug, small, 100m, blt-1b, blt-7b), with
    `key=value` overrides."""
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
    tokens: torch.Tensor,
    positions: torch.Tensor,
    group_sizes: Sequence[int],
    vocab: int,
    nb_functions: int = 1,
) -> list[torch.Tensor]:
    """Table rows of the n-grams ending at each token, one (B, T) tensor per (function, n),
    functions outer, n inner: the order of Meta's `encoder_hash_tok_embedding` (BLT §3.2.1).

    Meta's hash: sum_i window[i] * prime^i over the n tokens ending at t, oldest first, in int64
    with wrap-around, then `% vocab` (non-negative). Computed here by Horner's rule, newest token
    first (h <- h * prime + token j back), which is the same sum modulo 2^64: O(T * max n) per
    function. Tokens before the first token of the document in this row count as 0
    (`positions` is the index within the document segment), as Meta's zero padding does for the
    document alone, so no hash reaches into the previous document.
    """
    tokens = tokens.long()
    found: dict[tuple[int, int], torch.Tensor] = {}
    for f in range(nb_functions):
        h = torch.zeros_like(tokens)
        for j in range(max(group_sizes)):
            back = F.pad(tokens, (j, 0))[:, : tokens.shape[1]]  # token j places back
            h = h * HASH_PRIMES[f] + torch.where(positions >= j, back, 0)
            if j + 1 in group_sizes:
                found[f, j + 1] = h % vocab
    return [found[f, n] for f in range(nb_functions) for n in group_sizes]


@dataclass
class BLTMasks:
    """Everything a forward pass needs besides activations, built from patch_lengths and
    doc_ids by `BLT.build_masks`: positions, RoPE rotations and the attention masks."""

    positions: torch.Tensor  # (B, T) byte index within its document segment
    patch_ids: torch.Tensor  # (B, T) patch holding each byte
    num_patches: int  # P
    encoder_rope: Rope  # local encoder self-attention, by byte position
    decoder_rope: Rope  # local decoder self-attention, by byte position
    patch_rope: Rope  # global transformer, by patch index within its document
    local: AttentionMask  # bytes -> bytes: same document, causal, sliding window
    global_: AttentionMask  # patches -> patches: same document, causal
    encoder_cross: AttentionMask  # patch slots (queries) -> bytes of that patch (B, 1, P*K, T)
    decoder_cross: AttentionMask  # bytes -> slots of their decoder patch (B, 1, T, P*K)
    decoder_keep: torch.Tensor  # (B, T, 1) 0 for bytes that see no patch (see module doc)


def _init_linear(linear: nn.Linear, std: float) -> None:
    nn.init.trunc_normal_(linear.weight, std=std, a=-3 * std, b=3 * std)


def _depth_factor(config: BLTConfig, depth: int) -> float:
    return (2 * (depth + 1)) ** 0.5 if config.init_std_factor == "current_depth" else 1.0


class HashNgramEmbedding(nn.ModuleList):
    """Meta's `encoder_hash_tok_embedding`: one table per (hash function, n), indexed by
    `hash_ngram_ids`; returns the sum of their rows (B, T, D_local)."""

    def __init__(self, config: BLTConfig):
        sizes = config.encoder_hash_byte_group_size
        num_tables = config.encoder_hash_byte_group_nb_functions * len(sizes)
        vocab = config.encoder_hash_byte_group_vocab
        super().__init__(nn.Embedding(vocab, config.dim_local_encoder) for _ in range(num_tables))
        self.group_sizes = tuple(sizes)
        self.vocab = vocab
        self.nb_functions = config.encoder_hash_byte_group_nb_functions

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        ids = hash_ngram_ids(tokens, positions, self.group_sizes, self.vocab, self.nb_functions)
        out = None
        for table, rows in zip(self, ids):
            out = table(rows) if out is None else out + table(rows)  # (B, T, D_local)
        return out

    def reset_parameters(self) -> None:
        for table in self:
            std = table.embedding_dim**-0.5
            nn.init.trunc_normal_(table.weight, std=std, a=-3 * std, b=3 * std)


class CrossAttention(nn.Module):
    """Pre-norm multi-head cross-attention without RoPE (BLT §3.2.2, §3.3.1), Meta's module:
    x + wo(attention(wq norm_q(x), wk norm_kv(kv), wv norm_kv(kv))), queries and keys of width
    D_local. `keep` (B, Q, 1) zeroes the attention of queries that may see nothing.
    """

    def __init__(self, dim: int, n_heads: int, norm_eps: float):
        super().__init__()
        self.n_heads = n_heads
        self.cross_attn_norm_q = RMSNorm(dim, norm_eps)
        self.cross_attn_norm_kv = RMSNorm(dim, norm_eps)
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        kv: torch.Tensor,
        mask: AttentionMask,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        num_rows, q_len, dim = x.shape
        kv = self.cross_attn_norm_kv(kv)
        q, k, v = self.wq(self.cross_attn_norm_q(x)), self.wk(kv), self.wv(kv)
        split = lambda t: t.unflatten(-1, (self.n_heads, -1)).transpose(1, 2)  # noqa: E731
        out = attend(split(q), split(k), split(v), mask)  # (B, H, q_len, head_dim)
        out = out.transpose(1, 2).reshape(num_rows, q_len, dim)
        if keep is not None:
            out = out * keep.to(out.dtype)
        return x + self.wo(out)

    def reset_parameters(self, factor: float = 1.0) -> None:
        self.cross_attn_norm_q.reset_parameters()
        self.cross_attn_norm_kv.reset_parameters()
        std = self.wq.in_features**-0.5 / factor
        for linear in (self.wq, self.wk, self.wv, self.wo):
            _init_linear(linear, std)


def max_pool_patches(h: torch.Tensor, patch_ids: torch.Tensor, num_patches: int) -> torch.Tensor:
    """(B, T, D) byte states -> (B, P, D) elementwise max over each patch's bytes (0 if empty)."""
    index = patch_ids[..., None].expand_as(h)
    out = h.new_zeros(h.shape[0], num_patches, h.shape[2])
    return out.scatter_reduce(1, index, h, reduce="amax", include_self=False)


def local_block(config: BLTConfig, dim: int, n_heads: int) -> TransformerBlock:
    return TransformerBlock(
        dim, n_heads, config.ffn_dim_multiplier, config.norm_eps, config.multiple_of
    )


class LocalEncoder(nn.Module):
    """Byte embeddings -> byte states and patch slots (BLT §3.2).

    Sliding-window transformer blocks over bytes. After the last block (or after each, with
    `cross_attn_all_layers_encoder`) the patch slots cross-attend to their patch's bytes; the
    slots start as the max-pool of each patch's byte states, projected to K vectors of D_local.
    """

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        dim, k = config.dim_local_encoder, config.cross_attn_k
        self.tok_embeddings = nn.Embedding(config.vocab_size, dim)
        self.layers = nn.ModuleList(
            local_block(config, dim, config.n_heads_local_encoder)
            for _ in range(config.n_layers_local_encoder)
        )
        self.patch_embedding_projection = nn.Linear(dim, dim * k, bias=False)
        num_cross = config.n_layers_local_encoder if config.cross_attn_all_layers_encoder else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(dim, config.cross_attn_nheads, config.norm_eps) for _ in range(num_cross)
        )

    def forward(self, h: torch.Tensor, masks: BLTMasks) -> tuple[torch.Tensor, torch.Tensor]:
        num_rows, _, dim = h.shape
        all_layers = self.config.cross_attn_all_layers_encoder
        patches = None
        for i, layer in enumerate(self.layers):
            h = layer(h, masks.encoder_rope, masks.local)  # (B, T, D_local)
            if all_layers or i == len(self.layers) - 1:
                if patches is None:  # pooled once, from the first block that cross-attends
                    pooled = max_pool_patches(h, masks.patch_ids, masks.num_patches)
                    patches = self.patch_embedding_projection(pooled)  # (B, P, K*D_local)
                    patches = patches.reshape(num_rows, -1, dim)  # (B, P*K, D_local)
                cross = self.cross_attn_layers[i if all_layers else 0]
                # Meta's quirk, which its weights depend on: CrossAttention returns x + out and
                # the caller adds x again, so the residual is 2x + out.
                patches = patches + cross(patches, h, masks.encoder_cross)  # (B, P*K, D_local)
        return h, patches

    def reset_parameters(self) -> None:
        std = self.config.dim_local_encoder**-0.5
        nn.init.trunc_normal_(self.tok_embeddings.weight, std=std, a=-3 * std, b=3 * std)
        for depth, layer in enumerate(self.layers):
            layer.reset_parameters(_depth_factor(self.config, depth))
        _init_linear(self.patch_embedding_projection, std)  # fan-in D_local
        for depth, cross in enumerate(self.cross_attn_layers):
            cross.reset_parameters(_depth_factor(self.config, depth))


class GlobalTransformer(nn.Module):
    """Causal transformer over patches, within documents (BLT §3.1). A patch enters as its K
    slots side by side, projected to D_global when K*D_local differs (the 7B)."""

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        dim = config.dim_global
        self.layers = nn.ModuleList(
            local_block(config, dim, config.n_heads_global) for _ in range(config.n_layers_global)
        )
        self.token_embedding_projection = (
            nn.Linear(config.global_input_dim, dim, bias=False)
            if config.global_input_dim != dim
            else None
        )

    def forward(self, patches: torch.Tensor, masks: BLTMasks) -> torch.Tensor:
        if self.token_embedding_projection is not None:
            patches = self.token_embedding_projection(patches)  # (B, P, D_global)
        for layer in self.layers:
            patches = layer(patches, masks.patch_rope, masks.global_)  # (B, P, D_global)
        return patches

    def reset_parameters(self) -> None:
        for depth, layer in enumerate(self.layers):
            layer.reset_parameters(_depth_factor(self.config, depth))
        if self.token_embedding_projection is not None:
            _init_linear(self.token_embedding_projection, self.config.global_input_dim**-0.5)


class LocalDecoder(nn.Module):
    """Byte states + global patch states -> next-byte logits (BLT §3.3).

    The global states are projected to K slots of D_local. Before the first block (or before
    each, with `cross_attn_all_layers_decoder`) every byte cross-attends to the K slots of its
    decoder patch (see the module doc); then sliding-window blocks, a final norm, V-way output.
    """

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        dim, k = config.dim_local_decoder, config.cross_attn_k
        self.layers = nn.ModuleList(
            local_block(config, dim, config.n_heads_local_decoder)
            for _ in range(config.n_layers_local_decoder)
        )
        self.patch_embedding_projection = nn.Linear(config.dim_global, dim * k, bias=False)
        num_cross = config.n_layers_local_decoder if config.cross_attn_all_layers_decoder else 1
        self.cross_attn_layers = nn.ModuleList(
            CrossAttention(dim, config.cross_attn_nheads, config.norm_eps) for _ in range(num_cross)
        )
        self.norm = RMSNorm(dim, config.norm_eps)
        self.output = nn.Linear(dim, config.vocab_size, bias=False)

    def forward(self, h: torch.Tensor, patches: torch.Tensor, masks: BLTMasks) -> torch.Tensor:
        num_rows, _, dim = h.shape
        slots = self.patch_embedding_projection(patches)  # (B, P, K*D_local)
        slots = slots.reshape(num_rows, -1, dim)  # (B, P*K, D_local)
        for i, layer in enumerate(self.layers):
            if i == 0 or self.config.cross_attn_all_layers_decoder:
                cross = self.cross_attn_layers[i]
                # 2x + out, Meta's doubled residual (see LocalEncoder.forward).
                h = h + cross(h, slots, masks.decoder_cross, masks.decoder_keep)  # (B, T, D_local)
            h = layer(h, masks.decoder_rope, masks.local)  # (B, T, D_local)
        return self.output(self.norm(h))  # (B, T, V)

    def reset_parameters(self) -> None:
        std = self.config.dim_local_decoder**-0.5
        for depth, layer in enumerate(self.layers):
            layer.reset_parameters(_depth_factor(self.config, depth))
        _init_linear(self.patch_embedding_projection, self.config.dim_global**-0.5)
        for depth, cross in enumerate(self.cross_attn_layers):
            cross.reset_parameters(_depth_factor(self.config, depth))
        self.norm.reset_parameters()
        _init_linear(self.output, std)


class BLT(nn.Module):
    """encoder_hash_tok_embedding + local_encoder -> global_transformer -> local_decoder,
    Meta's module names, so `state_dict()` has Meta's keys and shapes (RoPE tables are
    computed per batch, not stored: Meta's are non-persistent buffers too)."""

    def __init__(self, config: BLTConfig):
        super().__init__()
        self.config = config
        self.local_encoder = LocalEncoder(config)
        self.global_transformer = GlobalTransformer(config)
        self.local_decoder = LocalDecoder(config)
        self.encoder_hash_tok_embedding = HashNgramEmbedding(config)
        self.init_weights()

    def init_weights(self) -> None:
        """Initialise every parameter (again after `to_empty` when built on the meta device),
        as Meta's `init_weights`: truncated normals with std dim^-0.5 (fan-in for
        projections and FFN outputs), divided by the depth factor, norms at 1."""
        self.local_encoder.reset_parameters()
        self.global_transformer.reset_parameters()
        self.local_decoder.reset_parameters()
        self.encoder_hash_tok_embedding.reset_parameters()

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
        k = cfg.cross_attn_k
        window = cfg.local_attention_window_len
        device = doc_ids.device
        lengths = patch_lengths.long()
        starts = lengths.cumsum(1) - lengths  # (B, P) first byte of each patch
        ends = starts + lengths  # (B, P) one past the last byte
        first_doc = doc_ids.gather(1, starts.clamp(max=seq_len - 1))
        last_doc = doc_ids.gather(1, (ends - 1).clamp(0, seq_len - 1))
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
            local = not flex and seq_len > 2 * window

        positions = segment_positions(doc_ids)  # (B, T)
        patch_ids = patch_ids_from_lengths(lengths, seq_len)  # (B, T)
        # A patch belongs to its bytes' document; empty (padding) patches get document -1,
        # which no byte has, so nothing real ever sees them.
        patch_doc = torch.where(lengths > 0, first_doc, -1)  # (B, P)
        patch_positions = segment_positions(patch_doc)  # (B, P)
        empty = lengths == 0  # (B, P)

        # Decoder patch of byte t: the patch before the patch of t + 1 (module doc). At the
        # last byte of a patch that is its own patch, elsewhere the one before, unless its own
        # patch opens the document segment: then it sees nothing (decoder_keep 0; its mask
        # row points at its own patch only to stay finite).
        byte_idx = torch.arange(seq_len, device=device)
        is_last = byte_idx + 1 == ends.gather(1, patch_ids)  # (B, T)
        opens_segment = patch_positions.gather(1, patch_ids) == 0  # (B, T)
        sees_patch = is_last | ~opens_segment
        decoder_patch = torch.where(is_last | opens_segment, patch_ids, patch_ids - 1)  # (B, T)

        def encoder_cross(b, h, q_idx, kv_idx):
            # Slot q_idx of patch q_idx // K sees its patch's bytes. An empty patch sees every
            # byte of its row: a finite, never-read value instead of an empty softmax (NaN).
            patch = q_idx // k
            return (patch_ids[b, kv_idx] == patch) | empty[b, patch]

        def decoder_cross(b, h, q_idx, kv_idx):
            return kv_idx // k == decoder_patch[b, q_idx]

        def rope(dim: int, heads: int, pos: torch.Tensor) -> Rope:
            return rope_cos_sin(pos, dim // heads, cfg.rope_theta)

        return BLTMasks(
            positions=positions,
            patch_ids=patch_ids,
            num_patches=num_patches,
            encoder_rope=rope(cfg.dim_local_encoder, cfg.n_heads_local_encoder, positions),
            decoder_rope=rope(cfg.dim_local_decoder, cfg.n_heads_local_decoder, positions),
            patch_rope=rope(cfg.dim_global, cfg.n_heads_global, patch_positions),
            local=build_attention_mask(doc_ids, positions, window, flex, local),
            global_=build_attention_mask(patch_doc, patch_positions, None, flex, local=False),
            encoder_cross=build_cross_attention_mask(
                encoder_cross, num_rows, num_patches * k, seq_len, device, flex
            ),
            decoder_cross=build_cross_attention_mask(
                decoder_cross, num_rows, seq_len, num_patches * k, device, flex
            ),
            decoder_keep=sees_patch[..., None],
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
        # Byte embedding plus every hash n-gram embedding, summed (Meta: no normalisation).
        h = self.local_encoder.tok_embeddings(tokens)  # (B, T, D_local)
        h = h + self.encoder_hash_tok_embedding(tokens, masks.positions)
        # (B, T, D_local) byte states, (B, P*K, D_local) patch slots
        h, patches = self.local_encoder(h, masks)
        patches = patches.reshape(tokens.shape[0], masks.num_patches, -1)  # (B, P, K*D_local)
        patches = self.global_transformer(patches, masks)  # (B, P, D_global)
        return self.local_decoder(h, patches, masks)  # (B, T, V)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_byte(self, mean_patch_size: float, seq_len: int = 8192) -> float:
        """Approximate training FLOPs per byte (forward + backward), for MFU.

        6 * (matmul weights applied per byte) + 6 * (matmul weights applied per patch) /
        mean_patch_size, where a weight applied to each of a patch's K slots counts K times,
        plus attention at 12 * width * context per layer (PaLM's convention: QK^T and AV,
        forward and backward, masks not discounted): local self-attention context
        min(window, seq_len) bytes, global context seq_len / mean_patch_size patches, a
        decoder byte's cross-attention K slots, an encoder slot's cross-attention its patch's
        ~mean_patch_size bytes. Embedding lookups cost nothing. seq_len is the row length.
        """
        cfg = self.config
        enc, dec = self.local_encoder, self.local_decoder
        k = cfg.cross_attn_k

        def weights(*modules: nn.Module) -> int:
            return sum(p.numel() for m in modules for p in m.parameters() if p.dim() == 2)

        enc_cross, dec_cross = list(enc.cross_attn_layers), list(dec.cross_attn_layers)
        per_byte = weights(enc.layers, dec.layers, dec.output)
        per_byte += sum(weights(c.wk, c.wv) for c in enc_cross)
        per_byte += sum(weights(c.wq, c.wo) for c in dec_cross)
        per_patch = weights(self.global_transformer, enc.patch_embedding_projection)
        per_patch += weights(dec.patch_embedding_projection)
        per_patch += k * sum(weights(c.wq, c.wo) for c in enc_cross)
        per_patch += k * sum(weights(c.wk, c.wv) for c in dec_cross)
        num_patches = seq_len / mean_patch_size
        local_layers = cfg.n_layers_local_encoder + cfg.n_layers_local_decoder
        attention_per_byte = 12 * cfg.dim_local * local_layers * min(
            cfg.local_attention_window_len, seq_len
        )
        # Decoder: each byte sees K slots; encoder: each of a patch's K slots sees its bytes.
        attention_per_byte += 12 * cfg.dim_local * k * (len(dec_cross) + len(enc_cross))
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
