"""Models: loading and per-architecture split adapters (see `hosl.models.split`)."""
