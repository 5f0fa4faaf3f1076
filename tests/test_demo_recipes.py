"""The demo's defense recipes apply only to the defense they were made for: a leaderboard run through the
demo trains every other defense with its own defaults (Booster's alpha is a step size, not an ascent
weight), and an option given on the command line applies to every defense named."""

from immune_trainer.defenses import get_defense
from immune_trainer.demo import DEFENSE_RECIPES, DemoConfig, build_defense_config, defense_recipe


def _config(name, tmp_path, **demo):
    spec = get_defense(name)
    return build_defense_config(spec, DemoConfig(**demo), str(tmp_path / name))


def test_the_recipe_goes_only_to_its_own_defense(tmp_path):
    ga = _config("gradient_ascent", tmp_path)
    assert (ga.alpha, ga.retain_weight) == (3.55, 5.89) == tuple(DEFENSE_RECIPES["gradient_ascent"].values())
    assert _config("repnoise", tmp_path).layer_stride == 5
    own = {name: get_defense(name).config_class(output_dir=str(tmp_path / "own"), report_to="none")
           for name in ("booster", "ctrap", "crl", "seam", "rerouting", "repnoise", "sdd")}
    for name, default in own.items():
        got = _config(name, tmp_path)
        for key in ("alpha", "beta", "retain_weight"):
            if hasattr(default, key):
                assert getattr(got, key) == getattr(default, key), (name, key)
    # the budget is the demo's for every defense
    assert _config("booster", tmp_path).max_steps == DemoConfig().defense_steps


def test_an_option_set_on_the_command_line_applies_to_every_defense(tmp_path):
    assert _config("booster", tmp_path, alpha=0.3).alpha == 0.3
    assert _config("gradient_ascent", tmp_path, alpha=2.0).alpha == 2.0
    assert defense_recipe("gradient_ascent", DemoConfig(retain_weight=1.0)) == {"alpha": 3.55, "retain_weight": 1.0}
    assert defense_recipe("booster", DemoConfig()) == {}
