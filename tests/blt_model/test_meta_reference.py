"""Meta's own code loads our `--format meta` export: `ByteLatentTransformer.from_pretrained(DIR)`
(PyTorchModelHubMixin: config.json {"args"} + model.safetensors) builds the model and gives our
logits, tiny random configs, CPU fp32.

Needs Meta's source (github.com/facebookresearch/blt, package `bytelatent`), which is not a
dependency: set BLT_META_SOURCE to its checkout, else the test is skipped. Meta's package
imports xformers and CUDA-only ops at module level; the test stands in for those two imports
(never called on CPU) and runs Meta's SDPA path, which for documents shorter than the local
window is the same function as its xformers one.
"""

from __future__ import annotations

import os
import sys
import types

import pytest
import torch

from blt_model.blt import BLT
from blt_model.checkpoint_layouts import write_meta_hub_folder
from tests.blt_model.test_blt_oracle import CONFIGS, TEXT, config, document, ours_logits

META_SOURCE = os.environ.get("BLT_META_SOURCE")
pytestmark = pytest.mark.skipif(not META_SOURCE, reason="set BLT_META_SOURCE to Meta's blt checkout")


@pytest.fixture(scope="module")
def meta_blt(tmp_path_factory):
    stubs = {
        "xformers": types.ModuleType("xformers"),
        "xformers.ops": types.ModuleType("xformers.ops"),
        "bytelatent.distributed": types.ModuleType("bytelatent.distributed"),
    }
    stubs["xformers.ops"].AttentionBias = type("AttentionBias", (), {})
    stubs["xformers.ops"].fmha = None
    stubs["bytelatent.distributed"].get_local_rank = lambda: 0
    stubs["bytelatent.distributed"].get_is_master = lambda: True
    saved = {name: sys.modules.get(name) for name in stubs}
    sys.modules.update(stubs)
    sys.path.insert(0, META_SOURCE)
    os.environ["BLT_SUPPRESS_ATTN_ERROR"] = "1"
    try:
        from bytelatent.model.blt import ByteLatentTransformer

        yield ByteLatentTransformer
    finally:
        sys.path.remove(META_SOURCE)
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


# window_8: Meta's SDPA path has no sliding window (its xformers path does).
@pytest.mark.parametrize("name", sorted(set(CONFIGS) - {"window_8"}))
def test_metas_from_pretrained_loads_the_meta_export(meta_blt, tmp_path, name):
    cfg = config(**CONFIGS[name])
    torch.manual_seed(0)
    ours = BLT(cfg).eval()
    with torch.no_grad():
        for key, p in ours.named_parameters():
            if "norm" in key:
                p.mul_(1 + 0.2 * torch.randn_like(p))
    write_meta_hub_folder(str(tmp_path), cfg, ours.state_dict())
    meta = meta_blt.from_pretrained(str(tmp_path)).eval()
    for module in meta.modules():
        if hasattr(module, "attn_impl"):
            module.attn_impl = "sdpa"  # CPU
    tokens, lengths = document(TEXT)
    assert len(tokens) < cfg.local_attention_window_len
    with torch.no_grad():
        want = meta(torch.tensor([tokens]), patch_lengths=torch.tensor([lengths]))[0]
    got = ours_logits(ours, tokens, lengths, [0] * len(tokens), flex=False)
    assert (got - want).abs().max() < 1e-4 and want.abs().max() > 0.1
