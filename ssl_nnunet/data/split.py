"""Subject-aware held-out split of a pretraining run (``ssl_split.json`` in the run folder).

The validation loss of a pretraining run is measured on held-out cases; they must not share a subject with the
training cases (two sessions of one patient are nearly the same image, so the held-out loss would be a training
loss). The subject of a case is, in this order:

1. the ``subject`` field of its entry in the ``dataset`` key of dataset.json (``ssl_nnunet_make_dataset``
   writes it from BIDS ``sub-*`` folders or ``--subject_level``);
2. else the case id matched against the subject pattern (default :data:`DEFAULT_SUBJECT_PATTERN`, option
   ``--subject_pattern`` of ``ssl_nnunet_pretrain``): the named group ``subject`` of a full match; the default
   strips one trailing session token — ``_`` followed by ``ses``, ``session``, ``visit``, ``tp`` or
   ``timepoint``, an optional ``-`` or ``_`` and letters/digits (case-insensitive): ``sub-01_ses-02`` ->
   ``sub-01``, ``P007_visit3`` -> ``P007``, ``BraTS_0001`` -> no match;
3. else the case is its own subject.

With several datasets the split is made per dataset (each contributes its own held-out share) and subjects of
different datasets are different subjects. Per dataset: ``n_val = max(k, n // 10)`` held-out cases (``k`` = cases
one sample needs, 2 for pair objectives) when ``n >= 2k + 1``, else none; whole subjects are taken from the end of
the sorted subject list until ``n_val`` is reached, skipping a subject that would leave fewer than ``k``
training cases. With one case per subject this is exactly the previous rule (the last ``n_val`` sorted cases).
"""
from __future__ import annotations

import os
import re
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

from ssl_nnunet.data.multi_dataset import SEPARATOR, split_identifier
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.utilities.file_io import atomic_save_json, load_json

DEFAULT_SUBJECT_PATTERN = r"(?P<subject>.+?)_(?:ses|session|visit|tp|timepoint)[-_]?[A-Za-z0-9]+"
SPLIT_FILE = "ssl_split.json"
SPLIT_VERSION = 1


def compile_subject_pattern(pattern: Optional[str]) -> "re.Pattern":
    """The compiled ``--subject_pattern`` (default :data:`DEFAULT_SUBJECT_PATTERN`); it needs a ``subject`` group."""
    text = DEFAULT_SUBJECT_PATTERN if pattern is None else pattern
    try:
        compiled = re.compile(text, re.IGNORECASE)
    except re.error as e:
        raise SSLInputError(f"--subject_pattern {text!r} is not a valid regular expression: {e}") from None
    if "subject" not in compiled.groupindex:
        raise SSLInputError(f"--subject_pattern {text!r} needs a named group (?P<subject>...) that captures the "
                            f"subject part of a case id.")
    return compiled


def case_subjects(case_ids: Sequence[str], dataset_json: dict, pattern: "re.Pattern") -> Tuple[Dict[str, str], str]:
    """``({case: subject}, source)`` for the cases of one dataset; ``source`` says where the subjects came from
    (``"dataset.json subject field"``, ``"case-id pattern ..."`` or both)."""
    entries = dataset_json.get("dataset") or {}
    out, from_field, from_pattern = {}, 0, 0
    for case in case_ids:
        entry = entries.get(case) if isinstance(entries, dict) else None
        subject = entry.get("subject") if isinstance(entry, dict) else None
        if subject not in (None, ""):
            out[case] = str(subject)
            from_field += 1
            continue
        m = pattern.fullmatch(case)
        if m and m.group("subject"):
            out[case] = m.group("subject")
            from_pattern += 1
        else:
            out[case] = case
    parts = []
    if from_field:
        parts.append(f"dataset.json subject field ({from_field} cases)")
    if from_pattern:
        parts.append(f"case-id pattern {pattern.pattern!r} ({from_pattern} cases)")
    own = len(case_ids) - from_field - from_pattern
    if own:
        parts.append(f"own subject ({own} cases)")
    return out, "; ".join(parts)


