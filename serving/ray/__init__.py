"""Replicas on a Ray cluster (`qvl cluster`): placement groups, supervising actors, a local Ray head."""
