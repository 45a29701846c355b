"""`python -m proxy.demo`: the walkthrough against the bundled mock providers (`make demo`)."""

from proxy.demo.walkthrough import main

raise SystemExit(main())
