"""A small Qwen2.5-VL-compatible tokenizer + processor config for the tiny demo model.

``build_model_files(texts, out_dir)`` trains a byte-level BPE on the synthetic corpus and writes
what a Hugging Face model directory holds: ``tokenizer.json``, ``tokenizer_config.json``,
``chat_template.jinja`` and ``preprocessor_config.json``. ``AutoTokenizer.from_pretrained(dir)``
gives a ``Qwen2Tokenizer``; :func:`load_processor` gives a ``Qwen2_5_VLProcessor``.

Layout mirrors Qwen2.5-VL: the learned vocabulary first, then the special tokens (in Qwen's
order), then the reasoning tags ``<think> </think> <answer> </answer>`` as ordinary added tokens
(so decoding keeps them for the format reward). The pre-tokenizer is Qwen2's (digits one by one),
and training uses the same one, so ``Qwen2Tokenizer`` - which re-installs its own pre-tokenizer on
load - splits text exactly as the trained merges expect.
"""
from __future__ import annotations

import os
from typing import Dict, Iterable, List, Optional, Sequence

SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
TAG_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")
IMAGE_PAD, VISION_START, VISION_END = "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"
DEFAULT_SYSTEM = "You are a helpful assistant."

# Qwen2's split: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
               r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

# A Qwen-style chat template: a default system turn, images as vision_start/pad/end. No jinja
# whitespace control: HF compiles templates with trim_blocks, and "-" would eat the newlines.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM + "<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def expand_image_pads(text: str, counts: Sequence[int]) -> str:
    """Replace the i-th ``<|image_pad|>`` by ``counts[i]`` copies (what the processor does)."""
    parts = text.split(IMAGE_PAD)
    if len(parts) - 1 != len(counts):
        raise ValueError(f"{len(parts) - 1} image pads in the text but {len(counts)} images")
    return parts[0] + "".join(IMAGE_PAD * int(n) + rest for n, rest in zip(counts, parts[1:]))


def train_tokenizer(texts: Iterable[str], vocab_size: int = 2048):
    """Byte-level BPE (``tokenizers``) with Qwen2's pre-tokenizer; total size = ``vocab_size``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False, fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    n_learned = vocab_size - len(SPECIAL_TOKENS) - len(TAG_TOKENS)
    if n_learned < 256 + 16:
        raise ValueError(f"vocab_size {vocab_size} leaves no room for merges over the 256 bytes")
    trainer = trainers.BpeTrainer(vocab_size=n_learned, show_progress=False, special_tokens=[],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TAG_TOKENS])
    return tok


def preprocessor_config(min_pixels: int, max_pixels: int) -> Dict:
    """Qwen2.5-VL's preprocessor_config.json with our pixel bounds."""
    return {
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "do_convert_rgb": True, "resample": 3,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
        "min_pixels": int(min_pixels), "max_pixels": int(max_pixels),
        "size": {"shortest_edge": int(min_pixels), "longest_edge": int(max_pixels)},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    }


def build_model_files(texts: Iterable[str], out_dir: str, *, vocab_size: int = 2048,
                      min_pixels: int = 56 * 56, max_pixels: int = 112 * 112,
                      model_max_length: int = 4096) -> Dict[str, int]:
    """Train + save tokenizer and processor config into ``out_dir``; returns the token facts."""
    tok = train_tokenizer(texts, vocab_size)
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    cfg = {
        "tokenizer_class": "Qwen2Tokenizer", "processor_class": "Qwen2_5_VLProcessor",
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": None, "model_max_length": model_max_length, "errors": "replace",
        "add_prefix_space": False, "clean_up_tokenization_spaces": False, "split_special_tokens": False,
    }
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), cfg)
    _write_json(os.path.join(out_dir, "special_tokens_map.json"),
                {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                 "additional_special_tokens": [t for t in SPECIAL_TOKENS if t != "<|endoftext|>"]})
    with open(os.path.join(out_dir, "chat_template.jinja"), "w") as f:
        f.write(CHAT_TEMPLATE)
    _write_json(os.path.join(out_dir, "preprocessor_config.json"), preprocessor_config(min_pixels, max_pixels))
    facts = token_facts(tok)
    _write_json(os.path.join(out_dir, "dualrpo_tokens.json"), facts)
    return facts


def token_facts(tok) -> Dict[str, int]:
    """Vocab size and the ids a matching ``Qwen2_5_VLConfig`` needs."""
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + TAG_TOKENS}
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"], "image_token_id": ids[IMAGE_PAD],
        "video_token_id": ids["<|video_pad|>"], "vision_start_token_id": ids[VISION_START],
        "vision_end_token_id": ids[VISION_END], "vision_token_id": ids["<|vision_pad|>"],
        "ids": ids,
    }


def _write_json(path: str, obj) -> None:
    from dualrpo_mcore.atomic import atomic_write_json

    atomic_write_json(path, obj, indent=2, sort_keys=True)


def load_processor(model_dir: str):
    """``AutoProcessor.from_pretrained(model_dir)``, or, where torchvision is missing (transformers'
    Qwen2.5-VL processor insists on a video processor, and every video processor needs
    torchvision), the same ``Qwen2_5_VLProcessor`` class without its video half: images and text
    behave exactly as the full processor's."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(model_dir)
    except (ImportError, ValueError) as e:
        if "torchvision" not in str(e).lower():
            raise
    return _image_only_processor(model_dir)


def _image_only_processor(model_dir: str):
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.models.qwen2_5_vl import Qwen2_5_VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2_5_VLProcessor whose attributes are (image_processor, tokenizer) only."""

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token, self.video_token = IMAGE_PAD, "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    image_processor = AutoImageProcessor.from_pretrained(model_dir)
    template: Optional[str] = getattr(tokenizer, "chat_template", None)
    path = os.path.join(model_dir, "chat_template.jinja")
    if template is None and os.path.exists(path):
        with open(path) as f:
            template = f.read()
    return ImageOnlyQwen2_5_VLProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        chat_template=template)


def corpus_words() -> List[str]:
    """Words every demo response uses, so BPE gives them single tokens even in a small corpus."""
    return ["<think>", "</think>", "<answer>", "</answer>", "\\boxed{", "The answer is",
            "Let me look at the image.", "I count", "the value", "box", "[", "]", ", "]
