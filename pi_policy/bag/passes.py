"""The passes of an evaluation: each replays the bag once, under a name of its own and with its own node
parameters (the backend to compare, or the real-time chunking mode). The first pass is the baseline."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

from pi_policy.bag.setup import ReplaySetup


@dataclass(frozen=True)
class ReplayPass:
    """One replay of the bag: its name in the report and the setup (node parameters included) it runs with."""

    name: str
    setup: ReplaySetup


def backend_passes(setup: ReplaySetup, backends: Sequence[str]) -> list[ReplayPass]:
    """One pass per prefill backend, each named after it."""
    return [ReplayPass(b, _with(setup, backend=b)) for b in backends]


def rtc_passes(setup: ReplaySetup, backend: str, modes: Sequence[str]) -> list[ReplayPass]:
    """One pass per real-time chunking mode on one backend, each named after its mode."""
    return [ReplayPass(m, _with(setup, backend=backend, rtc_mode=m)) for m in dict.fromkeys(modes)]


def plan_passes(setup: ReplaySetup, backends: Sequence[str],
                rtc_modes: Sequence[str] | None = None) -> list[ReplayPass]:
    """eval-bag's passes: one per backend, or, with RTC modes, one per mode on the one backend."""
    if not rtc_modes:
        return backend_passes(setup, backends)
    if len(backends) > 1:
        raise ValueError("--rtc compares real-time chunking modes on one backend; give one --backend")
    return rtc_passes(setup, backends[0], rtc_modes)


def as_passes(setup: ReplaySetup, passes: Sequence[ReplayPass | str]) -> list[ReplayPass]:
    """The passes, a bare name standing for a pass on `setup` as it is (the policy factory decides what runs under
    that name); refuses none and repeated names."""
    out = [p if isinstance(p, ReplayPass) else ReplayPass(p, setup) for p in passes]
    if not out:
        raise ValueError("no backend to evaluate")
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"backends repeat: {names}")
    return out


def _with(setup: ReplaySetup, **params) -> ReplaySetup:
    return dataclasses.replace(setup, params=dataclasses.replace(setup.params, **params))
