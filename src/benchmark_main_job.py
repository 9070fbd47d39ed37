"""Benchmark of the main job: wall time of a first run (nothing cached) and of a rerun, with
the seconds of each phase (the embedding picture's among them: its budget is 10 s).

Runs `python src/transfer_learning.py` as a user does, as separate processes, with a fresh,
empty cache, so the first run decodes the images and extracts the features, and the rerun
reads both from the cache. Prints a markdown table (with machine, backend and versions), the
head's achieved TFLOP/s in `fit` beside the matrix-product peak of the runs' precision
(measured after them), and writes it as JSON to out/benchmarks/.

    python src/benchmark_main_job.py --data ../shared/data/cifar-10-images-jpg.tar.gz \\
        --weights ../shared/data/vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5

Any flag it does not know is passed on to transfer_learning.py (e.g. --epochs 40).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vgg_transfer import devices, paths, runs

import keras

REPEATS = 1  # pairs of (first run, rerun); each pair starts from an empty cache


def head_tflops(metrics):
    """The head's achieved TFLOP/s in `fit`: 2 FLOP per multiply-add of its two Dense layers'
    forward and weight-gradient products for every training image of every epoch, and of their
    forward products for every validation image, over the seconds of the training phase (VGG16
    cut at block4_pool, which leaves (IMAGE_SIZE/16)^2 x 512 features)."""
    settings = metrics["hyperparameters"]
    if settings.get("FEATURE_LAYER") != "block4_pool" or "HEAD_UNITS" not in settings:
        return None
    features = (settings["IMAGE_SIZE"] // 16) ** 2 * 512
    multiply_adds = features * settings["HEAD_UNITS"] + settings["HEAD_UNITS"] * len(metrics["data"]["class_names"])
    images = metrics["epochs_run"] * (2 * metrics["data"]["train_images"] + metrics["data"]["validation_images"])
    return 2 * multiply_adds * images / metrics["seconds"]["training"] / 1e12


def timed_run(arguments, environment):
    start = time.perf_counter()
    result = subprocess.run([sys.executable, str(Path(__file__).with_name("transfer_learning.py")), *arguments],
                            env=environment, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"transfer_learning.py failed:\n{result.stderr[-3000:]}")
    run_dir = next(line.split(": ", 1)[1] for line in result.stdout.splitlines() if line.startswith("Run folder: "))
    return seconds, json.loads((Path(run_dir) / "metrics.json").read_text()), run_dir


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=REPEATS)
    parser.add_argument("--out", default=str(paths.out_dir()))
    options, passed_on = parser.parse_known_args()
    rows = []
    for repeat in range(options.repeats):
        with tempfile.TemporaryDirectory(prefix="vgg-transfer-cache-") as cache:
            environment = {**os.environ, "VGG_TRANSFER_CACHE_DIR": cache}
            for kind in ("first run", "rerun (cached)"):
                seconds, metrics, run_dir = timed_run([*passed_on, "--out", options.out, "--quiet"], environment)
                rows.append({"kind": kind, "repeat": repeat + 1, "wall_seconds": round(seconds, 1),
                             "test_accuracy": metrics["test_accuracy"], "phases": metrics["seconds"],
                             "epochs_run": metrics["epochs_run"], "head_tflops": head_tflops(metrics),
                             "run_dir": run_dir})
                print(f"{kind}: {seconds:.1f} s, test accuracy {metrics['test_accuracy']:.4f} ({run_dir})", flush=True)
    # The head's speed against what this machine does in the runs' precision: a large matrix
    # product, timed here after the runs, on the same quiet machine.
    policy = metrics["precision"]["dtype_policy"]
    keras.config.set_dtype_policy(policy)
    peak = devices.matmul_peak() / 1e12
    environment = runs.environment()
    print(f"\nMachine: {environment['machine']}; backend {environment['backend']} on {environment['device']}; "
          f"keras {environment['versions'].get('keras')}; command: transfer_learning.py {' '.join(passed_on)}; "
          f"matrix-product peak in {policy}: {peak:.3f} TFLOP/s\n")
    print("| run | wall time (s) | data | features | training | head's TFLOP/s (of peak) | evaluation "
          "| embedding picture | epochs | test accuracy |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        phases = row["phases"]
        tflops = f"{row['head_tflops']:.3f} ({row['head_tflops'] / peak:.0%})" if row["head_tflops"] else "-"
        print(f"| {row['kind']} #{row['repeat']} | {row['wall_seconds']} | {phases.get('data')} | {phases.get('features')} "
              f"| {phases.get('training')} | {tflops} | {phases.get('evaluation')} | {phases.get('embedding')} | {row['epochs_run']} "
              f"| {row['test_accuracy']:.4f} |")
    report = Path(options.out) / "benchmarks" / f"main_job-{time.strftime('%Y%m%d-%H%M%S')}.json"
    report.parent.mkdir(parents=True, exist_ok=True)
    report.write_text(json.dumps({"command": passed_on, "environment": environment, "matmul_peak_tflops": peak,
                                  "runs": rows}, indent=2))
    print(f"\nWritten: {report}")


if __name__ == "__main__":
    main()
