"""``python -m pibl`` is the same as the ``pibl`` console script."""

from pibl.cli import main

raise SystemExit(main())
