"""Load and save safetensors checkpoints in the layout openpi's PyTorch conversion and LeRobot publish.

The model keeps a fast layout (fused q/k/v and gate/up); the checkpoint layout is mapped at this
boundary. Nothing is ever loaded through pickle.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pi_policy.progress import progress_bar

from .config import PiConfig
from .pi0 import PiModel

PG = "paligemma_with_expert.paligemma.model."
EXPERT = "paligemma_with_expert.gemma_expert.model."
LM_HEAD = "paligemma_with_expert.paligemma.lm_head.weight"
# Present in published checkpoints but unused for inference (tied or never-called LM heads).
IGNORED = (LM_HEAD, "paligemma_with_expert.gemma_expert.lm_head.weight")
# (name, stand-in): PaliGemma's LM head is its token embedding in both peers' models, and safetensors'
# save_model keeps one name of a tied pair, the first in sorted order: their files hold only lm_head.
TIED = ((PG + "language_model.embed_tokens.weight", LM_HEAD),)
INDEX = "model.safetensors.index.json"
PROCESSOR_STATE = re.compile(r".+_step_\d+(_.+)?\.safetensors$")  # LeRobot's processor statistics, not weights
# Older transformers / LeRobot layouts -> openpi's current layout.
ALIASES = (
    ("paligemma_with_expert.paligemma.language_model.model.", PG + "language_model."),
    ("paligemma_with_expert.paligemma.language_model.lm_head.", "paligemma_with_expert.paligemma.lm_head."),
    ("paligemma_with_expert.paligemma.vision_tower.", PG + "vision_tower."),
    ("paligemma_with_expert.paligemma.multi_modal_projector.", PG + "multi_modal_projector."),
)


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model: says which keys are missing, unexpected or mis-shaped."""


@dataclass(frozen=True)
class Entry:
    sources: tuple[str, ...]  # checkpoint keys concatenated along dim 0 into one model tensor
    sizes: tuple[int, ...]


def key_map(cfg: PiConfig) -> dict[str, Entry]:
    """Model parameter name -> the checkpoint keys it is built from."""
    m: dict[str, Entry] = {}

    def one(dst: str, src: str) -> None:
        m[dst] = Entry((src,), ())

    def fused(dst: str, srcs: list[str], sizes: list[int]) -> None:
        m[dst] = Entry(tuple(srcs), tuple(sizes))

    v, vt = cfg.vision, PG + "vision_tower.vision_model."
    one("vision.patch_embed.weight", vt + "embeddings.patch_embedding.weight")
    one("vision.patch_embed.bias", vt + "embeddings.patch_embedding.bias")
    one("vision.pos_embed", vt + "embeddings.position_embedding.weight")
    for i in range(v.depth):
        s, d = f"{vt}encoder.layers.{i}.", f"vision.blocks.{i}."
        for kind in ("weight", "bias"):
            fused(d + f"qkv.{kind}", [s + f"self_attn.{p}_proj.{kind}" for p in "qkv"], [v.width] * 3)
            one(d + f"out.{kind}", s + f"self_attn.out_proj.{kind}")
            one(d + f"norm1.{kind}", s + f"layer_norm1.{kind}")
            one(d + f"norm2.{kind}", s + f"layer_norm2.{kind}")
            one(d + f"fc1.{kind}", s + f"mlp.fc1.{kind}")
            one(d + f"fc2.{kind}", s + f"mlp.fc2.{kind}")
    for kind in ("weight", "bias"):
        one(f"vision.norm.{kind}", vt + f"post_layernorm.{kind}")
        one(f"projector.{kind}", PG + f"multi_modal_projector.linear.{kind}")
    one("embed_tokens.weight", PG + "language_model.embed_tokens.weight")

    for dst_stack, src_stack, g, adaptive in (("llm", PG + "language_model.", cfg.llm, False),
                                              ("expert", EXPERT, cfg.expert, cfg.pi05)):
        q, kv = g.num_heads * g.head_dim, g.num_kv_heads * g.head_dim
        norm_keys = ("dense.weight", "dense.bias") if adaptive else ("weight",)
        for i in range(g.depth):
            s, d = f"{src_stack}layers.{i}.", f"{dst_stack}.layers.{i}."
            fused(d + "wqkv.weight", [s + f"self_attn.{p}_proj.weight" for p in "qkv"], [q, kv, kv])
            one(d + "wo.weight", s + "self_attn.o_proj.weight")
            fused(d + "mlp.gate_up.weight", [s + "mlp.gate_proj.weight", s + "mlp.up_proj.weight"], [g.mlp_dim] * 2)
            one(d + "mlp.down.weight", s + "mlp.down_proj.weight")
            for k in norm_keys:
                one(d + f"attn_norm.{k}", s + f"input_layernorm.{k}")
                one(d + f"mlp_norm.{k}", s + f"post_attention_layernorm.{k}")
        for k in norm_keys:
            one(f"{dst_stack}.norm.{k}", src_stack + f"norm.{k}")

    heads = {"action_in": "action_in_proj", "action_out": "action_out_proj"}
    if cfg.pi05:
        heads |= {"time_in": "time_mlp_in", "time_out": "time_mlp_out"}
    else:
        heads |= {"state_proj": "state_proj", "action_time_in": "action_time_mlp_in",
                  "action_time_out": "action_time_mlp_out"}
    for dst, src in heads.items():
        one(f"{dst}.weight", f"{src}.weight")
        one(f"{dst}.bias", f"{src}.bias")
    return m


