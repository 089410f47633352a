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


@pytest.fixture(scope="session")
def primus_planned(new_dataset_id):
    """A small synthetic dataset planned twice (CNN and ``-arch primus_m`` at ``cpu_smoke``: a 96-d, depth-4
    Primus on 32³) and preprocessed for the Primus plan; shared by every test of a Primus objective
    (each pretrains its own method into its own run folder). ``{"id", "name", "plans"}``."""
    from helpers import write_synthetic_dataset
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    from ssl_nnunet.experiment_planning.preprocess import preprocess
    did, name = new_dataset_id("PrimusSource")
    write_synthetic_dataset(did, name.split("_", 1)[1], n_cases=3, shape=(40, 44, 48), spacing=(2.0, 2.0, 2.0))
    extract_fingerprint(did, 1, verbose=False)
    plan_experiment(did, "cpu_smoke", verbose=False)
    plans = plan_experiment(did, "cpu_smoke", verbose=False, arch="primus_m")
    preprocess(did, plans_identifier="sslPlans_primus_m", num_processes=1, verbose=False)
    return {"id": did, "name": name, "plans": plans}
