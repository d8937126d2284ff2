"""Checkpoints: lazy reading of mappings, .npz, safetensors files and shards; checks before
any fit; writing back, sharded or not; the dtype table."""

import json
import os
import pickle
import subprocess
import sys
import warnings

import ml_dtypes
import numpy as np
import pytest

import qsdlearn
from qsdlearn._checkpoint import (SafetensorsRef, open_checkpoint, plan_shards,
                                  write_checkpoint)
from qsdlearn._container import CONTAINER_ITEMSIZES, host_tag
from qsdlearn._dtypes import (FLOAT_DTYPES, NUMPY_NAMES, SAFETENSORS_NAMES, check_dtype, finfo,
                              from_little_endian_bytes, numpy_dtype, to_little_endian_bytes)

from ._data import run_python

safetensors_numpy = pytest.importorskip("safetensors.numpy")

BF16 = np.dtype(ml_dtypes.bfloat16)


def tensors(seed=0):
    """One tensor of every supported dtype, 0-d ones included."""
    rng = np.random.default_rng(seed)
    out = {f"w.{name}": rng.normal(size=(3, 5)).astype(numpy_dtype(name)) for name in FLOAT_DTYPES}
    out["scalar.temperature"] = np.array(0.25, dtype=np.float32)
    out["bn.num_batches_tracked"] = np.array(12, dtype=np.int64)
    out["mask"] = rng.random(7) > 0.5
    out["ids"] = np.arange(6, dtype=np.uint16).reshape(2, 3)
    return out


def assert_same(restored, expected):
    assert list(restored) == list(expected)
    for name, array in expected.items():
        assert restored[name].dtype == array.dtype, name
        assert restored[name].shape == array.shape, name
        np.testing.assert_array_equal(restored[name].view(f"u{array.dtype.itemsize}"),
                                      array.view(f"u{array.dtype.itemsize}"), err_msg=name)


@pytest.mark.parametrize("name", sorted(SAFETENSORS_NAMES))
def test_little_endian_bytes_round_trip(name):
    array = np.arange(6).reshape(2, 3).astype(numpy_dtype(name))
    data = to_little_endian_bytes(array)
    assert len(data) == array.nbytes
    back = from_little_endian_bytes(data, name, (2, 3))
    assert back.dtype == array.dtype and back.tobytes() == array.tobytes()
    scalar = np.array(1, dtype=numpy_dtype(name))
    assert from_little_endian_bytes(to_little_endian_bytes(scalar), name, ()).shape == ()


def test_safetensors_file_is_read_lazily_and_exactly(tmp_path):
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file(tensors(), str(path))
    checkpoint = open_checkpoint(path)
    assert set(checkpoint.names) == set(tensors())
    info = checkpoint.infos["w.bfloat16"]
    assert info.shape == (3, 5) and info.dtype == BF16
    assert checkpoint.infos["scalar.temperature"].shape == ()
    ref = checkpoint.ref("w.bfloat16")
    assert len(pickle.dumps(ref)) < 500  # what a worker receives: the path and the name
    expected = tensors()
    assert_same({n: checkpoint.read(n) for n in expected}, expected)


def test_npz_headers_are_read_without_loading(tmp_path):
    path = tmp_path / "m.npz"
    arrays = {k: v for k, v in tensors().items() if v.dtype != BF16}
    np.savez(path, **arrays)
    checkpoint = open_checkpoint(path)
    assert checkpoint.names == list(arrays)
    assert [checkpoint.infos[n].shape for n in arrays] == [a.shape for a in arrays.values()]
    assert_same({n: checkpoint.read(n) for n in arrays}, arrays)


