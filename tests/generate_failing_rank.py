"""Run ``fastdiff generate`` with rank 1's PNG writer failing on its second image (an injected full
disk): tests/test_generate.py starts it under torchrun to see the job end with that error."""

import os
import sys

from fastdiff import cli, generation

if os.environ.get("RANK") == "1":
    calls = []
    real = generation.png_bytes

    def failing(image):
        calls.append(1)
        if len(calls) == 2:
            raise OSError(28, "No space left on device (injected into rank 1)")
        return real(image)

    generation.png_bytes = failing

sys.exit(cli.main(sys.argv[1:]))
