"""Rollout: engine interface, HF and SGLang engines, bucketed weight export for weight sync."""
from .engine import ENGINES, RolloutEngine, RolloutRequest, Sample, SamplingParams, build_engine, seed_for

__all__ = ["ENGINES", "RolloutEngine", "RolloutRequest", "Sample", "SamplingParams", "build_engine", "seed_for"]