@pytest.mark.parametrize("header, declared", [
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (64, 64), }", 16),  # TokenError
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (64, 64), }", 80),  # EOFError
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (64, \n", 48),  # SyntaxError
    (b"{'descr': '<f4', 'fortran_order': False, 'shape': (True, 16), }\n", 64),  # a bool
], ids=["unterminated", "short", "syntax", "bool"])
def test_a_damaged_npz_header_is_refused_naming_the_file_and_tensor(
        header, declared, tmp_path):
    """A .npz member whose .npy header is damaged raised tokenize's TokenError (a traceback
    from the command line) or NumPy errors naming neither the file nor the tensor."""
    import zipfile

    path = tmp_path / "m.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("w.npy", b"\x93NUMPY\x01\x00" + declared.to_bytes(2, "little") + header)
    with pytest.raises(ValueError, match=r"m\.npz: tensor 'w' has a damaged \.npy header"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    "value, words",
    [
        (np.array(["the", "a", "of"]), "strings"),
        (np.array([b"x", b"y"]), "byte strings"),
        (np.ones((4, 4), dtype=np.complex64), "complex"),
        (np.array([{"a": 1}, None], dtype=object), "pickle"),
        (np.zeros(3, dtype=[("a", "f4"), ("b", "i4")]), "structured"),
    ],
    ids=["str", "bytes", "complex", "object", "record"],
)
def test_unusable_dtypes_are_named(value, words, tmp_path):
    with pytest.raises(TypeError, match=f"tensor 'vocab'.*{words}"):
        open_checkpoint({"w": np.ones((64, 64)), "vocab": value})
    if value.dtype.kind != "O":  # .npz files too, from their headers (objects need pickle)
        np.savez(tmp_path / "m.npz", w=np.ones((64, 64)), vocab=value)
        with pytest.raises(TypeError, match=f"tensor 'vocab'.*{words}"):
            open_checkpoint(tmp_path / "m.npz")


def test_bfloat16_saved_in_npz_gets_advice(tmp_path):
    np.savez(tmp_path / "m.npz", w=np.ones((4, 4), dtype=BF16))  # stored as raw '<V2'
    with pytest.raises(TypeError, match="tensor 'w'.*bfloat16.*safetensors"):
        open_checkpoint(tmp_path / "m.npz")


@pytest.mark.parametrize("name, words", [("a\x00x", "NUL character"),
                                         ("\ud800", "not valid Unicode")])
def test_names_a_file_cannot_store_are_refused_on_reading_and_writing(name, words, tmp_path):
    """A NUL ends a .npz member's name (two names were written as one, a fresh user's trial);
    a lone surrogate failed as a UnicodeEncodeError in the middle of the fits."""
    with pytest.raises(ValueError, match=f"tensor name .* {words}.*rename the tensor"):
        open_checkpoint({name: np.ones((4, 4), np.float32)})
    with pytest.raises(ValueError, match=words):
        write_checkpoint(tmp_path / "m.npz", {name: 64}, lambda _: np.ones((4, 4), np.float32))
    assert not (tmp_path / "m.npz").exists()


def test_arrays_of_the_other_byte_order_are_taken_in_memory_and_named_in_files(tmp_path):
    """A big-endian float32 array was refused as if float32 were not supported."""
    from qsdlearn import compress_weights

    rng = np.random.default_rng(0)
    native = {"w": rng.standard_normal((64, 64)).astype(np.float32),
              "i": np.arange(12, dtype=np.int32)}
    swapped = {name: a.astype(a.dtype.newbyteorder(">" if sys.byteorder == "little" else "<"))
               for name, a in native.items()}
    checkpoint = open_checkpoint(swapped)
    assert all(info.dtype.isnative for info in checkpoint.infos.values())
    setting = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, n_nonzero=1, code_bits=0))
    model = compress_weights(swapped, settings=setting, random_state=0, max_iter=2)
    assert model.to_bytes() == compress_weights(native, settings=setting, random_state=0,
                                                max_iter=2).to_bytes()
    np.savez(tmp_path / "m.npz", **swapped)
    with pytest.raises(TypeError, match="tensor 'w' has dtype >f4.*byte order is not this "
                                        "machine's; store it as float32 in native byte order"):
        open_checkpoint(tmp_path / "m.npz")


