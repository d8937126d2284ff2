"""The ``qsdlearn`` command."""

import argparse
import sys

import numpy as np


def _demo(args):
    from ._demo import format_table, run_demo

    print(
        "Compressing the 256 x 256 hidden layer of a perceptron trained on the digits data "
        "(scikit-learn's bundled copy)..."
    )
    rows = run_demo(random_state=args.seed)
    print(format_table(rows))
    return 0


def _compress(args):
    from .weights import compress_weights

    model = compress_weights(
        args.input,
        bits_per_weight=args.bits_per_weight,
        vector_size=args.vector_size,
        n_jobs=args.jobs,
        random_state=args.seed,
    )
    model.save(args.output)
    print(model.report_table())
    return 0


def _decompress(args):
    from ._io import load
    from .weights import CompressedModel

    model = load(args.input)
    if not isinstance(model, CompressedModel):
        raise ValueError(f"{args.input} holds a single matrix, not a compressed model")
    arrays = model.decompress()
    output = str(args.output)
    if output.endswith(".npz"):
        np.savez(output, **arrays)
    elif output.endswith(".safetensors"):
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, output)
    else:
        raise ValueError(f"cannot write {output}: name it .npz or .safetensors")
    print(f"wrote {len(arrays)} tensors to {output}")
    return 0


def _info(args):
    from ._io import load
    from .weights import CompressedModel

    obj = load(args.file)
    if isinstance(obj, CompressedModel):
        print(obj.report_table())
    else:
        s = obj.settings
        print(repr(obj))
        print(f"settings: {s.to_json()}")
        print(f"payload: {obj.nbytes} bytes, {obj.bits_per_element:.4f} bits/element")
    return 0


def build_parser():
    """The argument parser of the ``qsdlearn`` command."""
    parser = argparse.ArgumentParser(
        prog="qsdlearn",
        description="Sparse, quantized matrix factorizations of matrices and network weights.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = commands.add_parser(
        "demo",
        help="compare SVD, VQ, sparse PCA and QSD on a small trained network",
        description="Train a small network on the bundled digits data, compress one weight "
        "matrix with each method at about 2 bits per weight and print a table.",
    )
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    demo.set_defaults(handler=_demo)

    compress = commands.add_parser(
        "compress",
        help="compress a model's weights (.npz or .safetensors) to a target bits per weight",
    )
    compress.add_argument("input", help="weights: a .npz or .safetensors file")
    compress.add_argument("output", help="the compressed model file to write")
    compress.add_argument("--bits-per-weight", type=float, required=True, metavar="B",
                          help="target for the whole file, header and kept tensors included")
    compress.add_argument("--vector-size", type=int, default=8, metavar="D",
                          help="sub-vector length (default: 8)")
    compress.add_argument("--jobs", type=int, default=None, metavar="N",
                          help="layers compressed in parallel (default: 1)")
    compress.add_argument("--seed", type=int, default=0, metavar="S", help="random seed")
    compress.set_defaults(handler=_compress)

    decompress = commands.add_parser("decompress", help="write the decompressed weights")
    decompress.add_argument("input", help="a compressed model file")
    decompress.add_argument("output", help="weights to write: .npz or .safetensors")
    decompress.set_defaults(handler=_decompress)

    info = commands.add_parser("info", help="settings, sizes and ratio of a compressed file")
    info.add_argument("file")
    info.set_defaults(handler=_info)
    return parser


def main(argv=None):
    """Entry point; returns the exit status (1 with a one-line message on bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, TypeError, OSError, ImportError) as exc:
        print(f"qsdlearn {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
