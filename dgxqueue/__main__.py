"""``python -m dgxqueue``: the same command as ``dgxqueue``."""

from dgxqueue.cli import run

if __name__ == "__main__":
    run()
