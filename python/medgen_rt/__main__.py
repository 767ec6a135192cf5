import sys

from medgen_rt.cli import main

sys.exit(main())
