import sys

from freeanchor.cli import main

sys.exit(main())
