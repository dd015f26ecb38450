"""Latency of one ONNX graph on ONNX Runtime's CPU EP, in a process of its own (one warm-up run, one
timed run, 2 threads, the first face scikit-image ships at SIZE²), printed as one JSON line. How
docs/osdface_scale.md timed the full-size graphs one process each: ``python tools/time_graph.py G.onnx 512``."""
import sys, time, json, numpy as np, onnxruntime as ort
path = sys.argv[1]
size = int(sys.argv[2]) if len(sys.argv) > 2 else 512
so = ort.SessionOptions(); so.intra_op_num_threads = 2
s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
from quantface.data import shipped_faces
from quantface.pipeline import images_to_tensor
x = images_to_tensor(shipped_faces(size)[0][:1]).numpy()
s.run(None, {s.get_inputs()[0].name: x})
t0 = time.perf_counter(); y = s.run(None, {s.get_inputs()[0].name: x})[0]; dt = time.perf_counter() - t0
print(json.dumps({"graph": path, "seconds": dt, "finite": bool(np.isfinite(y).all())}), flush=True)
