"""``python -m memsafe_dev``: the ``memsafe-dev`` console script."""

from memsafe_dev.cli import main

raise SystemExit(main())
