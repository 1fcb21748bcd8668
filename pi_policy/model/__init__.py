"""Plain-PyTorch pi0 / pi0.5: configs, SigLIP, Gemma, the staged model, checkpoints, tokenizer, preprocessing."""

from .config import PRESETS, GemmaConfig, PiConfig, SiglipConfig, get_config
from .pi0 import KVCache, PiModel, cast_for_inference, init_random

__all__ = ["PRESETS", "GemmaConfig", "KVCache", "PiConfig", "PiModel", "SiglipConfig", "cast_for_inference",
           "get_config", "init_random"]
