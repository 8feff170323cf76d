"""``python -m bifrost.worker``: the untrusted CKKS worker's entry point (see :mod:`bifrost.worker.cli`)."""

import sys

from .cli import main

sys.exit(main())
