"""Rosbag replay evaluation: a demo bag, replay through the node logic, metrics, report, output bag."""
