"""`python -m gateway` runs the `mailgw` command line."""

from gateway.cli import main

raise SystemExit(main())
