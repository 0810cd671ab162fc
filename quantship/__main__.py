import sys

from quantship.cli import main

sys.exit(main())
