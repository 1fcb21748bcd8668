"""The robot-side core in plain Python, no ROS imports: parameters, input messages, the observation assembler,
the tick logic and output messages."""