def split_one_dataset(case_ids: Sequence[str], subjects: Dict[str, str], needed: int) -> Tuple[List[str], List[str]]:
    """``(train, val)`` (sorted) of one dataset's cases: whole subjects held out (rule in the module docstring)."""
    ids = sorted(case_ids)
    n = len(ids)
    target = max(needed, n // 10) if n >= 2 * needed + 1 else 0
    by_subject: Dict[str, List[str]] = defaultdict(list)
    for c in ids:
        by_subject[subjects[c]].append(c)
    val: List[str] = []
    if target:
        for subject in sorted(by_subject, reverse=True):
            if len(val) >= target:
                break
            cases = by_subject[subject]
            if n - len(val) - len(cases) < needed:
                continue
            val.extend(cases)
        if len(val) < needed:  # one subject holds (nearly) everything: no held-out cases from this dataset
            val = []
    held = set(val)
    return [c for c in ids if c not in held], sorted(val)


def make_split(identifiers: Sequence[str], dataset_jsons: Dict[Optional[str], dict], needed: int,
               pattern: "re.Pattern", single_name: str = "dataset") -> dict:
    """The split of ``identifiers`` (plain case ids of one dataset, or ``"<Dataset>/<case>"`` of several;
    ``dataset_jsons`` keyed by dataset name, ``None`` for the single dataset, reported as ``single_name``). Returns the ``ssl_split.json``
    dict: ``train``, ``val`` (sorted identifiers) and per dataset the case/subject counts and subject source."""
    per_dataset: Dict[Optional[str], List[str]] = defaultdict(list)
    for i in identifiers:
        per_dataset[split_identifier(i)[0]].append(i)
    train, val, info = [], [], {}
    for name in sorted(per_dataset, key=lambda n: (n is not None, n or "")):
        ids = per_dataset[name]
        cases = [split_identifier(i)[1] for i in ids]
        subjects, source = case_subjects(cases, dataset_jsons.get(name, {}), pattern)
        prefix = "" if name is None else name + SEPARATOR
        tr, va = split_one_dataset(cases, subjects, needed)
        train += [prefix + c for c in tr]
        val += [prefix + c for c in va]
        info[single_name if name is None else name] = {"cases": len(cases), "train_cases": len(tr), "val_cases": len(va),
                                   "subjects": len(set(subjects.values())),
                                   "val_subjects": len({subjects[c] for c in va}), "subject_source": source}
    return {"version": SPLIT_VERSION, "train": sorted(train), "val": sorted(val), "datasets": info,
            "subject_pattern": pattern.pattern, "cases_per_sample": int(needed)}


def write_split(split: dict, run_folder: str) -> str:
    path = os.path.join(run_folder, SPLIT_FILE)
    atomic_save_json(split, path)
    return path


def load_split(run_folder: str, identifiers: Sequence[str]) -> Optional[dict]:
    """The run's saved split, checked against the preprocessed cases on disk (``identifiers``); ``None`` when
    the run folder has none. A case of the split that is gone from disk, or a case on disk that the split does
    not know, raises :class:`SSLInputError` naming them (the held-out set would silently change)."""
    path = os.path.join(run_folder, SPLIT_FILE)
    if not os.path.isfile(path):
        return None
    split = load_json(path, "held-out split")
    if not isinstance(split, dict) or not {"train", "val"} <= set(split):
        raise SSLInputError(f"{path} is not an ssl_nnunet split (no 'train'/'val'); delete it to make a new one.")
    known = set(split["train"]) | set(split["val"])
    on_disk = set(identifiers)
    gone, new = sorted(known - on_disk), sorted(on_disk - known)
    if gone or new:
        parts = []
        if gone:
            parts.append(f"{len(gone)} case(s) of the split are no longer preprocessed: {', '.join(gone[:5])}"
                         + (" ..." if len(gone) > 5 else ""))
        if new:
            parts.append(f"{len(new)} preprocessed case(s) are not in the split: {', '.join(new[:5])}"
                         + (" ..." if len(new) > 5 else ""))
        raise SSLInputError(f"The held-out split {path} does not match the preprocessed data ({'; '.join(parts)}). "
                            f"Restore the data the run started with, or delete {path} to split again (the "
                            f"validation losses before and after are then not comparable).")
    return split
