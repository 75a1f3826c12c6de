"""Tests for `selabel_tf.labeller`: Sinkhorn-Knopp self-labelling (paper eqs. 6-8).

Every solution is checked against an independent reference: a plain float64 numpy transcription of
the official update rule (eq. 8), POT's `ot.sinkhorn`, and, for `balance="exact"`, the exact
equipartition optimum from `scipy.optimize.linear_sum_assignment`. The sharded tests need the two
logical CPU devices that `conftest.py` creates.
"""

import itertools
import logging

import numpy as np
import ot
import pytest
import tensorflow as tf
from scipy import optimize
from scipy import special

import selabel_tf

# A float32 solve stopped at tol=1e-6 reproduces the fully converged float64 Q to a relative error of
# at most 3.9e-5 on the problems below (5e-6 on the blocked one); the bound leaves a 2.5x margin.
_FLOAT32_Q_RTOL = 1e-4
# Entries of Q below this fraction of max(Q) are exp(-lots) and carry no information at float32.
_Q_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------------
# Inputs and references.


def _random_log_probs(seed, num_examples, num_clusters, scale=2.0):
  """float64 [N, K] log-softmax of Gaussian logits: moderately confident, roughly balanced."""
  rng = np.random.default_rng(seed)
  return special.log_softmax(scale * rng.normal(size=(num_examples, num_clusters)), axis=1)


def _confident_log_probs(seed, num_examples, num_clusters, boost, imbalance=2.0):
  """float64 [N, K] log-probs of a confident network whose own argmax is unbalanced.

  Each example has a "true" cluster drawn with Dirichlet(imbalance) proportions, and its logits are
  N(0, 1) plus `boost` at that cluster (boost 6 gives p(true) ~ 0.98, a trained network's confidence).
  """
  rng = np.random.default_rng(seed)
  proportions = rng.dirichlet(np.full(num_clusters, imbalance))
  true = rng.choice(num_clusters, size=num_examples, p=proportions)
  logits = rng.normal(size=(num_examples, num_clusters)) + boost * np.eye(num_clusters)[true]
  return special.log_softmax(logits, axis=1)


def _reference_sinkhorn(log_probs, lam, tol=1e-13, max_iters=200_000):
  """Eq. 8 as in the official code, in float64: Q [K, N] = diag(r) P^lam diag(c).

  Iterates r = (1/K) / (P c), c = (1/N) / (r P) until every cluster's mass is within `tol` of 1/K
  (every example's mass is exactly 1/N after the c half-step).
  """
  num_examples, num_clusters = log_probs.shape
  power = np.exp(np.asarray(log_probs, np.float64)).T ** lam  # [K, N]
  row = np.full(num_clusters, 1.0 / num_clusters)
  col = np.full(num_examples, 1.0 / num_examples)
  for _ in range(max_iters):
    row = (1.0 / num_clusters) / (power @ col)
    col = (1.0 / num_examples) / (row @ power)
    q = row[:, None] * power * col[None, :]
    if np.max(np.abs(num_clusters * q.sum(axis=1) - 1)) < tol:
      return q
  raise AssertionError("reference Sinkhorn did not converge")


def _q_of(result, head, log_probs, lam):
  """Q [K, N] from a `LabelAssignment` (its docstring's formula), in float64."""
  log_q = (result.log_row_scale[head][:, None] + lam * np.asarray(log_probs, np.float64).T
           + result.log_col_scale[head][None, :])
  return np.exp(log_q)


def _assert_q_close(q, q_ref, rtol):
  """Relative agreement on every entry of Q that is not negligible."""
  mask = q_ref > _Q_FLOOR * q_ref.max()
  relative = np.abs(q[mask] - q_ref[mask]) / q_ref[mask]
  assert relative.max() <= rtol, f"max relative error of Q {relative.max():.3g} > {rtol:g}"


def _exact_equipartition_optimum(log_probs):
  """min_labels sum_n -log_probs[n, label_n] over labelings with sizes floor(N/K) or ceil(N/K).

  Solved exactly as a square assignment problem. Cluster k owns floor(N/K) "base" slots and one
  "extra" slot. K - N % K dummy rows may only take extra slots (cost 0; base slots are forbidden), so
  in any perfect matching every base slot holds an example and exactly N % K extra slots do: each
  cluster gets floor(N/K) or floor(N/K) + 1 examples, and every such labeling is reachable.

  Returns:
    (optimal cost, labels int [N]).
  """
  num_examples, num_clusters = log_probs.shape
  base, num_large = divmod(num_examples, num_clusters)
  cost = -np.asarray(log_probs, np.float64)
  slot_cluster = np.concatenate([np.repeat(np.arange(num_clusters), base), np.arange(num_clusters)])
  num_dummies = num_clusters - num_large
  matrix = np.concatenate([
      cost[:, slot_cluster],
      np.concatenate([np.full((num_dummies, num_clusters * base), np.inf),
                      np.zeros((num_dummies, num_clusters))], axis=1),
  ])
  rows, cols = optimize.linear_sum_assignment(matrix)
  labels = np.empty(num_examples, np.int64)
  is_example = rows < num_examples
  labels[rows[is_example]] = slot_cluster[cols[is_example]]
  return cost[np.arange(num_examples), labels].sum(), labels


