"""One module per ``seqstream`` subcommand (see :mod:`pipeline.cli`)."""
