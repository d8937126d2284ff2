"""The safetensors container every qsdlearn file is, and the atomic write.

A file is a `safetensors <https://github.com/huggingface/safetensors>`_ file: an 8-byte
little-endian header length ``N``, ``N`` bytes of JSON (padded with spaces), then the byte
buffer. The JSON maps every tensor name to its dtype, shape and ``data_offsets`` in the
buffer; ``__metadata__`` (string to string) holds ``format = "qsdlearn"``,
``format_version``, the ``kind`` of object, what that kind stores there (a matrix's settings,
a model's layer list), ``checksums`` (JSON: tensor name to the CRC-32 of its bytes, 8 hex
digits) and ``metadata_checksum`` (the CRC-32 of the other metadata fields as sorted,
compact JSON; from version 2 on). A matrix file holds five tensors, one per stream
(:mod:`qsdlearn.codec`); a model file of version 3 or 4 holds one, ``payload``
(:class:`qsdlearn.CompressedModel`). This module knows nothing of what the tensors mean: the
matrix codec and the model adapter both build on it. It imports nothing from the package.
"""

import json
import os
import socket
import stat
import struct
import tempfile
import zlib

import numpy as np

FORMAT_NAME = "qsdlearn"
#: Version written. 2 added model entries of tensors split between two settings ("split"),
#: tensors stored once under several names ("tied") and bfloat16 tensors, and the metadata
#: checksum. 3 stores a model in one tensor (its layers' bytes back to back) described by a
#: compact layer list, and adds row scales (float16); 4 stores row scales in 8 bits
#: (float8_e5m2), float16 ones as they are. Matrices are the same in every version.
FORMAT_VERSION = 4
#: Versions read.
READ_VERSIONS = (1, 2, 3, 4)
#: Largest JSON header accepted when reading (bytes).
MAX_HEADER_BYTES = 64 * 2**20
#: Prefix and suffix of the temporary files :func:`replace_atomically` creates next to the
#: target: ``.qsdlearn-<pid>-<host>-<random>.tmp``, the pid being that of the writing process
#: and ``<host>`` :func:`host_tag`.
TEMPORARY_PREFIX, TEMPORARY_SUFFIX = ".qsdlearn-", ".tmp"


def host_tag():
    """Eight hex digits of the CRC-32 of this machine's host name: a temporary file's pid is
    tested only on the host that wrote it (a folder shared between machines, or containers
    of separate pid namespaces, holds files of pids that this host cannot see)."""
    return f"{zlib.crc32(socket.gethostname().encode('utf-8', 'replace')):08x}"


#: Default cap on the elements a file may declare (matrix entries and code slots): sizes in a
#: header are checked against it before anything is allocated; ``load(..., max_elements=)``
#: raises it.
MAX_ELEMENTS = 2**32

#: safetensors dtype names of the tensors a container may hold, with their sizes in bytes (all
#: the reader needs: it checks sizes and hands out bytes).
CONTAINER_ITEMSIZES = {
    "U8": 1, "I8": 1, "BOOL": 1, "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4, "U64": 8, "I64": 8, "F64": 8,
}


def write_container(tensors, metadata, header_bytes=None):
    """A safetensors file image.

    Parameters
    ----------
    tensors : list of (name, dtype, shape, bytes)
        In file order; ``dtype`` is a safetensors dtype name.
    metadata : dict of str to str
        ``format``, ``format_version`` and CRC-32 ``checksums`` are added.
    header_bytes : int, optional
        Pad the JSON header with spaces to exactly this size.

    Returns
    -------
    bytes
    """
    checksums = {name: f"{zlib.crc32(data):08x}" for name, _, _, data in tensors}
    sizes = [(name, dtype, shape, len(data)) for name, dtype, shape, data in tensors]
    text = _header_text(sizes, metadata, checksums, header_bytes)
    return struct.pack("<Q", len(text)) + text + b"".join(data for _, _, _, data in tensors)


