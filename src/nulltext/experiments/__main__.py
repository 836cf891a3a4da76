"""``python -m nulltext.experiments``."""

import sys

from . import main

sys.exit(main())
