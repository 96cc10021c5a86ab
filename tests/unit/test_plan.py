"""``dualrpo plan`` and the parts of ``launch.memory`` that need no processes.

* the command: table, ``--json``, exit codes (0 fits, 1 does not fit, 2 bad flag, 3 KV cache short);
* the paper recipes at their parallel settings: 7B on one 8xH100 node (fits with full recompute; at the
  edge with selective recompute in the worst case; the recipe uses full) and 32B (at its TP=4, PP=4)
  fit 80 GB per GPU; 32B on one GPU at TP=1 does not;
* parameter counts of the released sizes equal transformers' own model (built on the meta device);
* the SGLang KV-cache capacity (not measurable on CPU) against a float64 hand computation.

The measured-bytes check of the model is ``tests/distributed/test_plan_measured.py``.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from dualrpo_mcore.cli import main
from dualrpo_mcore.planner import memory as M
from helpers.synth import synth

GB = 1e9


def _plan(capsys, *argv):
    code = main(["plan", *argv])
    return code, capsys.readouterr().out


def _json(capsys, *argv):
    code, out = _plan(capsys, *argv, "--json")
    return code, json.loads(out)


def test_table_lists_every_component_and_the_verdict(capsys):
    code, out = _plan(capsys, "--recipe", "qwen2_5_vl_7b_paper", "--recompute", "full")
    for row in ("parameters", "gradients (fp32 buffer)", "optimizer state", "activations", "log-prob buffers",
                "transient working set", "SGLang weights + KV (rollout)", "= training phase", "= rollout phase",
                "PEAK", "GPU capacity", "SGLang KV cache"):
        assert row in out, row
    assert "FITS" in out and "DOES NOT FIT" not in out
    assert "TP=2 PP=1 DP=4" in out  # the recipe's layout on its default world (1 node x 8)
    assert code in (0, 3)


def test_7b_paper_recipe_on_one_8xh100_node(capsys):
    """The recipe's layout (TP=2, PP=1 -> DP=4 on 1 x 8). Its static part is exact arithmetic. The
    worst-case workload (4096-token prompts with two max-size images, responses of 1 to 2048 tokens: a
    16K-token micro-batch holds three rows and six images, packed into T = 16384) fits with the recipe's
    full recompute and not with selective recompute; rows of one length (two per micro-batch) put
    selective recompute at the edge of 80 GB."""
    code, p = _json(capsys, "--recipe", "qwen2_5_vl_7b_paper")
    assert (p["inputs"]["nodes"], p["inputs"]["gpus_per_node"], p["inputs"]["dp"]) == (1, 8, 4)
    assert p["fits"] and p["peak_bytes"] <= 0.8 * 80 * GB
    stage = p["stages"][0]
    c = stage["components"]
    # 8.29B params over TP=2 in bf16; the ViT and merger are frozen (no grads, no Adam state).
    assert 7.5e9 < c["parameters"] < 8.5e9
    trainable = stage["trainable"]
    assert c["gradients (fp32 buffer)"] == pytest.approx(4 * trainable, rel=1e-4)
    assert c["optimizer state"] == pytest.approx(12 * trainable / 4, rel=1e-4)  # sharded over DP=4
    assert code == (0 if p["kv_sufficient"] else 3)
    # SGLang's budget is f x what the actor leaves free when the engine starts (params, grads, main params).
    free = p["gpu_bytes"] - stage["held_at_engine_start"]
    assert c["SGLang weights + KV (rollout)"] == int(0.5 * free)
    _, sel = _json(capsys, "--recipe", "qwen2_5_vl_7b_paper", "--recompute", "selective")
    assert not sel["fits"] and sel["inputs"]["rows_per_microbatch"] == 3
    _, even = _json(capsys, "--recipe", "qwen2_5_vl_7b_paper", "--recompute", "selective", "--shortest-row", "6144")
    assert even["inputs"]["rows_per_microbatch"] == 2 and even["inputs"]["tokens_per_microbatch"] == 12288
    assert 0.9 < even["peak_bytes"] / even["gpu_bytes"] < 1.1  # the edge: see the docstring


def test_32b_recipe_fits_80gb_per_gpu_at_a_valid_split(capsys):
    code, p = _json(capsys, "--recipe", "qwen2_5_vl_32b", "--tp", "4", "--pp", "4")
    assert (p["inputs"]["nodes"], p["inputs"]["gpus_per_node"]) == (4, 8)
    assert p["inputs"]["dp"] == 2 and len(p["stages"]) == 4
    assert p["fits"] and all(s["peak"] <= 80 * GB for s in p["stages"])
    assert code in (0, 3)


def test_tp_that_cannot_split_the_vit_is_refused_naming_the_flag(capsys):
    # The ViT's ffn (3420) splits over TP 1, 2 or 4 only.
    code, out = _plan(capsys, "--recipe", "qwen2_5_vl_32b", "--tp", "8", "--pp", "2")
    assert code == 2 and "--tp 8" in out and "3420" in out


def test_32b_at_tp1_on_one_gpu_does_not_fit(capsys):
    code, out = _plan(capsys, "--recipe", "qwen2_5_vl_32b", "--tp", "1", "--pp", "1", "--nodes", "1",
                      "--gpus-per-node", "1")
    assert code == 1
    assert "DOES NOT FIT" in out and "biggest:" in out


def test_preset_mode_and_flags(capsys):
    code, p = _json(capsys, "--preset", "qwen2.5-vl-7b", "--nodes", "1", "--gpus-per-node", "8", "--tp", "4",
                    "--recompute", "full", "--micro-tokens", "4096", "--seq-len", "2048", "--gpu-mem-gb", "141")
    i = p["inputs"]
    assert (i["tp"], i["pp"], i["dp"], i["recompute"], i["seq_len"], i["rows_per_microbatch"]) == (4, 1, 2, "full",
                                                                                                 2048, 2)
    assert p["gpu_bytes"] == int(141 * GB) and code == 0


def test_recompute_shrinks_activations(capsys):
    acts = {}
    for mode in ("none", "selective", "full"):
        _, p = _json(capsys, "--preset", "qwen2.5-vl-7b", "--tp", "2", "--recompute", mode, "--backend", "local")
        acts[mode] = p["stages"][0]["components"]["activations"]
    assert acts["full"] < acts["selective"] < acts["none"]


@pytest.mark.parametrize("argv,needle", [
    (("--tp", "0"), "--tp=0"),
    (("--gpu-mem-gb", "-1"), "--gpu-mem-gb"),
    (("--mem-fraction", "1.5"), "--mem-fraction"),
    (("--nodes", "1", "--gpus-per-node", "6", "--tp", "4"), "not divisible"),
])
def test_bad_flags_exit_2_naming_the_flag(capsys, argv, needle):
    code, out = _plan(capsys, "--preset", "qwen2.5-vl-7b", *argv)
    assert code == 2 and needle in out


def test_unknown_preset_is_named(capsys):
    code, out = _plan(capsys, "--preset", "qwen9")
    assert code == 2 and "qwen9" in out


@pytest.mark.parametrize("name", ["qwen2.5-vl-3b", "qwen2.5-vl-7b", "qwen2.5-vl-32b"])
def test_parameter_count_equals_transformers(name):
    """TP=1, PP=1 counts of the released sizes vs transformers' model built on the meta device
    (the 3B ties its embeddings: counted once in both)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.models.qwen2_5_vl import from_hf, presets

    d = presets.hf_config_dict(name)
    with torch.device("meta"):
        hf = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**d))
    expected = sum(p.numel() for p in hf.parameters())  # shared tensors appear once
    cfg = from_hf(d)
    counts = M.stage_params(cfg, 1, 1, 0)
    # Megatron pads the vocabulary rows to a multiple of 128 (152064 and 151936 already are).
    assert M.padded_vocab(cfg, 1) == cfg.vocab_size
    assert M.total_params(counts) == expected


