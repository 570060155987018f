"""`python -m peftkit.bench params ...`: the `bench` command without the rest of `peftkit`."""
import sys

from . import main

sys.exit(main())
