"""The persistent action expert: its task list (order, counters, no deadlock with any number of programs), each of
its task kinds against the PyTorch layers, and the whole denoise against the model's, under Triton's interpreter."""

import argparse
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from interpreted_kernels import few_programs  # noqa: F401 - first: sets up Triton's interpreter
from test_expert_kernels import cosine, expert_model, prefix, rel

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.model import PiModel, get_config, init_random
from pi_policy.model.layers import attention
from pi_policy.model.pi0 import euler_times, time_embedding
from pi_policy.node.params import params_from_dict
from pi_policy.runtime import build_runner
from pi_policy.runtime.expert import megakernel
from pi_policy.runtime.expert import tasks as tasks_module
from pi_policy.runtime.expert.fused import FusedExpert, dequantize
from pi_policy.runtime.expert.persistent import PersistentExpert, Tasks
from pi_policy.runtime.expert.tasks import (
    KINDS,
    LAYER_KINDS,
    NO_WAIT,
    Geometry,
    TaskList,
    build_tasks,
    check_order,
    plan_for,
    stages,
    task_list,
)
from pi_policy.runtime.options import kept_cells
from pi_policy.runtime.spec import RunnerSpec, SpecError
from pi_policy.tools.cli import main
from pi_policy.tools.flags import add_model_arguments, spec_from_args
from pi_policy.tools.synthetic import synthetic_observation

# Large tiles: the interpreter's cost is per task. SPLIT: small K chunks and enough programs that every GEMM is
# split over K into several ranges of several chunks each.
BIG = dict(attn=dict(bm=256, bn=128, chunk=128, bs=64, tokens=64), qkv=(128, 64), wo=(64, 128), gate_up=(64, 64),
           down=(64, 128), time_out=(64, 64), out=(256, 64))
SPLIT = dict(BIG, qkv=(64, 16), wo=(32, 16), down=(32, 16), time_out=(32, 16), gate_up=(64, 16))


# -- the task list ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, batch", [("pi0", 1), ("pi05", 16), ("tiny", 3)])
def test_the_task_list_is_a_topological_order_of_every_stage(preset, batch):
    cfg = get_config(preset)
    g = Geometry.of(cfg, batch, cfg.prefix_len)
    p = plan_for(g, 132)
    tasks = build_tasks(g, p)
    per_step = (1 if cfg.pi05 else 2) + 6 * cfg.expert.depth + 1
    assert len(tasks.sizes) == per_step * cfg.num_steps
    assert len(tasks) == sum(s.size for s in tasks.stages) == sum(tasks.sizes)
    assert [r[6] for r in tasks.rows[: tasks.sizes[0]]] == [NO_WAIT] * tasks.sizes[0]
    kinds = [KINDS[r[0]] for r in tasks.rows]
    assert kinds[0] == "action_in" and kinds[-1] == "out"
    # every (row tile, column tile, K range) of a GEMM stage exactly once
    qkv = [r[3:6] for r in tasks.rows if KINDS[r[0]] == "qkv" and r[1] == 0 and r[2] == 0]
    assert len(set(qkv)) == len(qkv) == tasks.stages[2 if not cfg.pi05 else 1].size


def test_check_order_refuses_a_list_that_could_deadlock():
    g = Geometry.of(get_config("tiny"), 1, get_config("tiny").prefix_len, steps=1)
    tasks = build_tasks(g, plan_for(g, 4, BIG))
    swapped = tasks.rows[tasks.sizes[0]:tasks.sizes[0] + 1] + tasks.rows[:tasks.sizes[0]] + \
        tasks.rows[tasks.sizes[0] + 1:]
    with pytest.raises(ValueError, match="could deadlock"):
        check_order(TaskList(swapped, tasks.sizes, tasks.stages))
    with pytest.raises(ValueError, match="target differs"):
        check_order(TaskList(tasks.rows, [tasks.sizes[0] + 1, *tasks.sizes[1:]], tasks.stages))


