"""``python -m placement_search`` = the ``placement-search`` command."""

import sys

from placement_search.cli import main

sys.exit(main())
