"""The `panfoma` command line, one module per concern: `main` (the console script's entry point: the parser, the run
and the error boundary), `commands` (each command's help line, where its options live, and its handler), `options`
(the flags every command shares and the `(default: ...)` note on every option), `inputs` (the input-file readers and
checks that run before a command imports the library, and `PanFoMaUsageError`). Run it as `panfoma` or `python -m
panfoma.cli`; importing this package imports nothing else, so `panfoma --help` stays fast.
"""
