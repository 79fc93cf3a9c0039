"""`python -m bear_ds COMMAND ...` (e.g. under `accelerate launch -m bear_ds evaluate ...`)."""

from bear_ds.cli import console_main

console_main()
