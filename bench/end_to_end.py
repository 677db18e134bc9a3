"""Wall time of the default job (what `make demo` runs), by stage, on this machine.

    python bench/end_to_end.py [--config configs/xattn.py] [--arg concept=toy_striped]

Runs anchors -> train -> evaluate -> export in a fresh temporary workdir, then prints each
stage's seconds and the total. There is no PyTorch counterpart of the whole job to compare with;
per-stage speed against diffusers is measured by bench/sampling.py.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "xattn.py"))
    ap.add_argument("--arg", default=None, help="the config's arg string, e.g. concept=toy_striped")
    args = ap.parse_args()

    import jax

    from ablate_jax import train

    spec = importlib.util.spec_from_file_location("bench_config", args.config)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(args.arg)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = train.run(config, Path(tmp) / "run", progress=False)
        total = time.perf_counter() - t0
    timing = {k: round(v, 1) for k, v in report.get("timing_s", {}).items()}
    result = {"config": Path(args.config).name, "arg": args.arg, "devices": jax.device_count(),
              "backend": jax.default_backend(), "stages_s": timing, "total_s": round(total, 1)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
