"""``python -m edge_alast.cli``: the same as the ``edge-alast`` command."""
from .main import main

main()
