"""selabel_tf: SeLa self-labelling in TensorFlow/Keras 3."""

import setuptools

setuptools.setup(
    name="selabel_tf",
    version="0.1.0",
    description=("Self-labelling via simultaneous clustering and representation learning "
                 "(Asano, Rupprecht, Vedaldi, ICLR 2020) in TensorFlow/Keras 3"),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10,<3.14",
    packages=setuptools.find_packages(include=["selabel_tf", "selabel_tf.*"]),
    install_requires=[
        "tensorflow>=2.16,<2.22",
        "keras>=3.10,<4",
        "tensorflow-datasets>=4.9,<5",
        "importlib_resources>=6",  # etils (tfds) needs it to prepare datasets; not pulled in by tfds
        "numpy>=1.26,<3",
        "absl-py>=2.1,<3",
        "psutil>=5.9",
        "tensorboard>=2.16",  # tf.summary and keras.callbacks.TensorBoard need it; tensorflow does not pull it in
        "scikit-learn>=1.4",  # NMI/ARI of the final labels
        "faiss-cpu>=1.8",  # the K-means labeller (selabel_tf.kmeans)
        "scipy>=1.11",  # Hungarian matching, the K-means labeller's PCA
        "pillow>=10",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "scipy>=1.11",
            "scikit-learn>=1.4",
            "pot>=0.9.4",
        ],
    },
)
