"""The rclpy side of pi_policy: the only package here that imports rclpy and ROS message packages."""
