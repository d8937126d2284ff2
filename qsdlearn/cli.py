"""The ``qsdlearn`` command."""

import argparse
import errno
import json
import math
import os
import signal
import sys
import warnings

from ._checks import MAX_BITS_PER_WEIGHT


def _demo(args):
    from ._demo import format_table, run_demo

    print(
        "Compressing the 256 x 256 hidden layer of a perceptron trained on the digits data "
        "(scikit-learn's bundled copy)..."
    )
    rows = run_demo(random_state=args.seed)
    print(format_table(rows))
    return 0


def _input_files(path):
    """The files an input path stands for: itself, and for a sharded checkpoint (a folder or
    its ``.json`` index) the ``.safetensors`` and ``.json`` files of its folder."""
    path = os.path.abspath(path)
    folder = path if os.path.isdir(path) else None
    if path.endswith(".json"):
        folder = os.path.dirname(path)
    files = [path]
    if folder is not None and os.path.isdir(folder):
        files += [os.path.join(folder, name) for name in os.listdir(folder)
                  if name.endswith((".safetensors", ".json"))]
    return files


def _check_inputs_exist(args):
    """Refuse a missing input in the words of the other file errors: the weights as
    ``FILE: No such file or directory`` (the library's ValueError reads
    ``no such file: FILE``), the ``--calibration`` and ``--sensitivity`` files with their
    option's name before them; a path that names no file for another reason (a loop of
    symbolic links) with that reason; a device or a pipe as not a regular file."""
    from ._container import is_device_or_pipe, stat_error

    for option, path in ((None, args.input), ("--calibration", args.calibration),
                         ("--sensitivity", args.sensitivity)):
        if path is not None and not os.path.exists(path):
            # the reason, which may be other than absence (a loop of symbolic links)
            missing = stat_error(path) or FileNotFoundError(
                errno.ENOENT, os.strerror(errno.ENOENT), path)
            if option is None:
                raise missing
            raise ValueError(f"{option} {_message(missing)}")
        if path is not None and is_device_or_pipe(path):
            named = path if option is None else f"{option} {path}"
            raise ValueError(f"{named}: not a regular file (a device or a pipe)")


def _check_output(args, file_only=False):
    """Refuse to write over an input (the weights, the ``--calibration`` checkpoint, the
    ``--sensitivity`` file), over an existing output without ``--force``, with
    ``file_only`` (an output that is one file) onto a folder, or without it (a folder of
    shards) onto a file, which ``--force`` does not turn into a folder; checked before any
    work. A symbolic link counts as existing even where it points nowhere. A device or a
    pipe is never written over. A folder of shards that holds nothing but the temporary
    files of a killed write of this host is removed, as not the user's."""
    from ._checkpoint import replaced_by_shards
    from ._container import is_device_or_pipe, remove_stale_temporaries

    if not args.output:
        raise ValueError("the output name is empty: give the file to write")
    output = os.path.abspath(args.output)
    inputs = [("the input", path) for path in _input_files(args.input)]
    if getattr(args, "calibration", None) is not None:
        inputs += [("the --calibration file", path) for path in _input_files(args.calibration)]
    if getattr(args, "sensitivity", None) is not None:
        inputs.append(("the --sensitivity file", os.path.abspath(args.sensitivity)))
    if file_only and os.path.isdir(output):
        raise ValueError(f"cannot write {args.output}: it is a directory")
    if is_device_or_pipe(output):
        raise ValueError(f"cannot write {args.output}: it is a device or a pipe, not a "
                         "regular file")
    if not file_only and os.path.lexists(output) and not os.path.isdir(output):
        raise ValueError(f"cannot write shards into {args.output}: it is not a folder (a "
                         "file or a link to none), and --shard-size writes a folder; give a "
                         "folder name")
    for role, path in inputs:
        if os.path.exists(path) and os.path.exists(output) and os.path.samefile(path, output):
            raise ValueError(f"{args.output} is {role}; write the output elsewhere")
        if (not file_only and os.path.isdir(output) and os.path.exists(path)
                and os.path.samefile(os.path.dirname(path), output)
                and replaced_by_shards(os.path.basename(path))):
            raise ValueError(f"{role} {path} is in {args.output} under the name of a shard "
                             "or of the index, which a sharded write replaces or removes; "
                             "write the shards into another folder")
    if (not file_only and os.path.isdir(output) and not os.path.islink(output)
            and _only_temporaries(output) and remove_stale_temporaries(output)
            and not os.listdir(output)):
        os.rmdir(output)  # left by a killed sharded write of this host: nothing of the user's
    if os.path.lexists(output) and not args.force:
        raise ValueError(f"{args.output} exists; pass --force to overwrite it")
    folder = os.path.dirname(output)
    if not os.path.isdir(folder):  # checked now, not after the whole compression
        raise ValueError(f"the folder of {args.output} does not exist; create it first")


