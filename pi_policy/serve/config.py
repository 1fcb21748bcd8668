"""The server's configuration: the node's parameter file (same schema, same checks) plus a `serve:` section.

A serve config is a ROS 2 parameter file for the node with one more top-level mapping, which ROS ignores:

    /**:
      ros__parameters: {preset: pi0, checkpoint: ..., joint_names: [...], prompt: "...", ...}
    serve:
      images: {observation/image: base_0_rgb, observation/wrist_image: left_wrist_0_rgb}
      state: [observation/state]    # request keys, concatenated in this order; joint_names names the values
      prompt: prompt                # request key of the instruction; without it, the parameter `prompt`
      host: 0.0.0.0
      port: 8000
      metadata: {}                  # extra entries of the metadata frame sent on connect
      max_batch: 8                  # robots' requests run together, at most (1: one at a time)
      max_wait_ms: 0                # how long the first waiting request waits for others to join its batch
      max_queue_ms: 10000           # a request not started by then is answered "server busy"
      replicas: 0                   # pi-policy serve --ray: runner replicas (0: one per GPU of the cluster)

The runner is built for the batch sizes 1, 2, 4, ... up to max_batch (each its own buffers and CUDA graphs); a
batch of 3 runs in the buffers of 4 with one row masked.
      max_clients: 8                # connections served at once; more are refused with HTTP 503

`images` stands in for the node's camera_topics (its keys) and camera_names (its values): the request key is
the server's topic. A key with "/" that is not itself a request key is looked up in nested dicts, so ALOHA's
{"images": {"cam_high": ...}} is `images/cam_high`. Parameters that only wire ROS topics are ignored.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pi_policy.node.params import NodeParams, ParamError, params_from_dict, read_param_values
from pi_policy.runtime.spec import RunnerSpec
from pi_policy.serve.protocol import pack

SECTION = "serve"


@dataclass
class ServeConfig:
    params: NodeParams
    images: dict[str, str]  # request key -> model camera name
    state: list[str]  # request keys whose values, concatenated, are the state vector
    prompt: str = "prompt"  # request key of the instruction
    host: str = "0.0.0.0"
    port: int = 8000
    metadata: dict[str, Any] = field(default_factory=dict)
    max_batch: int = 8
    max_wait_ms: float = 0.0
    max_queue_ms: float = 10000.0
    replicas: int = 0
    max_clients: int = 8  # connections at once; each may hold two requests' worth of memory (server.py)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """The runner's batch sizes: the node parameter batch_sizes when it goes beyond 1, else powers of two below
        max_batch, and max_batch."""
        if max(self.params.batch_sizes) > 1:
            return tuple(sorted({1, *self.params.batch_sizes}))
        return tuple(sorted({*(1 << i for i in range(self.max_batch.bit_length()) if 1 << i < self.max_batch),
                             self.max_batch}))

    def runner_spec(self) -> RunnerSpec:
        """The runner this server builds: the node parameters' spec, with its batch sizes."""
        return self.params.runner_spec().replace(batch_sizes=self.batch_sizes)


_KEYS = {"images": dict, "state": list, "prompt": str, "host": str, "port": int, "metadata": dict, "max_batch": int,
         "max_wait_ms": float, "max_queue_ms": float, "replicas": int, "max_clients": int}
_OPTIONAL = ("prompt", "host", "port", "metadata", "max_batch", "max_wait_ms", "max_queue_ms", "replicas",
             "max_clients")


def _check_section(section: Any, where: str) -> dict[str, Any]:
    if not isinstance(section, dict):
        raise ParamError(f"{where}: '{SECTION}' must be a mapping with {sorted(_KEYS)}")
    problems = []
    for key, value in section.items():
        if key not in _KEYS:
            close = difflib.get_close_matches(str(key), _KEYS, n=1)
            problems.append(f"unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
        elif key == "state" and isinstance(value, str):
            section[key] = [value]
        elif _KEYS[key] is float and isinstance(value, int) and not isinstance(value, bool):
            section[key] = float(value)  # max_wait_ms: 5 is 5.0, as the node reads its doubles
        elif not isinstance(value, _KEYS[key]) or isinstance(value, bool):
            problems.append(f"'{key}' must be a {_KEYS[key].__name__}, got {value!r}")
    for key in ("images", "state"):
        if key not in section:
            problems.append(f"'{key}' is missing")
    images = section.get("images")
    if isinstance(images, dict):
        if not images:
            problems.append("'images' is empty: map at least one request key to a camera name")
        bad = [f"{k!r}: {v!r}" for k, v in images.items() if not (isinstance(k, str) and k and isinstance(v, str))]
        if bad:
            problems.append(f"'images' must map request keys to camera names (strings), got {', '.join(bad)}")
        cams = list(images.values())
        if len(set(cams)) != len(cams):
            problems.append(f"'images' maps two request keys to one camera: {cams}")
    state = section.get("state")
    if isinstance(state, list) and (not state or not all(isinstance(k, str) and k for k in state)):
        problems.append(f"'state' must be a non-empty list of request keys, got {state!r}")
    try:
        pack(section.get("metadata", {}))
    except TypeError as e:  # YAML dates, say
        problems.append(f"'metadata' {e}: use strings, numbers, lists and mappings")
    port = section.get("port", 0)
    if isinstance(port, int) and not 0 <= port <= 65535:
        problems.append(f"'port' must be in 0..65535, got {port}")
    for key, low in (("max_batch", 1), ("max_wait_ms", 0), ("max_queue_ms", 0), ("replicas", 0),
                     ("max_clients", 1)):
        value = section.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool) and not value >= low:
            problems.append(f"'{key}' must be >= {low}, got {value}")
    if section.get("max_queue_ms") == 0:
        problems.append("'max_queue_ms' must be > 0: no request could ever start")
    if problems:
        raise ParamError(f"{where}: invalid '{SECTION}' section:\n  " + "\n  ".join(problems))
    return section


def load_serve_config(path: str | Path, overrides: dict[str, Any] | None = None,
                      serve_overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read a serve config; `overrides` (parameter name -> value) replace the file's node parameters,
    `serve_overrides` (key -> value) the keys of its `serve:` section, checked alike."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"cannot read serve config {path}: {e}") from None
    if not isinstance(doc, dict) or SECTION not in doc:
        raise ParamError(f"{path}: no '{SECTION}:' section (see config/serve_libero.yaml for an example)")
    if not isinstance(doc[SECTION], dict):
        _check_section(doc[SECTION], str(path))
    section = _check_section(doc[SECTION] | dict(serve_overrides or {}), str(path))
    values = read_param_values(path) | dict(overrides or {})
    values["camera_names"] = list(section["images"].values())
    values["camera_topics"] = list(section["images"].keys())
    try:
        params = params_from_dict(values)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
    return ServeConfig(params, dict(section["images"]), list(section["state"]),
                       **{k: section[k] for k in _OPTIONAL if k in section})
