"""The vectorised MNIST speed-up trainer against a plain per-run autograd loop."""

import numpy as np
import pytest
import torch

from netsim import enforce, outputs
from netsim_paper import cache
from netsim_paper.mnist import speedup


def _data(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.arange(n) % 10


def test_cnn_has_the_authors_parameter_count():
    assert sum(p.numel() for p in speedup.mnist_cnn(0).parameters()) == 317_069


def test_plan_is_paired_and_one_class_per_step():
    images, labels = _data()
    plan = speedup.make_plan(labels, 50, runs=3, steps=4, n_b=2, eval_steps=[0, 2, 4], eval_size=10, seed=1)
    assert plan.batch_indices.shape == (4, 3, 2, 2) and plan.eval_indices.shape == (3, 3, 10)
    assert (labels[torch.from_numpy(plan.batch_indices)] == torch.from_numpy(plan.classes)[..., None, None]).all()
    again = speedup.make_plan(labels, 50, runs=3, steps=4, n_b=2, eval_steps=[0, 2, 4], eval_size=10, seed=1)
    np.testing.assert_array_equal(plan.batch_indices, again.batch_indices)


def _reference_run(arm, plan, r, images, labels, test_images, test_labels, lr=1e-3):
    """One run, one step at a time, with ordinary autograd (create_graph) and torch.optim.Adam."""
    net = speedup.mnist_cnn(int(plan.init_seeds[r]))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses, acc = [], []
    n_b = plan.batch_indices.shape[-1]
    for step in range(plan.batch_indices.shape[0]):
        idx = torch.from_numpy(plan.batch_indices[step, r])
        y = torch.full((n_b,), int(plan.classes[step, r]))
        x1, x2 = images[idx[0]], images[idx[1]]
        opt.zero_grad()
        loss = (torch.nn.functional.cross_entropy(net(x1), y) + torch.nn.functional.cross_entropy(net(x2), y)) / 2
        if arm != "ce":
            loss = loss + speedup.criterion_weight(arm, n_b) * enforce.group_loss(
                net, x1, x2, criterion=arm, output_fn=outputs.class_vs_rest, targets1=y, targets2=y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    idx = torch.from_numpy(plan.eval_indices[-1, r])
    with torch.no_grad():
        acc = (net(test_images[idx]).argmax(1) == test_labels[idx]).double().mean().item()
    return np.array(losses), acc, net


@pytest.mark.parametrize("arm, n_b", [("ce", 1), ("paper", 1), ("neg_cos", 2), ("pos_cos", 2)])
def test_vectorised_arm_equals_per_run_loop(arm, n_b):
    images, labels = _data()
    test_images, test_labels = _data(60, seed=1)
    plan = speedup.make_plan(labels, 60, runs=2, steps=3, n_b=n_b, eval_steps=[3], eval_size=20, seed=2)
    out = speedup.train_arm(arm, plan, images, labels, test_images, test_labels, progress=False)
    for r in range(2):
        losses, acc, net = _reference_run(arm, plan, r, images, labels, test_images, test_labels)
        np.testing.assert_allclose(out["loss"][:, r], losses, rtol=1e-4, atol=1e-5)
        assert out["accuracy"][r, 0] == pytest.approx(acc)
        # Adam divides each step by sqrt(v): for an element whose gradient is ~0, float rounding
        # (batched vs single convolutions) changes its step by up to ~lr. Such elements are rare;
        # every other one agrees to 1e-4.
        for name, p in net.named_parameters():
            diff = (out["params"][name][r] - p.detach()).abs()
            assert diff.max() <= 3 * 1e-3, name                     # 3 steps of at most ~lr each
            assert (diff > 1e-4 + 1e-4 * p.detach().abs()).double().mean() < 1e-3, name


def test_steps_to_reach_interpolates():
    steps = np.array([0, 10, 20])
    assert speedup.steps_to_reach(np.array([0.1, 0.4, 0.6]), steps, 0.5) == pytest.approx(15)
    assert speedup.steps_to_reach(np.array([0.1, 0.4, 0.45]), steps, 0.5) is None
    assert speedup.steps_to_reach(np.array([0.6, 0.7, 0.8]), steps, 0.5) == 0


def test_unknown_arm_is_an_error():
    images, labels = _data()
    plan = speedup.make_plan(labels, 60, runs=1, steps=1, n_b=1, eval_steps=[1], eval_size=5)
    with pytest.raises(ValueError, match="arm"):
        speedup.train_arm("cos", plan, images, labels, images, labels, progress=False)


def test_eval_schedule_is_dense_early_then_sparse():
    assert speedup.eval_schedule(150, early_every=2, early_until=60, late_every=10) == \
        list(range(0, 61, 2)) + list(range(70, 151, 10))
    assert speedup.eval_schedule(40, early_every=4, early_until=40, late_every=10) == list(range(0, 41, 4))
    with pytest.raises(ValueError, match="early_until"):
        speedup.eval_schedule(10, early_every=2, early_until=20, late_every=5)
    with pytest.raises(ValueError, match="intervals"):
        speedup.eval_schedule(10, early_every=0, early_until=4, late_every=5)


def test_train_arms_equals_train_arm_per_arm_and_round_trips_bit_for_bit(tmp_path):
    images, labels = _data()
    test_images, test_labels = _data(60, seed=1)
    plan = speedup.make_plan(labels, 60, runs=2, steps=2, n_b=1, eval_steps=[0, 2], eval_size=20, seed=3)
    result = speedup.train_arms(["ce", "pos_cos"], plan, images, labels, test_images, test_labels, progress=False)
    assert list(result.accuracy) == ["ce", "pos_cos"] and set(result.seconds) == {"ce", "pos_cos"}
    np.testing.assert_array_equal(result.eval_steps, plan.eval_steps)
    for arm in ("ce", "pos_cos"):
        alone = speedup.train_arm(arm, plan, images, labels, test_images, test_labels, progress=False)
        np.testing.assert_array_equal(result.accuracy[arm], alone["accuracy"])

    cache.save_atomic(result.to_plain(), tmp_path / "arms.pt")          # refuses anything but plain data
    back = speedup.ArmsResult.from_plain(cache.load(tmp_path / "arms.pt"))
    assert back.eval_steps.dtype == result.eval_steps.dtype
    np.testing.assert_array_equal(back.eval_steps, result.eval_steps)
    for arm, acc in result.accuracy.items():
        assert back.accuracy[arm].dtype == acc.dtype and np.array_equal(back.accuracy[arm], acc)
    assert back.seconds == result.seconds


@pytest.mark.parametrize("accuracy, match", [(np.full((2, 3), 1.5), "in \\[0, 1\\]"),
                                             (np.full((2, 3), np.nan), "finite"),
                                             (np.zeros((2, 4)), "eval steps")])
def test_arms_result_refuses_impossible_accuracies(accuracy, match):
    with pytest.raises(ValueError, match=match):
        speedup.ArmsResult(np.arange(3), {"ce": accuracy}, {"ce": 1.0})
