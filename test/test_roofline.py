"""The roofline's counts against the model's own parameters, its floors, and `bench --roofline` on CPU."""

import torch

from pi_policy.model import PiModel, get_config
from pi_policy.runtime.roofline import THOR, roofline, stage_costs
from pi_policy.tools.cli import main


def matmul_params(modules) -> int:
    return sum(m.weight.numel() for mod in modules for m in mod.modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)))


def test_counts_match_the_model_weights():
    for preset in ("tiny", "tiny05"):
        cfg = get_config(preset)
        model = PiModel(cfg)
        c = stage_costs(cfg, act_bytes=2.0)
        kv = 2 * cfg.llm.depth * 2 * cfg.prefix_len * cfg.llm.num_kv_heads * cfg.llm.head_dim
        per_step = c["denoise"].bytes / cfg.num_steps - kv
        expert = [model.expert.layers, model.expert.norm, model.action_in, model.action_out]
        expert += [model.time_in, model.time_out] if cfg.pi05 else [model.state_proj, model.action_time_in,
                                                                    model.action_time_out]
        assert per_step == 2 * matmul_params(expert)
        vision_weights = matmul_params([model.vision, model.projector])
        assert c["vision"].bytes >= 2 * vision_weights
        half = stage_costs(cfg, denoise_weight_bytes=1.0)["denoise"].bytes / cfg.num_steps - kv
        assert half == per_step / 2


def test_floor_is_the_larger_of_compute_and_memory_and_thor_is_a_projection():
    cfg = get_config("pi0")
    peaks = {"bf16_tflops": 500.0, "bandwidth_gbs": 2000.0}
    rows = {r["stage"]: r for r in roofline(cfg, {"denoise": 10.0, "prefill": 6.0}, peaks)}
    d = rows["denoise"]
    assert d["bound"] == "memory" and abs(d["floor_ms"] - d["mbytes"] * 1e6 / 2e12 * 1e3) < 1e-9
    assert abs(d["achieved"] - d["floor_ms"] / 10.0) < 1e-12
    assert abs(d["thor_projected_ms"] - d["thor_floor_ms"] / d["achieved"]) < 1e-9
    assert d["thor_floor_ms"] > d["floor_ms"] * 2000 / THOR["bandwidth_gbs"] * 0.99
    assert rows["vision"]["measured_ms"] is None and rows["vision"]["thor_projected_ms"] is None


def test_bench_roofline_on_cpu_needs_given_peaks(tmp_path, capsys):
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "2", "--roofline"]) == 2
    assert "--peak-tflops" in capsys.readouterr().err
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--iters", "2", "--roofline", "--peak-tflops", "1",
                 "--peak-gbs", "50", "--cameras", "2"]) == 0
    out = capsys.readouterr().out
    assert "PROJECTION" in out and "| denoise |" in out and "2 cameras" in out
