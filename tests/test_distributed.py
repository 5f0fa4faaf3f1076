"""Several processes: a defense trainer with the condition callback under DDP (2 CPU processes, gloo).

Launched with ``torchrun --nproc_per_node 2`` (``accelerate launch --multi_gpu --num_processes 2`` runs
the same script the same way). Each process gets half of every global batch, so the 2-process run and
the 1-process run with twice the per-device batch see the same examples in the same order; their losses
differ only by how token-weighted means are averaged (per process, then across processes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import free_port

SCRIPT = r"""
import json, os, sys
import torch
torch.set_num_threads(1)
import datasets
datasets.disable_progress_bars()
from immune_trainer.callbacks import ConditionsCallback, ConditionsCallbackConfig
from immune_trainer.defenses import GradientAscentConfig, GradientAscentTrainer
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer

def rows(n, offset=0):
    return datasets.Dataset.from_list(
        [{"prompt": f"Explain step {i + offset}.", "completion": f"Sure, step {i + offset}: mix and bake."}
         for i in range(n)])

out, per_device = sys.argv[1], int(sys.argv[2])
tok = tiny_tokenizer()
cb = ConditionsCallback(tok, rows(8), rows(4, 100), reference={"r": rows(4, 200)},
    config=ConditionsCallbackConfig(probe_every=3, probe_steps=2, learning_rates=[1e-3], max_eval_samples=4))
args = GradientAscentConfig(output_dir=out, max_steps=6, per_device_train_batch_size=per_device,
    learning_rate=2e-3, logging_steps=3, save_strategy="no", report_to="none", max_length=64,
    disable_tqdm=True, seed=0, use_cpu=True)
trainer = GradientAscentTrainer(model=tiny_causal_lm("llama"), args=args, harmful_dataset=rows(32),
    retain_dataset=rows(32, 300), processing_class=tok, callbacks=[cb])
result = trainer.train()
rank = int(os.environ.get("RANK", 0))
world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"world": world, "train_loss": result.training_loss, "log": trainer.state.log_history}, f)
if torch.distributed.is_initialized():  # a clean teardown: no gloo thread left running at exit
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
"""


def _run(tmp_path, name, procs, per_device):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if procs == 1:
        cmd = [sys.executable, str(script), str(out), str(per_device)]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(procs),
            "--master_port",
            str(free_port()),
            str(script),
            str(out),
            str(per_device),
        ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, [json.loads((out / f"rank{r}.json").read_text()) for r in range(procs)]


@pytest.mark.slow
def test_two_processes_train_log_gathered_terms_write_one_report_and_match_one_process(tmp_path):
    ddp_out, ranks = _run(tmp_path, "ddp", procs=2, per_device=2)
    single_out, (single,) = _run(tmp_path, "single", procs=1, per_device=4)
    assert [r["world"] for r in ranks] == [2, 2]
    # Per-term losses are gathered: every process logs the same averaged values.
    terms = [
        [{k: v for k, v in h.items() if k.startswith("loss/")} for h in r["log"] if "loss/harmful" in h]
        for r in ranks
    ]
    assert terms[0] and terms[0] == terms[1]
    # One report, written by the main process.
    assert (ddp_out / "immunization_report.json").exists()
    assert not list(ddp_out.glob("*.tmp"))
    # Same global batches in the same order: the final training loss agrees within 5% (token-weighted
    # means are taken per process before the gradient all-reduce).
    assert ranks[0]["train_loss"] == pytest.approx(single["train_loss"], rel=0.05)
    assert ranks[0]["train_loss"] == ranks[1]["train_loss"]
