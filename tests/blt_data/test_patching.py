"""Patch rules (DESIGN.md §4): hand-checked examples, a slow reference loop on random inputs,
batched == per-document, the Arrow column form, and patch statistics."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
from pydantic import ValidationError

from blt_data.patching import (
    PatchRule,
    patch_lengths,
    patch_lengths_arrow,
    patch_lengths_batch,
    patches_from_starts,
    start_scores,
)
from blt_data.stats import HISTOGRAM_BINS, DatasetStats, patch_stats

F16 = np.float16


def lengths(text, entropies=None, **cfg) -> list[int]:
    out = patch_lengths(text, None if entropies is None else np.asarray(entropies, F16), PatchRule(**cfg))
    assert out.dtype == np.int32
    return out.tolist()


# ---- hand-checked examples ---------------------------------------------------------------------


def test_entropy_global_threshold():
    # starts: byte 0, byte 1 (2.0 > 1), byte 4 (3.0 > 1); 1.0 is not > 1.0
    assert lengths("abcdef", [0.5, 2.0, 0.1, 0.1, 3.0, 1.0], threshold=1.0) == [1, 3, 2]
    assert lengths("abc", [1.0, 1.0, 1.0], threshold=1.0) == [3]
    assert lengths("abc", [9.0, 0.0, 0.0], threshold=1.0) == [3]  # byte 0's entropy is irrelevant
    assert lengths("abc", [0.0, 0.0, 0.0], threshold=-1.0) == [1, 1, 1]


def test_monotonic_threshold():
    # differences at bytes 1..5: -4.5, 0.5, 1.5, -0.5, 2.0 -> starts at 0, 3, 5
    assert lengths("abcdef", [5.0, 0.5, 1.0, 2.5, 2.0, 4.0], scheme="monotonic", threshold=1.0) == [3, 2, 1]
    # a high plateau starts one patch only, where it rises
    assert lengths("abcde", [0.0, 3.0, 3.0, 3.0, 0.0], scheme="monotonic", threshold=1.0) == [1, 4]


def test_threshold_is_compared_exactly_not_in_float16():
    above_one = float(np.nextafter(F16(1.0), F16(2.0)))  # 1.0009765625, the next float16
    # float16(1.0005) rounds up to 1.0009765625; the rule compares real numbers, so it starts.
    assert lengths("ab", [0.0, above_one], threshold=1.0005) == [1, 1]
    assert lengths("ab", [0.0, above_one], threshold=above_one) == [2]
    # monotonic difference in float64: 4.0 - 2**-24 is not representable in float16 or float32
    tiny = float(F16(2.0**-24))
    assert lengths("ab", [tiny, 4.0], scheme="monotonic", threshold=4.0 - 2.0**-23) == [1, 1]
    assert lengths("ab", [tiny, 4.0], scheme="monotonic", threshold=4.0 - tiny) == [2]


@pytest.mark.parametrize("seed", range(4))
def test_float16_starts_by_bit_pattern_equal_real_number_comparisons(seed):
    """Non-negative float16 entropies are compared as int16 bit patterns: the same starts as
    comparing the values as real numbers, for any threshold (zero, -0.0, negative, on and between
    float16 values); a -0.0 or negative entropy takes numpy's float16 comparison."""
    rng = np.random.default_rng(seed)
    lengths_ = rng.integers(0, 50, 40)
    grid = np.array([0.0, 2.0**-24, 2.0**-14, 0.5, 1.0, 1.0009765625, 3.0, 65504.0], F16)
    e = rng.choice(grid, int(lengths_.sum())) if seed % 2 else rng.gamma(1.0, 1.0, int(lengths_.sum())).astype(F16)
    for values in (e, np.where(rng.random(e.size) < 0.1, -e, e).astype(F16)):  # the second one has signs
        for threshold in (0.0, -0.0, -1e-9, -2.0, 2.0**-25, 2.0**-24, 0.5, 1.0005, 1.0009765625, 3.0, 7e4):
            rule = PatchRule(threshold=threshold)
            got = patch_lengths_batch(lengths_, values, rule)
            starts = values.astype(np.float64) > threshold  # the rule as written: real numbers
            want = patches_from_starts(starts, np.r_[0, np.cumsum(lengths_)], lengths_)
            assert np.array_equal(got.patch_lengths, want.patch_lengths) and np.array_equal(got.num_patches, want.num_patches)