def _labeling_cost(log_probs, labels):
  return -np.asarray(log_probs, np.float64)[np.arange(len(labels)), labels].sum()


def _assert_equipartitioned(labels, num_clusters):
  num_examples = labels.shape[0]
  base, num_large = divmod(num_examples, num_clusters)
  sizes = np.bincount(labels, minlength=num_clusters)
  assert sizes.shape == (num_clusters,)
  assert set(sizes.tolist()) <= {base, base + 1}, sizes
  assert np.sum(sizes == base + 1) == num_large, sizes


def _assert_finite(result):
  assert np.all(result.labels >= 0)
  for head, labels in enumerate(result.labels):
    assert np.all(labels < result.log_row_scale[head].shape[0])
    assert np.all(np.isfinite(result.log_row_scale[head])), result.log_row_scale[head]
    assert np.all(np.isfinite(result.log_col_scale[head]))
  assert np.all(np.isfinite(result.marginal_error)), result.marginal_error


# --------------------------------------------------------------------------------------------------
# 1. Agreement with the official update rule (eq. 8).

_HEAD_SIZES = (3, 7, 10)  # three different K: each head is solved with its own K
_NUM_EXAMPLES = 203  # not divisible by any of them


def _three_heads(seed):
  return [_random_log_probs(seed + t, _NUM_EXAMPLES, k) for t, k in enumerate(_HEAD_SIZES)]


def test_matches_reference_eq8_float64_heads_with_different_k():
  lam = 10.0
  heads = _three_heads(seed=0)

  result = selabel_tf.assign_labels(heads, lam, tol=1e-10, dtype="float64")

  assert result.labels.shape == (len(heads), _NUM_EXAMPLES)
  assert np.all(result.converged)
  for t, head in enumerate(heads):
    q_ref = _reference_sinkhorn(head, lam)
    q = _q_of(result, t, head, lam)
    np.testing.assert_array_equal(result.labels[t], q_ref.argmax(axis=0), err_msg=f"head {t}")
    np.testing.assert_allclose(q, q_ref, rtol=1e-5, atol=0, err_msg=f"head {t}")
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-9)


def test_matches_reference_eq8_float32_heads_with_different_k():
  lam = 10.0
  heads = _three_heads(seed=10)

  result = selabel_tf.assign_labels([h.astype(np.float32) for h in heads], lam, tol=1e-6)

  assert np.all(result.converged), result.marginal_error
  for t, head in enumerate(heads):
    q_ref = _reference_sinkhorn(head.astype(np.float32), lam)
    q = _q_of(result, t, head.astype(np.float32), lam)
    np.testing.assert_array_equal(result.labels[t], q_ref.argmax(axis=0), err_msg=f"head {t}")
    _assert_q_close(q, q_ref, _FLOAT32_Q_RTOL)


@pytest.mark.parametrize("dtype,tol,q_rtol,as_tensor", [("float64", 1e-10, 1e-5, False),
                                                         ("float32", 1e-6, _FLOAT32_Q_RTOL, True)])
def test_matches_reference_eq8_rank3_input(dtype, tol, q_rtol, as_tensor):
  lam = 12.0
  log_probs = np.stack([_random_log_probs(20 + t, 151, 6) for t in range(2)]).astype(dtype)

  result = selabel_tf.assign_labels(tf.constant(log_probs) if as_tensor else log_probs, lam,
                                    tol=tol, dtype=dtype)

  assert result.labels.shape == (2, 151)
  assert np.all(result.converged)
  for t in range(2):
    q_ref = _reference_sinkhorn(log_probs[t], lam)
    np.testing.assert_array_equal(result.labels[t], q_ref.argmax(axis=0))
    _assert_q_close(_q_of(result, t, log_probs[t], lam), q_ref, q_rtol)


def test_repeated_calls_with_other_shapes():
  """Compiled solvers are shared between calls; other N or K must not reuse stale shapes."""
  lam = 10.0
  for num_examples, num_clusters in [(200, 2), (201, 2), (203, 2), (200, 3), (200, 20), (203, 20)]:
    log_probs = _random_log_probs(num_examples + num_clusters, num_examples, num_clusters)
    log_probs = log_probs.astype(np.float32)

    result = selabel_tf.assign_labels([log_probs], lam, tol=1e-6)

    shape = f"N={num_examples}, K={num_clusters}"
    assert result.converged[0], (shape, result.marginal_error)
    q_ref = _reference_sinkhorn(log_probs, lam)
    np.testing.assert_array_equal(result.labels[0], q_ref.argmax(axis=0), err_msg=shape)
    _assert_q_close(_q_of(result, 0, log_probs, lam), q_ref, _FLOAT32_Q_RTOL)


