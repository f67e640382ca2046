"""``python -m zoo.delivery``, as the messages of earlier jobs print it: see
``zoo.tracking.delivery``."""

import contextlib
import sys

from zoo.tracking.delivery import main

if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
