"""The ``edge-alast`` command line: one module per area, the group in :mod:`.main`."""
