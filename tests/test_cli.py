"""The command line and the demo."""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest

import qsdlearn
from qsdlearn import Constraints
from qsdlearn._demo import DEMO_METHODS, DemoMethod, format_table, run_demo
from qsdlearn.cli import main

from ._data import run_python

safetensors_numpy = pytest.importorskip("safetensors.numpy")


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


def test_demo_times_fits_without_compiling(monkeypatch):
    """Each method's timed fit compiles no kernel: a one-iteration fit of the same method
    runs first (a fresh user's first demo had reported 13 s for a 0.3 s fit)."""
    import numba

    from qsdlearn import _demo, _kernels, _seeding

    def compiled():
        return sum(len(f.signatures) for module in (_kernels, _seeding)
                   for f in vars(module).values()
                   if isinstance(f, numba.core.registry.CPUDispatcher))

    timed, fit = [], _demo._compress

    def counting(weight, method, random_state):
        before = compiled()
        result = fit(weight, method, random_state)
        if method.params.get("max_iter") != 1:
            timed.append((method.name, compiled() - before))
        return result

    monkeypatch.setattr(_demo, "_compress", counting)
    methods = [DemoMethod("QSD", "d=8, k=8, 2 of 8, 3-bit codes", 8,
                          dict(n_components=8, n_nonzero=2, code_bits=3, max_iter=3))]
    run_demo(methods=methods)
    assert timed == [("QSD", 0)]


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
        "layer.weight": rng.normal(size=(16, 64)).astype(np.float32),  # 64 sub-vectors: fast
        "layer.bias": np.zeros(16, dtype=np.float32),
    }
    source = tmp_path / "w.npz"
    np.savez(source, **weights)
    target = tmp_path / "w.qsd"
    assert main(["compress", str(source), str(target), "--bits-per-weight", "16",
                 "--vector-size", "16", "--seed", "1"]) == 0
    out = capsys.readouterr().out
    assert "layer.weight" in out and "total" in out
    assert main(["info", str(target)]) == 0
    info = capsys.readouterr().out
    assert "bits/weight" in info and "file on disk" not in info
    for name in ["out.npz", "out.safetensors"]:
        assert main(["decompress", str(target), str(tmp_path / name)]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as restored:
        assert set(restored.files) == set(weights)
        assert restored["layer.weight"].shape == (16, 64)
        np.testing.assert_array_equal(restored["layer.bias"], weights["layer.bias"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["info", "missing.qsd"], "No such file"),
        (["compress", "missing.npz", "out.qsd", "--bits-per-weight", "2"],
         "qsdlearn compress: error: missing.npz: No such file or directory\n"),
        (["compress", "missing", "out.qsd", "--bits-per-weight", "2"],  # a folder of shards
         "qsdlearn compress: error: missing: No such file or directory\n"),
        (["compress", "w.npz", "out.qsd", "--bits-per-weight", "2", "--calibration",
          "missing.npz"],
         "qsdlearn compress: error: --calibration missing.npz: No such file or directory\n"),
        (["compress", "w.npz", "out.qsd", "--bits-per-weight", "2", "--sensitivity",
          "missing.json"],
         "qsdlearn compress: error: --sensitivity missing.json: No such file or directory\n"),
        (["decompress", "missing.qsd", "out.npz"], "No such file"),
        (["info", ""], "qsdlearn info: error: '': No such file or directory\n"),
    ],
)
def test_cli_errors_are_one_line_messages(argv, message, capsys, tmp_path, monkeypatch):
    """A missing file reads ``FILE: reason``, as the operating system's errors do."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


@pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="POSIX symlinks")
@pytest.mark.parametrize("argv, message", [
    (["compress", "loop", "out.qsd", "--bits-per-weight", "2"], "error: loop: "),
    (["compress", "w.npz", "out.qsd", "--bits-per-weight", "2", "--calibration", "loop"],
     "error: --calibration loop: "),
    (["info", "loop"], "error: loop: "),
])
def test_cli_names_a_loop_of_symbolic_links_as_such(argv, message, capsys, tmp_path,
                                                     monkeypatch):
    """A path that names no file because its links loop is not reported as missing."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32))
    os.symlink("other", tmp_path / "loop")
    os.symlink("loop", tmp_path / "other")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "No such file" not in err, err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv, option", [
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "0"], "--bits-per-weight"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "nan"], "--bits-per-weight"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "1e9"], "--bits-per-weight"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "64.5"], "--bits-per-weight"),
    (["decompress", "a.qsd", "out", "--shard-size", "abc"], "--shard-size"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "2", "--seed", "-5"], "--seed"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "2", "--vector-size", "0"],
     "--vector-size"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "2", "--jobs", "0"], "--jobs"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "2", "--calibration-damping", "-1"],
     "--calibration-damping"),
    (["compress", "a.npz", "b.qsd", "--bits-per-weight", "2", "--calibration-damping", "1e13"],
     "--calibration-damping"),
    (["demo", "--seed", "-1"], "--seed"),
])
def test_cli_numbers_are_checked_against_the_option_typed(argv, option, capsys):
    """Out-of-range numbers are refused before any work, by the option's name (not by the
    Python parameter it feeds)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: must be" in err


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


# -- real checkpoints: dtypes, 0-d tensors, shards, overwriting, keep patterns -----------------

BF16 = np.dtype(ml_dtypes.bfloat16)


def checkpoint_weights():
    """Small enough that the default candidates fit fast (128 sub-vectors a layer); so small
    that the header alone costs several bits per weight."""
    rng = np.random.default_rng(0)
    return {
        "embed.weight": rng.normal(size=(16, 64)).astype(BF16),
        "layers.0.weight": rng.normal(size=(16, 64)).astype(BF16),
        "layers.1.weight": rng.normal(size=(16, 64)).astype(np.float16),
        "norm.weight": np.ones(64, dtype=BF16),
        "bn.num_batches_tracked": np.array(5, dtype=np.int64),
        "temperature": np.array(0.7, dtype=np.float32),
    }


@pytest.fixture(scope="module")
def compressed_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    safetensors_numpy.save_file(checkpoint_weights(), str(folder / "model.safetensors"))
    target = folder / "model.qsd"
    assert main(["compress", str(folder / "model.safetensors"), str(target),
                 "--bits-per-weight", "16", "--keep", "embed.*", "--keep", "*.nothing"]) == 0
    return target


def read_back(path):
    from qsdlearn._checkpoint import open_checkpoint

    checkpoint = open_checkpoint(path)
    return {name: checkpoint.read(name) for name in checkpoint.names}


def test_cli_restores_bfloat16_and_0d_tensors(compressed_file, tmp_path, capsys):
    weights = checkpoint_weights()
    assert main(["info", str(compressed_file)]) == 0
    info = capsys.readouterr().out
    assert "over the original (bfloat16, float16)" in info
    assert "kept (bfloat16)" in info  # the --keep pattern
    for target in ["out.safetensors", "out.npz", "shards"]:
        extra = ["--shard-size", "3KB"] if target == "shards" else []
        assert main(["decompress", str(compressed_file), str(tmp_path / target), *extra]) == 0
        restored = read_back(tmp_path / target)
        assert set(restored) == set(weights)
        for name, array in weights.items():
            expected = np.float32 if target.endswith(".npz") and array.dtype == BF16 else array.dtype
            assert restored[name].shape == array.shape and restored[name].dtype == expected, name
        np.testing.assert_array_equal(restored["embed.weight"].astype(np.float32),
                                      weights["embed.weight"].astype(np.float32))
        assert restored["bn.num_batches_tracked"] == 5
    err = capsys.readouterr().err
    assert "cannot hold bfloat16" in err  # the .npz convention is said, not silent
    assert len(list((tmp_path / "shards").glob("model-*-of-*.safetensors"))) > 1


def test_cli_reads_sharded_checkpoints(tmp_path, capsys):
    weights = checkpoint_weights()
    names = sorted(weights)
    weight_map = {}
    for i, group in enumerate([names[:3], names[3:]], 1):
        file_name = f"model-{i:05d}-of-00002.safetensors"
        safetensors_numpy.save_file({n: weights[n] for n in group}, str(tmp_path / file_name))
        weight_map.update({n: file_name for n in group})
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    shard = tmp_path / "model-00001-of-00002.safetensors"
    assert main(["compress", str(index), str(shard), "--bits-per-weight", "16", "--force"]) == 1
    assert "is the input" in capsys.readouterr().err  # a shard of the input is the input
    assert main(["compress", str(index), str(tmp_path / "m.qsd"), "--bits-per-weight", "16"]) == 0
    assert main(["decompress", str(tmp_path / "m.qsd"), str(tmp_path / "out.safetensors")]) == 0
    restored = read_back(tmp_path / "out.safetensors")
    assert {n: (a.shape, a.dtype) for n, a in restored.items()} == {
        n: (a.shape, a.dtype) for n, a in weights.items()}


def test_a_folder_left_by_a_killed_sharded_write_does_not_need_force(
        compressed_file, tmp_path, capsys):
    """A kill -9 while the shards are decoded left the new folder with one stale temporary
    file, and the next run refused it without --force (a fresh user's trial). A folder that
    holds anything else still needs --force."""
    from qsdlearn._container import host_tag

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = tmp_path / "shards"
    folder.mkdir()
    (folder / f".qsdlearn-{dead}-{host_tag()}-x.tmp").write_bytes(b"")
    assert main(["decompress", str(compressed_file), str(folder), "--shard-size", "2KB"]) == 0
    assert (folder / "model.safetensors.index.json").exists()
    assert not list(folder.glob(".qsdlearn-*"))
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / f".qsdlearn-{dead}-{host_tag()}-x.tmp").write_bytes(b"")
    (kept / "notes.txt").write_text("mine")
    assert main(["decompress", str(compressed_file), str(kept), "--shard-size", "2KB"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert sorted(p.name for p in kept.iterdir()) == sorted(  # untouched, the stale file too
        ["notes.txt", f".qsdlearn-{dead}-{host_tag()}-x.tmp"])
    assert (kept / "notes.txt").read_text() == "mine"


def test_cli_does_not_overwrite_without_force(compressed_file, tmp_path, capsys):
    out = tmp_path / "out.npz"
    out.write_bytes(b"precious")
    assert main(["decompress", str(compressed_file), str(out)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert out.read_bytes() == b"precious"
    assert main(["decompress", str(compressed_file), str(out), "--force"]) == 0
    assert set(read_back(out)) == set(checkpoint_weights())
    before = compressed_file.read_bytes()
    for argv in (["decompress", str(compressed_file), str(compressed_file), "--force"],
                 ["compress", str(compressed_file), str(compressed_file), "--force",
                  "--bits-per-weight", "4"]):
        assert main(argv) == 1
        assert "is the input" in capsys.readouterr().err
    assert compressed_file.read_bytes() == before
    assert main(["compress", str(out), str(compressed_file), "--bits-per-weight", "4"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    # a link, even one that points nowhere, is not replaced unasked; an empty name is refused
    link = tmp_path / "link.npz"
    link.symlink_to(tmp_path / "nowhere.npz")
    assert main(["decompress", str(compressed_file), str(link)]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert link.is_symlink() and not (tmp_path / "nowhere.npz").exists()
    assert main(["decompress", str(compressed_file), ""]) == 1
    assert "the output name is empty" in capsys.readouterr().err


def test_cli_never_writes_over_its_calibration_or_sensitivity_file_nor_onto_a_folder(
        tmp_path, capsys):
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32))
    calibration = tmp_path / "cal.npz"
    np.savez(calibration, w=np.eye(64))
    sensitivity = tmp_path / "s.json"
    sensitivity.write_text('{"w": 1.0}')
    before = calibration.read_bytes(), sensitivity.read_bytes()
    for output, role in [(calibration, "--calibration"), (sensitivity, "--sensitivity")]:
        extra = [role, str(output)]
        assert main(["compress", str(tmp_path / "w.npz"), str(output), "--bits-per-weight", "4",
                     "--force", *extra]) == 1
        assert f"is the {role} file" in capsys.readouterr().err
    assert (calibration.read_bytes(), sensitivity.read_bytes()) == before
    (tmp_path / "folder").mkdir()
    assert main(["compress", str(tmp_path / "w.npz"), str(tmp_path / "folder"),
                 "--bits-per-weight", "4", "--force"]) == 1
    assert "it is a directory" in capsys.readouterr().err  # before compressing, not after


def test_a_damaged_npz_member_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "w.npz"
    np.savez(path, w=np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32))
    data = bytearray(path.read_bytes())
    data[2000:2100] = b"\xff" * 100  # inside the array's bytes: its CRC-32 fails
    path.write_bytes(bytes(data))
    assert main(["compress", str(path), str(tmp_path / "o.qsd"), "--bits-per-weight", "4"]) == 1
    assert "cannot read 'w' from" in capsys.readouterr().err
    assert not (tmp_path / "o.qsd").exists()


@pytest.mark.parametrize(
    "vocab, message",
    [(np.array(["hello", "world"]), "tensor 'vocab' has dtype <U5"),
     (np.ones((8, 8), np.complex128), "tensor 'vocab' has dtype complex128"),
     (np.full((64, 64), 1e300), "tensor 'vocab' in ")],  # holds values up to 1e+300 ...
)
def test_cli_rejects_unusable_tensors_in_one_line(vocab, message, tmp_path, capsys):
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32), vocab=vocab)
    assert main(["compress", str(tmp_path / "w.npz"), str(tmp_path / "o.qsd"),
                 "--bits-per-weight", "4"]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.qsd").exists()


def test_cli_names_the_tensor_with_nan(tmp_path, capsys):
    weights = checkpoint_weights()
    weights["layers.1.weight"][0, 0] = np.nan
    safetensors_numpy.save_file(weights, str(tmp_path / "w.safetensors"))
    assert main(["compress", str(tmp_path / "w.safetensors"), str(tmp_path / "o.qsd"),
                 "--bits-per-weight", "4"]) == 1
    assert "'layers.1.weight'" in capsys.readouterr().err


def test_progress_bar_names_layers_when_asked(tmp_path, capsys):
    weight = np.random.default_rng(0).normal(size=(16, 64)).astype(np.float32)
    np.savez(tmp_path / "w.npz", **{"a.weight": weight})
    assert main(["compress", str(tmp_path / "w.npz"), str(tmp_path / "o.qsd"),
                 "--bits-per-weight", "16", "--verbose"]) == 0
    err = capsys.readouterr().err
    assert "a.weight" in err  # the bar shows the layer
    # the planner's estimates have bars of their own (a fresh user's trial: half of a run
    # showed nothing), before the final fits'
    assert 0 <= err.index("estimates") < err.index("layers")
    assert main(["compress", str(tmp_path / "w.npz"), str(tmp_path / "p.qsd"),
                 "--bits-per-weight", "16"]) == 0
    assert "layer" not in capsys.readouterr().err  # quiet when not on a terminal


@pytest.mark.parametrize("size, message", [
    *[(size, f"must be a size such as 500MB or 2GB, got {size!r}")
      for size in ("abc", "inf", "1e400GB", "nan")],
    ("0", "must be a positive size, got '0'"), ("-5MB", "must be a positive size"),
])
def test_a_bad_shard_size_is_refused_saying_what_to_write(size, message, compressed_file,
                                                          tmp_path, capsys):
    """"inf" once ended in OverflowError's traceback. A value that does not parse is refused
    by argparse, with exit status 2, like those of the other options."""
    with pytest.raises(SystemExit) as exit_info:
        main(["decompress", str(compressed_file), str(tmp_path / "shards"),
              f"--shard-size={size}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument --shard-size: {message}" in err, err
    assert not (tmp_path / "shards").exists()


def test_the_command_says_its_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"qsdlearn {qsdlearn.__version__}\n"


def test_shards_into_a_folder_named_like_a_file_are_written_with_a_warning(
        compressed_file, tmp_path, capsys):
    folder = tmp_path / "back.safetensors"
    assert main(["decompress", str(compressed_file), str(folder), "--shard-size", "1GB"]) == 0
    assert "warning: with --shard-size" in capsys.readouterr().err
    assert folder.is_dir() and set(read_back(folder)) == set(checkpoint_weights())
    assert main(["decompress", str(compressed_file), str(tmp_path / "back"),
                 "--shard-size", "1GB"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_decompress_into_a_sharded_folder_again_leaves_no_stale_shards(compressed_file, tmp_path):
    folder = tmp_path / "shards"
    assert main(["decompress", str(compressed_file), str(folder), "--shard-size", "2KB"]) == 0
    (folder / "notes.txt").write_text("mine")
    many = sorted(p.name for p in folder.glob("model-*-of-*.safetensors"))
    assert main(["decompress", str(compressed_file), str(folder), "--shard-size", "1GB",
                 "--force"]) == 0
    assert len(many) > 1
    assert sorted(p.name for p in folder.glob("*.safetensors")) == [
        "model-00001-of-00001.safetensors"]
    assert (folder / "notes.txt").read_text() == "mine"  # other files are the user's
    assert set(read_back(folder)) == set(checkpoint_weights())


@pytest.mark.parametrize("content, message", [
    ("{not json", "not a readable JSON file"),
    ("[1, 2]", "give a JSON object"),
    ('{"layers.9.weight": 1.0}', "not compressible"),
    ('{"layers.0.weight": -2}', "finite value >= 0"),
    ('{"layers.0.weight": 1' + "0" * 400 + "}", "finite value >= 0"),  # overflows a float
    ('{"layers.0.weight": 1, "layers.0.weight": 2}', "'layers.0.weight' is given more than once"),
    ('{"layers.0.weight": {"x": 1, "x": 2}}', "sensitivity['layers.0.weight'] is a dict"),
])
def test_cli_checks_the_sensitivity_file_before_compressing(content, message, tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    sensitivity = tmp_path / "sensitivity.json"
    sensitivity.write_text(content)
    assert main(["compress", str(source), str(tmp_path / "out.qsd"), "--bits-per-weight", "16",
                 "--sensitivity", str(sensitivity)]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.qsd").exists()


def test_a_sensitivity_file_that_is_a_folder_or_binary_is_named_in_plain_words(
        tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    (tmp_path / "folder").mkdir()
    for path, message in ((tmp_path / "folder", f"--sensitivity {tmp_path / 'folder'}: Is a "
                           "directory\n"),
                          (source, f"--sensitivity {source}: not a JSON file (not UTF-8 text)\n")):
        assert main(["compress", str(source), str(tmp_path / "out.qsd"), "--bits-per-weight",
                     "16", "--sensitivity", str(path)]) == 1
        assert capsys.readouterr().err == f"qsdlearn compress: error: {message}"


def test_cli_passes_the_sensitivity_on(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    sensitivity = tmp_path / "sensitivity.json"
    sensitivity.write_text('{"layers.1.weight": 0}')  # its cheapest candidate
    assert main(["compress", str(source), str(tmp_path / "out.qsd"), "--bits-per-weight", "16",
                 "--sensitivity", str(sensitivity)]) == 0
    capsys.readouterr()
    from qsdlearn import load

    bits = {r["name"]: r["bits_per_weight"] for r in load(tmp_path / "out.qsd").report()}
    assert bits["layers.1.weight"] < bits["layers.0.weight"]


def test_cli_refuses_a_calibration_damping_without_calibration(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    output = tmp_path / "out.qsd"
    assert main(["compress", str(source), str(output), "--bits-per-weight", "16",
                 "--calibration-damping", "0.5"]) == 1
    err = capsys.readouterr().err
    assert "give --calibration FILE as well" in err and len(err.strip().splitlines()) == 1
    assert not output.exists()


def test_cli_prints_warnings_on_one_line_with_the_command(tmp_path, capsys):
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    assert main(["compress", str(source), str(tmp_path / "out.qsd"), "--bits-per-weight", "16",
                 "--keep", "*.nothing"]) == 0
    err = capsys.readouterr().err
    assert "qsdlearn compress: warning: keep pattern '*.nothing' matches no tensor\n" in err
    assert "UserWarning" not in err


def test_cli_interrupted_exits_130_without_a_traceback_or_output(tmp_path, capsys, monkeypatch):
    import qsdlearn.weights

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qsdlearn.weights, "compress_weights", interrupted)
    source = tmp_path / "model.safetensors"
    safetensors_numpy.save_file(checkpoint_weights(), str(source))
    assert main(["compress", str(source), str(tmp_path / "out.qsd"),
                 "--bits-per-weight", "16"]) == 130
    assert capsys.readouterr().err == "qsdlearn compress: interrupted\n"
    assert not (tmp_path / "out.qsd").exists()


def test_cli_names_the_file_it_cannot_read_and_writes_no_file_onto_a_folder(
        compressed_file, tmp_path, capsys):
    junk = tmp_path / "junk.qsd"
    junk.write_bytes(compressed_file.read_bytes()[:100])  # truncated
    assert main(["info", str(junk)]) == 1
    assert capsys.readouterr().err.startswith(f"qsdlearn info: error: {junk}: damaged file")
    assert main(["decompress", str(compressed_file), str(tmp_path)]) == 1
    assert "it is a directory" in capsys.readouterr().err
    # nor a folder of shards onto a file, even with --force (it was "File exists")
    mine = tmp_path / "out.safetensors"
    mine.write_bytes(b"mine")
    assert main(["decompress", str(compressed_file), str(mine), "--shard-size", "2KB",
                 "--force"]) == 1
    assert "it is not a folder (a file or a link to none)" in capsys.readouterr().err
    assert mine.read_bytes() == b"mine"


def test_cli_may_write_next_to_an_input_folder_s_other_files(tmp_path, capsys):
    """Only a sharded checkpoint's .safetensors and .json files are its inputs."""
    safetensors_numpy.save_file(checkpoint_weights(), str(tmp_path / "model.safetensors"))
    (tmp_path / "notes.qsd").write_bytes(b"mine")
    assert main(["compress", str(tmp_path), str(tmp_path / "notes.qsd"), "--bits-per-weight",
                 "16"]) == 1
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["compress", str(tmp_path), str(tmp_path / "out.qsd"), "--bits-per-weight",
                 "16"]) == 0
    capsys.readouterr()
    assert main(["compress", str(tmp_path), str(tmp_path / "model.safetensors"),
                 "--bits-per-weight", "16", "--force"]) == 1  # the shard stays an input
    assert "is the input; write the output elsewhere" in capsys.readouterr().err


