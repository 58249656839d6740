"""`python -m fxscale` runs the command line."""
import sys

from fxscale.cli.main import main

sys.exit(main())
