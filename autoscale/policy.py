"""Autoscaling decisions as pure functions of what is observed: how many replicas a pool should have.

Two policies, registered by name in POLICIES (`autoscale.policy`):
- `demand` (the default) estimates the pool's demand in what costs a replica work, prompt tokens (image
  tokens included) and generated tokens per second, and plans for the larger of now (smoothed over
  `smoothing_s`, so that one noisy interval does not count) and the forecast one start-up time ahead from
  the smoothed demand's trend over `forecast_window_s` (a replica asked for now serves only after the
  start-up time: `startup_s`, or the measured one when longer); a scheduled event's floor stands for the
  forecast in its window. Replicas needed = max(prefill demand / prefill capacity, decode demand / decode
  capacity) / target_utilisation, the capacities being one replica's at the SLO (autoscale/capacity.py).
  It scales up at once to what is needed. It scales down only to what the largest need of the last
  `down_window_s` asks (with the `hysteresis` margin), never before a whole window of history, never while
  the forecast is above the need now (`rising`: a step down into a rising load comes back up a start-up
  later, a turn too many near every peak of a noisy load), never within `down_after_up_s` of a scale-up;
  within `cooldown_s` of the last change only a further up after an up may happen (no turn, no step down).
  Batch lines' tokens are kept apart and add at most `batch_burst_replicas`. Until a replica's capacity is
  known (`tune`) it holds (`no_capacity`).
- `reactive`, the baseline the benchmark compares with: in-flight requests per replica against a target,
  acting only when the wish has held for an up (or down) delay, jumping straight to the count it wants.

`victim` says which replica goes on a scale-down: one still starting before any serving one.
Decisions carry a `reason` from a closed set (REASONS), which metrics use as a label.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal, Protocol

from qvl.settings.autoscale import AutoscaleSettings

Direction = Literal["up", "down", "hold"]
REASONS = (
    "demand_up",
    "demand_down",
    "in_band",
    "cooldown",
    "down_after_up",
    "below_min",
    "above_max",
    "at_max",
    "reactive_up",
    "reactive_down",
    "waiting",
    "no_data",
    "no_capacity",
    "scheduled",
    "rising",
)


@dataclass(frozen=True, slots=True)
class Load:
    """What a pool is asked for, at `at` (seconds): token rates summed over its replicas, and the requests in
    flight on it (interactive only: a batch backlog is not interactive demand)."""

    at: float
    prefill_tokens_s: float
    decode_tokens_s: float
    in_flight: float = 0.0
    batch_prefill_tokens_s: float = 0.0
    """Batch lines' tokens, apart: they may only use autoscale.batch_burst_replicas."""
    batch_decode_tokens_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Capacity:
    """What one replica sustains at the SLO."""

    prefill_tokens_s: float
    decode_tokens_s: float

    def __post_init__(self) -> None:
        if self.prefill_tokens_s <= 0 or self.decode_tokens_s <= 0:
            raise ValueError("a replica's capacity must be positive")


@dataclass(frozen=True, slots=True)
class Decision:
    at: float
    current: int
    desired: int
    direction: Direction
    reason: str
    needed: float
    """Replicas the policy's signal asks for, before rounding, bounds and stability rules."""


class Trend:
    """The slope of a (smoothed) signal: its change over the last `span_s`, per second. Not fitted with
    memory of its own errors, as Holt's smoothing is, so it never swings past zero after a step or a
    drop; it stays 0 until half a span of samples has been seen (a trend needs history)."""

    def __init__(self, span_s: float) -> None:
        self._span_s = span_s
        self._points: deque[tuple[float, float]] = deque()
        self._first: float | None = None
        self.level: float | None = None
        self.slope = 0.0

    def update(self, at: float, value: float) -> None:
        if self._first is None:
            self._first = at
        self._points.append((at, value))
        while self._points[0][0] < at - self._span_s:
            self._points.popleft()
        then, old = self._points[0]
        self.level = value
        enough = at - self._first >= self._span_s / 2 and at > then
        self.slope = (value - old) / (at - then) if enough else 0.0

    def forecast(self, ahead_s: float) -> float:
        """The value `ahead_s` seconds after the last sample (0 before any)."""
        return 0.0 if self.level is None else self.level + self.slope * ahead_s


