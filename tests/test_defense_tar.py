"""TAR: step weights, the first-order tamper-resistance gradient against a manual computation, no side
effects of the simulated attacker, and the direction of training."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
from conftest import defense_config, make_benign, make_pairs

from immune_trainer.defenses import TARConfig, TARTrainer, get_defense
from immune_trainer.errors import ConfigError
from immune_trainer.testing import tiny_causal_lm, tiny_tokenizer


def _config(tmp_path, **kw):
    return defense_config(
        TARConfig,
        tmp_path,
        **{
            "max_steps": 2,
            "learning_rate": 1e-3,
            "logging_steps": 1,
            "inner_steps": 2,
            "tr_every": 1,
            "adversary_learning_rates": [1e-2],
            **kw,
        },
    )


def _trainer(tmp_path, model, **kw):
    return TARTrainer(
        model=model,
        args=_config(tmp_path, **kw),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
    )


def test_step_weights_and_cost():
    spec = get_defense("tar")
    assert spec.trainer_class is TARTrainer and spec.paper["id"] == "2408.00761"
    cfg = TARConfig(output_dir="/tmp/unused", report_to="none")
    assert (cfg.inner_steps, cfg.tr_every, cfg.lambda_tr, cfg.lambda_retain) == (8, 4, 4.0, 1.0)
    # The reference's adversaries (tar.py, run_tar_bio.sh) and its loss for refusal.
    assert cfg.adversary_learning_rates == [2e-6, 2e-5, 4e-5]
    assert (cfg.warmup_adversary_probability, cfg.adversary_warmup_steps) == (
        0.2,
        2,
    )  # 20 of 64 steps, at K = 8
    assert TARConfig(output_dir="/tmp/unused", report_to="none", inner_steps=64).adversary_warmup_steps == 20
    assert cfg.tamper_loss == "dpo" and cfg.dpo_beta == 0.1
    assert "64" in TARConfig.__dataclass_fields__["inner_steps"].metadata["help"]  # the reference's K
    with pytest.raises(ConfigError, match="inner_steps|K="):
        TARConfig(output_dir="/tmp/unused", report_to="none", inner_steps=2, tr_every=4)
    with pytest.raises(ConfigError, match="tamper_loss"):
        TARConfig(output_dir="/tmp/unused", report_to="none", tamper_loss="kl")
    with pytest.raises(ConfigError, match="dpo_beta"):
        TARConfig(output_dir="/tmp/unused", report_to="none", dpo_beta=0.0)
    with pytest.raises(ConfigError, match="adversary_fraction"):
        TARConfig(output_dir="/tmp/unused", report_to="none", adversary_fraction=1.0)
    with pytest.raises(ConfigError, match="warmup_adversary_probability"):
        TARConfig(output_dir="/tmp/unused", report_to="none", warmup_adversary_probability=1.5)
    with pytest.raises(ConfigError, match="adversary_warmup_steps"):
        TARConfig(output_dir="/tmp/unused", report_to="none", adversary_warmup_steps=0)


def test_default_adversary_rates_are_disjoint_from_the_evaluation_attacks():
    """A defense trained against exactly the attack it is scored on is over-credited: the simulated attacker's
    default rates share no value with the attack rates the evaluation and the demo use by default, and the
    warm-up adversary never goes above the drawn rate."""
    from immune_trainer.attacks import AttackConfig
    from immune_trainer.demo.presets import PRESETS, DemoConfig

    adversary = set(TARConfig(output_dir="/tmp/unused", report_to="none").adversary_learning_rates)
    evaluation = set(AttackConfig().learning_rates)
    for preset in PRESETS.values():
        evaluation |= set(preset["attack_learning_rates"]) | {preset["lora_learning_rate"]}
    demo = DemoConfig()
    evaluation |= set(demo.attack_learning_rates or []) | ({demo.lora_learning_rate} - {None})
    assert {3e-5, 6e-5, 8e-5} <= evaluation
    assert adversary == {2e-6, 2e-5, 4e-5} and not adversary & evaluation


def test_warmup_adversaries_are_drawn_and_ramp_their_rate(tmp_path):
    trainer = _trainer(tmp_path, tiny_causal_lm("llama"), inner_steps=4, tr_every=2, adversary_warmup_steps=3)
    draws = [trainer.is_warmup_adversary_step(s) for s in range(3000)]
    assert 0.17 < sum(draws) / len(draws) < 0.23  # the default probability 0.2
    assert draws[:50] == [trainer.is_warmup_adversary_step(s) for s in range(50)]  # seeded by the step
    benign = [random.Random(0 * 7_000_003 + s).random() < 0.2 for s in range(3000)]
    assert draws != benign  # not the benign adversaries' draw
    assert trainer.adversary_lr_factors(True) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert trainer.adversary_lr_factors(False) == [1.0] * 4
    off = _trainer(tmp_path / "off", tiny_causal_lm("llama"), warmup_adversary_probability=0.0)
    assert not any(off.is_warmup_adversary_step(s) for s in range(500))


def test_adversary_learning_rate_draws_cover_the_configured_list(tmp_path):
    trainer = _trainer(tmp_path, tiny_causal_lm("llama"), adversary_learning_rates=[3e-5, 6e-5, 8e-5])
    draws = []
    for step in range(60):
        trainer.state.global_step = step
        draws.append(trainer._adversary_lr())
    assert set(draws) == {3e-5, 6e-5, 8e-5}


def _ref_sequence_logp(logits, labels):
    """Sum over response tokens of log p(token), written with a plain loop over rows (independent)."""
    out = []
    for row_logits, row_labels in zip(logits, labels):
        total = torch.zeros(())
        for t in range(1, row_labels.shape[0]):
            if row_labels[t] != -100:
                total = total + torch.log_softmax(row_logits[t - 1], -1)[row_labels[t]]
        out.append(total)
    return torch.stack(out)


def _ref_tr_loss(model, held, kind, ref_logps=None, beta=0.1):
    harm_ids, harm_mask, harm_labels = (
        held["harmful_input_ids"],
        held["harmful_attention_mask"],
        held["harmful_labels"],
    )
    logits = model(input_ids=harm_ids, attention_mask=harm_mask).logits
    if kind == "max_entropy":
        shift = logits[:, :-1]
        resp = (harm_labels[:, 1:] != -100).float()
        p = shift.softmax(-1)
        ent = -(p * p.log()).sum(-1)
        return -(ent * resp).sum() / resp.sum()
    rejected = _ref_sequence_logp(logits, harm_labels)
    chosen_logits = model(
        input_ids=held["harmless_input_ids"], attention_mask=held["harmless_attention_mask"]
    ).logits
    chosen = _ref_sequence_logp(chosen_logits, held["harmless_labels"])
    ref_chosen, ref_rejected = ref_logps
    # DPO: -log sigmoid(beta * [(log pi(chosen) - log pi_0(chosen)) - (log pi(rejected) - log pi_0(rejected))])
    margin = (chosen - ref_chosen) - (rejected - ref_rejected)
    return torch.mean(torch.log1p(torch.exp(-beta * margin)))


@pytest.mark.parametrize("kind,warmup", [("max_entropy", False), ("dpo", False), ("dpo", True)])
def test_first_order_gradient_matches_a_manual_computation(tmp_path, kind, warmup):
    model = tiny_causal_lm("llama", seed=0)
    trainer = _trainer(
        tmp_path, model, lambda_tr=4.0, tamper_loss=kind, inner_batch_size=2, adversary_warmup_steps=2
    )
    trainer.model.eval()  # no dropout in either computation
    held = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    K = 2
    adversary = [trainer.next_adversary_batch() for _ in range(K)]
    assert not torch.equal(adversary[0]["input_ids"], adversary[1]["input_ids"])  # a fresh batch per step
    before = [p.detach().clone() for p in model.parameters()]
    grads, terms = trainer.tamper_resistance_grads(trainer.model, adversary, held, lr=1e-2, warmup=warmup)

    # Manual: a deep copy attacked by torch AdamW through ordinary forward/backward calls.
    ref_logps = None
    if kind == "dpo":  # the reference policy is the starting model
        with torch.no_grad():
            ref_logps = (
                _ref_sequence_logp(
                    model(
                        input_ids=held["harmless_input_ids"], attention_mask=held["harmless_attention_mask"]
                    ).logits,
                    held["harmless_labels"],
                ),
                _ref_sequence_logp(
                    model(
                        input_ids=held["harmful_input_ids"], attention_mask=held["harmful_attention_mask"]
                    ).logits,
                    held["harmful_labels"],
                ),
            )
    attacked = copy.deepcopy(model)
    opt = torch.optim.AdamW(attacked.parameters(), lr=1e-2, weight_decay=0.0)
    # The warm-up adversary: a linear ramp over 2 steps (rates 5e-3 then 1e-2), torch's own LambdaLR.
    ramp = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, (k + 1) / 2) if warmup else 1.0)
    expected = [torch.zeros_like(p) for p in attacked.parameters()]
    values = []
    for k in range(K):
        opt.zero_grad()
        attacked(**adversary[k]).loss.backward()
        opt.step()
        ramp.step()
        opt.zero_grad()
        tr = _ref_tr_loss(attacked, held, kind, ref_logps)
        tr.backward()
        values.append(float(tr.detach()))
        w = math.exp(0.0625 * (k - (K - 1)))
        for e, q in zip(expected, attacked.parameters()):
            if q.grad is not None:
                e.add_(4.0 * w * q.grad)
    got = [torch.zeros_like(p) if g is None else g for p, g in zip(model.parameters(), grads)]
    for g, e in zip(got, expected):
        assert torch.allclose(g, e, atol=1e-5, rtol=1e-4)
    assert any(float(e.abs().sum()) > 0 for e in expected)
    assert float(terms["tamper_resistance"]) == pytest.approx(sum(values) / K, rel=1e-4)
    # The simulated attacker did not touch the real weights.
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    if kind == "max_entropy":
        assert -math.log(512) <= float(terms["tamper_resistance"]) <= 0.0
    else:
        assert float(terms["tamper_resistance"]) > 0.0


def test_dpo_loss_against_an_independent_computation():
    from immune_trainer.defenses.tar import dpo_preference_loss, sequence_logps

    torch.manual_seed(0)
    logits = torch.randn(3, 6, 11)
    labels = torch.tensor(
        [[-100, -100, 4, 5, 1, -100], [-100, 2, 3, -100, -100, -100], [-100, -100, -100, -100, 7, 9]]
    )
    torch.testing.assert_close(sequence_logps(logits, labels), _ref_sequence_logp(logits, labels))
    pc, pr, rc, rr = (torch.randn(3) for _ in range(4))
    beta = 0.3
    expected = (
        sum(
            -math.log(1 / (1 + math.exp(-beta * ((a - c) - (b - d)))))
            for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist())
        )
        / 3
    )
    assert float(dpo_preference_loss(pc, pr, rc, rr, beta)) == pytest.approx(expected, rel=1e-6)
    # By hand: log-probs chosen -3 (reference -4), rejected -5 (reference -4), beta 0.5: the margin is
    # (1) - (-1) = 2, so the loss is -log sigmoid(1) = log(1 + e^-1) = 0.31326...
    one = torch.ones(1)
    assert float(dpo_preference_loss(-3 * one, -5 * one, -4 * one, -4 * one, 0.5)) == pytest.approx(
        0.3132616875182228, rel=1e-6
    )
    # Preferring the chosen response more than the reference does lowers the loss.
    assert dpo_preference_loss(pc + 1, pr, rc, rr, beta) < dpo_preference_loss(pc, pr, rc, rr, beta)


def test_inner_steps_draw_fresh_adversary_rows_disjoint_from_the_held_out_rows(tmp_path):
    model = tiny_causal_lm("llama", seed=0)
    trainer = _trainer(tmp_path, model, max_steps=1, inner_steps=4, tr_every=2, inner_batch_size=2)
    adv_rows = {tuple(r) for r in trainer.adversary_dataset["harmful_input_ids"]}
    held_rows = {tuple(r) for r in trainer.train_dataset["harmful_input_ids"]}
    assert len(adv_rows) == 4 and len(held_rows) == 4 and not adv_rows & held_rows
    seen = []
    draw = trainer.next_adversary_batch

    def recording(source="harmful"):
        assert source == "harmful"  # no benign attackers by default
        batch = draw(source)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        seen.append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)])
        return batch

    trainer.next_adversary_batch = recording
    trainer.train()
    assert len(seen) == 4  # one batch per inner step
    assert all(set(rows) <= adv_rows for rows in seen)  # never a held-out row
    assert len({tuple(rows) for rows in seen}) > 1  # not the same rows every step
    assert set(seen[0]) | set(seen[1]) == adv_rows  # the first two steps go through all four adversary rows


def test_dpo_tamper_loss_trains_full_and_lora(tmp_path):
    from peft import LoraConfig

    for lora in (False, True):
        # Full fine-tuning without the representation term: the frozen starting model serves the DPO loss.
        trainer = TARTrainer(
            model=tiny_causal_lm("qwen2", seed=0),
            args=_config(tmp_path / str(lora), tamper_loss="dpo", representation_retain=lora),
            harmful_dataset=make_pairs(8),
            processing_class=tiny_tokenizer(),
            peft_config=LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear")
            if lora
            else None,
        )
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        trainer.train()
        changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(before[n], p)]
        assert changed and (not lora or all("lora_" in n for n in changed))
        logged = [h for h in trainer.state.log_history if "loss/tamper_resistance" in h]
        assert logged and logged[-1]["loss/tamper_resistance"] > 0  # a DPO loss, not a negated entropy
        assert trainer.plain_steps_per_step == pytest.approx(2 + 2 * 2 + 1 + (1 / 3 if lora else 0) + 2 / 3)


@pytest.mark.parametrize("arch,lora", [("gpt2", False), ("qwen2", True), ("llama", True)])
def test_training_step_architectures_lora_and_accumulation(tmp_path, arch, lora):
    from peft import LoraConfig

    model = tiny_causal_lm(arch, seed=0)
    peft_config = (
        LoraConfig(r=4, lora_alpha=8, task_type="CAUSAL_LM", target_modules="all-linear") if lora else None
    )
    trainer = TARTrainer(
        model=model,
        args=_config(
            tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2, inner_batch_size=1
        ),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_pairs(8, offset=40),
        processing_class=tiny_tokenizer(),
        peft_config=peft_config,
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert changed
    if lora:
        assert all("lora_" in n for n in changed)
    logged = [h for h in trainer.state.log_history if "loss/tamper_resistance" in h]
    assert logged and {"loss/representation", "loss/harmless", "loss/retain", "loss/warmup_adversary"} <= set(
        logged[-1]
    )
    # K = 2, two DPO tamper-resistance passes of two sides, two retain batches, the starting model's forwards.
    assert trainer.plain_steps_per_step == pytest.approx(2 + 2 * 2 + 2 + 2 / 3 + 2 / 3)


def _post_attack_entropy(model, batch, steps=4, lr=1e-2):
    attacked = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        attacked(**batch).loss.backward()
        opt.step()
    attacked.eval()
    with torch.no_grad():
        logits = attacked(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    resp = batch["labels"][:, 1:] != -100
    p = logits.softmax(-1)
    return float((-(p * p.log()).sum(-1))[resp].mean())


@pytest.mark.slow
def test_training_raises_post_attack_entropy(tmp_path):
    tok = tiny_tokenizer()
    # A "capable" starting model: fitted a little to the harmful responses, so its entropy is low.
    model = tiny_causal_lm("llama", seed=0)
    trainer = _trainer(tmp_path / "probe", model, per_device_train_batch_size=8)
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    harm = trainer.side(batch, "harmful")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):
        opt.zero_grad()
        model(**harm).loss.backward()
        opt.step()
    control = copy.deepcopy(model)
    tar = TARTrainer(
        model=model,
        args=_config(
            tmp_path, max_steps=8, inner_steps=4, tr_every=2, learning_rate=3e-3, tamper_loss="max_entropy"
        ),
        harmful_dataset=make_pairs(8),
        processing_class=tok,
    )
    tar.train()
    assert _post_attack_entropy(model, harm) > _post_attack_entropy(control, harm) + 0.1


def _post_attack_preference(model, harm, refusal, steps=4, lr=1e-2):
    """Mean summed log-prob of the refusal minus that of the harmful response, after an attack on harm."""
    attacked = copy.deepcopy(model).train()
    opt = torch.optim.AdamW(attacked.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        attacked(**harm).loss.backward()
        opt.step()
    attacked.eval()
    with torch.no_grad():
        sides = [
            _ref_sequence_logp(
                attacked(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b["labels"]
            )
            for b in (refusal, harm)
        ]
    return float((sides[0] - sides[1]).mean())


@pytest.mark.slow
def test_dpo_training_keeps_the_refusal_preferred_after_an_attack(tmp_path):
    """The default (DPO) tamper loss: after TAR, an attacked copy still prefers the refusal over the harmful
    response by more than an attacked copy of the model before TAR (measured about 16.7 nats more)."""
    model = tiny_causal_lm("llama", seed=0)
    probe = _trainer(tmp_path / "probe", model, per_device_train_batch_size=8)
    batch = probe._prepare_inputs(next(iter(probe.get_train_dataloader())))
    harm, refusal = probe.side(batch, "harmful"), probe.side(batch, "harmless")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(15):  # a "capable" starting model that writes the harmful responses
        opt.zero_grad()
        model(**harm).loss.backward()
        opt.step()
    control = copy.deepcopy(model)
    tar = TARTrainer(
        model=model,
        args=_config(tmp_path, max_steps=8, inner_steps=4, tr_every=2, learning_rate=3e-3),
        harmful_dataset=make_pairs(8),
        processing_class=tiny_tokenizer(),
    )
    assert tar.args.tamper_loss == "dpo"
    tar.train()
    defended, before = (
        _post_attack_preference(model, harm, refusal),
        _post_attack_preference(control, harm, refusal),
    )
    print(f"post-attack preference (nats): before TAR {before:.2f}, after {defended:.2f}")
    assert defended > before + 5.0


def test_too_few_pairs_or_attacker_rows_are_data_errors(tmp_path):
    from immune_trainer.errors import DataError

    with pytest.raises(DataError, match="at least 2 harmful pairs"):
        TARTrainer(
            model=tiny_causal_lm("llama"),
            args=_config(tmp_path),
            harmful_dataset=make_pairs(1),
            processing_class=tiny_tokenizer(),
        )
    trainer = _trainer(tmp_path, tiny_causal_lm("llama"), inner_batch_size=8, dataloader_drop_last=True)
    with pytest.raises(DataError, match="inner_batch_size"):
        trainer.next_adversary_batch()


def test_benign_adversaries_fine_tune_on_the_retain_set(tmp_path):
    with pytest.raises(ConfigError, match="retain_dataset"):
        _trainer(tmp_path, tiny_causal_lm("llama"), benign_adversary_probability=0.35)
    trainer = TARTrainer(
        model=tiny_causal_lm("llama"),
        args=_config(tmp_path, max_steps=6, inner_steps=2, tr_every=2, benign_adversary_probability=0.5),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_benign(8),
        processing_class=tiny_tokenizer(),
    )
    # The draw is seeded by the step and follows the probability.
    draws = [trainer.is_benign_adversary_step(s) for s in range(2000)]
    assert 0.45 < sum(draws) / len(draws) < 0.55
    assert draws[:6] == [trainer.is_benign_adversary_step(s) for s in range(6)]
    benign_rows = {tuple(r) for r in trainer.retain_dataset["input_ids"]}
    adv_rows = {tuple(r) for r in trainer.adversary_dataset["harmful_input_ids"]}
    seen = []
    draw = trainer.next_adversary_batch

    def recording(source="harmful"):
        batch = draw(source)
        rows = {tuple(row[m.bool()].tolist()) for row, m in zip(batch["input_ids"], batch["attention_mask"])}
        seen.append((trainer.state.global_step, source, rows))
        return batch

    trainer.next_adversary_batch = recording
    trainer.train()
    expected = ["benign" if draws[s] else "harmful" for s in range(6)]
    assert [source for _, source, _ in seen] == [e for e in expected for _ in range(2)]  # K = 2 per step
    assert {"benign", "harmful"} <= set(expected)
    for _, source, rows in seen:
        assert rows <= (benign_rows if source == "benign" else adv_rows)
    logged = [h for h in trainer.state.log_history if "loss/benign_adversary" in h]
    assert logged
    # A resumed run (a fresh trainer at step 6) draws the same next batches as the run that went on.
    resumed = TARTrainer(
        model=tiny_causal_lm("llama"),
        args=_config(
            tmp_path / "resumed", max_steps=6, inner_steps=2, tr_every=2, benign_adversary_probability=0.5
        ),
        harmful_dataset=make_pairs(8),
        retain_dataset=make_benign(8),
        processing_class=tiny_tokenizer(),
    )
    resumed.state.global_step = 6
    for source in ("harmful", "benign"):
        for _ in range(3):
            a, b = draw(source), resumed.next_adversary_batch(source)
            assert torch.equal(a["input_ids"], b["input_ids"]), source
