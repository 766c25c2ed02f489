"""Load tests and capacity planning (top layer): traffic generators, workloads, reports."""