class Smoothed:
    """Exponential smoothing of one signal sampled at irregular times (the weight of a sample decays with
    the time since it, about 98 % of it within `span_s`)."""

    def __init__(self, span_s: float) -> None:
        self._span_s = span_s
        self.value: float | None = None
        self._at = 0.0

    def update(self, at: float, value: float) -> float:
        if self.value is None:
            self.value = value
        else:
            weight = 1 - math.exp(-max(at - self._at, 0.0) / self._span_s * 4)
            self.value += weight * (value - self.value)
        self._at = at
        return self.value


class Policy(Protocol):
    def decide(self, load: Load, current: int) -> Decision: ...

    def tune(self, capacity: Capacity | None, startup_s: float) -> None:
        """What the loop learned: a replica's capacity (None: unknown yet) and the measured start-up time."""


class _Stability:
    """What both policies share: the bounds, the cool-down, and the rule against scaling down soon after
    scaling up."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self.settings = settings
        self.last_change = -math.inf
        self.last_up = -math.inf

    def bounded(
        self, at: float, current: int, wanted: int, needed: float, up: str, down: str, hold: str = "in_band"
    ) -> Decision:
        """`wanted` within the bounds and the stability rules; `hold` is the reason when the policy itself
        wanted no change and nothing else held it (at_max, say, comes first)."""
        s = self.settings
        if current < s.min_replicas:
            return self._change(at, current, s.min_replicas, needed, "below_min")
        if current > s.max_replicas:
            return self._change(at, current, s.max_replicas, needed, "above_max")
        wanted = min(max(wanted, s.min_replicas), s.max_replicas)
        if wanted == current:
            reason = "at_max" if needed > s.max_replicas and current == s.max_replicas else hold
            return Decision(at, current, current, "hold", reason, needed)
        # The cool-down holds every turn and every step down; an up right after an up is the same direction
        # (a flash sale's ramp), never a flap, and waiting there would only lengthen the shortage.
        up_after_up = wanted > current and self.last_up >= self.last_change
        if at - self.last_change < s.cooldown_s and not up_after_up:
            return Decision(at, current, current, "hold", "cooldown", needed)
        if wanted < current and at - self.last_up < s.down_after_up_s:
            return Decision(at, current, current, "hold", "down_after_up", needed)
        return self._change(at, current, wanted, needed, up if wanted > current else down)

    def _change(self, at: float, current: int, wanted: int, needed: float, reason: str) -> Decision:
        self.last_change = at
        if wanted > current:
            self.last_up = at
        return Decision(at, current, wanted, "up" if wanted > current else "down", reason, needed)


class DemandPolicy:
    """Token demand against a replica's capacity, forecast one start-up ahead (see the module's docstring)."""

    def __init__(self, settings: AutoscaleSettings, capacity: Capacity | None) -> None:
        self._settings = settings
        self._capacity = capacity
        self._startup_s = settings.startup_s
        self._prefill = Trend(settings.forecast_window_s)
        self._decode = Trend(settings.forecast_window_s)
        self._prefill_now = Smoothed(settings.smoothing_s)
        self._decode_now = Smoothed(settings.smoothing_s)
        self._recent: deque[tuple[float, float]] = deque()
        self._since: float | None = None
        self._stability = _Stability(settings)

    def tune(self, capacity: Capacity | None, startup_s: float) -> None:
        self._capacity = capacity
        self._startup_s = max(self._settings.startup_s, startup_s)

    def scheduled(self, at: float) -> int:
        """The largest min_replicas of the scheduled events whose window (a start-up ahead) holds `at`; 0: none.
        The settings given are one pool's: the loop leaves out the events of other pools."""
        windows = [(e.window(self._startup_s), e.min_replicas) for e in self._settings.schedule]
        return max((floor for (begin, end), floor in windows if begin <= at < end), default=0)

    def needed(self, prefill_tokens_s: float, decode_tokens_s: float) -> float:
        """Replicas that serve these rates at target_utilisation of their capacity."""
        c, u = self._capacity, self._settings.target_utilisation
        assert c is not None
        return max(prefill_tokens_s / c.prefill_tokens_s, decode_tokens_s / c.decode_tokens_s) / u

    def _forecast(self, ahead_s: float) -> float:
        """Replicas needed `ahead_s` from now, by the smoothed demand's trend."""
        return self.needed(max(0.0, self._prefill.forecast(ahead_s)), max(0.0, self._decode.forecast(ahead_s)))

    def decide(self, load: Load, current: int) -> Decision:
        prefill_now = self._prefill_now.update(load.at, load.prefill_tokens_s)
        decode_now = self._decode_now.update(load.at, load.decode_tokens_s)
        self._prefill.update(load.at, prefill_now)
        self._decode.update(load.at, decode_now)
        if self._capacity is None:
            s = self._settings
            if s.min_replicas <= current <= s.max_replicas:
                return Decision(load.at, current, current, "hold", "no_capacity", math.nan)
            return self._stability.bounded(load.at, current, current, math.nan, "demand_up", "demand_down")
        ahead = self._startup_s
        now = self.needed(prefill_now, decode_now)
        forecast = self._forecast(ahead)
        floor = self.scheduled(load.at)
        later = float(floor) if floor else forecast  # the known event is the forecast for its window
        batch = self.needed(load.batch_prefill_tokens_s, load.batch_decode_tokens_s)
        needed = max(now, later) + min(batch, float(self._settings.batch_burst_replicas))
        window = self._settings.down_window_s
        self._recent.append((load.at, needed))
        while len(self._recent) > 1 and self._recent[0][0] <= load.at - window:
            self._recent.popleft()
        if self._since is None:
            self._since = load.at
        # Down only to what the largest need of a whole window asks, with the hysteresis' margin (a need
        # that dipped for a moment, or a noisy one, keeps its replicas), and never before a window of
        # history: one first sample says nothing about the rest.
        peak = max(n for _, n in self._recent)
        wanted = current
        rising = False
        if math.ceil(needed - 1e-9) > current:
            wanted = math.ceil(needed - 1e-9)
        elif (
            load.at - self._since >= window
            and (fewer := math.ceil(peak / (1 - self._settings.hysteresis) - 1e-9)) < current
        ):
            # Not while the trend rises: a replica removed into a rising load is asked back a start-up
            # later (near every peak of a noisy load, a turn too many).
            rising = forecast > now
            wanted = current if rising else max(fewer, floor)
        if floor and wanted == floor > current:
            return self._stability.bounded(load.at, current, wanted, needed, "scheduled", "demand_down")
        hold = "rising" if rising else "in_band"  # a step down held back by the rising forecast says so
        return self._stability.bounded(load.at, current, wanted, needed, "demand_up", "demand_down", hold)


