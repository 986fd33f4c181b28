#!/usr/bin/env python
"""Train the demo CLIP on rendered toy art and save it in open_clip's local-dir format.

The full run (what the demo ships):

    python scripts/train_demo_clip.py --out models/demo-clip --steps 5000 --batch-size 256 --seed 0 \
        --device cuda --workers 12

--device cpu works too (bf16 autocast on CPUs with native bf16); see rdm/demo/clip.py for what the
model is and what the evaluation printed at the end measures.
"""

from __future__ import annotations

import argparse
import json

from rdm.demo.clip import ClipTrainConfig, format_metrics, train_clip


def main(argv: list[str] | None = None) -> None:
    defaults = ClipTrainConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="model folder to write (open_clip local-dir format)")
    p.add_argument("--steps", type=int, default=defaults.steps, help="optimiser steps")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="image/caption pairs per step")
    p.add_argument("--seed", type=int, default=defaults.seed, help="seed of the initial weights")
    p.add_argument("--data-seed", type=int, default=defaults.data_seed, help="toy-art seed of the training images")
    p.add_argument("--device", default=defaults.device, help="cpu, cuda, cuda:1, ...")
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: 5%% of --steps)")
    p.add_argument("--workers", type=int, default=defaults.workers, help="DataLoader processes rendering images")
    p.add_argument("--precision", default=defaults.precision, choices=("auto", "bf16", "fp32"))
    p.add_argument("--save-dtype", default=defaults.save_dtype, choices=("float16", "float32"))
    p.add_argument("--log-every", type=int, default=defaults.log_every)
    p.add_argument("--probe-every", type=int, default=defaults.probe_every,
                   help="steps between zero-shot probes on held-out images (0: never)")
    p.add_argument("--no-eval", action="store_true", help="skip the zero-shot evaluation after training")
    a = p.parse_args(argv)
    config = ClipTrainConfig(steps=a.steps, batch_size=a.batch_size, seed=a.seed, data_seed=a.data_seed,
                             device=a.device, lr=a.lr,
                             warmup=a.warmup if a.warmup is not None else max(1, a.steps // 20),
                             workers=a.workers, precision=a.precision, save_dtype=a.save_dtype,
                             log_every=a.log_every, probe_every=a.probe_every)
    result = train_clip(config, out=a.out, evaluate=not a.no_eval, log=lambda line: print(line, flush=True))
    print(f"saved {result.model_id}  ({result.seconds:.0f} s, {result.images_per_second:.0f} img/s)")
    print("loss curve (step, mean loss):", json.dumps([(s, round(v, 4)) for s, v in result.loss_summary()]))
    if result.metrics:
        print("evaluation (held-out toy art):")
        print(format_metrics(result.metrics))


if __name__ == "__main__":
    main()
