"""``python -m lbmqtt`` is the ``lbmqtt`` command."""

from .cli import main

raise SystemExit(main())
