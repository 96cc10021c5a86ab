"""V-Triune's prompt instructions and image sizing, per task (``DataConfig.instructions`` and
``DataConfig.image_resize``; the paper recipe turns both on with :data:`VTRIUNE_INSTRUCTIONS` and
:data:`VTRIUNE_IMAGE_RESIZE`).

What V-Triune's loader (``verl/utils/dataset/rl_dataset.py``, the "CoT prompt pool" of paper
section 4.3, ``process_image``) adds and resizes, and how ours differs: docs/vtriune.md, "Prompts
and image sizing". The sentence goes to the last message; detection and grounding rows get none
(their prompts carry their own format); the resize is ``images.resize_to_area``. The draw is seeded
so that a resumed run rebuilds the same prompts.

The sentences below are that pool as published (MIT licence, Copyright (c) 2025 MiniMax), kept
verbatim as data so that prompts read as the paper's did: that includes the two sentences of the
first plain pool that a missing comma there joins into one entry (19 entries, not 20).
"""
from __future__ import annotations

import zlib
from typing import Any, Dict, List, Mapping, Optional

import numpy as np

from dualrpo_mcore.data.schema import TASKS

POOL_NAMES = ("vtriune_cot",)
VTRIUNE_MIN_PIXELS = 512 * 512
VTRIUNE_MAX_PIXELS = 2048 * 2048
# Orsta rows of these two tasks name the ``detection`` verifier (IoU, no chain-of-thought prompt);
# every other task's rows name ``mathverify``: COT_TASKS
BOX_TASKS = ("detection", "grounding")
COT_TASKS = tuple(t for t in TASKS if t not in BOX_TASKS)
VTRIUNE_INSTRUCTIONS: Dict[str, str] = {t: "vtriune_cot" for t in COT_TASKS}
VTRIUNE_IMAGE_RESIZE: Dict[str, List[int]] = {t: [VTRIUNE_MIN_PIXELS, VTRIUNE_MAX_PIXELS] for t in TASKS}
_STREAM = 0x636F74  # separates these draws from the loader's shuffles

FREEFORM_FIRST = (
    'Please provide a step-by-step explanation of your reasoning.',
    'Break down the problem and solve it step by step.',
    'Guide me through your thought process step by step.',
    'Elaborate your reasoning step by step.',
    'Solve this problem by reasoning through each step.',
    'Provide your reasoning in a detailed, step-by-step manner.',
    'Explain each step of your thought process clearly.',
    'Work through the solution, showing each step.',
    'Start from the basics and explain each step of the process.',
    'Walk me through the reasoning process step by step.Please solve this by explaining each step of the way.',
    'Take me through your reasoning process, step by step.',
    'Explain the solution in a detailed, sequential manner.',
    'Describe each step in the solution process clearly.',
    'Provide a breakdown of your reasoning, step by step.',
    'Please outline the steps you took to solve this.',
    'Detail your thought process and explain each step.',
    'Walk me through the logic behind your solution step by step.',
    'Step through your reasoning process carefully.',
    'Break down the solution into manageable steps and explain each.',
)

FREEFORM_SECOND = (
    'Finally, place your answer in \\boxed{}. ',
    'Conclude your reasoning and present the answer inside \\boxed{}.',
    'Your final answer should be placed in \\boxed{}.',
    'Present the result in \\boxed{}.',
    'Wrap up your reasoning and put the solution in \\boxed{}.',
    'Enclose your final answer in \\boxed{}.',
    'The final answer should be boxed in \\boxed{}.',
    'Put your solution inside \\boxed{}.',
    'Display the answer in \\boxed{}.',
    'Put the final answer within \\boxed{}.',
    'Finally, place the answer inside \\boxed{}.',
    'Put your final answer in \\boxed{}.',
    'Conclude with your final result inside \\boxed{}.',
    'Your answer should be enclosed within \\boxed{}.',
    'Wrap your solution in \\boxed{}.',
    'Enclose the final result inside \\boxed{}.',
    'Present the final answer in a \\boxed{} format.',
    'The final answer must be shown within \\boxed{}.',
    'Conclude by boxing the final result in \\boxed{}.',
    'Please display the final answer enclosed in \\boxed{}.',
)

