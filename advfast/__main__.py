import sys

from advfast.cli import main

sys.exit(main())
