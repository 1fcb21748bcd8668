"""The persistent action expert: the whole denoise loop as one kernel launch, a drop-in for PiModel.denoise.

Weights are packed once by FusedExpert (bf16, or FP8 with per-output-channel scales; matrices named in
`keep_bf16` stay bf16) and shared with it; the time-only tables come from its step schedule. What the
persistent kernel adds: pi0's action input folded into the first layer of its action-time MLP (one (width,
action_dim) matrix and a per-step bias), work buffers per batch size, and a task list per (batch, prefix
length, steps) with its tile plan (tasks.plan_for). One call zeroes the stage counters and launches
`programs` programs (default: one per SM); on a CPU it runs under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pi_policy.model.pi0 import KVCache, PiModel, euler_times
from pi_policy.runtime.expert import megakernel
from pi_policy.runtime.expert.fused import FusedExpert, Stack
from pi_policy.runtime.expert.tasks import KINDS, Geometry, Plan, TaskList, build_tasks, plan_for


@dataclass
class Tasks:
    """A task list as the kernel reads it."""

    rows: Tensor  # (tasks, 8) int32, tasks.FIELDS
    sizes: Tensor  # (stages,) int32: each counter's target
    control: Tensor  # (stages + 1,) int32: the stage counters, then the ticket; zeroed per launch
    kinds: int  # bit k set: a task of kind KINDS[k] occurs (the kernel is compiled with those branches only)

    @classmethod
    def of(cls, tasks: TaskList, device: torch.device) -> Tasks:
        return cls(torch.tensor(tasks.rows, dtype=torch.int32, device=device),
                   torch.tensor(tasks.sizes, dtype=torch.int32, device=device),
                   torch.zeros(len(tasks.sizes) + 1, dtype=torch.int32, device=device),
                   sum(1 << KINDS.index(k) for k in {s.kind for s in tasks.stages}))

    def __len__(self) -> int:
        return self.rows.shape[0]


@dataclass
class Work:
    """Everything one launch reads and writes besides weights and inputs, for one batch size."""

    tasks: Tasks
    buffers: dict[str, Tensor]


def default_programs(device: torch.device) -> int:
    """One program per SM on a GPU; one under the CPU interpreter, which runs programs one after another anyway."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


