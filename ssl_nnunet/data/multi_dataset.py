"""Several preprocessed nnU-Net datasets as one source of cases for the samplers (:class:`MultiDataset`), and
the per-dataset sampling weights (:class:`DatasetGroups`).

With ``ssl_nnunet_pretrain -d 901 902`` every dataset keeps its own preprocessed folder (made with one shared
plan, see documentation/pretraining.md); the samplers see one dataset whose identifiers are
``"<DatasetName>/<case>"`` (sorted, so the cases of one dataset are contiguous). A draw first picks a dataset
with its weight, then a case of that dataset uniformly; a draw of several cases (GVSL and Alice pairs, VoCo's
bases) takes all of them from one dataset. The sampler keeps three plain numbers per dataset (first index,
number of cases, weight) and nothing per case.

A single dataset is not wrapped: its identifiers stay the plain case names and the draws are exactly the ones
of :func:`~ssl_nnunet.data.case_cache.choose_cases` without groups.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from ssl_nnunet.utilities.errors import SSLInputError

SEPARATOR = "/"


def split_identifier(identifier: str) -> Tuple[Optional[str], str]:
    """``("DatasetXXX_Name", "case")`` of a multi-dataset identifier, ``(None, identifier)`` of a plain one."""
    head, sep, tail = identifier.partition(SEPARATOR)
    return (head, tail) if sep else (None, identifier)


class MultiDataset:
    """The cases of several nnU-Net datasets (``nnUNetDatasetBlosc2`` or another nnU-Net dataset class) under
    identifiers ``"<DatasetName>/<case>"``.

    Args:
        datasets: ``{dataset name: nnU-Net dataset}`` in the order of ``-d``.
        weights: ``{dataset name: sampling weight}`` (relative; need not sum to 1).

    Offers what the samplers and :class:`~ssl_nnunet.data.case_cache.CaseCache` use of an nnU-Net dataset:
    ``identifiers``, ``load_case(identifier)`` and :meth:`case_file`.
    """

    def __init__(self, datasets: Dict[str, object], weights: Dict[str, float]):
        if not datasets:
            raise ValueError("MultiDataset needs at least one dataset")
        for name in datasets:
            if SEPARATOR in name:
                raise ValueError(f"dataset name {name!r} contains {SEPARATOR!r}")
        self.datasets = dict(datasets)
        self.names = list(datasets)
        self.weights = {n: float(weights[n]) for n in self.names}
        self.identifiers = sorted(f"{n}{SEPARATOR}{c}" for n, d in self.datasets.items() for c in d.identifiers)

    def _member(self, identifier: str):
        name, case = split_identifier(identifier)
        if name not in self.datasets:
            raise KeyError(f"{identifier}: not a case of {', '.join(self.names)}")
        return self.datasets[name], case

    def load_case(self, identifier: str):
        """nnU-Net's ``(data, seg, seg_prev, properties)`` of ``"<DatasetName>/<case>"``."""
        dataset, case = self._member(identifier)
        return dataset.load_case(case)

    def case_file(self, identifier: str) -> str:
        """The data file of the case (for messages about unreadable cases)."""
        from ssl_nnunet.data.case_cache import case_file
        dataset, case = self._member(identifier)
        return case_file(dataset, case)

    @property
    def source_folder(self) -> str:
        """The common parent of the members' folders (``nnUNet_preprocessed``)."""
        folders = [getattr(d, "source_folder", "") for d in self.datasets.values()]
        return os.path.commonpath(folders) if all(folders) else ""


@dataclass(frozen=True)
class DatasetGroups:
    """Per-dataset draw of a sampler: ``starts[g]``, ``counts[g]`` (a contiguous range of the sampler's sorted
    identifiers) and ``probabilities[g]`` (the normalised weights) of dataset ``names[g]``."""

    names: Tuple[str, ...]
    starts: Tuple[int, ...]
    counts: Tuple[int, ...]
    probabilities: Tuple[float, ...]

    def draw(self, rng: np.random.RandomState, count: int) -> List[int]:
        """``count`` distinct indices of one dataset: the dataset by its probability (among the datasets with at
        least ``count`` cases), then the cases uniformly without replacement."""
        p = np.array([pr if n >= count else 0.0 for pr, n in zip(self.probabilities, self.counts)])
        if p.sum() <= 0:
            raise ValueError(f"no dataset has {count} cases to draw from ({dict(zip(self.names, self.counts))})")
        g = int(rng.choice(len(p), p=p / p.sum()))
        return [self.starts[g] + int(i) for i in rng.choice(self.counts[g], count, replace=False)]


