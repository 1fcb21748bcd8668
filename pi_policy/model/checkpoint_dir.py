"""What lies beside a checkpoint's weights, and what a runner takes from it: who wrote it (openpi or LeRobot),
its normalization statistics, the tokenizer, the trainer's config, and what is missing."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pi_policy.policy_config import Recorded, recorded_settings

from .checkpoint import (
    LM_HEAD,
    TIED,
    CheckpointError,
    canonical_key,
    checkpoint_files,
    compare_shapes,
    expected_shapes,
    read_checkpoint,
)
from .config import PRESETS, PiConfig
from .lerobot_stats import POSTPROCESSOR, PREPROCESSOR, has_processor, load_lerobot_stats
from .normalize import Statistics, load_openpi_stats
from .pi0 import PiModel
from .tokenizer import PROMPT_FORMATS

log = logging.getLogger(__name__)

LEROBOT_TYPES = ("pi0", "pi05")  # config.json "type" of LeRobot's pi0 / pi0.5 policies
TOKENIZER_NAMES = ("paligemma_tokenizer.model", "tokenizer.model")


def tokenizer_candidates(root: Path) -> list[Path]:
    """Beside the weights, then where openpi and Hugging Face cache PaliGemma's SentencePiece model."""
    home = Path.home()
    openpi = Path(os.environ.get("OPENPI_DATA_HOME") or home / ".cache" / "openpi")
    hf = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME") or home / ".cache" / "huggingface")
              / "hub")
    paths = [root / n for n in TOKENIZER_NAMES] + [openpi / "big_vision" / "paligemma_tokenizer.model"]
    paths += sorted((hf / "models--google--paligemma-3b-pt-224" / "snapshots").glob("*/tokenizer.model"))
    return paths


@dataclass
class CheckpointDir:
    """A checkpoint as found on disk. `source` is who wrote it, which decides the prompt format and the
    statistics' formulas; `layout` is how its weights are named (LeRobot's sit under `model.`)."""

    path: Path
    root: Path
    weights: list[Path]
    source: str
    evidence: str
    layout: str
    num_tensors: int
    dtypes: list[str]
    tied_lm_head: bool  # the token embedding is stored only as PaliGemma's (tied) lm_head
    config: dict = field(default_factory=dict)
    stats_file: Path | None = None
    tokenizer: Path | None = None
    notes: list[str] = field(default_factory=list)  # what is missing or ambiguous beside the weights
    stats_files: list[Path] = field(default_factory=list)  # every openpi norm_stats.json found

    def asset_ids(self) -> list[str]:
        """openpi's asset ids of the statistics found (assets/<asset_id>/norm_stats.json)."""
        return [f.parent.relative_to(self.root / "assets").as_posix() for f in self.stats_files
                if (self.root / "assets") in f.parents]

    def stats_for(self, asset_id: str | None) -> Path | None:
        """The statistics a named configuration reads (assets/<asset_id>/), else the one found."""
        if asset_id is not None and (self.root / "assets" / asset_id / "norm_stats.json") in self.stats_files:
            return self.root / "assets" / asset_id / "norm_stats.json"
        return self.stats_file

    def recorded(self) -> Recorded:
        """The policy settings its config.json records (LeRobot's policy config, openpi's conversion config)."""
        return recorded_settings(self.config, self.source)

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.weights)