def test_a_compressed_file_given_for_weights_or_its_bytes_for_a_path_is_named(tmp_path):
    """A .qsd file passed as weights got the generic "expected .npz or .safetensors" (the same
    file renamed .safetensors was named); a file's bytes given to load got "stat: embedded
    null character in path" (a fresh user's trials)."""
    weights = {"w": np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)}
    setting = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, n_nonzero=1, code_bits=0))
    path = tmp_path / "m.qsd"
    qsdlearn.compress_weights(weights, settings=setting, max_iter=1).save(path)
    with pytest.raises(ValueError, match="m.qsd is a compressed qsdlearn file, not weights"):
        open_checkpoint(path)
    with pytest.raises(TypeError, match="bytes holding NUL .a file's content.*from_bytes"):
        qsdlearn.load(path.read_bytes())
    assert isinstance(qsdlearn.load(os.fsencode(path)), qsdlearn.CompressedModel)


def test_values_numpy_cannot_read_are_named():
    class Unreadable:
        def __array__(self, dtype=None, copy=None):
            raise TypeError("Got unsupported ScalarType BFloat16")

    with pytest.raises(TypeError, match="tensor 'layer' cannot be read.*float"):
        open_checkpoint({"layer": Unreadable()})


def test_check_names_the_tensor_with_nan(tmp_path):
    bad = np.ones((4, 4), dtype=ml_dtypes.bfloat16)
    bad[1, 2] = np.inf
    path = tmp_path / "m.safetensors"
    safetensors_numpy.save_file({"good": np.ones(3, np.float32), "layers.3.weight": bad}, str(path))
    with pytest.raises(ValueError, match=r"'layers.3.weight' in .*m.safetensors holds NaN"):
        open_checkpoint(path).check()


def test_digests_tell_equal_tensors():
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    digests = open_checkpoint({"a": a, "b": a.copy(), "c": a.reshape(4, 3), "d": a + 1}).check()
    assert digests["a"] == digests["b"]
    assert len({digests["a"], digests["c"], digests["d"]}) == 3


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float32, np.float64])
def test_check_notes_the_largest_magnitude_of_each_float_tensor(dtype):
    a = np.array([[0.5, -3.0, 2.0], [1.0, 0.25, -0.0]], dtype=dtype)
    checkpoint = open_checkpoint({"a": a, "negated": -a, "strided": a[:, ::2],
                                  "empty": a[:0], "scalar": a[0, 2], "ints": np.arange(9)})
    checkpoint.check()
    assert checkpoint.largest == {"a": 3.0, "negated": 3.0, "strided": 2.0, "empty": 0.0,
                                  "scalar": 2.0}


def write_sharded(folder, arrays, per_shard=2):
    names = list(arrays)
    groups = [names[i : i + per_shard] for i in range(0, len(names), per_shard)]
    weight_map = {}
    for i, group in enumerate(groups, 1):
        file_name = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        safetensors_numpy.save_file({n: arrays[n] for n in group}, str(folder / file_name))
        weight_map.update({n: file_name for n in group})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def test_sharded_checkpoint_by_index_or_folder(tmp_path):
    arrays = tensors()
    write_sharded(tmp_path, arrays)
    for source in [tmp_path, tmp_path / "model.safetensors.index.json"]:
        checkpoint = open_checkpoint(source)
        assert checkpoint.names == list(arrays)  # the index's order
        assert_same({n: checkpoint.read(n) for n in arrays}, arrays)
    (tmp_path / "model.safetensors.index.json").unlink()
    assert set(open_checkpoint(tmp_path).names) == set(arrays)  # the shards alone


def test_damaged_indexes_are_rejected(tmp_path):
    arrays = tensors()
    write_sharded(tmp_path, arrays)
    index = tmp_path / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    cases = [
        ({**weight_map, "extra": weight_map["mask"]}, "does not match its shards"),
        ({**weight_map, "mask": "../elsewhere.safetensors"}, "outside its folder"),
        ({**weight_map, "mask": next(iter(weight_map.values()))}, "not in the shard"),
    ]
    for damaged, message in cases:
        index.write_text(json.dumps({"weight_map": damaged}))
        with pytest.raises(ValueError, match=message):
            open_checkpoint(index)
    index.write_text("{}")
    with pytest.raises(ValueError, match="no weight_map"):
        open_checkpoint(index)
    for text in ("{bad", "[1, 2]", "\xff"):
        index.write_text(text, encoding="latin-1")
        with pytest.raises(ValueError, match="not JSON" if text != "[1, 2]" else "no weight_map"):
            open_checkpoint(index)