def test_matches_reference_eq8_blocked_pass():
  # Large enough for the CPU solver to split P^lam into several cache-sized blocks (N * K * 4 bytes
  # is 3 MiB, blocks are about 1 MiB) and, with 2 cores, into two chunks run in parallel.
  lam = 8.0
  log_probs = _random_log_probs(30, 6007, 128, scale=1.5)

  result = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=1e-6)

  assert result.converged[0]
  q_ref = _reference_sinkhorn(log_probs.astype(np.float32), lam, tol=1e-12)
  np.testing.assert_array_equal(result.labels[0], q_ref.argmax(axis=0))
  _assert_q_close(_q_of(result, 0, log_probs.astype(np.float32), lam), q_ref, _FLOAT32_Q_RTOL)


# --------------------------------------------------------------------------------------------------
# 2. Agreement with POT.


@pytest.mark.parametrize("num_examples,num_clusters,lam", [(200, 5, 10.0), (157, 12, 20.0)])
def test_matches_pot_sinkhorn(num_examples, num_clusters, lam):
  log_probs = _random_log_probs(40, num_examples, num_clusters)
  plan = ot.sinkhorn(np.full(num_examples, 1.0 / num_examples),
                     np.full(num_clusters, 1.0 / num_clusters),
                     -log_probs, reg=1.0 / lam, numItermax=200_000, stopThr=1e-13)  # [N, K]

  exact = selabel_tf.assign_labels([log_probs], lam, tol=1e-10, dtype="float64")
  default = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=1e-6)

  np.testing.assert_allclose(_q_of(exact, 0, log_probs, lam).T, plan, rtol=1e-5, atol=0)
  np.testing.assert_array_equal(exact.labels[0], plan.argmax(axis=1))
  np.testing.assert_array_equal(default.labels[0], plan.argmax(axis=1))


# --------------------------------------------------------------------------------------------------
# 3. balance="exact" against the exact equipartition optimum.


def test_exact_optimum_reference_against_brute_force():
  """The assignment-problem reference is itself checked by enumeration on tiny problems."""
  for seed, (num_examples, num_clusters) in enumerate([(7, 3), (8, 3), (6, 2), (7, 4)]):
    log_probs = _random_log_probs(seed, num_examples, num_clusters)
    base = num_examples // num_clusters
    best = min(_labeling_cost(log_probs, np.array(labels))
               for labels in itertools.product(range(num_clusters), repeat=num_examples)
               if set(np.bincount(labels, minlength=num_clusters).tolist()) <= {base, base + 1})
    cost, labels = _exact_equipartition_optimum(log_probs)
    _assert_equipartitioned(labels, num_clusters)
    np.testing.assert_allclose(cost, best, rtol=1e-12)
    np.testing.assert_allclose(_labeling_cost(log_probs, labels), cost, rtol=1e-12)


@pytest.mark.parametrize("num_examples,num_clusters,scale,lam", [
    (60, 3, 1.0, 50.0),
    (61, 3, 3.0, 100.0),
    (100, 7, 1.0, 50.0),
    (101, 7, 2.0, 100.0),
    (257, 8, 2.0, 100.0),
    (300, 10, 1.0, 100.0),
    (299, 10, 3.0, 50.0),
])
def test_exact_balance_close_to_lp_optimum(num_examples, num_clusters, scale, lam):
  # Measured on 20 random problems per shape, float32 and float64 alike: at most 0.62% above the
  # optimum. Without the local search after the greedy rounding it was up to 10% above whenever
  # N % K != 0 (seed 111 of the 61 x 3 shape: +6.3%, one example split 0.58 / 0.42 by Q and put in the
  # wrong cluster when deciding which cluster takes the extra slot).
  for seed in (50 + num_examples, 1000, 1001, 1002, 1003):
    log_probs = _random_log_probs(seed, num_examples, num_clusters, scale)
    optimum, _ = _exact_equipartition_optimum(log_probs)

    result = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, balance="exact")

    _assert_equipartitioned(result.labels[0], num_clusters)
    cost = _labeling_cost(log_probs, result.labels[0])
    assert cost >= optimum * (1 - 1e-9)
    assert cost <= optimum * 1.01, (seed, cost, optimum)


@pytest.mark.parametrize("num_examples,num_clusters", [(10, 10), (11, 10), (99, 10), (100, 10),
                                                       (1000, 7), (1001, 1)])
def test_exact_balance_sizes(num_examples, num_clusters):
  # Confident, unbalanced input: the argmax of Q alone would not be an equipartition.
  log_probs = _confident_log_probs(60, num_examples, num_clusters, boost=4.0)

  result = selabel_tf.assign_labels([log_probs.astype(np.float32)], 10.0, balance="exact")

  _assert_equipartitioned(result.labels[0], num_clusters)


