"""Reading a model file's layer list, format versions 1 to 4, into its layers: every field
checked before any array is read, a damaged header rejected naming the field."""

import math
from dataclasses import dataclass

import numpy as np

from ._compressed_layers import (_COMPRESSED, _KEPT, _SPLIT, _TIED, PAYLOAD, CompressedLayer,
                                 KeptTensor, SplitLayer)
from ._container import check_declared_elements, json_field
from ._dtypes import (FLOAT_DTYPES, NUMPY_NAMES, from_little_endian_bytes, is_float,
                      numpy_dtype)
from ._layers import (ROW_SCALE_DTYPES, LayerSetting, _positive_and_finite,
                      _row_scales_from_bytes, rows_of)
from .codec import STREAMS, MatrixSettings, matrix_from_payload, matrix_from_tensors


#: Width of the floats of a stored setting to the dtype of its matrix.
_MATRIX_DTYPES = {32: "float32", 64: "float64"}
_MAX_NDIM = 32
_MAX_DIM = 2**48


def _is_int(value, low=0, high=None):
    return (isinstance(value, int) and not isinstance(value, bool) and value >= low
            and (high is None or value <= high))


@dataclass(frozen=True)
class _Block:
    """A checked compressed block (a layer, or a part of a split one) of a file, before its
    bytes are read."""

    setting: LayerSetting
    settings: MatrixSettings
    shape: tuple
    dtype: str
    sqnr_db: float
    scale_bytes: int  # of one row scale (ROW_SCALE_DTYPES), 0 without

    @property
    def stream_bytes(self):
        return sum(self.settings.stream_sizes().values())

    @property
    def nbytes(self):
        return self.stream_bytes + self.scale_bytes * self.shape[0]

    def read(self, data, what):
        """The :class:`CompressedLayer` of this block from its ``nbytes`` bytes ``data``."""
        matrix = matrix_from_payload(self.settings, data[:self.stream_bytes], what)
        scales = None
        if self.setting.row_scales:
            scales = _row_scales_from_bytes(data[self.stream_bytes:], self.scale_bytes)
            if scales.shape != (self.shape[0],):
                raise ValueError(f"damaged file: {what} has {scales.size} row scales for "
                                 f"{self.shape[0]} rows")
            if not _positive_and_finite(scales):
                raise ValueError(f"damaged file: {what} has a row scale that is not positive "
                                 "and finite")
        return CompressedLayer(matrix, self.shape, self.dtype, self.setting, self.sqnr_db,
                               row_scales=scales)


def _shape_field(raw, name, compressed):
    """A checked stored shape: at least 2 positive dimensions for a compressed tensor."""
    if (not isinstance(raw, list) or len(raw) > _MAX_NDIM
            or not all(_is_int(v, 1 if compressed else 0, _MAX_DIM) for v in raw)
            or (compressed and len(raw) < 2)):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape")
    return tuple(raw)


def _sqnr_field(raw, name):
    if isinstance(raw, bool) or not isinstance(raw, (int, float)):
        raise ValueError(f"damaged file: layer {name!r} has an invalid SQNR")
    return float(raw)


def _block_field(raw, shape, dtype, sqnr_db, name, version):
    """A checked stored setting (written by
    :func:`qsdlearn._compressed_layers._setting_fields`) of a block of ``shape`` in a file of
    format ``version`` (3 or 4)."""
    scale_bytes = {0: 0, 1: 2} if version == 3 else {0: 0, **{b: b for b in ROW_SCALE_DTYPES}}
    if (not isinstance(raw, list) or len(raw) != 8 or not _is_int(raw[0], 1, 2**31)
            or not _is_int(raw[6]) or raw[6] not in _MATRIX_DTYPES
            or not _is_int(raw[7]) or raw[7] not in scale_bytes):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings")
    d, k, s, code_bits, codebook_bits, t, float_bits, row_scales = raw
    flat = dict(n_rows=rows_of(shape, d), n_features=d, n_components=k, n_nonzero=s,
                code_bits=code_bits, codebook_bits=codebook_bits, component_nonzero=t,
                dtype=_MATRIX_DTYPES[float_bits])
    try:
        settings = MatrixSettings.from_dict(flat)
    except ValueError as exc:
        raise ValueError(f"damaged file: layer {name!r} has invalid settings ({exc})") from None
    setting = LayerSetting(d, settings.constraints, row_scales=bool(row_scales))
    return _Block(setting, settings, shape, dtype, sqnr_db, scale_bytes[row_scales])


def _float_dtype_field(raw, name):
    if not isinstance(raw, str) or NUMPY_NAMES.get(raw) not in FLOAT_DTYPES:
        raise ValueError(f"damaged file: layer {name!r} has an invalid dtype")
    return NUMPY_NAMES[raw]