def test_plan_shards_keeps_order_and_bound():
    sizes = {f"t{i}": s for i, s in enumerate([3, 3, 3, 9, 1, 1])}
    shards = plan_shards(sizes, 7)
    assert [n for shard in shards for n in shard] == list(sizes)
    assert all(sum(sizes[n] for n in s) <= 7 or len(s) == 1 for s in shards)
    assert shards == [["t0", "t1"], ["t2"], ["t3"], ["t4", "t5"]]


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "shards"])
def test_write_checkpoint_round_trips(target, tmp_path):
    arrays = tensors()
    sizes = {n: a.nbytes for n, a in arrays.items()}
    path = tmp_path / target
    shard_bytes = 40 if target == "shards" else None
    if target.endswith(".npz"):
        with pytest.warns(UserWarning, match="bfloat16.*float32"):
            write_checkpoint(path, sizes, arrays.__getitem__, shard_bytes)
    else:
        files = write_checkpoint(path, sizes, arrays.__getitem__, shard_bytes)
        assert len(files) == (1 if shard_bytes is None else len(plan_shards(sizes, 40)) + 1)
    checkpoint = open_checkpoint(path)
    restored = {n: checkpoint.read(n) for n in arrays}
    if target.endswith(".npz"):  # the documented convention: bfloat16 widened, exactly
        assert restored["w.bfloat16"].dtype == np.float32
        restored["w.bfloat16"] = restored["w.bfloat16"].astype(BF16)
        assert checkpoint.infos["scalar.temperature"].shape == ()
    assert_same(restored, arrays)
    assert not list(tmp_path.glob(".qsdlearn-*"))  # no temporary file left


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "shards"])
def test_write_checkpoint_is_atomic_and_refuses_devices(target, tmp_path):
    """The checkpoint writer is the compressed files' atomic writer: a read that fails
    midway (an interrupt while tensors are decoded) leaves the earlier file or shards and
    index as they were and no temporary file (a sharded write replaced the first shards and
    left the rest); a stale temporary of a process that no longer runs is removed, and a
    pipe is refused, not replaced."""
    sizes = {f"t{i}": 800 for i in range(3)}
    path = tmp_path / target
    shard_bytes = 1600 if target == "shards" else None
    write_checkpoint(path, sizes, lambda name: np.full(100, float(name[1:])), shard_bytes)
    before = sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*") if p.is_file())
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    folder = path if target == "shards" else tmp_path
    stale = folder / f".qsdlearn-{dead}-{host_tag()}-x.tmp"
    stale.write_bytes(b"left by a killed writer")

    def failing(name):
        if name == "t2":
            raise RuntimeError("read failed")
        return np.zeros(100)

    with pytest.raises(RuntimeError, match="read failed"):
        write_checkpoint(path, sizes, failing, shard_bytes)
    assert not list(tmp_path.rglob(".qsdlearn-*"))
    assert sorted((p.name, p.read_bytes()) for p in tmp_path.rglob("*")
                  if p.is_file()) == before
    if os.name == "posix" and target != "shards":
        fifo = tmp_path / ("pipe" + path.suffix)
        os.mkfifo(fifo)
        with pytest.raises(ValueError, match="device or a pipe"):
            write_checkpoint(fifo, sizes, lambda name: np.zeros(100), None)


@pytest.mark.parametrize("target", ["OUT.NPZ", "Out.SafeTensors"])
def test_extensions_are_read_in_any_case(target, tmp_path):
    """``model.NPZ`` was refused ("expected a .npz or .safetensors file")."""
    sizes = {"a": 800}
    files = write_checkpoint(tmp_path / target, sizes, lambda name: np.arange(100.0))
    assert files == [str(tmp_path / target)]
    np.testing.assert_array_equal(open_checkpoint(tmp_path / target).read("a"), np.arange(100.0))


