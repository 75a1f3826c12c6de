"""When to self-label: the paper's `#opts` labelling steps spread over the training (sec. 4.1).

The official code labels at `nopts` points over the epochs, linearly spaced on CIFAR and quadratically
(denser early) on ImageNet, always including the very start. Here the points are training steps, so a
schedule may label more than once per epoch when it asks for it.
"""

import numpy as np

SPACINGS = ("linear", "quadratic")


def labelling_steps(total_steps: int, num_labellings: int, spacing: str = "linear") -> np.ndarray:
  """The training steps before which labels are re-assigned, ascending, starting at 0.

  Args:
    total_steps: steps of the whole training (epochs x steps per epoch).
    num_labellings: the paper's #opts, >= 1 (at most total_steps distinct points).
    spacing: "linear" (evenly spaced) or "quadratic" (step_i = total * (i / n)^2: denser early).

  Returns:
    int64 [M] distinct steps in [0, total_steps), M <= num_labellings, steps[0] == 0.

  Raises:
    ValueError: naming the bad value.
  """
  if spacing not in SPACINGS:
    raise ValueError(f"labelling spacing must be one of {SPACINGS}, got {spacing!r}")
  if not (isinstance(total_steps, (int, np.integer)) and total_steps >= 1):
    raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
  if not (isinstance(num_labellings, (int, np.integer)) and num_labellings >= 1):
    raise ValueError(f"the number of labellings (nopts) must be an integer >= 1, got {num_labellings!r}")
  fractions = np.arange(num_labellings) / num_labellings
  if spacing == "quadratic":
    fractions = fractions**2
  return np.unique(np.floor(fractions * total_steps).astype(np.int64))
