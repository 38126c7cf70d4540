"""``python -m lrfind``: the same as the ``lrfind`` console script."""

from .cli import main

raise SystemExit(main())
