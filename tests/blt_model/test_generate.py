"""Generation that patches as it goes: the incremental entropy model equals the full one, the
byte-at-a-time rule equals `patch_lengths`, and every step's logits are the ones the BLT
computes on the finished text patched by the rule."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blt_data.entropy import BOS_ID, BYTE_OFFSET, score_document_alone
from blt_data.patching import PatchRule, PatchStream, patch_lengths
from blt_model.blt import BLT, load_blt_preset
from blt_model.entropy_model import EntropyModel, EntropyModelConfig, EntropyStream
from blt_model.generate import generate

TEXT = "def patch(x):\n    return [b for b in x if b]  # naïve, café, ünïcödé; more bytes to go..."


def entropy_model(window=8, seed=0) -> EntropyModel:
    torch.manual_seed(seed)
    model = EntropyModel(EntropyModelConfig(dim=32, n_layers=2, n_heads=2, window=window, max_seqlen=256))
    with torch.no_grad():  # larger outputs than the init's, so entropies spread out
        model.output.weight.mul_(4)
    return model.eval()


def test_entropy_stream_equals_full_scoring():
    model = entropy_model(window=8)
    utf8 = TEXT.encode()
    assert len(utf8) > 8 * 8  # many windows
    expected = score_document_alone(model, utf8)
    tokens = [BOS_ID, *(b + BYTE_OFFSET for b in utf8)]
    stream = EntropyStream(model)
    # A prompt in one piece (longer than a window), then byte by byte, then a chunk again.
    got = [stream.feed(tokens[:13]), *(stream.feed([t]) for t in tokens[13:40]), stream.feed(tokens[40:])]
    got = torch.cat(got).numpy()[: len(utf8)]  # the last value is the entropy after the text
    assert expected.std() > 0.1
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert stream.position == len(tokens)


def test_entropy_stream_window_of_one():
    model = entropy_model(window=1)
    utf8 = b"abcdefg"
    stream = EntropyStream(model)
    got = torch.cat([stream.feed([BOS_ID]), *(stream.feed([b + BYTE_OFFSET]) for b in utf8)]).numpy()
    np.testing.assert_allclose(got[: len(utf8)], score_document_alone(model, utf8), atol=1e-5, rtol=0)


RULES = [
    PatchRule(scheme="entropy", threshold=2.0),
    PatchRule(scheme="entropy", threshold=2.0, max_patch_length=3),
    PatchRule(scheme="monotonic", threshold=0.1),
    PatchRule(scheme="monotonic", threshold=0.1, max_patch_length=4),
    PatchRule(scheme="space"),
    PatchRule(scheme="space", max_patch_length=3),
    PatchRule(scheme="static", patch_size=4),
    PatchRule(scheme="static", patch_size=5, max_patch_length=2),
    PatchRule(scheme="byte"),
]


@pytest.mark.parametrize("cfg", RULES, ids=lambda c: f"{c.scheme}-{c.max_patch_length}")
def test_patch_stream_equals_patch_lengths_on_every_prefix(cfg):
    utf8 = TEXT.encode() + "  ,,x€y  \n\tz".encode()
    rng = np.random.default_rng(0)
    entropies = (rng.random(len(utf8)) * 4).astype(np.float32)
    stream = PatchStream(cfg)
    for n in range(len(utf8) + 1):
        expected = patch_lengths(utf8[:n], entropies[:n].astype(np.float16), cfg)
        assert stream.lengths == expected.tolist(), n
        if n < len(utf8):
            predicted = stream.starts_patch(entropies[n], utf8[n])
            assert stream.push(utf8[n], entropies[n]) == predicted


def blt_model(seed=0) -> BLT:
    torch.manual_seed(seed)
    return BLT(load_blt_preset("debug")).eval()


class MetaAlignedDecoder(torch.nn.Module):
    """A small stand-in with Meta's decoder alignment and nothing else: the logits at position t
    read the mean embedding of the patch before the patch of token t + 1 (the last position
    reads its own patch). Under it, unlike under a decoder that reads the patches before t's
    own, the logits for byte n depend on whether byte n starts a patch, so it checks the
    generator's patch_lengths (the placeholder byte, both patchings under `space`)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(260, 16)
        self.out = torch.nn.Linear(32, 260)

    def forward(self, tokens, patch_lengths, doc_ids):
        num_rows, seq_len = tokens.shape
        e = self.embed(tokens)  # (B, T, 16)
        logits = []
        for row in range(num_rows):
            lengths = patch_lengths[row][patch_lengths[row] > 0]
            patch_ids = torch.repeat_interleave(torch.arange(lengths.numel()), lengths)  # (T,)
            pooled = torch.zeros(lengths.numel(), 16).index_add(0, patch_ids, e[row]) / lengths[:, None]
            seen = torch.cat([patch_ids[1:] - 1, patch_ids[-1:]])  # patch before patch(t + 1)
            logits.append(self.out(torch.cat([e[row], pooled[seen]], dim=-1)))
        return torch.stack(logits)


