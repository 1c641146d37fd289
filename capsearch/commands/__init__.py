"""CLI subcommands, one module per stage; heavy imports happen inside the handlers."""
