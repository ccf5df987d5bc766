"""What every CLI shares: user errors become one line on stderr and exit code 2, never a traceback; the runtime
options --device, --dtype and --threads, with one default rule (cuda when available, else cpu; bfloat16 on CUDA,
float32 on CPU, as cec.engine.weights.default_dtype)."""
import argparse
import os
import sys
from contextlib import contextmanager

import torch

from cec.engine.scorer import ATTENTION
from cec.engine.weights import default_dtype
from cec.errors import CECError, ConfigError

DTYPES = ("float32", "bfloat16", "float16")


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


def positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {v}")
    return v


def add_runtime_args(parser, dtypes: tuple[str, ...] = DTYPES) -> None:
    """--device, --dtype and --threads; runtime(args) turns them into (device, dtype)."""
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available, else cpu; under "
                                         "torchrun cuda is cuda:LOCAL_RANK)")
    parser.add_argument("--dtype", choices=("auto", *dtypes), default="auto",
                        help="model weights: auto = bfloat16 on CUDA, float32 on CPU (default: %(default)s)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="CPU threads of torch (default: torch's)")


def add_scoring_args(parser) -> None:
    """--attention and --compile: how the shared-prefix scorers run (cec.engine.scorer.PrefixScorer)."""
    parser.add_argument("--attention", choices=ATTENTION, default="cascade",
                        help="question attention: cascade (two partials merged; the default) or flex (one "
                             "FlexAttention call per layer, compiled on first use)")
    parser.add_argument("--compile", action="store_true",
                        help="compile the layer stack (torch.compile; CUDA graphs on a GPU) and run question "
                             "batches at fixed shapes: the first note pays the compilation (minutes on a CPU)")


def runtime(args):
    """(torch.device, torch.dtype) of add_runtime_args' options, and --threads applied. A device that torch does
    not know, or CUDA where there is none, is a ConfigError (one line)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and "LOCAL_RANK" in os.environ:  # under torchrun, one GPU per local rank
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} (cpu, cuda, cuda:N, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available")
    dtype = default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)
    return device, dtype
