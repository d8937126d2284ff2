"""Checkpoints: tensors by name, read one at a time, and written back, sharded or not.

A checkpoint is a mapping name -> array in memory, a ``.npz`` file, a ``.safetensors`` file, a
sharded safetensors checkpoint (its ``*.safetensors.index.json`` or the folder holding it), or
a folder of ``.safetensors`` files. :func:`open_checkpoint` reads only the names, shapes and
dtypes; :meth:`Checkpoint.ref` gives a small picklable reference a worker process loads its
one tensor from, so that no process holds the whole model. Files are never read with pickle.
It imports only :mod:`qsdlearn._container` and :mod:`qsdlearn._dtypes` from the package.
"""

import errno
import fnmatch
import hashlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import tokenize
import warnings
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ._container import (FORMAT_NAME, check_target, discard, is_device_or_pipe,
                         remove_stale_temporaries, replace_atomically, stat_error,
                         write_temporary)
from ._dtypes import (SAFETENSORS_NAMES, bfloat16, check_dtype, in_native_byte_order,
                      is_float, to_little_endian_bytes)

#: File name of the index of a sharded checkpoint written by :func:`write_checkpoint`.
INDEX_SUFFIX = ".safetensors.index.json"


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype of one tensor, known without reading it."""

    name: str
    shape: tuple
    dtype: np.dtype

    @property
    def size(self):
        """Number of elements."""
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class SafetensorsRef:
    """Where a worker reads one tensor of a safetensors file."""

    path: str
    name: str

    def load(self):
        """The tensor (read lazily: only its bytes)."""
        from safetensors import safe_open

        with safe_open(self.path, framework="np") as file:
            if file.get_slice(self.name).get_dtype() == "BF16":
                bfloat16()  # safetensors asks NumPy for it by name (a worker may not know it)
            return file.get_tensor(self.name)


@dataclass(frozen=True)
class NpzRef:
    """Where a worker reads one tensor of a ``.npz`` archive."""

    path: str
    name: str

    def load(self):
        """The tensor (only its member of the archive is read). A member whose bytes fail
        their checksum or cannot be inflated raises a ValueError."""
        try:
            with np.load(self.path, allow_pickle=False) as archive:
                return archive[self.name]
        except (zipfile.BadZipFile, zlib.error, EOFError) as exc:
            raise ValueError(f"cannot read {self.name!r} from {self.path}: the file is damaged "
                             f"({exc})") from None


@dataclass(frozen=True)
class ArrayRef:
    """A tensor already in memory."""

    array: np.ndarray

    def load(self):
        """The tensor itself."""
        return self.array


class Checkpoint:
    """The tensors of a model, by name, each read only when asked for.

    Parameters
    ----------
    infos : list of TensorInfo
        In the checkpoint's order.
    refs : dict of str to reference
        Name to an object whose ``load()`` returns the tensor.
    source : str
        Where the tensors come from, for messages.

    Attributes
    ----------
    largest : dict of str to float
        The largest magnitude of each float tensor, set by :meth:`check`.
    """

    def __init__(self, infos, refs, source):
        self.infos = {info.name: info for info in infos}
        self.refs = dict(refs)
        self.source = source
        self.largest = {}

    @property
    def names(self):
        """Tensor names, in order."""
        return list(self.infos)

    def ref(self, name):
        """A picklable reference to tensor ``name`` (``ref.load()`` reads it)."""
        return self.refs[name]

    def read(self, name):
        """Tensor ``name`` as an array."""
        return self.ref(name).load()

    def check(self):
        """Read every tensor once, one at a time: reject NaN and infinity, naming the tensor,
        and note the largest magnitude of each float tensor in :attr:`largest`.

        Returns
        -------
        dict of str to bytes
            A digest of every tensor's dtype, shape and content: equal digests mean equal
            tensors.
        """
        digests = {}
        for name, info in self.infos.items():
            array = self.read(name)
            if array.shape != info.shape or array.dtype != info.dtype:
                raise ValueError(f"tensor {name!r} in {self.source} does not match its header")
            if is_float(array.dtype) and not np.isfinite(array).all():
                raise ValueError(f"tensor {name!r} in {self.source} holds NaN or infinity")
            if is_float(array.dtype):
                self.largest[name] = _largest_magnitude(array)
            digest = hashlib.blake2b(f"{array.dtype.name}{array.shape}".encode(), digest_size=16)
            digest.update(np.ascontiguousarray(array).reshape(-1).view(np.uint8))
            digests[name] = digest.digest()
            del array
        return digests


def _largest_magnitude(array):
    """The largest magnitude of a finite float array (0 when empty), without a float copy;
    of a 16-bit float (float16, bfloat16) from its bits, which order the magnitudes once the
    sign bit is cleared (NumPy's max over those dtypes is ten times slower than a hash)."""
    if array.size == 0:
        return 0.0
    if array.dtype.itemsize == 2:
        top = (array.view(np.uint16) & np.uint16(0x7FFF)).max()
        return float(np.array(top, dtype=np.uint16).view(array.dtype))
    return float(max(array.max(), -array.min()))


def matching(name, patterns):
    """Whether ``name`` matches one of the glob ``patterns`` (:func:`fnmatch.fnmatchcase`).

    Examples
    --------
    >>> from qsdlearn._checkpoint import matching
    >>> matching("model.embed_tokens.weight", ["*embed*", "lm_head.*"])
    True
    >>> matching("layers.0.mlp.weight", ["*embed*"])
    False
    """
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def open_checkpoint(source):
    """The :class:`Checkpoint` of a mapping, a file, an index or a folder.

    Names and dtypes are checked here, before anything is fitted: names must be strings, and
    a dtype that cannot be stored raises a :class:`TypeError` naming the tensor.

    Parameters
    ----------
    source : mapping of str to array-like, or str / path-like
        A mapping, a ``.npz`` or ``.safetensors`` file, a ``*.safetensors.index.json``
        index of shards, or a folder holding one index or ``.safetensors`` files.

    Returns
    -------
    Checkpoint

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn._checkpoint import open_checkpoint
    >>> checkpoint = open_checkpoint({"w": np.ones((2, 3)), "step": 7})
    >>> [(i.name, i.shape, i.dtype.name) for i in checkpoint.infos.values()]
    [('w', (2, 3), 'float64'), ('step', (), 'int64')]
    """
    if isinstance(source, (str, os.PathLike)):
        checkpoint = _open_path(os.fspath(source))
    elif isinstance(source, Mapping) or hasattr(source, "items"):
        checkpoint = _open_mapping(source)
    else:
        raise TypeError(f"weights must be a mapping name -> array or a path, got {type(source)}")
    for info in checkpoint.infos.values():
        _check_name(info.name)
        check_dtype(info.name, info.dtype)
    return checkpoint


def _check_name(name):
    """Refuse a tensor name that a file cannot store as it is: one that is not valid Unicode
    (a lone surrogate, which UTF-8 cannot encode) or that holds the NUL character (a ``.npz``
    member's name ends there: two such names were written as one)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"tensor name {name!r} is not valid Unicode (UTF-8 cannot encode it): "
                         "rename the tensor") from None
    if "\x00" in name:
        raise ValueError(f"tensor name {name!r} holds the NUL character: rename the tensor")


def _open_mapping(mapping):
    infos, refs = [], {}
    for name, value in mapping.items():
        if not isinstance(name, str):
            raise TypeError(f"tensor names must be strings, got {name!r}")
        if name == "__metadata__":  # safetensors' reserved key: the file would be unreadable
            raise ValueError("a tensor cannot be named '__metadata__' (safetensors reserves it)")
        try:
            array = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(
                f"tensor {name!r} cannot be read as a NumPy array ({exc}); pass arrays, e.g. "
                "v.float().numpy() for a bfloat16 torch tensor"
            ) from None
        if array.dtype.name in SAFETENSORS_NAMES:  # as the estimator takes it
            array = in_native_byte_order(array)
        infos.append(TensorInfo(name, array.shape, array.dtype))
        refs[name] = ArrayRef(array)
    return Checkpoint(infos, refs, "the weights")


def _compressed_file(path):
    """The error for a compressed qsdlearn file given where weights are expected."""
    return ValueError(f"{path} is a compressed qsdlearn file, not weights: decompress it "
                      "first (qsdlearn decompress, or qsdlearn.load(path).decompress())")


def _check_regular_file(path):
    """Refuse a device or a pipe (:func:`~qsdlearn._container.is_device_or_pipe`)."""
    if is_device_or_pipe(path):
        raise ValueError(f"cannot read {path}: not a regular file (a device or a pipe)")


def _suffix(path):
    """The extension of ``path`` in lower case (``model.NPZ`` is a ``.npz`` file)."""
    return os.path.splitext(path)[1].lower()


def _complete_shards(folder, files):
    """Refuse a folder without an index whose ``model-0000i-of-0000n.safetensors`` shards
    are not one complete set (what an interrupted write can leave), or that holds other
    .safetensors files beside them (they would be read as part of the checkpoint)."""
    matches = [_SHARD_NAME.fullmatch(f) for f in files]
    others = [f for f, m in zip(files, matches) if not m]
    if others and len(others) < len(files):
        raise ValueError(
            f"{folder} has no index and holds {', '.join(others)} beside the shards of a "
            "checkpoint: move the other files out, or give the checkpoint's index")
    numbered = [(int(m.group(1)), int(m.group(2))) for m in matches if m]
    counts = {n for _, n in numbered}
    if numbered and (len(counts) > 1 or sorted(i for i, _ in numbered) != list(
            range(1, max(counts) + 1))):
        raise ValueError(
            f"{folder} has no index and its shards are not one complete set "
            f"({', '.join(f'{i} of {n}' for i, n in sorted(numbered))}): an interrupted "
            "write leaves such a folder; write the checkpoint again")


def _open_path(path):
    if not os.path.exists(path):
        reason = stat_error(path)
        if reason is not None and reason.errno != errno.ENOENT:  # a loop of symbolic links
            raise ValueError(f"cannot read {path}: {reason.strerror}")
        raise ValueError(f"no such file: {path}")
    if os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(INDEX_SUFFIX))
        if len(indexes) > 1:
            raise ValueError(f"{path} holds several indexes {indexes}; pass one of them")
        if indexes:
            return _open_index(os.path.join(path, indexes[0]))
        shards = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
        if not shards:
            raise ValueError(f"{path} holds no .safetensors file (a folder is read as the "
                             "shards of one checkpoint; give a .npz file by its name)")
        _complete_shards(path, shards)
        return _open_shards([os.path.join(path, f) for f in shards], path)
    _check_regular_file(path)
    suffix = _suffix(path)
    if suffix == ".json":
        return _open_index(path)
    if suffix == ".npz":
        return _open_npz(path)
    if suffix == ".safetensors":
        return _open_shards([path], path)
    if suffix == ".qsd":
        raise _compressed_file(path)
    raise ValueError(
        f"cannot read {path}: expected a .npz or .safetensors file, a {INDEX_SUFFIX} index "
        "or a folder of .safetensors files"
    )


def _check_npz_member_size(path, name, shape, dtype, data_bytes):
    """A member must hold exactly the bytes its header declares: checked before anything is
    read, so that a damaged or hostile archive cannot make NumPy allocate what it declares."""
    if dtype.hasobject:
        return  # refused by dtype later, with its own message
    declared = math.prod(shape) * dtype.itemsize
    if declared != data_bytes:
        raise ValueError(
            f"{path}: tensor {name!r} declares shape {tuple(shape)} ({declared} bytes) but holds "
            f"{data_bytes} bytes; the file is damaged"
        )


def _npz_member_header(archive, member, path, name):
    """``(shape, dtype, header bytes)`` of an archive's member, read from its ``.npy``
    header alone; a ValueError naming the file and the tensor when the header is damaged
    (NumPy raises ValueError, EOFError, SyntaxError or tokenize's TokenError, without either
    name)."""
    try:
        with archive.open(member) as file:
            version = np.lib.format.read_magic(file)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(file)
            if not all(type(n) is int and n >= 0 for n in shape):  # NumPy takes (True, 16)
                raise ValueError(f"shape {shape!r} is not of non-negative integers")
            return shape, np.dtype(dtype), file.tell()
    except (ValueError, TypeError, EOFError, SyntaxError, tokenize.TokenError,
            zlib.error) as exc:
        raise ValueError(f"{path}: tensor {name!r} has a damaged .npy header ({exc})"
                         ) from None


def _open_npz(path):
    infos, refs = [], {}
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.namelist():
                if not member.endswith(".npy"):
                    raise ValueError(f"{path} holds {member!r}, which is not a NumPy array")
                name = member[: -len(".npy")]
                shape, dtype, header_bytes = _npz_member_header(archive, member, path, name)
                _check_npz_member_size(path, name, shape, dtype,
                                       archive.getinfo(member).file_size - header_bytes)
                infos.append(TensorInfo(name, tuple(shape), dtype))
                refs[name] = NpzRef(path, name)
    except zipfile.BadZipFile:
        raise ValueError(f"cannot read {path}: not a .npz archive") from None
    return Checkpoint(infos, refs, path)


def _open_index(path):
    try:
        with open(path, encoding="utf-8") as file:
            index = json.load(file)
    except ValueError as exc:  # also UnicodeDecodeError
        raise ValueError(f"{path} is not a checkpoint index: not JSON ({exc})") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict):
        raise ValueError(f"{path} is not a checkpoint index (no weight_map)")
    folder = os.path.dirname(os.path.abspath(path))
    files = []
    for name, file_name in weight_map.items():
        if not isinstance(file_name, str) or os.path.basename(file_name) != file_name:
            raise ValueError(f"{path}: tensor {name!r} names a shard outside its folder")
        if file_name not in files:
            files.append(file_name)
    checkpoint = _open_shards([os.path.join(folder, f) for f in files], path)
    listed, found = set(weight_map), set(checkpoint.infos)
    if listed != found:
        missing, extra = sorted(listed - found)[:3], sorted(found - listed)[:3]
        raise ValueError(
            f"{path} does not match its shards: listed but absent {missing}, present but not "
            f"listed {extra}"
        )
    for name, file_name in weight_map.items():
        if checkpoint.refs[name].path != os.path.join(folder, file_name):
            raise ValueError(f"{path}: tensor {name!r} is not in the shard the index names")
    return Checkpoint([checkpoint.infos[name] for name in weight_map], checkpoint.refs, path)


def _open_shards(paths, source):
    try:
        from safetensors import SafetensorError, safe_open
    except ImportError as exc:  # pragma: no cover - optional dependency
        raise ImportError("reading .safetensors needs: pip install safetensors") from exc
    from ._dtypes import NUMPY_NAMES, numpy_dtype

    infos, refs = [], {}
    for path in paths:
        _check_regular_file(path)
        try:
            with safe_open(path, framework="np") as file:
                if (file.metadata() or {}).get("format") == FORMAT_NAME:
                    raise _compressed_file(path)
                for name in file.keys():
                    if name in refs:
                        raise ValueError(f"tensor {name!r} is in two shards of {source}")
                    piece = file.get_slice(name)
                    dtype_name = piece.get_dtype()
                    if dtype_name not in NUMPY_NAMES:
                        raise TypeError(
                            f"tensor {name!r} in {path} has dtype {dtype_name}, which qsdlearn "
                            f"does not store; supported: {', '.join(NUMPY_NAMES)}"
                        )
                    infos.append(TensorInfo(name, tuple(piece.get_shape()),
                                            numpy_dtype(NUMPY_NAMES[dtype_name])))
                    refs[name] = SafetensorsRef(path, name)
        except (SafetensorError, OSError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
            raise ValueError(f"cannot read {path}: {reason}") from None
    return Checkpoint(infos, refs, source)


# -- writing -------------------------------------------------------------------------------------


#: File names :func:`shard_names` gives (for any count), with the two numbers in them.
_SHARD_NAME = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


def replaced_by_shards(file_name):
    """Whether a sharded write (:func:`write_checkpoint` with ``max_shard_bytes``) into a
    folder replaces or removes the file ``file_name`` there: a shard of the
    ``model-00001-of-00003.safetensors`` pattern, or the index."""
    return bool(_SHARD_NAME.fullmatch(file_name)) or file_name == "model" + INDEX_SUFFIX


def shard_names(count, stem="model"):
    """File names of ``count`` shards, ``model-00001-of-00003.safetensors`` style.

    Examples
    --------
    >>> from qsdlearn._checkpoint import shard_names
    >>> shard_names(2)
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors']
    """
    return [f"{stem}-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def plan_shards(sizes, max_bytes):
    """Consecutive groups of tensor names whose bytes stay within ``max_bytes`` each (a
    tensor larger than that gets a shard of its own).

    Parameters
    ----------
    sizes : dict of str to int
        Bytes of every tensor, in order.
    max_bytes : int

    Examples
    --------
    >>> from qsdlearn._checkpoint import plan_shards
    >>> plan_shards({"a": 6, "b": 5, "c": 4, "d": 20}, 10)
    [['a'], ['b', 'c'], ['d']]
    """
    shards, current, used = [], [], 0
    for name, size in sizes.items():
        if current and used + size > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    if current:
        shards.append(current)
    return shards


def write_checkpoint(path, names, read, max_shard_bytes=None):
    """Write tensors to a ``.npz`` file, a ``.safetensors`` file or a folder of shards,
    holding one tensor (``.npz``) or one shard (safetensors) in memory at a time.

    ``.npz`` cannot hold bfloat16: such tensors are written as float32 (every bfloat16 value
    is a float32 value, so nothing is rounded), with a :class:`UserWarning` naming them.

    Parameters
    ----------
    path : str or path-like
        ``*.npz``, ``*.safetensors``, or, with ``max_shard_bytes``, a folder to create, which
        receives ``model-0000i-of-0000n.safetensors`` shards and ``model.safetensors.index.json``.
    names : dict of str to int
        The tensors to write, in order, with their size in bytes.
    read : callable
        ``read(name)`` returns the array.
    max_shard_bytes : int, optional
        Bytes of tensors per shard.

    Returns
    -------
    list of str
        The files written.
    """
    path = os.fspath(path)
    for name in names:  # a file read with such names (its checks come from other writers)
        _check_name(name)
    if max_shard_bytes is not None:
        return _write_shards(path, names, read, max_shard_bytes)
    suffix = _suffix(path)
    if suffix == ".npz":
        _write_npz(path, names, read)
    elif suffix == ".safetensors":
        _write_safetensors(path, names, read, {"format": "pt"})
    else:
        raise ValueError(f"cannot write {path}: name it .npz or .safetensors, or give a shard size")
    return [path]


def _write_npz(path, names, read):
    widened = []

    def write(temporary):
        with zipfile.ZipFile(temporary, "w", allowZip64=True) as archive:
            for name in names:
                array = read(name)
                if array.dtype.name == "bfloat16":
                    array = array.astype(np.float32)
                    widened.append(name)
                with archive.open(name + ".npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, array, allow_pickle=False)
                del array  # released before the next tensor is read

    replace_atomically(path, write, overwrite=True)
    if widened:
        warnings.warn(
            f"{path}: .npz cannot hold bfloat16; {len(widened)} "
            f"{'tensor was' if len(widened) == 1 else 'tensors were'} (e.g. {widened[0]!r}) "
            "written as float32, exactly (write .safetensors to keep bfloat16)",
            UserWarning, stacklevel=3,
        )


def _write_safetensors(path, names, read, metadata):
    """A safetensors file of the tensors ``read(name)`` for ``names``, written atomically
    (:func:`_safetensors_writer`)."""
    replace_atomically(path, _safetensors_writer(path, names, read, metadata), overwrite=True)


def _safetensors_writer(path, names, read, metadata):
    """``write(temporary)`` of a safetensors file of the tensors ``read(name)`` for
    ``names``, holding one tensor in memory at a time: their bytes go to an unnamed temporary
    file in the folder of ``path`` as they are read, and the file is the header (known once
    every shape is) followed by a copy of those bytes."""
    folder = os.path.dirname(os.path.abspath(path))

    def write(temporary):
        header, offset = {}, 0
        with tempfile.TemporaryFile(dir=folder) as data:
            for name in names:
                array = read(name)
                raw = to_little_endian_bytes(array)
                header[name] = {"dtype": SAFETENSORS_NAMES[array.dtype.name],
                                "shape": list(array.shape),
                                "data_offsets": [offset, offset + len(raw)]}
                data.write(raw)
                offset += len(raw)
                del array, raw
            header["__metadata__"] = dict(metadata)
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            data.seek(0)
            with open(temporary, "wb") as out:
                out.write(struct.pack("<Q", len(text)) + text)
                shutil.copyfileobj(data, out, 2**24)

    return write


def _write_shards(folder, names, read, max_shard_bytes):
    """Shards and their index in ``folder`` (created if missing).

    Every shard is written to a temporary file first, so that an interrupted write (reading
    and decoding the tensors is the long part) leaves the folder as it was, and a folder it
    created is removed. Then the earlier index goes, the shards of that naming pattern this
    write does not produce are removed (tools that read every shard of a folder would read
    them), the new shards are renamed into place and the index is written last, an
    interrupt deferred until that is done (:func:`_finish`). Only a killed process stops
    there, leaving shards without an index (a folder read without one must hold a complete
    set, :func:`_complete_shards`)."""
    created = not os.path.isdir(folder)
    os.makedirs(folder, exist_ok=True)
    groups = plan_shards(names, max_shard_bytes)
    files = shard_names(len(groups))
    paths = [check_target(os.path.join(folder, f), overwrite=True) for f in files]
    index_path = check_target(os.path.join(folder, "model" + INDEX_SUFFIX), overwrite=True)
    remove_stale_temporaries(folder)
    staged = []
    try:
        for group, path in zip(groups, paths):
            staged.append(write_temporary(
                path, _safetensors_writer(path, group, read, {"format": "pt"})))
    except BaseException:
        for temporary in staged:
            discard(temporary)
        if created and not os.listdir(folder):
            os.rmdir(folder)
        raise
    weight_map = {name: file_name for group, file_name in zip(groups, files) for name in group}
    index = {"metadata": {"total_size": int(sum(names.values()))}, "weight_map": weight_map}

    def write_index(temporary):
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(index, file, indent=2)

    stale = [os.path.join(folder, f) for f in set(os.listdir(folder)) - set(files)
             if _SHARD_NAME.fullmatch(f)]
    _finish([lambda: _remove(index_path)]
            + [lambda path=path: _remove(path) for path in stale]
            + [lambda t=temporary, path=path: _rename(t, path)
               for temporary, path in zip(staged, paths)]
            + [lambda: replace_atomically(index_path, write_index, overwrite=True)])
    return paths + [index_path]


def _finish(steps):
    """Run every one of ``steps`` (each may run again without harm), an interrupt (Ctrl-C,
    or SIGTERM under the command line) deferred until the last is done: they only remove,
    rename and write a small index, so finishing takes milliseconds, where stopping midway
    would leave a folder of old and new shards."""
    interrupted = None
    for step in steps:
        while True:
            try:
                step()
                break
            except KeyboardInterrupt as exc:
                interrupted = exc
    if interrupted is not None:
        raise interrupted


def _remove(path):
    if os.path.lexists(path):
        os.unlink(path)


def _rename(temporary, path):
    if os.path.exists(temporary):
        os.replace(temporary, path)
