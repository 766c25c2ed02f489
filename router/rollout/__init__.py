"""Model versions and their rollouts: the route store in Redis, the per-router sample buffer, the
statistics, the analysis and the controller that advances, holds or aborts a rollout."""
