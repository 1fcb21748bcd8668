"""`pi-policy inspect CHECKPOINT`: what was found beside a checkpoint and what is missing, before it drives a robot."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from pi_policy.model.checkpoint import describe_mismatch, read_checkpoint
from pi_policy.model.checkpoint_dir import (
    CheckpointDir,
    config_mismatches,
    find_checkpoint,
    lerobot_cameras,
    load_statistics,
    preset_fits,
)
from pi_policy.model.config import PRESETS, PiConfig
from pi_policy.model.normalize import default_mode
from pi_policy.model.tokenizer import PromptTokenizer
from pi_policy.policy_config import CONFIGS, get_policy_config, resolve_policy
from pi_policy.tools.errors import UsageError, existing

PROMPTS = {
    ("openpi", False): 'the cleaned task (strip, "_" -> " "), then "\\n" encoded on its own',
    ("openpi", True): '"Task: <cleaned task>, State: <state bins>;\\nAction: ", the normalized state unpadded',
    ("lerobot", False): 'the task as given with "\\n" appended, encoded as one string',
    ("lerobot", True): '"Task: <cleaned task>, State: <state bins>;\\nAction: ", the state zero-padded to {pad} dims',
}


LISTED = 8  # tensors listed for weights that fit no preset
FITS = 0.5  # the share of a preset's tensors a checkpoint of it must have, at least, to be compared with it key by key


def overlap(fit: tuple[list[str], list[str], list[str]], found: int) -> tuple[int, int]:
    """(the preset's tensors the checkpoint has, the preset's tensors): from compare_shapes' lists."""
    missing, unexpected, _ = fit
    have = found - len(unexpected)
    return have, have + len(missing)


def fits_none(fits: dict, found: dict[str, tuple]) -> str:
    """What weights that are no preset's look like: the closest preset's share, and the tensors they hold."""
    best = max(fits, key=lambda n: overlap(fits[n], len(found))[0] / overlap(fits[n], len(found))[1])
    have, total = overlap(fits[best], len(found))
    shown = ", ".join(f"{k} {tuple(s)}" for k, s in list(found.items())[:LISTED])
    more = f", and {len(found) - LISTED} more" if len(found) > LISTED else ""
    closest = (f"the closest, {best}, would find {have} of its {total} tensors here" if have else
               "none of their tensors is here")
    return f"fits no preset ({', '.join(PRESETS)}); {closest}. The file holds {len(found)} tensors: {shown}{more}"


def report(path: str, preset: str | None = None, policy_config: str | None = None
           ) -> tuple[list[tuple[str, str]], list[str], str]:
    """(label, text) rows, the missing pieces (none: ready) and the preset checked against."""
    ck = find_checkpoint(path)
    if policy_config:
        get_policy_config(policy_config)  # an unknown name before anything is read
    recorded = ck.recorded()
    asset_id = get_policy_config(policy_config).asset_id if policy_config else None
    picked = asset_id in ck.asset_ids()  # the named configuration picks its statistics among several
    missing = [n for n in ck.notes if not (picked and n.startswith("several norm_stats.json"))] + recorded.problems
    size = f"{ck.size_bytes / 1e9:.2f} GB" if ck.size_bytes >= 1e9 else f"{ck.size_bytes / 1e6:.1f} MB"
    rows = [("checkpoint", f"{ck.path} ({'folder' if ck.path.is_dir() else 'file'})"),
            ("weights", f"{', '.join(f.name for f in ck.weights)}: {ck.num_tensors} tensors, {size}, "
                        f"{'/'.join(ck.dtypes)}"),
            ("layout", ("LeRobot's (keys under 'model.')" if ck.layout == "lerobot" else "openpi's")
             + ("; PaliGemma's lm_head stands in for the tied token embedding" if ck.tied_lm_head else "")),
            ("written by", f"{ck.source} ({ck.evidence})")]
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    width = recorded.settings.get("model_action_dim")
    fits = preset_fits(ck.path, width.value if width else None)
    found = read_checkpoint(ck.path, shapes_only=True)
    if preset is None and max(have / total for have, total in (overlap(f, len(found)) for f in fits.values())) < FITS:
        rows[2:] = [("layout", "neither openpi's nor LeRobot's: not a pi0 / pi0.5 checkpoint"),
                    ("preset", fits_none(fits, found))]
        return rows, [*missing, "weights that fit a preset (above)"], ""
    fitting = [n for n, f in fits.items() if not any(f)]
    kind = get_policy_config(policy_config).pi05 if policy_config else None
    fitting = [n for n in fitting if kind is None or PRESETS[n].pi05 == kind] or fitting
    name = preset or (fitting[0] if fitting else min(fits, key=lambda n: sum(len(x) for x in fits[n])))
    if not any(fits[name]):
        rows.append(("preset", f"{name if preset else ', '.join(fitting)} (every tensor fits)"))
    else:
        rows.append(("preset", describe_mismatch(PRESETS[name], ck.path, *fits[name])))
        missing.append(f"the weights do not fit preset {name!r} (above)")
    cfg = PRESETS[name]
    try:
        settings = resolve_policy(cfg, policy_config, recorded)
    except ValueError as e:
        missing.append(str(e))
        settings = resolve_policy(cfg, None, recorded)
    cfg = replace(cfg, **settings.model_overrides())
    rows.append(("policy", "\n".join(f"{k} {v}" for k, v in settings.describe())))
    if recorded.n_action_steps is not None:
        rows.append(("executes", f"{recorded.n_action_steps} steps of each chunk in LeRobot (config.json "
                                 "n_action_steps); this runtime publishes the whole chunk"))
    missing += config_mismatches(ck, cfg)
    pad = int(ck.config.get("max_state_dim", cfg.action_dim))
    rows.append(("prompt", f"{ck.source}: " + PROMPTS[ck.source, cfg.pi05].format(pad=pad)))
    rows.append(("statistics", _stats(ck, ck.stats_for(asset_id), default_mode("pi05" if cfg.pi05 else "pi0"),
                                      missing)))
    if asset_id and ck.source == "openpi" and ck.stats_files and asset_id not in ck.asset_ids():
        rows.append(("note", f"policy_config {policy_config} reads assets/{asset_id}/norm_stats.json, which is not "
                             "here: check that the statistics above are your robot's"))
    rows.append(("tokenizer", _tokenizer(ck, cfg, missing)))
    cameras = lerobot_cameras(ck)
    if cameras:
        rows.append(("cameras", ", ".join(cameras) + " (config.json; set camera_names to match)"))
    if ck.source == "openpi" and not policy_config:
        rows.append(("to set", _openpi_hint(ck, cfg.pi05)))
    return rows, missing, name


