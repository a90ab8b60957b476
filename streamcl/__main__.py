import sys

from streamcl.cli import main

sys.exit(main())
