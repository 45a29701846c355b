"""`python -m proxy run ...` is `resilience-proxy run ...`."""

from proxy.ops.cli import main

raise SystemExit(main())
