"""One module per `fastdume` subcommand, each with add_parser(subparsers) and run(args) -> int."""
