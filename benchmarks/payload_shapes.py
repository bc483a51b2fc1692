"""Decode cost of each input shape against the positional JSON one, in the same run.

Prints one JSON document: microseconds per message (best of ``--repeat`` rounds of
``--number`` decodes) for a 6-feature reading sent as positional JSON ``values``, as
named ``values`` (one number per feature, and 8 rows as columns), as 8 positional rows,
as binary, and as six per-channel messages joined by :class:`pipeline.sources.channels.Assembler`
(one step's worth); ``ratio`` is each against positional JSON of the same step count.
The machine's noise moves the absolute numbers; the ratios are what to compare.
``assembler_worst_mib``: memory (tracemalloc) of the assembler when every one of
``engine.max_streams`` streams (ids of ``max_stream_id_bytes``) has the default
``channel_max_pending`` steps waiting for a channel that never comes.

    python benchmarks/payload_shapes.py [--number 20000] [--repeat 7]
"""

from __future__ import annotations

import argparse
import json
import timeit
import tracemalloc
from collections.abc import Callable

import numpy as np

from pipeline.engine.engine import EngineSettings
from pipeline.sources.channels import Assembler
from pipeline.sources.codecs import Decoder, encode_binary, encode_json
from pipeline.sources.mqtt import InputConfig

NAMES = ("ax", "ay", "az", "gx", "gy", "gz")


def best_us(fn: Callable[[], object], number: int, repeat: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=repeat)) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--number", type=int, default=20_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    row = rng.normal(size=6).astype(np.float32)
    rows = rng.normal(size=(8, 6)).astype(np.float32)
    dec = Decoder(6, max_payload_bytes=1 << 16, max_steps=64, features=NAMES)
    payloads = {
        "positional": encode_json(row, 3, 1.5),
        "named": json.dumps(
            {"seq": 3, "ts": 1.5, "values": dict(zip(NAMES, row.tolist(), strict=True))}
        ).encode(),
        "positional_8_rows": encode_json(rows, 3, 1.5),
        "named_8_rows": json.dumps(
            {"seq": 3, "ts": 1.5, "values": dict(zip(NAMES, rows.T.tolist(), strict=True))}
        ).encode(),
        "binary": encode_binary(row, 3, 1.5),
    }
    out: dict[str, float] = {}
    for name, payload in payloads.items():
        out[name] = best_us(lambda p=payload: dec.decode("s", p), args.number, args.repeat)
    channel_msgs = [
        json.dumps({"seq": 0, "ts": 1.5, "value": float(v)}).encode() for v in row.tolist()
    ]
    assembler = Assembler(NAMES, max_pending=16, max_streams=10)
    seq = [0]

    def per_channel() -> None:  # six readings -> one step, as the source does it
        s = seq[0] = seq[0] + 1
        for j, msg in enumerate(channel_msgs):
            _, ts, value = dec.channel(msg)
            assembler.add("s", j, s, ts, value, 0.0)

    out["per_channel_6_msgs"] = best_us(per_channel, args.number // 6, args.repeat)
    worst = InputConfig().channel_max_pending, EngineSettings().max_streams
    full = Assembler(NAMES, max_pending=worst[0], max_streams=worst[1])
    tracemalloc.start()
    for i in range(worst[1]):
        sid = f"{i:0{InputConfig().max_stream_id_bytes}d}"
        for s in range(worst[0]):
            full.add(sid, 0, s, None, 1.0, 0.0)
    held = tracemalloc.get_traced_memory()[0] / 2**20
    tracemalloc.stop()
    base = {"named": "positional", "named_8_rows": "positional_8_rows"}
    ratio = {k: round(out[k] / out[base.get(k, "positional")], 3) for k in out}
    doc = {
        "unit": "us per message (per_channel: per step of 6 messages)",
        "us": {k: round(v, 3) for k, v in out.items()},
        "ratio": ratio,
        "assembler_worst_mib": round(held, 1),
        "assembler_worst_case": {"streams": worst[1], "max_pending": worst[0], "features": 6},
    }
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