def test_max_patch_length_cuts_from_the_start():
    assert lengths("abcdefghij", [0.0] * 10, threshold=5.0, max_patch_length=4) == [4, 4, 2]
    assert lengths("abcdefgh", [0.0] * 8, threshold=5.0, max_patch_length=4) == [4, 4]
    # patches [1, 3, 6] -> [1] [2, 1] [2, 2, 2]
    e = [0.0, 9.0, 0.0, 0.0, 9.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert lengths("abcdefghij", e, threshold=1.0, max_patch_length=2) == [1, 2, 1, 2, 2, 2]
    assert lengths("abcdefghij", e, threshold=1.0, max_patch_length=1) == [1] * 10


def test_max_patch_length_counts_bytes_and_may_split_a_character():
    # "日本" is 6 bytes (E6 97 A5 E6 9C AC): pieces of 4 split 本
    assert lengths("日本", [0.0] * 6, threshold=1.0, max_patch_length=4) == [4, 2]
    # "é😀" = C3 A9 F0 9F 98 80: space keeps it one patch, the cut makes 2 + 2 + 2
    assert lengths("é😀", scheme="space", max_patch_length=2) == [2, 2, 2]
    assert lengths("a 😀😀", scheme="space", max_patch_length=3) == [2, 3, 3, 2]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("hello, world", [7, 5]),  # "hello, " "world"
        ("  hi there  ", [2, 3, 7]),  # "  " "hi " "there  "
        ("a,  b", [4, 1]),  # the whole delimiter run stays with the patch before it
        ("don't", [4, 1]),
        ("a1_b", [3, 1]),  # '_' is a delimiter; digits are word bytes
        ("x2 y9", [3, 2]),
        ("line\n\tnext", [6, 4]),
        ("café au lait", [6, 3, 4]),  # "café " = 63 61 66 C3 A9 20
        ("é, ü", [4, 2]),  # C3 A9 2C 20 | C3 BC
        ("x=é", [2, 2]),  # a leading byte after a delimiter starts a patch
        ("日本 語", [7, 3]),  # 日本 and the space, then 語
        ("日本語", [9]),  # non-ASCII characters are word bytes: no split inside a word
        ("a 😀b", [2, 5]),
        ("😀 😀", [5, 4]),
        ("!!!", [3]),
        ("", []),
        ("a", [1]),
        (" ", [1]),
    ],
)
def test_space(text, expected):
    assert lengths(text, scheme="space") == expected
    assert sum(expected) == len(text.encode())


def test_space_continuation_bytes_never_start_a_patch():
    # raw bytes (not valid UTF-8): continuation bytes after a delimiter do not start a patch, and
    # a word byte after a continuation byte does not either
    assert lengths(b"a \x80\x80b", scheme="space") == [5]
    assert lengths(b"a \xc3\xa9 b", scheme="space") == [2, 3, 1]
    assert lengths(b"\x80 a", scheme="space") == [2, 1]


def test_static_and_byte():
    assert lengths("abcdefghij", scheme="static", patch_size=4) == [4, 4, 2]
    assert lengths("abcdefgh", scheme="static", patch_size=4) == [4, 4]
    assert lengths("abc", scheme="static", patch_size=4) == [3]
    assert lengths("日本", scheme="static", patch_size=4) == [4, 2]
    # static 6 then max 4: each 6 becomes 4 + 2
    assert lengths("abcdefghijklm", scheme="static", patch_size=6, max_patch_length=4) == [4, 2, 4, 2, 1]
    assert lengths("é😀", scheme="byte") == [1] * 6
    assert lengths("ab", scheme="byte", max_patch_length=1) == [1, 1]