def test_tp_and_pp_split_the_parameters():
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, presets

    cfg = from_hf(presets.hf_config_dict("qwen2.5-vl-7b"))
    whole = M.total_params(M.stage_params(cfg, 1, 1, 0))
    pp4 = sum(M.total_params(M.stage_params(cfg, 1, 4, s)) for s in range(4))
    assert pp4 == whole  # untied: every tensor lives on exactly one stage
    tp2 = M.total_params(M.stage_params(cfg, 2, 1, 0))
    # Replicated on both TP ranks: norms, row-parallel biases, the patch embedding.
    assert whole / 2 < tp2 < whole / 2 * 1.001


def test_kv_cache_capacity_against_a_float64_hand_computation():
    """Qwen2.5-VL-7B, SGLang TP=4, mem_fraction_static=0.5 of an 80 GB H100. Hand computation:
    8,292,166,656 params (transformers' count, test above) in bf16 over 4 GPUs; per token K and V of
    28 layers x (4 KV heads / 4) x 128 dims x 2 bytes."""
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, presets

    weights = torch.tensor(8_292_166_656.0, dtype=torch.float64) * 2 / 4
    per_token = torch.tensor(2.0 * 28 * (4 / 4) * 128 * 2, dtype=torch.float64)
    expected = math.floor(float((torch.tensor(0.5 * 80e9, dtype=torch.float64) - weights) / per_token))
    cfg = from_hf(presets.hf_config_dict("qwen2.5-vl-7b"))
    coloc = M.Colocation(gpu_bytes=80 * 10 ** 9, mem_fraction=0.5, sglang_tp=4)
    assert M.kv_bytes_per_token(cfg, 4) == 14336
    assert M.kv_capacity_tokens(cfg, coloc) == expected
    # With 30 GB held by the actor when SGLang starts, it budgets f x the 50 GB it finds free.
    held = 30e9
    expected_held = math.floor(float((torch.tensor(0.5 * (80e9 - held), dtype=torch.float64) - weights) / per_token))
    assert M.kv_capacity_tokens(cfg, coloc, int(held)) == expected_held
    # 32B at SGLang TP=8: 64 layers x (8 / 8) KV heads x 128 dims; KV heads are replicated past TP=8.
    cfg32 = from_hf(presets.hf_config_dict("qwen2.5-vl-32b"))
    assert M.kv_bytes_per_token(cfg32, 8) == 2 * 64 * 1 * 128 * 2
    assert M.kv_bytes_per_token(cfg32, 16) == M.kv_bytes_per_token(cfg32, 8)


