"""Qwen2.5-VL policy on Megatron-Core: ViT + merger + mrope GPTModel, HF <-> Megatron conversion."""
from .config import QwenVLConfig, from_hf, language_config, merger_config, vision_config
from .geometry import rope_index
from .options import ModelOptions
from .precision import Precision

__all__ = ["QwenVLConfig", "from_hf", "language_config", "vision_config", "merger_config", "rope_index",
           "Precision", "QwenVLModel", "ModelOptions", "build_model"]


def __getattr__(name):
    # The model pulls in Megatron's module tree; config-only users (CLI parsing) skip that cost.
    if name in ("QwenVLModel", "build_model"):
        from . import model

        return getattr(model, name)
    raise AttributeError(name)
