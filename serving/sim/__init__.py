"""The simulated engine (`qvl sim`): vLLM's HTTP API and metrics over a calibrated latency model, no GPU.

A named tool for load tests and capacity planning, never a stand-in where vLLM is asked for."""
