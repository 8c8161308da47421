"""Small torch.save archives of a layout already decoded are matched byte for byte, not parsed again."""
import io

import pytest
import torch

from dcp_filesystem import _torch_save


def _archive(tensor):
    buffer = io.BytesIO()
    torch.save(tensor, buffer)  # stock bytes: each archive has its own serialization id (torch >= 2.3)
    return bytearray(buffer.getvalue())


@pytest.fixture
def parses(monkeypatch):
    """The archives whose zip directory load_tensor parses, starting from no templates."""
    monkeypatch.setattr(_torch_save, "_templates", {})
    calls = []
    real = _torch_save._directory

    def counting(read, archive_size):
        calls.append(archive_size)
        return real(read, archive_size)

    monkeypatch.setattr(_torch_save, "_directory", counting)
    return calls


def _same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride() and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def test_a_second_archive_of_the_same_layout_is_not_parsed(parses):
    first, second = torch.arange(6.0).reshape(2, 3), torch.randn(2, 3)
    assert _same_bytes(_torch_save.load_tensor(_archive(first)), first)
    assert _same_bytes(_torch_save.load_tensor(_archive(second)), second)
    assert _same_bytes(_torch_save.load_tensor(_archive(second.t())), second.t())  # another pickle: parsed
    assert len(parses) == 2


def test_same_size_archive_with_another_shape_is_parsed_and_keeps_its_shape(parses):
    column, row = torch.arange(4.0).reshape(4, 1), torch.arange(4.0).reshape(1, 4)
    a, b = _archive(column), _archive(row)
    assert len(a) == len(b)
    _torch_save.load_tensor(a)
    assert _same_bytes(_torch_save.load_tensor(b), row)
    assert len(parses) == 2


def test_damaged_storage_bytes_in_a_matching_archive_fail_the_crc(parses):
    _torch_save.load_tensor(_archive(torch.zeros(8)))
    damaged = _archive(torch.ones(8))
    damaged[damaged.index(bytes(torch.ones(8).view(torch.uint8).tolist()))] ^= 0xFF
    with pytest.raises(ValueError, match=r"^archive member 'archive/data/0' fails its CRC-32 check \(damaged data\)$"):
        _torch_save.load_tensor(damaged)
    assert len(parses) == 1  # caught by the template's CRC check, without a parse


def test_damage_outside_the_storage_misses_the_template_and_is_found_by_the_parse(parses):
    _torch_save.load_tensor(_archive(torch.zeros(8)))
    damaged = _archive(torch.ones(8))
    damaged[damaged.index(b"FloatStorage")] ^= 0x01  # inside data.pkl
    with pytest.raises(ValueError, match=r"^archive member 'archive/data.pkl' fails its CRC-32 check"):
        _torch_save.load_tensor(damaged)
    assert len(parses) == 2
