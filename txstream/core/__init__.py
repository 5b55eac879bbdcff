"""The columnar engine: Beam-free functions over batches, one implementation of each concept.

Every path calls these: the bounded graph, the streaming graph, the live hot
path and training. A batch is an Arrow table whose columns are named in
``contracts``; a DoFn around this package is a few lines of wiring.

    decode     wire-format messages -> transactions or labels, bad ones as dead letters
    validate   business rules on decoded transactions
    enrich     reference data joined by id (arrays, not dicts)
    features   per-shard feature engines (customer, terminal) over event time
    decide     XGBoost on whole batches, vectorised rules, reason codes
    batch      the batch element that crosses Beam, and its Arrow IPC coder
"""
