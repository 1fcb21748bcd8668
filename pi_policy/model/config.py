"""Model configuration presets: pi0, pi0.5 at full size, and a tiny one for tests and the CPU demo."""

from __future__ import annotations

from dataclasses import dataclass, field, replace


@dataclass(frozen=True)
class SiglipConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    eps: float = 1e-6

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256
    eps: float = 1e-6
    rope_base: float = 10_000.0


@dataclass(frozen=True)
class PiConfig:
    name: str
    pi05: bool
    vision: SiglipConfig = field(default_factory=SiglipConfig)
    llm: GemmaConfig = field(default_factory=lambda: GEMMA_2B)
    expert: GemmaConfig = field(default_factory=lambda: GEMMA_300M)
    vocab_size: int = 257_152
    num_cameras: int = 3
    max_token_len: int = 48
    horizon: int = 50
    action_dim: int = 32
    num_steps: int = 10

    @property
    def image_tokens(self) -> int:
        return self.num_cameras * self.vision.num_tokens

    @property
    def prefix_len(self) -> int:
        return self.image_tokens + self.max_token_len

    @property
    def suffix_len(self) -> int:
        # pi0 feeds the state as one token in front of the actions; pi0.5 puts it in the prompt.
        return self.horizon + (0 if self.pi05 else 1)

    def __post_init__(self) -> None:
        a, b = self.llm, self.expert
        if a.depth != b.depth or a.num_heads != b.num_heads or a.num_kv_heads != b.num_kv_heads \
                or a.head_dim != b.head_dim:
            raise ValueError("the LLM and the action expert must share depth and attention geometry")


GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16_384)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096)

PRESETS: dict[str, PiConfig] = {
    "pi0": PiConfig(name="pi0", pi05=False),
    "pi05": PiConfig(name="pi05", pi05=True, max_token_len=200),
    "tiny": PiConfig(
        name="tiny",
        pi05=False,
        vision=SiglipConfig(image_size=56, patch_size=14, width=64, depth=2, mlp_dim=128, num_heads=4),
        llm=GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=4, num_kv_heads=1, head_dim=16),
        expert=GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=4, num_kv_heads=1, head_dim=16),
        vocab_size=512,
        max_token_len=48,
    ),
}
PRESETS["tiny05"] = replace(PRESETS["tiny"], name="tiny05", pi05=True, max_token_len=96)


def get_config(name: str, **overrides) -> PiConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)
