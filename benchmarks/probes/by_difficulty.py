"""Greedy held-out accuracy per task and difficulty, for one or more HF policies.

    python benchmarks/probes/by_difficulty.py DATA_DIR POLICY_DIR [POLICY_DIR ...]

DATA_DIR is a ``dualrpo data synth`` output (heldout.parquet, model/). One thread: it can run beside a
demo stage without slowing it much.
"""
import sys

import torch


def main(data: str, policies) -> None:
    from transformers import AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    from dualrpo_mcore.data import PromptLoader
    from dualrpo_mcore.rollout.engine import RolloutRequest, SamplingParams
    from dualrpo_mcore.rollout.hf_engine import HFEngine
    from dualrpo_mcore.trainer.metrics import HELDOUT_LEVELS
    from dualrpo_mcore.trainer.recipes import synth_data_config
    from dualrpo_mcore.trainer.evaluation import by_difficulty
    from dualrpo_mcore.verifiers.scoring import score

    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(data + "/model")
    loader = PromptLoader(synth_data_config(data, "heldout.parquet", 0, shuffle=False), tokenizer=tok)
    prompts = loader.next_prompts(len(loader.sources[0]))
    reqs = [RolloutRequest.from_prompt(p) for p in prompts]
    for pol in policies:
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(pol).float().eval()
        eng = HFEngine(model, tokenizer=tok, eos_token_ids=[tok.convert_tokens_to_ids(tok.eos_token)])
        out = eng.generate(reqs, SamplingParams(n=1, temperature=0.0, max_new_tokens=64, seed=1))
        rewards = [score(p.reward, tok.decode(list(g[0].token_ids), skip_special_tokens=True))
                   for p, g in zip(prompts, out)]
        split = by_difficulty(prompts, rewards)  # the trainer's own split, so the numbers compare
        accuracy, count = HELDOUT_LEVELS + "accuracy/", HELDOUT_LEVELS + "count/"
        print(pol)
        for task in sorted({p.task for p in prompts}):
            cells = [f"d{d}={100 * split[f'{accuracy}{task}/d{d}']:5.1f} (n={int(split[f'{count}{task}/d{d}'])})"
                     for d in (1, 2, 3) if f"{accuracy}{task}/d{d}" in split]
            print(f"  {task:10s} " + "  ".join(cells))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2:])
