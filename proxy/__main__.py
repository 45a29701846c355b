"""`python -m proxy run ...` is `resilience-proxy run ...`."""

from .cli import main

raise SystemExit(main())
