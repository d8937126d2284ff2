"""The command line and the demo."""

import numpy as np
import pytest

from qsdlearn import Constraints
from qsdlearn._demo import DEMO_METHODS, DemoMethod, format_table, run_demo
from qsdlearn.cli import build_parser, main


def test_demo_rows_are_measured():
    methods = [
        DemoMethod("truncated SVD", "rank 4", 0, dict(n_components=4, max_iter=5)),
        DemoMethod("VQ", "d=8, k=16", 8, dict(n_components=16, n_nonzero=1, code_bits=0, max_iter=5)),
    ]
    rows = run_demo(methods=methods)
    assert [row["method"] for row in rows] == ["original", "truncated SVD", "VQ"]
    original, svd, vq = rows
    assert original["accuracy"] > 0.9
    assert svd["bits_per_weight"] == pytest.approx(4 * (256 + 256) * 32 / 256**2)
    # 16 codewords: 4 bits per 8 weights, plus a float32 codebook of 16 x 8
    assert vq["bits_per_weight"] == pytest.approx((8192 * 4 + 16 * 8 * 32) / 256**2)
    for row in rows[1:]:
        assert np.isfinite(row["sqnr_db"]) and row["sqnr_db"] > 0
        assert 0.0 <= row["accuracy"] <= 1.0
    table = format_table(rows)
    assert "bits/weight" in table and "VQ" in table


def test_demo_methods_sit_near_two_bits_per_weight():
    """The demo compares methods at comparable rates: check the formulas, without fitting."""
    for method in DEMO_METHODS:
        d = 256 if method.vector_size == 0 else method.vector_size
        n = 256 * 256 // d
        budget = Constraints(**method.params).bits(n, d, float_bits=32)
        assert 1.5 <= budget.per_element <= 2.6, method


def test_cli_requires_a_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([])
    assert exit_info.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_cli_rejects_unknown_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_compress_info_decompress_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    weights = {
        "layer.weight": rng.normal(size=(64, 32)).astype(np.float32),
        "layer.bias": np.zeros(64, dtype=np.float32),
    }
    source = tmp_path / "w.npz"
    np.savez(source, **weights)
    target = tmp_path / "w.qsd"
    assert main(["compress", str(source), str(target), "--bits-per-weight", "8",
                 "--vector-size", "4", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "total" in out
    assert main(["info", str(target)]) == 0
    assert "bits/weight" in capsys.readouterr().out
    for name in ["out.npz", "out.safetensors"]:
        assert main(["decompress", str(target), str(tmp_path / name)]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as restored:
        assert set(restored.files) == set(weights)
        assert restored["layer.weight"].shape == (64, 32)
        np.testing.assert_array_equal(restored["layer.bias"], weights["layer.bias"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "missing.qsd"], "No such file"),
        (["compress", "missing.npz", "out.qsd", "--bits-per-weight", "2"], "no such file"),
        (["decompress", "missing.qsd", "out.npz"], "No such file"),
    ],
)
def test_cli_errors_are_one_line_messages(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_cli_rejects_unreadable_files(tmp_path, capsys):
    junk = tmp_path / "junk.qsd"
    junk.write_bytes(b"not a model at all")
    assert main(["info", str(junk)]) == 1
    assert "not a qsdlearn file" in capsys.readouterr().err
    weights = tmp_path / "w.txt"
    weights.write_text("hello")
    assert main(["compress", str(weights), str(tmp_path / "o"), "--bits-per-weight", "2"]) == 1
    assert ".npz or .safetensors" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["compress", "a.npz", "b.qsd"])  # --bits-per-weight is required
