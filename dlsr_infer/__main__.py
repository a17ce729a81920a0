"""`python -m dlsr_infer ...` is `dlsr-upscale ...`."""
from __future__ import annotations

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