def _entry_field(raw, i, version):
    """A checked entry of the layer list of a file of format ``version`` (3 or 4):
    ``(name, kind, spec, payload bytes)``."""
    lengths = {_KEPT: 4, _COMPRESSED: 6, _SPLIT: 6, _TIED: 3}
    if (not isinstance(raw, list) or len(raw) < 2 or not _is_int(raw[0])
            or raw[0] not in lengths or not isinstance(raw[1], str)):
        raise ValueError(f"damaged file: entry {i} of the layer list is invalid")
    kind, name = raw[0], raw[1]
    if len(raw) != lengths[kind]:
        raise ValueError(f"damaged file: layer {name!r} has {len(raw)} fields, its kind "
                         f"{lengths[kind]}")
    if kind == _TIED:
        if not _is_int(raw[2], 0, i - 1):
            raise ValueError(f"damaged file: layer {name!r} is tied to no earlier layer")
        return name, kind, raw[2], 0
    if kind == _KEPT:
        if not isinstance(raw[2], str) or raw[2] not in NUMPY_NAMES:
            raise ValueError(f"damaged file: layer {name!r} has an invalid dtype")
        dtype = NUMPY_NAMES[raw[2]]
        shape = _shape_field(raw[3], name, compressed=False)
        return name, kind, (dtype, shape), math.prod(shape) * numpy_dtype(dtype).itemsize
    dtype = _float_dtype_field(raw[2], name)
    shape = _shape_field(raw[3], name, compressed=True)
    sqnr_db = _sqnr_field(raw[4], name)
    if kind == _COMPRESSED:
        block = _block_field(raw[5], shape, dtype, sqnr_db, name, version)
        return name, kind, block, block.nbytes
    parts = raw[5]
    if (not isinstance(parts, list) or len(parts) != 2
            or not all(isinstance(p, list) and len(p) == 3 and _is_int(p[0], 1) for p in parts)
            or sum(p[0] for p in parts) != shape[0]):
        raise ValueError(f"damaged file: the parts of layer {name!r} do not add up to its rows")
    blocks = [_block_field(setting, (rows, *shape[1:]), dtype, _sqnr_field(sqnr, name), name,
                           version) for rows, sqnr, setting in parts]
    return name, kind, (shape, dtype, sqnr_db, blocks), sum(b.nbytes for b in blocks)


def _layers_of_compact_list(meta, tensors, max_elements, version):
    """The layers of a model file of format ``version`` 3 or 4 (one payload, a compact layer
    list), every entry checked, the declared elements against ``max_elements`` and the
    payload's length, before any is decoded."""
    if list(tensors) != [PAYLOAD] or tensors[PAYLOAD][0] != "U8":
        raise ValueError(f"damaged file: a model file holds one U8 tensor, {PAYLOAD!r}; "
                         f"found {list(tensors)}")
    entries, seen = [], set()
    for i, raw in enumerate(json_field(meta, "layers", list)):
        entry = _entry_field(raw, i, version)
        if entry[0] in seen:
            raise ValueError(f"damaged file: layer {entry[0]!r} appears twice")
        seen.add(entry[0])
        entries.append(entry)
    blocks = [block for _, kind, spec, _ in entries if kind in (_COMPRESSED, _SPLIT)
              for block in ([spec] if kind == _COMPRESSED else spec[3])]
    check_declared_elements(sum(b.settings.declared_elements for b in blocks), max_elements,
                            "compressed layers")
    payload = memoryview(tensors[PAYLOAD][2])
    expected = sum(size for *_, size in entries)
    if expected != len(payload):
        raise ValueError(f"damaged file: the layers take {expected} bytes, the payload holds "
                         f"{len(payload)}")
    layers, names, offset = {}, [], 0
    for name, kind, spec, size in entries:
        data = payload[offset:offset + size]
        offset += size
        if kind == _TIED:
            layers[name] = layers[names[spec]]
        elif kind == _KEPT:
            layers[name] = _kept(from_little_endian_bytes(data, *spec), name)
        elif kind == _COMPRESSED:
            layers[name] = spec.read(data, f"layer {name!r}")
        else:
            shape, dtype, sqnr_db, parts = spec
            start, read = 0, []
            for j, block in enumerate(parts):
                read.append(block.read(data[start:start + block.nbytes],
                                       f"layer {name!r} (part {j})"))
                start += block.nbytes
            layers[name] = SplitLayer(read, shape, dtype, sqnr_db)
        names.append(name)
    return layers


def _kept(array, name):
    """The :class:`KeptTensor` of a file's verbatim tensor; a float one must be finite
    (compress_weights refuses NaN and infinity in every tensor, so a file that holds one is
    damaged)."""
    if is_float(array.dtype) and not np.isfinite(array).all():
        raise ValueError(f"damaged file: the kept tensor {name!r} holds NaN or infinity")
    return KeptTensor(array)


