"""Test setup: nnU-Net folders in a fresh temporary directory (set before anything imports nnunetv2)."""
import os
import tempfile

_ROOT = tempfile.mkdtemp(prefix="ssl_nnunet_tests_")
for _name in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
    os.environ[_name] = os.path.join(_ROOT, _name)
    os.makedirs(os.environ[_name], exist_ok=True)
os.environ.setdefault("OMP_NUM_THREADS", "2")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def nnunet_root():
    return _ROOT


_NEXT_DATASET_ID = [500]  # ids handed out by the fixture below; the hard-coded ids of older tests are >= 900


@pytest.fixture(scope="session")
def new_dataset_id():
    """``new_dataset_id(name) -> (id, "DatasetXXX_name")``: a dataset id no other test uses."""
    def allocate(name: str):
        did = _NEXT_DATASET_ID[0]
        _NEXT_DATASET_ID[0] += 1
        return did, f"Dataset{did:03d}_{name}"
    return allocate