def _openpi_hint(ck: CheckpointDir, pi05: bool) -> str:
    """openpi keeps the policy around the model in its training config, not in the checkpoint: say which names fit."""
    ids = ck.asset_ids()
    names = [c.name for c in CONFIGS.values() if c.pi05 == pi05 and (not ids or c.asset_id in ids)]
    where = f"the asset id of its statistics, {', '.join(ids)}, fits " if ids and names else "named configurations: "
    return ("openpi does not store delta actions, ALOHA's joint conversion or the horizon in a checkpoint: set "
            f"policy_config to the training config's name ({where}{', '.join(names) or 'none of them'}), or set "
            "delta_action_mask, robot_conversion and action_horizon yourself")


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


def _stats(ck: CheckpointDir, path: Path | None, mode: str, missing: list[str]) -> str:
    if path is None:
        return "none found"
    try:
        s = load_statistics(path)
    except (ValueError, OSError) as e:
        missing.append(f"the statistics cannot be read: {e}")
        return f"{path}: unreadable"
    modes = s.modes or {"state": mode, "actions": mode}
    how = modes["state"] if modes["state"] == modes["actions"] else f"state {modes['state']}, " \
                                                                    f"actions {modes['actions']}"
    return (f"{s.origin}: {s.convention} formulas, {how}{'' if s.modes else ' (the preset default)'}, "
            f"state {s.stats['state'].dim} dims, actions {s.stats['actions'].dim} dims")


def run(args: argparse.Namespace) -> int:
    existing(args.checkpoint, "checkpoint")
    if args.preset is not None and args.preset not in PRESETS:
        raise UsageError(f"unknown preset {args.preset!r}; choose one of {', '.join(PRESETS)}")
    rows, missing, preset = report(args.checkpoint, args.preset, args.policy_config)
    width = max(len(label) for label, _ in rows)
    for label, text in rows:
        print(f"{label:<{width}}  " + text.replace("\n", "\n" + " " * (width + 2)))
    if missing:
        print(f"{'missing':<{width}}  " + f"\n{'':<{width}}  ".join(f"- {m}" for m in missing))
        return 1
    print(f"{'missing':<{width}}  nothing: ready")
    named = f", policy_config: {args.policy_config}" if args.policy_config else ""
    print(f"{'run with':<{width}}  preset: {preset}, checkpoint: {args.checkpoint}{named}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("inspect", help="report what a checkpoint folder holds and lacks, before a robot run",
                              description="Report the weights' layout and the preset they fit, who wrote the "
                                          "checkpoint (openpi or LeRobot), its prompt format, normalization "
                                          "statistics and tokenizer, and what is missing. Exit 1 if anything is.")
    p.add_argument("checkpoint", help="checkpoint folder or safetensors file")
    p.add_argument("--preset", help="check against this preset (default: report the presets that fit)")
    p.add_argument("--policy-config", help="openpi's training config name the checkpoint was trained with (e.g. "
                                           "pi0_aloha): check it against what the folder records")
    p.set_defaults(func=run)
