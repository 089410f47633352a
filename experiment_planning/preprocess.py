"""Preprocessing with nnunetv2's DefaultPreprocessor, labels optional (``ssl_nnunet_preprocess``).

Output: nnU-Net's blosc2 format under ``nnUNet_preprocessed/DatasetXXX/<data_identifier>/`` (readable by
``nnUNetDatasetBlosc2``). The folder is built under a temporary name and renamed into place when every case
succeeded, so an interrupted or failed run never leaves a half-written dataset. Each case's properties get
``ssl_body_bbox`` ([[lo, hi) per axis] in preprocessed voxels, from an Otsu body mask) for the samplers of
the spatial objectives.
"""
from __future__ import annotations

import multiprocessing
import os
from typing import List, Union

import numpy as np
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from ssl_nnunet.experiment_planning.dataset_checks import list_cases
from ssl_nnunet.experiment_planning.fingerprint import body_mask
from ssl_nnunet.constants import CONFIGURATION, SSL_PLANS
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import atomic_directory, dataset_name_from_id, load_json


def body_bbox(data: np.ndarray) -> List[List[int]]:
    """[[lo, hi), ...] per spatial axis of the Otsu body mask of channel 0 of ``data`` (C, a0, a1, a2)."""
    mask = body_mask(data[0], ct=False)
    if not mask.any():
        return [[0, int(s)] for s in data.shape[1:]]
    coords = np.nonzero(mask)
    return [[int(c.min()), int(c.max()) + 1] for c in coords]


class SSLPreprocessor(DefaultPreprocessor):
    """DefaultPreprocessor that accepts cases without labels and records the body bounding box."""

    def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager, configuration_manager,
                                                     dataset_json)
        properties.setdefault("class_locations", {})
        properties["ssl_body_bbox"] = body_bbox(data)
        return data, seg, properties

    def _save_one(self, args):
        out_truncated, images, label, plans_manager, configuration_manager, dataset_json = args
        self.run_case_save(out_truncated, images, label, plans_manager, configuration_manager, dataset_json)
        return os.path.basename(out_truncated)

    def run(self, dataset_name_or_id: Union[int, str], configuration_name: str = CONFIGURATION,
            plans_identifier: str = SSL_PLANS, num_processes: int = 2):
        dataset_name = dataset_name_from_id(dataset_name_or_id)
        pp_folder = os.path.join(nnunet_preprocessed(), dataset_name)
        plans_file = os.path.join(pp_folder, plans_identifier + ".json")
        if not os.path.isfile(plans_file):
            raise SSLInputError(f"{dataset_name}: plans file {plans_file} not found. Run "
                                f"ssl_nnunet_plan_experiment -d {dataset_name_or_id} first.")
        plans_manager = PlansManager(load_json(plans_file, "plans"))
        configuration_manager = plans_manager.get_configuration(configuration_name)
        dataset_json = load_json(os.path.join(pp_folder, "dataset.json"), "dataset.json")
        cases = list_cases(dataset_name, dataset_json)
        out_dir = os.path.join(pp_folder, configuration_manager.data_identifier)
        with atomic_directory(out_dir) as tmp_dir:
            jobs = [(os.path.join(tmp_dir, c), v["images"], v["label"], plans_manager, configuration_manager,
                     dataset_json) for c, v in cases.items()]
            with tqdm(total=len(jobs), desc=f"Preprocessing {dataset_name}",
                      disable=not self.show_progress_bar) as bar:
                if num_processes <= 1:
                    for job in jobs:
                        self._save_one(job)
                        bar.update()
                else:
                    with multiprocessing.get_context("spawn").Pool(num_processes) as pool:
                        for _ in pool.imap_unordered(self._save_one, jobs):
                            bar.update()
        return out_dir


def preprocess(dataset: Union[int, str], plans_identifier: str = SSL_PLANS, num_processes: int = 2,
               verbose: bool = True) -> str:
    """Preprocess the ``3d_fullres`` configuration of ``plans_identifier``; returns the output folder."""
    pre = SSLPreprocessor(verbose=False)
    pre.show_progress_bar = verbose
    out = pre.run(dataset, CONFIGURATION, plans_identifier, num_processes)
    if verbose:
        print(f"Preprocessed data written to {out}")
    return out
