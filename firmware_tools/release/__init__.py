"""Release: the model registry, publishing signed versions, staged rollouts, the fleet's status, drills."""
