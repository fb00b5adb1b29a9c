"""The commands: one module per console script, named for the command (``sfv-train``: ``train``)."""
