"""The persistent expert's work: tiles chosen per row count, and the task list its programs work through.

The denoise loop becomes a sequence of stages (per step: the action input; per layer: qkv, attention, combine,
wo, gate/up, down; then the action output with the Euler update), each cut into tasks (one weight tile, one
attention split, ...). Tasks are numbered in stage order, which is a topological order: every task of a stage
waits only for the stage before it to finish (a counter in global memory reaching the stage's task count).
Programs take task numbers from one atomic ticket, so a task is only ever waited for after it was taken by a
program that is running, and the task with the lowest number not yet finished always has everything it waits
for: the list completes with any number of programs >= 1, also when programs run one after another (Triton's
interpreter). This module is plain Python; the kernel is in megakernel.py.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace

KINDS = ("action_in", "time_out", "qkv", "attn", "combine", "wo", "gate_up", "down", "out")
LAYER_KINDS = ("qkv", "attn", "combine", "wo", "gate_up", "down")
FIELDS = ("kind", "step", "layer", "a", "b", "c", "wait", "done")  # one int32 row per task
NO_WAIT = -1


@dataclass(frozen=True)
class Geometry:
    """Shapes of one denoise: the model's expert, the batch and the prefix it attends to."""

    batch: int
    suffix: int  # tokens per batch entry: the actions (and pi0's state token)
    horizon: int
    action_dim: int
    width: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp: int
    layers: int
    prefix: int
    steps: int
    pi05: bool

    @classmethod
    def of(cls, cfg, batch: int, prefix: int, steps: int | None = None) -> Geometry:
        e = cfg.expert
        return cls(batch, cfg.suffix_len, cfg.horizon, cfg.action_dim, e.width, e.num_heads, e.num_kv_heads,
                   e.head_dim, e.mlp_dim, e.depth, prefix, steps or cfg.num_steps, cfg.pi05)

    @property
    def rows(self) -> int:  # M: the residual stream's rows
        return self.batch * self.suffix

    @property
    def action_rows(self) -> int:
        return self.batch * self.horizon

    @property
    def q_cols(self) -> int:
        return self.heads * self.head_dim

    @property
    def qkv_cols(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim


@dataclass(frozen=True)
class Gemm:
    """A GEMM stage's tiles: bn output columns, K in chunks of bk, split over K into `split` ranges."""

    bn: int
    bk: int
    split: int = 1

    def k_per_split(self, k: int) -> int:
        return cdiv(cdiv(k, self.split), self.bk) * self.bk  # a multiple of bk, so ranges never overlap

    def splits(self, k: int) -> int:
        return cdiv(k, self.k_per_split(k))


@dataclass(frozen=True)
class Attn:
    """Attention tiles: bm query rows (token x head), bn prefix keys per inner step, chunk prefix keys per split,
    bs suffix keys per split; `tokens` per combine task."""

    bm: int
    bn: int
    chunk: int
    bs: int
    tokens: int = 1

    def prefix_splits(self, prefix: int) -> int:
        return cdiv(prefix, self.chunk)

    def splits(self, g: Geometry) -> int:
        return self.prefix_splits(g.prefix) + cdiv(g.suffix, self.bs)


@dataclass(frozen=True)
class Plan:
    """Every tile of the persistent kernel for one row count, and how many programs run it."""

    programs: int
    bm: int  # rows per GEMM tile
    qkv: Gemm
    wo: Gemm
    gate_up: Gemm  # never split: GeGLU needs whole sums
    down: Gemm
    action_in: Gemm  # K = action_dim: one chunk
    time_out: Gemm  # pi0's action-time MLP output layer, never split (it stores)
    attn: Attn
    out_bm: int  # action rows per output task
    out_bk: int
    warps: int = 8  # per program: the attention's head_dim 256 tiles need the registers (scripts/persistent_compile.py)
    stages: int = 2


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, lo: int = 16) -> int:
    p = lo
    while p < n:
        p *= 2
    return p


# Starting points for the tiles (bn, bk per GEMM stage; attention's query rows, keys per step and per split), not
# yet timed on a GPU: the largest that compile for sm_90 at 8 warps without spilling registers to local memory
# (scripts/persistent_compile.py; 128-wide K chunks of the float32 residual spill). scripts/persistent_bench.py
# --sweep times alternatives.
TILES = {"qkv": (64, 64), "wo": (64, 64), "gate_up": (32, 64), "down": (64, 64), "time_out": (64, 64),
         "action_in": 64, "out": (16, 128), "attn": dict(bm=32, bn=16, chunk=128, bs=16, tokens=1), "warps": 8}


