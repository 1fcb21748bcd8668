"""The camera set: which views the model was trained with, which a robot sends, which it cannot run without.

Built once from the parameters and used by the node, its assembler, the runner, the bag pre-flight and replay and
the server, so the camera rules live here and nowhere else:
- `model`: the model's camera slots in its order (openpi's names by default);
- `subscribed`: the cameras this robot sends, in the order it lists them (the node's camera_names);
- `served`: the subscribed ones in the model's order: the views the runner's buffers, graphs and engines are built
  for (a two-camera robot pays for two images; masking a view and leaving it out give the same actions);
- `required`: the cameras without which a tick is skipped; configured empty, it means every subscribed camera.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

# The camera slots pi0 / pi0.5 were trained with (openpi's names), in the model's order.
DEFAULT_CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")


@dataclass(frozen=True)
class CameraSet:
    model: tuple[str, ...] = DEFAULT_CAMERAS
    subscribed: tuple[str, ...] = DEFAULT_CAMERAS
    required_names: tuple[str, ...] = ()  # as configured: empty = every subscribed camera

    @classmethod
    def of(cls, subscribed: Sequence[str] | None = None, model: Sequence[str] | None = None,
           required: Sequence[str] | None = None) -> CameraSet:
        """From parameter lists, where an empty or missing list takes its default."""
        model = tuple(model or DEFAULT_CAMERAS)
        return cls(model, tuple(subscribed or model), tuple(required or ()))

    @property
    def served(self) -> tuple[str, ...]:
        return tuple(c for c in self.model if c in self.subscribed)

    @property
    def required(self) -> tuple[str, ...]:
        return self.required_names or self.subscribed

    def is_required(self, camera: str) -> bool:
        return camera in self.required

    def missing_required(self, present: Iterable[str]) -> list[str]:
        """The required cameras not in `present`, in subscription order."""
        have = set(present)
        return [c for c in self.required if c not in have]

    def unknown(self, names: Iterable[str]) -> list[str]:
        """Names among `names` that are not served cameras (what an observation may carry)."""
        return sorted(set(names) - set(self.served))

    def problems(self) -> list[str]:
        """Every rule the lists break, one line each (empty when the set is consistent)."""
        out = []
        for what, names in (("camera_names", self.subscribed), ("model_camera_names", self.model),
                            ("required_cameras", self.required_names)):
            if len(set(names)) != len(names):
                out.append(f"{what} has repeated entries: {list(names)}")
            if any(not n for n in names):
                out.append(f"{what} has an empty entry")
        if not self.subscribed:
            out.append("camera_names is empty")
        unknown = [c for c in self.required_names if c not in self.subscribed]
        if unknown:
            out.append(f"required_cameras {unknown} are not in camera_names {list(self.subscribed)}")
        extra = [c for c in self.subscribed if c not in self.model]
        if extra:
            out.append(f"camera_names {extra} are not among the model's cameras {list(self.model)} "
                       "(set model_camera_names to the names the model was trained with)")
        return out

    def check(self) -> CameraSet:
        """self, or a ValueError listing every problem."""
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self