def canonical_key(key: str) -> str:
    if key.startswith("model."):  # LeRobot wraps the openpi module in `model`
        key = key[len("model."):]
    for old, new in ALIASES:
        if key.startswith(old):
            key = new + key[len(old):]
            break
    tower = PG + "vision_tower."
    if key.startswith(tower) and not key.startswith(tower + "vision_model."):  # transformers >= 5 drops the level
        key = tower + "vision_model." + key[len(tower):]
    return key


def checkpoint_files(path: str | Path) -> list[Path]:
    """The weight files of a checkpoint: a .safetensors file, a shard index, or a folder holding either.

    In a folder: the index's shards, else model.safetensors, else every *.safetensors but LeRobot's processor files.
    """
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint not found: {p}")
    if p.is_dir():
        if (p / INDEX).is_file():
            return checkpoint_files(p / INDEX)
        if (p / "model.safetensors").is_file():
            return [p / "model.safetensors"]
        files = sorted(f for f in p.glob("*.safetensors") if not PROCESSOR_STATE.match(f.name))
        if not files:
            raise CheckpointError(f"no *.safetensors weights in {p}")
        return files
    if p.name.endswith(".index.json"):
        try:
            shards = sorted(set(json.loads(p.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{p}: not a safetensors shard index ({e})") from None
        missing = [s for s in shards if not (p.parent / s).is_file()]
        if missing:
            raise CheckpointError(f"{p}: shard(s) missing beside the index: {missing}")
        return [p.parent / s for s in shards]
    if p.suffix != ".safetensors":
        raise CheckpointError(f"{p}: only .safetensors checkpoints are loaded (pickle-based formats are refused)")
    return [p]


def read_checkpoint(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor | tuple[int, ...]]:
    """Every tensor (or only its shape) of a checkpoint, under canonical names, tied names filled in.

    A tied pair is resolved from TIED and from the names save_model records in the file's metadata.
    """
    out: dict[str, torch.Tensor | tuple[int, ...]] = {}
    ties = dict(TIED)
    for f in checkpoint_files(path):
        try:
            with safe_open(str(f), framework="pt") as st:
                names = list(st.keys())
                for dropped, kept in (st.metadata() or {}).items():
                    if kept in names:
                        ties[canonical_key(dropped)] = canonical_key(kept)
                for k in progress_bar(names, enabled=not shapes_only, desc=f"reading {f.name}", leave=False,
                                      mininterval=1.0):
                    out[canonical_key(k)] = tuple(st.get_slice(k).get_shape()) if shapes_only else st.get_tensor(k)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    for name, stand_in in ties.items():
        if name not in out and stand_in in out:
            out[name] = out[stand_in]
    return out


def expected_shapes(model: PiModel) -> dict[str, tuple[int, ...]]:
    """Checkpoint key -> the shape `model` needs there (a meta-device model is enough)."""
    params = dict(model.named_parameters())
    out = {}
    for dst, entry in key_map(model.cfg).items():
        shape = tuple(params[dst].shape)
        for k, n in zip(entry.sources, entry.sizes or (shape[0],), strict=True):
            out[k] = (n, *shape[1:])
    return out


def compare_shapes(expected: dict[str, tuple], found: dict[str, tuple]) -> tuple[list[str], list[str], list[str]]:
    """(missing, unexpected, mis-shaped) checkpoint keys; the unused LM heads are neither."""
    missing = [k for k in expected if k not in found]
    unexpected = sorted(set(found) - set(expected) - set(IGNORED))
    misshaped = [f"{k} {found[k]}, expected {e}" for k, e in expected.items() if k in found and found[k] != e]
    return missing, unexpected, misshaped


def load_checkpoint(model: PiModel, path: str | Path) -> PiModel:
    """Load weights into `model` (any dtype/device); one CheckpointError lists every mismatch."""
    src = read_checkpoint(path)
    missing, unexpected, misshaped = compare_shapes(expected_shapes(model), {k: tuple(t.shape) for k, t in src.items()})
    if missing or unexpected or misshaped:
        raise CheckpointError(describe_mismatch(model.cfg, path, missing, unexpected, misshaped))
    params = dict(model.named_parameters())
    staged = {dst: torch.cat([src[k] for k in e.sources]) if e.sizes else src[e.sources[0]]
              for dst, e in key_map(model.cfg).items()}
    with torch.no_grad():
        for dst, t in staged.items():
            if not torch.isfinite(t.float()).all():
                raise CheckpointError(f"{path}: tensor for {dst} holds NaN or inf")
            params[dst].copy_(t.to(params[dst].dtype))
    return model


def describe_mismatch(cfg: PiConfig, path, missing: list[str], unexpected: list[str], misshaped: list[str]) -> str:
    def block(title: str, items: list[str]) -> str:
        if not items:
            return ""
        shown = "\n".join(f"    {k}" for k in items[:20])
        more = f"\n    ... and {len(items) - 20} more" if len(items) > 20 else ""
        return f"\n  {title} ({len(items)}):\n{shown}{more}"

    hint = ""
    keys = set(unexpected) | set(missing)
    if not cfg.pi05 and any(k.startswith("time_mlp_in") for k in unexpected):
        hint = "\n  hint: this looks like a pi0.5 checkpoint; use --preset pi05"
    elif cfg.pi05 and any(k.startswith("state_proj") for k in keys if k in unexpected):
        hint = "\n  hint: this looks like a pi0 checkpoint; use --preset pi0"
    elif any(k.startswith(("normalize_inputs.", "unnormalize_outputs.")) for k in unexpected):
        hint = ("\n  hint: a LeRobot checkpoint from before 0.4 (statistics inside the weights); convert it with "
                "LeRobot's migrate_policy_normalization")
    elif misshaped:
        hint = f"\n  hint: the shapes do not match preset {cfg.name!r}; is it the right preset?"
    return (f"checkpoint {path} does not fit preset {cfg.name!r}:"
            + block("missing keys", missing) + block("unexpected keys", unexpected)
            + block("mis-shaped", misshaped) + hint)


def to_checkpoint_layout(model: PiModel) -> dict[str, torch.Tensor]:
    """The model's weights under openpi's key names (fused tensors split again)."""
    params = dict(model.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for dst, entry in key_map(model.cfg).items():
        t = params[dst].detach().cpu().contiguous()
        parts = t.split(list(entry.sizes), dim=0) if entry.sizes else (t,)
        for k, part in zip(entry.sources, parts, strict=True):
            out[k] = part.contiguous()
    return out


def save_checkpoint(model: PiModel, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(to_checkpoint_layout(model), str(path), metadata={"format": "pt", "pi_policy_preset": model.cfg.name})
    return path


def file_fingerprint(path: str | Path) -> str:
    """sha256 over the checkpoint file(s); identifies the weights an engine was built from."""
    return sha256_of_files(checkpoint_files(path))


def sha256_of_files(files) -> str:
    """sha256 over the bytes of the files, in the order given."""
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every parameter's bytes, in name order: proves a model was not modified."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes() if p.numel() else b"")
    return h.hexdigest()
