"""papertune stages: one module per stage, each runnable as `python -m tasks.<stage> [--params FILE]`."""

import logging

# bitsandbytes 0.50 warns at import that the optional `kernels` package is missing and falls back to its own
# CPU kernels; the warning would open every stage's output without telling the user anything to do.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
