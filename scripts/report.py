"""Cost report: `python scripts/report.py [VIEW] [options]`, the same as the `metrion-report` command."""

import sys

from metrion_addon.report import main

if __name__ == "__main__":
    sys.exit(main())
