"""The shipped parameter files and launch file: parameters present and typed, launch arguments declared."""

import ast
import textwrap
from pathlib import Path

import pytest

from pi_policy.cameras import DEFAULT_CAMERAS
from pi_policy.node.params import (
    NODE_NAME,
    PARAMS,
    NodeParams,
    ParamError,
    load_params_yaml,
    params_from_dict,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["thor.yaml", "two_camera.yaml"]
PY_TYPES = {"string": str, "integer": int, "double": float, "bool": bool, "string_array": list, "double_array": list,
            "integer_array": list}


def write(tmp_path, text, name="p.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_config_loads_and_every_parameter_is_typed(name):
    params = load_params_yaml(ROOT / "config" / name)
    assert isinstance(params, NodeParams)
    for p in PARAMS:
        value = getattr(params, p.name)
        assert type(value) is PY_TYPES[p.type], (p.name, value)
        if p.type == "string_array":
            assert all(isinstance(v, str) for v in value), p.name
        if p.type == "double_array":
            assert all(isinstance(v, float) for v in value), p.name
        if p.type == "integer_array":
            assert all(isinstance(v, int) and not isinstance(v, bool) for v in value), p.name
    assert params.joint_names, "a robot config must name its joints"
    assert params.checkpoint, "a robot config must name its weights"


def test_thor_config_is_three_camera_pi0_with_fp8_engine():
    params = load_params_yaml(ROOT / "config" / "thor.yaml")
    assert params.preset == "pi0" and len(params.camera_names) == 3
    assert params.backend == "tensorrt" and params.engine_path.endswith(".engine")
    assert [c[2] for c in params.cameras()] == [False, True, True]  # /compressed suffix


def test_two_camera_config():
    params = load_params_yaml(ROOT / "config" / "two_camera.yaml")
    assert len(params.camera_names) == 2 and params.inference_rate_hz == 0.0
    assert params.raw_action_topic == ""
    assert params.outputs() == params.output_joint_names


def test_params_are_declared_once_with_descriptions():
    names = [p.name for p in PARAMS]
    assert len(names) == len(set(names))
    for p in PARAMS:
        assert p.description.strip(), p.name
        assert p.type in PY_TYPES
    expected = {"checkpoint", "norm_stats", "tokenizer", "preset", "backend", "engine_path", "camera_names",
                "camera_topics", "joint_names", "joint_state_topic", "prompt", "prompt_topic",
                "inference_rate_hz", "max_observation_age_s", "action_topic", "raw_action_topic",
                "output_joint_names", "control_period_s", "latency_budget_ms", "device", "latency_topic"}
    assert expected <= set(names)


def test_node_name_section_overrides_wildcard(tmp_path):
    path = write(tmp_path, f"""
        {NODE_NAME}:
          ros__parameters:
            prompt: "specific"
        /**:
          ros__parameters:
            preset: tiny
            prompt: "wildcard"
            joint_names: [a, b]
            control:
              period: 1.0
        other_node:
          ros__parameters:
            bogus: 1
        """)
    with pytest.raises(ParamError, match=r"unknown parameter 'control.period'"):
        load_params_yaml(path)
    path = write(tmp_path, f"""
        /**:
          ros__parameters:
            preset: tiny
            prompt: "wildcard"
            joint_names: [a, b]
        /robot1/{NODE_NAME}:
          ros__parameters:
            prompt: "specific"
        other_node:
          ros__parameters:
            bogus: 1
        """)
    params = load_params_yaml(path)
    assert params.prompt == "specific" and params.joint_names == ["a", "b"]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("inference_rate_hz: fast", "'inference_rate_hz' must be a number"),
        ("seed: 1.5", "'seed' must be an integer"),
        ("warmup: 1", "true or false"),
        ("prompt: 3", "a string"),
        ("joint_names: a", "a list of strings"),
        ("joint_names: [a, 1]", "a list of strings"),
        ("joint_names: []", "empty list"),
        ("joint_name: [a]", "unknown parameter 'joint_name' \\(did you mean 'joint_names'\\?\\)"),
        ("camera_topics: [a, b]", "parallel lists"),
        ("required_cameras: [top]", "not in camera_names"),
        ("backend: int4", "backend 'int4'"),
        ("backend: tensorrt", "needs engine_path"),
        ("control_period_s: -0.1", "control_period_s must be > 0"),
        ("max_observation_age_s: .nan", "finite"),
        ("preset: pi0", "checkpoint is empty"),
        ("preset: pi7", "unknown preset 'pi7'; choose one of pi0, pi05, tiny, tiny05"),
        ("device: gpu", "device 'gpu' is not cpu, cuda or cuda:N"),
        ("max_image_side: 0", "max_image_side must be in 1..8192, got 0"),
        ("max_image_side: 10000", "max_image_side must be in 1..8192, got 10000"),
        ("camera_qos_reliability: reliabel", "camera_qos_reliability 'reliabel' is not one of best_effort, reliable"),
        ("camera_qos_depth: 0", "camera_qos_depth must be >= 1, got 0"),
    ],
)
def test_bad_parameter_files(tmp_path, body, match):
    base = {"preset": "preset: tiny", "joint_names": "joint_names: [j0]"}
    base[body.split(":")[0]] = body  # the line under test replaces a base line of the same name
    path = write(tmp_path, "/**:\n  ros__parameters:\n" + "".join(f"    {line}\n" for line in base.values()))
    with pytest.raises(ParamError, match=match):
        load_params_yaml(path)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("- a\n- b\n", "mapping of node names"),
        ("other:\n  ros__parameters: {a: 1}\n", "no section for node"),
        ("/**:\n  params: {}\n", "needs a 'ros__parameters' mapping"),
        ("/**: [unclosed\n", "cannot read"),
    ],
)
def test_malformed_files(tmp_path, text, match):
    with pytest.raises(ParamError, match=match):
        load_params_yaml(write(tmp_path, text))


