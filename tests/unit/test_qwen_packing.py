"""The packed layout's bookkeeping (``models.qwen2_5_vl.packing``, ``geometry.packed_rope_index``,
``packed_attention.RowLayout``) against the padded batch and brute force, and the one rotary
behaviour of Megatron-Core the packed forward relies on. The model itself: tests/distributed/test_packed_model.py."""
import inspect
from types import SimpleNamespace

import pytest
import torch

from dualrpo_mcore.models.qwen2_5_vl import geometry, testing
from dualrpo_mcore.models.qwen2_5_vl.packing import Packing, pack

MERGE = 2
ROWS = ((), ((6, 8),), ((4, 10), (6, 6)), (), ((4, 4),))


def _batch(rows=ROWS, empty_row=None):
    batch = testing.make_batch(rows=rows)
    if empty_row is not None:  # a row without a real token (a text-only one: its image would go missing)
        batch["attention_mask"][empty_row] = 0
    return batch


@pytest.mark.parametrize("empty_row", [None, 3])
def test_pack_keeps_each_rows_tokens_and_positions(empty_row):
    batch = _batch(empty_row=empty_row)
    ids, pos, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"],
                             testing.IMAGE, MERGE, multiple=16, pad_id=0)
    real = batch["attention_mask"].bool()
    lengths = real.sum(1)
    assert packing.cu_seqlens.dtype == torch.int32 and packing.rows == 5
    assert packing.cu_seqlens.tolist() == [0] + lengths.cumsum(0).tolist()
    assert packing.total % 16 == 0 and packing.total - packing.tokens < 16
    assert torch.equal(ids[0, :packing.tokens], batch["input_ids"][real]) and not ids[0, packing.tokens:].any()
    want, _ = geometry.rope_index(batch["input_ids"], batch["image_grid_thw"], testing.IMAGE, MERGE,
                                  batch["attention_mask"])
    assert pos.shape == (3, 1, packing.total)
    assert torch.equal(pos[:, 0, :packing.tokens], want[:, real]) and not pos[:, 0, packing.tokens:].any()
    # unpack puts every real token back in its [B, S] place and fills the padding
    back = packing.unpack(ids[..., None].float(), fill=-1.0)[..., 0]
    assert torch.equal(back[real], batch["input_ids"][real].float()) and bool((back[~real] == -1).all())


def test_unpack_is_differentiable_and_checks_its_input():
    batch = _batch()
    _, _, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], testing.IMAGE, MERGE)
    x = torch.randn(1, packing.total, 3, requires_grad=True)
    packing.unpack(x).sum().backward()
    assert torch.equal(x.grad[0, :packing.tokens], torch.ones(packing.tokens, 3))
    with pytest.raises(ValueError, match="expected 90 tokens"):
        packing.unpack(torch.zeros(1, 89, 3))
    with pytest.raises(ValueError, match="not built by pack"):
        Packing(cu_seqlens=packing.cu_seqlens, total=packing.total).unpack(x)


def test_rows_images_must_be_whole():
    """A row whose image tokens stop short of the image the grid list gives it is refused, naming the row."""
    batch = _batch(rows=(((6, 8),),))
    batch["input_ids"][0, 7] = 5  # one of the image's 12 tokens turned into text
    with pytest.raises(ValueError, match="packed row 0"):
        pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], testing.IMAGE, MERGE)
    batch = _batch(rows=((), ((4, 4),)))
    ids, _, packing = pack(batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], testing.IMAGE, MERGE)
    with pytest.raises(ValueError, match="2 images but the packed rows have tokens for 1"):
        geometry.packed_rope_index(ids, packing.cu_seqlens, batch["image_grid_thw"].repeat(2, 1), testing.IMAGE,
                                   MERGE)


