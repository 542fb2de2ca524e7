"""Sampling bytes from a trained BLT (`blt-train generate`).

Patches are decided on the fly, as in training: the lineage of the checkpoint names the patches
dataset, whose parameters name the entropy model (by registry reference and sha256) and the
patch rule; an imported checkpoint records the entropy model and rule it was released with
(`blt_registry.checkpoint_patching`). After each new byte the entropy model scores the text so
far and the rule cuts it into patches; the BLT then predicts the next byte. The last patch may be unfinished: the local
decoder only reads the global states of patches *before* the current one, so that is exact.

Simple and quadratic (every step re-scores and re-runs the whole text): for inspecting a model,
not for serving.
"""

from __future__ import annotations

import numpy as np
import torch

from blt_data.entropy import BOS_ID, BYTE_OFFSET, score_document_alone
from blt_data.patching import PatchConfig, patch_lengths
from blt_data.registry import Registry
from blt_model.blt_registry import load_checkpoint_patcher
from blt_model.train import load_trained_blt


def row_patch_lengths(text: bytes, entropy_model, cfg: PatchConfig) -> np.ndarray:
    """BOS as its own patch, then the document's patches (the reader's layout, without EOS)."""
    entropies = score_document_alone(entropy_model, text) if entropy_model is not None and text else None
    body = patch_lengths(text, entropies, cfg) if text else np.zeros(0, np.int32)
    return np.concatenate([[1], body]).astype(np.int64)


@torch.no_grad()
def generate_text(
    registry: Registry, model_ref: str, prompt: str, max_bytes: int, temperature: float = 0.8, seed: int = 0
) -> str:
    model, manifest = load_trained_blt(registry, model_ref)
    entropy_model, patch_cfg = load_checkpoint_patcher(registry, manifest)  # trained or imported
    generator = torch.Generator().manual_seed(seed)
    text = bytearray(prompt.encode("utf-8"))
    start = len(text)
    for _ in range(max_bytes):
        tokens = torch.tensor([BOS_ID, *(b + BYTE_OFFSET for b in text)])[None]
        lengths = torch.from_numpy(row_patch_lengths(bytes(text), entropy_model, patch_cfg))[None]
        logits = model(tokens, lengths, torch.zeros_like(tokens))[0, -1].float()
        logits[:BYTE_OFFSET] = -float("inf")  # bytes only: stop at max_bytes, never on EOS/pad
        if temperature == 0:
            nxt = int(logits.argmax())
        else:
            nxt = int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))
        text.append(nxt - BYTE_OFFSET)
    return bytes(text[start:]).decode("utf-8", errors="replace")
