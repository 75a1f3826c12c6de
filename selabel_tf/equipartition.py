"""Rounding a Sinkhorn solution Q to hard labels that split the examples exactly equally.

The paper takes the argmax of Q per example, which is only approximately balanced. `round_to_equipartition`
gives every cluster floor(N/K) or ceil(N/K) examples (paper footnote 2: N mod K clusters get one more).

It runs deferred acceptance on the conditional assignment probabilities q(k|n) = N Q[n, k]: each
unassigned example proposes to its most probable cluster that is still open; each cluster keeps the
proposals with the highest q(k|n) up to its remaining capacity and closes when full. Because Q already
solves the (regularised) transport problem, most examples are accepted by their first choice, and the
total cost stays close to the exact optimum. Greedy rounding can still misplace an example when it
decides which clusters take the N mod K extra slots, so `improve_by_local_search` then applies moves
(an example from a cluster at ceil(N/K) to one at floor(N/K)) and pairwise swaps that lower the
labelling cost sum_n -log p(label_n | x_n), until none is left (tests compare with the exact LP optimum).
All of it is bookkeeping over [N]-sized index arrays on the host with numpy; the [N, K] scores stay on
the device and only the top few candidates per example are fetched.
"""

import numpy as np


def capacities(num_examples, num_clusters):
  """(base, num_large): every cluster holds `base` or `base + 1`; exactly `num_large` hold base + 1."""
  return num_examples // num_clusters, num_examples % num_clusters


def improve_by_local_search(labels, candidate_clusters, candidate_log_probs, label_log_probs,
                            num_clusters, max_rounds=100):
  """Lowers sum_n -log p(label_n) by cost-reducing moves and swaps that keep the sizes valid.

  Args:
    labels: int [N], an equipartition (sizes floor(N/K) or ceil(N/K)); updated copy returned.
    candidate_clusters: int [N, m], clusters each example may move to.
    candidate_log_probs: float [N, m], log p of those clusters.
    label_log_probs: float [N], log p of each example's current label.
    num_clusters: K.
    max_rounds: bound on the rounds of simultaneous non-conflicting improvements.

  Returns:
    int64 [N] labels with the same multiset of cluster sizes and no larger cost.
  """
  labels = np.array(labels, np.int64)
  current = np.maximum(np.asarray(label_log_probs, np.float64), -1e30)
  cand_lp = np.maximum(np.asarray(candidate_log_probs, np.float64), -1e30)
  cand = np.asarray(candidate_clusters, np.int64)
  base, num_large = capacities(labels.size, num_clusters)
  eps = 1e-9
  for _ in range(max_rounds):
    # Cost change of moving example n to its candidate j: -log p(new) + log p(current).
    delta = current[:, None] - cand_lp
    rows, cols = np.nonzero((cand != labels[:, None]) & (delta < 0))
    if rows.size == 0:
      break
    changed = False
    used = np.zeros(labels.size, bool)
    # Moves from a cluster at ceil to one at floor keep exactly N mod K clusters at ceil.
    if num_large:
      counts = np.bincount(labels, minlength=num_clusters)
      for i in np.argsort(delta[rows, cols], kind="stable"):
        n, j = rows[i], cols[i]
        src, dst = labels[n], cand[n, j]
        if used[n] or counts[src] != base + 1 or counts[dst] != base:
          continue
        labels[n], current[n], used[n] = dst, cand_lp[n, j], True
        counts[src] -= 1
        counts[dst] += 1
        changed = True
    # Swaps: the best example of a -> b with the best of b -> a, when the pair lowers the cost.
    d = current[:, None] - cand_lp
    rows, cols = np.nonzero((cand != labels[:, None]) & ~used[:, None])
    if rows.size:
      key = labels[rows] * num_clusters + cand[rows, cols]
      order = np.lexsort((d[rows, cols], key))
      key, rows, cols = key[order], rows[order], cols[order]
      first = np.concatenate([[True], key[1:] != key[:-1]])
      best_key, best_row, best_col = key[first], rows[first], cols[first]
      best_delta = d[best_row, best_col]
      reverse = (best_key % num_clusters) * num_clusters + best_key // num_clusters
      pos = np.searchsorted(best_key, reverse)
      has = (pos < best_key.size) & (best_key[np.minimum(pos, best_key.size - 1)] == reverse)
      i = np.flatnonzero(has & (best_key < reverse))
      gain = best_delta[i] + best_delta[pos[i]]
      for g, a, b in sorted(zip(gain, i, pos[i])):
        if g >= -eps:
          break
        n, m = best_row[a], best_row[b]
        if used[n] or used[m]:
          continue
        labels[n], current[n] = cand[n, best_col[a]], cand_lp[n, best_col[a]]
        labels[m], current[m] = cand[m, best_col[b]], cand_lp[m, best_col[b]]
        used[n] = used[m] = True
        changed = True
    if not changed:
      break
  return labels