# --------------------------------------------------------------------------------------------------
# 4. Balance of the argmax labels.


@pytest.mark.parametrize("lam", [10.0, 25.0])  # 25 is the paper's value
def test_argmax_labels_balanced_on_confident_input(lam):
  num_examples, num_clusters = 1000, 10
  log_probs = _confident_log_probs(2, num_examples, num_clusters, boost=6.0)
  assert np.bincount(log_probs.argmax(axis=1)).max() > 2 * num_examples / num_clusters  # unbalanced

  result = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=1e-3)

  assert result.converged[0]
  assert result.marginal_error[0] <= 1e-3
  sizes = result.cluster_sizes(0)
  # Measured: every size within 2% of N/K at lam=10 and 1% at lam=25 (tol bounds the soft sizes; the
  # argmax sizes follow up to the examples Q splits between clusters).
  np.testing.assert_allclose(sizes, num_examples / num_clusters, rtol=0.05)


def test_float32_matches_float64_on_confident_input():
  # At lam=25 the float64 solution's log alpha spans ~130 nats and r and c together would need more
  # than float32's ~176: the float32 iteration must re-centre its kernel to stay finite (without that
  # it ended at marginal error 1, log alpha -inf and two empty clusters).
  log_probs = _confident_log_probs(2, 1000, 10, boost=6.0)

  single = selabel_tf.assign_labels([log_probs.astype(np.float32)], 25.0, tol=1e-3)
  double = selabel_tf.assign_labels([log_probs], 25.0, tol=1e-3, dtype="float64")

  _assert_finite(single)
  assert single.converged[0] and double.converged[0]
  assert np.mean(single.labels == double.labels) >= 0.99  # measured: identical


# --------------------------------------------------------------------------------------------------
# 5. Warm start.


def test_warm_start_converges_faster_to_the_same_labels():
  lam, tol = 10.0, 1e-4
  log_probs = _confident_log_probs(5, 2000, 20, boost=4.0)
  previous = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=tol)
  noise = np.random.default_rng(6).normal(size=log_probs.shape)
  perturbed = special.log_softmax(log_probs + 0.01 * noise, axis=1).astype(np.float32)

  cold = selabel_tf.assign_labels([perturbed], lam, tol=tol)
  warm = selabel_tf.assign_labels([perturbed], lam, tol=tol, warm_start=previous)
  warm_from_vectors = selabel_tf.assign_labels([perturbed], lam, tol=tol,
                                               warm_start=list(previous.log_row_scale))

  assert cold.converged[0] and warm.converged[0]
  # Measured: 92 iterations warm, 276 cold, identical labels.
  assert warm.iterations[0] < cold.iterations[0], (warm.iterations, cold.iterations)
  assert np.mean(warm.labels == cold.labels) >= 0.99
  np.testing.assert_array_equal(warm_from_vectors.labels, warm.labels)
  np.testing.assert_array_equal(warm_from_vectors.iterations, warm.iterations)


# --------------------------------------------------------------------------------------------------
# 5b. Annealing and over-relaxation: the same solution of eq. 8, in fewer iterations.


def test_annealing_stages_halve_lambda_down_to_two():
  assert selabel_tf.labeller.annealing_stages(25.0) == [3.125, 6.25, 12.5, 25.0]
  assert selabel_tf.labeller.annealing_stages(10.0) == [2.5, 5.0, 10.0]
  assert selabel_tf.labeller.annealing_stages(3.0) == [3.0]


@pytest.mark.parametrize("anneal,over_relaxation", [(True, 1.0), (False, 1.8), (True, 1.8)])
def test_annealing_and_over_relaxation_reach_the_reference_solution(anneal, over_relaxation):
  log_probs = _confident_log_probs(11, 600, 12, boost=5.0)
  q_ref = _reference_sinkhorn(log_probs, 25.0)

  result = selabel_tf.assign_labels([log_probs], 25.0, tol=1e-9, dtype="float64", anneal=anneal,
                                    over_relaxation=over_relaxation, max_iters=100_000)

  assert result.converged[0]
  _assert_q_close(_q_of(result, 0, log_probs, 25.0).T, q_ref.T, 1e-5)
  np.testing.assert_array_equal(result.labels[0], np.argmax(q_ref, axis=0))


def test_annealing_and_over_relaxation_need_fewer_iterations_at_large_lambda():
  log_probs = [_confident_log_probs(12, 4000, 50, boost=4.0).astype(np.float32)]
  plain = selabel_tf.assign_labels(log_probs, 25.0, tol=0.01, anneal=False, over_relaxation=1.0)
  annealed = selabel_tf.assign_labels(log_probs, 25.0, tol=0.01, anneal=True, over_relaxation=1.0)
  both = selabel_tf.assign_labels(log_probs, 25.0, tol=0.01)  # the defaults

  assert plain.converged[0] and annealed.converged[0] and both.converged[0]
  assert annealed.iterations[0] < plain.iterations[0], (annealed.iterations, plain.iterations)
  assert both.iterations[0] < annealed.iterations[0], (both.iterations, annealed.iterations)
  assert np.mean(both.labels == plain.labels) >= 0.99


