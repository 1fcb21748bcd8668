"""Launch the pi_policy node (lifecycle node, configures and activates itself) with a parameter file."""

from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument, OpaqueFunction
from launch.substitutions import LaunchConfiguration, PathJoinSubstitution
from launch_ros.actions import Node
from launch_ros.substitutions import FindPackageShare


def _policy_node(context):
    overrides = {}
    for arg, param in (("checkpoint", "checkpoint"), ("engine", "engine_path")):
        value = LaunchConfiguration(arg).perform(context)
        if value:  # empty: keep the config file's value
            overrides[param] = value
    if overrides.get("engine_path"):
        overrides["backend"] = "tensorrt"
    config = LaunchConfiguration("config").perform(context)
    return [
        Node(
            package="pi_policy",
            executable="pi_policy_node",
            name="pi_policy_node",
            namespace=LaunchConfiguration("namespace"),
            parameters=[config, overrides] if overrides else [config],
            output="screen",
            emulate_tty=True,
        )
    ]


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
