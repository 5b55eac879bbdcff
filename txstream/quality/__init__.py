"""Data quality: Great Expectations suites over the decisions, per window and for the whole run.

Four expectation suites live in ``txstream/quality/suites/`` (Great
Expectations' own JSON), their thresholds in ``txstream/config/quality.yaml``
(or ``--dq_config``), passed in as expectation parameters:

  ``decisions``            row level, one row per decision: ids non-null and
                           unique, amounts positive, currencies ISO 4217, event
                           times inside the run's window, scores in [0, 1],
                           decisions in the closed set, reason codes consistent
                           with the decision and the score, a model version on
                           every row.
  ``feature_ranges``       one row: each feature column's smallest and largest
                           value within its sane range.
  ``window_distribution``  one row per window (a bounded run's event day, a
                           live run's fixed window): decline and review rates,
                           mean score, decisions against the median window's.
  ``run_distribution``     one row for the run: the same rates, the dead-letter
                           rate, and every event read accounted for.

``validate.check`` runs the four and returns the ``data_quality`` part of
the run summary; ``report`` writes it to PostgreSQL (``dq_results``) and as
an HTML data-docs page. Great Expectations takes seconds to import: nothing
here imports it before it is needed, and ``validate.preload`` imports it on a
thread while the pipeline runs.
"""
