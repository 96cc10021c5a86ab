"""Bucket planning for weight sync (pure functions), against a brute-force reference."""
import random

import pytest
import torch

from dualrpo_mcore.rollout.sync import BucketedExporter, bucketize


def _reference(sizes, cap):
    """Walk the tensors, closing a bucket exactly when adding the next one would overflow it."""
    buckets, cur = [], []
    for i, s in enumerate(sizes):
        if cur and sum(sizes[j] for j in cur) + s > cap:
            buckets.append(cur)
            cur = []
        cur.append(i)
    return buckets + ([cur] if cur else [])


def _plan(sizes, cap):
    """``bucketize`` on float32 tensors of these byte sizes, as index lists."""
    named = [(str(i), torch.zeros(s // 4)) for i, s in enumerate(sizes)]
    return [[int(n) for n, _ in b] for b in bucketize(iter(named), cap)]


def test_bucketize_matches_reference_and_bounds():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([4, 8, 64, 300, 1000]) for _ in range(rng.randint(0, 30))]
        cap = rng.choice([1, 50, 512, 2000])
        plan = _plan(sizes, cap)
        assert plan == _reference(sizes, cap)
        assert [i for b in plan for i in b] == list(range(len(sizes)))  # order kept, each once
        for b in plan:
            assert len(b) == 1 or sum(sizes[i] for i in b) <= cap


def test_bucketize_streams_the_plan():
    assert _plan([40, 40, 40, 120, 16, 4], 100) == [[0, 1], [2], [3], [4, 5]]
    with pytest.raises(ValueError, match="bucket_bytes"):
        BucketedExporter(0)
