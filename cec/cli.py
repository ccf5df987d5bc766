"""What every CLI shares: user errors become one line on stderr and exit code 2, never a traceback."""
import os
import sys
from contextlib import contextmanager

from cec.errors import CECError


@contextmanager
def user_errors(prog: str):
    try:
        yield
    except CECError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"{prog}: error: no such file: {e.filename}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # `script ... | head`: the reader left, nothing more to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:  # an unwritable output, a folder where a file should be, a full disk: the user's to fix
        where = f"{e.filename}: " if e.filename else ""
        print(f"{prog}: error: {where}{e.strerror or e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
