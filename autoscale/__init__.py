"""Autoscaling (issue 19): how many replicas each pool should have, from the load, ahead of cold starts,
without flapping. `policy` holds the decisions as pure functions of observations; the loop that reads
the routers' and engines' metrics and acts on Ray comes on top of it."""
