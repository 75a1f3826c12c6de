"""The label pass under MultiWorkerMirroredStrategy: two real worker processes on this machine.

Each worker runs its share of the label pass. Gathered, `SelfLabelCallback` holds every replica's
results on every worker, so both workers hold all N log-probabilities and compute the same labels as
one process alone does; sharded, each keeps its own share, the solve all-reduces [K] vectors, and the
labels are again those of one process.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

import workers  # pylint: disable=g-bad-import-order

WORKER = textwrap.dedent("""
    import json, os, sys
    import numpy as np
    import keras
    import tensorflow as tf
    from selabel_tf import callbacks as callbacks_lib
    from selabel_tf.modeling.sela import SelaModel

    out, multi = sys.argv[1], sys.argv[2] == "multi"
    strategy = tf.distribute.MultiWorkerMirroredStrategy() if multi else tf.distribute.get_strategy()
    num_examples = 90  # 90 = 5 x 16 + 10: the last global batch does not split evenly
    rng = np.random.default_rng(0)
    images = rng.normal(size=(num_examples, 16, 16, 1)).astype(np.float32)
    order = rng.permutation(num_examples)
    label_pass = tf.data.Dataset.from_tensor_slices(
        {"index": order.astype(np.int64), "image": images[order]}).batch(16)
    keras.utils.set_random_seed(0)
    with strategy.scope():
      model = SelaModel("alexnet_small", (16, 16, 1), (4, 3), num_examples, name="sela")
      model.build()
      model.compile_for_self_labelling(keras.optimizers.SGD(0.1))
    callback = callbacks_lib.SelfLabelCallback(label_pass, num_examples, 10.0, steps=[0],
                                               label_sharding="gathered", verbose=0)
    callback.set_model(model)
    log_probs = callback.collect_log_probs()
    result = callback.relabel()
    # Again, sharded: each worker keeps its share of the pass; warm-started from the labelling above.
    sharded = callbacks_lib.SelfLabelCallback(label_pass, num_examples, 10.0, steps=[0],
                                              label_sharding="sharded", verbose=0)
    sharded.set_model(model)
    sharded_result = sharded.relabel()
    np.savez(out, labels=result.labels, replicas=strategy.num_replicas_in_sync,
             sharded_labels=sharded_result.labels, exchanged=sharded_result.exchanged_bytes,
             **{f"head_{t}": h for t, h in enumerate(log_probs)})

    # The evaluation callbacks: every worker computes the same numbers; only the chief writes.
    from selabel_tf.data import sources
    from selabel_tf.evaluation import callbacks as eval_callbacks
    pixels = np.clip(images * 40 + 128, 0, 255).astype(np.uint8)
    dataset = sources.Dataset(name="w", images=pixels, original_index=np.arange(num_examples),
                              kind="small", origin="test")
    truth = sources.GroundTruth((np.arange(num_examples) % 3).astype(np.int64), ("a", "b", "c"))
    data = eval_callbacks.EvaluationData(dataset, truth, dataset, truth, image_size=16, batch_size=16)
    log_dir = out + ".tensorboard"
    evaluation = [eval_callbacks.KNNCallback(data, ks=(5,), log_dir=log_dir),
                  eval_callbacks.ClusterMetricsCallback(data, log_dir=log_dir)]
    metrics = {}
    for evaluation_callback in evaluation:
      evaluation_callback.set_model(model)
      metrics.update(evaluation_callback.evaluate())
    with open(out + ".json", "w") as f:
      json.dump({k: v for k, v in metrics.items() if not k.endswith("_seconds")}, f)
""")


def _env(**extra):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  env["PYTHONPATH"] = os.pathsep.join([os.getcwd(), env.get("PYTHONPATH", "")])
  return env


def test_two_workers_label_like_one_process(tmp_path):
  script = tmp_path / "worker.py"
  script.write_text(WORKER)
  single = tmp_path / "single.npz"
  # The one-process reference runs beside the two workers (each is small; they overlap their start-up).
  processes = [subprocess.Popen([sys.executable, str(script), str(single), "single"], env=_env(),
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)]
  ports = workers.free_ports(2)
  for index in range(2):
    tf_config = workers.tf_config(ports, index)
    processes.append(subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / f"worker_{index}.npz"), "multi"],
        env=_env(TF_CONFIG=tf_config), stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
  for process in processes:
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output.decode()[-3000:]

  expected = np.load(single)
  for index in range(2):
    got = np.load(tmp_path / f"worker_{index}.npz")
    assert int(got["replicas"]) == 2
    for t in range(2):
      np.testing.assert_allclose(got[f"head_{t}"], expected[f"head_{t}"], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(got["labels"], expected["labels"])
    # The sharded labelling: the labels of one process's labelling of the same log-probs.
    np.testing.assert_array_equal(got["sharded_labels"], expected["sharded_labels"])
    assert int(got["exchanged"]) > 0 and int(expected["exchanged"]) == 0

  with open(f"{single}.json") as f:
    expected_metrics = json.load(f)
  assert "knn_top1/pool5/k=5" in expected_metrics and "cluster_test/head_0/nmi" in expected_metrics
  for index in range(2):
    with open(tmp_path / f"worker_{index}.npz.json") as f:
      got = json.load(f)
    assert got.keys() == expected_metrics.keys()
    for key, value in expected_metrics.items():
      assert abs(got[key] - value) <= 1e-5, (index, key)
  # Only the chief (worker 0) writes its TensorBoard logs.
  assert os.path.isdir(tmp_path / "worker_0.npz.tensorboard")
  assert not os.path.exists(tmp_path / "worker_1.npz.tensorboard")
