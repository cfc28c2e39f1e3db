"""``python3 -m coloproxy``: the same as the ``coloproxy`` console script."""

import sys

from coloproxy.cli import main

sys.exit(main())
