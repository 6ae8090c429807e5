import sys

from session_watchdog.cli import main

sys.exit(main())