def _header(files: list[Path]) -> tuple[list[str], set[str]]:
    names, dtypes = [], set()
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as st:
                for k in st.keys():
                    names.append(k)
                    dtypes.add(st.get_slice(k).get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from None
    return names, dtypes


def find_checkpoint(path: str | Path) -> CheckpointDir:
    """Look at a checkpoint file or folder and what sits beside it; reads only file headers and JSON."""
    p = Path(path)
    weights = checkpoint_files(p)
    root = p if p.is_dir() else p.parent
    names, dtypes = _header(weights)
    canonical = {canonical_key(k) for k in names}
    notes = []
    config: dict = {}
    if (root / "config.json").is_file():
        try:
            config = json.loads((root / "config.json").read_text())
        except (OSError, ValueError) as e:
            notes.append(f"config.json is unreadable ({e})")
        config = config if isinstance(config, dict) else {}
    if has_processor(root) or config.get("type") in LEROBOT_TYPES:
        source = "lerobot"
        evidence = ", ".join(n for n in (PREPROCESSOR, POSTPROCESSOR) if (root / n).is_file()) or \
            f"config.json of a LeRobot {config.get('type')} policy"
        stats = root / PREPROCESSOR if has_processor(root) else None
        if stats is None:
            notes.append(f"no {PREPROCESSOR} beside the weights: LeRobot 0.4+ keeps the normalization statistics "
                         "there (older checkpoints: convert with LeRobot's migrate_policy_normalization)")
    else:
        source = "openpi"
        # assets/<asset_id>/norm_stats.json; an asset id may hold a slash (physical-intelligence/libero)
        found = [f for f in [root / "norm_stats.json", *sorted(root.glob("assets/**/norm_stats.json"))] if f.is_file()]
        evidence = ", ".join(str(f.relative_to(root)) for f in found) or (
            "config.json of an openpi conversion" if "paligemma_variant" in config else
            "no LeRobot processor files or config beside the weights")
        stats = found[0] if len(found) == 1 else None
        if len(found) > 1:
            notes.append(f"several norm_stats.json ({', '.join(str(f.relative_to(root)) for f in found)}): "
                         "set norm_stats to the one of your robot, or policy_config to pick its asset id")
        elif not found:
            notes.append("no norm_stats.json beside the weights (openpi keeps it in assets/<asset_id>/)")
    tokenizer = next((t for t in tokenizer_candidates(root) if t.is_file()), None)
    return CheckpointDir(
        path=p, root=root, weights=weights, source=source, evidence=evidence,
        layout="lerobot" if names and all(k.startswith("model.") for k in names) else "openpi",
        num_tensors=len(names), dtypes=sorted(dtypes),
        tied_lm_head=TIED[0][0] not in canonical and LM_HEAD in canonical,
        config=config, stats_file=stats, tokenizer=tokenizer, notes=notes, stats_files=found if source == "openpi"
        else [])


def load_statistics(path: str | Path) -> Statistics:
    """openpi's norm_stats.json (a file, or a folder holding one) or LeRobot's processor files (the folder or
    either JSON file)."""
    p = Path(path)
    if p.name in (PREPROCESSOR, POSTPROCESSOR) or (p.is_dir() and has_processor(p)):
        return load_lerobot_stats(p)
    return load_openpi_stats(p)


def preset_fits(path: str | Path, action_dim: int | None = None) -> dict[str, tuple[list[str], list[str], list[str]]]:
    """Preset name -> (missing, unexpected, mis-shaped) keys of the checkpoint against it; from headers only.
    `action_dim`: the model's action width where the checkpoint records one other than the presets' 32."""
    found = read_checkpoint(path, shapes_only=True)
    fits = {}
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            model = PiModel(replace(cfg, action_dim=action_dim) if action_dim else cfg)
            fits[name] = compare_shapes(expected_shapes(model), found)
    return fits


def config_mismatches(ck: CheckpointDir, cfg: PiConfig) -> list[str]:
    """Where the trainer's config.json (LeRobot's) disagrees with the preset the weights are run with. (The
    horizon, denoise steps, prompt length and action width it records are settings: pi_policy.policy_config.)"""
    c, out = ck.config, []
    if ck.source != "lerobot" or not c:
        return out
    kind = "pi05" if cfg.pi05 else "pi0"
    if c.get("type") in LEROBOT_TYPES and c["type"] != kind:
        out.append(f"config.json says a {c['type']} policy, the preset {cfg.name!r} is {kind}")
    res = c.get("image_resolution")
    if isinstance(res, list) and res and res[0] != cfg.vision.image_size:
        out.append(f"config.json image_resolution is {res}, the preset's images are {cfg.vision.image_size}")
    return out


def lerobot_cameras(ck: CheckpointDir) -> list[str]:
    feats = ck.config.get("input_features") or {}
    return [k.removeprefix("observation.images.") for k, v in feats.items()
            if isinstance(v, dict) and v.get("type") == "VISUAL"]


@dataclass(frozen=True)
class Assets:
    """What a runner needs besides the weights, resolved from the parameters and the checkpoint."""

    statistics: Statistics | None
    tokenizer: str | None
    prompt_format: str
    state_pad: int | None  # LeRobot pads pi0.5's state to this many dims before writing it into the prompt


def resolve_assets(cfg: PiConfig, checkpoint: str | None = None, norm_stats: str | None = None,
                   tokenizer: str | None = None, prompt_format: str = "auto", require: bool = True,
                   asset_id: str | None = None) -> Assets:
    """Explicit parameters win; what is missing is taken from beside the checkpoint (openpi's statistics under
    assets/<asset_id>/ when a named configuration gives the id and several are there). With a checkpoint and
    `require`, missing statistics (and, beyond the tiny presets, a missing tokenizer) are an error."""
    if prompt_format not in ("auto", *PROMPT_FORMATS):
        raise ValueError(f"prompt_format must be auto, {' or '.join(PROMPT_FORMATS)}; got {prompt_format!r}")
    ck = find_checkpoint(checkpoint) if checkpoint else None
    found = ck.stats_for(asset_id) if ck else None
    if ck and asset_id and found is not None and asset_id not in ck.asset_ids() and ck.source == "openpi":
        log.warning("checkpoint %s: the named configuration reads assets/%s/norm_stats.json, which is not there; "
                    "using %s", checkpoint, asset_id, found.relative_to(ck.root))
    stats = load_statistics(norm_stats) if norm_stats else load_statistics(found) if found else None
    if ck and stats is None and require:
        why = "; ".join(ck.notes) or "none found"
        raise ValueError(f"checkpoint {checkpoint} has no normalization statistics ({why}). Set norm_stats to "
                         "openpi's norm_stats.json or the LeRobot checkpoint folder: without them the model's "
                         "normalized actions would go to the motors as they are")
    tok = tokenizer or (str(ck.tokenizer) if ck and ck.tokenizer else None)
    if ck and tok is None and require and not cfg.name.startswith("tiny"):
        raise ValueError(f"checkpoint {checkpoint}: no PaliGemma tokenizer found beside it or in openpi's or Hugging "
                         "Face's cache; set tokenizer to paligemma_tokenizer.model")
    fmt = prompt_format if prompt_format != "auto" else ck.source if ck else "openpi"
    state_pad = int((ck.config if ck else {}).get("max_state_dim", cfg.action_dim)) if fmt == "lerobot" else None
    for problem in config_mismatches(ck, cfg) if ck else ():
        log.warning("checkpoint %s: %s", checkpoint, problem)
    return Assets(stats, tok, fmt, state_pad)