def container_size(tensors, metadata, header_bytes=None):
    """Bytes of the image :func:`write_container` makes, from the tensors' sizes alone.

    Parameters
    ----------
    tensors : list of (name, dtype, shape, int)
        As for :func:`write_container`, with each tensor's size in bytes instead of its bytes
        (a CRC-32 is 8 hex digits whatever the data, so the header's size does not depend on
        them).
    metadata : dict of str to str
    header_bytes : int, optional

    Returns
    -------
    int
    """
    text = _header_text(tensors, metadata, {name: "0" * 8 for name, *_ in tensors},
                        header_bytes)
    return 8 + len(text) + sum(size for *_, size in tensors)


def _header_text(tensors, metadata, checksums, header_bytes):
    """The JSON header of a file image of ``(name, dtype, shape, size)`` tensors with their
    ``checksums``, padded with spaces to ``header_bytes`` (by default to a multiple of 8, as
    safetensors aligns the buffer)."""
    header = {}
    offset = 0
    for name, dtype, shape, size in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION), **metadata}
    header["__metadata__"] = {
        **meta,
        "checksums": json.dumps(checksums, sort_keys=True),
        "metadata_checksum": _metadata_checksum(meta),
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    if header_bytes is None:
        header_bytes = len(text) + (-len(text) % 8)  # align the buffer, as safetensors does
    if len(text) > header_bytes:
        raise ValueError(f"header of {len(text)} bytes exceeds the fixed {header_bytes}")
    return text + b" " * (header_bytes - len(text))


def read_container(data):
    """Parse and check a file image: header, offsets, sizes against shapes and checksums.

    Returns
    -------
    metadata : dict
    tensors : dict of str to (dtype name, shape tuple, bytes), in file order

    Raises
    ------
    ValueError
        If the image is not a qsdlearn file of this version, or is truncated or altered.
    """
    header, meta, buffer = _parse_header(bytes(data))
    if meta.get("format_version") != "1":  # version 2 on: the metadata has a checksum too
        described = {k: v for k, v in meta.items() if k not in ("checksums", "metadata_checksum")}
        if meta.get("metadata_checksum") != _metadata_checksum(described):
            raise ValueError("damaged file: checksum mismatch in the metadata")
    checksums = json_field(meta, "checksums", dict)
    tensors = {}
    offset = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict) or entry.get("dtype") not in CONTAINER_ITEMSIZES:
            raise ValueError(f"damaged file: tensor {name} has no supported dtype")
        shape = entry.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 2**48 for v in shape
        ):
            raise ValueError(f"damaged file: tensor {name} has an invalid shape")
        begin, end = _offsets(entry, name)
        if begin != offset:
            raise ValueError(f"damaged file: tensor {name} is not contiguous with the others")
        itemsize = CONTAINER_ITEMSIZES[entry["dtype"]]
        if end - begin != int(np.prod(shape, dtype=object)) * itemsize:
            raise ValueError(f"damaged file: tensor {name} size does not match its shape")
        if end > len(buffer):
            raise ValueError(
                f"damaged file: tensor {name} ends at byte {end} of a {len(buffer)}-byte buffer; "
                "the file is probably truncated"
            )
        chunk = buffer[begin:end]
        if checksums.get(name) != f"{zlib.crc32(chunk):08x}":
            raise ValueError(f"damaged file: checksum mismatch in stream {name}")
        tensors[name] = (entry["dtype"], tuple(shape), chunk)
        offset = end
    if offset != len(buffer):
        raise ValueError(f"damaged file: {len(buffer) - offset} bytes after the last stream")
    if set(checksums) != set(tensors):
        raise ValueError("damaged file: the checksums do not name the tensors of the file")
    return meta, tensors


def _metadata_checksum(meta):
    """CRC-32 of the metadata fields (settings, layer list, format), as 8 hex digits."""
    text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


