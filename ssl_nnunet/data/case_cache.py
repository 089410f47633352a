"""Bounded access to the cases of an nnU-Net preprocessed dataset for the samplers (:class:`CaseCache`).

nnU-Net's blosc2 dataset (``nnUNetDatasetBlosc2.load_case``) opens every case memory-mapped: one open file and
one or two mappings per case for as long as its array lives. A sampler that kept every case it ever drew would
run into ``ulimit -n`` (1,024 by default) or Linux's 65,530 mappings on a large dataset, so the
:class:`CaseCache` keeps at most ``max_open_cases`` arrays open (least recently used ones are closed) and holds
of every other case only its :class:`CaseInfo` (spatial shape and body box, plain integers).

A case that cannot be opened or read (truncated, corrupt, missing file) is logged with its path, marked bad and
never drawn again; the sampler draws another. When more than ``max_bad_case_fraction`` of the cases are bad the
run stops with an :class:`~ssl_nnunet.utilities.errors.SSLInputError` naming them.
"""
from __future__ import annotations

import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple, TypeVar

import numpy as np

from ssl_nnunet.utilities.errors import SSLInputError

#: open case arrays kept per sampler (each costs an open file and a mapping); Alice/GVSL draw 2 cases per element
DEFAULT_MAX_OPEN_CASES = 16
#: share of a sampler's cases that may be unreadable before the run stops
DEFAULT_MAX_BAD_CASE_FRACTION = 0.05

logger = logging.getLogger("ssl_nnunet.data")
T = TypeVar("T")


@dataclass(frozen=True)
class CaseInfo:
    """Plain-data properties of one case: spatial ``shape`` ``(a0, a1, a2)`` and body box ``bbox``
    ``((lo0, hi0), (lo1, hi1), (lo2, hi2))`` (``ssl_body_bbox`` of the case's ``.pkl``, else the whole image)."""

    shape: Tuple[int, ...]
    bbox: Tuple[Tuple[int, int], ...]


class UnreadableCaseError(Exception):
    """A case could not be opened or read; ``identifier``, ``path`` and the ``cause`` are kept."""

    def __init__(self, identifier: str, path: str, cause: BaseException):
        super().__init__(f"case {identifier} ({path}) is unreadable: {type(cause).__name__}: {cause}")
        self.identifier, self.path, self.cause = identifier, path, cause


def case_file(dataset, identifier: str) -> str:
    """The data file of ``identifier`` in ``dataset.source_folder`` (``.b2nd``, ``.npy`` or ``.npz``; the
    ``.pkl`` when none exists); a :class:`~ssl_nnunet.data.multi_dataset.MultiDataset` names its member's file."""
    if hasattr(dataset, "case_file"):
        return dataset.case_file(identifier)
    folder = getattr(dataset, "source_folder", "")
    for ending in (".b2nd", ".npy", ".npz"):
        path = os.path.join(folder, identifier + ending)
        if os.path.isfile(path):
            return path
    return os.path.join(folder, identifier + ".pkl")


