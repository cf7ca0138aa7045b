"""python -m dsa.kernels build: compile the C++ CPU kernels ahead of time (or report why they cannot be built)."""

import sys

from . import cpu_attention


def main(argv: list[str]) -> int:
    if argv != ["build"]:
        print("usage: python -m dsa.kernels build", file=sys.stderr)
        return 2
    try:
        module = cpu_attention.kernel()
    except RuntimeError as error:
        print(f"dsa: {error}", file=sys.stderr)
        return 1
    print(f"dsa: the CPU kernels are built: {module.__file__}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