@pytest.mark.parametrize("model_kind", ["blt", "meta-aligned"])
@pytest.mark.parametrize(
    "cfg",
    [PatchRule(scheme="entropy", threshold=3.0, max_patch_length=6), PatchRule(scheme="space"), PatchRule(scheme="static", patch_size=3)],
    ids=lambda c: c.scheme,
)
def test_generation_patches_and_logits_match_the_finished_text(cfg, model_kind):
    model = blt_model() if model_kind == "blt" else MetaAlignedDecoder()
    scorer = entropy_model(window=8)
    prompt = "def f(x):\n    return x + 1 # a naïve ".encode()
    result = generate(model, scorer, cfg, prompt, max_bytes=40, temperature=1.0, seed=3, keep_logits=True)
    text = result.text
    assert text.startswith(prompt) and len(text) == len(prompt) + 40
    entropies = score_document_alone(scorer, text)
    if cfg.scheme == "entropy":
        np.testing.assert_allclose(result.entropies, entropies, atol=1e-5, rtol=0)
    # The patches used are the rule applied to the final text.
    expected = patch_lengths(text, entropies.astype(np.float16), cfg)
    assert result.patch_lengths == expected.tolist()
    assert 1 < len(expected) < len(text)
    # Each step's logits are the BLT's on the finished text, patched by the rule. (Under
    # `space` the prompt ends in a delimiter: the first step runs both patchings.)
    tokens = torch.tensor([[BOS_ID, *(b + BYTE_OFFSET for b in text)]])
    lengths = torch.tensor([[1, *expected.tolist()]])
    with torch.no_grad():
        full = model(tokens, lengths, torch.zeros_like(tokens))[0]
    steps = torch.stack(result.step_logits)
    torch.testing.assert_close(steps, full[len(prompt) : len(text)].float(), atol=1e-5, rtol=1e-5)


def test_meta_alignment_makes_the_next_start_matter():
    """The check above is not vacuous: under Meta's alignment the two patchings of byte n give
    different logits at position n."""
    model = MetaAlignedDecoder()
    tokens = torch.tensor([[BOS_ID, *(b + BYTE_OFFSET for b in b"a, "), BYTE_OFFSET]] * 2)
    lengths = torch.tensor([[1, 3, 1], [1, 4, 0]])  # byte 3 starts a patch / joins the last
    with torch.no_grad():
        logits = model(tokens, lengths, torch.zeros_like(tokens))[:, -2]
    assert (logits[0] - logits[1]).abs().max() > 1e-2


def test_generation_without_entropy_model_for_entropy_rule_is_refused():
    with pytest.raises(ValueError, match="needs an entropy model"):
        generate(blt_model(), None, PatchRule(scheme="entropy", threshold=1.0), b"x", 1)
