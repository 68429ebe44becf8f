"""``python -m klein_core`` is the same program as ``klein-lora``."""

from klein_core.cli import main

raise SystemExit(main())
