"""`pi-policy inspect CHECKPOINT`: what was found beside a checkpoint and what is missing, before it drives a robot."""

from __future__ import annotations

import argparse

from pi_policy.model.checkpoint import describe_mismatch
from pi_policy.model.checkpoint_dir import (
    CheckpointDir,
    config_mismatches,
    find_checkpoint,
    lerobot_cameras,
    preset_fits,
)
from pi_policy.model.config import PRESETS, PiConfig
from pi_policy.model.normalize import default_mode
from pi_policy.model.tokenizer import PromptTokenizer

PROMPTS = {
    ("openpi", False): 'the cleaned task (strip, "_" -> " "), then "\\n" encoded on its own',
    ("openpi", True): '"Task: <cleaned task>, State: <state bins>;\\nAction: ", the normalized state unpadded',
    ("lerobot", False): 'the task as given with "\\n" appended, encoded as one string',
    ("lerobot", True): '"Task: <cleaned task>, State: <state bins>;\\nAction: ", the state zero-padded to {pad} dims',
}


def report(path: str, preset: str | None = None) -> tuple[list[tuple[str, str]], list[str], str]:
    """(label, text) rows, the missing pieces (none: ready) and the preset checked against."""
    ck = find_checkpoint(path)
    missing = list(ck.notes)
    size = f"{ck.size_bytes / 1e9:.2f} GB" if ck.size_bytes >= 1e9 else f"{ck.size_bytes / 1e6:.1f} MB"
    rows = [("checkpoint", f"{ck.path} ({'folder' if ck.path.is_dir() else 'file'})"),
            ("weights", f"{', '.join(f.name for f in ck.weights)}: {ck.num_tensors} tensors, {size}, "
                        f"{'/'.join(ck.dtypes)}"),
            ("layout", ("LeRobot's (keys under 'model.')" if ck.layout == "lerobot" else "openpi's")
             + ("; PaliGemma's lm_head stands in for the tied token embedding" if ck.tied_lm_head else "")),
            ("written by", f"{ck.source} ({ck.evidence})")]
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fits = preset_fits(ck.path)
    fitting = [n for n, f in fits.items() if not any(f)]
    name = preset or (fitting[0] if fitting else min(fits, key=lambda n: sum(len(x) for x in fits[n])))
    if not any(fits[name]):
        rows.append(("preset", f"{name if preset else ', '.join(fitting)} (every tensor fits)"))
    else:
        rows.append(("preset", describe_mismatch(PRESETS[name], ck.path, *fits[name])))
        missing.append(f"the weights do not fit preset {name!r} (above)")
    cfg = PRESETS[name]
    missing += config_mismatches(ck, cfg)
    pad = int(ck.config.get("max_state_dim", cfg.action_dim))
    rows.append(("prompt", f"{ck.source}: " + PROMPTS[ck.source, cfg.pi05].format(pad=pad)))
    rows.append(("statistics", _stats(ck, default_mode("pi05" if cfg.pi05 else "pi0"), missing)))
    rows.append(("tokenizer", _tokenizer(ck, cfg, missing)))
    cameras = lerobot_cameras(ck)
    if cameras:
        rows.append(("cameras", ", ".join(cameras) + " (config.json; set camera_names to match)"))
    return rows, missing, name


def _tokenizer(ck: CheckpointDir, cfg: PiConfig, missing: list[str]) -> str:
    if ck.tokenizer is None:
        if not cfg.name.startswith("tiny"):
            missing.append("PaliGemma's tokenizer: put paligemma_tokenizer.model beside the weights, or set tokenizer")
        return "none found"
    try:
        tok = PromptTokenizer(ck.tokenizer, vocab_size=cfg.vocab_size)
    except (ValueError, OSError, ImportError) as e:
        missing.append(f"a usable tokenizer: {e}")
        return f"{ck.tokenizer}: unusable"
    return f"{ck.tokenizer} (SentencePiece, {tok.vocab_size} pieces)"


def _stats(ck: CheckpointDir, mode: str, missing: list[str]) -> str:
    if ck.stats_file is None:
        return "none found"
    try:
        s = ck.statistics()
    except (ValueError, OSError) as e:
        missing.append(f"the statistics cannot be read: {e}")
        return f"{ck.stats_file}: unreadable"
    modes = s.modes or {"state": mode, "actions": mode}
    how = modes["state"] if modes["state"] == modes["actions"] else f"state {modes['state']}, " \
                                                                    f"actions {modes['actions']}"
    return (f"{s.origin}: {s.convention} formulas, {how}{'' if s.modes else ' (the preset default)'}, "
            f"state {s.stats['state'].dim} dims, actions {s.stats['actions'].dim} dims")


def run(args: argparse.Namespace) -> int:
    rows, missing, preset = report(args.checkpoint, args.preset)
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  " + text.replace("\n", "\n" + " " * (width + 2)))
    if missing:
        print(f"{'missing':<{width}}  " + f"\n{'':<{width}}  ".join(f"- {m}" for m in missing))
        return 1
    print(f"{'missing':<{width}}  nothing: ready")
    print(f"{'run with':<{width}}  preset: {preset}, checkpoint: {args.checkpoint}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="report what a checkpoint folder holds and lacks, before a robot run",
                              description="Report the weights' layout and the preset they fit, who wrote the "
                                          "checkpoint (openpi or LeRobot), its prompt format, normalization "
                                          "statistics and tokenizer, and what is missing. Exit 1 if anything is.")
    p.add_argument("checkpoint", help="checkpoint folder or safetensors file")
    p.add_argument("--preset", help="check against this preset (default: report the presets that fit)")
    p.set_defaults(func=run)