def plan_for(g: Geometry, programs: int, tiles: dict | None = None) -> Plan:
    """Tiles for this row count M = batch x suffix: tiles of bm rows (16 to 128 as M grows, so added robots ride
    on the same weight tiles), each GEMM split over K until its stage has about one task per program (fewer
    splits as M grows: the row tiles then fill the programs), and enough tokens per combine task for one wave.
    `tiles` overrides entries of TILES."""
    t = TILES | (tiles or {})
    if programs < 1:
        raise ValueError(f"the persistent expert needs at least one program, got {programs}")
    m = g.rows
    bm = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 256 else 128
    m_tiles = cdiv(m, bm)

    def gemm(n: int, k: int, bn: int, bk: int, split: bool = True) -> Gemm:
        bn, bk = min(bn, pow2(n)), min(bk, pow2(k))
        tiles = cdiv(n, bn) * m_tiles
        want = max(1, min(round(programs / tiles), cdiv(k, bk))) if split else 1
        t = Gemm(bn, bk, want)
        return replace(t, split=t.splits(k))

    s = g.suffix
    a = t["attn"]
    bn_attn = min(a["bn"], pow2(max(g.prefix, s)))
    return Plan(
        programs=programs, bm=bm,
        qkv=gemm(g.qkv_cols, g.width, *t["qkv"]),
        wo=gemm(g.width, g.q_cols, *t["wo"]),
        gate_up=gemm(g.mlp, g.width, *t["gate_up"], split=False),
        down=gemm(g.width, g.mlp, *t["down"]),
        action_in=Gemm(min(t["action_in"], pow2(g.width)), pow2(g.action_dim)),
        time_out=gemm(g.width, g.width, *t["time_out"], split=False),
        attn=Attn(bm=min(a["bm"], pow2(s * g.heads // g.kv_heads)), bn=bn_attn,
                  chunk=max(bn_attn, a["chunk"] // bn_attn * bn_attn), bs=min(a["bs"], pow2(s)),
                  tokens=min(pow2(g.rows, 1), max(a["tokens"], pow2(cdiv(g.rows, programs), 1)))),
        out_bm=min(t["out"][0], pow2(g.action_rows)), out_bk=min(t["out"][1], pow2(g.width)),
        warps=t["warps"])


@dataclass(frozen=True)
class Stage:
    kind: str
    step: int
    layer: int
    dims: tuple[int, int, int]  # tasks along (a, b, c); a varies fastest

    @property
    def size(self) -> int:
        return self.dims[0] * self.dims[1] * self.dims[2]


def stage_dims(kind: str, g: Geometry, p: Plan) -> tuple[int, int, int]:
    """(a, b, c) task counts: GEMMs (row tile, column tile, K range); attention (query block, key split, batch x
    KV head); combine (token block); action in/out (row tile, column tile)."""
    m = cdiv(g.rows, p.bm)
    if kind == "action_in":
        return cdiv(g.action_rows, p.bm), cdiv(g.width, p.action_in.bn), 1
    if kind == "time_out":
        return cdiv(g.action_rows, p.bm), cdiv(g.width, p.time_out.bn), 1
    if kind == "qkv":
        return m, cdiv(g.qkv_cols, p.qkv.bn), p.qkv.splits(g.width)
    if kind == "attn":
        return cdiv(g.suffix * g.heads // g.kv_heads, p.attn.bm), p.attn.splits(g), g.batch * g.kv_heads
    if kind == "combine":
        return cdiv(g.rows, p.attn.tokens), 1, 1
    if kind == "wo":
        return m, cdiv(g.width, p.wo.bn), p.wo.splits(g.q_cols)
    if kind == "gate_up":
        return m, cdiv(g.mlp, p.gate_up.bn), 1
    if kind == "down":
        return m, cdiv(g.width, p.down.bn), p.down.splits(g.mlp)
    if kind == "out":
        return cdiv(g.action_rows, p.out_bm), 1, 1
    raise ValueError(f"unknown task kind {kind!r}; one of {KINDS}")


def stages(g: Geometry, p: Plan) -> list[Stage]:
    """The denoise loop in order: per step the action input (pi0: and its time MLP), per layer six stages, then the
    action output with the Euler update."""
    out = []
    for step in range(g.steps):
        for kind in ("action_in",) if g.pi05 else ("action_in", "time_out"):
            out.append(Stage(kind, step, 0, stage_dims(kind, g, p)))
        for layer in range(g.layers):
            out.extend(Stage(kind, step, layer, stage_dims(kind, g, p)) for kind in LAYER_KINDS)
        out.append(Stage("out", step, 0, stage_dims("out", g, p)))
    return out


@dataclass(frozen=True)
class TaskList:
    rows: list[tuple[int, ...]]  # FIELDS per task, in ticket order
    sizes: list[int]  # tasks per counter (= per stage)
    stages: list[Stage]

    def __len__(self) -> int:
        return len(self.rows)


def build_tasks(g: Geometry, p: Plan, kinds: Iterable[str] | None = None, chained: bool = True) -> TaskList:
    """The task list of the denoise. `kinds` keeps only those stages (to time one task type: the numbers it
    computes are then meaningless); `chained=False` drops the waits."""
    keep = set(KINDS if kinds is None else kinds)
    if keep - set(KINDS):
        raise ValueError(f"unknown task kinds {sorted(keep - set(KINDS))}; choose from {KINDS}")
    return task_list([s for s in stages(g, p) if s.kind in keep], chained)


def task_list(chosen: list[Stage], chained: bool = True) -> TaskList:
    """Tasks for these stages in this order, each stage waiting for the one before it (unless not chained)."""
    rows, sizes = [], []
    for i, s in enumerate(chosen):
        wait = i - 1 if chained and i > 0 else NO_WAIT
        code = KINDS.index(s.kind)
        na, nb, nc = s.dims
        rows.extend((code, s.step, s.layer, a, b, c, wait, i) for c in range(nc) for b in range(nb)
                    for a in range(na))
        sizes.append(s.size)
    tasks = TaskList(rows, sizes, list(chosen))
    check_order(tasks)
    return tasks


def check_order(tasks: TaskList) -> None:
    """Raise unless every task waits only for counters whose tasks all come before it (a topological order) and
    every counter's target is its task count."""
    last: dict[int, int] = {}
    count = [0] * len(tasks.sizes)
    for i, row in enumerate(tasks.rows):
        last[row[7]] = i
        count[row[7]] += 1
    if count != list(tasks.sizes):
        raise ValueError("a counter's target differs from the number of tasks that count it")
    for i, row in enumerate(tasks.rows):
        wait = row[6]
        if wait != NO_WAIT and last.get(wait, len(tasks.rows)) >= i:
            raise ValueError(f"task {i} ({KINDS[row[0]]}) waits for counter {wait}, whose tasks do not all come "
                             "before it: the list could deadlock")


# What the roofline predictions divide by: the H200's copy bandwidth as measured (4.15-4.18 TB/s,
# docs/performance.md) and its SMs; Jetson Thor's published LPDDR5X bandwidth and its GPU's 20 SMs.
CARDS = {"H200": {"bandwidth_gbs": 4150.0, "sms": 132}, "Thor": {"bandwidth_gbs": 273.0, "sms": 20}}


def stage_bytes(kind: str, g: Geometry, fp8: bool = False) -> int:
    """The bytes one stage must read from memory at least: its weights once (FP8: one byte each, plus four per
    output channel for the scales) and, for attention, the cached keys and values once. Activations (at most a
    few MB, L2-resident) are not counted."""
    wb = 1 if fp8 else 2

    def matrix(n: int, k: int, may_fp8: bool = True) -> int:
        return n * k * (wb if may_fp8 else 2) + (4 * n if fp8 and may_fp8 else 0)

    sizes = {"qkv": matrix(g.qkv_cols, g.width), "wo": matrix(g.width, g.q_cols),
             "gate_up": matrix(2 * g.mlp, g.width), "down": matrix(g.width, g.mlp),
             "time_out": matrix(g.width, g.width, False), "action_in": g.width * g.action_dim * 4,
             "out": matrix(g.action_dim, g.width, False),
             "attn": 2 * g.batch * g.kv_heads * g.prefix * g.head_dim * 2, "combine": 0}
    return sizes[kind]


def predict(g: Geometry, p: Plan, fp8: bool, card: str) -> list[dict]:
    """A PREDICTION per task kind from the roofline, not a measurement: tasks per stage, bytes per task and per
    stage, the stage's floor at the card's bandwidth (us), the per-task floor when every SM streams its own task
    at once (bytes per task / (bandwidth / SMs)), and how many waves of the plan's programs a stage takes."""
    c = CARDS[card]
    bw = c["bandwidth_gbs"] * 1e3  # bytes per us
    all_stages = stages(g, p)
    first = {}
    for s in all_stages:
        first.setdefault(s.kind, s)
    rows = []
    for kind, s in first.items():
        total = stage_bytes(kind, g, fp8)
        per_task = total / s.size
        rows.append({"kind": kind, "tasks": s.size, "bytes_per_task": round(per_task), "bytes_per_stage": total,
                     "stage_floor_us": round(total / bw, 3), "task_floor_us": round(per_task / (bw / c["sms"]), 3),
                     "waves": cdiv(s.size, p.programs),
                     "stages_per_denoise": sum(1 for t in all_stages if t.kind == kind)})
    return rows