@pytest.mark.parametrize("scheme", ["entropy", "monotonic", "space", "static", "byte"])
def test_empty_and_single_byte(scheme):
    cfg = {"threshold": 0.5} if scheme in ("entropy", "monotonic") else {}
    empty = patch_lengths("", np.zeros(0, F16), PatchRule(scheme=scheme, **cfg))
    assert empty.dtype == np.int32 and empty.shape == (0,)
    assert lengths("x", [3.0], scheme=scheme, **cfg) == [1]
    assert lengths(b"\xff", [0.0], scheme=scheme, max_patch_length=1, **cfg) == [1]


def test_entropy_schemes_need_matching_entropies():
    cfg = PatchRule(threshold=1.0)
    with pytest.raises(ValueError, match="one entropy per UTF-8 byte: 2 bytes"):
        patch_lengths("é", np.zeros(1, F16), cfg)  # é is 2 bytes
    with pytest.raises(ValueError, match="needs entropies"):
        patch_lengths("ab", None, cfg)
    with pytest.raises(ValueError, match="one entropy per UTF-8 byte"):
        patch_lengths("ab", np.zeros((1, 2), F16), cfg)
    with pytest.raises(ValueError, match="NaN at byte 1"):
        patch_lengths("ab", np.array([0.0, np.nan], F16), cfg)
    with pytest.raises(ValueError, match="needs a threshold"):
        patch_lengths("ab", np.zeros(2, F16), PatchRule(scheme="monotonic"))
    with pytest.raises(ValueError, match="UTF-8 bytes"):
        patch_lengths_batch([2], None, PatchRule(scheme="space"))
    with pytest.raises(ValueError, match="utf8 must be 3 bytes"):
        patch_lengths_batch([3], None, PatchRule(scheme="space"), utf8=b"ab")
    with pytest.raises(ValueError, match=">= 0"):
        patch_lengths_batch([-1], None, PatchRule(scheme="byte"))


def test_config_is_strict():
    with pytest.raises(ValidationError):
        PatchRule(scheme="entropy", treshold=1.0)
    with pytest.raises(ValidationError):
        PatchRule(scheme="bpe")
    with pytest.raises(ValidationError):
        PatchRule(scheme="entropy", max_patch_length=0)
    with pytest.raises(ValidationError):
        PatchRule(scheme="static", patch_size=0)
    with pytest.raises(ValidationError):
        PatchRule(scheme="entropy", threshold=float("nan"))
    with pytest.raises(ValidationError, match="only used by the entropy schemes"):
        PatchRule(scheme="space", threshold=1.0)
    cfg = PatchRule(scheme="monotonic", threshold=0.25, max_patch_length=16)
    assert PatchRule.model_validate_json(cfg.model_dump_json()) == cfg


# ---- random inputs against a slow reference ------------------------------------------------------


def reference_lengths(data: bytes, e: np.ndarray | None, cfg: PatchRule) -> list[int]:
    """DESIGN.md §4 written as a plain loop over bytes, independent of the vectorised code."""
    n = len(data)
    if cfg.scheme == "static":
        starts = [j for j in range(n) if j % cfg.patch_size == 0]
    else:
        starts = []
        for j in range(n):
            if j == 0 or cfg.scheme == "byte":
                starts.append(j)
            elif cfg.scheme == "entropy":
                if float(e[j]) > cfg.threshold:
                    starts.append(j)
            elif cfg.scheme == "monotonic":
                if float(e[j]) - float(e[j - 1]) > cfg.threshold:
                    starts.append(j)
            else:  # space
                cur, prev = data[j], data[j - 1]
                word = chr(cur).isascii() and chr(cur).isalnum() or cur >= 0xC0
                delimiter = prev < 0x80 and not chr(prev).isalnum()
                if word and delimiter:
                    starts.append(j)
    out = []
    for a, b in zip(starts, starts[1:] + [n]):
        length = b - a
        m = cfg.max_patch_length or length
        while length > m:
            out.append(m)
            length -= m
        out.append(length)
    return out