def test_distributed_optimizer_shards_adam_state_over_dp():
    on = M.Layout(dp=8, distributed_optimizer=True)
    off = M.Layout(dp=8, distributed_optimizer=False)
    n = 1_000_003
    assert M.optimizer_bytes(n, off) == 12 * n  # fp32 main params + exp_avg + exp_avg_sq
    assert M.optimizer_bytes(n, on) == 12 * math.ceil(n / 8)
    assert M.optimizer_bytes(n, M.Layout(dtype="fp32", dp=1)) == 8 * n  # fp32: no main copy
    assert M.grad_bytes(n, on) == 4 * math.ceil(n / 128) * 128  # padded to lcm(dp, 128)
    assert M.grad_bytes(n, off) == 4 * n


def test_layout_rejects_bad_fields():
    with pytest.raises(ValueError, match="recompute"):
        M.Layout(recompute="some")
    with pytest.raises(ValueError, match="backend"):
        M.Layout(backend="cuda")


def test_tiny_cpu_recipe_with_a_synthetic_data_dir(capsys, tmp_path):
    synth(tmp_path / "data", per_task=2, heldout_per_task=None)
    capsys.readouterr()
    code, p = _json(capsys, "--recipe", "tiny_cpu", "--data", str(tmp_path / "data"))
    assert code == 0 and p["fits"]
    assert p["inputs"]["backend"] == "local" and p["inputs"]["dtype"] == "fp32"
    assert p["stages"][0]["components"]["SGLang weights + KV (rollout)"] == 0  # HF engine: no SGLang


