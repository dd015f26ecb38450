"""Would integer residual adds / SiLU make an ``ort-cpu`` graph faster? A bound, measured on the graph itself.

    python tools/qdq_elementwise_bound.py --onnx w8a8_ort_cpu.onnx --peer ort-static-minmax.onnx \\
        --calib ../shared/data/faces_hq/calib --rounds 3

Writes two variants of ``--onnx`` beside ``--out-dir``: every residual ``Add`` of two computed tensors, and
also every SiLU (``Sigmoid`` + ``Mul``), wrapped in UINT8 QuantizeLinear → DequantizeLinear on their inputs
and outputs (per-tensor ranges: min/max of each tensor over ``--calib-faces`` degraded calibration faces,
ONNX Runtime with optimizations off), so that ONNX Runtime fuses them into ``QLinearAdd`` /
``QLinearSigmoid`` + ``QLinearMul`` as it does for ``quantize_static``'s graphs; then times the original,
the variants and ``--peer`` interleaved (``export.bench.compare_latency``) and prints each variant's output
PSNR against the original on one face. Not a deployment graph: its extra rounding is not simulated in
PyTorch; it only says whether the lowering is worth building (docs/deploy_bench.md, run 6).
"""

from __future__ import annotations

import argparse
import collections
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _targets(graph: onnx.GraphProto, kinds: set[str]) -> list[str]:
    inits = {i.name for i in graph.initializer}
    produced = {o for n in graph.node for o in n.output}
    out: list[str] = []
    for n in graph.node:
        if "add" in kinds and n.op_type == "Add" and all(i not in inits and i in produced for i in n.input):
            out += [*n.input, n.output[0]]
        if "silu" in kinds and n.op_type == "Sigmoid":
            mul = next((c for c in graph.node if c.op_type == "Mul" and set(c.input) == {n.input[0], n.output[0]}), None)
            if mul is not None:
                out += [n.input[0], n.output[0], mul.output[0]]
    return list(dict.fromkeys(out))


def _ranges(path: str, tensors: list[str], faces: np.ndarray) -> dict[str, tuple[float, float]]:
    import onnxruntime as ort

    probe = onnx.load(path)
    probe.graph.output.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors])
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    lo, hi = dict.fromkeys(tensors, np.inf), dict.fromkeys(tensors, -np.inf)
    for i in range(len(faces)):
        for t, v in zip(tensors, session.run(tensors, {session.get_inputs()[0].name: faces[i:i + 1]})):
            lo[t], hi[t] = min(lo[t], float(v.min())), max(hi[t], float(v.max()))
    return {t: (lo[t], hi[t]) for t in tensors}


def requantized(path: str, kinds: set[str], faces: np.ndarray) -> onnx.ModelProto:
    """``path`` with the ``kinds`` ("add", "silu") tensors wrapped in UINT8 Q → DQ (see the module docstring)."""
    model = onnx.load(path)
    g = model.graph
    tensors = _targets(g, kinds)
    ranges = _ranges(path, tensors, faces)
    after: dict[str, list[onnx.NodeProto]] = {}
    for t in tensors:
        a, b = min(ranges[t][0], 0.0), max(ranges[t][1], 0.0)
        scale = max((b - a) / 255, 1e-8)
        zero = int(np.clip(round(-a / scale), 0, 255))
        g.initializer.extend([numpy_helper.from_array(np.array(scale, np.float32), f"{t}_rq_scale"),
                              numpy_helper.from_array(np.array(zero, np.uint8), f"{t}_rq_zero")])
        after[t] = [helper.make_node("QuantizeLinear", [t, f"{t}_rq_scale", f"{t}_rq_zero"], [f"{t}_rq_codes"]),
                    helper.make_node("DequantizeLinear", [f"{t}_rq_codes", f"{t}_rq_scale", f"{t}_rq_zero"],
                                     [f"{t}_rq"])]
    for n in g.node:
        for k, i in enumerate(n.input):
            if i in after:
                n.input[k] = f"{i}_rq"
    nodes: list[onnx.NodeProto] = []
    for n in g.node:
        nodes.append(n)
        for o in n.output:
            nodes += after.get(o, [])
    del g.node[:]
    g.node.extend(nodes)
    return model


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--onnx", required=True, help="our ort-cpu graph")
    ap.add_argument("--peer", required=True, help="the graph to time against (quantize_static MinMax)")
    ap.add_argument("--calib", default="../shared/data/faces_hq/calib")
    ap.add_argument("--calib-faces", type=int, default=16)
    ap.add_argument("--out-dir", default=".")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timings of 100 runs each")
    a = ap.parse_args(argv)

    import onnxruntime as ort

    from quantface.data import load_folder
    from quantface.degradation import degrade
    from quantface.export.bench import compare_latency
    from quantface.metrics import output_psnr
    from quantface.pipeline import images_to_tensor

    size = onnx.load(a.onnx, load_external_data=False).graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    faces = images_to_tensor([degrade(h, 0, i)[0] for i, h in
                              enumerate(load_folder(a.calib, size, a.calib_faces).images)]).numpy()
    graphs = {"peer": a.peer, "ours": a.onnx}
    for name, kinds in (("ours+qlinearadd", {"add"}), ("ours+qlinearadd+silu", {"add", "silu"})):
        out = Path(a.out_dir) / f"{Path(a.onnx).stem}.{name.split('+', 1)[1].replace('+', '_')}.onnx"
        onnx.save(requantized(a.onnx, kinds, faces), str(out))
        graphs[name] = str(out)
    outputs = {}
    for name, path in graphs.items():
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(Path(a.out_dir) / "opt.onnx")
        s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        outputs[name] = s.run(None, {s.get_inputs()[0].name: faces[:1]})[0]
        ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
        print(f"{name}: {sum(ops.values())} nodes after ORT's fusions, "
              + ", ".join(f"{k} {v}" for k, v in sorted(ops.items()) if k.startswith("QLinear") or k in ("Add", "QuickGelu"))
              + (f"; output PSNR to ours {output_psnr(outputs[name], outputs['ours']):.2f} dB" if name != "peer" else ""))
    for r in range(a.rounds):
        t = compare_latency(graphs, threads=2, repeats=100)
        base = t["peer"].median_ms
        print(f"round {r + 1}: " + ", ".join(f"{k} {v.median_ms:.1f} ms ({v.median_ms / base:.3f}x)" for k, v in t.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
