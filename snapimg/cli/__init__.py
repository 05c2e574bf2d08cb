"""The ``snapimg`` command line: one module per command group."""