def _only_temporaries(folder):
    """Whether ``folder`` holds files and nothing but the temporary files of a write."""
    from ._container import is_temporary_name

    names = os.listdir(folder)
    return bool(names) and all(is_temporary_name(name) for name in names)


def _load_json(f):
    """The JSON value of file ``f`` and the first key its top-level object names twice, or
    None (``json`` would keep the last value silently)."""
    repeats = []  # (object, key): objects are built innermost first

    def hook(pairs):
        result = {}
        for key, value in pairs:
            if key in result:
                repeats.append((result, key))
            result[key] = value
        return result

    value = json.load(f, object_pairs_hook=hook)
    return value, next((key for obj, key in repeats if obj is value), None)


def _read_sensitivity(path):
    """The ``--sensitivity`` file: a JSON object of tensor name to number (None without)."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8-sig") as f:  # with or without a byte-order mark
            sensitivity, repeated = _load_json(f)
    except OSError as exc:  # a folder, no permission: in the words of the other file errors
        raise ValueError(f"--sensitivity {_message(exc)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"--sensitivity {path}: not a JSON file (not UTF-8 text)") from None
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ValueError(f"--sensitivity {path}: not a readable JSON file ({exc})") from None
    if repeated is not None:
        raise ValueError(f"--sensitivity {path}: the name {repeated!r} is given more than "
                         "once; give each tensor one sensitivity")
    if not isinstance(sensitivity, dict):
        raise ValueError(f"--sensitivity {path}: give a JSON object of tensor name to number, "
                         'e.g. {"layer.weight": 2.5}')
    return sensitivity


def _compress(args):
    from .weights import compress_weights

    if args.calibration_damping is not None and args.calibration is None:
        raise ValueError("--calibration-damping applies to data-aware compression: give "
                         "--calibration FILE as well, or leave the damping out")
    _check_inputs_exist(args)
    _check_output(args, file_only=True)
    sensitivity = _read_sensitivity(args.sensitivity)
    model = compress_weights(
        args.input,
        bits_per_weight=args.bits_per_weight,
        vector_size=args.vector_size,
        keep=args.keep,
        calibration=args.calibration,
        calibration_damping=args.calibration_damping,
        sensitivity=sensitivity,
        n_jobs=args.jobs,
        random_state=args.seed,
        verbose=True if args.verbose else None,
    )
    model.save(args.output, overwrite=args.force)
    print(model.report_table())
    return 0


def _decompress(args):
    from ._checkpoint import write_checkpoint
    from ._dtypes import numpy_dtype
    from ._io import load
    from ._model import CompressedModel

    _check_output(args, file_only=args.shard_size is None)
    if args.shard_size is not None and args.output.lower().endswith((".safetensors", ".npz")):
        warnings.warn(f"with --shard-size, {args.output} is written as a folder of shards "
                      "(give it a folder's name)", UserWarning)
    model = _load_named(load, args.input)
    if not isinstance(model, CompressedModel):
        raise ValueError(f"{args.input} holds a single matrix, not a compressed model")
    sizes = {
        name: math.prod(entry.shape) * numpy_dtype(entry.dtype).itemsize
        for name, entry in model.layers.items()
    }
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        files = write_checkpoint(args.output, sizes, model.decompress, args.shard_size)
    for warning in caught:
        print(f"qsdlearn decompress: note: {warning.message}", file=sys.stderr)
    shards = len(files) - 1
    where = args.output if len(files) == 1 else (
        f"{shards} shard{'s' * (shards != 1)} and an index in {args.output}")
    print(f"wrote {len(sizes)} tensor{'s' * (len(sizes) != 1)} to {where}")
    return 0


def _load_named(load, path):
    """``load(path)``, its ValueError naming the file first."""
    try:
        return load(path)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def _shard_size(text):
    """An argparse ``type``: bytes of a size such as ``500MB``, ``2GB`` or ``1000000`` (a
    finite number); argparse says what is wrong with any other (exit status 2)."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    upper = text.strip().upper()
    for unit, factor in units.items():
        if upper.endswith(unit):
            upper, scale = upper[: -len(unit)], factor
            break
    else:
        scale = 1
    try:
        size = int(float(upper) * scale)
    except (ValueError, OverflowError):  # also "inf" and "1e400", which no int holds
        raise argparse.ArgumentTypeError(
            f"must be a size such as 500MB or 2GB, got {text!r}") from None
    if size <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive size, got {text!r}")
    return size


