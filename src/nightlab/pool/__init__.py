"""The research pool (docs/pool.md): untrusted workers search, this lab verifies, a leaderboard credits them.

Host side: ``trust`` (the verification rules), ``store`` (workers and claims in the ledger), ``snapshot``
(the sanitised bundle workers start from), ``api`` (the HTTP router), ``feeder`` (the researcher that feeds
claims to an ordinary engine session). Worker side: ``worker``.
"""
