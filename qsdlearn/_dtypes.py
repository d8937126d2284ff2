"""The tensor dtypes qsdlearn reads and writes, by NumPy name and by safetensors name.

Floats (float16, bfloat16, float32, float64) may be compressed; decompression computes in
float32 and casts back to the tensor's own dtype. Integers and booleans are only ever kept
verbatim. Everything else (complex, strings, bytes, objects, structured records, dates, 8-bit
and extended-precision floats) is refused with a :class:`TypeError` that names the tensor.
NumPy has no bfloat16 of its own: it is ``ml_dtypes.bfloat16``, imported here on first use
(loading ml_dtypes takes most of a second, and a float32 fit never needs it), as is the 8-bit
float of row scales, ``ml_dtypes.float8_e5m2``. This module
imports nothing from the package.
"""

import numpy as np

#: Float dtypes a tensor may be compressed from, NumPy name to safetensors name.
FLOAT_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64"}
#: Dtypes only ever stored verbatim, NumPy name to safetensors name.
EXACT_DTYPES = {
    "int8": "I8", "uint8": "U8", "int16": "I16", "uint16": "U16", "int32": "I32",
    "uint32": "U32", "int64": "I64", "uint64": "U64", "bool": "BOOL",
}
#: Every supported dtype, NumPy name to safetensors name.
SAFETENSORS_NAMES = {**FLOAT_DTYPES, **EXACT_DTYPES}
#: Safetensors name to NumPy name.
NUMPY_NAMES = {st: name for name, st in SAFETENSORS_NAMES.items()}

_KIND_ADVICE = {
    "c": "complex tensors are not weights qsdlearn can store; split them into real and "
         "imaginary parts",
    "U": "strings (e.g. a vocabulary) belong in a separate file (JSON, tokenizer files)",
    "S": "byte strings belong in a separate file",
    "O": "object arrays cannot be stored without pickle; convert them to numeric arrays",
    "V": "structured or raw records are not weights; store their fields as separate tensors "
         "(a bfloat16 array saved with np.savez reads back as raw 2-byte records: save it as "
         ".safetensors, or as float32)",
    "M": "dates belong in a separate file",
    "m": "time spans belong in a separate file",
}


def numpy_dtype(name):
    """The NumPy dtype of a supported dtype name (``"bfloat16"`` included).

    Examples
    --------
    >>> from qsdlearn._dtypes import numpy_dtype
    >>> numpy_dtype("bfloat16").itemsize, numpy_dtype("int64").name
    (2, 'int64')
    """
    if name == "bfloat16":
        return bfloat16()
    if name not in SAFETENSORS_NAMES:
        raise ValueError(f"unsupported dtype {name!r}")
    return np.dtype(name)


def finfo(dtype):
    """The machine limits of a float dtype, those of ml_dtypes (bfloat16, float8_e5m2)
    included (:func:`numpy.finfo` does not know them; ``ml_dtypes.finfo`` does).

    Examples
    --------
    >>> from qsdlearn._dtypes import finfo, numpy_dtype
    >>> float(finfo(numpy_dtype("bfloat16")).eps), float(finfo(numpy_dtype("float16")).max)
    (0.0078125, 65504.0)
    """
    dtype = np.dtype(dtype)
    return _ml_dtypes().finfo(dtype) if dtype.type.__module__ == "ml_dtypes" else np.finfo(dtype)


def bfloat16():
    """``ml_dtypes.bfloat16``, imported on first use. From then on NumPy also knows the name
    ``"bfloat16"``, by which safetensors asks for it when it reads a BF16 tensor."""
    return np.dtype(_ml_dtypes().bfloat16)


def float8_e5m2():
    """``ml_dtypes.float8_e5m2``, imported on first use: the 8-bit float of the OCP FP8
    formats with float16's five exponent bits and two mantissa bits (a float16's upper
    byte), in which row scales are stored (:func:`qsdlearn.weights.output_row_scales`).

    Examples
    --------
    >>> from qsdlearn._dtypes import float8_e5m2
    >>> e5m2 = float8_e5m2()
    >>> e5m2.itemsize, float(finfo(e5m2).smallest_normal), float(finfo(e5m2).max)
    (1, 6.103515625e-05, 57344.0)
    """
    return np.dtype(_ml_dtypes().float8_e5m2)


def _ml_dtypes():
    """The ml_dtypes module, imported on the first call (the package's only import of it)."""
    import ml_dtypes

    return ml_dtypes


def check_dtype(tensor, dtype):
    """Raise a :class:`TypeError` naming ``tensor`` unless ``dtype`` is supported.

    Examples
    --------
    >>> import numpy as np
    >>> from qsdlearn._dtypes import check_dtype
    >>> check_dtype("vocab", np.dtype("<U5"))
    Traceback (most recent call last):
    ...
    TypeError: tensor 'vocab' has dtype <U5, which qsdlearn does not store: strings (e.g. a vocabulary) belong in a separate file (JSON, tokenizer files)
    """
    dtype = np.dtype(dtype)
    if dtype.name in SAFETENSORS_NAMES and dtype.isnative:
        return
    if dtype.name in SAFETENSORS_NAMES:  # of the other byte order (e.g. in a .npz file)
        advice = (f"its byte order is not this machine's; store it as {dtype.name} in native "
                  "byte order (array.astype(array.dtype.newbyteorder('=')))")
    elif dtype.type.__module__ == "ml_dtypes":  # NumPy sees them as raw records
        advice = ("it has no codec for the 8-, 6- and 4-bit types of ml_dtypes; cast the "
                  "tensor to float16, bfloat16 or float32 (or to int8)")
    else:
        advice = _KIND_ADVICE.get(dtype.kind)
    if advice is None:
        advice = ("supported dtypes are " + ", ".join(SAFETENSORS_NAMES)
                  + "; cast the tensor to one of them")
    raise TypeError(f"tensor {tensor!r} has dtype {dtype}, "
                    f"which qsdlearn does not store: {advice}")


def cast_reconstruction(values, name):
    """A reconstruction ``values`` (float32 or float64) cast to the tensor dtype ``name``,
    clipped first to that dtype's finite range: a weight at float16's largest value (65504)
    reconstructed a rounding above it would otherwise become ``inf``."""
    dtype = numpy_dtype(name)
    top = float(finfo(dtype).max)
    if top < float(np.finfo(values.dtype).max):
        values = np.clip(values, -top, top)
    return values.astype(dtype)


def is_float(dtype):
    """Whether ``dtype`` is one of the floats a tensor may be compressed from."""
    return np.dtype(dtype).name in FLOAT_DTYPES


def in_native_byte_order(array):
    """``array`` itself in native byte order, else a copy in it (the same values)."""
    dtype = array.dtype
    return array if dtype.isnative else array.astype(dtype.newbyteorder("="))


def to_little_endian_bytes(array):
    """The raw little-endian bytes of an array of a supported dtype, in C order."""
    size = array.dtype.itemsize
    raw = np.ascontiguousarray(array).reshape(-1).view(f"u{size}")
    return raw.astype(f"<u{size}", copy=False).tobytes()


def from_little_endian_bytes(data, name, shape):
    """Inverse of :func:`to_little_endian_bytes` for dtype ``name`` and ``shape`` (a copy)."""
    dtype = numpy_dtype(name)
    raw = np.frombuffer(data, dtype=np.dtype(f"<u{dtype.itemsize}"))
    return raw.astype(f"=u{dtype.itemsize}").view(dtype).reshape(shape)
