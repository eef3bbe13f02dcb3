"""`python -m smda_callback.cli ...` is `smda ...`."""

import sys

from .main import main

sys.exit(main())
