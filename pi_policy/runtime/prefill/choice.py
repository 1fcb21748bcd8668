"""What a prefill backend hands the runner: the callable, the name shown per stage, and why a fallback happened."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class PrefillChoice:
    fn: object | None  # None: the model's own prefill
    name: str
    note: str = ""  # why a fallback happened, shown to the user
