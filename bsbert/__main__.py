import sys

from bsbert.cli import main

sys.exit(main())
