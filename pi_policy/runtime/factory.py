"""build_runner: preset + checkpoint (file or folder) + stats + tokenizer + device + backend -> a warmed-up runner."""

from __future__ import annotations

import logging

import torch

from pi_policy.model import PiModel, cast_for_inference, get_config, init_random
from pi_policy.model.checkpoint import load_checkpoint
from pi_policy.model.checkpoint_dir import resolve_assets
from pi_policy.model.normalize import Normalizer, default_mode
from pi_policy.model.tokenizer import load_tokenizer
from pi_policy.runtime.expert import DenoiseChoice, make_denoise
from pi_policy.runtime.options import DEFAULT_COMPILE, RTCSettings, resolve_backend, resolve_denoise
from pi_policy.runtime.prefill import make_prefill
from pi_policy.runtime.runner import PolicyRunner
from pi_policy.runtime.vision import make_vision

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but torch sees no CUDA GPU (use --device cpu)")
    return dev


def build_model(preset: str = "tiny", checkpoint: str | None = None, device: str = "cpu", seed: int = 0,
                dtype: torch.dtype | None = None, num_cameras: int | None = None) -> PiModel:
    """The model on `device`: bf16 on GPUs, float32 on CPU; random weights (fixed seed) without a checkpoint.

    num_cameras: the views this instance serves (default: the preset's 3). Weights do not depend on it; the
    prefix length, and so every buffer, graph and engine shape, does.
    """
    if num_cameras is not None and num_cameras < 1:
        raise ValueError(f"num_cameras must be >= 1, got {num_cameras}")
    cfg = get_config(preset, **({"num_cameras": num_cameras} if num_cameras else {}))
    dev = resolve_device(device)
    with torch.device(dev):
        model = PiModel(cfg)
    if checkpoint:
        load_checkpoint(model, checkpoint)
    else:
        init_random(model, seed)
    dtype = dtype or (torch.bfloat16 if dev.type == "cuda" else torch.float32)
    return cast_for_inference(model, dtype).to(dev).eval()


def build_runner(preset: str = "tiny", checkpoint: str | None = None, norm_stats: str | None = None,
                 tokenizer: str | None = None, device: str = "cpu", backend: str = "bf16",
                 camera_names: list[str] | None = None, seed: int = 0, progress: bool = True,
                 engine_path: str | None = None, action_dim: int | None = None,
                 model: PiModel | None = None, warmup: bool = True,
                 compile_stages: tuple[str, ...] | None = None, calibration=None,
                 fp8_options: dict | None = None, cuda_graphs: bool = True, prompt_format: str = "auto",
                 require_assets: bool = True, denoise: str | None = None,
                 rtc: RTCSettings | None = None, vision: str = "bf16") -> PolicyRunner:
    """A runner ready to serve. `backend` names the prefill (pi_policy.runtime.options; `eager` = bf16 without
    graphs or compilation). On CUDA, prefill and denoise are torch.compile'd by default (start-up cost,
    reported in runner.startup_ms). calibration and fp8_options (build_fp8_prefill's keyword arguments)
    configure the fp8 prefill. Statistics, tokenizer and prompt format not given are taken from beside the
    checkpoint; `require_assets=False` (latency benchmarks) runs a checkpoint without them. denoise: bf16 (the
    PyTorch expert, the default), triton or fp8 (the fused Triton expert, bf16 or FP8 weights); `rtc`
    real-time chunking (off when None; it runs on the PyTorch denoise loop). vision: bf16 (the model's tower) or
    fp8 (FP8 copies of its linears; calibration's `vision.*` scales and the shared fp8_options apply)."""
    mode = resolve_backend(backend, cuda_graphs, compile_stages)
    cfg = model.cfg if model is not None else get_config(preset)
    assets = resolve_assets(cfg, checkpoint, norm_stats, tokenizer, prompt_format, require_assets)
    model = model or build_model(preset, checkpoint, device, seed, num_cameras=len(camera_names) if camera_names
                                 else None)
    cfg = model.cfg
    kind = "pi05" if cfg.pi05 else "pi0"
    normalizer = Normalizer.from_statistics(assets.statistics, default_mode(kind), cfg.action_dim, action_dim)
    tok = load_tokenizer(assets.tokenizer, cfg.vocab_size, cfg.max_token_len, kind, assets.prompt_format,
                         assets.state_pad)
    choice = make_prefill(mode.prefill, model, engine_path=engine_path, checkpoint=checkpoint, calibration=calibration,
                          fp8_options=fp8_options)
    seen = make_vision(vision, model, calibration=calibration if isinstance(calibration, (str, dict)) else None,
                       fp8_options=fp8_options)
    compile_stages = mode.compile_stages
    if compile_stages is None:
        compile_stages = DEFAULT_COMPILE if next(model.parameters()).device.type == "cuda" else ()
    if choice.name == "tensorrt":  # the engine is already compiled; torch.compile would only graph-break on it
        compile_stages = tuple(s for s in compile_stages if s != "prefill")
    if choice.note:
        log.warning("prefill backend: %s", choice.note)
    if seen.note:
        log.warning("vision backend: %s", seen.note)
    on_gpu = next(model.parameters()).device.type == "cuda"
    fused = make_denoise(resolve_denoise(denoise, on_gpu, rtc.mode if rtc is not None else "off"), model)
    if fused.fn is not None and rtc is not None and rtc.mode != "off":  # RTC steers the PyTorch loop
        fused = DenoiseChoice(None, "bf16", f"denoise {denoise}: real-time chunking ({rtc.mode}) runs on the PyTorch "
                                            "denoise loop; the fused expert is off")
    if fused.fn is not None:  # the fused expert replaces the compiled velocity
        compile_stages = tuple(s for s in compile_stages if s != "denoise")
    runner = PolicyRunner(model, tok, normalizer, camera_names, cuda_graphs=mode.cuda_graphs,
                          prefill=choice.fn, prefill_backend=choice.name, seed=seed,
                          compile_stages=compile_stages, denoise=fused, rtc=rtc, vision=seen.fn,
                          vision_backend=seen.name)
    runner.backend_note = "; ".join(n for n in (seen.note, choice.note, fused.note) if n)
    if warmup:
        runner.warmup(progress=progress)
        if runner.compile_note:
            runner.backend_note = "; ".join(n for n in (seen.note, choice.note, fused.note, runner.compile_note)
                                            if n)
    return runner
