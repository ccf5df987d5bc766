"""What every CLI shares: user errors become one line on stderr and exit code 2, never a traceback."""
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
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)
