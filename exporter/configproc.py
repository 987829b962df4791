"""Load the configuration in a short-lived child interpreter.

Parsing YAML builds a node tree several times the size of the result (about 50 MB for 10,000
operations). In the long-running exporter that memory would stay resident as heap fragmentation even
after it is freed; parsed in a child, only the small result (pickled back over a pipe) enters the
exporter. Behaviour is exactly ``config.load_config``'s: same result, same one-line ``ConfigError``.

Run as ``python -m exporter.configproc FILE`` it writes a pickled ``Config`` (exit 0) or a pickled
``ConfigError`` (exit 3) to stdout. Only the exporter itself starts it, so unpickling is safe.
"""

from __future__ import annotations

import logging
import os
import pickle
import subprocess
import sys

from exporter.config import Config, ConfigError, load_config

log = logging.getLogger(__name__)

CONFIG_ERROR_EXIT = 3
CHILD_TIMEOUT_SECONDS = 120.0


def load_config_isolated(path: str | os.PathLike[str]) -> Config:
    """``load_config(path)``, parsed in a child process; falls back to parsing here if that fails."""
    try:
        child = subprocess.run(
            [sys.executable, "-m", "exporter.configproc", os.fsdecode(path)],
            capture_output=True,
            timeout=CHILD_TIMEOUT_SECONDS,
            check=False,
        )
        if child.returncode in (0, CONFIG_ERROR_EXIT):
            result = pickle.loads(child.stdout)  # noqa: S301 (our own child process wrote it)
            if child.returncode == 0 and isinstance(result, Config):
                return result
            if isinstance(result, ConfigError):
                raise result
    except (OSError, subprocess.SubprocessError, pickle.UnpicklingError, EOFError) as error:
        log.debug("loading the config in a child process failed (%s); loading it here", type(error).__name__)
    return load_config(path)


def main(argv: list[str]) -> int:
    try:
        result: Config | ConfigError = load_config(argv[0])
        code = 0
    except ConfigError as error:
        result, code = error, CONFIG_ERROR_EXIT
    sys.stdout.buffer.write(pickle.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
