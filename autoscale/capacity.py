"""One replica's capacity at the SLO, in prompt and generated tokens per second: from a capacity profile,
from the settings, or learned online from the engines.

- A profile (qvl-capacity-profile/1, `qvl plan calibrate`) gives the engine's step-time model; a replica
  that only prefills fills each step with max_batched_tokens of (image) prompt, and one that only decodes
  runs max_running requests a step. Both are the saturated rates: target_utilisation keeps the margin the
  SLO needs, and the policy takes the larger share of the two (one engine does both in the same steps).
- autoscale.capacity_prefill_tokens_s and capacity_decode_tokens_s, when both are set.
- Learned, when neither is given: an interval in which a serving replica worked at or past the SLO (the
  mean TTFT of its requests reached slo_ttft_s) shows what it sustains there; its token rates then are
  a sample, and the capacity is their exponentially weighted mean. A configured capacity is never
  replaced: one noisy interval must not move what an operator measured.
"""

from __future__ import annotations

from collections.abc import Iterable

from autoscale.observe import ReplicaRates, at_slo
from autoscale.policy import Capacity
from qvl.settings.autoscale import AutoscaleSettings
from serving.sim.profile import CapacityProfile, load_profile

LEARN_WEIGHT = 0.3
"""Weight of each new sample in the learned capacity."""


def from_profile(profile: CapacityProfile) -> Capacity:
    """The saturated prefill and decode rates of a profile's step-time model (see the module's docstring)."""
    c, e = profile.costs, profile.engine
    per_token_ms = max(c.per_image_token_ms.value, c.per_text_token_ms.value)
    prefill_step_ms = c.step_base_ms.value + c.prefill_base_ms.value + per_token_ms * e.max_batched_tokens
    decode_step_ms = c.step_base_ms.value + c.per_decode_ms.value * e.max_running
    return Capacity(e.max_batched_tokens / prefill_step_ms * 1000, e.max_running / decode_step_ms * 1000)


class CapacityEstimate:
    """A pool's replica capacity and where it came from: profile, settings, learned, or unknown."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self._slo_s = settings.slo_ttft_s
        self.source = "unknown"
        self.capacity: Capacity | None = None
        if settings.profile is not None:
            self.capacity, self.source = from_profile(load_profile(settings.profile)), "profile"
        elif settings.capacity_prefill_tokens_s and settings.capacity_decode_tokens_s:
            self.capacity = Capacity(settings.capacity_prefill_tokens_s, settings.capacity_decode_tokens_s)
            self.source = "settings"
        self.samples = 0

    def learn(self, replicas: Iterable[ReplicaRates]) -> None:
        """Take the interval's replicas at the SLO as samples (a configured capacity is kept as it is)."""
        if self.source in ("profile", "settings"):
            return
        for r in replicas:
            if not at_slo(r, self._slo_s) or r.prefill_tokens_s <= 0 or r.decode_tokens_s <= 0:
                continue
            sample = Capacity(r.prefill_tokens_s, r.decode_tokens_s)
            if self.source != "learned" or self.capacity is None:
                self.capacity, self.source = sample, "learned"
            else:
                w, old = LEARN_WEIGHT, self.capacity
                self.capacity = Capacity(
                    (1 - w) * old.prefill_tokens_s + w * sample.prefill_tokens_s,
                    (1 - w) * old.decode_tokens_s + w * sample.decode_tokens_s,
                )
            self.samples += 1

    def describe(self) -> dict[str, object]:
        c = self.capacity
        return {
            "prefill_tokens_s": c.prefill_tokens_s if c else 0.0,
            "decode_tokens_s": c.decode_tokens_s if c else 0.0,
            "source": self.source,
            "samples": self.samples,
        }
