"""Engine replicas: the simulated engine (`qvl sim`) and the local launcher (`qvl up`)."""
