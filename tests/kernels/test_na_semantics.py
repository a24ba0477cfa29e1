"""``semantics`` vs an independent brute-force enumeration of NATTEN's neighborhoods (design §2.3).

The expected side is written from the rules in plain Python loops and never calls ``semantics``:
positions split into d interleaved groups; group index j of a group of length Lg has a stride leader
``min((j//s)*s + s//2, Lg-1)`` (non-causal) or ``min((j//s)*s + s-1, Lg-1)`` (causal); non-causal sees
group indices ``[clamp(leader - k//2, 0, Lg-k), +k)``, causal sees ``[max(leader-k+1, 0), j]``.
"""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from attnzoo.kernels.neighborhood import semantics


def brute_axis(L: int, k: int, d: int, s: int, causal: bool) -> list[list[int]]:
    """visible[i] = sorted key positions that query position i sees on one axis."""
    visible = []
    for i in range(L):
        members = list(range(i % d, L, d))
        Lg, j = len(members), i // d
        if causal:
            leader = min((j // s) * s + s - 1, Lg - 1)
            idx = range(max(leader - k + 1, 0), j + 1)
        else:
            leader = min((j // s) * s + s // 2, Lg - 1)
            start = min(max(leader - k // 2, 0), Lg - k)
            idx = range(start, start + k)
        visible.append([members[g] for g in idx])
    return visible


def brute_mask(shape, kernel_size, dilation, stride, causal) -> list[set[int]]:
    """visible[q] = set of row-major flat key indices that flat query q sees (product of the axes)."""
    axes = [brute_axis(*cfg) for cfg in zip(shape, kernel_size, dilation, stride, causal, strict=True)]
    strides = [math.prod(shape[a + 1 :]) for a in range(len(shape))]
    visible = []
    for coord in itertools.product(*(range(L) for L in shape)):
        per_axis = [axes[a][c] for a, c in enumerate(coord)]
        visible.append(
            {sum(t * st for t, st in zip(key, strides, strict=True)) for key in itertools.product(*per_axis)}
        )
    return visible


def test_clamp_form_equals_natten_formula():
    """The clamp form above equals NATTEN's own ``get_win_start`` (window_left = k//2,
    window_right = k//2 + k%2 - 1; causal start = max(leader - left - right, 0)), exhaustively for Lg <= 24."""
    for Lg in range(2, 25):
        for k in range(2, Lg + 1):
            left, right = k // 2, k // 2 + k % 2 - 1
            for s in range(1, k + 1):
                for j in range(Lg):
                    leader = min((j // s) * s + s // 2, Lg - 1)
                    natten = max(leader - left, 0) + (leader + right >= Lg) * (Lg - right - leader - 1)
                    assert natten == min(max(leader - k // 2, 0), Lg - k), (Lg, k, s, j)
                    leader = min((j // s) * s + s - 1, Lg - 1)
                    assert max(leader - left - right, 0) == max(leader - k + 1, 0), (Lg, k, s, j)


def random_config(rng: random.Random):
    ndim = rng.choice([1, 1, 2, 2, 3])
    max_len = {1: 40, 2: 13, 3: 7}[ndim]
    shape, ks, ds, ss, cs = [], [], [], [], []
    for _ in range(ndim):
        L = rng.randint(2, max_len)
        k = L if rng.random() < 0.15 else rng.randint(2, L)
        d = rng.randint(1, L // k) if rng.random() < 0.6 else 1
        shape.append(L), ks.append(k), ds.append(d), ss.append(rng.randint(1, k)), cs.append(rng.random() < 0.3)
    return tuple(shape), tuple(ks), tuple(ds), tuple(ss), tuple(cs)


_rng = random.Random(20240611)
CONFIGS = [random_config(_rng) for _ in range(240)]


def _id(cfg) -> str:
    shape, ks, ds, ss, cs = cfg
    return "L{}-k{}-d{}-s{}-c{}".format(*("x".join(str(int(x)) for x in t) for t in (shape, ks, ds, ss, cs)))


def test_config_coverage():
    """The random configs exercise every feature the brute force is meant to check."""
    axes = [
        (L, k, d, s, c)
        for shape, ks, ds, ss, cs in CONFIGS
        for L, k, d, s, c in zip(shape, ks, ds, ss, cs, strict=True)
    ]
    assert {len(cfg[0]) for cfg in CONFIGS} == {1, 2, 3}
    assert any(k % 2 for _, k, *_ in axes) and any(k % 2 == 0 for _, k, *_ in axes)
    assert any(d > 1 for _, _, d, _, _ in axes)
    assert any(d > 1 and L % d for L, _, d, _, _ in axes)  # unequal group lengths
    assert any(s > 1 and not c for _, _, _, s, c in axes) and any(s > 1 and c for _, _, _, s, c in axes)
    assert any(c for *_, c in axes) and any(not c for *_, c in axes)
    assert any(k == L for L, k, *_ in axes) and any(k == L and c for L, k, _, _, c in axes)
    assert any(len(set(cfg[0])) > 1 for cfg in CONFIGS)  # non-square maps
    assert any(len(set(cfg[4])) > 1 for cfg in CONFIGS)  # mixed causal / non-causal axes


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_mask_matches_brute_force(cfg):
    shape, ks, ds, ss, cs = cfg
    got = semantics.neighborhood_mask(shape, ks, ds, ss, cs)
    expected = brute_mask(shape, ks, ds, ss, cs)
    n = math.prod(shape)
    assert got.shape == (n, n) and got.dtype == torch.bool
    for q, row in enumerate(got.tolist()):
        got_set = {t for t, seen in enumerate(row) if seen}
        if got_set != expected[q]:
            coord = tuple(torch.unravel_index(torch.tensor(q), shape))
            pytest.fail(
                f"{_id(cfg)} query {q} {tuple(int(c) for c in coord)}: "
                f"expected {sorted(expected[q])}, got {sorted(got_set)}"
            )
    for a, axis_cfg in enumerate(zip(shape, ks, ds, ss, cs, strict=True)):
        axis = semantics.axis_mask(*axis_cfg)
        assert [[t for t, seen in enumerate(row) if seen] for row in axis.tolist()] == brute_axis(*axis_cfg), a


@pytest.mark.parametrize("cfg", CONFIGS[:80], ids=_id)
def test_mask_invariants(cfg):
    shape, ks, ds, ss, cs = cfg
    mask = semantics.neighborhood_mask(shape, ks, ds, ss, cs)
    n = math.prod(shape)
    assert mask.diagonal().all(), "every query sees itself"
    if not any(cs):
        assert (mask.sum(1) == math.prod(ks)).all(), "non-causal: exactly prod(k) keys"
    counts = mask.sum(1)
    assert (counts >= 1).all() and (counts <= math.prod(ks)).all()
    coords = torch.stack(torch.unravel_index(torch.arange(n), shape), -1)  # (n, ndim)
    for a, (d, c) in enumerate(zip(ds, cs, strict=True)):
        qa, ka = coords[:, a, None], coords[None, :, a]
        assert not (mask & (qa % d != ka % d)).any(), f"axis {a}: key outside the query's dilation group"
        if c:
            assert not (mask & (ka > qa)).any(), f"axis {a}: causal query sees a later key"
        else:
            per_axis = semantics.axis_mask(shape[a], ks[a], d, ss[a], c).sum(1)
            assert (per_axis == ks[a]).all(), f"axis {a}: non-causal axis sees exactly k keys"


# (L, k, d, s, causal, query) -> visible key positions, worked out by hand.
KNOWN_1D = [
    ((7, 3, 1, 1, False), 0, [0, 1, 2]),
    ((7, 3, 1, 1, False), 3, [2, 3, 4]),
    ((7, 3, 1, 1, False), 6, [4, 5, 6]),
    ((8, 4, 1, 1, False), 4, [2, 3, 4, 5]),
    ((8, 4, 1, 1, False), 0, [0, 1, 2, 3]),
    ((8, 4, 1, 1, False), 5, [3, 4, 5, 6]),
    ((8, 4, 1, 1, False), 7, [4, 5, 6, 7]),
    ((9, 3, 2, 1, False), 1, [1, 3, 5]),
    ((9, 3, 2, 1, False), 8, [4, 6, 8]),
    ((10, 3, 3, 1, False), 9, [3, 6, 9]),  # group {0,3,6,9}: right border
    ((10, 3, 3, 1, False), 7, [1, 4, 7]),  # group {1,4,7}: the whole group
    ((8, 3, 1, 2, False), 2, [2, 3, 4]),  # stride 2: leader 3
    ((8, 3, 1, 2, False), 3, [2, 3, 4]),
    ((8, 3, 1, 2, False), 6, [5, 6, 7]),  # leader 7 = L-1, shifted inward
    ((7, 3, 1, 3, False), 6, [4, 5, 6]),  # last partial stride block: leader clamped to 6
    ((6, 3, 1, 1, True), 0, [0]),
    ((6, 3, 1, 1, True), 1, [0, 1]),
    ((6, 3, 1, 1, True), 4, [2, 3, 4]),
    ((8, 3, 1, 2, True), 2, [1, 2]),  # causal stride 2: leader 3, window starts at 1, ends at the query
    ((8, 3, 1, 2, True), 3, [1, 2, 3]),
    ((9, 2, 2, 1, True), 5, [3, 5]),
    ((5, 5, 1, 1, True), 4, [0, 1, 2, 3, 4]),
]


@pytest.mark.parametrize(("axis_cfg", "query", "keys"), KNOWN_1D)
def test_known_1d(axis_cfg, query, keys):
    assert brute_axis(*axis_cfg)[query] == keys
    mask = semantics.neighborhood_mask(axis_cfg[:1], axis_cfg[1:2], axis_cfg[2:3], axis_cfg[3:4], axis_cfg[4:5])
    assert mask[query].nonzero().flatten().tolist() == keys


def test_known_2d():
    shape = (5, 6)
    mask = semantics.neighborhood_mask(shape, (3, 3), (1, 1), (1, 1), (False, False))
    expected = {r * 6 + c for r in (0, 1, 2) for c in (3, 4, 5)}  # query (0, 4): rows shift down, cols left
    assert set(mask[0 * 6 + 4].nonzero().flatten().tolist()) == expected
    mask = semantics.neighborhood_mask(shape, (2, 3), (2, 1), (1, 1), (True, False))
    expected = {r * 6 + c for r in (1, 3) for c in (1, 2, 3)}  # query (3, 2): causal dilated rows
    assert set(mask[3 * 6 + 2].nonzero().flatten().tolist()) == expected


@pytest.mark.parametrize("cfg", CONFIGS[:120], ids=_id)
def test_relative_index(cfg):
    shape, ks, ds, ss, cs = cfg
    for L, k, d, s, c in zip(shape, ks, ds, ss, cs, strict=True):
        idx = semantics.relative_index(L, k, d)
        assert idx.shape == (L, L) and idx.dtype == torch.long
        visible = brute_axis(L, k, d, s, c)
        for i in range(L):
            for t in visible[i]:
                value = int(idx[i, t])
                assert value == (t // d - i // d) + k - 1, (L, k, d, s, c, i, t)
                assert 0 <= value <= 2 * k - 2, (L, k, d, s, c, i, t, value)
                if c:
                    assert value <= k - 1, (L, k, d, s, c, i, t, value)
            if not c and s == 1 and k % 2:  # odd k, no stride: the centre query is at bias index k-1
                assert int(idx[i, i]) == k - 1


def test_relative_index_known():
    # L=7, k=3: query 0 sees {0,1,2} -> indices {2,3,4}; query 6 sees {4,5,6} -> {0,1,2}.
    idx = semantics.relative_index(7, 3, 1)
    assert idx[0, [0, 1, 2]].tolist() == [2, 3, 4]
    assert idx[6, [4, 5, 6]].tolist() == [0, 1, 2]
    # dilation 2 on L=9, k=3: query 1 sees {1,3,5}, group offsets 0, 1, 2 -> indices 2, 3, 4.
    idx = semantics.relative_index(9, 3, 2)
    assert idx[1, [1, 3, 5]].tolist() == [2, 3, 4]
    assert idx[7, [3, 5, 7]].tolist() == [0, 1, 2]