def simulate(rows, sizes, programs: int, rng: random.Random) -> bool:
    """The kernel's protocol, its programs interleaved at random: take a ticket; wait for the stage before; take
    the next ticket; compute and release; go on with the next ticket. True when every task finished, False when
    the live programs all wait forever."""
    n, ticket, counters, finished = len(rows), 0, [0] * len(sizes), 0
    progs = [{"phase": "claim"} for _ in range(programs)]

    def can_step(pr) -> bool:
        if pr["phase"] != "wait":
            return True
        wait = rows[pr["task"]][6]
        return wait == NO_WAIT or counters[wait] >= sizes[wait]

    while any(pr["phase"] != "exit" for pr in progs):
        ready = [pr for pr in progs if pr["phase"] != "exit" and can_step(pr)]
        if not ready:
            return False
        pr = rng.choice(ready)
        if pr["phase"] == "claim":
            pr["task"], ticket = ticket, ticket + 1
            pr["phase"] = "wait" if pr["task"] < n else "exit"
        elif pr["phase"] == "wait":
            pr["next"], ticket = ticket, ticket + 1
            pr["phase"] = "compute"
        else:
            counters[rows[pr["task"]][7]] += 1
            finished += 1
            pr["task"] = pr["next"]
            pr["phase"] = "wait" if pr["task"] < n else "exit"
    return finished == n and counters == list(sizes) and ticket == n + programs


@pytest.mark.parametrize("programs", [1, 2, 3, 7, 64])
def test_any_number_of_programs_finishes_the_task_list(programs):
    cfg = get_config("tiny05")
    g = Geometry.of(cfg, 2, cfg.prefix_len, steps=2)
    tasks = build_tasks(g, plan_for(g, programs, SPLIT))
    assert programs < len(tasks)
    rng = random.Random(programs)
    for _ in range(20):
        assert simulate(tasks.rows, tasks.sizes, programs, rng)


def test_the_simulation_finds_the_deadlock_of_a_list_out_of_order():
    # a consumer ahead of its producer: one program waits for itself forever
    rows = [(0, 0, 0, 0, 0, 0, 1, 0), (0, 0, 0, 0, 0, 0, NO_WAIT, 1)]
    assert not simulate(rows, [1, 1], 1, random.Random(0))
    ok = [(0, 0, 0, 0, 0, 0, NO_WAIT, 0), (0, 0, 0, 0, 0, 0, 0, 1)]
    assert simulate(ok, [1, 1], 1, random.Random(0))


# -- each task kind against the PyTorch layers ----------------------------------------------------------------------
def run_stages(pe: PersistentExpert, cache, pad, state, xt, kinds, layer: int = 0, step: int = 0, steps: int = 2):
    """Run only the stages of these kinds at (layer, step) (the action input and output: at step), in order, on the
    expert's work buffers as they are; returns the buffers."""
    g, plan, work = pe.work(pad.shape[0], pad.shape[1], steps)
    chosen = [s for s in stages(g, plan) if s.kind in kinds and s.step == step
              and (s.kind not in LAYER_KINDS or s.layer == layer)]
    pe.run(work, g, plan, pe.inputs(cache, pad, state, xt, steps), Tasks.of(task_list(chosen), pe.device))
    return work.buffers


def step_cond(model, step: int, steps: int = 2):
    t = torch.full((1,), euler_times(steps)[1][step])
    emb = time_embedding(t, model.cfg.expert.width)
    return (F.silu(model.time_out(F.silu(model.time_in(emb)))) if model.cfg.pi05 else None), emb