def test_the_command_starts_without_the_numerical_libraries():
    """``import qsdlearn.cli`` (the console script's first line) loads neither numba nor SciPy
    nor scikit-learn: ``--help`` answers at once and a Ctrl-C is caught by ``main``."""
    result = run_python("-c", "import sys, qsdlearn.cli; "
                        "print(sorted({'numba', 'scipy', 'sklearn'} & set(sys.modules)))")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[]\n"
    for module in ("qsdlearn.cli", "qsdlearn"):  # python -m qsdlearn is the command too
        result = run_python("-m", module, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("usage: qsdlearn")
    result = run_python("-m", "qsdlearn", "info", "missing.qsd")
    assert result.returncode == 1 and result.stderr.startswith("qsdlearn info: ")


def test_a_ctrl_c_once_the_command_has_finished_is_ignored():
    """The console script (``run``): after the command returns, while the interpreter shuts
    down (about half a second after a compression), a Ctrl-C no longer turns a finished run,
    its output complete, into a failure."""
    script = textwrap.dedent("""
        import atexit, signal, sys, time
        import qsdlearn.cli as cli

        def late_interrupt():  # the user's Ctrl-C, as the interpreter shuts down
            signal.raise_signal(signal.SIGINT)
            time.sleep(0.05)
            print("shut down")

        atexit.register(late_interrupt)
        cli.main = lambda argv=None: 0  # a command that has written its output
        cli.run()
    """)
    result = run_python("-c", script)
    assert (result.returncode, result.stdout, result.stderr) == (0, "shut down\n", "")


@pytest.mark.parametrize("options, prefix", [
    ([], "qsdlearn compress"),
    (["--calibration", "model.npz", "--calibration-damping", "0.1"], "qsdlearn"),  # parsing
])
def test_an_interrupt_while_the_library_loads_exits_130_without_a_traceback(
        options, prefix, tmp_path, monkeypatch):
    """A Ctrl-C (a real SIGINT) in the first seconds, while the numerical libraries are being
    imported: by the command's handler, or already by the parser (the damping's bound is the
    library's)."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "model.npz", w=np.ones((16, 64), dtype=np.float32))
    script = textwrap.dedent("""
        import signal, sys

        # Ctrl-C as in a terminal, even where the test runner was started with SIGINT ignored
        # (a background job of a shell without job control), which a child inherits
        signal.signal(signal.SIGINT, signal.default_int_handler)

        class Interrupt:  # the SIGINT arrives as the first heavy library starts to load
            def find_spec(self, name, path=None, target=None):
                if name in ("numba", "scipy", "sklearn"):
                    signal.raise_signal(signal.SIGINT)

        sys.meta_path.insert(0, Interrupt())
        from qsdlearn.cli import main

        sys.exit(main(["compress", "model.npz", "out.qsd", "--bits-per-weight", "4",
                       *sys.argv[1:]]))
    """)
    result = run_python("-c", script, *options)
    assert result.returncode == 130, result.stderr
    assert result.stderr == f"{prefix}: interrupted\n"
    assert not (tmp_path / "out.qsd").exists()


@pytest.mark.slow
@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_sigterm_stops_a_compression_as_ctrl_c_does(tmp_path):
    """SIGTERM once killed the command at once and left its two worker processes running for
    minutes; it now unwinds as Ctrl-C does: status 143, one line, no output file."""
    import signal
    import time

    rng = np.random.default_rng(0)
    safetensors_numpy.save_file(
        {f"l{i}.weight": rng.standard_normal((1024, 1024)).astype(np.float32) for i in range(4)},
        str(tmp_path / "model.safetensors"))
    process = subprocess.Popen(
        [sys.executable, "-m", "qsdlearn.cli", "compress", "model.safetensors", "out.qsd",
         "--bits-per-weight", "2", "--jobs", "2"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(5)  # imports done, the layers' estimates under way in two workers (about 20 s)
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=60)
    assert process.returncode == 143, (out, err)
    assert err == "qsdlearn compress: terminated\n"
    assert not (tmp_path / "out.qsd").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_a_compressed_file_given_as_weights_is_named_as_such(compressed_file, tmp_path, capsys):
    """A qsdlearn file named .safetensors (it is one) was compressed again as one uint8
    tensor, or refused as beyond the budget's reach; it now says to decompress it."""
    renamed = tmp_path / "compressed.safetensors"
    renamed.write_bytes(compressed_file.read_bytes())
    assert main(["compress", str(renamed), str(tmp_path / "again.qsd"), "--bits-per-weight",
                 "16"]) == 1
    err = capsys.readouterr().err
    assert "is a compressed qsdlearn file, not weights: decompress it first" in err
    with pytest.raises(ValueError, match="decompress it first"):
        qsdlearn.compress_weights(renamed, bits_per_weight=16.0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX devices and FIFOs")
@pytest.mark.parametrize("argv, message", [
    (["compress", "pipe.safetensors", "out.qsd", "--bits-per-weight", "2"],
     "error: pipe.safetensors: not a regular file"),
    (["compress", "zero.npz", "out.qsd", "--bits-per-weight", "2"],
     "error: zero.npz: not a regular file"),
    (["compress", "w.npz", "out.qsd", "--bits-per-weight", "2", "--calibration",
      "pipe.safetensors"], "error: --calibration pipe.safetensors: not a regular file"),
    (["compress", "w.npz", "out.qsd", "--bits-per-weight", "2", "--sensitivity", "zero.npz"],
     "error: --sensitivity zero.npz: not a regular file"),
])
def test_devices_and_pipes_as_inputs_are_refused_before_they_are_read(argv, message, capsys,
                                                                      tmp_path, monkeypatch):
    """A FIFO as weights waited in open() for ever, through SIGTERM and Ctrl-C; /dev/zero
    behind a .npz name was read until the memory ran out."""
    monkeypatch.chdir(tmp_path)
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32))
    os.mkfifo(tmp_path / "pipe.safetensors")
    os.symlink("/dev/zero", tmp_path / "zero.npz")
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    for path in ("pipe.safetensors", "zero.npz"):  # the library too
        with pytest.raises(ValueError, match=f"cannot read {path}: not a regular file"):
            qsdlearn.compress_weights(path, bits_per_weight=2.0)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX devices and FIFOs")
