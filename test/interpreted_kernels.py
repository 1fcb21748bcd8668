"""Import first in a test module that runs the project's Triton kernels: Triton's CPU interpreter, large tiles.

TRITON_INTERPRET is read when a kernel is decorated, so it is set before the kernels' modules are imported (or
they are reloaded). Without Triton the importing test module is skipped.
"""

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
for name in ("pi_policy.runtime.expert.kernels", "pi_policy.runtime.prefill.fp8_kernels"):
    if name in sys.modules:
        importlib.reload(sys.modules[name])

from pi_policy.runtime.expert import kernels  # noqa: E402


@pytest.fixture(autouse=True)
def few_programs(monkeypatch):
    """Large tiles: the interpreter's cost is per program."""
    monkeypatch.setitem(kernels.TILES, "attn", dict(bm=64, bn=64, bs=64, chunk=128, warps=4, stages=1, tokens=64))
    monkeypatch.setitem(kernels.TILES, "gate_up", dict(bn=64, bk=64, warps=4, stages=1))
