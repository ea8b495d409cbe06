import sys

from fl2ora.cli import main

sys.exit(main())
