"""``txstream reconcile``: two tables of decisions compared by key, as a Beam pipeline over key shards.

``sources`` reads the URIs, ``compare`` is the columnar core (Beam-free),
``pipeline`` the Beam graph, ``report`` report.json and report.html, and
``command`` the command line.
"""
