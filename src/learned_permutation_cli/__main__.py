"""``python -m learned_permutation_cli``: the same as the ``learned-permutation`` command."""

import sys

from learned_permutation_cli import main

sys.exit(main())