def test_packing_checks_and_megatron_params():
    with pytest.raises(ValueError, match="rise from 0"):
        Packing(cu_seqlens=torch.tensor([1, 4], dtype=torch.int32), total=8)
    with pytest.raises(ValueError, match="past the stream"):
        Packing(cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32), total=8)
    # No trailing padding: Megatron gets the rows as they are.
    params = Packing(cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32), total=8).seq_params()
    assert params.qkv_format == "thd" and params.cu_seqlens_q.tolist() == [0, 3, 8] and params.max_seqlen_q == 5
    # Trailing padding is one more sequence, so the boundaries reach T (see Packing.seq_params).
    params = Packing(cu_seqlens=torch.tensor([0, 3, 3, 8], dtype=torch.int32), total=16).seq_params()
    assert params.cu_seqlens_q.tolist() == params.cu_seqlens_kv.tolist() == [0, 3, 3, 8, 16]
    assert params.cu_seqlens_q.dtype == torch.int32 and params.max_seqlen_kv == 8


def test_length_buckets_share_a_quarter_octave_ceiling():
    from dualrpo_mcore.models.qwen2_5_vl.packed_attention import length_buckets, length_ceiling

    # The ceiling against the smallest k with n <= 2 ** (k / 4), searched in floating point.
    for n in range(2, 5000):
        assert length_ceiling(n) == next(k for k in range(200) if n <= 2 ** (k / 4) * (1 + 1e-12)), n
    assert length_ceiling(0) == length_ceiling(1) == 0
    # 1 | 2 | 3, 3 | 4 | 9 | 16 | 17, 19 (2^(17/4) = 19.03) | 20
    assert length_buckets([3, 4, 1, 3, 9, 16, 17, 2, 19, 20]) == [[2], [7], [0, 3], [1], [4], [5], [6, 8], [9]]
    assert length_buckets([]) == []


def test_row_layout_puts_each_sequence_in_a_row_of_its_bucket():
    from dualrpo_mcore.models.qwen2_5_vl.packed_attention import RowLayout

    cu, total = torch.tensor([0, 3, 3, 7, 8], dtype=torch.int32), 11
    # Row 1 of cu is empty; 8..10 is the trailing padding: sequences (start, length) (0,3) (3,4) (7,1) (8,3).
    want = [[(7, 1)], [(0, 3), (8, 3)], [(3, 4)]]  # quarter-octave ceilings 1, 3.4 and 4
    for causal in (True, False):
        layout = RowLayout(cu, total, causal=causal)
        assert len(layout.buckets) == 3
        read = []
        for (index, valid, mask), rows in zip(layout.buckets, want):
            width = max(n for _, n in rows)
            assert index.shape == valid.shape == (len(rows), width)
            for j, (start, length) in enumerate(rows):
                assert valid[j].tolist() == [i < length for i in range(width)]
                assert index[j, :length].tolist() == list(range(start, start + length))
            if causal or bool(valid.all()):
                assert mask is None
            else:
                assert mask.shape == (len(rows), 1, 1, width) and torch.equal(mask[:, 0, 0], valid)
            read.append(valid.reshape(-1))
        # take lays the buckets' places out in order; slot reads every stream token back from its real place.
        assert torch.equal(layout.take, torch.cat([index.reshape(-1) for index, _, _ in layout.buckets]))
        assert layout.take[layout.slot].tolist() == list(range(total)) and bool(torch.cat(read)[layout.slot].all())


@pytest.fixture
def megatron_thd(monkeypatch):
    """Megatron's own THD rotary (and the unfused rotation it calls), whether or not a model built in this
    process routed them through ours."""
    from megatron.core.models.common.embeddings import rope_utils

    for name in ("_apply_rotary_pos_emb_bshd", "_apply_rotary_pos_emb_thd"):
        own = getattr(rope_utils, name)
        monkeypatch.setattr(rope_utils, name, getattr(own, "megatron_original", own))
    return rope_utils._apply_rotary_pos_emb_thd