def test_missing_file(tmp_path):
    with pytest.raises(ParamError, match="cannot read"):
        load_params_yaml(tmp_path / "nope.yaml")


def test_integer_for_a_double_is_that_double(tmp_path):
    path = write(tmp_path, "/**:\n  ros__parameters:\n    preset: tiny\n    joint_names: [j0]\n"
                           "    inference_rate_hz: 10\n    latency_budget_ms: 250\n")
    params = load_params_yaml(path)
    assert params.inference_rate_hz == 10.0 and type(params.inference_rate_hz) is float
    assert type(params.latency_budget_ms) is float


def test_all_problems_reported_at_once():
    with pytest.raises(ParamError) as e:
        params_from_dict({"preset": "tiny", "joint_names": ["a"], "seed": "x", "prompt": 1})
    assert "'seed'" in str(e.value) and "'prompt'" in str(e.value)


def test_parameters_describe_a_valid_runner():
    params = load_params_yaml(ROOT / "config" / "thor.yaml")
    spec = params.runner_spec().validate()
    assert spec.checkpoint == params.checkpoint and spec.engine_path == params.engine_path
    assert spec.cameras.served == tuple(c for c in DEFAULT_CAMERAS if c in params.camera_names)
    two = load_params_yaml(ROOT / "config" / "two_camera.yaml").runner_spec()
    assert two.engine_path is None and two.num_cameras == 2


def _launch_arguments(tree: ast.Module) -> dict[str, ast.Call]:
    out = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "DeclareLaunchArgument":
            out[node.args[0].value] = node
    return out


def test_launch_file_declares_its_arguments():
    source = (ROOT / "launch" / "thor.launch.py").read_text()
    tree = ast.parse(source)
    args = _launch_arguments(tree)
    assert set(args) == {"config", "checkpoint", "engine", "namespace"}
    for name, call in args.items():
        keywords = {k.arg for k in call.keywords}
        assert {"default_value", "description"} <= keywords, name
    assert "thor.yaml" in ast.unparse(args["config"])
    assert "generate_launch_description" in {f.name for f in tree.body if isinstance(f, ast.FunctionDef)}
    # the overrides it passes are real parameters
    overrides = [c.value for c in ast.walk(tree) if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    names = {p.name for p in PARAMS}
    assert {"checkpoint", "engine_path", "backend"} <= names & set(overrides)
    assert '"pi_policy_node"' in source


def test_launch_file_with_ros_launch():
    pytest.importorskip("launch_ros")
    import importlib.util

    spec = importlib.util.spec_from_file_location("thor_launch", ROOT / "launch" / "thor.launch.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    names = {a.name for a in description.get_launch_arguments()}
    assert names == {"config", "checkpoint", "engine", "namespace"}


def test_prompt_format_parameter_names_the_tokenizers_formats():
    from pi_policy.runtime.spec import PROMPT_FORMATS

    tokenizer = pytest.importorskip("pi_policy.model.tokenizer")  # torch; node_params keeps its own copy
    assert PROMPT_FORMATS == ("auto", *tokenizer.PROMPT_FORMATS)
    base = {"preset": "tiny", "joint_names": ["a"]}
    assert params_from_dict(base).runner_spec().prompt_format == "auto"
    assert params_from_dict(base | {"prompt_format": "lerobot"}).runner_spec().prompt_format == "lerobot"
    with pytest.raises(ParamError, match="prompt_format 'hf' is not one of auto, openpi, lerobot"):
        params_from_dict(base | {"prompt_format": "hf"})


def test_an_unknown_preset_is_named_and_not_blamed_on_the_checkpoint():
    with pytest.raises(ParamError) as e:
        params_from_dict({"preset": "pi7", "joint_names": ["a"]})
    assert "unknown preset 'pi7'" in str(e.value) and "checkpoint" not in str(e.value)


def test_a_missing_cuda_device_is_named_as_given():
    factory = pytest.importorskip("pi_policy.runtime.factory")
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() > 7:
        pytest.skip("this machine has a cuda:7")
    with pytest.raises(RuntimeError) as e:
        factory.resolve_device("cuda:7")
    assert str(e.value).startswith("device cuda:7 asked for, but torch sees") and "--device" not in str(e.value)
