"""One module per `medlora` command, each with `add_arguments(parser)` and `run(args) -> exit code`.

Modules import heavy libraries inside `run`, so `medlora --help` stays fast.
"""
