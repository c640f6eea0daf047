"""netsim_paper.config: profile registry, config hashes, cache directories."""

from __future__ import annotations

import types

import pytest

from netsim_paper import config


def test_load_kernel_tour_profiles():
    smoke = config.load("kernel_tour", "smoke")
    paper = config.load("kernel_tour", "paper")
    assert isinstance(smoke, types.SimpleNamespace)
    assert vars(smoke) == config.EXPERIMENTS["kernel_tour"]["smoke"]
    assert vars(paper) == config.EXPERIMENTS["kernel_tour"]["paper"]
    assert paper.n_train > smoke.n_train


def test_load_returns_a_copy():
    cfg = config.load("kernel_tour", "smoke")
    cfg.n_train = 1
    assert config.load("kernel_tour", "smoke").n_train == 256


def test_every_experiment_has_every_profile():
    for name, profiles in config.EXPERIMENTS.items():
        assert set(profiles) == set(config.PROFILES), name
        for profile in config.PROFILES:
            config.config_hash(config.load(name, profile))  # plain JSON values only


@pytest.mark.parametrize("experiment, profile, listed", [
    ("no_such_experiment", "smoke", "kernel_tour"),
    ("kernel_tour", "full", "smoke, paper"),
])
def test_unknown_names_list_valid_ones(experiment, profile, listed):
    with pytest.raises(ValueError, match=listed):
        config.load(experiment, profile)


def test_hash_is_stable_and_order_independent():
    cfg = config.load("kernel_tour", "smoke")
    h = config.config_hash(cfg)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == config.config_hash(dict(reversed(list(config.EXPERIMENTS["kernel_tour"]["smoke"].items()))))
    # pinned literal: if the canonical form ever changes, every existing cache key changes
    assert config.config_hash({"n_train": 256, "epochs": 30, "hidden": 32}) == "812b3301b51012f5"
    assert config.config_hash({"a": (1, 2)}) == config.config_hash({"a": [1, 2]})


def test_hash_changes_with_config():
    base = {"n_train": 256, "epochs": 30, "hidden": 32}
    hashes = {config.config_hash(base)}
    for key, value in [("n_train", 257), ("epochs", 31), ("hidden", 33), ("extra", None)]:
        hashes.add(config.config_hash({**base, key: value}))
    assert len(hashes) == 5
    assert config.config_hash(config.load("kernel_tour", "smoke")) != \
        config.config_hash(config.load("kernel_tour", "paper"))


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


def test_cache_dir_default_is_under_repo_data():
    assert (config.repo_root() / "pyproject.toml").is_file()
