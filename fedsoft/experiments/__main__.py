"""``python -m fedsoft.experiments``: the paper-figure runner (:mod:`.runner`)."""

from fedsoft.experiments.runner import main

if __name__ == "__main__":
    raise SystemExit(main())
