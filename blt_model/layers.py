"""Transformer layers shared by the entropy model and the full BLT.

Llama-style parts laid out like Meta's BLT code (`bytelatent/base_transformer.py`), so that
official checkpoints load key for key: RMSNorm, rotary position embeddings (RoPE) over
*adjacent* pairs of dims (2i, 2i+1), SwiGLU feed-forward, multi-head attention, and the pre-norm
`TransformerBlock` that joins them. No biases anywhere.

Invariant: attention visibility is defined once, by `document_window_mask_mod` over per-token
document ids and positions (same document, causal, within the sliding window). On CUDA it
becomes a FlexAttention `BlockMask`; elsewhere a boolean mask for SDPA, either dense (S x S) or,
for a sliding window W much shorter than the row, a `LocalMask` over blocks of W queries and the
2W keys they can reach (O(S*W) work instead of O(S^2)). All backends attend to exactly the same
keys.

Rows can continue rows of an earlier batch (the entropy scorer's carry): a `KVSlot` per layer
holds the previous row's last C keys and values, which come before the row's own keys; the mask
then runs over S queries and C + S keys, the carried ones described by their own doc ids and
positions.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

Rope = tuple[torch.Tensor, torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in fp32 even when activations are bf16, as in Meta's RMSNorm.
        # F.rms_norm is one fused kernel: x * rsqrt(mean(x^2) + eps) * weight.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).type_as(x)

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> Rope:
    """Rotation of each adjacent pair for (B, S) positions: cos, sin of shape (B, S, 1, head_dim/2).

    Pair i turns by position * theta^(-2i/head_dim). Angles are formed in float64 because fp32
    loses about 1e-3 rad by position 10^4; the results are fp32.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.float64, device=positions.device)
    inv_freq = 1.0 / (theta ** (exponents / head_dim))
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float()[:, :, None, :], angles.sin().float()[:, :, None, :]


def apply_rope(x: torch.Tensor, rope: Rope) -> torch.Tensor:
    """Rotate (B, S, H, head_dim) by pairs (2i, 2i+1), Meta Llama's layout, not the half split."""
    cos, sin = rope
    # Pair (even, odd) as the complex number even + i*odd, turned by cos + i*sin: one kernel
    # for (even*cos - odd*sin, even*sin + odd*cos), as Meta's apply_rotary_emb does.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * torch.complex(cos, sin)).flatten(-2).type_as(x)


def document_window_mask_mod(
    doc_ids: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    kv_doc_ids: torch.Tensor | None = None,
    kv_positions: torch.Tensor | None = None,
) -> Callable:
    """FlexAttention-style `mask_mod(b, h, q_idx, kv_idx)` for packed rows.

    doc_ids, positions: (B, S). A query sees a key of the same document whose position is at
    most `window - 1` before its own (`window=None`: no limit) and not after it. Positions must
    count up by one along each document's tokens in a row, so query position j sees positions
    max(doc_start, j - window + 1) ... j. kv_doc_ids, kv_positions: (B, C + S) when the keys are
    C carried ones followed by the row's own (default: the row's own).
    """
    kv_doc_ids = doc_ids if kv_doc_ids is None else kv_doc_ids
    kv_positions = positions if kv_positions is None else kv_positions

    def mask_mod(b, h, q_idx, kv_idx):
        same_doc = doc_ids[b, q_idx] == kv_doc_ids[b, kv_idx]
        distance = positions[b, q_idx] - kv_positions[b, kv_idx]
        visible = same_doc & (distance >= 0)
        if window is not None:
            visible = visible & (distance < window)
        return visible

    return mask_mod


@dataclass
class LocalMask:
    """Sliding-window attention cut into blocks: query block i (tokens i*W ... i*W + W - 1)
    sees key blocks i - 1 and i, the only keys a window of W can reach.

    visible: (B, 1, n, W, 2W) bool, n = ceil(S / W); block i's keys are tokens (i-1)*W ...
    (i+1)*W - 1 of the row, padded with W tokens in front and to n*W at the end. Padded query
    rows see everything (finite values, discarded), so no softmax row is ever empty.
    carried: how many carried keys (at most W) come before the row's own; they take the place
    of that many front pads.
    """

    visible: torch.Tensor
    block: int
    seq_len: int
    carried: int = 0


AttentionMask = BlockMask | LocalMask | torch.Tensor


