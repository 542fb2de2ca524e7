"""Threshold calibration: the mean patch size reached is within 2% of the target when patching the
sample again with the returned threshold; unreachable targets fail with the reachable range."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import numpy as np
import pytest

from blt_data.calibrate import Calibration, CalibrationError, calibrate_threshold
from blt_data.patching import PatchRule, patch_lengths, patch_lengths_batch


def synthetic_sample(seed: int = 0, num_docs: int = 150) -> tuple[np.ndarray, np.ndarray]:
    """float16 entropies (nats) with a spread, realistic document lengths (lognormal, mean ~5 KB)."""
    rng = np.random.default_rng(seed)
    byte_lengths = np.maximum(1, rng.lognormal(np.log(5000) - 0.5, 1.0, num_docs)).astype(np.int64)
    e = rng.gamma(2.0, 0.8, int(byte_lengths.sum())).astype(np.float16)
    return e, byte_lengths


def occurrences_before(keys: np.ndarray) -> np.ndarray:
    """For each position, how often its key occurred earlier (vectorised with a stable sort)."""
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    group_start = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    rank = np.arange(keys.size) - np.repeat(group_start, np.diff(np.r_[group_start, keys.size]))
    out = np.empty_like(keys)
    out[order] = rank
    return out


@pytest.fixture(scope="module")
def stdlib_sample() -> tuple[list[str], list[np.ndarray]]:
    """Stdlib sources with a cheap stand-in entropy: each byte's surprisal (nats) under an adaptive
    bigram model, -log((pairs seen + a) / (contexts seen + 256 a)), stored as float16. Unlike a
    unigram surprisal (one value per byte value, so "every space" is one step of ~15% of the
    patches) it takes many values, like a real entropy model's."""
    paths = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:80]
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in paths]
    data = [t.encode() for t in texts]
    b = np.frombuffer(b"".join(data), np.uint8).astype(np.int64)
    prev = np.r_[0, b[:-1]]
    a = 0.1
    surprisal = -np.log((occurrences_before(prev * 256 + b) + a) / (occurrences_before(prev) + 256 * a))
    entropies = np.split(surprisal.astype(np.float16), np.cumsum([len(d) for d in data])[:-1])
    return texts, entropies


def mean_patch_size(texts_or_lengths, entropies, cal: Calibration) -> float:
    """Re-patch independently (per document) with the calibrated config."""
    cfg = cal.patch_rule()
    patches = sum(patch_lengths(t if isinstance(t, str) else "x" * int(t), e, cfg).size for t, e in zip(texts_or_lengths, entropies))
    total = sum(e.size for e in entropies)
    return total / patches


@pytest.mark.parametrize("scheme", ["entropy", "monotonic"])
@pytest.mark.parametrize("max_patch_length", [None, 12])
def test_synthetic_targets(scheme, max_patch_length):
    e, byte_lengths = synthetic_sample()
    per_doc = np.split(e, np.cumsum(byte_lengths)[:-1])
    for target in (3.0, 4.5, 6.0, 8.0):
        cal = calibrate_threshold(e, target, scheme, max_patch_length, byte_lengths=byte_lengths)
        assert abs(cal.mean_patch_size_reached - target) <= 0.02 * target
        assert (cal.scheme, cal.max_patch_length, cal.target) == (scheme, max_patch_length, target)
        assert (cal.sample_documents, cal.sample_bytes) == (len(byte_lengths), int(byte_lengths.sum()))
        batch = patch_lengths_batch(byte_lengths, e, cal.patch_rule())
        assert batch.patch_lengths.size == cal.sample_patches
        assert cal.sample_bytes / cal.sample_patches == cal.mean_patch_size_reached
        if target == 4.5:  # also the slow per-document path, once per configuration
            assert mean_patch_size(byte_lengths, per_doc, cal) == cal.mean_patch_size_reached
        if max_patch_length:
            assert batch.patch_lengths.max() <= max_patch_length


@pytest.mark.parametrize("scheme", ["entropy", "monotonic"])
def test_stdlib_targets(stdlib_sample, scheme):
    texts, entropies = stdlib_sample
    for target, max_patch_length in ((3.0, None), (4.5, None), (6.0, None), (8.0, None), (4.5, 8), (6.0, 16)):
        cal = calibrate_threshold(entropies, target, scheme, max_patch_length)
        reached = mean_patch_size(texts, entropies, cal)
        assert reached == pytest.approx(cal.mean_patch_size_reached)
        assert abs(reached - target) <= 0.02 * target, (scheme, target, cal)


