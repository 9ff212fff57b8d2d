"""`matvlm bench`: decode speed and memory of a teacher and its hybrids, with one engine for all,
against the memory-bandwidth floor (engines.py, floor.py, models.py, run.py, report.py)."""
