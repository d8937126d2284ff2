"""A compressed model: its layers by name and its file image (:class:`CompressedModel`)."""

import json
import math

from ._compressed_layers import _TIED, PAYLOAD, CompressedLayer, SplitLayer
from ._container import FileImage, container_size, write_container
from ._dtypes import numpy_dtype
from ._model_headers import _layers_of_compact_list, _layers_of_version_2


class CompressedModel(FileImage):
    """The compressed weights of a model: compressed layers and tensors kept verbatim.

    Build one with :func:`compress_weights`, or read one with :func:`qsdlearn.load` or
    :meth:`from_bytes`. Decompression restores every tensor's name, shape (0-d included) and
    dtype (bfloat16 included); :meth:`decompress` with a name decodes that tensor alone.

    Parameters
    ----------
    layers : mapping of str to CompressedLayer, SplitLayer or KeptTensor
        In the model's order. Names that map to the same object are tied: stored once, and
        counted once in :attr:`n_weights`.

    Attributes
    ----------
    layers : dict of str to CompressedLayer, SplitLayer or KeptTensor
        The tensors, in the original order.

    Notes
    -----
    The file (format version 4, :meth:`to_bytes`) is a safetensors file of one ``U8`` tensor,
    ``payload``, that holds the bytes of every stored tensor back to back, and of a layer
    list in its metadata with one JSON array per tensor: ``[0, name, dtype, shape]`` for a
    kept tensor (its little-endian values), ``[1, name, dtype, shape, sqnr_db, setting]`` for
    a compressed one (its matrix's streams, then its row scales if it has any, a byte each),
    ``[2, name, dtype, shape, sqnr_db, parts]`` for a split one (its parts' bytes in row
    order) and ``[3, name, index]`` for one tied to an earlier entry (no bytes). A
    ``setting`` is ``[d, k, s, code_bits, codebook_bits, t, float_bits, row_scales]``
    (``row_scales``: the bytes of one row scale, 0 without); the size of every tensor's
    bytes follows from its entry, so no offsets are stored and a compressed tensor costs a
    few dozen bytes of header besides its name. Files of format versions 1 to 3 are read too
    (version 3 is this layout with float16 row scales, 1 in ``row_scales``). The user
    guide's section on the file format describes it byte by byte, with what a reader checks.

    Examples
    --------
    >>> import numpy as np
    >>> import qsdlearn
    >>> rng = np.random.default_rng(0)
    >>> weights = {"fc.weight": rng.standard_normal((128, 64)), "fc.bias": np.zeros(128)}
    >>> setting = qsdlearn.LayerSetting(8, qsdlearn.Constraints(16, n_nonzero=1, code_bits=0))
    >>> model = qsdlearn.compress_weights(weights, settings=setting, random_state=0)
    >>> [record["setting"] for record in model.report()]
    ['d=8 k=16 1 of 16 codes=0b codebook=float', 'kept (float64)']
    >>> restored = model.decompress()
    >>> restored["fc.weight"].shape, restored["fc.bias"].dtype
    ((128, 64), dtype('float64'))
    >>> model.decompress("fc.bias").shape
    (128,)
    """

    _KIND = "model"

    def __init__(self, layers):
        self.layers = dict(layers)
        self._image = None

    def tied_to(self, name):
        """The tensor a tied tensor shares its entry with.

        Parameters
        ----------
        name : str
            A tensor's name.

        Returns
        -------
        str
            The first name whose entry tensor ``name`` shares (``name`` itself when none).
        """
        return self._firsts()[name]

    def _firsts(self):
        """Every name to the first name of its entry."""
        seen = {}
        return {name: seen.setdefault(id(entry), name) for name, entry in self.layers.items()}

    def _distinct(self):
        """The entries, each tied group once."""
        return list({id(entry): entry for entry in self.layers.values()}.values())

    # size ---------------------------------------------------------------------------------------

    @property
    def n_weights(self):
        """Number of weights of all tensors (tied tensors counted once)."""
        return sum(math.prod(entry.shape) for entry in self._distinct())

    @property
    def original_nbytes(self):
        """Bytes of the weights in their original dtypes (tied tensors counted once)."""
        return sum(math.prod(entry.shape) * numpy_dtype(entry.dtype).itemsize
                   for entry in self._distinct())

    @property
    def original_dtypes(self):
        """Names of the original dtypes of the compressed layers (of all tensors when none
        is compressed), most weights first.
        """
        counts = {}
        compressed = [e for e in self._distinct() if isinstance(e, (CompressedLayer, SplitLayer))]
        for entry in compressed or self._distinct():
            counts[entry.dtype] = counts.get(entry.dtype, 0) + math.prod(entry.shape)
        return sorted(counts, key=lambda name: -counts[name])

    @property
    def nbytes(self):
        """Size of the file :meth:`save` writes, in bytes.

        Computed from the entries' sizes, without building the file.
        """
        if self._image is not None:
            return len(self._image)
        entries, stored = self._file_layers()
        size = sum(entry.nbytes for entry in stored)
        return container_size([(PAYLOAD, "U8", (size,), size)], self._file_metadata(entries))

    @property
    def bits_per_weight(self):
        """``8 * file bytes / n_weights``: everything counted."""
        return 8 * self.nbytes / self.n_weights

    @property
    def compression_ratio(self):
        """:attr:`original_nbytes` over the file's bytes: how much smaller the file is than
        the weights in their own dtypes (a bfloat16 model counts 16 bits a weight).
        """
        return self.original_nbytes / self.nbytes

    # content ------------------------------------------------------------------------------------

    def decompress(self, name=None):
        """The decompressed tensors, or one of them.

        Parameters
        ----------
        name : str, optional
            Decode only this tensor (memory: that tensor alone).

        Returns
        -------
        dict of str to ndarray, or ndarray
            Name to array with the original shapes and dtypes, in order; or the array of
            ``name``.

        Raises
        ------
        TypeError
            If ``name`` is not a string (one name: for several, call it once per name).
        KeyError
            If the model has no tensor ``name``.
        ValueError
            If a tensor decodes to values beyond its dtype's range (a damaged or crafted file:
            no fit of weights within the range makes one).
        """
        if name is not None:
            if not isinstance(name, str):
                raise TypeError(f"name is one tensor's name (a str), got {type(name).__name__}; "
                                "call decompress once per name for several")
            if name not in self.layers:
                raise KeyError(f"no tensor named {name!r}")
            return self.layers[name].decompress()
        decoded = {}
        for key, first in self._firsts().items():
            decoded[key] = decoded[first] if first != key else self.layers[key].decompress()
        return decoded

    def report(self):
        """Per-tensor records.

        Returns
        -------
        list of dict
            One per tensor, in order: ``name``, ``shape``, ``dtype`` (original),
            ``setting`` (text), ``payload_bits`` (exact bits of its streams or of the kept
            tensor), ``stored_bits`` (what the file holds for it: streams rounded up to whole
            bytes; 0 for a tensor tied to an earlier one), ``bits_per_weight``
            (``stored_bits`` per weight), ``sqnr_db`` (``inf`` for kept tensors), ``n_iter``
            and ``converged`` of the final fit (``None`` when not recorded), and
            ``output_sqnr_db``, the SQNR of the layer's output on its calibration data
            (``None`` for layers without calibration, and in models read from files).
        """
        records = []
        firsts = self._firsts()
        for name, entry in self.layers.items():
            size = math.prod(entry.shape)
            record = entry.record()
            stored = 8 * entry.nbytes
            first = firsts[name]
            if first != name:
                record = dict(record, setting=f"tied to {first}", payload_bits=0)
                stored = 0
            records.append(dict(
                name=name, shape=tuple(entry.shape), dtype=entry.dtype,
                setting=record["setting"], payload_bits=record["payload_bits"],
                stored_bits=stored, bits_per_weight=stored / max(size, 1),
                sqnr_db=record["sqnr_db"], n_iter=record["n_iter"],
                converged=record["converged"], output_sqnr_db=record["output_sqnr_db"],
            ))
        return records

    def report_table(self):
        """The report and the totals as printable text.

        Returns
        -------
        str
            One line per tensor, then the totals. Bits per weight are over the whole file;
            the ratio is over the weights in their original dtypes, which the last line names.
        """
        rows = self.report()
        width = max([len(r["name"]) for r in rows] + [4])
        shape_width = max([len(str(r["shape"])) for r in rows] + [18])
        dtype_width = max([len(r["dtype"]) for r in rows] + [8])
        setting_width = max([len(r["setting"]) for r in rows] + [7])
        calibrated = any(r["output_sqnr_db"] is not None for r in rows)
        lines = [
            f"{'name':<{width}}  {'shape':<{shape_width}} {'dtype':<{dtype_width}} "
            f"{'setting':<{setting_width}} {'bits/weight':>11} "
            f"{'SQNR dB':>8}" + (f" {'output dB':>9}" if calibrated else "")
        ]
        for r in rows:
            note = "" if r["converged"] is not False else f"  (not converged in {r['n_iter']})"
            output = ""
            if calibrated:
                output = (f" {r['output_sqnr_db']:>9.2f}" if r["output_sqnr_db"] is not None
                          else f" {'-':>9}")
            lines.append(
                f"{r['name']:<{width}}  {str(r['shape']):<{shape_width}} "
                f"{r['dtype']:<{dtype_width}} "
                f"{r['setting']:<{setting_width}} {r['bits_per_weight']:>11.3f} "
                f"{r['sqnr_db']:>8.2f}"
                f"{output}{note}"
            )
        lines.append(
            f"total: {self.n_weights} weights, {self.nbytes} bytes, "
            f"{self.bits_per_weight:.3f} bits/weight (header included), "
            f"ratio {self.compression_ratio:.1f}x over the original "
            f"({', '.join(self.original_dtypes)})"
        )
        return "\n".join(lines)

    # file image ---------------------------------------------------------------------------------

    def to_bytes(self):
        """The file image (format version 4).

        Returns
        -------
        bytes
            A safetensors file of one ``U8`` tensor, ``payload``: the bytes of every stored
            tensor back to back, in order (a compressed layer's five streams and its row
            scales, a split tensor's parts, a kept tensor's values; nothing for a tied
            tensor); the metadata's ``layers`` list describes them, one short JSON array per
            tensor (see the user guide's section on the file format).
        """
        if self._image is None:
            entries, stored = self._file_layers()
            payload = b"".join(entry._payload() for entry in stored)
            self._image = write_container([(PAYLOAD, "U8", (len(payload),), payload)],
                                          self._file_metadata(entries))
        return self._image

    def _file_layers(self):
        """The file's layer list (one entry per tensor) and the entries whose bytes it stores,
        in order (a tied tensor stores none)."""
        entries, stored, position = [], [], {}
        firsts = self._firsts()
        for i, (name, entry) in enumerate(self.layers.items()):
            first = firsts[name]
            if first != name:
                entries.append([_TIED, name, position[first]])
                continue
            position[name] = i
            entries.append(entry._file_entry(name))
            stored.append(entry)
        return entries, stored

    def _file_metadata(self, entries):
        return {"kind": self._KIND, "layers": json.dumps(entries, separators=(",", ":"))}

    @classmethod
    def _from_container(cls, meta, tensors, max_elements=None):
        """:meth:`FileImage._from_container <qsdlearn._container.FileImage._from_container>`
        of a model file (format versions 1 to 4): every layer's entry is checked, the declared
        sizes against ``max_elements`` and the payload's length, before any stream is
        decoded."""
        cls._check_kind(meta)
        version = int(meta["format_version"])  # one of READ_VERSIONS (read_container)
        if version <= 2:
            model = cls(_layers_of_version_2(meta, tensors, max_elements))
        else:
            model = cls(_layers_of_compact_list(meta, tensors, max_elements, version))
        if model.n_weights == 0:  # compress_weights refuses a model of no weights
            raise ValueError("damaged file: a model of no weights")
        return model

    def __repr__(self):
        return (
            f"CompressedModel({len(self.layers)} tensors, {self.n_weights} weights, "
            f"{self.bits_per_weight:.3f} bits/weight)"
        )
