"""Serving one bundle from several replicas (issue 29). router.py: which replica, and at which
budget, a request should go to for its deadline, from per-replica routing statistics (the
policy's predictions, in-flight requests, cached prefixes); pure Python, no Ray, so a Ray Serve
request router and benchmarks/fleet_sim.py share it."""
