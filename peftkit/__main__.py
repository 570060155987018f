"""`python -m peftkit ...` runs the `peftkit` command."""
import sys

from .cli import main

sys.exit(main())
