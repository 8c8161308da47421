"""The torch.save archive writer: the running torch's exact bytes, and the fallbacks to torch.save."""
import io
import zipfile

import pytest
import torch

from dcp_filesystem import _torch_save

SERIALIZATION_ID = "archive/.data/serialization_id"


def _torch_save_bytes(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)
    return buffer.getvalue()


def _ours_with_id_of(tensor, reference):
    """Our archive, given the serialization id torch.save drew for ``reference`` (when this torch writes one)."""
    layout = _torch_save._torch_save_layout()
    with zipfile.ZipFile(io.BytesIO(reference)) as archive:
        names = archive.namelist()
        serialization_id = archive.read(SERIALIZATION_ID) if SERIALIZATION_ID in names else b""
    buffer = io.BytesIO()
    _torch_save._write_archive(tensor, buffer, layout, serialization_id)
    return buffer.getvalue()


def _cases():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, 8, generator=gen)
    cases = {
        "float32": base,
        "transposed": base.t(),
        "sliced-view": base[1:4, ::2],
        "0-d": torch.tensor(7, dtype=torch.int64),
        "bfloat16": base.to(torch.bfloat16),
        "float16": base.to(torch.float16),
        "float64": base.to(torch.float64),
        "int8": torch.arange(-5, 5, dtype=torch.int8),
        "uint8": torch.arange(10, dtype=torch.uint8),
        "int16": torch.arange(10, dtype=torch.int16),
        "int32": torch.arange(10, dtype=torch.int32),
        "bool": base > 0,
        "complex64": torch.randn(4, 2, generator=gen).to(torch.complex64),
        "requires-grad": base.clone().requires_grad_(),
        # past the size at which the CRC-32 runs in a second thread
        "3-MiB": torch.randn(3 << 18, generator=gen),
    }
    # Dtypes without a legacy storage class pickle an UntypedStorage, where this torch's torch.save can.
    for name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
        if hasattr(torch, name):
            tensor = torch.arange(40, dtype=torch.uint8).view(getattr(torch, name))
            try:
                torch.save(tensor, io.BytesIO())
            except KeyError:  # torch < 2.3 cannot save these at all
                continue
            cases[name] = tensor
    return cases


CASES = _cases()


def test_probe_reproduces_this_torchs_layout():
    layout = _torch_save._torch_save_layout()
    assert layout is not None, f"torch {torch.__version__}: the encoder does not reproduce torch.save"
    assert layout.crc  # torch.save computes CRC-32 by default


@pytest.mark.parametrize("name", sorted(CASES))
def test_archive_is_byte_identical_to_torch_save(name):
    tensor = CASES[name]
    reference = _torch_save_bytes(tensor)
    assert _ours_with_id_of(tensor, reference) == reference


@pytest.mark.parametrize("name", sorted(CASES))
def test_archive_loads_with_torch_load_and_ours(name):
    tensor = CASES[name]
    buffer = io.BytesIO()
    _torch_save.save_tensor(tensor, buffer)
    for loaded in (
        torch.load(io.BytesIO(buffer.getvalue()), weights_only=True),
        _torch_save.load_tensor(bytearray(buffer.getvalue())),
    ):
        assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape and loaded.stride() == tensor.stride()
        assert torch.equal(_bytes_of(loaded), _bytes_of(tensor))


def _bytes_of(tensor):
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8)


def test_serialization_ids_differ_between_saves():
    first, second = io.BytesIO(), io.BytesIO()
    _torch_save.save_tensor(CASES["float32"], first)
    _torch_save.save_tensor(CASES["float32"], second)
    if _torch_save._torch_save_layout().serialization_id:
        ids = [zipfile.ZipFile(b).read(SERIALIZATION_ID) for b in (first, second)]
        assert ids[0] != ids[1] and all(len(i) == 40 and i.isdigit() for i in ids)


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.zeros(0),
        lambda: torch.nn.Parameter(torch.ones(3)),
        lambda: torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8),
    ],
    ids=["empty", "subclass", "quantized"],
)
def test_what_the_probe_did_not_cover_goes_to_torch_save(make, monkeypatch):
    tensor = make()
    calls = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: calls.append(obj) or real_save(obj, f))
    buffer = io.BytesIO()
    _torch_save.save_tensor(tensor, buffer)
    assert calls == [tensor]
    loaded = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)
    assert loaded.shape == tensor.shape and loaded.dtype == tensor.dtype


