import sys

from dualrpo_mcore.cli import main

sys.exit(main())