def test_max_patch_length_near_its_limit():
    e, byte_lengths = synthetic_sample(seed=1)
    # with m = 6 the largest mean is just under 6 (document tails are shorter)
    cal = calibrate_threshold(e, 5.9, "entropy", max_patch_length=6, byte_lengths=byte_lengths)
    assert abs(cal.mean_patch_size_reached - 5.9) <= 0.02 * 5.9
    with pytest.raises(CalibrationError, match=r"reaches mean patch sizes from 1 to 5\.9.*max_patch_length=6"):
        calibrate_threshold(e, 7.0, "entropy", max_patch_length=6, byte_lengths=byte_lengths)


def test_unigram_surprisal_steps_are_reported():
    # one value per byte value: the patch count jumps by every occurrence of a byte value at once
    texts = [p.read_text(encoding="utf-8", errors="replace")[:20_000] for p in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:20]]
    data = np.frombuffer("".join(texts).encode(), np.uint8)
    counts = np.bincount(data, minlength=256) + 1
    e = (-np.log(counts / counts.sum()))[data].astype(np.float16)
    reached = []
    for target in np.linspace(2.0, 8.0, 13):
        try:
            reached.append(calibrate_threshold([e], target).mean_patch_size_reached)
        except CalibrationError as err:
            assert "the patch count moves in steps here: the nearest reachable sizes are" in str(err)
    assert len(reached) < 13


def test_unreachable_targets_fail_clearly():
    e, byte_lengths = synthetic_sample(num_docs=20)
    with pytest.raises(CalibrationError, match="reaches mean patch sizes from 1 to"):
        calibrate_threshold(e, 0.5, "entropy", byte_lengths=byte_lengths)  # below 1 byte
    with pytest.raises(CalibrationError, match="one patch per document"):
        calibrate_threshold(e, 1e7, "monotonic", byte_lengths=byte_lengths)  # above the mean document
    # ten bytes reach 10, 5, 3.33, 2.5, ...: 3.0 falls between steps
    with pytest.raises(CalibrationError, match="nearest reachable sizes are 2.5 and 3.333"):
        calibrate_threshold([np.arange(10, dtype=np.float16)], 3.0)
    with pytest.raises(CalibrationError, match="no bytes"):
        calibrate_threshold([np.zeros(0, np.float16)], 4.0)
    with pytest.raises(ValueError, match="positive"):
        calibrate_threshold(e, 0.0, byte_lengths=byte_lengths)
    with pytest.raises(ValueError, match="only the entropy schemes"):
        calibrate_threshold(e, 4.0, "space", byte_lengths=byte_lengths)
    with pytest.raises(ValueError, match="with byte_lengths"):
        calibrate_threshold(e, 4.0)


def test_edge_targets_and_tiny_samples():
    # the extremes are reachable: 1 byte per patch and one patch per document
    e = np.array([0.5, 1.0, 1.0, 2.0], np.float16)
    assert calibrate_threshold([e], 1.0).mean_patch_size_reached == 1.0
    assert calibrate_threshold([e], 4.0).mean_patch_size_reached == 4.0
    # starts where e > θ: θ between 1.0 and 2.0 gives patches [3, 1]
    cal = calibrate_threshold([e], 2.0)
    assert cal.threshold == 1.5 and cal.sample_patches == 2
    # single-byte and empty documents have nothing to calibrate but still count
    cal = calibrate_threshold([np.zeros(1, np.float16), np.zeros(0, np.float16)], 1.0)
    assert (cal.sample_documents, cal.sample_bytes, cal.sample_patches) == (2, 1, 1)


def test_deterministic_and_layout_independent():
    e, byte_lengths = synthetic_sample(seed=2, num_docs=40)
    per_doc = np.split(e, np.cumsum(byte_lengths)[:-1])
    a = calibrate_threshold(e, 5.0, "monotonic", 10, byte_lengths=byte_lengths)
    b = calibrate_threshold(per_doc, 5.0, "monotonic", 10)
    c = calibrate_threshold([x.astype(np.float32) for x in per_doc], 5.0, "monotonic", 10)
    assert a == b == c
    assert Calibration.model_validate_json(a.model_dump_json()) == a
    assert a.patch_rule() == PatchRule(scheme="monotonic", threshold=a.threshold, max_patch_length=10)