def test_unreproduced_layout_falls_back_to_torch_save(monkeypatch):
    monkeypatch.setattr(_torch_save, "_layout", [None])
    calls = []
    real_save = torch.save
    monkeypatch.setattr(torch, "save", lambda obj, f: calls.append(obj) or real_save(obj, f))
    _torch_save.save_tensor(CASES["float32"], io.BytesIO())
    assert calls == [CASES["float32"]]


def test_without_crc_the_fields_are_zero_and_it_still_loads(monkeypatch):
    layout = _torch_save._torch_save_layout()._replace(crc=False)
    monkeypatch.setattr(_torch_save, "_layout", [layout])
    tensor = CASES["3-MiB"]
    buffer = io.BytesIO()
    _torch_save.save_tensor(tensor, buffer)
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
        assert {info.CRC for info in archive.infolist()} == {0}
    assert torch.equal(_torch_save.load_tensor(bytearray(buffer.getvalue())), tensor)
    assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), tensor)


def test_small_archives_of_one_shape_are_filled_in_from_the_first_and_stay_identical():
    gen = torch.Generator().manual_seed(5)
    tensors = [torch.randn(256, generator=gen) for _ in range(4)] + [torch.randn(256, generator=gen).to(torch.float16)]
    for tensor in tensors + tensors[:2]:  # each archive's own storage, CRC-32s and serialization id
        reference = _torch_save_bytes(tensor)
        assert _ours_with_id_of(tensor, reference) == reference
        assert torch.equal(_torch_save.load_tensor(bytearray(reference)), tensor)


def test_small_archives_without_crc_have_zero_fields(monkeypatch):
    layout = _torch_save._torch_save_layout()._replace(crc=False)
    monkeypatch.setattr(_torch_save, "_layout", [layout])
    for value in (1.0, 2.0):
        buffer = io.BytesIO()
        _torch_save.save_tensor(torch.full((8,), value), buffer)
        with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as archive:
            assert {info.CRC for info in archive.infolist()} == {0}
        assert torch.equal(torch.load(io.BytesIO(buffer.getvalue()), weights_only=True), torch.full((8,), value))


def _hooked(tensor):
    tensor = tensor.clone().requires_grad_()
    tensor.register_hook(lambda grad: grad)
    return tensor


def _with_attribute(tensor):
    tensor = tensor.clone()
    tensor.note = "kept by torch.save"
    return tensor


@pytest.mark.filterwarnings("ignore:backward hook")
def test_each_pickled_value_of_a_tensor_is_in_its_data_pkl():
    """data.pkl is pickled once per dtype, storage size, offset, shape, stride, requires_grad and conj/neg bits:
    a tensor differing from one before in any of these, or with Python attributes or hooks, still gets the
    bytes torch.save writes for it."""
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(4, 6, generator=gen)
    numbers = torch.randn(4, 3, generator=gen, dtype=torch.complex64)
    tensors = [
        base, base.clone(), base.to(torch.float64), base[1:], base[:, 1:], base.t(), base.reshape(6, 4),
        base.clone().requires_grad_(), torch.randn(5, 6, generator=gen)[:4],  # a larger storage
        numbers, numbers.conj(), numbers.imag, numbers.conj().imag,  # conj bit, neg bit
        _with_attribute(base), _hooked(base),
    ]
    for tensor in tensors + tensors:
        reference = _torch_save_bytes(tensor)
        assert _ours_with_id_of(tensor, reference) == reference


@pytest.mark.filterwarnings("ignore:backward hook")
def test_tensors_alike_are_pickled_once(monkeypatch):
    _torch_save._torch_save_layout()
    monkeypatch.setattr(_torch_save, "_pickles", {})
    pickled = []
    real_dump = _torch_save._Pickler.dump
    monkeypatch.setattr(_torch_save._Pickler, "dump", lambda self, obj: pickled.append(obj) or real_dump(self, obj))
    alike = [torch.full((8,), float(i)) for i in range(5)]
    others = [_with_attribute(alike[0]), _hooked(alike[0])]
    for tensor in alike + others + others:
        _torch_save.save_tensor(tensor, io.BytesIO())
    assert [id(t) for t in pickled] == [id(alike[0])] + [id(t) for t in others + others]
