"""Compile the persistent expert's kernel for GPUs without one: registers, local-memory spills and shared memory.

Triton compiles to a cubin for any target on a plain machine (its bundled ptxas); cuobjdump, bundled too, reads
the resource use. This checks that the kernel builds for the H200 (sm_90) and Jetson Thor (sm_110) at a preset's
full shapes and batch, and shows which task kind needs the registers (`--per-kind`: the kernel compiled with
only that kind's branch). It times nothing.

Usage: python scripts/persistent_compile.py OUT.json [--preset pi0] [--batch 1] [--arch 90,110] [--weights bf16]
       [--keep-bf16 gate_up,down:0-5] [--warps 8] [--per-kind] [--tiles '{"attn": {"bm": 16, ...}}']
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pi_policy.model import PiModel, get_config, init_random  # noqa: E402
from pi_policy.runtime.expert import megakernel  # noqa: E402
from pi_policy.runtime.expert.persistent import PersistentExpert  # noqa: E402
from pi_policy.runtime.expert.tasks import KINDS  # noqa: E402
from pi_policy.tools.flags import parse_keep_bf16  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int32: "i32", torch.int8: "i8",
          torch.float8_e4m3fn: "fp8e4nv"}
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def expert_only_model(preset: str, weights_seed: int = 0) -> PiModel:
    """The preset's action expert at full size on CPU (its vision tower and LLM shrunk: the kernel never sees them)."""
    full = get_config(preset)
    small = dataclasses.replace(full, vision=get_config("tiny").vision,
                                llm=dataclasses.replace(full.llm, width=64, mlp_dim=128), vocab_size=512)
    return init_random(PiModel(small), weights_seed).eval()


def kernel_arguments(pe: PersistentExpert, batch: int) -> dict:
    cfg = pe.cfg
    p, e = cfg.prefix_len, cfg.expert
    kv = torch.zeros(e.depth, batch, e.num_kv_heads, p, e.head_dim)
    pad = torch.ones(batch, p, dtype=torch.bool)
    g, plan, work = pe.work(batch, p, cfg.num_steps)
    xt = torch.zeros(batch, cfg.horizon, cfg.action_dim)
    inputs = pe.inputs((kv, kv), pad, torch.zeros(batch, cfg.action_dim), xt, cfg.num_steps)
    return pe.arguments(work, g, plan, inputs, work.tasks)


def compile_for(kwargs: dict, arch: int) -> dict:
    fn = megakernel._persistent_expert
    names = list(inspect.signature(fn.fn).parameters)
    constexpr = {p.name for p in fn.params if p.is_constexpr}
    sig, consts = {}, {}
    for n in names:
        v = kwargs[n]
        if n in constexpr:
            sig[n], consts[n] = "constexpr", v
        elif isinstance(v, torch.Tensor):
            sig[n] = "*" + DTYPES[v.dtype]
        else:
            sig[n] = "fp32" if isinstance(v, float) else "i32"
    t0 = time.perf_counter()
    c = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options={"num_warps": kwargs["num_warps"], "num_stages": kwargs["num_stages"]})
    seconds = time.perf_counter() - t0
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(c.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(TOOLS / "cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True, check=True).stdout
    fields = dict(re.findall(r"(REG|STACK|LOCAL):(\d+)", usage))
    return {"arch": f"sm_{arch}", "registers": int(fields["REG"]), "stack_bytes": int(fields["STACK"]),
            "local_bytes": int(fields["LOCAL"]), "shared_bytes": c.metadata.shared, "compile_s": round(seconds, 1),
            "warps": kwargs["num_warps"]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("out", type=Path)
    p.add_argument("--preset", default="pi0")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--arch", default="90,110", help="compute capabilities, e.g. 90 (H100/H200), 110 (Thor)")
    p.add_argument("--weights", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--keep-bf16", default="", help="FP8: cells kept bf16 (denoise_keep_bf16 syntax)")
    p.add_argument("--warps", type=int, default=0, help="override the plan's warps per program")
    p.add_argument("--programs", type=int, default=132, help="programs the plan is made for (the H200's SMs)")
    p.add_argument("--tiles", default="{}", help="JSON overrides of tasks.TILES")
    p.add_argument("--per-kind", action="store_true", help="also each task kind's branch alone")
    args = p.parse_args()
    os.environ.pop("TRITON_INTERPRET", None)
    pe = PersistentExpert(expert_only_model(args.preset), args.weights, parse_keep_bf16(args.keep_bf16),
                          programs=args.programs, tiles=json.loads(args.tiles))
    kwargs = kernel_arguments(pe, args.batch)
    if args.warps:
        kwargs["num_warps"] = args.warps
    plan = pe.work(args.batch, pe.cfg.prefix_len, pe.cfg.num_steps)[1]
    result = {"preset": args.preset, "batch": args.batch, "weights": args.weights, "keep_bf16": args.keep_bf16,
              "plan": dataclasses.asdict(plan),
              "triton": triton.__version__, "tasks": kwargs["n_tasks"], "builds": []}
    all_kinds = kwargs["KINDS_ON"]
    for arch in (int(a) for a in args.arch.split(",")):
        variants = [("all", all_kinds)]
        if args.per_kind:
            variants += [(k, 1 << i) for i, k in enumerate(KINDS) if all_kinds >> i & 1]
        for name, mask in variants:
            row = {"kinds": name} | compile_for(kwargs | {"KINDS_ON": mask}, arch)
            print(json.dumps(row), flush=True)
            result["builds"].append(row)
            args.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
