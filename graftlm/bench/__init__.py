"""`graftlm bench`: the performance suite (suite.py), what it measures with (measure.py), its report (report.py)."""
