"""``txstream serve``: a read-only SQL HTTP API over every storage tier, and the dashboard.

  ``config``     ``ServeConfig``: tier URLs, limits, the API key
  ``router``     parse the user's SQL, refuse what is not a read, pick the engine, translate
  ``engines``    run a routed query on PostgreSQL, ClickHouse or DuckDB (the cold Delta table), with limits,
                 timeouts and cancellation
  ``hot``        transaction and customer lookups on Redis, falling back to PostgreSQL
  ``app``        ``create_app(config)``: the FastAPI application; ``run_sql`` for Python callers
  ``dashboard``  the dashboard pages, installed by ``create_app``

Importing this package imports none of them: ``txstream.serve.app`` pulls in
FastAPI and the drivers.
"""