@pytest.mark.parametrize("command", ["compress", "decompress"])
def test_devices_and_pipes_as_outputs_are_refused_even_with_force(command, compressed_file,
                                                                  tmp_path, capsys):
    pipe = tmp_path / "pipe.npz"
    os.mkfifo(pipe)
    source = compressed_file if command == "decompress" else compressed_file.with_name(
        "model.safetensors")
    argv = [command, str(source), str(pipe), "--force"]
    if command == "compress":
        argv += ["--bits-per-weight", "4"]
    assert main(argv) == 1
    assert "it is a device or a pipe, not a regular file" in capsys.readouterr().err
    assert pipe.is_fifo()


def test_shards_are_not_written_over_an_input_in_their_folder(compressed_file, tmp_path, capsys):
    """An input inside the shards' folder under a shard's name would be replaced or removed
    as a stale shard (with --force): refused before any work."""
    folder = tmp_path / "shards"
    folder.mkdir()
    source = folder / "model-00001-of-00009.safetensors"
    source.write_bytes(compressed_file.read_bytes())
    assert main(["decompress", str(source), str(folder), "--shard-size", "2KB", "--force"]) == 1
    assert "under the name of a shard" in capsys.readouterr().err
    assert source.read_bytes() == compressed_file.read_bytes()
    other = tmp_path / "elsewhere"
    assert main(["decompress", str(source), str(other), "--shard-size", "2KB"]) == 0
    assert source.exists()


