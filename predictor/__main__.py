"""Container entrypoint: ``python -m predictor [args]`` (``--help`` lists them)."""

from .server import main

if __name__ == "__main__":
    main()
