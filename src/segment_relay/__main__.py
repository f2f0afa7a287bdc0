"""`python -m segment_relay`: the same as the `segment-relay` command."""

import sys

from .cli import main

sys.exit(main())
