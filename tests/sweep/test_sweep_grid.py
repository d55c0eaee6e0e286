"""megatron_rl/sweep/grid.py: --grid options, the cartesian product x seeds, run names."""

import pytest

from megatron_rl.sweep.grid import (
    MAX_NAME_LENGTH,
    GridAxis,
    GridError,
    RunPoint,
    expand_grid,
    parse_grid_option,
    run_name,
    split_top_level,
)


def test_grid_option_keeps_the_value_texts():
    assert parse_grid_option("algorithm.kpo.q=1e-4, 1e-3") == GridAxis("algorithm.kpo.q", ("1e-4", "1e-3"))


def test_commas_inside_brackets_braces_and_quotes_do_not_split():
    assert split_top_level("[1, 2],{a: 1, b: 2},'x,y',\"p,q\",null") == [
        "[1, 2]", "{a: 1, b: 2}", "'x,y'", '"p,q"', "null"]


@pytest.mark.parametrize(("option", "message"), [
    ("algorithm.loss", "--grid 'algorithm.loss': expected KEY=V1,V2,... with a dotted config key"),
    ("algorithm..loss=kpo", "--grid 'algorithm..loss=kpo': expected KEY=V1,V2,... with a dotted config key"),
    ("algorithm.loss=kpo,,vespo", "--grid 'algorithm.loss=kpo,,vespo': empty value (values are separated by "
                                  "single commas)"),
    ("algorithm.loss=", "--grid 'algorithm.loss=': empty value (values are separated by single commas)"),
    ("algorithm.loss=kpo,ppo,kpo", "--grid 'algorithm.loss=kpo,ppo,kpo': the value(s) kpo appear more than once"),
])
def test_malformed_grid_options_are_named(option, message):
    with pytest.raises(GridError) as error:
        parse_grid_option(option)
    assert str(error.value) == message


def test_expansion_is_the_cartesian_product_times_seeds_seed_major():
    axes = [parse_grid_option("algorithm.loss=kpo,vespo"), parse_grid_option("rollout.max_staleness=0,1,2")]
    runs = expand_grid(axes, seeds=2)
    assert len(runs) == 12
    assert [run.seed for run in runs] == [0] * 6 + [1] * 6
    assert [run.point for run in runs[:6]] == [
        (("algorithm.loss", loss), ("rollout.max_staleness", staleness))
        for loss in ("kpo", "vespo") for staleness in ("0", "1", "2")]
    assert runs[7].overrides() == ["algorithm.loss=kpo", "rollout.max_staleness=1", "data.seed=1"]
    assert runs[7].name == "algorithm.loss=kpo__rollout.max_staleness=1__seed=1"
    assert runs[7].point_label == "algorithm.loss=kpo rollout.max_staleness=1"


def test_no_grid_is_one_point_per_seed():
    runs = expand_grid([], seeds=3)
    assert [(run.point, run.seed, run.name) for run in runs] == [((), s, f"seed={s}") for s in range(3)]
    assert runs[0].point_label == "(no grid)"


def test_names_are_filesystem_safe_and_stable():
    point = (("algorithm.corrections.tis", "{threshold: 2.0, mode: token}"), ("optimizer.lr", "1e-4"))
    name = run_name(point, 3)
    assert name == "algorithm.corrections.tis=_threshold_2.0_mode_token___optimizer.lr=1e-4__seed=3"
    assert run_name(point, 3) == name and "/" not in run_name((("a.b", "x/../y"),), 0)


def test_long_names_are_cut_and_end_in_a_hash_of_the_whole_name():
    long_a, long_b = (((f"k{i}.key", "v" * 30) for i in range(8)), ((f"k{i}.key", "v" * 30) for i in range(9)))
    name_a, name_b = run_name(tuple(long_a), 0), run_name(tuple(long_b), 0)
    assert len(name_a) == len(name_b) == MAX_NAME_LENGTH
    assert name_a != name_b and name_a[:150] == name_b[:150]


def test_values_that_map_to_one_name_are_refused():
    with pytest.raises(GridError, match="the grid points 'data.system_prompt=a b' and 'data.system_prompt=a:b' have "
                                        "the same directory name 'data.system_prompt=a_b__seed=0'"):
        expand_grid([parse_grid_option("data.system_prompt=a b,a:b")], seeds=1)


def test_a_key_in_two_grid_options_the_seed_key_and_zero_seeds_are_refused():
    with pytest.raises(GridError, match=r"the key\(s\) algorithm.loss are given by more than one --grid option"):
        expand_grid([parse_grid_option("algorithm.loss=kpo"), parse_grid_option("algorithm.loss=ppo")], seeds=1)
    with pytest.raises(GridError, match=r"--grid data.seed: the seeds are set by --seeds N \(runs seed 0..N-1\)"):
        expand_grid([parse_grid_option("data.seed=1,2")], seeds=1)
    with pytest.raises(GridError, match="--seeds: expected an integer >= 1, got 0"):
        expand_grid([], seeds=0)


def test_run_point_overrides_put_the_seed_last():
    assert RunPoint((("a.b", "1"),), 4).overrides() == ["a.b=1", "data.seed=4"]


def test_a_named_variant_axis_expands_each_value_to_its_overrides():
    variants = GridAxis("variant", ("clip", "masked"), (("algorithm.loss=ppo", "algorithm.ppo.eps_high=0.28"),
                                                        ("algorithm.loss=trm",)))
    runs = expand_grid([variants, parse_grid_option("data.num_mini_batches=1,4")], seeds=1)
    assert [run.name for run in runs] == ["variant=clip__data.num_mini_batches=1__seed=0",
                                          "variant=clip__data.num_mini_batches=4__seed=0",
                                          "variant=masked__data.num_mini_batches=1__seed=0",
                                          "variant=masked__data.num_mini_batches=4__seed=0"]
    assert runs[1].overrides() == ["algorithm.loss=ppo", "algorithm.ppo.eps_high=0.28", "data.num_mini_batches=4",
                                   "data.seed=0"]
    assert runs[2].point == (("variant", "masked"), ("data.num_mini_batches", "1"))
    assert variants.config_keys() == ("algorithm.loss", "algorithm.ppo.eps_high")


def test_a_variant_axis_needs_one_override_set_per_value_and_may_not_set_the_seed():
    with pytest.raises(GridError, match="axis variant: 2 values but 1 override sets"):
        GridAxis("variant", ("a", "b"), (("algorithm.loss=ppo",),))
    with pytest.raises(GridError, match="--grid data.seed: the seeds are set by --seeds N"):
        expand_grid([GridAxis("variant", ("a",), (("data.seed=3",),))], seeds=1)