def _info(args):
    from ._io import load
    from ._model import CompressedModel

    obj = _load_named(load, args.file)
    if isinstance(obj, CompressedModel):
        print(obj.report_table())
        on_disk = os.path.getsize(args.file)
        if on_disk != obj.nbytes:  # the sizes above are those of the current format version
            print(f"file on disk: {on_disk} bytes, "
                  f"{8 * on_disk / max(obj.n_weights, 1):.3f} bits/weight, in an earlier "
                  f"format version; saved again, it takes the {obj.nbytes} bytes above")
    else:
        s = obj.settings
        print(repr(obj))
        print(f"settings: {s.to_json()}")
        print(f"payload: {obj.nbytes} bytes, {obj.bits_per_element:.4f} bits/element")
    return 0


def _checked(convert, accept, requirement):
    """An argparse ``type``: ``convert(text)`` when ``accept`` holds for it; otherwise an error
    that names the option the user typed (argparse adds it) and what it must be."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"must be {requirement}, got {text!r}")
        return value
    return parse


_BITS = _checked(float, lambda v: 0 < v <= MAX_BITS_PER_WEIGHT,
                 f"a number of bits in (0, {MAX_BITS_PER_WEIGHT:g}]")
_SEED = _checked(int, lambda v: 0 <= v < 2**32, "an integer in [0, 2**32 - 1]")
_SIZE = _checked(int, lambda v: v >= 1, "a positive integer")
_JOBS = _checked(int, lambda v: v != 0, "a nonzero integer (-1: every core)")


def _max_damping():
    from .weights import MAX_DAMPING

    return MAX_DAMPING


_DAMPING = _checked(float, lambda v: 0 <= v <= _max_damping(), "a number in [0, 1e12]")


def build_parser():
    """The argument parser of the ``qsdlearn`` command."""
    parser = argparse.ArgumentParser(
        prog="qsdlearn",
        description="Sparse, quantized matrix factorizations of matrices and network weights.",
    )
    # the package (its __init__) is loaded before any of its modules
    parser.add_argument("--version", action="version",
                        version=f"%(prog)s {sys.modules[__package__].__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="compare SVD, VQ, sparse PCA and QSD on a small trained network",
        description="Train a small network on the bundled digits data, compress one weight "
        "matrix with each method at about 2 bits per weight and print a table.",
    )
    demo.add_argument("--seed", type=_SEED, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)

    compress = commands.add_parser(
        "compress",
        help="compress a model's weights (.npz or .safetensors) to a target bits per weight",
    )
    compress.add_argument("input", help="weights: a .npz or .safetensors file, a sharded "
                          "checkpoint's .safetensors.index.json or a folder of shards")
    compress.add_argument("output", help="the compressed model file to write")
    compress.add_argument("--bits-per-weight", type=_BITS, required=True, metavar="B",
                          help="target for the whole file, header and kept tensors included")
    compress.add_argument("--vector-size", type=_SIZE, default=8, metavar="D",
                          help="sub-vector length (default: 8)")
    compress.add_argument("--jobs", type=_JOBS, default=None, metavar="N",
                          help="layers compressed in parallel (default: 1; negative counts "
                          "from the cores, as joblib does: -1 every core, -2 all but one, at "
                          "least one)")
    compress.add_argument("--seed", type=_SEED, default=0, metavar="S", help="random seed")
    compress.add_argument("--keep", action="append", default=[], metavar="PATTERN",
                          help="store tensors whose name matches this glob verbatim, e.g. "
                          "'*embed*' or 'lm_head.*' (repeatable)")
    compress.add_argument("--calibration", metavar="FILE",
                          help="data-aware compression: a .npz or .safetensors file holding, "
                          "under a tensor's name, the Gram matrix (in, in) of its inputs or "
                          "row weights (rows,) for an embedding table")
    compress.add_argument("--calibration-damping", metavar="F", type=_DAMPING, default=None,
                          help="with --calibration: fraction of each Gram matrix's mean "
                          "diagonal added to its diagonal in the objective, so that the weight "
                          "error counts too (default 0.1; 0 fits the calibration data alone)")
    compress.add_argument("--sensitivity", metavar="FILE",
                          help="a JSON object of tensor name to sensitivity: each tensor's "
                          "relative error is weighted by it in the budget (see "
                          "compress_weights)")
    compress.add_argument("--force", action="store_true", help="overwrite an existing output")
    compress.add_argument("--verbose", action="store_true",
                          help="progress bars (the planner's estimates, then the final fits) "
                               "even when standard error is not a terminal")
    compress.set_defaults(handler=_compress)

    decompress = commands.add_parser("decompress", help="write the decompressed weights")
    decompress.add_argument("input", help="a compressed model file")
    decompress.add_argument("output", help="weights to write: .npz or .safetensors, or a "
                            "folder of shards with --shard-size (.npz has no bfloat16: those "
                            "tensors are written as float32, exactly)")
    decompress.add_argument("--shard-size", metavar="SIZE", type=_shard_size,
                            help="write safetensors shards of at most SIZE (e.g. 2GB; a tensor "
                            "larger than SIZE gets a shard of its own) and an index into the "
                            "folder OUTPUT")
    decompress.add_argument("--force", action="store_true",
                            help="overwrite an existing output (with --shard-size: write into "
                            "an existing folder, replacing its model.safetensors.index.json "
                            "and removing every model-NNNNN-of-NNNNN.safetensors shard this "
                            "write does not produce)")
    decompress.set_defaults(handler=_decompress)

    info = commands.add_parser(
        "info", help="per-layer dtype, setting, bits per weight and SQNR of a compressed file, "
        "and the ratio over the original")
    info.add_argument("file", help="a compressed model or matrix file written by qsdlearn")
    info.set_defaults(handler=_info)
    return parser


def _message(exc):
    """The one line an error is reported with (a file's name before the reason, for OSError)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename is not None:
        return f"{exc.filename or repr(exc.filename)}: {exc.strerror}"  # '' for an empty name
    return str(exc)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by the console script's handler (:func:`run`), so
    that a termination unwinds as Ctrl-C does: worker processes stopped, no partial output."""


def _terminate(signum, frame):
    raise _Terminated


def main(argv=None):
    """Entry point; returns the exit status: 1 with a one-line message on bad input, 130 when
    interrupted (Ctrl-C; no partial output is left), 143 when terminated (SIGTERM, under
    :func:`run`; likewise). Warnings are printed as one line each."""
    prefix = "qsdlearn"

    def show(message, category, filename, lineno, file=None, line=None):
        print(f"{prefix}: warning: {message}", file=sys.stderr)

    try:  # parsing too: a number option may import the library (e.g. --calibration-damping)
        args = build_parser().parse_args(argv)
        prefix = f"qsdlearn {args.command}"
        with warnings.catch_warnings():
            warnings.showwarning = show
            try:
                return args.handler(args)
            except (ValueError, TypeError, OSError, ImportError) as exc:
                print(f"{prefix}: error: {_message(exc)}", file=sys.stderr)
                return 1
    except KeyboardInterrupt as exc:
        if isinstance(exc, _Terminated):
            print(f"{prefix}: terminated", file=sys.stderr)
            return 128 + signal.SIGTERM
        print(f"{prefix}: interrupted", file=sys.stderr)
        return 130


def run():
    """The console script: :func:`main` on the command line's arguments, then exit with its
    status. A Ctrl-C once the command has finished, while the interpreter shuts down (about
    half a second after a compression), is ignored: its output is complete, and the exit
    status says so. SIGTERM is handled as Ctrl-C is (without it, the process died at once and
    left its worker processes running)."""
    signal.signal(signal.SIGTERM, _terminate)
    status = main()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # from here on, no exception to unwind
    sys.exit(status)


if __name__ == "__main__":
    run()
