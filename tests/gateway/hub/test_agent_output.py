"""Agent output as events: byte for byte, whatever the bytes and wherever the pipe cut them."""

from __future__ import annotations

import random

from gateway.hub.agent_output import OutputEncoder, output_bytes

SAMPLES = [
    b"plain ascii\n",
    "héllo wörld — ✓ 𝄞 emoji 🎉\n".encode(),
    b"\xff\xfe binary \x00\x80 not utf-8",
    "mixed ✓".encode() + b"\xc3" + "tail ✓".encode(),  # a lone lead byte in the middle
    bytes(range(256)),
]


def _events(encoder: OutputEncoder, chunks: list[bytes]) -> list[dict[str, str]]:
    fields = [encoder.encode(c) for c in chunks] + [encoder.flush()]
    return [f for f in fields if f is not None]


def test_every_cut_of_every_sample_round_trips() -> None:
    rng = random.Random(7)
    for data in SAMPLES:
        for _ in range(200):
            cuts = sorted(rng.sample(range(1, len(data)), k=min(len(data) - 1, rng.randint(0, 6))))
            chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
            events = _events(OutputEncoder(), chunks)
            assert b"".join(output_bytes(e) for e in events) == data


def test_text_stays_text_when_a_character_is_cut() -> None:
    check = "✓".encode()  # three bytes
    encoder = OutputEncoder()
    assert encoder.encode(b"ok " + check[:1]) == {"data": "ok "}
    assert encoder.encode(check[1:2]) is None  # still only part of the character
    assert encoder.encode(check[2:] + b"!") == {"data": "✓!"}
    assert encoder.flush() is None


def test_bytes_that_are_not_utf8_travel_as_base64() -> None:
    encoder = OutputEncoder()
    fields = encoder.encode(b"\xff\xfeabc")
    assert fields is not None and set(fields) == {"data64"}
    assert output_bytes(fields) == b"\xff\xfeabc"
    # a character cut at the very end of the output is flushed as the bytes it was
    assert encoder.encode("é".encode()[:1]) is None
    tail = encoder.flush()
    assert tail is not None and output_bytes(tail) == b"\xc3"