class CaseCache:
    """At most ``max_open_cases`` open case arrays (LRU) plus the :class:`CaseInfo` of every case seen.

    Args:
        dataset: an nnU-Net dataset (``load_case(identifier) -> (data, seg, seg_prev, properties)``).
        identifiers: the cases the owning sampler draws from (the bad-case share is taken over them).
        max_open_cases: open arrays kept (0: every access opens the case again).
        max_bad_case_fraction: stop when more than this share of ``identifiers`` is unreadable.
        min_good_cases: stop when fewer readable cases remain (e.g. 2 for a pair sampler).
    """

    def __init__(self, dataset, identifiers: Sequence[str], max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
                 max_bad_case_fraction: float = DEFAULT_MAX_BAD_CASE_FRACTION, min_good_cases: int = 1):
        if int(max_open_cases) < 0:
            raise ValueError(f"max_open_cases must be >= 0, got {max_open_cases}")
        if not 0.0 <= float(max_bad_case_fraction) < 1.0:
            raise ValueError(f"max_bad_case_fraction must lie in [0, 1), got {max_bad_case_fraction}")
        self.dataset = dataset
        self.num_cases = len(identifiers)
        self.max_open_cases = int(max_open_cases)
        self.max_bad_case_fraction = float(max_bad_case_fraction)
        self.min_good_cases = int(min_good_cases)
        self._open: "OrderedDict[str, object]" = OrderedDict()
        self._info: Dict[str, CaseInfo] = {}
        self.bad: Dict[str, str] = {}  # identifier -> "path: reason"

    # ------------------------------------------------------------------ access
    def _load(self, identifier: str):
        try:
            data, _seg, _seg_prev, props = self.dataset.load_case(identifier)
            shape = tuple(int(s) for s in data.shape[1:])
            box = props.get("ssl_body_bbox") or [[0, s] for s in shape]
            info = CaseInfo(shape, tuple((int(lo), int(hi)) for lo, hi in box))
        except Exception as e:  # any failure of nnU-Net's reader: the case is unusable
            raise UnreadableCaseError(identifier, case_file(self.dataset, identifier), e) from e
        self._info[identifier] = info
        return data

    def data(self, identifier: str):
        """The case's array ``(C, a0, a1, a2)`` (blosc2/numpy; opened and kept in the LRU)."""
        if identifier in self._open:
            self._open.move_to_end(identifier)
            return self._open[identifier]
        data = self._load(identifier)
        if self.max_open_cases > 0:
            self._open[identifier] = data
            while len(self._open) > self.max_open_cases:
                self._open.popitem(last=False)  # the array's file and mapping close with its last reference
        return data

    def info(self, identifier: str) -> CaseInfo:
        """The case's :class:`CaseInfo` (opens the case the first time)."""
        if identifier not in self._info:
            self.data(identifier)
        return self._info[identifier]

    def read(self, identifier: str, reader: Callable[[object], T]) -> T:
        """``reader(data)`` on the case's array; a failure while reading raises :class:`UnreadableCaseError`."""
        data = self.data(identifier)
        try:
            return reader(data)
        except Exception as e:
            self._open.pop(identifier, None)
            raise UnreadableCaseError(identifier, case_file(self.dataset, identifier), e) from e

    # ------------------------------------------------------------------ bad cases
    def mark_bad(self, error: UnreadableCaseError) -> None:
        """Log and remember an unreadable case; raises :class:`SSLInputError` naming the bad cases once more
        than ``max_bad_case_fraction`` of the cases (or all but ``min_good_cases``) are bad."""
        self._open.pop(error.identifier, None)
        self.bad[error.identifier] = f"{error.path}: {type(error.cause).__name__}: {error.cause}"
        logger.warning("skipping unreadable case %s (%s: %s); %d of %d cases unreadable so far",
                       error.identifier, error.path, error.cause, len(self.bad), self.num_cases)
        too_many = len(self.bad) > self.max_bad_case_fraction * self.num_cases
        if too_many or self.num_cases - len(self.bad) < self.min_good_cases:
            listed = "\n  ".join(f"{k}: {v}" for k, v in list(self.bad.items())[:20])
            more = f"\n  ... and {len(self.bad) - 20} more" if len(self.bad) > 20 else ""
            raise SSLInputError(
                f"{len(self.bad)} of {self.num_cases} preprocessed cases are unreadable (more than "
                f"{self.max_bad_case_fraction:.0%} allowed):\n  {listed}{more}\nRe-run ssl_nnunet_preprocess for "
                f"these cases (delete their files first) or remove them from the preprocessed folder.")

    def is_bad(self, identifier: str) -> bool:
        return identifier in self.bad

    @property
    def num_open(self) -> int:
        """Case arrays open now (at most ``max_open_cases``)."""
        return len(self._open)

    @property
    def num_seen(self) -> int:
        """Distinct cases opened so far (their :class:`CaseInfo` is kept)."""
        return len(self._info)

    def close(self) -> None:
        """Closes every open array (their files and mappings)."""
        self._open.clear()


def choose_cases(rng: np.random.RandomState, identifiers: List[str], count: int, cache: CaseCache,
                 groups=None) -> List[str]:
    """``count`` distinct identifiers drawn by ``rng`` (``rng.choice`` without replacement), redrawn while one of
    them is a known bad case of ``cache`` (with no bad case this is exactly one ``rng.choice`` call). With
    ``groups`` (:class:`~ssl_nnunet.data.multi_dataset.DatasetGroups`, several datasets) a dataset is drawn by
    its weight first and the cases from it."""
    while True:
        indices = (rng.choice(len(identifiers), count, replace=False) if groups is None
                   else groups.draw(rng, count))
        picked = [identifiers[i] for i in indices]
        if not any(cache.is_bad(p) for p in picked):
            return picked
