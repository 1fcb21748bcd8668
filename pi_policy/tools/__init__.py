"""The `pi-policy` command line: one entry point, one module per subcommand, each a thin shell over the library."""
