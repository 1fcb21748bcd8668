"""pi_policy: real-time pi0 / pi0.5 vision-language-action policies for ROS 2."""

__version__ = "0.1.0"
