import sys

from prefkern.cli import main

sys.exit(main())
