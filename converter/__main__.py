"""``python -m converter``: the ``perceiver-convert`` command line where the console
script is not on PATH, through the same entry point (:mod:`converter.console_script`:
a Ctrl-C or SIGTERM while the command line loads is one line and exit 130 or 143)."""

import sys

from converter.console_script import main

if __name__ == "__main__":
    sys.exit(main())
