"""netsim_paper.config: the typed profile registry, config hashes (with recipe versions), cache directories."""

from __future__ import annotations

import dataclasses

import pytest

from netsim_paper import config
from netsim_paper.registration.config import RegistrationConfig
from netsim_paper.sinusoid.config import KernelTourConfig


def test_load_kernel_tour_profiles():
    smoke = config.load("kernel_tour", "smoke")
    paper = config.load("kernel_tour", "paper")
    assert smoke is KernelTourConfig.SMOKE and paper is KernelTourConfig.PAPER
    assert (smoke.n_train, smoke.epochs, smoke.hidden) == (256, 150, 32)
    assert paper.n_train > smoke.n_train


def test_configs_are_immutable_and_variants_come_from_replace():
    cfg = config.load("registration", "smoke")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 1
    variant = dataclasses.replace(cfg, seed=1)
    assert variant.seed == 1 and config.load("registration", "smoke").seed == 0
    assert isinstance(variant, RegistrationConfig)
    with pytest.raises(TypeError):  # misspelled fields are not silently added
        dataclasses.replace(cfg, sed=1)


@pytest.mark.parametrize("experiment", sorted(config.EXPERIMENTS))
def test_every_experiment_has_every_profile_of_plain_immutable_values(experiment):
    cls = config.EXPERIMENTS[experiment]
    assert isinstance(cls.RECIPE, int) and "RECIPE" not in {f.name for f in dataclasses.fields(cls)}
    for profile in config.PROFILES:
        cfg = config.load(experiment, profile)
        assert type(cfg) is cls
        config.config_hash(cfg)  # plain JSON values only
        hash(cfg)  # tuples, not lists, all the way down
    assert config.load(experiment, "smoke") != config.load(experiment, "paper")


@pytest.mark.parametrize("experiment, profile, listed", [
    ("no_such_experiment", "smoke", "kernel_tour"),
    ("kernel_tour", "full", "smoke, paper"),
])
def test_unknown_names_list_valid_ones(experiment, profile, listed):
    with pytest.raises(ValueError, match=listed):
        config.load(experiment, profile)


def test_hash_is_stable_and_order_independent():
    h = config.config_hash({"n_train": 256, "epochs": 30, "hidden": 32})
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == config.config_hash({"hidden": 32, "epochs": 30, "n_train": 256})
    # pinned literal: if the canonical form ever changes, every existing cache key changes
    assert h == "812b3301b51012f5"
    assert config.config_hash({"a": (1, 2)}) == config.config_hash({"a": [1, 2]})


def test_hash_changes_with_config():
    base = {"n_train": 256, "epochs": 30, "hidden": 32}
    hashes = {config.config_hash(base)}
    for key, value in [("n_train", 257), ("epochs", 31), ("hidden", 33), ("extra", None)]:
        hashes.add(config.config_hash({**base, key: value}))
    assert len(hashes) == 5
    smoke = config.load("kernel_tour", "smoke")
    assert config.config_hash(smoke) != config.config_hash(config.load("kernel_tour", "paper"))
    assert config.config_hash(smoke) != config.config_hash(dataclasses.replace(smoke, epochs=151))


def test_hash_covers_the_recipe_version(monkeypatch, tmp_path):
    cfg = config.load("registration", "smoke")
    before_hash = config.config_hash(cfg)
    before_dir = config.cache_dir("registration", "smoke", cfg, root=tmp_path)
    assert before_hash == config.config_hash(config.load("registration", "smoke"))
    monkeypatch.setattr(RegistrationConfig, "RECIPE", RegistrationConfig.RECIPE + 1)
    assert config.config_hash(cfg) != before_hash
    assert config.cache_dir("registration", "smoke", cfg, root=tmp_path) != before_dir
    # the same values without the config class hash differently: the recipe is part of the key
    assert config.config_hash(dataclasses.asdict(cfg)) != config.config_hash(cfg)


def test_hash_rejects_non_json_values():
    with pytest.raises(TypeError):
        config.config_hash({"f": object()})
    with pytest.raises(ValueError):
        config.config_hash({"x": float("nan")})


def test_cache_dir_layout(tmp_path):
    cfg = config.load("kernel_tour", "smoke")
    path = config.cache_dir("kernel_tour", "smoke", cfg, root=tmp_path)
    assert path == tmp_path / "cache" / "smoke" / "kernel_tour" / config.config_hash(cfg)
    assert path.is_dir()
    other = config.cache_dir("kernel_tour", "paper", config.load("kernel_tour", "paper"), root=tmp_path)
    assert other != path
    with pytest.raises(ValueError):
        config.cache_dir("nope", "smoke", cfg, root=tmp_path)


def test_cache_dir_needs_the_experiments_config_class(tmp_path):
    cfg = config.load("kernel_tour", "smoke")
    with pytest.raises(TypeError, match="RegistrationConfig"):
        config.cache_dir("registration", "smoke", cfg, root=tmp_path)
    with pytest.raises(TypeError, match="KernelTourConfig"):
        config.cache_dir("kernel_tour", "smoke", dataclasses.asdict(cfg), root=tmp_path)


def test_cache_dir_default_is_under_repo_data():
    assert (config.repo_root() / "run_all.sh").is_file()
