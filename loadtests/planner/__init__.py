"""The capacity planner: calibrate the simulated engine, validate it, size a fleet for an SLO."""
