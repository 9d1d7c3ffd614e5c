"""``python -m cli``: the ``narrative`` command without its console script (what a provider
runs inside an environment)."""

from .main import main

main()
