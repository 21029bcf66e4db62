"""`python -m runtime.ros`: the ROS 2 node (runtime.ros.node)."""

from runtime.ros.node import main

if __name__ == "__main__":
    raise SystemExit(main())
