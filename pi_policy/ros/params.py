"""The node's ROS parameters, declared from pi_policy.node.params and read back with the YAML checker's rules.

Those rules, for parameter files, `-p name:=value` and launch `parameters=[...]` alike: an integer given for a
double parameter is that double (`inference_rate_hz: 10` is 10.0), another wrong type is a one-line ParamError
when the node starts, and a name the node does not declare is an error at configure ("unknown parameter
'infrence_rate_hz' (did you mean 'inference_rate_hz'?)"), as `load_params_yaml` says for the same file.
"""

from __future__ import annotations

from typing import Any

from rcl_interfaces.msg import ParameterDescriptor
from rclpy.exceptions import InvalidParameterTypeException, ParameterUninitializedException
from rclpy.node import Node
from rclpy.parameter import Parameter

from pi_policy.node.params import PARAMS, NodeParams, ParamError, params_from_dict

_PARAM_TYPES = {
    "string": Parameter.Type.STRING,
    "integer": Parameter.Type.INTEGER,
    "double": Parameter.Type.DOUBLE,
    "bool": Parameter.Type.BOOL,
    "string_array": Parameter.Type.STRING_ARRAY,
    "double_array": Parameter.Type.DOUBLE_ARRAY,
    "integer_array": Parameter.Type.INTEGER_ARRAY,
}


def _overrides(node: Node) -> dict[str, Parameter]:
    # the values rclpy took from --params-file, -p and parameter_overrides=, by name, before any is declared;
    # rclpy has no public accessor for them (humble to rolling keep this dict)
    return getattr(node, "_parameter_overrides", {})


def declare_parameters(node: Node) -> None:
    overrides = _overrides(node)
    for p in PARAMS:
        given = overrides.get(p.name)
        if p.type == "double" and given is not None and given.type_ == Parameter.Type.INTEGER:
            overrides[p.name] = Parameter(p.name, Parameter.Type.DOUBLE, float(given.value))
        if p.type == "double_array" and given is not None and given.type_ == Parameter.Type.INTEGER_ARRAY:
            overrides[p.name] = Parameter(p.name, Parameter.Type.DOUBLE_ARRAY, [float(v) for v in given.value])
        # an empty list default cannot carry its type in rclpy, so those are declared typed but unset
        value = _PARAM_TYPES[p.type] if p.default == [] else p.default
        try:
            node.declare_parameter(p.name, value, ParameterDescriptor(description=p.description, read_only=True))
        except InvalidParameterTypeException:
            kind = p.type.replace("_", " ")
            raise ParamError(f"parameter '{p.name}' must be a {kind}, got {given.value!r} "
                             f"({given.type_.name.lower()})") from None


def read_parameters(node: Node) -> NodeParams:
    """The declared parameters as NodeParams; unknown names given to this node are reported as the checker does."""
    values: dict[str, Any] = {}
    for p in PARAMS:
        try:
            value = node.get_parameter(p.name).value
        except ParameterUninitializedException:
            continue
        values[p.name] = list(value) if p.type.endswith("_array") else value
    for name, given in _overrides(node).items():
        if not node.has_parameter(name):  # rclpy's own (use_sim_time, ...) are declared, so not reported
            values[name] = given.value
    return params_from_dict(values)