@pytest.mark.parametrize("preset", ["tiny", "tiny05"])
@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_every_task_kind_matches_the_pytorch_layer(preset, batch):
    model = expert_model(preset)
    cfg, e = model.cfg, model.cfg.expert
    cache, pad, state, noise = prefix(model, batch=batch)
    pe = PersistentExpert(model, programs=2, tiles=SPLIT)
    s, hz, layer, step = cfg.suffix_len, cfg.horizon, 1, 1
    blk = model.expert.layers[layer]
    cond, emb = step_cond(model, step)
    gen = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, s, e.width, generator=gen)
    buf = pe.work(batch, pad.shape[1], 2)[2].buffers
    xt = noise.clone()

    # action input (pi0: with its time MLP): the suffix tokens from x_t
    run_stages(pe, cache, pad, state, xt, ("action_in", "time_out"), step=step)
    tokens = model.action_in(noise)
    if not cfg.pi05:
        at = torch.cat([tokens, emb[:, None].expand_as(tokens)], dim=-1)
        tokens = torch.cat([model.state_proj(state)[:, None], model.action_time_out(F.silu(model.action_time_in(at)))],
                           dim=1)
    assert rel(buf["x"].view(batch, s, -1), tokens) < 1e-2 and cosine(buf["x"], tokens) > 0.9999

    # qkv -> attention -> combine: the attention block's output, accumulators cleared for the next layer
    buf["x"].copy_(x.view(batch * s, -1))
    run_stages(pe, cache, pad, state, xt, ("qkv", "attn", "combine"), layer=layer, step=step)
    mask, cos, sin = model.suffix_attention(pad)
    q, k, v, _ = blk.qkv(x, cos, sin, cond)
    ref = attention(q, torch.cat([cache[0][layer], k], 2), torch.cat([cache[1][layer], v], 2), mask)
    ref = ref.transpose(1, 2).reshape(batch * s, -1)
    assert rel(buf["attn"], ref) < 1e-2 and cosine(buf["attn"], ref) > 0.9999
    assert not buf["qkv"].any() and not buf["ss"].any()

    # wo into the residual (pi0.5: gated)
    attn = torch.randn(batch, s, e.num_heads * e.head_dim, generator=gen)
    buf["attn"].copy_(attn.view(batch * s, -1))
    buf["x"].copy_(x.view(batch * s, -1))
    run_stages(pe, cache, pad, state, xt, ("wo",), layer=layer, step=step)
    gate = blk.attn_norm(x, cond)[1]
    ref = blk.wo(attn.bfloat16().float()) * (1 if gate is None else gate)  # the update; weights bf16 here
    assert rel(buf["x"].view(batch, s, -1) - x, ref) < 1e-2 and cosine(buf["x"].view(batch, s, -1) - x, ref) > 0.9999

    # norm + gate/up + GeGLU
    buf["x"].copy_(x.view(batch * s, -1))
    run_stages(pe, cache, pad, state, xt, ("gate_up",), layer=layer, step=step)
    normed, _ = blk.mlp_norm(x, cond)
    g_, u_ = blk.mlp.gate_up(normed).chunk(2, dim=-1)
    ref = (F.gelu(g_, approximate="tanh") * u_).view(batch * s, -1)
    assert rel(buf["h"], ref) < 1e-2 and cosine(buf["h"], ref) > 0.9999

    # down into the residual
    h = torch.randn(batch, s, e.mlp_dim, generator=gen)
    buf["h"].copy_(h.view(batch * s, -1))
    buf["x"].copy_(x.view(batch * s, -1))
    run_stages(pe, cache, pad, state, xt, ("down",), layer=layer, step=step)
    gate = blk.mlp_norm(x, cond)[1]
    ref = blk.mlp.down(h.bfloat16().float()) * (1 if gate is None else gate)
    assert rel(buf["x"].view(batch, s, -1) - x, ref) < 1e-2 and cosine(buf["x"].view(batch, s, -1) - x, ref) > 0.9999

    # final norm + action projection + Euler update
    buf["x"].copy_(x.view(batch * s, -1))
    xt = noise.clone()
    run_stages(pe, cache, pad, state, xt, ("out",), step=step)
    normed, _ = model.expert.norm(x, cond)
    ref = noise + euler_times(2)[0] * model.action_out(normed[:, -hz:])
    assert rel(xt, ref) < 1e-3


