"""`python -m gateway` is the `kvgate` command."""

from gateway.cli import main

raise SystemExit(main())