def dataset_groups(dataset, identifiers: Sequence[str]) -> Optional[DatasetGroups]:
    """The :class:`DatasetGroups` of ``identifiers`` (sorted) of a :class:`MultiDataset`; ``None`` for any other
    dataset (one dataset: the plain uniform draw)."""
    if not isinstance(dataset, MultiDataset):
        return None
    names = [split_identifier(i)[0] for i in identifiers]
    if list(identifiers) != sorted(identifiers):
        raise ValueError("the identifiers of a MultiDataset sampler must be sorted")
    used = [n for n in dataset.names if n in set(names)]
    starts = tuple(names.index(n) for n in used)
    counts = tuple(names.count(n) for n in used)
    w = np.array([dataset.weights[n] for n in used], dtype=np.float64)
    return DatasetGroups(tuple(used), starts, counts, tuple(float(x) for x in w / w.sum()))


def resolve_dataset_weights(spec: Union[None, str, Sequence], case_counts: Dict[str, int]) -> Dict[str, float]:
    """Sampling weight per dataset from ``--dataset_weights``: ``None`` / ``"cases"`` (proportional to the number
    of preprocessed cases: every case equally likely), ``"equal"`` (every dataset equally likely), or one positive
    number per dataset in the order of ``-d``. Returns normalised weights."""
    names = list(case_counts)
    if spec is None or (isinstance(spec, str) and spec == "cases") or (
            not isinstance(spec, str) and len(spec) == 1 and spec[0] == "cases"):
        raw = [float(case_counts[n]) for n in names]
    elif (isinstance(spec, str) and spec == "equal") or (
            not isinstance(spec, str) and len(spec) == 1 and spec[0] == "equal"):
        raw = [1.0] * len(names)
    else:
        values = [spec] if isinstance(spec, str) else list(spec)
        try:
            raw = [float(v) for v in values]
        except ValueError:
            raise SSLInputError(f"--dataset_weights {' '.join(map(str, values))}: give 'cases' (default), 'equal' "
                                f"or one number per dataset ({', '.join(names)}).") from None
        if len(raw) != len(names):
            raise SSLInputError(f"--dataset_weights has {len(raw)} number(s) for {len(names)} datasets "
                                f"({', '.join(names)}); give one per dataset, in the order of -d.")
        if any(not np.isfinite(r) or r < 0 for r in raw) or sum(raw) <= 0:
            raise SSLInputError(f"--dataset_weights {' '.join(map(str, values))}: weights must be >= 0 and not all "
                                f"0.")
    total = sum(raw)
    return {n: r / total for n, r in zip(names, raw)}


def _channels(dataset_json: dict) -> List[str]:
    names = dataset_json.get("channel_names") or dataset_json.get("modality") or {}
    return [str(names[k]) for k in sorted(names, key=lambda k: int(k))]


def check_compatible(reference: str, reference_json: dict, other: str, other_json: dict) -> None:
    """Raise :class:`SSLInputError` naming both datasets when ``other`` cannot share ``reference``'s pretraining
    plan and network: another number of input channels, or other modalities (``channel_names``, compared without
    case and surrounding spaces; CT vs. non-CT also changes nnU-Net's normalisation)."""
    a, b = _channels(reference_json), _channels(other_json)
    if len(a) != len(b):
        raise SSLInputError(f"{reference} and {other} cannot be pretrained together: {reference} has {len(a)} input "
                            f"channel(s) {a}, {other} has {len(b)} {b}. One network needs one channel layout; "
                            f"pretrain them separately or convert them to the same channels.")
    differ = [f"channel {i}: {x!r} vs {y!r}" for i, (x, y) in enumerate(zip(a, b))
              if x.strip().lower() != y.strip().lower()]
    if differ:
        raise SSLInputError(f"{reference} and {other} cannot be pretrained together: their modalities differ "
                            f"({'; '.join(differ)}; channel_names of dataset.json). Rename the channels if they "
                            f"are the same modality, else pretrain them separately.")


#: plan keys that may differ between datasets that share one plan
_PER_DATASET_PLAN_KEYS = ("dataset_name", "image_reader_writer")


def shared_plan_differences(reference_plans: dict, other_plans: dict) -> List[str]:
    """The top-level keys (``configurations``, ``ssl``, ...) in which two datasets' pretraining plans differ,
    ignoring the per-dataset ones (name, image reader) and the ``ssl.shared_plan`` record."""
    def strip(plans):
        out = {k: v for k, v in plans.items() if k not in _PER_DATASET_PLAN_KEYS}
        if isinstance(out.get("ssl"), dict):
            out["ssl"] = {k: v for k, v in out["ssl"].items() if k != "shared_plan"}
        return out
    a, b = strip(reference_plans), strip(other_plans)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
