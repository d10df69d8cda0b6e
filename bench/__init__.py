"""``make bench``: the taskflow operator's benchmark (figures, not pass/fail).

Run ``python -m bench`` (or ``make bench``) from the repository root; ``--quick`` for a short
run. See ``docs/performance.md`` for the method and the figures.
"""
