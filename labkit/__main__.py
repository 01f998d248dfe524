"""``python -m labkit`` is the ``labkit`` command (useful where the console script is not installed)."""
from labkit.cli import main

raise SystemExit(main())
