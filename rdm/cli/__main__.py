"""`python -m rdm.cli ...` (and `accelerate launch -m rdm.cli train ...`): the rdm command."""

import sys

from . import main

sys.exit(main())
