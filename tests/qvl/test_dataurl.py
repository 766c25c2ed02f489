import base64

import pytest

from qvl.dataurl import DataURLError, decode_image_data_url


def test_decodes_image_data_urls() -> None:
    raw = b"\xff\xd8\xff\xe0jpeg-bytes"
    assert decode_image_data_url("data:image/jpeg;base64," + base64.b64encode(raw).decode()) == raw


@pytest.mark.parametrize(
    ("url", "code"),
    [
        ("http://10.0.0.1/a.png", "unsupported_image_url"),
        ("data:text/plain;base64,aGk=", "invalid_image_url"),
        ("data:image/png,raw", "invalid_image_url"),
        ("data:image/png;base64,not base64!", "invalid_image_url"),
        ("data:image/png;base64,", "invalid_image_url"),
    ],
)
def test_rejects_with_a_code(url: str, code: str) -> None:
    with pytest.raises(DataURLError) as info:
        decode_image_data_url(url)
    assert info.value.code == code


def test_line_breaks_and_parameters_do_not_change_the_bytes() -> None:
    raw = bytes(range(256)) * 4
    flat = base64.b64encode(raw).decode()
    wrapped = "\r\n".join(flat[i : i + 76] for i in range(0, len(flat), 76))
    assert decode_image_data_url("data:image/png;base64," + flat) == raw
    assert decode_image_data_url("data:image/png;base64," + wrapped) == raw
    assert decode_image_data_url("data:image/png;name=mug.png;base64," + flat) == raw
