"""Graph builder and the entry points behind each ``txstream`` subcommand."""