def _layers_of_version_2(meta, tensors, max_elements):
    """The layers of a model file of format version 1 or 2: a container tensor per stream
    (``<i>.<stream>``, ``<i>.<part>.<stream>``) or kept tensor (``<i>``), a JSON object per
    layer."""
    headers = {}
    for i, entry in enumerate(json_field(meta, "layers", list)):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise ValueError(f"damaged file: layer {i} has no name")
        name = entry["name"]
        if name in headers:
            raise ValueError(f"damaged file: layer {name!r} appears twice")
        if entry.get("kind") == "kept":
            if f"{i}" not in tensors:
                raise ValueError(f"damaged file: tensor of layer {name!r} is missing")
            headers[name] = (f"{i}", "kept")
        elif entry.get("kind") == "compressed":
            headers[name] = (f"{i}", _layer_header(entry, name))
        elif entry.get("kind") == "split":
            headers[name] = (f"{i}", _split_header(entry, name))
        elif entry.get("kind") == "tied":
            target = entry.get("to")
            if not isinstance(target, str) or target not in headers:
                raise ValueError(f"damaged file: layer {name!r} is tied to no earlier layer")
            headers[name] = (target, "tied")
        else:
            raise ValueError(f"damaged file: layer {name!r} has an unknown kind")
    declared = sum(part[0].declared_elements for _, header in headers.values()
                   if isinstance(header, (tuple, list))
                   for part in (header[:-1] if isinstance(header, list) else [header]))
    check_declared_elements(declared, max_elements, "compressed layers")
    layers = {}
    used = set()
    for name, (key, header) in headers.items():
        if header == "tied":
            layers[name] = layers[key]
        elif header == "kept":
            dtype_name, shape, chunk = tensors[key]
            layers[name] = _kept(from_little_endian_bytes(chunk, NUMPY_NAMES[dtype_name], shape),
                                 name)
            used.add(key)
        elif isinstance(header, list):  # a split: its parts, then the whole
            parts = [_layer_from_header(part, tensors, f"{key}.{j}", used)
                     for j, part in enumerate(header[:-1])]
            layers[name] = SplitLayer(parts, *header[-1])
        else:
            layers[name] = _layer_from_header(header, tensors, key, used)
    if used != set(tensors):
        raise ValueError("damaged file: tensors that no layer uses")
    return layers


def _layer_from_header(header, tensors, key, used):
    """The :class:`CompressedLayer` of a checked header, its streams named ``key.<stream>``
    (recorded in ``used``)."""
    settings, shape, dtype, quality = header
    matrix = matrix_from_tensors(settings, tensors, prefix=f"{key}.")
    used.update(f"{key}.{stream}" for stream in STREAMS)
    return CompressedLayer(matrix, shape, dtype, LayerSetting(settings.n_features,
                                                              settings.constraints), quality)


def _split_header(entry, name):
    """The checked header entry of a split tensor: one :func:`_layer_header` per block of
    rows, then ``(shape, dtype, sqnr_db)`` of the whole."""
    parts = entry.get("parts")
    shape = entry.get("shape")
    if (not isinstance(parts, list) or len(parts) != 2 or not isinstance(shape, list)
            or not shape or not all(isinstance(p, dict) for p in parts)):
        raise ValueError(f"damaged file: split layer {name!r} has invalid parts")
    rows = [part.get("rows") for part in parts]
    if (not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in rows)
            or not isinstance(shape[0], int) or sum(rows) != shape[0]):
        raise ValueError(f"damaged file: the parts of layer {name!r} do not add up to its rows")
    headers = [
        _layer_header(dict(part, shape=[rows_j, *shape[1:]], dtype=entry.get("dtype")), name)
        for part, rows_j in zip(parts, rows)
    ]
    try:
        quality = float(entry["sqnr_db"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    return headers + [(tuple(shape), headers[0][2], quality)]


def _layer_header(entry, name):
    """The checked header entry of a compressed layer: its matrix settings, shape, dtype name
    and SQNR."""
    try:
        settings = MatrixSettings.from_dict(entry["matrix"])
        shape = tuple(entry["shape"])
        dtype = entry["dtype"]
        quality = float(entry["sqnr_db"])
    except (KeyError, TypeError):
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    except ValueError as exc:
        if str(exc).startswith("damaged file"):
            raise
        raise ValueError(f"damaged file: layer {name!r} has invalid settings") from None
    if (
        not all(isinstance(v, int) and v > 0 for v in shape)
        or len(shape) < 2
        or dtype not in FLOAT_DTYPES
    ):
        raise ValueError(f"damaged file: layer {name!r} has an invalid shape or dtype")
    if settings.n_rows != rows_of(shape, settings.n_features):
        raise ValueError(f"damaged file: layer {name!r} shape does not match its codes")
    return settings, shape, dtype, quality
