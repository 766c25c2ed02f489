"""Answer cache: key derivation, in-memory and Redis stores, single-flight (being built; see the issues)."""