def test_max_iters_inside_an_annealing_stage_still_labels_at_full_lambda(caplog):
  log_probs = [_confident_log_probs(13, 500, 10, boost=4.0).astype(np.float32)]
  with caplog.at_level(logging.WARNING, logger="selabel_tf.labeller"):
    result = selabel_tf.assign_labels(log_probs, 25.0, tol=1e-6, max_iters=3)

  assert result.iterations[0] == 3 and not result.converged[0]
  _assert_finite(result)
  assert "stopped at max_iters" in caplog.text and "3.125 -> 6.25 -> 12.5 -> 25" in caplog.text
  # log alpha is the full-lambda one: Q of the docstring formula sums to 1.
  q = _q_of(result, 0, log_probs[0], 25.0)
  assert abs(q.sum() - 1) < 1e-3


def test_warm_start_from_converged_solution_stops_at_once():
  log_probs = [_random_log_probs(7, 300, 6).astype(np.float32)]
  first = selabel_tf.assign_labels(log_probs, 10.0, tol=1e-4)

  again = selabel_tf.assign_labels(log_probs, 10.0, tol=1e-4, warm_start=first)

  assert again.iterations[0] <= 2, again.iterations
  np.testing.assert_array_equal(again.labels, first.labels)


# --------------------------------------------------------------------------------------------------
# 6. Numerical safety in float32.


def _dead_cluster_log_probs():
  log_probs = _random_log_probs(8, 400, 8)
  log_probs[:, 3] = -1e4  # no example gives cluster 3 any probability
  return log_probs


def _sprinkled_log_probs():
  log_probs = _random_log_probs(9, 400, 8)
  rng = np.random.default_rng(9)
  log_probs[rng.random(log_probs.shape) < 0.3] = -1e4
  log_probs[np.arange(400), rng.integers(0, 8, size=400)] = -0.5  # every example keeps one cluster
  return log_probs


@pytest.mark.parametrize("name,log_probs,lam", [
    ("dead_cluster", _dead_cluster_log_probs(), 25.0),
    ("lam_100", _random_log_probs(10, 400, 8), 100.0),
    ("entries_of_minus_1e4", _sprinkled_log_probs(), 25.0),
    ("entries_of_minus_1e4_lam_100", _sprinkled_log_probs(), 100.0),
    ("confident_lam_25", _confident_log_probs(2, 1000, 10, boost=6.0), 25.0),
])
def test_float32_stays_finite(name, log_probs, lam):
  del name
  num_clusters = log_probs.shape[1]

  result = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=1e-2)

  _assert_finite(result)
  assert result.converged[0], result.marginal_error
  # Converged: every soft cluster size is within 1% of N/K, so no argmax cluster should be empty.
  assert np.all(result.cluster_sizes(0) > 0), result.cluster_sizes(0)
  exact = selabel_tf.assign_labels([log_probs.astype(np.float32)], lam, tol=1e-2, balance="exact")
  _assert_finite(exact)
  _assert_equipartitioned(exact.labels[0], num_clusters)


def test_dead_cluster_receives_examples():
  result = selabel_tf.assign_labels([_dead_cluster_log_probs().astype(np.float32)], 25.0, tol=1e-2)

  assert result.converged[0]
  # Its soft size is within 1% of N/K = 50; the argmax gives it 48 (measured).
  assert result.cluster_sizes(0)[3] >= 40, result.cluster_sizes(0)


@pytest.mark.parametrize("balance", ["argmax", "exact"])
def test_as_many_examples_as_clusters(balance):
  log_probs = _confident_log_probs(11, 12, 12, boost=5.0, imbalance=0.5)

  result = selabel_tf.assign_labels([log_probs.astype(np.float32)], 25.0, tol=1e-3, balance=balance)

  _assert_finite(result)
  assert result.converged[0], result.marginal_error
  if balance == "exact":
    np.testing.assert_array_equal(np.sort(result.labels[0]), np.arange(12))


def test_single_cluster():
  log_probs = np.zeros((50, 1), np.float32)  # log p = 0: the only cluster has probability 1

  result = selabel_tf.assign_labels([log_probs], 25.0)
  exact = selabel_tf.assign_labels([log_probs - 3.0], 25.0, balance="exact")

  for r in (result, exact):
    _assert_finite(r)
    np.testing.assert_array_equal(r.labels, np.zeros((1, 50)))
    assert r.converged[0]
    np.testing.assert_array_equal(r.cluster_sizes(0), [50])


