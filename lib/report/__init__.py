"""``report.py``'s analysis of a run: reading a run folder or the original trainer's logs into
one table, the findings, and the report's text and figures."""
