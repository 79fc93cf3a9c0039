"""`python -m bear_ds COMMAND ...` (e.g. under `accelerate launch -m bear_ds evaluate ...`)."""

import sys

from bear_ds.cli import main

sys.exit(main())