# --------------------------------------------------------------------------------------------------
# 7. Bad input.


def _head(num_examples=20, num_clusters=4, seed=0):
  return _random_log_probs(seed, num_examples, num_clusters).astype(np.float32)


def _with_bad_entries(value, count):
  head = _head(num_clusters=5, seed=1)
  head.flat[np.random.default_rng(2).choice(head.size, size=count, replace=False)] = value
  return [_head(), head]


@pytest.mark.parametrize("kwargs,message", [
    (dict(log_probs=_with_bad_entries(np.nan, 3)), r"head 1\b.*\b3 non-finite"),
    (dict(log_probs=_with_bad_entries(np.inf, 2)), r"head 1\b.*\b2 non-finite"),
    (dict(log_probs=_with_bad_entries(-np.inf, 4)), r"head 1\b.*\b4 non-finite"),
    (dict(lam=0.0), r"lam"),
    (dict(lam=-1.0), r"lam"),
    (dict(lam=float("nan")), r"lam"),
    (dict(lam=float("inf")), r"lam"),
    (dict(log_probs=[_head(num_examples=5, num_clusters=10)]), r"N=5.*K=10"),
    (dict(log_probs=_head()), r"\[T, N, K\]"),
    (dict(log_probs=[_head(num_examples=20), _head(num_examples=21)]), r"same number of examples"),
    (dict(balance="sorted"), r"balance.*'sorted'"),
    (dict(dtype="float16"), r"dtype.*'float16'"),
    (dict(storage_dtype="int8"), r"storage_dtype.*'int8'"),
    (dict(warm_start=[np.zeros(4)]), r"warm_start"),
    (dict(warm_start=[np.zeros(4), np.zeros(4)]), r"warm_start"),
    (dict(warm_start=[np.zeros(4), np.full(5, np.nan)]), r"warm_start"),
    (dict(over_relaxation=2.0), r"over_relaxation must be in \[1, 2\), got 2.0"),
    (dict(over_relaxation=0.5), r"over_relaxation must be in \[1, 2\), got 0.5"),
])
def test_bad_input_raises(kwargs, message):
  args = dict(log_probs=[_head(), _head(num_clusters=5, seed=1)], lam=10.0)
  args.update(kwargs)

  with pytest.raises(ValueError, match=message):
    selabel_tf.assign_labels(args.pop("log_probs"), args.pop("lam"), **args)


def test_warm_start_from_result_with_other_heads_raises():
  previous = selabel_tf.assign_labels([_head(), _head(num_clusters=5, seed=1)], 10.0)

  with pytest.raises(ValueError, match=r"warm_start"):
    selabel_tf.assign_labels([_head(num_clusters=6)], 10.0, warm_start=previous)


# --------------------------------------------------------------------------------------------------
# 8. Sharded over two replicas.

_DEVICES = ("/cpu:0", "/cpu:1")


def _distribute(strategy, heads, sizes):
  """Per-replica values: replica r holds rows [sum(sizes[:r]), sum(sizes[:r+1])) of every head."""
  bounds = np.cumsum([0, *sizes])
  slices = []
  for replica, device in enumerate(_DEVICES):
    with tf.device(device):
      slices.append(tuple(tf.constant(h[bounds[replica]:bounds[replica + 1]]) for h in heads))
  return strategy.experimental_distribute_values_from_function(
      lambda ctx: slices[ctx.replica_id_in_sync_group])


@pytest.fixture(scope="module")
def strategy(mirrored_strategy):
  assert len(tf.config.list_logical_devices("CPU")) >= 2, "conftest.py should create 2 CPU devices"
  return mirrored_strategy


