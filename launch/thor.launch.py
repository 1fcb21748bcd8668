"""Launch the pi_policy node (lifecycle node, configures and activates itself) with a parameter file.

`ros2 launch` exits non-zero when the node ends with an error (a bad parameter, a failed configure), and with
a one-line reason when the parameter file does not exist. The node ends when `ros2 launch` does, also when
launch is stopped with SIGTERM or killed (the node watches its parent process).
"""

import os

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction, RegisterEventHandler
from launch.event_handlers import OnProcessExit
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


class NodeFailed(RuntimeError):
    """The node exited with a non-zero code: launch reports it and exits 1."""


def _fail_on_error(event, context):
    if event.returncode != 0:
        raise NodeFailed(f"{event.process_name} exited with code {event.returncode} (its reason is above)")


def _policy_node(context):
    overrides = {}
    for arg, param in (("checkpoint", "checkpoint"), ("engine", "engine_path")):
        value = LaunchConfiguration(arg).perform(context)
        if value:  # empty: keep the config file's value
            overrides[param] = value
    if overrides.get("engine_path"):
        overrides["backend"] = "tensorrt"
    config = LaunchConfiguration("config").perform(context)
    if not os.path.isfile(config):
        raise FileNotFoundError(f"parameter file not found: {config} (launch argument config:=...)")
    node = Node(
        package="pi_policy",
        executable="pi_policy_node",
        name="pi_policy_node",
        namespace=LaunchConfiguration("namespace"),
        parameters=[config, overrides] if overrides else [config],
        output="screen",
        emulate_tty=True,
    )
    return [node, RegisterEventHandler(OnProcessExit(target_action=node, on_exit=_fail_on_error))]


def generate_launch_description():
    return LaunchDescription([
        DeclareLaunchArgument(
            "config",
            default_value=PathJoinSubstitution([FindPackageShare("pi_policy"), "config", "thor.yaml"]),
            description="ROS 2 parameter file for the node (see pi_policy/node/params.py)",
        ),
        DeclareLaunchArgument("checkpoint", default_value="",
                              description="Model weights; overrides the config's checkpoint when set"),
        DeclareLaunchArgument("engine", default_value="",
                              description="TensorRT prefill engine; when set, also selects backend tensorrt"),
        DeclareLaunchArgument("namespace", default_value="",
                              description="Namespace for the node and its relative topics"),
        OpaqueFunction(function=_policy_node),
    ])
