"""``qsdlearn.save`` and ``qsdlearn.load``: files of any kind, recognised from their content.

This module sits above the matrix codec and the model adapter, which both write the same
container (:mod:`qsdlearn._container`); it is the only place that knows both kinds.
"""

from ._container import check_max_elements, read_container, read_file
from .codec import CompressedMatrix
from ._model import CompressedModel

_KINDS = {kind._KIND: kind for kind in (CompressedMatrix, CompressedModel)}


def save(obj, path, *, overwrite=False):
    """Write a compressed matrix or model to ``path`` atomically (whatever its extension).

    The file is written to a temporary file in the same folder and renamed over ``path``, so
    an interrupted save leaves either the old file or the new one, never a partial file. A
    file already at ``path`` is replaced only when asked (``overwrite=True``).

    Parameters
    ----------
    obj : CompressedMatrix or CompressedModel
        What to write (its ``to_bytes()``).
    path : str or path-like
        Destination.
    overwrite : bool, default=False
        Replace a file already at ``path``: a new file takes its place, with the mode a new
        file gets (the umask's), whatever the old one had (read-only included); a symbolic
        link at ``path`` is itself replaced, the file it points to left as it is.

    Raises
    ------
    TypeError
        If ``obj`` is neither a :class:`CompressedMatrix` nor a :class:`CompressedModel`, or
        ``overwrite`` is not a bool.
    FileExistsError
        If something is at ``path`` and ``overwrite`` is False.
    IsADirectoryError, FileNotFoundError
        If ``path`` is a folder, or its folder does not exist.
    ValueError
        If ``path`` is empty, or a device or a pipe.
    PermissionError
        If no file can be created in the folder of ``path`` (nothing is left there).

    See Also
    --------
    load : Read the file back.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import qsdlearn
    >>> X = np.random.default_rng(0).standard_normal((300, 4))
    >>> qsd = qsdlearn.QuantizedSparseDecomposition(8, n_nonzero=1, code_bits=0,
    ...                                             random_state=0).fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "x.qsd")
    >>> qsdlearn.save(qsd.encode(X), path)
    >>> qsdlearn.load(path).shape
    (300, 4)
    """
    if not isinstance(obj, tuple(_KINDS.values())):
        raise TypeError(
            f"save takes a CompressedMatrix or a CompressedModel, got {type(obj).__name__}"
        )
    obj.save(path, overwrite=overwrite)


def load(path, *, max_elements=None):
    """Read a file written by :func:`save`; the kind of object is recognised from the content.

    Loading never uses pickle: the header and every stream are checked (format name and
    version, sizes, checksums, index ranges, finite values) before anything is returned.

    Parameters
    ----------
    path : str or path-like
        A file written by :func:`save`, :meth:`CompressedMatrix.save` or
        :meth:`CompressedModel.save`.
    max_elements : int, optional
        Largest number of elements (matrix entries and code slots, over all layers) the file
        may declare; checked before anything is allocated. Default ``2**32``.

    Returns
    -------
    CompressedMatrix or CompressedModel
        What the file holds, validated.

    Raises
    ------
    ValueError
        If the file is not a qsdlearn file of a supported version, is truncated or
        altered, or declares more than ``max_elements`` elements; the message names the
        problem. Also if ``max_elements`` is below 1.
    TypeError
        If ``path`` is not a file name, or ``max_elements`` is not an integer or None.
    OSError
        If the file cannot be read.

    See Also
    --------
    save : Write a file.

    Examples
    --------
    >>> import os, tempfile
    >>> import numpy as np
    >>> import qsdlearn
    >>> X = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    >>> qsd = qsdlearn.QuantizedSparseDecomposition(4, n_nonzero=1, code_bits=0,
    ...                                             random_state=0).fit(X)
    >>> path = os.path.join(tempfile.mkdtemp(), "x.qsd")
    >>> qsd.encode(X).save(path)
    >>> loaded = qsdlearn.load(path)
    >>> bool(np.array_equal(loaded.decode(), qsd.inverse_transform(qsd.transform(X))))
    True
    """
    max_elements = check_max_elements(max_elements)
    meta, tensors = read_container(read_file(path))
    kind = _KINDS.get(meta.get("kind"))
    if kind is None:
        raise ValueError(f"unsupported kind of qsdlearn file: {meta.get('kind')!r}")
    return kind._from_container(meta, tensors, max_elements=max_elements)