@pytest.mark.parametrize("sizes", [(301, 299), (299, 301)])
def test_sharded_matches_single_device(strategy, sizes):
  lam, tol = 10.0, 1e-4
  heads = [_random_log_probs(70 + k, sum(sizes), k, scale=3.0).astype(np.float32) for k in (4, 9)]

  full = selabel_tf.assign_labels(heads, lam, tol=tol)
  sharded = selabel_tf.assign_labels_sharded(strategy, _distribute(strategy, heads, sizes), lam,
                                             tol=tol)

  np.testing.assert_array_equal(sharded.labels, full.labels)
  np.testing.assert_array_equal(sharded.iterations, full.iterations)
  assert np.all(sharded.converged)
  for t in range(len(heads)):
    np.testing.assert_allclose(sharded.log_row_scale[t], full.log_row_scale[t], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(sharded.log_col_scale[t], full.log_col_scale[t], rtol=1e-4, atol=1e-4)


def test_sharded_warm_start(strategy):
  heads = [_random_log_probs(80, 400, 5).astype(np.float32)]
  values = _distribute(strategy, heads, (200, 200))
  first = selabel_tf.assign_labels_sharded(strategy, values, 10.0, tol=1e-4)

  again = selabel_tf.assign_labels_sharded(strategy, values, 10.0, tol=1e-4, warm_start=first)

  assert again.iterations[0] <= 2 < first.iterations[0]
  np.testing.assert_array_equal(again.labels, first.labels)


def test_sharded_with_a_shard_smaller_than_k(strategy):
  # Only the total N must be >= K; a replica may hold fewer examples than there are clusters.
  heads = [_random_log_probs(90, 600, 9).astype(np.float32)]

  full = selabel_tf.assign_labels(heads, 10.0, tol=1e-4)
  sharded = selabel_tf.assign_labels_sharded(strategy, _distribute(strategy, heads, (5, 595)), 10.0,
                                             tol=1e-4)

  np.testing.assert_array_equal(sharded.labels, full.labels)


def test_sharded_rejects_non_finite_naming_head_and_count(strategy):
  heads = [_head(num_examples=40), _head(num_examples=40, num_clusters=5, seed=1)]
  heads[1][[3, 25, 33], 2] = np.nan  # one in replica 0's half, two in replica 1's

  with pytest.raises(ValueError, match=r"head 1\b.*\b3 non-finite"):
    selabel_tf.assign_labels_sharded(strategy, _distribute(strategy, heads, (20, 20)), 10.0)


# --------------------------------------------------------------------------------------------------
# 9. Narrow storage.


@pytest.mark.parametrize("storage_dtype", ["float16", "bfloat16"])
def test_narrow_storage_agrees_with_float32(storage_dtype):
  lam, tol = 10.0, 1e-3
  log_probs = [_confident_log_probs(12, 3000, 30, boost=3.0).astype(np.float32)]

  wide = selabel_tf.assign_labels(log_probs, lam, tol=tol)
  narrow = selabel_tf.assign_labels(log_probs, lam, tol=tol, storage_dtype=storage_dtype)

  assert narrow.converged[0]
  # Measured: identical labels with either storage dtype (the bounds leave room for rounding flips).
  agreement = np.mean(narrow.labels == wide.labels)
  assert agreement >= {"float16": 0.99, "bfloat16": 0.97}[storage_dtype], agreement


# --------------------------------------------------------------------------------------------------
# 10. The result's properties.


def test_cluster_sizes_and_converged_are_consistent(caplog):
  heads = [_random_log_probs(13, 250, 4).astype(np.float32),
           _random_log_probs(14, 250, 11).astype(np.float32)]

  result = selabel_tf.assign_labels(heads, 10.0, tol=1e-3)
  with caplog.at_level(logging.WARNING, logger="selabel_tf.labeller"):
    stopped = selabel_tf.assign_labels(heads, 10.0, tol=1e-3, max_iters=2)

  for t, head in enumerate(heads):
    sizes = result.cluster_sizes(t)
    assert sizes.shape == (head.shape[1],)
    np.testing.assert_array_equal(sizes, np.bincount(result.labels[t], minlength=head.shape[1]))
    assert sizes.sum() == 250
  np.testing.assert_array_equal(result.cluster_sizes(), result.cluster_sizes(0))
  assert result.labels.dtype == np.int64
  assert result.tol == 1e-3
  np.testing.assert_array_equal(result.converged, result.marginal_error <= result.tol)
  assert np.all(result.converged) and np.all(result.iterations > 2)

  np.testing.assert_array_equal(stopped.iterations, [2, 2])
  np.testing.assert_array_equal(stopped.converged, [False, False])
  assert np.all(stopped.marginal_error > 1e-3)
  assert "max_iters" in caplog.text


# balance="sample": labels drawn from q(k|n) = N Q[n, k].


def _prototype_log_probs(seed, copies, num_clusters):
  """Five distinct rows, each repeated `copies` times (interleaved): examples of one prototype share
  q(k|n), so its empirical label frequencies estimate that distribution."""
  prototypes = _random_log_probs(seed, 5, num_clusters, scale=1.5)
  return np.tile(prototypes, (copies, 1)), np.tile(np.arange(5), copies)


def test_sampled_label_frequencies_match_the_reference_q():
  copies, num_clusters, lam = 3000, 4, 2.0
  log_probs, prototype = _prototype_log_probs(5, copies, num_clusters)
  q_ref = _reference_sinkhorn(log_probs, lam, tol=1e-10)  # [K, N]
  result = selabel_tf.assign_labels([log_probs], lam, tol=1e-6, dtype="float64", balance="sample",
                                    seed=3)

  for p in range(5):
    expected = q_ref[:, prototype == p][:, 0] * len(prototype)  # q(k|n) of the prototype, sums to 1
    counts = np.bincount(result.labels[0][prototype == p], minlength=num_clusters)
    sigma = np.sqrt(copies * expected * (1 - expected))
    assert np.all(np.abs(counts - copies * expected) <= 5 * sigma + 1), (p, counts, copies * expected)
  # The argmax would give each prototype a single cluster; sampling spreads every prototype out.
  argmax = selabel_tf.assign_labels([log_probs], lam, tol=1e-6, dtype="float64")
  assert all(len(np.unique(argmax.labels[0][prototype == p])) == 1 for p in range(5))


def test_sampling_splits_a_flat_q_where_the_argmax_collapses():
  # Identical rows (an untrained network's nearly flat predictions, at the extreme): Q = 1/(NK)
  # everywhere. Its argmax puts every example in one cluster; samples are Binomial(N, 1/K) per cluster.
  num_examples, num_clusters = 20000, 10
  log_probs = np.tile(_random_log_probs(6, 1, num_clusters), (num_examples, 1)).astype(np.float32)

  argmax = selabel_tf.assign_labels([log_probs], 10.0)
  sample = selabel_tf.assign_labels([log_probs], 10.0, balance="sample")

  assert argmax.cluster_sizes().max() == num_examples
  sigma = np.sqrt(num_examples * 0.1 * 0.9)
  assert np.all(np.abs(sample.cluster_sizes() - num_examples / num_clusters) <= 5 * sigma)


def test_sampling_is_seeded():
  heads = [_random_log_probs(7, 500, 6).astype(np.float32), _random_log_probs(8, 500, 6).astype(np.float32)]

  first = selabel_tf.assign_labels(heads, 10.0, balance="sample", seed=1)
  again = selabel_tf.assign_labels(heads, 10.0, balance="sample", seed=1)
  other = selabel_tf.assign_labels(heads, 10.0, balance="sample", seed=2)

  np.testing.assert_array_equal(first.labels, again.labels)
  assert np.mean(first.labels != other.labels) > 0.02  # these predictions are confident
  np.testing.assert_array_equal(first.log_row_scale[0], other.log_row_scale[0])  # the same Q


def test_sharded_sampling_matches_the_reference_q(strategy):
  copies, num_clusters, lam = 1500, 4, 2.0
  log_probs, prototype = _prototype_log_probs(9, copies, num_clusters)
  q_ref = _reference_sinkhorn(log_probs, lam, tol=1e-10)
  half = len(prototype) // 2
  values = _distribute(strategy, [log_probs.astype(np.float32)], (half, len(prototype) - half))

  result = selabel_tf.assign_labels_sharded(strategy, values, lam, tol=1e-5, balance="sample")

  for p in range(5):
    expected = q_ref[:, prototype == p][:, 0] * len(prototype)
    counts = np.bincount(result.labels[0][prototype == p], minlength=num_clusters)
    sigma = np.sqrt(copies * expected * (1 - expected))
    assert np.all(np.abs(counts - copies * expected) <= 5 * sigma + 1), (p, counts, copies * expected)
  # The two replicas draw from different streams: their halves are not copies of each other.
  assert np.mean(result.labels[0][:half] != result.labels[0][half:2 * half]) > 0.3


def test_sharded_rejects_exact_balance(strategy):
  values = _distribute(strategy, [_head(num_examples=40)], (20, 20))
  with pytest.raises(ValueError, match="balance='exact' is single-device only"):
    selabel_tf.assign_labels_sharded(strategy, values, 10.0, balance="exact")


@pytest.mark.parametrize("num_examples,num_clusters,storage,device,rows_per_read", [
    (1_281_167, 3000, "bfloat16", "CPU", 8192),   # ImageNet's shape: 115 chunks of 2 parts
    (1_281_167, 3000, "float32", "GPU", 8192),
    (100_003, 64, "float32", "CPU", None),
    (100_003, 64, "float16", "CPU", 1000),
    (7, 3, "float32", "CPU", 2),
])
def test_plan_chunks_gives_equal_chunks_read_in_equal_parts(num_examples, num_clusters, storage, device,
                                                            rows_per_read):
  """Every chunk but the last has the same rows, and every chunk is read in parts of the same rows (but
  the last chunk's last part), at most rows_per_read: a freed chunk's or part's room fits the next one."""
  bounds, _, part_rows = selabel_tf.sinkhorn.plan_chunks(num_examples, num_clusters, storage, device,
                                                         rows_per_read)
  sizes = np.diff(bounds)
  assert bounds[0] == 0 and bounds[-1] == num_examples and (sizes > 0).all()
  assert len(set(sizes[:-1].tolist())) <= 1 and sizes[-1] <= sizes[0]
  assert all(size % part_rows == 0 for size in sizes[:-1]) and part_rows <= sizes[0]
  if rows_per_read is None:
    assert part_rows == sizes[0]
  else:
    assert part_rows <= rows_per_read
  itemsize = np.dtype(storage).itemsize
  row_bytes = num_clusters * itemsize
  assert sizes[0] * row_bytes <= selabel_tf.sinkhorn._CHUNK_BYTES + part_rows * row_bytes
