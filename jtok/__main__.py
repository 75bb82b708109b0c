import sys

from jtok.cli import main

sys.exit(main())
