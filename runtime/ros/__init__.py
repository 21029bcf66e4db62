"""The robot's front end: a ROS 2 node (node.py; rclpy from the `ros` extra or the system's ROS 2)
over a one-frame mailbox that keeps only the newest frame (stream.py, no ROS needed).
`python -m runtime.ros` or `fmvr-ros` starts the node."""
