"""The `pi-policy` subcommands that live in their own modules, each exposing add_parser(subparsers)."""