def test_megatron_thd_rotary_keeps_every_tokens_own_position(megatron_thd):
    """What Packing.seq_params relies on, in the installed megatron-core: with boundaries that end at the
    stream's length, the unfused THD rotary gives each token its own row of the per-token (mrope) table,
    exactly as the padded layout does; it does not restart each sequence at position 0."""
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    t, heads, dim = 16, 2, 8
    g = torch.Generator().manual_seed(0)
    x = torch.randn(t, heads, dim, generator=g)
    freqs = torch.randn(t, 1, 1, dim, generator=g)  # arbitrary angles: not a function of the offset in a row
    cu = Packing(cu_seqlens=torch.tensor([0, 5, 5, 12], dtype=torch.int32), total=t).seq_params().cu_seqlens_q
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False,
                             mrope_section=[1, 1, 2])
    one_rank = SimpleNamespace(size=lambda: 1, rank=lambda: 0)
    thd = apply_rotary_pos_emb(x, freqs, config, cu_seqlens=cu, cp_group=one_rank)
    bshd = apply_rotary_pos_emb(x[:, None], freqs, config, cp_group=one_rank)[:, 0]
    assert torch.equal(thd, bshd)


def _assert_bitwise_per_table(fns, tables, x, call):
    """``call(fn, x, freqs)`` of every rotary in ``fns`` for each table and then the first again (a kept cos/sin
    must follow the table): values and input gradients bitwise those of ``fns[0]``, and the tables' differ."""
    outs, grads = [], []
    for fn in fns:
        for freqs in tables + tables[:1]:
            xi = x.clone().requires_grad_()
            out = call(fn, xi, freqs)
            out.backward(torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin())
            outs.append(out.detach())
            grads.append(xi.grad)
    n = len(tables) + 1
    for k in range(n, len(outs)):
        assert torch.equal(outs[k], outs[k % n]) and torch.equal(grads[k], grads[k % n])
    assert not torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("case", ["per-token", "partial rotary", "max-length table", "two cp ranks"])
def test_stream_rotary_is_megatrons_thd_bitwise(megatron_thd, monkeypatch, case):
    """The packed rotary without Megatron's per-sequence loop gives Megatron's own result bitwise (values and
    gradients) through ``apply_rotary_pos_emb``, so with the installed version's own keyword arguments, for
    two tables in turn (its cos and sin are kept per table) and a rotary over part of the head; it keeps the
    loop's work only where the loop matters (a max-length table, context parallelism)."""
    from megatron.core.models.common.embeddings import rope_utils

    from dualrpo_mcore.models.qwen2_5_vl.packing import _stream_rotary

    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return megatron_thd(*args, **kwargs)

    t, heads, dim = 24, 2, 8
    g = torch.Generator().manual_seed(1)
    lengths = [5, 0, 7, 1, 3] if case != "two cp ranks" else [8, 4, 4]  # cp: rows split in 2 x 2 chunks
    cu = Packing(cu_seqlens=torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32),
                 total=t if case != "two cp ranks" else 16).seq_params().cu_seqlens_q
    t = int(cu[-1]) // (2 if case == "two cp ranks" else 1)
    longest = int((cu[1:] - cu[:-1]).max())  # the trailing padding is a sequence of its own
    rot = dim // 2 if case == "partial rotary" else dim
    tables = [torch.randn(longest if case == "max-length table" else int(cu[-1]), 1, 1, rot, generator=g)
              for _ in range(2)]
    x = torch.randn(t, heads, dim, generator=g)
    ranks = SimpleNamespace(size=lambda: 2 if case == "two cp ranks" else 1, rank=lambda: 0)
    config = SimpleNamespace(apply_rope_fusion=False, rotary_interleaved=False, multi_latent_attention=False,
                             mrope_section=[1, 1, 2])

    def call(fn, xi, freqs):
        monkeypatch.setattr(rope_utils, "_apply_rotary_pos_emb_thd", fn)
        return rope_utils.apply_rotary_pos_emb(xi, freqs, config, cu_seqlens=cu, cp_group=ranks)

    _assert_bitwise_per_table((megatron_thd, _stream_rotary(spy)), tables, x, call)
    assert len(calls) == (0 if case in ("per-token", "partial rotary") else 3)


