"""The `pi-policy` subcommands: argument parsing and printing, thin shells over the library."""
