"""build_runner: a RunnerSpec -> a warmed-up runner (model, statistics, tokenizer, each stage's implementation)."""

from __future__ import annotations

import dataclasses
import logging

import torch

from pi_policy.model import PiConfig, PiModel, cast_for_inference, get_config, init_random
from pi_policy.model.checkpoint import load_checkpoint
from pi_policy.model.checkpoint_dir import find_checkpoint, resolve_assets
from pi_policy.model.normalize import Normalizer, default_mode
from pi_policy.model.tokenizer import load_tokenizer
from pi_policy.policy_config import PolicySettings, resolve_policy
from pi_policy.runtime.choice import Implementation, StageChoice, fall_back, plan_stages
from pi_policy.runtime.expert import make_denoise
from pi_policy.runtime.prefill import make_prefill
from pi_policy.runtime.runner import PolicyRunner
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.runtime.threads import apply_threads
from pi_policy.runtime.vision import make_vision

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError(f"device {device} asked for, but torch sees no CUDA GPU (use device cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s)")
    return dev


def build_model(spec: RunnerSpec | None = None, *, dtype: torch.dtype | None = None, **changes) -> PiModel:
    """The model of `spec` (`changes`: fields replaced) on its device: bf16 on GPUs, float32 on CPU; random weights
    (seed) without a checkpoint.

    It is built for the spec's served cameras: weights do not depend on them; the prefix length, and so every
    buffer, graph and engine shape, does.
    """
    spec = (spec or RunnerSpec()).replace(**changes).validate()
    apply_threads(spec.threads)  # random init and checkpoint conversion run on the CPU too
    cfg = get_config(spec.preset, num_cameras=spec.num_cameras, **policy_settings(spec).model_overrides())
    return _model_for(spec, cfg, dtype)


def _model_for(spec: RunnerSpec, cfg: PiConfig, dtype: torch.dtype | None = None) -> PiModel:
    dev = resolve_device(spec.device)
    with torch.device(dev):
        model = PiModel(cfg)
    if spec.checkpoint:
        load_checkpoint(model, spec.checkpoint)
    else:
        init_random(model, spec.seed)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return cast_for_inference(model, dtype).to(dev).eval()


def build_runner(spec: RunnerSpec | None = None, *, model: PiModel | None = None, calibration=None,
                 **changes) -> PolicyRunner:
    """A runner ready to serve, as `spec` describes it (`changes`: fields replaced, e.g. backend="fp8").

    model: an already built model of this spec to run (several backends over one set of weights); calibration:
    FP8 static scales computed in this process (an amax dict for vision and prefill, as pi_policy.runtime.calibrate
    makes, or sample prefixes for the prefill alone), in place of the spec's calibration file.
    """
    spec = (spec or RunnerSpec()).replace(**changes).validate()
    threads = apply_threads(spec.threads)
    policy = policy_settings(spec, model.cfg if model is not None else None)
    for note in policy.notes:  # explicit settings that replace what the checkpoint records
        log.warning("checkpoint %s: %s", spec.checkpoint, note)
    if model is not None and model.cfg.num_cameras != spec.num_cameras:
        raise ValueError(f"the model is built for {model.cfg.num_cameras} cameras, the runner would serve "
                         f"{list(spec.cameras.served)}")
    shape = policy.model_overrides()
    if model is not None and any(getattr(model.cfg, k) != v for k, v in shape.items()):
        raise ValueError(f"the model is built for {', '.join(f'{k} {getattr(model.cfg, k)}' for k in shape)}; the "
                         f"settings say {', '.join(f'{k} {v}' for k, v in shape.items())}")
    cfg = model.cfg if model is not None else get_config(spec.preset, num_cameras=spec.num_cameras, **shape)
    asset_id = policy.config.asset_id if policy.config else None
    assets = resolve_assets(cfg, spec.checkpoint, spec.norm_stats, spec.tokenizer, spec.prompt_format,
                            spec.require_assets, asset_id)
    model = model or _model_for(spec, cfg)  # the settings are resolved once: not again through build_model
    kind = "pi05" if cfg.pi05 else "pi0"
    normalizer = Normalizer.from_statistics(assets.statistics, default_mode(kind), cfg.action_dim, policy["action_dim"])
    transforms = policy.transforms
    transforms.check(normalizer.state_dim, normalizer.action_dim)
    prompt_kind = "pi05" if cfg.pi05 and policy["discrete_state_input"] else "pi0"  # pi05_libero: no state in it
    tok = load_tokenizer(assets.tokenizer, cfg.vocab_size, cfg.max_token_len, prompt_kind, assets.prompt_format,
                         assets.state_pad)
    on_gpu = next(model.parameters()).device.type == "cuda"
    choices = plan_stages(spec, on_gpu, "bf16" if model.dtype == torch.bfloat16 else
                          str(model.dtype).removeprefix("torch."))
    vision = make_vision(choices["vision"].impl, model, spec.fp8, calibration)
    choices["vision"] = settle(choices["vision"], vision)
    prefill = make_prefill(choices["prefill"].impl, model, spec.engine_path, spec.checkpoint, spec.fp8, calibration)
    choices["prefill"] = settle(choices["prefill"], prefill)
    denoise = make_denoise(choices["denoise"].impl, model, spec.denoise_keep_bf16)
    choices["denoise"] = settle(choices["denoise"], denoise)
    for c in choices.values():
        if c.note:
            log.warning(c.note)
    runner = PolicyRunner(model, tok, normalizer, spec.cameras, choices, vision=vision.fn, prefill=prefill.fn,
                          denoise=denoise.fn, seed=spec.seed, rtc=spec.rtc, batch_sizes=spec.batch_sizes,
                          transforms=transforms)
    runner.spec, runner.threads, runner.policy = spec, threads, policy
    if spec.warmup:
        runner.warmup(progress=spec.progress)
    return runner


def policy_settings(spec: RunnerSpec, base: PiConfig | None = None) -> PolicySettings:
    """The policy around the model (horizon, denoise steps, prompt length, state input, delta actions, joint
    conversion, robot action dims): the spec's explicit settings, its named config and what the checkpoint
    records, over the defaults of `base` (a model's config; default: the spec's preset) (pi_policy.policy_config)."""
    recorded = find_checkpoint(spec.checkpoint).recorded() if spec.checkpoint else None
    if recorded is not None and recorded.problems:
        raise ValueError(f"checkpoint {spec.checkpoint}: " + "; ".join(recorded.problems))
    return resolve_policy(base or get_config(spec.preset), spec.policy_config, recorded, spec.policy_overrides())


def settle(choice: StageChoice, built: Implementation) -> StageChoice:
    """The planned choice as built: the PyTorch stage with the reason when the backend could not run; its own note
    (what the user should know about it) kept otherwise."""
    if built.impl != choice.impl:
        return fall_back(choice, built.note or "not available here")
    return dataclasses.replace(choice, note="; ".join(n for n in (choice.note, built.note) if n))
