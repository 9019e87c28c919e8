import sys

from gossipfl.cli import main

sys.exit(main())
