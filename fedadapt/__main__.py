import sys

from fedadapt.cli import main

sys.exit(main())
