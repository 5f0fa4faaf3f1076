"""Time a loss with the batch's shared prompt prefix computed once against every row computed whole.

Seconds of a loss forward (+ backward when training) on the embedded SmolLM2-135M, with the prefix that
every row shares computed once (``modeling.response_loss``) and without, on real chat batches of the
demo's harmful pairs (SmolLM2's template puts the same system prompt before every prompt).

Each setting alternates the two ways ``--repeats`` times and reports the median; the ratio is shared / whole
(below 1: faster). Below ``SHARED_PREFIX_MIN_ROWS`` rows, or when the prefix is under
``SHARED_PREFIX_MIN_SAVING`` of the tokens, ``response_loss`` computes rows whole: those rows of the table
show what sharing would have cost there (the extra one-row forward runs small, inefficient matrix products).

    python benchmarks/shared_prefix.py [--rows 2 3 4 8] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from demo_profile import cpu_description  # the script's folder is on sys.path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, nargs="+", default=[2, 3, 4, 8], help="Batch sizes to time.")
    p.add_argument("--repeats", type=int, default=5, help="Timed repeats of each way (median reported).")
    p.add_argument("--max_length", type=int, default=96, help="Truncation of the pairs (the demo's).")
    p.add_argument("--json", default=None, help="Also write the result here.")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from immune_trainer import data as data_lib
    from immune_trainer.data import assets, embedded
    from immune_trainer.losses import response_prediction_mask
    from immune_trainer.modeling import output_layer as modeling  # its SHARED_PREFIX_* limits are set below

    model_dir = assets.prepare_model()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rows = data_lib.ensure_tokenized(
        embedded.harmful_splits(0)["defense"], tokenizer, max_length=args.max_length
    )
    collate = data_lib.SupervisedCollator(tokenizer)

    def run(batch, train: bool) -> None:
        if train:
            loss, _ = modeling.response_loss(model, **batch)
            loss.backward()
            model.zero_grad(set_to_none=True)
        else:
            with torch.inference_mode():
                modeling.response_loss(model, **batch)

    # Force sharing on for the timing, whatever the batch size rule says, to show what it would cost.
    limits = (modeling.SHARED_PREFIX_MIN_ROWS, modeling.SHARED_PREFIX_MIN_SAVING)
    results = []
    for n in args.rows:
        batch = collate([rows[i] for i in range(n)])
        predict = response_prediction_mask(batch["labels"].masked_fill(batch["attention_mask"] == 0, -100))
        prefix = modeling.shared_prefix_length(batch["input_ids"], batch["attention_mask"], predict)
        tokens = int(batch["input_ids"].numel())
        for train in (True, False):
            model.train(train)
            times = {True: [], False: []}
            modeling.SHARED_PREFIX_MIN_ROWS, modeling.SHARED_PREFIX_MIN_SAVING = 2, 0.0
            try:
                for _ in range(args.repeats + 1):  # the first round warms up
                    for share in (True, False):
                        with modeling.sharing_prompt_prefix(share):
                            t = time.perf_counter()
                            run(batch, train)
                            times[share].append(time.perf_counter() - t)
            finally:
                modeling.SHARED_PREFIX_MIN_ROWS, modeling.SHARED_PREFIX_MIN_SAVING = limits
            shared, whole = (statistics.median(times[s][1:]) for s in (True, False))
            used = n >= limits[0] and (n - 1) * prefix >= limits[1] * tokens
            results.append(
                {
                    "rows": n,
                    "mode": "forward+backward" if train else "forward (scoring)",
                    "tokens": tokens,
                    "shared_prefix_tokens": prefix,
                    "token_ratio": round((tokens - (n - 1) * prefix) / tokens, 3),
                    "whole_s": round(whole, 3),
                    "shared_s": round(shared, 3),
                    "ratio": round(shared / whole, 3),
                    "used_by_response_loss": used,
                }
            )
            r = results[-1]
            print(
                f"{n} rows x {tokens // n} tokens, {r['mode']:18s} prefix {prefix:3d}: whole {whole:6.2f} s, "
                f"shared {shared:6.2f} s, ratio {r['ratio']:.3f} (tokens {r['token_ratio']:.3f})"
                f"{'' if used else '  [response_loss computes rows whole here]'}",
                flush=True,
            )
    out = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_description(),
        "threads": torch.get_num_threads(),
        "emulation": {
            k: os.environ[k]
            for k in ("MKL_CBWR", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
            if k in os.environ
        },
        "min_rows": limits[0],
        "min_saving": limits[1],
        "results": results,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