# -- the whole denoise ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("preset, batch, programs", [("tiny", 1, 1), ("tiny", 3, 3), ("tiny05", 1, 2),
                                                     ("tiny05", 3, 1)])
def test_the_persistent_denoise_matches_the_model(preset, batch, programs):
    model = expert_model(preset)
    cache, pad, state, noise = prefix(model, (0, 16) if batch > 1 else (16, 32), batch=batch)
    with torch.no_grad():
        ref = model.denoise(cache, pad, state, noise)
    pe = PersistentExpert(model, programs=programs, tiles=BIG)
    got = pe.denoise(cache, pad, state, noise)
    assert rel(got, ref) < 5e-3 and cosine(got, ref) > 0.9999
    g, plan, work = pe.work(batch, pad.shape[1], model.cfg.num_steps)
    assert programs < len(work.tasks)  # fewer programs than tasks
    # every stage counted all its tasks; every program took one ticket past the end and stopped
    assert work.tasks.control[:-1].tolist() == work.tasks.sizes.tolist()
    assert int(work.tasks.control[-1]) == len(work.tasks) + programs
    if programs == 2:  # the buffers are left ready for the next call
        assert torch.equal(pe.denoise(cache, pad, state, noise), got)


def test_fp8_weights_run_the_same_math_as_the_fused_fp8_expert():
    model = expert_model("tiny05")
    cache, pad, state, noise = prefix(model)
    pe = PersistentExpert(model, "fp8", programs=2, tiles=BIG)
    assert pe.fused.stacked["down"].w.dtype == torch.float8_e4m3fn
    got = pe.denoise(cache, pad, state, noise)
    fused = FusedExpert(model, "fp8").denoise(cache, pad, state, noise)
    with torch.no_grad():
        exact = model.denoise(cache, pad, state, noise)
    assert rel(got, fused) < 1e-3 and 0 < rel(got, exact) < 0.05
    st = pe.fused.stacked["wo"]
    assert torch.equal(dequantize(st.w[1], st.scale[1]), dequantize(*pe.fused.layers[1]["wo"]))


# -- as a denoise backend ---------------------------------------------------------------------------------------------
def two_step_model() -> PiModel:
    return init_random(PiModel(get_config("tiny", num_steps=2)), 0).eval()


def infer(runner):
    obs = synthetic_observation(DEFAULT_CAMERAS[:2], 56, seed=1)  # one camera missing: a hole in the prefix keys
    return runner.infer(obs, noise=np.random.default_rng(0).standard_normal((50, 32)).astype(np.float32))


@pytest.fixture
def big_tiles(monkeypatch):
    monkeypatch.setattr(tasks_module, "TILES", tasks_module.TILES | BIG)


def test_the_runner_runs_the_persistent_expert_and_says_so(big_tiles):
    model = two_step_model()
    runner = build_runner(model=model, denoise="persistent", progress=False, warmup=False)
    runner.warmup(iters=1, progress=False)
    out = infer(runner)
    assert out.latency.backends["denoise"] == "persistent-eager" and runner.backend_note == ""
    ref = infer(build_runner(model=model, denoise="bf16", progress=False))
    assert float(np.linalg.norm(out.actions - ref.actions) / np.linalg.norm(ref.actions)) < 5e-3


def test_a_persistent_expert_that_fails_falls_back_visibly(monkeypatch, big_tiles):
    def broken(*args, **kwargs):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(megakernel, "launch", broken)
    runner = build_runner(model=two_step_model(), denoise="persistent-fp8", progress=False, warmup=False)
    assert runner.backends["denoise"] == "persistent-fp8w-eager"
    runner.warmup(iters=1, progress=False)
    assert runner.backends["denoise"] == "float32-eager"
    assert "denoise persistent-fp8 unavailable (failed on its first run" in runner.backend_note
    assert "out of resources" in runner.backend_note
    assert np.isfinite(infer(runner).actions).all()


