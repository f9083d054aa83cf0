"""Comparison runs: methods x ranks x seeds on one base config, resumable, with tables and plots.

``python -m app.compare`` (:mod:`app.compare.cli`). The pieces: :mod:`~app.compare.plan` (the
grid and each run's arguments), :mod:`~app.compare.runner` (one subprocess per run, resume),
:mod:`~app.compare.launch` (starting, waiting for and stopping the runs),
:mod:`~app.compare.timing` (the ``StepTimer`` callback), :mod:`~app.compare.collect` (one run's
``result.json``), :mod:`~app.compare.select` (learning-rate selection on a held-out slice of
the training set), :mod:`~app.compare.stats` (paired t and bootstrap intervals),
:mod:`~app.compare.reference` (the no-learning floor), :mod:`~app.compare.report`,
:mod:`~app.compare.tables` and :mod:`~app.compare.plots` (CSV, JSON, Markdown, PNG).
"""
