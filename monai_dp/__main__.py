"""``python -m monai_dp COMMAND ...``: the same entry point as the ``monai-dp`` console script (:mod:`monai_dp.cli`)."""

from __future__ import annotations

import sys

from monai_dp.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
