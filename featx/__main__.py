"""`python -m featx` (what `torchrun -m featx` runs): the featx command."""

import sys

from featx.cli import main

sys.exit(main())
