"""`python -m forge ...` is the `forge` command (what `torchrun -m forge` starts on every rank)."""
import sys

from forge.cli import main

sys.exit(main())