def test_without_a_gpu_the_persistent_expert_is_refused_with_a_note(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")
    runner = build_runner(preset="tiny", denoise="persistent", progress=False, warmup=False)
    assert runner.backends["denoise"] == "float32-eager"
    assert "denoise persistent unavailable (needs a CUDA GPU" in runner.backend_note
    assert main(["bench", "--preset", "tiny", "--device", "cpu", "--denoise", "persistent-fp8", "--iters", "1"]) == 0
    assert "denoise persistent-fp8 unavailable (needs a CUDA GPU" in capsys.readouterr().out


def test_fp8_with_some_layers_kept_bf16_runs_both_formats_in_one_kernel():
    model = expert_model("tiny05")
    cache, pad, state, noise = prefix(model)
    keep = ("gate_up:0", "wo")
    pe = PersistentExpert(model, "fp8", keep_bf16=keep, programs=2, tiles=BIG)
    st = pe.fused.stacked
    assert {k: s.mode for k, s in st.items()} == {"qkv": 1, "wo": 0, "gate_up": 2, "down": 1}
    assert st["gate_up"].slot.tolist() == [-1, 0] and st["gate_up"].kept.dtype == torch.bfloat16
    assert pe.fused.layers[0]["gate_up"][1] is None and pe.fused.layers[1]["gate_up"][1] is not None
    got = pe.denoise(cache, pad, state, noise)
    fused = FusedExpert(model, "fp8", keep).denoise(cache, pad, state, noise)
    assert rel(got, fused) < 1e-3
    with torch.no_grad():
        exact = model.denoise(cache, pad, state, noise)
    assert 0 < rel(got, exact) < 0.05


def test_keep_bf16_names_matrices_and_layers_or_says_what_is_wrong():
    cells = kept_cells(("down", "gate_up:0", "all:1", "wo:0,1"), 3)
    assert cells == {(i, "down") for i in range(3)} | {(0, "gate_up"), (0, "wo"), (1, "wo")} | \
        {(1, m) for m in ("qkv", "wo", "gate_up", "down")}
    for bad, why in (("ffn", "matrix is one of"), ("down:3", "below 3"), ("down:2-1", "layers are"),
                     ("wo:x", "layers are")):
        with pytest.raises(ValueError, match=why):
            kept_cells((bad,), 3)


def test_kept_bf16_cells_are_one_runner_setting_from_flags_parameters_and_the_spec(big_tiles):
    params = params_from_dict({"preset": "tiny", "device": "cpu", "joint_names": ["a"],
                               "denoise_backend": "persistent-fp8", "denoise_keep_bf16": ["gate_up:0", "down"]})
    parser = argparse.ArgumentParser()
    add_model_arguments(parser)
    args = parser.parse_args(["--preset", "tiny", "--device", "cpu", "--denoise", "persistent-fp8",
                              "--denoise-keep-bf16", "gate_up:0,down"])
    spec = spec_from_args(args)
    assert spec.denoise_keep_bf16 == ("gate_up:0", "down") == params.runner_spec().denoise_keep_bf16
    assert parser.parse_args(["--denoise-keep-bf16", "wo:0-2,5,qkv"]).denoise_keep_bf16 == ("wo:0-2,5", "qkv")
    runner = build_runner(spec.replace(warmup=False, progress=False), model=two_step_model())
    expert = runner.denoise_fn.__self__
    assert runner.backends["denoise"] == "persistent-fp8w-eager"
    assert {k: s.mode for k, s in expert.fused.stacked.items()} == {"qkv": 1, "wo": 1, "gate_up": 2, "down": 0}
    with pytest.raises(SpecError) as e:
        RunnerSpec(denoise="triton", denoise_keep_bf16=("ffn", "down:9")).validate()
    lines = str(e.value).splitlines()
    assert any("applies to the FP8 denoise backends (fp8, persistent-fp8), not triton" in x for x in lines)
    assert any("denoise_keep_bf16 entry 'ffn'" in x for x in lines)