ALPHABET = list("aZ9 ,.\n_-") + ["é", "日本", "😀", "ü"]


def random_documents(rng: np.random.Generator, num_docs: int) -> tuple[list[bytes], list[np.ndarray]]:
    docs, entropies = [], []
    for _ in range(num_docs):
        n = int(rng.choice([0, 1, 2, 3, int(rng.integers(4, 120))]))
        if rng.random() < 0.2:  # raw bytes: the rules are defined on any bytes
            data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        else:
            data = "".join(rng.choice(ALPHABET, n)).encode()
        docs.append(data)
        # few distinct values, so many ties with the threshold and between neighbours
        entropies.append(rng.choice(np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.25], F16), len(data)))
    return docs, entropies


CONFIGS = [
    PatchRule(scheme="entropy", threshold=1.0),
    PatchRule(scheme="entropy", threshold=1.2, max_patch_length=3),
    PatchRule(scheme="monotonic", threshold=0.5),
    PatchRule(scheme="monotonic", threshold=-0.5, max_patch_length=2),
    PatchRule(scheme="space"),
    PatchRule(scheme="space", max_patch_length=4),
    PatchRule(scheme="static", patch_size=3),
    PatchRule(scheme="static", patch_size=5, max_patch_length=2),
    PatchRule(scheme="byte"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.threshold}-{c.max_patch_length}")
def test_random_documents_match_reference_and_batch(cfg):
    rng = np.random.default_rng(1234)
    docs, entropies = random_documents(rng, 300)
    per_doc = [patch_lengths(d, e, cfg) for d, e in zip(docs, entropies)]
    for d, e, got in zip(docs, entropies, per_doc):
        assert got.tolist() == reference_lengths(d, e, cfg), (d, e)
        assert (got > 0).all() and got.sum() == len(d)
        if cfg.max_patch_length:
            assert got.max(initial=0) <= cfg.max_patch_length

    batch = patch_lengths_batch([len(d) for d in docs], np.concatenate(entropies), cfg, utf8=b"".join(docs))
    assert batch.num_patches.tolist() == [len(p) for p in per_doc]
    assert [p.tolist() for p in batch.split()] == [p.tolist() for p in per_doc]
    assert batch.patch_lengths.dtype == np.int32


def test_monotonic_never_diffs_across_documents():
    # doc 2's byte 0 follows doc 1's last byte in the concatenation; it is a start anyway, and
    # doc 2's byte 1 compares with doc 2's byte 0 only
    e = np.array([0.0, 0.0, 5.0, 5.0], F16)
    batch = patch_lengths_batch([2, 2], e, PatchRule(scheme="monotonic", threshold=1.0))
    assert [p.tolist() for p in batch.split()] == [[2], [2]]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.scheme}-{c.threshold}-{c.max_patch_length}")
def test_batches_cut_into_groups_and_chunks(monkeypatch, cfg):
    import blt_data.patching as patching

    # tiny groups and monotonic chunks: documents span chunk edges, groups hold 1..many documents
    monkeypatch.setattr(patching, "_GROUP_BYTES", 50)
    monkeypatch.setattr(patching, "_CHUNK_BYTES", 7)
    rng = np.random.default_rng(5)
    docs, entropies = random_documents(rng, 80)
    batch = patch_lengths_batch([len(d) for d in docs], np.concatenate(entropies), cfg, utf8=b"".join(docs))
    assert [p.tolist() for p in batch.split()] == [reference_lengths(d, e, cfg) for d, e in zip(docs, entropies)]