def test_recipe_that_needs_files_names_the_data_flag(capsys, tmp_path):
    code, out = _plan(capsys, "--recipe", "tiny_cpu", "--data", str(tmp_path / "missing"))
    assert code == 2 and "--data" in out


def test_sglang_that_cannot_start_beside_the_actor_does_not_fit(capsys):
    # 5% of the ~47 GiB the 7B actor leaves free is below SGLang's 15.4 GiB of weights at tp_size 1.
    code, p = _json(capsys, "--preset", "qwen2.5-vl-7b", "--tp", "2", "--recompute", "full",
                    "--mem-fraction", "0.05", "--sglang-tp", "1")
    assert code == 1 and not p["fits"] and not p["sglang_starts"] and p["kv_pool_bytes"] < 0
    code, out = _plan(capsys, "--preset", "qwen2.5-vl-7b", "--tp", "2", "--recompute", "full",
                      "--mem-fraction", "0.05", "--sglang-tp", "1")
    assert "SGLang cannot start" in out and "DOES NOT FIT" in out


def _seven_b():
    from dualrpo_mcore.models.qwen2_5_vl import from_hf, presets

    return from_hf(presets.hf_config_dict("qwen2.5-vl-7b"))


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_packed_plan_below_padded_for_a_long_tail(recompute):
    """One 4096-token row and seven 512-token rows (8 x 4096 positions padded, 7680 packed) on the TE spec
    (THD attention, no score matrix): every stage's activations and peak are smaller packed."""
    cfg = _seven_b()
    layout = M.Layout(tp=2, recompute=recompute, backend="te")
    coloc = M.Colocation(overhead_bytes=0)
    shapes = {p: M.MicroBatch(rows=8, seq_len=4096, patches_per_row=256, packed=p, real_tokens=4096 + 7 * 512)
              for p in (False, True)}
    assert (shapes[False].tokens, shapes[True].tokens) == (8 * 4096, 7680)
    lm = [M.lm_activation_bytes(cfg, layout, shapes[p], cfg.num_layers, True, True) for p in (False, True)]
    assert lm[1] < 0.3 * lm[0]  # 7680 / 32768 of the positions
    padded, packed = (M.plan_stage(cfg, layout, shapes[p], 4, coloc, 0) for p in (False, True))
    assert packed.components["activations"] < padded.components["activations"]
    assert packed.components["log-prob buffers"] < padded.components["log-prob buffers"]
    assert packed.train_peak < padded.train_peak and packed.peak <= padded.peak
    # The ViT sees the same images either way.
    assert M.vision_activation_bytes(cfg, layout, shapes[True]) == M.vision_activation_bytes(cfg, layout, shapes[False])


def test_local_attention_saves_sdpa_copies_not_scores():
    """The local spec's attention is SDPA (no [heads, s, s] scores): padded, it saves one additive
    [rows, 1, s, s] mask for the stage; packed, no mask but q, k, v and the output gathered into its length
    buckets' padded rows (a bucket: one quarter-octave ceiling), the output back in stream order and the
    stream's RowLayout. Below padded for a long tail, above for rows of one length."""
    cfg = _seven_b()
    layout = M.Layout(tp=2, backend="local")  # bf16
    q = cfg.num_heads // 2 * cfg.head_dim

    def act(rows, real, packed, seq=4096):
        mb = M.MicroBatch(rows=rows, seq_len=seq, packed=packed, real_tokens=real)
        return M.lm_activation_bytes(cfg, layout, mb, cfg.num_layers, True, True)

    # The same 8192 tokens as one row or two: only the stage's bf16 mask differs (no s^2 term per layer).
    assert act(1, 8192, False, seq=8192) - act(2, 8192, False) == 2 * (8192 ** 2 - 2 * 4096 ** 2)
    # 512-token rows share no bucket with the 4096-token one; 3500-token rows do (padded to 4096).
    assert M.MicroBatch(rows=8, seq_len=4096, packed=True, real_tokens=4096 + 7 * 512).attended == 4096 + 7 * 512
    assert M.MicroBatch(rows=8, seq_len=4096, packed=True, real_tokens=4096 + 7 * 3500).attended == 8 * 4096
    tail = 4096 + 7 * 512
    assert act(8, tail, True) < act(8, tail, False)
    # Rows of one length: the stream-order output copy per layer and the RowLayout, against the mask.
    extra = cfg.num_layers * 8192 * q * 2 + 25 * 8192 - 2 * 2 * 4096 ** 2  # layout: 17 B a place, 8 a token
    assert act(2, 8192, True) - act(2, 8192, False) == extra > 0


