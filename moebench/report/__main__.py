import sys

from moebench.report.cli import main

sys.exit(main())
