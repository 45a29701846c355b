"""The benchmark harness: speed against the Python ceiling and nginx, and resilience under faults.

    python -m bench            # the full run (`make bench`), writes bench/results.md and results.json
    python -m bench --smoke    # every case and scenario once for about a second, into a temp dir

Everything it starts listens on 127.0.0.1 only and is stopped when the run ends.
"""
