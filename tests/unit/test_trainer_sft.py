"""``dualrpo sft``: a few steps on a tiny synthetic set lower the loss; the saved HF directory loads in
transformers and reproduces the actor's log-probs (an independent forward); TP=2 follows TP=1.

Each run is a spawned process group (1 process for TP=1, 2 gloo processes for TP=2), so the test
process never initialises torch.distributed itself.
"""
import argparse
import os

import pytest
import torch

from dualrpo_mcore.parallel.spawn import run_distributed

STEPS = 8


def _args(data, out, tp):
    from dualrpo_mcore.commands import sft as sft_cli

    parser = argparse.ArgumentParser()
    sft_cli.add_arguments(parser)
    return sft_cli.config_from_args(parser.parse_args(["--data", data, "--out", out, "--steps", str(STEPS),
                                                       "--batch-size", "4", "--tp", str(tp), "--max-tokens", "300",
                                                       "--no-progress"]))


def _sft(rank, world_size, data, out, tp):
    from dualrpo_mcore.actor import batching
    from dualrpo_mcore.commands import sft as sft_cli

    args = _args(data, out, tp)
    res = sft_cli.train(args)
    # A fresh probe batch from the same loader, scored by the trained actor.
    probe = batching.collate(sft_cli.sft_rows(res["loader"].next_prompts(3), res["tokenizer"]),
                             res["tokenizer"].pad_token_id)
    stats = res["actor"].compute_token_stats(probe)
    return dict(losses=res["losses"], lrs=res["lrs"], probe=probe, logprob=stats["logprob"])


def _hf_logprobs(out_dir, batch):
    from transformers import Qwen2_5_VLForConditionalGeneration

    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32).eval()
    kw = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw") if k in batch}
    kw["mm_token_type_ids"] = (batch["input_ids"] == model.config.image_token_id).int()
    with torch.no_grad():
        z = model(**kw).logits.double()[:, :-1]
    lp = torch.log_softmax(z, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(lp.shape[0], 1, dtype=lp.dtype), lp], 1) * batch["response_mask"]


@pytest.fixture(scope="module")
def tp1(synth_dir2, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sft") / "tp1")
    return out, run_distributed(_sft, 1, synth_dir2, out, 1, timeout=600)[0]


def test_sft_lowers_the_loss_and_saves_a_loadable_hf_dir(tp1):
    out, res = tp1
    losses = res["losses"]
    assert len(losses) == STEPS and all(map(lambda x: x == x, losses))
    assert sum(losses[-3:]) / 3 < 0.9 * losses[0], f"SFT did not learn: {losses}"
    for fname in ("config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json",
                  "chat_template.jinja"):
        assert os.path.exists(os.path.join(out, fname)), fname
    from dualrpo_mcore.data.tokenizer import load_processor

    proc = load_processor(out)  # what the rollout engine loads
    assert proc.tokenizer.eos_token == "<|im_end|>"
    diff = float((_hf_logprobs(out, res["probe"]) - res["logprob"].double()).abs().max())
    assert diff <= 1e-4, f"saved HF weights give other log-probs than the actor (max diff {diff:.3g})"


def test_sft_lr_warms_up_holds_then_decays(tp1):
    # 8 updates, warm-up ceil(5% of 8) = 1, decay ceil(10% of 8) = 1 update at half the peak (2e-3).
    assert tp1[1]["lrs"] == pytest.approx([2e-3] * 7 + [1e-3], rel=1e-12)


def test_sft_tp2_follows_tp1(synth_dir2, tmp_path, tp1):
    _, ref = tp1
    res = run_distributed(_sft, 2, synth_dir2, str(tmp_path / "tp2"), 2, timeout=600)
    for r in res:
        diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
        assert diff <= 1e-3, f"TP=2 SFT losses drift from TP=1 by {diff:.3g}: {r['losses']} vs {ref['losses']}"
    assert os.path.exists(tmp_path / "tp2" / "model.safetensors")


def test_tiny_config_widths_and_bad_vision_width(synth_dir2):
    import os

    from transformers import Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.models.qwen2_5_vl.presets import for_tokenizer as tiny_config_for_tokenizer

    model_dir = os.path.join(synth_dir2, "model")
    cfg = tiny_config_for_tokenizer(model_dir, vision_hidden=64)
    v = cfg.vision_config
    assert (v.hidden_size, v.num_heads, v.intermediate_size, v.out_hidden_size) == (64, 4, 128, 64)
    Qwen2_5_VLForConditionalGeneration(cfg)  # transformers accepts the shapes
    with pytest.raises(ValueError, match="--vision-hidden 40"):
        tiny_config_for_tokenizer(model_dir, vision_hidden=40)


@pytest.mark.parametrize("flags, field", [(["--decay-fraction", "1.0"], "optim.decay_fraction must lie in [0, 1)"),
                                          (["--steps", "0"], "steps must be >= 1"),
                                          (["--set", "optim.lr=0"], "optim.lr must be > 0"),
                                          (["--tp", "0"], "parallel.tp must be >= 1"),
                                          (["--set", "optim.total_steps=3"], "optim.total_steps=3 conflicts with steps")])
def test_sft_refuses_bad_flags_by_name(synth_dir2, tmp_path, capsys, flags, field):
    from dualrpo_mcore.cli import main

    assert main(["sft", "--data", synth_dir2, "--out", str(tmp_path / "out"), *flags]) == 2
    assert field in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out")


def test_sft_config_from_flags_equals_from_set():
    """Every ``dualrpo sft`` flag is an alias of one ``--set`` entry: the same typed config either way."""
    from dualrpo_mcore.commands import sft as sft_cli
    from dualrpo_mcore.commands.sft_config import FLAGS, SFTConfig

    values = {"--data": "d", "--out": "o", "--train-file": "t.parquet", "--init": "i", "--steps": "5",
              "--batch-size": "3", "--lr": "0.01", "--decay-fraction": "0.2", "--max-tokens": "100", "--tp": "2",
              "--pp": "2", "--seed": "7", "--hidden-size": "32", "--layers": "3", "--vision-depth": "1",
              "--vision-hidden": "48"}
    assert set(values) == set(FLAGS)
    parser = argparse.ArgumentParser()
    sft_cli.add_arguments(parser)
    flags = sft_cli.config_from_args(parser.parse_args([x for kv in values.items() for x in kv]
                                                       + ["--no-progress", "--no-packing"]))
    sets = [x for f, v in values.items() for x in ("--set", f"{FLAGS[f][0]}={v}")] + ["--set", "progress=false",
                                                                                      "--set", "packing=false"]
    assert flags == sft_cli.config_from_args(parser.parse_args(sets))
    assert (flags.optim.lr, flags.parallel.pp, flags.tiny.vision_hidden, flags.progress) == (0.01, 2, 48, False)
    defaults = sft_cli.config_from_args(parser.parse_args(["--data", "d", "--out", "o"]))
    assert defaults == SFTConfig(data="d", out="o") and defaults.optim.lr == 2e-3
    actor = flags.actor_config(hf_config=None)
    assert actor.optim.total_steps == 5 and actor.parallel.tp == 2 and actor.micro.max_tokens == 100
    assert actor.model.packing is False and defaults.actor_config(hf_config=None).model.packing is True