CLOSEFORM_FIRST = (
    'Please solve the problem step by step, providing clear explanations. The reasoning should be enclosed within <think> </think> tags, while the final answer is to be placed within <answer> </answer> tags.',
    'Solve the problem by breaking it down step by step. The reasoning process should be enclosed in <think> </think> tags, and the final answer should be inside <answer> </answer> tags.',
    'Begin by solving the problem step by step, with detailed reasoning enclosed in <think> </think> tags. The final answer must be placed within <answer> </answer> tags.',
    'Please solve the problem sequentially, explaining each step clearly. Enclose your reasoning within <think> </think> tags, and place the final answer inside <answer> </answer> tags.',
    'Solve the problem in steps, providing reasoning within <think> </think> tags, and place the final answer within <answer> </answer> tags.',
    'Proceed to solve the problem step by step, making sure that the reasoning is enclosed in <think> </think> tags. The final answer should be in <answer> </answer> tags.',
    'Break down the problem and solve it step by step. The reasoning should be within <think> </think> tags, and the answer must be enclosed in <answer> </answer> tags.',
    'Work through the problem step by step, enclosing your reasoning in <think> </think> tags, and placing the final answer in <answer> </answer> tags.',
    'Step through the problem, ensuring that your reasoning is contained in <think> </think> tags, with the answer placed inside <answer> </answer> tags.',
    'Please solve the problem by explaining each step in detail. Your reasoning should be enclosed in <think> </think> tags, and the answer should be inside <answer> </answer> tags.',
)

CLOSEFORM_SECOND = (
    'Moreover, the final answer should be inside \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'In addition, format the answer inside \\boxed{}. For instance: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Also, the final answer should be enclosed within \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Additionally, ensure the answer is in \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Furthermore, the final answer needs to be formatted inside \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Also, the answer itself must be enclosed in \\boxed{}. For instance: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Ensure the answer is formatted inside \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Additionally, the final answer must be placed inside \\boxed{}. For instance: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Make sure the answer is enclosed in \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
    'Lastly, format the answer within \\boxed{}. For example: <think>\nreasoning process here\n</think>\n<answer>\n\\boxed{answer here}\n</answer>.',
)


def closeform(spec: Mapping[str, Any]) -> Optional[bool]:
    """Whether the row's reward asks for the think/answer format (their ``format_ratio != 0``);
    None when the row is not one their ``mathverify`` pool applies to."""
    if spec.get("verifier") == "vtriune_math":
        return (spec.get("params") or {}).get("format_ratio", 0.1) != 0
    comps = spec.get("components")
    if comps:
        names = {c.get("verifier") for c in comps}
        if names & {"detection", "grounding", "vtriune_detection"}:
            return None
        return any(c.get("verifier") == "format" and float(c.get("weight", 1.0)) > 0 for c in comps)
    if spec.get("verifier") in ("math", "choice", "numeric", "counting", "ocr"):
        return False
    return None


def instruction(pool: str, spec: Mapping[str, Any], *, seed: int, uid: str, epoch: int) -> Optional[str]:
    """The sentence pair to append for this row and epoch, or None when the pool does not apply."""
    if pool not in POOL_NAMES:
        raise ValueError(f"unknown instruction pool {pool!r}; known: {POOL_NAMES}")
    close = closeform(spec)
    if close is None:
        return None
    first, second = (CLOSEFORM_FIRST, CLOSEFORM_SECOND) if close else (FREEFORM_FIRST, FREEFORM_SECOND)
    rng = np.random.default_rng([seed, _STREAM, zlib.crc32(uid.encode("utf-8")), epoch])
    return "\n\n" + first[int(rng.integers(len(first)))] + second[int(rng.integers(len(second)))]


def with_instruction(messages: List[Dict[str, str]], text: Optional[str]) -> List[Dict[str, str]]:
    """A copy of the messages with ``text`` appended to the last one (theirs: ``+= "\\n\\n" + ...``)."""
    if not text:
        return messages
    out = [dict(m) for m in messages]
    out[-1]["content"] = out[-1]["content"] + text
    return out
