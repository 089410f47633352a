"""Preprocessing with nnunetv2's DefaultPreprocessor, labels optional (``ssl_nnunet_preprocess``).

Output: nnU-Net's blosc2 format under ``nnUNet_preprocessed/DatasetXXX/<data_identifier>/`` (readable by
``nnUNetDatasetBlosc2``). Each case's properties get ``ssl_body_bbox`` ([[lo, hi) per axis] in preprocessed
voxels, from an Otsu body mask) for the samplers of the spatial objectives, and ``ssl_preprocessing_hash``
(see :func:`preprocessing_hash`).

Built to scale out and to survive interruptions:

* **Per-case atomic writes.** A case is written by nnU-Net's ``run_case_save`` into a private temporary folder
  (``<data_identifier>/.ssl_tmp/``) and its files are renamed into place, the data file ``CASE.b2nd`` last —
  nnU-Net lists a folder's cases by that file, so a killed run never leaves a half case that a loader sees.
* **Resumable.** A case whose three files exist and whose properties carry the hash of the current plan is
  skipped; a case preprocessed with another plan is redone. Files of cases that are no longer in the
  dataset are removed.
* **Sharded.** ``part`` / ``total_parts`` give each job every ``total_parts``-th case (in sorted order);
  running all parts (on one machine or several sharing the folder, in any order or at the same time) gives
  exactly the unsplit result.
* **One failure does not discard the others.** A case that fails is reported by name at the end (as an
  :class:`SSLInputError`); all other cases are written.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import socket
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Dict, List, Optional, Tuple, Union

import numpy as np
from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor
from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
from tqdm import tqdm

from ssl_nnunet.experiment_planning.dataset_checks import list_cases, with_default_labels
from ssl_nnunet.experiment_planning.fingerprint import body_mask
from ssl_nnunet.constants import CONFIGURATION, SSL_PLANS
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import dataset_name_from_id, load_json

HASH_KEY = "ssl_preprocessing_hash"
TMP_FOLDER = ".ssl_tmp"
# rename order of a case's files: the data file last, because nnU-Net lists cases by "CASE.b2nd"
CASE_SUFFIXES = ("_seg.b2nd", ".pkl", ".b2nd")
# dataset.json keys that change the preprocessed data (the case list and descriptions do not)
_DATASET_JSON_KEYS = ("channel_names", "labels", "regions_class_order", "file_ending", "overwrite_image_reader_writer")


def available_cpus() -> int:
    """CPUs this process may run on (``os.sched_getaffinity``: respects taskset, cgroups' cpusets, SLURM)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def body_bbox(data: np.ndarray) -> List[List[int]]:
    """[[lo, hi), ...] per spatial axis of the Otsu body mask of channel 0 of ``data`` (C, a0, a1, a2)."""
    mask = body_mask(data[0], ct=False)
    if not mask.any():
        return [[0, int(s)] for s in data.shape[1:]]
    coords = np.nonzero(mask)
    return [[int(c.min()), int(c.max()) + 1] for c in coords]


def preprocessing_hash(plans: dict, configuration_name: str, dataset_json: dict) -> str:
    """SHA-256 of everything in the plan and dataset.json that changes the preprocessed data: the configuration
    without its network (``architecture``, ``batch_size``), the plan's top-level keys without the ``ssl`` block,
    and dataset.json's channel names, labels and reader."""
    config = {k: v for k, v in plans["configurations"][configuration_name].items()
              if k not in ("architecture", "batch_size")}
    top = {k: v for k, v in plans.items() if k not in ("ssl", "configurations", "plans_name")}
    dj = {k: dataset_json[k] for k in _DATASET_JSON_KEYS if k in dataset_json}
    text = json.dumps({"configuration": config, "plans": top, "dataset_json": dj}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def case_files(out_dir: str, case: str) -> List[str]:
    return [os.path.join(out_dir, case + s) for s in CASE_SUFFIXES]


def case_finished(out_dir: str, case: str, expected_hash: str) -> bool:
    """All files of ``case`` are in place and were written with the plan of ``expected_hash``."""
    if not all(os.path.isfile(f) for f in case_files(out_dir, case)):
        return False
    try:
        with open(os.path.join(out_dir, case + ".pkl"), "rb") as f:
            return pickle.load(f).get(HASH_KEY) == expected_hash
    except Exception:  # unreadable properties: redo the case
        return False


def select_part(case_ids: List[str], part: int, total_parts: int) -> List[str]:
    """Every ``total_parts``-th case of the sorted ids, starting at ``part`` (disjoint; the union is all)."""
    if total_parts < 1 or not 0 <= part < total_parts:
        raise SSLInputError(f"-part {part} -total_parts {total_parts}: need total_parts >= 1 and "
                            f"0 <= part < total_parts (parts are numbered 0 .. total_parts-1).")
    return sorted(case_ids)[part::total_parts]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_leftovers(out_dir: str, case_ids) -> int:
    """Delete the temporary folders of killed runs on this host and the files of cases no longer in the
    dataset; returns the number of removed cases."""
    tmp_root = os.path.join(out_dir, TMP_FOLDER)
    host = socket.gethostname()
    if os.path.isdir(tmp_root):
        for entry in os.listdir(tmp_root):
            owner, _, rest = entry.partition("__")
            h, _, pid = owner.rpartition("_")
            if h == host and pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(os.path.join(tmp_root, entry), ignore_errors=True)
    wanted = {c + s for c in case_ids for s in CASE_SUFFIXES}
    stale = [f for f in os.listdir(out_dir) if f.endswith(CASE_SUFFIXES) and f not in wanted]
    stale.sort(key=lambda f: not (f.endswith(".b2nd") and not f.endswith("_seg.b2nd")))  # data files first
    for f in stale:
        os.remove(os.path.join(out_dir, f))
    return sum(f.endswith(".pkl") for f in stale)


class SSLPreprocessor(DefaultPreprocessor):
    """DefaultPreprocessor that accepts cases without labels and records the body bounding box and the plan's
    hash in each case's properties."""

    preprocessing_hash: Optional[str] = None

    def run_case_npy(self, data, seg, properties, plans_manager, configuration_manager, dataset_json):
        data, seg, properties = super().run_case_npy(data, seg, properties, plans_manager, configuration_manager,
                                                     dataset_json)
        properties.setdefault("class_locations", {})
        properties["ssl_body_bbox"] = body_bbox(data)
        if self.preprocessing_hash is not None:
            properties[HASH_KEY] = self.preprocessing_hash
        return data, seg, properties

    def run(self, dataset_name_or_id: Union[int, str], configuration_name: str = CONFIGURATION,
            plans_identifier: str = SSL_PLANS, num_processes: Optional[int] = None, part: int = 0,
            total_parts: int = 1) -> Tuple[str, dict]:
        """Preprocess part ``part`` of ``total_parts`` of the dataset; returns ``(output folder, counts)`` with
        counts ``{"cases", "written", "skipped", "removed"}``. Raises :class:`SSLInputError` naming every
        failed case after all others are written."""
        dataset_name = dataset_name_from_id(dataset_name_or_id)
        pp_folder = os.path.join(nnunet_preprocessed(), dataset_name)
        plans_file = os.path.join(pp_folder, plans_identifier + ".json")
        if not os.path.isfile(plans_file):
            raise SSLInputError(f"{dataset_name}: plans file {plans_file} not found. Run "
                                f"ssl_nnunet_plan_experiment -d {dataset_name_or_id} first.")
        plans = load_json(plans_file, "plans")
        plans_manager = PlansManager(plans)
        configuration_manager = plans_manager.get_configuration(configuration_name)
        dataset_json = with_default_labels(load_json(os.path.join(pp_folder, "dataset.json"), "dataset.json"),
                                           dataset_name, verbose=False)
        cases = list_cases(dataset_name, dataset_json)
        mine = select_part(list(cases), part, total_parts)
        out_dir = os.path.join(pp_folder, configuration_manager.data_identifier)
        os.makedirs(out_dir, exist_ok=True)
        removed = remove_leftovers(out_dir, cases)
        self.preprocessing_hash = preprocessing_hash(plans, configuration_name, dataset_json)
        todo = [c for c in mine if not case_finished(out_dir, c, self.preprocessing_hash)]
        writer = _CaseWriter(self, plans_manager, configuration_manager, dataset_json, out_dir)
        jobs = ((c, cases[c]["images"], cases[c]["label"]) for c in todo)
        failures: Dict[str, str] = {}
        n_proc = available_cpus() if num_processes is None else max(1, int(num_processes))
        n_proc = min(n_proc, max(1, len(todo)))
        desc = f"Preprocessing {dataset_name}" + (f" (part {part}/{total_parts})" if total_parts > 1 else "")
        with tqdm(total=len(todo), desc=desc, disable=not self.show_progress_bar) as bar:
            if n_proc <= 1:
                for job in jobs:
                    case, error = writer(job)
                    if error:
                        failures[case] = error
                    bar.update()
            else:
                _run_in_pool(writer, jobs, n_proc, failures, bar)
        try:  # the temporary folder goes when empty (another part may still use it)
            os.rmdir(os.path.join(out_dir, TMP_FOLDER))
        except OSError:
            pass
        counts = {"cases": len(mine), "written": len(todo) - len(failures), "skipped": len(mine) - len(todo),
                  "removed": removed}
        if failures:
            listing = "\n".join(f"  case '{c}': {m}" for c, m in sorted(failures.items()))
            raise SSLInputError(
                f"{dataset_name}: {len(failures)} of {len(mine)} case(s) failed to preprocess "
                f"({counts['written']} written, {counts['skipped']} already done):\n{listing}\n"
                f"Fix or remove these cases and rerun the same command; finished cases are skipped.")
        return out_dir, counts


class _CaseWriter:
    """Preprocess and write one case atomically (runs in a worker process or in-process)."""

    def __init__(self, preprocessor, plans_manager, configuration_manager, dataset_json, out_dir):
        self.preprocessor, self.plans_manager = preprocessor, plans_manager
        self.configuration_manager, self.dataset_json, self.out_dir = configuration_manager, dataset_json, out_dir

    def __call__(self, job) -> Tuple[str, Optional[str]]:
        case, images, label = job
        tmp = os.path.join(self.out_dir, TMP_FOLDER, f"{socket.gethostname()}_{os.getpid()}__{case}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            self.preprocessor.run_case_save(os.path.join(tmp, case), images, label, self.plans_manager,
                                            self.configuration_manager, self.dataset_json)
            for src, dst in zip(case_files(tmp, case), case_files(self.out_dir, case)):
                os.replace(src, dst)
            return case, None
        except Exception as e:  # reported by name at the end; the other cases go on
            text = str(e).strip().splitlines()
            return case, f"{type(e).__name__}: {text[0][:300] if text else ''} (images {', '.join(images)})"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


_WORKER_WRITER: Optional[_CaseWriter] = None


def _init_worker(writer: _CaseWriter) -> None:
    global _WORKER_WRITER
    _WORKER_WRITER = writer


def _write_in_worker(job):
    return _WORKER_WRITER(job)


def _run_in_pool(writer: _CaseWriter, jobs, n_proc: int, failures: Dict[str, str], bar) -> None:
    """Feed ``jobs`` to ``n_proc`` spawned workers with at most 2 per worker in flight (the plan and dataset.json
    are sent once per worker, not once per case)."""
    import multiprocessing
    pending = set()
    with ProcessPoolExecutor(n_proc, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker,
                             initargs=(writer,)) as pool:
        while True:
            while len(pending) < 2 * n_proc and (job := next(jobs, None)) is not None:
                pending.add(pool.submit(_write_in_worker, job))
            if not pending:
                break
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                try:
                    case, error = future.result()
                except BrokenProcessPool:
                    raise SSLInputError(
                        "A preprocessing worker process died (killed, or out of memory). The cases finished so "
                        "far are kept; rerun the same command to resume (with a smaller -np if memory ran out).")
                if error:
                    failures[case] = error
                bar.update()


def preprocess(dataset: Union[int, str], plans_identifier: str = SSL_PLANS, num_processes: Optional[int] = None,
               verbose: bool = True, part: int = 0, total_parts: int = 1) -> str:
    """Preprocess the ``3d_fullres`` configuration of ``plans_identifier`` (part ``part`` of ``total_parts``;
    ``num_processes=None``: one worker per available CPU); returns the output folder."""
    pre = SSLPreprocessor(verbose=False)
    pre.show_progress_bar = verbose
    out, counts = pre.run(dataset, CONFIGURATION, plans_identifier, num_processes, part, total_parts)
    if verbose:
        which = f"part {part} of 0..{total_parts - 1}: " if total_parts > 1 else ""
        print(f"Preprocessed data written to {out} ({which}{counts['cases']} case(s): {counts['written']} "
              f"written, {counts['skipped']} already done" +
              (f", {counts['removed']} no longer in the dataset removed)" if counts["removed"] else ")"))
    return out