def test_worst_micro_batch_fills_the_token_budget():
    from dualrpo_mcore.planner.plan import worst_micro_batch

    # A 2048-token row and 1024-token rows in 8192 tokens: 1 + 6 rows; packed, the stream is the budget.
    mb = worst_micro_batch(2048, 1024, 8192, 1000, 64, packed=True)
    assert (mb.rows, mb.tokens, mb.packed) == (7, 8192, True)
    padded = worst_micro_batch(2048, 1024, 8192, 1000, 64, packed=False)
    assert (padded.rows, padded.tokens) == (7, 7 * 2048)
    # Rows of one length: the budget's whole rows, as many positions either way.
    assert worst_micro_batch(2048, 2048, 8192, 1000, 0, True).tokens == 8192
    assert worst_micro_batch(3000, 3000, 8192, 1000, 0, True).tokens == 6000
    # A row over the budget runs alone; a rank with fewer rows cannot fill the budget.
    assert (worst_micro_batch(9000, 100, 8192, 1000, 0, True).rows, worst_micro_batch(9000, 100, 8192, 1000, 0,
                                                                                     True).tokens) == (1, 9000)
    assert worst_micro_batch(2048, 100, 8192, 3, 0, True).rows == 3
    with pytest.raises(ValueError, match="real_tokens"):
        M.MicroBatch(rows=2, seq_len=100, packed=True, real_tokens=201)


def test_plan_reports_the_packed_token_budget(capsys):
    argv = ("--preset", "qwen2.5-vl-7b", "--tp", "2", "--recompute", "full", "--micro-tokens", "8192",
            "--seq-len", "4096", "--shortest-row", "512")
    code, out = _plan(capsys, *argv)
    assert "micro-batches packed (T <= 8192 tokens" in out and "rows of 512 to 4096 tokens" in out
    _, packed = _json(capsys, *argv)
    _, padded = _json(capsys, *argv, "--no-packing")
    assert packed["inputs"]["packed"] and not padded["inputs"]["packed"]
    assert packed["inputs"]["tokens_per_microbatch"] == 8192
    assert padded["inputs"]["tokens_per_microbatch"] == 9 * 4096  # 4096 + 8 x 512 real tokens, padded
    assert packed["peak_bytes"] < padded["peak_bytes"]
    _, out = _plan(capsys, *argv, "--no-packing")
    assert "micro-batches padded (9 x 4096 = 36864 tokens, shortest row 512)" in out


def test_recipes_plan_packed_by_default(capsys, tmp_path):
    synth(tmp_path / "data", per_task=2, heldout_per_task=None)
    capsys.readouterr()
    code, out = _plan(capsys, "--recipe", "tiny_cpu", "--data", str(tmp_path / "data"))
    assert code == 0 and "micro-batches packed (T <= " in out
    _, p = _json(capsys, "--recipe", "qwen2_5_vl_7b_paper")
    assert p["inputs"]["packed"] and p["inputs"]["tokens_per_microbatch"] == p["inputs"]["micro_tokens"] == 16384