class ReactivePolicy:
    """In-flight requests per replica against a target, with up and down delays (the benchmark's baseline)."""

    def __init__(self, settings: AutoscaleSettings) -> None:
        self._settings = settings
        self._stability = _Stability(settings.model_copy(update={"cooldown_s": 0.0, "down_after_up_s": 0.0}))
        self._wish_since: float | None = None
        self._wish: int | None = None

    def tune(self, capacity: Capacity | None, startup_s: float) -> None:
        """In-flight requests need no capacity, and the baseline does not forecast."""

    def decide(self, load: Load, current: int) -> Decision:
        s = self._settings
        needed = load.in_flight / s.in_flight_target
        wanted = max(math.ceil(needed - 1e-9), s.min_replicas)
        if wanted == current:
            self._wish_since = self._wish = None
            return self._stability.bounded(load.at, current, current, needed, "reactive_up", "reactive_down")
        direction_changed = self._wish is None or (self._wish > current) != (wanted > current)
        if direction_changed:
            self._wish_since = load.at
        self._wish = wanted
        delay = s.reactive_up_delay_s if wanted > current else s.reactive_down_delay_s
        assert self._wish_since is not None
        if load.at - self._wish_since < delay:
            return Decision(load.at, current, current, "hold", "waiting", needed)
        self._wish_since = self._wish = None
        return self._stability.bounded(load.at, current, wanted, needed, "reactive_up", "reactive_down")


POLICIES: Mapping[str, Callable[[AutoscaleSettings, Capacity | None], Policy]] = MappingProxyType(
    {"demand": DemandPolicy, "reactive": lambda settings, capacity: ReactivePolicy(settings)}
)
"""Every policy by the name `autoscale.policy` takes."""


def build_policy(settings: AutoscaleSettings, capacity: Capacity | None) -> Policy:
    return POLICIES[settings.policy](settings, capacity)


ReplicaState = Literal["starting", "serving", "draining"]


@dataclass(frozen=True, slots=True)
class ReplicaView:
    name: str
    state: ReplicaState
    in_flight: int
    started_at: float


def victim(replicas: Iterable[ReplicaView]) -> ReplicaView | None:
    """The replica a scale-down removes: a starting one first (the newest), else the serving one with the
    fewest requests in flight (the newest among equals); never one already draining."""
    candidates = [r for r in replicas if r.state != "draining"]
    if not candidates:
        return None
    return min(candidates, key=lambda r: (r.state != "starting", r.in_flight, -r.started_at))