def test_an_interrupted_sharded_write_into_a_new_folder_leaves_nothing(tmp_path):
    def failing(name):
        if name == "t2":
            raise KeyboardInterrupt
        return np.zeros(100)

    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "new", {f"t{i}": 800 for i in range(3)}, failing, 1600)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("after", [False, True])
def test_an_interrupt_while_shards_are_renamed_is_deferred_until_they_all_are(
        tmp_path, monkeypatch, after):
    """Once every shard is written, the renames and the index are finished before Ctrl-C
    (or SIGTERM under the command line) takes effect: stopped there, the folder held new
    shards and old ones of the same names, read as one model without a word."""
    import qsdlearn._checkpoint as checkpoint

    sizes = {f"t{i}": 800 for i in range(4)}
    write_checkpoint(tmp_path / "s", sizes, lambda name: np.full(100, -1.0), 800)
    (tmp_path / "s" / "config.json").write_text("{}")
    real, calls = os.replace, []

    def interrupted_replace(source, target):
        calls.append(target)
        if len(calls) == 2:  # the second rename, before or after it is done
            if after:
                real(source, target)
            raise KeyboardInterrupt
        real(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", interrupted_replace)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path / "s", sizes, lambda name: np.full(100, float(name[1:])), 800)
    monkeypatch.undo()
    restored = open_checkpoint(tmp_path / "s")
    assert [float(restored.read(n)[0]) for n in sizes] == [0, 1, 2, 3]
    assert (tmp_path / "s" / "model.safetensors.index.json").exists()
    assert (tmp_path / "s" / "config.json").read_text() == "{}"
    assert not list(tmp_path.rglob(".qsdlearn-*"))


def test_a_folder_of_shards_without_index_must_hold_a_complete_set(tmp_path):
    """What an interrupted sharded write could leave (2 of 4 shards) was read as a model of
    2 tensors without a word."""
    sizes = {f"t{i}": 800 for i in range(4)}
    write_checkpoint(tmp_path / "s", sizes, lambda name: np.full(100, float(name[1:])), 800)
    (tmp_path / "s" / "model.safetensors.index.json").unlink()
    assert list(open_checkpoint(tmp_path / "s").infos) == list(sizes)  # complete: read
    (tmp_path / "s" / "model-00003-of-00004.safetensors").unlink()
    with pytest.raises(ValueError, match=r"not one complete set \(1 of 4, 2 of 4, 4 of 4\)"):
        open_checkpoint(tmp_path / "s")
    write_checkpoint(tmp_path / "t", {"a": 800}, lambda name: np.zeros(100), 800)
    os.replace(tmp_path / "t" / "model-00001-of-00001.safetensors",
               tmp_path / "s" / "model-00003-of-00001.safetensors")
    with pytest.raises(ValueError, match="not one complete set"):
        open_checkpoint(tmp_path / "s")


def test_a_folder_of_shards_without_index_refuses_other_safetensors_files(tmp_path):
    """A stray .safetensors file beside a complete set was read as part of the checkpoint
    (a fresh user's trial: its tensor came first in the model); a folder of files not named
    as shards is still read as one checkpoint of all of them."""
    sizes = {f"t{i}": 800 for i in range(3)}
    write_checkpoint(tmp_path / "s", sizes, lambda name: np.full(100, float(name[1:])), 800)
    (tmp_path / "s" / "model.safetensors.index.json").unlink()
    write_checkpoint(tmp_path / "s" / "extra.safetensors", {"w": 400},
                     lambda name: np.zeros(100))
    with pytest.raises(ValueError, match="holds extra.safetensors beside the shards"):
        open_checkpoint(tmp_path / "s")
    (tmp_path / "u").mkdir()
    write_checkpoint(tmp_path / "u" / "a.safetensors", {"a": 400}, lambda name: np.zeros(100))
    write_checkpoint(tmp_path / "u" / "b.safetensors", {"b": 400}, lambda name: np.ones(100))
    assert list(open_checkpoint(tmp_path / "u").infos) == ["a", "b"]


def test_the_container_reader_knows_the_sizes_of_every_dtype_of_the_table():
    """The file reader keeps its own table of sizes (it imports nothing from the package)."""
    assert {st: numpy_dtype(name).itemsize for st, name in NUMPY_NAMES.items()} \
        == CONTAINER_ITEMSIZES


@pytest.mark.parametrize("name", sorted(FLOAT_DTYPES))
def test_finfo_agrees_with_ml_dtypes(name):
    dtype = numpy_dtype(name)
    ours, theirs = finfo(dtype), ml_dtypes.finfo(dtype)
    assert (float(ours.eps), float(ours.max), ours.bits) \
        == (float(theirs.eps), float(theirs.max), theirs.bits)


def test_a_fresh_worker_reads_a_bfloat16_tensor_of_a_safetensors_file(tmp_path):
    """A worker process gets a reference, not the opened checkpoint, and may not have loaded
    ml_dtypes: safetensors, which asks NumPy for "bfloat16" by name, failed there with "data
    type 'bfloat16' not understood" (the command line with --jobs 2 on a bfloat16 file)."""
    weights = np.arange(12, dtype=np.float32).reshape(3, 4).astype(BF16)
    safetensors_numpy.save_file({"w": weights}, str(tmp_path / "m.safetensors"))
    script = (f"from qsdlearn._checkpoint import SafetensorsRef; "
              f"a = SafetensorsRef({str(tmp_path / 'm.safetensors')!r}, 'w').load(); "
              f"print(a.dtype, a.shape, a.astype(float).sum())")
    result = run_python("-c", script)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "bfloat16 (3, 4) 66.0\n"
    assert SafetensorsRef(str(tmp_path / "m.safetensors"), "w").load().dtype == BF16


def test_check_dtype_accepts_the_table():
    for name in SAFETENSORS_NAMES:
        check_dtype("t", numpy_dtype(name))
    for narrow in (ml_dtypes.float8_e4m3fn, ml_dtypes.int4):
        with pytest.raises(TypeError, match="ml_dtypes; cast the tensor") as caught:
            check_dtype("t", np.dtype(narrow))
        assert "records" not in str(caught.value)  # not taken for raw records (kind "V")


def test_reconstructions_stay_within_the_tensor_dtypes_range():
    """float16 weights at float16's largest value come back finite: the float32
    reconstruction is clipped to the dtype's range before the cast (bfloat16's range is
    float32's, beyond the magnitudes compression takes)."""
    from qsdlearn import compress_weights

    rng = np.random.default_rng(0)
    a = rng.standard_normal((128, 128))
    weights = {"half": np.where(abs(a) > 1, np.sign(a) * 65504, a).astype(np.float16)}
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # no overflow in a cast
        model = compress_weights(weights, bits_per_weight=2.0, random_state=0)
        restored = model.decompress()
    for name, weight in weights.items():
        assert np.all(np.isfinite(restored[name].astype(np.float32)))
        assert restored[name].dtype == weight.dtype
        assert np.max(np.abs(restored[name].astype(np.float32))) <= np.max(
            np.abs(weight.astype(np.float32)))
        assert np.isfinite(model.layers[name].sqnr_db)


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "shards"])
def test_write_checkpoint_holds_one_tensor_at_a_time(target, tmp_path):
    """Every tensor read is released before the next one is read: peak memory does not grow
    with the number of tensors."""
    import gc
    import weakref

    sizes = {f"t{i}": 800 for i in range(6)}
    alive, peak = set(), [0]

    def read(name):
        gc.collect()
        array = np.full(100, float(name[1:]))
        alive.add(name)
        weakref.finalize(array, alive.discard, name)
        peak[0] = max(peak[0], len(alive))
        return array

    write_checkpoint(tmp_path / target, sizes, read, 1600 if target == "shards" else None)
    assert peak[0] == 1
    checkpoint = open_checkpoint(tmp_path / target)
    assert [float(checkpoint.read(n)[0]) for n in sizes] == [0, 1, 2, 3, 4, 5]
