"""Our ONNX graphs beside ONNX Runtime's own one-call quantizers, measured in one run.

    python tools/bench_deploy.py --calib-limit 64 --test-limit 20 \\
        --graph ours-ort-cpu=w4a4_ort_cpu.onnx@recipes/quantface_w4a4 \\
        --graph ours-reference=w4a4_reference.onnx@recipes/quantface_w4a4 \\
        --out docs/deploy_bench.md --json docs/deploy_bench.json

Exports the FP32 graph, quantizes it with ONNX Runtime's ``quantize_static`` (MinMax, Percentile) and
its QNN recipe (A8W8, A16W8), calibrated on ``--calib`` faces exactly as ``quantface calibrate`` feeds
them, and reports for every graph (FP32, the peers, each ``--graph``): file size, latency timed
interleaved in one run (ratios to FP32 and to ``quantize_static`` MinMax), ONNX Runtime's kernel time
by part, and PSNR / SSIM on ``--test`` faces, to the HQ faces and to the FP model
(``quantface.deploy_bench``).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from quantface.deploy_bench import DeployBenchConfig, GraphSpec, deploy_bench
from quantface.errors import exit_status
from quantface.export.peers import PEERS


def _limit(text: str) -> int | None:
    return None if text == "all" else int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--graph", action="append", default=[], metavar="NAME=PATH[@RECIPE]",
                    help="one of our exported graphs (repeat); RECIPE is the recipe it was exported from")
    ap.add_argument("--calib", default="../shared/data/faces_hq/calib", help="calibration faces for the peers")
    ap.add_argument("--calib-limit", type=_limit, default=512, help="calibration faces used, or 'all' (default 512)")
    ap.add_argument("--calib-seed", type=int, default=0, help="degradation seed of the calibration faces")
    ap.add_argument("--test", default="../shared/data/faces_hq/test", help="held-out faces for the quality columns")
    ap.add_argument("--test-limit", type=_limit, default=300, help="test faces used, or 'all' (default 300)")
    ap.add_argument("--test-seed", type=int, default=0, help="degradation seed of the test faces")
    ap.add_argument("--model", default="reference")
    ap.add_argument("--weights", default=None, help="weights stem overriding the embedded model's")
    ap.add_argument("--peers", nargs="+", default=list(PEERS), choices=list(PEERS))
    ap.add_argument("--reduce-range", choices=["auto", "on", "off"], default="auto",
                    help="quantize_static's 7-bit weights: auto follows ORT's CPU guidance for this machine")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--profile-runs", type=int, default=20)
    ap.add_argument("--htp-faces", type=int, default=2,
                    help="test faces each HTP graph runs on the emulated HTP for its parity with the CPU EP "
                         "(about a minute a face; 0: placement only)")
    ap.add_argument("--workdir", default=None, help="keep the FP32 and peer graphs in this folder")
    ap.add_argument("--out", default=None, help="Markdown report to write")
    ap.add_argument("--json", dest="json_out", default=None, help="JSON report to write")
    args = ap.parse_args(argv)
    command = shlex.join(["python", "tools/bench_deploy.py", *(sys.argv[1:] if argv is None else argv)])

    def job() -> None:
        cfg = DeployBenchConfig(
            calib=args.calib, test=args.test, graphs=[GraphSpec.parse(g) for g in args.graph], model=args.model,
            weights=args.weights, peers=tuple(args.peers), calib_limit=args.calib_limit, calib_seed=args.calib_seed,
            test_limit=args.test_limit, test_seed=args.test_seed, threads=args.threads, repeats=args.repeats,
            profile_runs=args.profile_runs, htp_faces=args.htp_faces, reduce_range={"auto": None, "on": True, "off": False}[args.reduce_range],
            workdir=args.workdir, out=args.out, json_out=args.json_out, command=command)
        from quantface.deploy_bench import markdown

        print(markdown(deploy_bench(cfg)))

    return exit_status(job)


if __name__ == "__main__":
    raise SystemExit(main())
