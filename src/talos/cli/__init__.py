"""The ``talos`` command line: one module per command group."""
