"""``python -m carsynth`` is the ``carsynth`` command (torchrun uses this entry point too)."""

from carsynth.cli import main

raise SystemExit(main())
