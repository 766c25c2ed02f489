"""The batch admission rules of router/classes.py on replicas in known states: spare room from the engine's
own gauges, the per-replica cap, the headroom kept for interactive arrivals, the quiet time after an
interactive request and the aging floor."""

from __future__ import annotations

from qvl.settings import BatchSettings
from router.classes import batch_room, spare
from router.replicas import EngineGauges, Replica


def replica(running: float = 0, waiting: float = 0, slots: int = 0, in_flight: int = 0, batch: int = 0) -> Replica:
    r = Replica(url="http://127.0.0.1:1", name="r1", healthy=True, in_flight=in_flight, batch_in_flight=batch)
    r.running, r.waiting, r.slots = running, waiting, slots
    r.engine = EngineGauges(running=running, waiting=waiting, kv_cache_usage=0.2)
    return r


def test_room_while_nothing_waits_or_only_for_the_next_step() -> None:
    settings = BatchSettings()
    assert spare(replica(running=3), settings)
    assert not spare(replica(running=3, waiting=1), settings)  # slots unknown: a queue means full
    assert spare(replica(running=5, waiting=1, slots=8), settings)  # a queue for the next step only
    assert not spare(replica(running=7, waiting=1, slots=8), settings)
    full_kv = replica(running=3)
    full_kv.engine = EngineGauges(running=3, kv_cache_usage=0.95)
    assert not spare(full_kv, settings)


def test_the_cap_per_replica_and_the_headroom_kept_for_interactive_arrivals() -> None:
    settings = BatchSettings(in_flight_per_replica=4, headroom_slots=2)
    assert batch_room(replica(running=3, in_flight=3, batch=3), settings)
    assert not batch_room(replica(running=4, in_flight=4, batch=4), settings)  # K lines already
    # Eight slots, two kept free: room while fewer than six are taken, counted by the engine or this router.
    assert batch_room(replica(running=5, slots=8, in_flight=2, batch=2), settings)
    assert not batch_room(replica(running=6, slots=8, in_flight=2, batch=2), settings)
    assert not batch_room(replica(running=2, slots=8, in_flight=6, batch=2), settings)
    assert batch_room(replica(running=6, slots=8, in_flight=6, batch=2), BatchSettings(in_flight_per_replica=4))


def test_no_new_line_right_after_an_interactive_request_was_sent() -> None:
    settings = BatchSettings(quiet_after_interactive_s=0.05)
    r = replica(running=2, in_flight=2)
    r.interactive_sent = 100.0
    assert not batch_room(r, settings, now=100.04)  # its prefill step is not to be shared
    assert batch_room(r, settings, now=100.06)
    assert batch_room(r, settings)  # without `now` (the proxy placing a line already started): no quiet rule
    assert batch_room(r, BatchSettings(quiet_after_interactive_s=0), now=100.0)


def test_the_aging_floor_allows_one_line_on_a_full_replica() -> None:
    settings = BatchSettings()
    busy = replica(running=8, waiting=5, slots=8, in_flight=8)
    assert not batch_room(busy, settings)
    assert batch_room(busy, settings, floor=True)
    busy.batch_in_flight = 1
    assert not batch_room(busy, settings, floor=True)