def json_field(meta, key, kind):
    """Decode the JSON text of metadata field ``key``; it must hold a ``kind`` (dict/list)."""
    try:
        value = json.loads(meta.get(key, ""))
    except (TypeError, ValueError, RecursionError):  # RecursionError: nesting beyond Python's
        raise ValueError(f"damaged file: the {key} are not valid JSON") from None
    if not isinstance(value, kind):
        raise ValueError(f"damaged file: the {key} are not a {kind.__name__}")
    return value


def _parse_header(data):
    if len(data) < 8:
        raise ValueError(f"not a qsdlearn file: {len(data)} bytes is too short for a header")
    if data[:4] == b"PK\x03\x04":
        raise ValueError("not a qsdlearn file: a zip archive (a .npz file of weights?); "
                         "compress it with qsdlearn compress")
    (length,) = struct.unpack("<Q", data[:8])
    if length > MAX_HEADER_BYTES:
        raise ValueError(f"not a qsdlearn file: header length {length} exceeds the cap")
    if 8 + length > len(data):
        raise ValueError(
            f"damaged file: header of {length} bytes is longer than the file ({len(data)} bytes); "
            "the file is probably truncated"
        )
    try:
        header = json.loads(data[8 : 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ValueError("not a qsdlearn file: the header is not valid JSON") from None
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise ValueError("not a qsdlearn file: the header has no metadata")
    meta = header["__metadata__"]
    if meta.get("format") != FORMAT_NAME:
        raise ValueError("not a qsdlearn file: the metadata does not name the qsdlearn format")
    if meta.get("format_version") not in [str(v) for v in READ_VERSIONS]:
        raise ValueError(
            f"unsupported qsdlearn format version {meta.get('format_version')!r}; this version "
            f"reads versions {', '.join(map(str, READ_VERSIONS))}"
        )
    return header, meta, data[8 + length :]


def _offsets(entry, name):
    offsets = entry.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in offsets)
        or not 0 <= offsets[0] <= offsets[1]
    ):
        raise ValueError(f"damaged file: stream {name} has invalid offsets")
    return offsets


def replace_atomically(path, write, overwrite=False):
    """Call ``write(temporary)`` on a temporary file in the folder of ``path``, then rename it
    over ``path``.

    An interrupted write leaves either the old file or the new one at ``path``, never a
    partial file: the temporary file is flushed to disk before the rename, and removed when
    ``write`` fails. Temporary files left in that folder by writers of this host that no
    longer run (a killed process) are removed first. Something already at ``path`` is
    replaced only with ``overwrite``, and only a regular file (or a link to one): never a
    device or a pipe.
    """
    path = check_target(path, overwrite)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    temporary = write_temporary(path, write)
    try:
        os.replace(temporary, path)
    except BaseException:
        discard(temporary)
        raise


def check_target(path, overwrite):
    """``path`` (as a str) if a file may be written there (see :func:`replace_atomically`)."""
    path = os.fsdecode(os.fspath(path))  # a bytes path as the str one
    if not path:
        raise ValueError("the file name is empty: give the file to write")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)) or \
            os.path.basename(path) in (os.curdir, os.pardir):
        raise ValueError(f"cannot write {path}: it names a folder (it ends with a path "
                         f"separator, {os.curdir!r} or {os.pardir!r}), not a file")
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if is_device_or_pipe(path):
        raise ValueError(f"cannot write {path}: it is a device or a pipe, not a regular file")
    if os.path.lexists(path) and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"cannot write {path}: the folder {folder} does not exist")
    return path


