"""fxscale.cli: the `fxscale` command line, one module per command; argument types shared by
all commands in args.py.

An application layer: may import any stage."""