def build_local_mask(
    mask_mod: Callable, num_rows: int, seq_len: int, window: int, device, carried: int = 0
) -> LocalMask:
    """`mask_mod` indexes keys from the first carried one: row token t is key carried + t."""
    if carried > window:
        raise ValueError(f"a local mask carries at most the window ({window}) keys, not {carried}")
    num_blocks = -(-seq_len // window)
    kv_len = carried + seq_len
    b = torch.arange(num_rows, device=device)[:, None, None, None]
    blocks = torch.arange(num_blocks, device=device)[None, :, None, None] * window
    q_idx = blocks + torch.arange(window, device=device)[None, None, :, None]
    kv_idx = blocks - window + carried + torch.arange(2 * window, device=device)[None, None, None, :]
    real_kv = (kv_idx >= 0) & (kv_idx < kv_len)
    visible = mask_mod(b, None, q_idx.clamp(max=seq_len - 1), kv_idx.clamp(0, kv_len - 1))
    visible = (visible & real_kv) | (q_idx >= seq_len)
    return LocalMask(visible[:, None], window, seq_len, carried)


def build_attention_mask(
    doc_ids: torch.Tensor,
    positions: torch.Tensor,
    window: int | None,
    flex: bool | None = None,
    local: bool | None = None,
    carried_doc_ids: torch.Tensor | None = None,
    carried_positions: torch.Tensor | None = None,
) -> AttentionMask:
    """The attention mask for (B, S) rows, all from `document_window_mask_mod`.

    flex (default: on CUDA): a FlexAttention BlockMask. Otherwise local (default: when the
    window is under half the row) gives a blocked `LocalMask`, else a dense boolean (B, 1, S, S)
    SDPA mask, the plain reference.
    carried_doc_ids, carried_positions: (B, C) for C carried keys before each row's own (see
    `KVSlot`); the mask is then S x (C + S).
    """
    num_rows, seq_len = doc_ids.shape
    device = doc_ids.device
    carried = 0 if carried_doc_ids is None else carried_doc_ids.shape[1]
    kv_doc_ids = kv_positions = None
    if carried:
        kv_doc_ids = torch.cat((carried_doc_ids, doc_ids), 1)
        kv_positions = torch.cat((carried_positions, positions), 1)
    mask_mod = document_window_mask_mod(doc_ids, positions, window, kv_doc_ids, kv_positions)
    if flex is None:
        flex = device.type == "cuda"
        if local is None and not flex:
            local = window is not None and seq_len > 2 * window
    if flex:
        return create_block_mask(
            mask_mod,
            num_rows,
            None,
            seq_len,
            carried + seq_len,
            device=device,
            _compile=device.type == "cuda",
        )
    if local:
        if window is None:
            raise ValueError("a local (blocked) mask needs a sliding window")
        return build_local_mask(mask_mod, num_rows, seq_len, window, device, carried)
    b = torch.arange(num_rows, device=device)[:, None, None]
    q_idx = torch.arange(seq_len, device=device)[None, :, None]
    kv_idx = torch.arange(carried + seq_len, device=device)[None, None, :]
    return mask_mod(b, None, q_idx, kv_idx)[:, None]


def build_cross_attention_mask(
    mask_mod: Callable, num_rows: int, q_len: int, kv_len: int, device, flex: bool | None = None
) -> BlockMask | torch.Tensor:
    """Visibility between two different sequences (e.g. patches and bytes) from a
    FlexAttention-style `mask_mod`: a BlockMask (flex, default on CUDA) or a dense boolean
    (B, 1, q_len, kv_len) SDPA mask. The caller makes sure every query sees some key."""
    device = torch.device(device)
    if flex is None:
        flex = device.type == "cuda"
    if flex:
        return create_block_mask(
            mask_mod, num_rows, None, q_len, kv_len, device=device, _compile=device.type == "cuda"
        )
    b = torch.arange(num_rows, device=device)[:, None, None]
    q_idx = torch.arange(q_len, device=device)[None, :, None]
    kv_idx = torch.arange(kv_len, device=device)[None, None, :]
    return mask_mod(b, None, q_idx, kv_idx)[:, None]


def local_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: LocalMask) -> torch.Tensor:
    """SDPA over (B, H, S, head_dim) in blocks of W queries against their 2W reachable keys."""
    num_rows, num_heads, seq_len, head_dim = q.shape
    w = mask.block
    num_blocks = mask.visible.shape[2]
    tail = num_blocks * w - seq_len
    front = w - mask.carried
    # Queries: (B, H, n, W, D). Keys/values: the carried ones then zeros, W in all, in front;
    # then windows of 2W with stride W.
    q_blocks = F.pad(q, (0, 0, 0, tail)).unflatten(2, (num_blocks, w))
    k_blocks = F.pad(k, (0, 0, front, tail)).unfold(2, 2 * w, w).transpose(-1, -2)
    v_blocks = F.pad(v, (0, 0, front, tail)).unfold(2, 2 * w, w).transpose(-1, -2)
    # SDPA's fused CPU kernel wants 4-D inputs: fold the blocks into the batch.
    fold = lambda t: t.transpose(1, 2).flatten(0, 1)  # noqa: E731  (B*n, H, ., D)
    out = F.scaled_dot_product_attention(
        fold(q_blocks), fold(k_blocks), fold(v_blocks), attn_mask=fold(mask.visible)
    )
    out = out.unflatten(0, (num_rows, num_blocks)).transpose(1, 2).flatten(2, 3)
    return out[:, :, :seq_len]


