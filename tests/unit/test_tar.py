"""The tar reader against tars written by Python's tarfile in each of its formats."""

import io
import tarfile

import pytest

from raypipe.io.errors import InputError
from raypipe.io.tar import tar_members, tar_samples

LONG_DIR = "shards/" + "d" * 120  # past ustar's 100-byte name field
MEMBERS = [
    ("00000001.jpg", b"\xff\xd8jpeg bytes" * 100),
    ("00000001.txt", "un café".encode()),
    ("00000001.json", b'{"caption": "x"}'),
    (f"{LONG_DIR}/00000002.jpg", b"\xff\xd8" + bytes(range(256)) * 3),
    (f"{LONG_DIR}/00000002.txt", b""),  # an empty member: a header and no data block
    ("._00000002.jpg", b"macOS resource fork"),  # hidden: no sample key
]


def _tar(members, tar_format=tarfile.PAX_FORMAT, mtime=1_700_000_000.000125) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tar_format) as tar:
        directory = tarfile.TarInfo("shards")
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), mtime  # a fractional mtime: a pax header per member
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT], ids=["pax", "gnu", "ustar"])
def test_members_match_what_tarfile_reads(tar_format):
    data = _tar(MEMBERS, tar_format, mtime=1_700_000_000)  # ustar takes no fractional mtime
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        expected = [(m.name, tar.extractfile(m).read()) for m in tar if m.isreg()]
    assert list(tar_members(io.BytesIO(data), "t.tar", keep=lambda name: True)) == expected


def test_pax_headers_before_every_member_and_refused_members_are_read_past():
    data = _tar(MEMBERS)
    assert data.count(b"PaxHeader") >= len(MEMBERS)
    members = list(tar_members(io.BytesIO(data), "t.tar", keep=lambda name: not name.endswith(".jpg")))
    assert [name for name, _ in members] == [name for name, _ in MEMBERS]
    assert [body for name, body in members if name.endswith(".jpg")] == [None, None, None]
    assert dict(members)["00000001.txt"] == "un café".encode()


def test_samples_group_adjacent_members_and_skip_hidden_files():
    samples = list(tar_samples(tar_members(io.BytesIO(_tar(MEMBERS)), "t.tar", lambda name: True)))
    assert [key for key, _ in samples] == ["00000001", "00000002"]
    assert samples[0][1] == {"jpg": MEMBERS[0][1], "txt": MEMBERS[1][1], "json": MEMBERS[2][1]}
    assert samples[1][1] == {"jpg": MEMBERS[3][1], "txt": b""}


@pytest.mark.parametrize(
    "members, samples",
    [
        ([("a.jpg", b"1"), ("b.jpg", b"2"), ("a.txt", b"3")], [("a", ["jpg"]), ("b", ["jpg"]), ("a", ["txt"])]),
        ([("a.jpg", b"1"), ("a.jpg", b"2")], [("a", ["jpg"]), ("a", ["jpg"])]),
        ([("a.jpg", b"1"), ("a.txt", b"2"), ("a.jpg", b"3"), ("a.txt", b"4")], [("a", ["jpg", "txt"])] * 2),
        ([("a.jpg", b"1"), ("a.txt", b"2"), ("a.txt", b"3")], [("a", ["jpg", "txt"]), ("a", ["txt"])]),
    ],
    ids=["key split in two", "member twice", "sample twice", "suffix twice in a sample"],
)
def test_a_key_used_again_starts_a_new_sample_with_that_key(members, samples):
    """As a key used twice in a Parquet file gives two rows: no member is dropped or merged."""
    data = _tar(members)
    found = list(tar_samples(tar_members(io.BytesIO(data), "t.tar", lambda name: True)))
    assert [(key, list(files)) for key, files in found] == samples
    assert [body for _, files in found for body in files.values()] == [body for _, body in members]
    # Reading past every member's bytes (label's count of a tar's keys) finds the same samples.
    keys_only = list(tar_samples(tar_members(io.BytesIO(data), "t.tar", lambda name: False)))
    assert [key for key, _ in keys_only] == [key for key, _ in samples]


def test_a_damaged_header_is_named_with_its_offset():
    data = bytearray(_tar(MEMBERS, tarfile.USTAR_FORMAT, mtime=0))
    second_header = 512 + 512 + -(-len(MEMBERS[0][1]) // 512) * 512  # after the directory and the first file
    data[second_header + 3] ^= 0xFF
    with pytest.raises(InputError, match=rf"t.tar: damaged tar header at byte {second_header}"):
        list(tar_members(io.BytesIO(bytes(data)), "t.tar", lambda name: True))


def test_a_tar_cut_inside_a_member_fails_instead_of_losing_its_rows():
    data = _tar(MEMBERS)
    with pytest.raises(InputError, match=r"t.tar: ends inside '00000001.jpg'"):
        list(tar_members(io.BytesIO(data[:2048]), "t.tar", lambda name: True))


def test_a_pax_size_record_overrides_the_header_field():
    """The way tars hold members of 8 GiB and more: the ustar size field cannot, a pax record does."""
    data = b"\xff\xd8" + bytes(range(256)) * 5
    info = tarfile.TarInfo("00000001.jpg")
    info.size, info.pax_headers = len(data), {"size": str(len(data))}
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(data))
    tar_bytes = bytearray(buffer.getvalue())
    header = tar_bytes.index(b"00000001.jpg")  # the member's own header (the pax header's name differs)
    tar_bytes[header + 124 : header + 136] = b"00000000000\0"  # size field: 0
    tar_bytes[header + 148 : header + 156] = b" " * 8
    tar_bytes[header + 148 : header + 155] = b"%06o\0" % sum(tar_bytes[header : header + 512])
    assert list(tar_members(io.BytesIO(bytes(tar_bytes)), "t.tar", lambda name: True)) == [("00000001.jpg", data)]