def round_to_equipartition(candidate_scores, candidate_clusters, num_clusters, rescore):
  """Hard labels with cluster sizes floor(N/K) or ceil(N/K).

  Args:
    candidate_scores: float [N, m], each example's best log q(k|n), best first.
    candidate_clusters: int [N, m], the clusters those scores belong to.
    num_clusters: K.
    rescore: callable(example_ids int [n]) -> float [n, K], log q(k|n) for all clusters; used for the
      few examples whose m candidates all filled up.

  Returns:
    int64 [N] labels.
  """
  num_examples = candidate_scores.shape[0]
  base, num_large = capacities(num_examples, num_clusters)
  labels = np.full(num_examples, -1, np.int64)
  counts = np.zeros(num_clusters, np.int64)
  scores = np.asarray(candidate_scores, np.float64)
  clusters = np.asarray(candidate_clusters, np.int64)

  # Every round, each cluster that receives proposals either accepts them all or fills up and closes,
  # so this ends within K + 1 rounds (in practice a handful).
  while True:
    pending = np.flatnonzero(labels < 0)
    if pending.size == 0:
      return labels
    large_left = num_large - int(np.sum(counts > base))
    limit = np.where(counts > base, base + 1, base + (1 if large_left > 0 else 0))
    open_mask = counts < limit

    # Each pending example's best open candidate; those with none left are rescored over all clusters.
    candidate_open = open_mask[clusters[pending]]
    choice = np.argmax(candidate_open, axis=1)
    prop_cluster = clusters[pending, choice]
    prop_score = scores[pending, choice]
    exhausted = np.flatnonzero(~candidate_open.any(axis=1))
    if exhausted.size:
      # Open clusters whose q underflowed to 0 (log -inf) must still beat closed ones.
      full_scores = np.where(open_mask[None, :],
                             np.maximum(rescore(pending[exhausted]), np.finfo(np.float64).min),
                             -np.inf)
      prop_cluster[exhausted] = np.argmax(full_scores, axis=1)
      prop_score[exhausted] = full_scores[np.arange(exhausted.size), prop_cluster[exhausted]]

    # Clusters accept their best proposals up to capacity. Clusters that would grow past `base` take
    # the remaining large slots, those with the most demand first.
    demand = np.bincount(prop_cluster, minlength=num_clusters)
    quota = np.minimum(demand, limit - counts)
    wants_large = np.flatnonzero((counts <= base) & (counts + quota > base))
    if wants_large.size > large_left:
      order = wants_large[np.lexsort((wants_large, -demand[wants_large]))]
      quota[order[large_left:]] = base - counts[order[large_left:]]
    order = np.lexsort((-prop_score, prop_cluster))
    sorted_clusters = prop_cluster[order]
    first = np.searchsorted(sorted_clusters, np.arange(num_clusters))
    rank = np.arange(order.size) - first[sorted_clusters]
    accepted = order[rank < quota[sorted_clusters]]
    labels[pending[accepted]] = prop_cluster[accepted]
    counts += np.bincount(prop_cluster[accepted], minlength=num_clusters)
