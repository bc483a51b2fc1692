"""``seqstream info MODEL.onnx``: what a sensor must send to a model, and what comes back.

A sensor author has only the ONNX file; its metadata (:mod:`pipeline.contract`) already
says everything, but as JSON meant for machines. This prints it for people: the task,
the features in the order a payload lists them (with units when training knew them),
the sample rate, labels or targets and horizon, the carried state per stream, and an
example payload built from the model's own normalisation means (plausible raw values).
``--json`` prints the same as one JSON object for tools.

The model is loaded as the daemon loads it (:meth:`pipeline.model.StepModel.load`), so a
file that ``info`` describes is one ``run`` accepts.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from pipeline.commands.parsing import add_model_argument, subcommand
from pipeline.contract import ModelSpec

# Where training records feature units (``models.train``): extra["units"][feature] = unit.
UNITS_KEY = "units"
# ... and the CSV column each feature was read from, when it differs from the name.
COLUMNS_KEY = "columns"
_FLOAT_BYTES = 4


def register(subparsers: Any) -> None:
    p = subcommand(
        subparsers,
        "info",
        run,
        help="describe an ONNX step model: features, rate, outputs, an example payload",
        description="Print what a sensor must send to MODEL (features in payload order, "
        "units, sample rate) and what the daemon publishes back (labels or forecast "
        "targets and horizon, anomaly threshold), the state carried per stream, and an "
        "example input payload.",
    )
    add_model_argument(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead")


def describe(spec: ModelSpec) -> dict[str, Any]:
    """The model as a JSON-ready document (what ``--json`` prints)."""
    units = spec.extra.get(UNITS_KEY, {})
    units = units if isinstance(units, dict) else {}
    state = [
        {
            "name": s.name,
            "shape": list(s.row_shape),
            "bytes": _FLOAT_BYTES * math.prod(s.row_shape),
        }
        for s in spec.state
    ]
    doc: dict[str, Any] = {
        "name": spec.name,
        "version": spec.version,
        "task": spec.task,
        "cell": architecture(spec),
        "features": [
            {"index": i, "name": f, "unit": units.get(f) if isinstance(units.get(f), str) else None}
            for i, f in enumerate(spec.features)
        ],
        "sample_rate_hz": spec.sample_rate_hz,
        "state": state,
        "state_bytes_per_stream": sum(s["bytes"] for s in state),
        "example_payload": example_payload(spec),
        "example_payload_named": example_payload(spec, named=True) if spec.features else None,
    }
    if spec.task == "classify":
        doc["labels"] = list(spec.labels)
    if spec.task in ("forecast", "seq2seq"):
        doc["targets"] = list(spec.targets)
        doc["horizon"] = spec.horizon
    if spec.task in ("anomaly", "seq2seq"):
        doc["window"] = spec.window
    if spec.task == "anomaly":
        doc["threshold"] = spec.threshold
    if spec.frontend is not None:
        doc["frontend"] = dict(spec.frontend)
    return doc


def architecture(spec: ModelSpec) -> str:
    """The network in a few words: a causal-conv classifier's recurrent branch is the
    smaller half of it, so naming only the cell would mislead a reader sizing a box."""
    core = f"{spec.cell} x{spec.layers}, hidden {spec.hidden}"
    filters, kernels = spec.extra.get("filters"), spec.extra.get("kernels")
    arch, dilations = spec.extra.get("arch"), spec.extra.get("dilations")
    if arch not in ("fcn", "tcn") or not isinstance(filters, list):
        return core
    ks = "/".join(map(str, kernels)) if isinstance(kernels, list) else "?"
    conv = "/".join(map(str, filters))
    if arch == "tcn" and isinstance(dilations, list) and isinstance(kernels, list):
        # a windowed conv stack: the cell fields are a stand-in (models.tcn)
        window = 1 + sum((k - 1) * d for k, d in zip(kernels, dilations, strict=False))
        ds = "/".join(map(str, dilations))
        return f"causal conv {conv} (kernels {ks}, dilations {ds}), window {window} steps"
    net = f"causal conv {conv} (kernels {ks}), running mean, beside {core}"
    members = spec.extra.get("members")
    # an ensemble's cost is its members' together: say how many sit side by side
    return f"{members} x ({net}), probabilities averaged" if isinstance(members, int) else net


def example_payload(spec: ModelSpec, *, named: bool = False) -> str:
    """One JSON step the daemon accepts: the training means, in feature order, or
    ``named`` by the model's feature names (the form sensors that publish named fields
    use; the daemon maps them by name)."""
    values = [float(f"{m:.4g}") for m in spec.normalisation.mean]
    doc: Any = dict(zip(spec.features, values, strict=True)) if named else values
    return json.dumps({"seq": 0, "ts": 1718000000.0, "values": doc})


def render(doc: dict[str, Any]) -> str:
    """The document as the lines a person reads."""
    rate = doc["sample_rate_hz"]
    lines = [
        f"model:       {doc['name']} {doc['version']}",
        f"task:        {doc['task']} ({doc['cell']})",
        f"sample rate: {f'{rate:g} Hz (a step every {1 / rate:g} s)' if rate else 'not recorded'}",
        f"features:    {len(doc['features'])}, in payload order:",
    ]
    width = max(len(f["name"]) for f in doc["features"])
    for f in doc["features"]:
        unit = f" [{f['unit']}]" if f["unit"] else ""
        lines.append(f"  {f['index']:>3}  {f['name']:<{width}}{unit}")
    if "labels" in doc:
        lines.append(f"labels:      {', '.join(doc['labels'])}")
    if "targets" in doc:
        lines.append(f"targets:     {', '.join(doc['targets'])}")
        lines.append(f"horizon:     {doc['horizon']} step{'s' if doc['horizon'] != 1 else ''}")
    if "window" in doc:
        lines.append(f"window:      {doc['window']} steps")
    if "threshold" in doc:
        lines.append(f"threshold:   {doc['threshold']:.6g} (score above it: anomaly)")
    shapes = ", ".join(f"{s['name']} {'x'.join(map(str, s['shape']))}" for s in doc["state"])
    lines.append(f"state:       {shapes} ({doc['state_bytes_per_stream']} bytes per stream)")
    lines.append(f"example:     {doc['example_payload']}")
    if doc.get("example_payload_named"):
        lines.append(f"or named:    {doc['example_payload_named']}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from pipeline.model import StepModel

    model = StepModel.load(args.model, ["cpu"], 1)
    doc = describe(model.spec)
    print(json.dumps(doc, indent=2) if args.json else render(doc))
    return 0