def write_temporary(path, write):
    """A temporary file next to ``path`` that ``write(temporary)`` filled, flushed to disk
    and given the mode a new file gets; removed when ``write`` fails. Returns its path, for
    the caller to rename over ``path``."""
    try:
        handle, temporary = tempfile.mkstemp(
            dir=os.path.dirname(os.path.abspath(path)),
            prefix=f"{TEMPORARY_PREFIX}{os.getpid()}-{host_tag()}-", suffix=TEMPORARY_SUFFIX
        )
    except OSError as exc:  # named after the file asked for, not the temporary one
        raise OSError(exc.errno, f"cannot create a file in its folder ({exc.strerror})",
                      os.fspath(path)) from None
    os.close(handle)
    try:
        write(temporary)
        handle = os.open(temporary, os.O_RDWR)
        try:
            os.fsync(handle)
        finally:
            os.close(handle)
        os.chmod(temporary, _new_file_mode())  # mkstemp makes it 0600; the umask's mode
    except OSError as exc:
        discard(temporary)
        if exc.errno is not None and exc.filename in (None, temporary):
            # a write's error names no file (a full disk, "File too large"): the one asked for
            raise OSError(exc.errno, exc.strerror or str(exc), os.fspath(path)) from exc
        raise
    except BaseException:
        discard(temporary)
        raise
    return temporary


def discard(temporary):
    """Remove a temporary file if it is still there."""
    if os.path.exists(temporary):
        os.unlink(temporary)


def write_atomic(path, data, overwrite=False):
    """Write the bytes ``data`` to ``path`` atomically (:func:`replace_atomically`)."""

    def write(temporary):
        with open(temporary, "wb") as file:
            file.write(data)

    replace_atomically(path, write, overwrite)


class FileImage:
    """What every kind of qsdlearn file shares: ``save`` and ``from_bytes`` around the
    subclass's ``to_bytes`` and ``_from_container``; ``_KIND`` is the ``kind`` its metadata
    names."""

    _KIND = None

    def save(self, path, *, overwrite=False):
        """Write :meth:`to_bytes` to ``path`` atomically (see :func:`qsdlearn.save`).

        Parameters
        ----------
        path : str or path-like
            Destination.
        overwrite : bool, default=False
            Replace a file already at ``path`` (as a whole: never left partial; a new file
            with the umask's mode, a symbolic link itself rather than its target, as
            :func:`qsdlearn.save` does).

        Raises
        ------
        FileExistsError
            If something is at ``path`` and ``overwrite`` is False.
        IsADirectoryError
            If ``path`` is a folder.
        FileNotFoundError
            If the folder of ``path`` does not exist.
        ValueError
            If ``path`` is empty, or a device or a pipe.
        PermissionError
            If no file can be created in the folder of ``path``.
        """
        write_atomic(path, self.to_bytes(), overwrite=_check_overwrite(overwrite))

    @classmethod
    def from_bytes(cls, data, *, max_elements=None):
        """Read and fully validate a file image written by :meth:`to_bytes`.

        Parameters
        ----------
        data : bytes
            The file image.
        max_elements : int, optional
            Refuse files that declare more decoded elements than this (default:
            :data:`MAX_ELEMENTS`), before anything is allocated.

        Raises
        ------
        ValueError
            If the image is not a file of this kind and format version, is damaged, or
            declares more than ``max_elements`` elements.
        """
        max_elements = check_max_elements(max_elements)
        return cls._from_container(*read_container(data), max_elements=max_elements)

    @classmethod
    def _from_container(cls, meta, tensors, max_elements=None):
        """Rebuild from a parsed container; each kind of file implements it.

        Parameters
        ----------
        meta : dict
            The file's metadata (:func:`read_container`).
        tensors : dict
            Its tensors by name.
        max_elements : int, optional
            Largest number of elements the file may declare in all (default ``2**32``).

        Returns
        -------
        FileImage
            An instance of ``cls``, validated.
        """
        raise NotImplementedError

    @classmethod
    def _check_kind(cls, meta):
        """Reject metadata of another kind of file."""
        if meta.get("kind") != cls._KIND:
            raise ValueError(f"not a compressed {cls._KIND}: kind {meta.get('kind')!r}")


def _check_overwrite(overwrite):
    """``overwrite`` itself, if it is a bool."""
    if not isinstance(overwrite, (bool, np.bool_)):
        raise TypeError(f"overwrite must be True or False, got {overwrite!r}")
    return bool(overwrite)


def _new_file_mode():
    """The mode ``open(path, "w")`` would give a new file (0o666 less the umask); temporary
    files are created private, and get this mode before they are renamed."""
    return 0o666 & ~_umask()


