"""``python -m aam_fast``: the ``aam-fast`` command line."""

from .cli import main

raise SystemExit(main())
