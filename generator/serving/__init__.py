"""The HTTP service over a loaded run (``semid serve``): micro-batching (``batcher``), request checks (``requests``),
the served version and its reload (``holder``), Prometheus metrics (``metrics``) and the FastAPI app (``app``).

It sits above ``generator.runs`` (it serves a ``Recommender``) and below the command line; see docs/architecture.md,
"The serving path".
"""
