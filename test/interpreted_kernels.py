"""Import first in a test module that runs the fused-expert Triton kernels: Triton's CPU interpreter, large tiles.

TRITON_INTERPRET is read when a kernel is decorated, so it is set before the kernels' module is imported (or it
is reloaded). Without Triton the importing test module is skipped.
"""

import importlib
import os
import sys

import pytest

os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")
if "pi_policy.runtime.expert.kernels" in sys.modules:
    importlib.reload(sys.modules["pi_policy.runtime.expert.kernels"])

from pi_policy.runtime.expert import kernels  # noqa: E402


@pytest.fixture(autouse=True)
def few_programs(monkeypatch):
    """Large tiles: the interpreter's cost is per program."""
    monkeypatch.setitem(kernels.TILES, "attn", dict(bm=64, bn=64, bs=64, chunk=128, warps=4, stages=1, tokens=64))
    monkeypatch.setitem(kernels.TILES, "gate_up", dict(bn=64, bk=64, warps=4, stages=1))