def test_decompress_counts_in_words_and_a_folder_of_npz_gets_advice(tmp_path, capsys):
    np.savez(tmp_path / "w.npz", w=np.ones((64, 64), np.float32))
    assert main(["compress", str(tmp_path / "w.npz"), str(tmp_path / "w.qsd"),
                 "--bits-per-weight", "4"]) == 0
    capsys.readouterr()
    assert main(["decompress", str(tmp_path / "w.qsd"), str(tmp_path / "back.npz")]) == 0
    assert f"wrote 1 tensor to {tmp_path / 'back.npz'}" in capsys.readouterr().out
    folder = tmp_path / "npz"
    folder.mkdir()
    np.savez(folder / "w.npz", w=np.ones((64, 64), np.float32))
    assert main(["compress", str(folder), str(tmp_path / "f.qsd"), "--bits-per-weight", "4"]) == 1
    assert "give a .npz file by its name" in capsys.readouterr().err


def test_cli_info_gives_the_size_of_a_file_of_an_earlier_version(capsys):
    """A version-2 file is reported with the sizes of the current version (what saving it
    again gives) and, on a line of its own, the size it takes on disk."""
    old = pathlib.Path(__file__).resolve().parent / "data" / "model_v2.qsd"
    assert main(["info", str(old)]) == 0
    info = capsys.readouterr().out
    on_disk = old.stat().st_size
    assert f"file on disk: {on_disk} bytes" in info and "earlier format version" in info
