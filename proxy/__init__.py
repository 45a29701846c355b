"""resilience-proxy: a sidecar that puts cache, circuit breakers, retries, fallback and
stale-if-error in front of flaky HTTP APIs."""

__version__ = "0.1.0"
