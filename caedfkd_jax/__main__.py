"""`python -m caedfkd_jax ...` is the `caedfkd` command."""

import sys

from caedfkd_jax.cli.main import main

sys.exit(main())
