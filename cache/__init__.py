"""The answer cache: key derivation (keys.py, pure functions), whether a request may use the cache
(policy.py), the store protocol (store.py) with in-memory and Redis stores (memory.py, redis_store.py,
built by name in stores.py), stored answers replayed as responses or streams (replay.py), and the router's
lookup with single-flight for identical requests (flight.py)."""