def _umask():
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o077)  # restrictive while it is read, for other threads' new files
    os.umask(umask)
    return umask


def _process_is_running(pid):
    if os.name == "nt":  # os.kill would terminate the process there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # it exists, or we cannot tell: leave its file alone
    return True


def is_temporary_name(name):
    """Whether ``name`` is that of a temporary file of :func:`replace_atomically`."""
    return name.startswith(TEMPORARY_PREFIX) and name.endswith(TEMPORARY_SUFFIX)


def remove_stale_temporaries(folder):
    """Remove the temporary files of :func:`replace_atomically` in ``folder`` that this host
    wrote (:func:`host_tag`) and whose writing process has ended; returns their names. Files
    of running writers, of other hosts and of other names are left alone."""
    removed = []
    try:
        names = os.listdir(folder)
    except OSError:
        return removed
    tag = host_tag()
    for name in names:
        if not is_temporary_name(name):
            continue
        fields = name[len(TEMPORARY_PREFIX):].split("-", 2)
        if len(fields) < 3 or fields[1] != tag or not fields[0].isdigit() or \
                _process_is_running(int(fields[0])):
            continue
        try:
            os.unlink(os.path.join(folder, name))
            removed.append(name)
        except OSError:
            pass
    return removed


def check_max_elements(max_elements):
    """``max_elements`` itself if it is None or a positive integer (a NaN compared false with
    every size, which turned the limit off)."""
    if max_elements is None:
        return None
    if isinstance(max_elements, (bool, np.bool_)) or not isinstance(
            max_elements, (int, np.integer)):
        raise TypeError(f"max_elements must be a positive integer or None, got "
                        f"{max_elements!r}")
    if max_elements < 1:
        raise ValueError(f"max_elements must be a positive integer, got {max_elements}")
    return int(max_elements)


def check_declared_elements(elements, max_elements, what):
    """Reject a file that declares more than ``max_elements`` elements (``None``: the
    default :data:`MAX_ELEMENTS`)."""
    limit = MAX_ELEMENTS if max_elements is None else max_elements
    if elements > limit:
        raise ValueError(
            f"the file declares {what} of {elements} elements, more than max_elements={limit}; "
            "if you trust the file and have the memory, load it with a larger max_elements"
        )


def stat_error(path):
    """The error ``os.stat(path)`` raises (``ENOENT`` where nothing is there, ``ELOOP`` for a
    loop of symbolic links), or None when it succeeds."""
    try:
        os.stat(path)
    except OSError as exc:
        return exc
    return None


def is_device_or_pipe(path):
    """Whether ``path`` names something that is neither a regular file nor a folder: a device
    or a pipe, which a reader would read until the memory runs out (``/dev/zero``) or wait on
    in ``open`` for ever (a FIFO). False where nothing is there (``open`` then says why)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def read_file(path):
    """The bytes of the file at ``path``, its header checked (:func:`_parse_header`) before
    the rest is read, so that a file that is not a qsdlearn file is refused before a
    checkpoint of many GB is read whole. Devices and pipes are refused
    (:func:`is_device_or_pipe`)."""
    if not isinstance(path, (str, bytes, os.PathLike)):  # open() takes an int for a descriptor
        raise TypeError(f"expected a file name (str or path-like), got {type(path).__name__}")
    if isinstance(path, bytes) and b"\x00" in path:  # no file name holds NUL: a file's bytes
        raise TypeError("expected a file name (str or path-like), got bytes holding NUL (a "
                        "file's content?): read those with CompressedModel.from_bytes or "
                        "CompressedMatrix.from_bytes")
    if is_device_or_pipe(path):
        raise ValueError("not a qsdlearn file: not a regular file (a device or a pipe)")
    with open(path, "rb") as file:
        head = file.read(8)
        if len(head) == 8:
            (length,) = struct.unpack("<Q", head)
            head += file.read(min(length, MAX_HEADER_BYTES))
        _parse_header(head)
        return head + file.read()
