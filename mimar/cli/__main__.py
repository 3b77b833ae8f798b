"""``python -m mimar.cli`` and ``torchrun ... -m mimar.cli``."""

import sys

from mimar.cli import main

sys.exit(main())
