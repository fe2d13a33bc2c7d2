"""Run the flash-sale demo: `python -m workers.demo --help`."""

import sys

from workers.demo.cli import main

sys.exit(main())
