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
    max_clients: int = 8  # connections at once; each may hold two requests' worth of memory (server.py)


_KEYS = {"images": dict, "state": list, "prompt": str, "host": str, "port": int, "metadata": dict,
         "max_clients": int}


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
    clients = section.get("max_clients", 1)
    if isinstance(clients, int) and clients < 1:
        problems.append(f"'max_clients' must be >= 1, got {clients}")
    if problems:
        raise ParamError(f"{where}: invalid '{SECTION}' section:\n  " + "\n  ".join(problems))
    return section


def load_serve_config(path: str | Path, overrides: dict[str, Any] | None = None) -> ServeConfig:
    """Read a serve config; `overrides` (parameter name -> value) replace the file's node parameters."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ParamError(f"cannot read serve config {path}: {e}") from None
    if not isinstance(doc, dict) or SECTION not in doc:
        raise ParamError(f"{path}: no '{SECTION}:' section (see config/serve_libero.yaml for an example)")
    section = _check_section(doc[SECTION], str(path))
    values = read_param_values(path) | dict(overrides or {})
    values["camera_names"] = list(section["images"].values())
    values["camera_topics"] = list(section["images"].keys())
    try:
        params = params_from_dict(values)
    except ParamError as e:
        raise ParamError(f"{path}: {e}") from None
    return ServeConfig(params, dict(section["images"]), list(section["state"]),
                       **{k: section[k] for k in ("prompt", "host", "port", "metadata", "max_clients") if k in section})