def test_start_scores_match_the_rule():
    rng = np.random.default_rng(7)
    docs, entropies = random_documents(rng, 50)
    byte_lengths = [len(d) for d in docs]
    e = np.concatenate(entropies)
    for scheme in ("entropy", "monotonic"):
        scores = start_scores(e, byte_lengths, scheme)
        for theta in (-0.25, 0.5, 1.0, 1.75):
            batch = patch_lengths_batch(byte_lengths, e, PatchRule(scheme=scheme, threshold=theta))
            assert batch.patch_lengths.size == sum(n > 0 for n in byte_lengths) + int((scores > theta).sum())


# ---- Arrow columns -------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS[::2], ids=lambda c: c.scheme)
def test_arrow_columns(cfg):
    rng = np.random.default_rng(99)
    raw, entropies = random_documents(rng, 80)
    texts = [d.decode("utf-8", errors="replace") for d in raw]  # strings must be valid UTF-8
    entropies = [rng.random(len(t.encode()), dtype=np.float32).astype(F16) * 3 for t in texts]
    table = pa.table(
        {
            "text": pa.array(texts, pa.large_string()),
            "entropies": pa.array([e.tolist() for e in entropies], pa.list_(pa.float16())),
        }
    ).slice(5, 60)  # a slice has non-zero offsets into its buffers
    column = patch_lengths_arrow(table["text"], table["entropies"], cfg)
    assert column.type == pa.list_(pa.int32())
    expected = [patch_lengths(t, e, cfg).tolist() for t, e in zip(texts[5:65], entropies[5:65])]
    assert column.to_pylist() == expected
    small = patch_lengths_arrow(pa.array(texts[:10], pa.string()), pa.array([e.tolist() for e in entropies[:10]], pa.list_(pa.float32())), cfg)
    assert small.to_pylist() == [patch_lengths(t, e, cfg).tolist() for t, e in zip(texts[:10], entropies[:10])]


def test_arrow_rejects_mismatched_entropies():
    text = pa.array(["ab", "é"])
    with pytest.raises(ValueError, match="row 1: 1 entropies for 2 bytes"):
        patch_lengths_arrow(text, pa.array([[0.0, 1.0], [0.0]], pa.list_(pa.float16())), PatchRule(threshold=0.5))
    with pytest.raises(ValueError, match="needs the entropies column"):
        patch_lengths_arrow(text, None, PatchRule(threshold=0.5))
    with pytest.raises(TypeError):
        patch_lengths_arrow(pa.array([1, 2]), None, PatchRule(scheme="byte"))


# ---- statistics ------------------------------------------------------------------------------------


def test_patch_stats_bins_and_sums():
    s = patch_stats([np.array([1, 1, 64]), np.array([], np.int32), np.array([65, 1000, 2])])
    assert (s.documents, s.bytes, s.patches) == (3, 1133, 6)
    assert len(s.patch_length_histogram) == HISTOGRAM_BINS == 65
    assert s.patch_length_histogram[0] == 2  # length 1
    assert s.patch_length_histogram[1] == 1  # length 2
    assert s.patch_length_histogram[63] == 1  # length 64
    assert s.patch_length_histogram[64] == 2  # longer than 64
    assert s.mean_patch_length == pytest.approx(1133 / 6)
    assert DatasetStats().mean_patch_length is None
    assert DatasetStats.model_validate_json(s.model_dump_json()) == s


def test_patch_stats_of_units_add_up():
    rng = np.random.default_rng(3)
    docs, entropies = random_documents(rng, 200)
    cfg = PatchRule(threshold=1.0, max_patch_length=70)
    unit_stats = []
    for lo, hi in ((0, 70), (70, 71), (71, 200)):
        batch = patch_lengths_batch([len(d) for d in docs[lo:hi]], np.concatenate(entropies[lo:hi]), cfg)
        unit_stats.append(patch_stats(*batch))
    whole = patch_stats([patch_lengths(d, e, cfg) for d, e in zip(docs, entropies)])
    assert unit_stats[0] + unit_stats[1] + unit_stats[2] == whole
    assert whole.bytes == sum(len(d) for d in docs)
    with pytest.raises(ValueError, match="needs num_patches"):
        patch_stats(np.array([1, 2]))