class PersistentExpert:
    """PiModel.denoise as one persistent Triton kernel; `weights` "bf16" or "fp8" (W8A16, matrices in keep_bf16
    left bf16), `programs` how many run (default_programs), `tiles` overrides of tasks.TILES."""

    def __init__(self, model: PiModel, weights: str = "bf16", keep_bf16: tuple[str, ...] = (),
                 programs: int | None = None, tiles: dict | None = None):
        self.fused = FusedExpert(model, weights, keep_bf16)
        self.model, self.cfg = model, model.cfg
        self.device = next(model.parameters()).device
        self.programs = programs or default_programs(self.device)
        self.tiles = tiles
        if self.programs < 1:
            raise ValueError(f"the persistent expert needs at least one program, got {self.programs}")
        we = self.cfg.expert.width
        with torch.no_grad():
            w_in, b_in = model.action_in.weight.float(), model.action_in.bias.float()
            self.w_to = self.b_to = None  # pi0's action-time MLP output layer
            if self.cfg.pi05:
                self.w_in, self.b_in = w_in.contiguous(), b_in
            else:  # action_time_in(cat(action_in(x), t)) = x (Wt W_in)^T + Wt b_in + (time half, per step)
                wt = model.action_time_in.weight[:, :we].float()
                self.w_in, self.b_in = (wt @ w_in).contiguous(), wt @ b_in
                self.w_to = model.action_time_out.weight.to(torch.bfloat16).contiguous()
                self.b_to = model.action_time_out.bias.float().contiguous()
        self._in_bias: dict[int, Tensor] = {}
        self._work: dict[tuple[int, int, int], tuple[Geometry, Plan, Work]] = {}
        self.in_bias(self.cfg.num_steps)

    def in_bias(self, n: int) -> Tensor:
        """(n, width) bias of the action input per step: pi0.5's action_in bias; pi0's folded time MLP input."""
        if n not in self._in_bias:
            if self.cfg.pi05:
                bias = self.b_in.expand(n, -1)
            else:
                bias = self.b_in + self.fused.schedule(n)["time_bias"].float()
            self._in_bias[n] = bias.contiguous()
        return self._in_bias[n]

    def plan(self, batch: int, prefix: int, steps: int | None = None) -> tuple[Geometry, Plan, TaskList]:
        """The geometry, tile plan and task list for this batch and prefix length (not cached)."""
        g = Geometry.of(self.cfg, batch, prefix, steps)
        p = plan_for(g, self.programs, self.tiles)
        return g, p, build_tasks(g, p)

    def work(self, batch: int, prefix: int, steps: int) -> tuple[Geometry, Plan, Work]:
        key = (batch, prefix, steps)
        if key not in self._work:
            g, p, tasks = self.plan(batch, prefix, steps)
            self._work[key] = (g, p, self._allocate(g, p, tasks))
        return self._work[key]

    def _allocate(self, g: Geometry, p: Plan, tasks: TaskList) -> Work:
        dev, f32, bf16 = self.device, torch.float32, torch.bfloat16
        m, ns = g.rows, p.attn.splits(g)
        buffers = {"x": torch.empty(m, g.width, device=dev, dtype=f32),
                   "u": torch.empty(g.action_rows if not g.pi05 else 1, g.width, device=dev, dtype=bf16),
                   "qkv": torch.zeros(m, g.qkv_cols, device=dev, dtype=f32),  # the combine clears it after use
                   "ss": torch.zeros(m, device=dev, dtype=f32),
                   "o": torch.empty(ns, m * g.heads, g.head_dim, device=dev, dtype=f32),
                   "lse": torch.empty(ns, m * g.heads, device=dev, dtype=f32),
                   "attn": torch.empty(m, g.q_cols, device=dev, dtype=bf16),
                   "h": torch.empty(m, g.mlp, device=dev, dtype=bf16)}
        return Work(Tasks.of(tasks, dev), buffers)

    @torch.no_grad()
    def denoise(self, cache: KVCache, prefix_pad: Tensor, state: Tensor, noise: Tensor,
                num_steps: int | None = None) -> Tensor:
        """PiModel.denoise in one launch: Euler from t=1 (noise) to t=0; returns float32 (B, H, A)."""
        n = num_steps or self.cfg.num_steps
        b, p = prefix_pad.shape
        g, plan, work = self.work(b, p, n)
        xt = noise.float().contiguous().clone()
        self.run(work, g, plan, self.inputs(cache, prefix_pad, state, xt, n))
        return xt

    def inputs(self, cache: KVCache, prefix_pad: Tensor, state: Tensor, xt: Tensor, n: int) -> dict[str, Tensor]:
        """The kernel's per-call arguments: x_t (updated in place), the cache and the step tables."""
        kc, vc = cache
        if kc.stride(-1) != 1 or vc.stride() != kc.stride():
            raise ValueError("the KV cache's keys and values must share strides, head_dim contiguous")
        state_tok, pad, cos, sin = self.fused._context(prefix_pad, state)
        tab = self.fused.schedule(n)
        ad = self.cfg.pi05
        dummy = xt
        return {"xt_ptr": xt, "state_ptr": dummy if state_tok is None else state_tok.float().contiguous(),
                "kc_ptr": kc, "vc_ptr": vc, "pad_ptr": pad, "cos_ptr": cos.contiguous(), "sin_ptr": sin.contiguous(),
                "stride_kl": kc.stride(0), "stride_kb": kc.stride(1), "stride_kh": kc.stride(2),
                "stride_kp": kc.stride(3), "stride_pad": pad.stride(0),
                "in_bias": self.in_bias(n), "out_bias": tab["bias_out"] if ad else self.fused.out_b,
                "out_bias_step": self.cfg.action_dim if ad else 0, "dt": euler_times(n)[0],
                **{k: tab[k] if ad else dummy for k in ("mod_attn", "bias_qkv", "gate_attn", "mod_mlp", "bias_gu",
                                                        "gate_mlp", "mod_out")}}

    def run(self, work: Work, g: Geometry, plan: Plan, inputs: dict[str, Tensor], tasks: Tasks | None = None) -> None:
        """One launch over the work's task list (or `tasks`, another list for the same geometry)."""
        tasks = tasks or work.tasks
        tasks.control.zero_()
        try:
            megakernel.launch(self.arguments(work, g, plan, inputs, tasks), plan.programs)
        except BaseException:
            work.buffers["qkv"].zero_()  # a launch that stopped part-way may leave partial sums behind
            work.buffers["ss"].zero_()
            raise

    def arguments(self, work: Work, g: Geometry, plan: Plan, inputs: dict[str, Tensor], tasks: Tasks) -> dict:
        """The kernel's arguments (megakernel.arguments) for one launch."""
        n = tasks.sizes.shape[0]
        f, st = self.fused, self.fused.stacked
        buf = work.buffers
        args = {"tasks": tasks.rows, "counters": tasks.control, "sizes": tasks.sizes, "ticket": tasks.control[n:],
                **inputs,
                **{arg: t for name, short in (("qkv", "qkv"), ("wo", "wo"), ("gate_up", "gu"), ("down", "dn"))
                   for arg, t in _stack_args(short, st[name], tasks.rows).items()},
                "w_in": self.w_in, "w_out": f.out_w, "eps": self.cfg.expert.eps,
                "w_to": self.w_in if self.w_to is None else self.w_to,
                "b_to": self.b_in if self.b_to is None else self.b_to,
                **{f"{k}_ptr": v for k, v in buf.items()}}
        return megakernel.arguments(args, g, plan, len(tasks), tasks.kinds, {k: s.mode for k, s in st.items()})


def _stack_args(short: str, s: Stack, dummy: Tensor) -> dict[str, Tensor]:
    """A matrix kind's kernel arguments: weights, scales, kept bf16 layers, slots (pointers never read in modes
    that do not use them point at something harmless of the right kind)."""
    return {f"w_{short}": s.w, f"s_{short}": s.scale if s.scale is not None else s.w,
            f"k_{short}": s.kept if s.kept is not None else s.w,
            f"slot_{short}": s.slot if s.slot is not None else dummy}
