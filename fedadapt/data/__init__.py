"""Tasks (train/test examples in memory) and their split among federated clients.

Importing this package is cheap: scikit-learn, mnist1d, `datasets` and
flwr-datasets are imported only inside the loader or partitioner that needs them.
"""

from fedadapt.data.base import Dataset, TaskData
from fedadapt.data.bundled import load_digits, load_mnist1d, load_synthetic
from fedadapt.data.files import load_file
from fedadapt.data.partition import partition
from fedadapt.data.shakespeare import load_shakespeare_genre

__all__ = [
    "Dataset",
    "TaskData",
    "load_digits",
    "load_file",
    "load_mnist1d",
    "load_shakespeare_genre",
    "load_synthetic",
    "partition",
]