@functools.cache
def _compiled_flex_attention() -> Callable:
    # Uncompiled flex_attention is a slow reference path; compile once per process.
    return torch.compile(flex_attention, dynamic=False)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask) -> torch.Tensor:
    """Scaled dot-product attention of (B, H, S, head_dim) queries over (B, H, C + S, head_dim)
    keys and values (C carried ones, usually 0), scale 1/sqrt(head_dim)."""
    if isinstance(mask, BlockMask):
        flex = _compiled_flex_attention() if q.is_cuda else flex_attention
        return flex(q, k, v, block_mask=mask)
    if isinstance(mask, LocalMask):
        return local_attend(q, k, v, mask)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _trunc_normal_(weight: torch.Tensor, std: float) -> None:
    nn.init.trunc_normal_(weight, mean=0.0, std=std, a=-3 * std, b=3 * std)


@dataclass
class KVSlot:
    """One attention layer's keys and values carried from the previous batch, for a batch whose
    rows continue that batch's rows: (B, H, size, head_dim), after RoPE, so they need no
    position of their own. None: nothing carried yet, read as zeros (the mask hides them).

    `Attention` puts them before its row's keys and leaves its row's last `size` in their place.
    """

    size: int
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is None:
            self.keys = self.values = k.new_zeros(*k.shape[:2], self.size, k.shape[3])
        k = torch.cat((self.keys.to(k.dtype), k), 2)
        v = torch.cat((self.values.to(v.dtype), v), 2)
        # Copies, so the batch's full keys can be freed.
        self.keys = k[:, :, -self.size :].clone(memory_format=torch.contiguous_format)
        self.values = v[:, :, -self.size :].clone(memory_format=torch.contiguous_format)
        return k, v

    def select(self, rows: torch.Tensor) -> "KVSlot":
        """The slot for a batch whose row i continues row `rows[i]` of this one (-1: none)."""
        if self.keys is None:
            return KVSlot(self.size)
        index = rows.clamp(min=0)
        return KVSlot(self.size, self.keys[index], self.values[index])


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int):
        super().__init__()
        if dim % n_heads or (dim // n_heads) % 2:
            raise ValueError(f"dim {dim} must split into {n_heads} heads of even size")
        self.n_heads = n_heads
        self.head_dim = dim // n_heads
        self.wq = nn.Linear(dim, dim, bias=False)
        self.wk = nn.Linear(dim, dim, bias=False)
        self.wv = nn.Linear(dim, dim, bias=False)
        self.wo = nn.Linear(dim, dim, bias=False)

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: AttentionMask, carry: KVSlot | None = None
    ) -> torch.Tensor:
        num_rows, seq_len, dim = x.shape
        heads = self.n_heads
        # One matmul for q, k, v (the keys stay wq/wk/wv, as in Meta's checkpoints), and one
        # rotation for q and k together: fewer, larger kernels, which is what a CPU needs.
        weight = torch.cat((self.wq.weight, self.wk.weight, self.wv.weight))
        qkv = F.linear(x, weight).view(num_rows, seq_len, 3 * heads, self.head_dim)
        qk = apply_rope(qkv[:, :, : 2 * heads], rope)
        q, k, v = qk[:, :, :heads].transpose(1, 2), qk[:, :, heads:], qkv[:, :, 2 * heads :]
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if carry is not None:
            k, v = carry.extend(k, v)
        out = attend(q, k, v, mask)
        return self.wo(out.transpose(1, 2).reshape(num_rows, seq_len, dim))

    def reset_parameters(self, factor: float = 1.0) -> None:
        # factor: Meta's depth scaling of the std (`init_std_factor`); 1 when disabled.
        std = self.wq.in_features**-0.5 / factor
        for linear in (self.wq, self.wk, self.wv, self.wo):
            _trunc_normal_(linear.weight, std)


def ffn_hidden_dim(dim: int, ffn_dim_multiplier: float | None, multiple_of: int = 256) -> int:
    """SwiGLU width as Meta's Llama/BLT code computes it: 2/3 of 4*dim, scaled, rounded up.

    dim 768, multiplier 1.0 -> 2048 (the released BLT entropy model).
    """
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))

    def reset_parameters(self, factor: float = 1.0) -> None:
        _trunc_normal_(self.w1.weight, self.w1.in_features**-0.5 / factor)
        _trunc_normal_(self.w3.weight, self.w3.in_features**-0.5 / factor)
        _trunc_normal_(self.w2.weight, self.w2.in_features**-0.5 / factor)


class TransformerBlock(nn.Module):
    """Pre-norm block: h = x + attention(norm(x)); out = h + feed_forward(norm(h))."""

    def __init__(
        self,
        dim: int,
        n_heads: int,
        ffn_dim_multiplier: float | None,
        norm_eps: float,
        multiple_of: int = 256,
    ):
        super().__init__()
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.attention = Attention(dim, n_heads)
        self.ffn_norm = RMSNorm(dim, norm_eps)
        self.feed_forward = FeedForward(dim, ffn_hidden_dim(dim, ffn_dim_multiplier, multiple_of))

    def forward(
        self, x: torch.Tensor, rope: Rope, mask: AttentionMask, carry: KVSlot | None = None
    ) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), rope, mask, carry)
        return h + self.feed_forward(self.ffn_norm(h))

    def reset_parameters(self, factor: float = 1.0) -> None:
        self.attention_norm.reset_parameters()
        self.attention.reset_parameters(factor)
        self.ffn_norm.reset_parameters()
        self.feed_forward.reset_parameters(factor)
