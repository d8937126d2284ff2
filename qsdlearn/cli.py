"""The ``qsdlearn`` command."""

import argparse
import sys


def _demo(args):
    from ._demo import format_table, run_demo

    print(
        "Compressing the 256 x 256 hidden layer of a perceptron trained on the digits data "
        "(scikit-learn's bundled copy)..."
    )
    rows = run_demo(random_state=args.seed)
    print(format_table(rows))
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
    return parser


def main(argv=None):
    """Entry point; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