@pytest.mark.parametrize("stream", ["mixed", "one-length"])
@pytest.mark.parametrize("causal", [True, False])
def test_packed_attention_equals_each_sequence_alone_in_float64(causal, stream):
    """The bucketed attention (gathers with their own backward) against softmax(q k^T) v written out per
    sequence in float64: outputs and the gradients of query, key and value, an empty row and the trailing
    padding (a sequence of its own) included; and a stream of back-to-back sequences of one length (the
    ViT's windows), attended as a view without gathers."""
    from dualrpo_mcore.models.qwen2_5_vl.packed_attention import RowLayout, attend

    if stream == "mixed":
        cu, total = torch.tensor([0, 5, 5, 6, 14, 17], dtype=torch.int32), 20
    else:
        cu, total = torch.tensor([0, 5, 10, 15], dtype=torch.int32), 20
    heads, dim = 2, 4
    assert (RowLayout(cu, total, causal=causal).rows is None) == (stream == "mixed")
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(total, heads, dim, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    weight = torch.randn(total, heads, dim, generator=g, dtype=torch.float64)
    out = attend(q, k, v, RowLayout(cu, total, causal=causal), causal, scale=0.5)
    grads = torch.autograd.grad((out * weight).sum(), (q, k, v))

    bounds = cu.tolist() + [total]
    want = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * 0.5
        if causal:
            s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), float("-inf"))
        want.append(torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b]))
    want = torch.cat(want)
    want_grads = torch.autograd.grad((want * weight).sum(), (q, k, v))
    assert torch.allclose(out, want, rtol=1e-10, atol=1e-12)
    for got, ref in zip(grads, want_grads):
        assert torch.allclose(got, ref, rtol=1e-10, atol=1e-12)


def test_stream_rotary_reads_each_streams_own_end():
    """The stream's end is read once per boundaries tensor (every layer of a forward passes the same one), and
    a new tensor is read again: boundaries short of the stream then go to Megatron's loop."""
    from dualrpo_mcore.models.qwen2_5_vl.packing import _stream_rotary

    calls = []
    apply = _stream_rotary(lambda *args, **kwargs: calls.append(1) or args[0])
    one_rank, x = SimpleNamespace(size=lambda: 1), torch.randn(6, 2, 4)
    freqs = torch.randn(6, 1, 1, 4)
    for cu, want in ((torch.tensor([0, 2, 6]), 0), (torch.tensor([0, 2, 6]), 0), (torch.tensor([0, 2, 5]), 1)):
        apply(x, cu, freqs, cp_group=one_rank)
        assert len(calls) == want


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("rot", [8, 4])
def test_table_rotary_is_megatrons_bitwise(megatron_thd, interleaved, rot):
    """The padded layout's rotation with cos and sin kept per table is Megatron's ``_apply_rotary_pos_emb_bshd``
    bitwise (values and gradients) for two tables in turn, over the whole head and over part of it."""
    from megatron.core.models.common.embeddings import rope_utils

    from dualrpo_mcore.models.qwen2_5_vl.packing import _table_rotary

    megatron = rope_utils._apply_rotary_pos_emb_bshd
    mla = "mla_rotary_interleaved" if "mla_rotary_interleaved" in inspect.signature(megatron).parameters \
        else "multi_latent_attention"  # 0.19 renamed it and warns on the old name
    g = torch.Generator().manual_seed(2)
    x = torch.randn(6, 2, 3, 8, generator=g)
    tables = [torch.randn(6, 1, 1, rot, generator=g) for _ in range(2)]
    _assert_bitwise_per_table((megatron, _table_rotary(megatron)), tables, x,
                              lambda fn, xi, freqs: fn(xi, freqs, rotary_interleaved=interleaved, mscale=0.5,
                                                       **{mla: False}))
