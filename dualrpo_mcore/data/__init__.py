"""Data: the sample schema, the ``datasets``-based prompt loader, Qwen2.5-VL image processing,
and the built-in synthetic eight-task set (``dualrpo data synth``)."""
from dualrpo_mcore.data.config import DataConfig, SourceConfig
from dualrpo_mcore.data.schema import TASKS, BadRow

__all__ = ["DataConfig", "SourceConfig", "TASKS", "BadRow", "PromptLoader", "Prompt", "TooManyBadRows"]


def __getattr__(name):  # the loader pulls in datasets/numpy; import it only when asked for
    if name in ("PromptLoader", "Prompt", "TooManyBadRows"):
        from dualrpo_mcore.data import loader

        return getattr(loader, name)
    raise AttributeError(name)
