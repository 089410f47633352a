"""A folder of scans becomes an nnU-Net raw dataset (``ssl_nnunet_make_dataset``).

Walks ``-i FOLDER`` (NIfTI, NRRD, MetaImage; optionally only the files matching ``--glob``) and writes
``nnUNet_raw/DatasetXXX_NAME/dataset.json`` whose ``dataset`` key (nnU-Net v2's explicit file list) references
the files where they are — nothing is copied. Without ``--channels`` every file is one single-channel case;
with ``--channels PAT1 PAT2 ...`` a file belongs to the channel whose regular expression it matches and the
files that differ only in that match form one case. Each case records ``subject`` and ``session`` when the
path tells them (BIDS ``sub-*`` / ``ses-*`` components, or ``--subject_level`` / ``--session_level``). The
dataset has no ``labels`` key: it is unlabeled (ssl_nnunet treats it as background only). Images are not
read here; ``ssl_nnunet_extract_fingerprint`` checks every file.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from ssl_nnunet.paths import nnunet_raw
from ssl_nnunet.utilities.errors import SSLInputError, run_cli
from ssl_nnunet.utilities.file_io import atomic_save_json, dataset_name_from_id

FILE_ENDINGS = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha", ".mhd")
READER = "SimpleITKIO"  # reads every ending above, so one dataset may mix formats


def file_ending(path: str) -> Optional[str]:
    lower = path.lower()
    return next((e for e in FILE_ENDINGS if lower.endswith(e)), None)


def find_images(folder: str, glob: str = "**/*") -> List[str]:
    """Image files under ``folder`` matching ``glob`` (relative to ``folder``), as sorted relative POSIX paths;
    hidden files and folders are skipped."""
    root = Path(folder)
    found = []
    for p in root.glob(glob):
        rel = p.relative_to(root)
        if any(part.startswith(".") for part in rel.parts) or not p.is_file() or file_ending(p.name) is None:
            continue
        found.append(rel.as_posix())
    return sorted(found)


def _sanitize(text: str) -> str:
    text = re.sub(r"[^A-Za-z0-9.\-]+", "_", text)
    return re.sub(r"_+", "_", text).strip("_-.")


def _bids_entity(rel: str, prefix: str) -> Optional[str]:
    for token in re.split(r"[/_]", rel):
        if token.startswith(prefix) and len(token) > len(prefix):
            return token
    return None


def subject_and_session(rel: str, subject_level: Optional[int], session_level: Optional[int]) -> Dict[str, str]:
    """``subject`` / ``session`` of a file from its path relative to the input folder: the folder at
    ``--subject_level`` / ``--session_level`` (0 = first folder below the input) when given, else BIDS
    ``sub-*`` / ``ses-*`` entities, else none (then each case counts as its own subject)."""
    dirs = rel.split("/")[:-1]
    out = {}

    def level(k, what):
        if k >= len(dirs):
            raise SSLInputError(f"{rel}: --{what}_level {k} but the file is only {len(dirs)} folder(s) deep. "
                                f"Choose a smaller level or a --glob that selects the files at that depth.")
        return dirs[k]

    subject = level(subject_level, "subject") if subject_level is not None else _bids_entity(rel, "sub-")
    session = level(session_level, "session") if session_level is not None else _bids_entity(rel, "ses-")
    if subject:
        out["subject"] = subject
    if session:
        out["session"] = session
    return out


def build_dataset_json(folder: str, name: str, glob: str = "**/*", channels: Sequence[str] = (),
                       channel_names: Sequence[str] = (), subject_level: Optional[int] = None,
                       session_level: Optional[int] = None, skip_incomplete: bool = False,
                       verbose: bool = True) -> dict:
    """The dataset.json for the images under ``folder`` (see module docstring)."""
    folder = os.path.abspath(folder)
    if not os.path.isdir(folder):
        raise SSLInputError(f"-i {folder} is not a folder. Pass the folder that holds the scans.")
    files = find_images(folder, glob)
    if not files:
        raise SSLInputError(f"No image files ({', '.join(FILE_ENDINGS)}) matching --glob '{glob}' under {folder}. "
                            f"Check the folder and the pattern (it is relative to the folder, e.g. '**/anat/*').")
    patterns = [re.compile(p) for p in channels] if channels else []
    if channel_names and len(channel_names) != max(1, len(patterns)):
        raise SSLInputError(f"--channel_names lists {len(channel_names)} name(s) but there are "
                            f"{max(1, len(patterns))} channel(s); give one name per --channels pattern.")
    names = list(channel_names) or (
        [p if re.fullmatch(r"[\w\-]+", p) else f"channel_{i}" for i, p in enumerate(channels)] if channels
        else ["image"])

    groups: Dict[str, Dict[int, str]] = collections.defaultdict(dict)  # key without channel part -> channel -> file
    ignored = []
    for rel in files:
        stem = rel[:-len(file_ending(rel))]
        if not patterns:
            groups[stem][0] = rel
            continue
        hits = [(c, m) for c, p in enumerate(patterns) if (m := p.search(stem))]
        if not hits:
            ignored.append(rel)
            continue
        if len(hits) > 1:
            raise SSLInputError(f"{os.path.join(folder, rel)} matches the patterns of several channels "
                                f"({', '.join(channels[c] for c, _ in hits)}). Make the --channels patterns "
                                f"exclusive (e.g. '_T1w$' instead of 'T1').")
        c, m = hits[0]
        key = stem[:m.start()] + stem[m.end():]
        if c in groups[key]:
            raise SSLInputError(f"{os.path.join(folder, rel)} and {os.path.join(folder, groups[key][c])} would be "
                                f"channel '{names[c]}' of the same case. Make the pattern more specific or "
                                f"narrow the files with --glob.")
        groups[key][c] = rel
    if ignored and verbose:
        print(f"{len(ignored)} file(s) match none of the --channels patterns and are ignored "
              f"(e.g. {', '.join(ignored[:3])}).")

    n_channels = len(names)
    incomplete = {k: sorted(set(range(n_channels)) - set(v)) for k, v in groups.items() if len(v) < n_channels}
    if incomplete:
        example = sorted(incomplete)[0]
        missing = ", ".join(names[c] for c in incomplete[example])
        if not skip_incomplete:
            raise SSLInputError(f"{len(incomplete)} case(s) lack a channel, e.g. {os.path.join(folder, example)}* "
                                f"has no file for channel(s) {missing}. Add the files, fix the --channels "
                                f"patterns, or pass --skip_incomplete to leave such cases out.")
        if verbose:
            print(f"Leaving out {len(incomplete)} incomplete case(s) (e.g. {example}: no {missing}).")
        for k in incomplete:
            del groups[k]
    if not groups:
        raise SSLInputError(f"No complete case under {folder}: every case lacks a channel.")

    # case id: the file name without the channel part when those are unique, else the whole relative path
    short = {k: _sanitize(k.rsplit("/", 1)[-1]) for k in groups}
    unique = len(set(short.values())) == len(short) and all(short.values())
    case_ids = {k: (short[k] if unique else _sanitize(k)) for k in groups}
    seen = {}
    for k, cid in case_ids.items():
        if not cid or cid in seen:
            raise SSLInputError(f"Files {groups[k][0]} and {groups[seen.get(cid, k)][0]} give the same case id "
                                f"'{cid}'. Rename one of them or narrow the files with --glob.")
        seen[cid] = k

    entries = {}
    for k in sorted(groups, key=lambda k: case_ids[k]):
        rels = [groups[k][c] for c in range(n_channels)]
        entries[case_ids[k]] = {"images": [os.path.join(folder, r) for r in rels],
                                **subject_and_session(rels[0], subject_level, session_level)}
    endings = collections.Counter(file_ending(r) for g in groups.values() for r in g.values())
    return {
        "name": name,
        "description": f"Unlabeled scans under {folder}, listed by ssl_nnunet_make_dataset (files not copied)",
        "channel_names": {str(i): n for i, n in enumerate(names)},
        "file_ending": endings.most_common(1)[0][0],
        "overwrite_image_reader_writer": READER,
        "numTraining": len(entries),
        "dataset": entries,
    }


def make_dataset(folder: str, dataset_id: int, name: str, overwrite: bool = False, verbose: bool = True,
                 **kwargs) -> str:
    """Write ``nnUNet_raw/DatasetXXX_NAME/dataset.json`` for the scans under ``folder``; returns its path.
    Rerunning with the same arguments leaves an identical file in place; a different one needs ``overwrite``."""
    if not 1 <= int(dataset_id) <= 999:
        raise SSLInputError(f"-d {dataset_id}: nnU-Net dataset ids are 1 .. 999.")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SSLInputError(f"-n '{name}': use letters, digits, '_' and '-' only (it becomes the folder name "
                            f"Dataset{int(dataset_id):03d}_{name}).")
    dataset_name = f"Dataset{int(dataset_id):03d}_{name}"
    try:
        existing = dataset_name_from_id(int(dataset_id))
    except SSLInputError as e:
        if "ambiguous" in str(e):
            raise
        existing = None
    if existing not in (None, dataset_name):
        raise SSLInputError(f"Dataset id {int(dataset_id)} is already used by {existing}. Choose another -d or "
                            f"-n {existing.split('_', 1)[1]}.")
    dataset_json = build_dataset_json(folder, name, verbose=verbose, **kwargs)
    path = os.path.join(nnunet_raw(), dataset_name, "dataset.json")
    if os.path.isfile(path):
        try:
            with open(path) as f:
                same = json.load(f) == dataset_json
        except (OSError, json.JSONDecodeError):
            same = False
        if same:
            if verbose:
                print(f"{path} is up to date ({dataset_json['numTraining']} case(s)).")
            return path
        if not overwrite:
            raise SSLInputError(f"{path} exists and differs from what this folder gives. Pass --overwrite to "
                                f"replace it (then rerun ssl_nnunet_plan_and_preprocess), or choose another -d.")
    atomic_save_json(dataset_json, path)
    if verbose:
        subjects = {e.get("subject") for e in dataset_json["dataset"].values()} - {None}
        print(f"{path} written: {dataset_json['numTraining']} case(s), {len(dataset_json['channel_names'])} "
              f"channel(s) {list(dataset_json['channel_names'].values())}, {len(subjects)} subject(s). Next: "
              f"ssl_nnunet_plan_and_preprocess -d {int(dataset_id)}")
    return path


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Turn a folder of scans into an nnU-Net raw dataset that references "
                                            "the files in place (unlabeled, for pretraining).")
    p.add_argument("-i", required=True, help="folder with the scans (searched recursively)")
    p.add_argument("-d", type=int, required=True, help="dataset id, 1..999")
    p.add_argument("-n", required=True, help="dataset name (folder Dataset<ID>_<NAME>)")
    p.add_argument("--glob", default="**/*", help="only files matching this pattern relative to -i "
                                                   "(pathlib syntax, default '**/*': every file)")
    p.add_argument("--channels", nargs="+", default=(), metavar="REGEX",
                   help="one regular expression per channel, searched in each file's path relative to -i without "
                        "its ending (e.g. --channels _T1w$ _FLAIR$); files that differ only in the match form a case")
    p.add_argument("--channel_names", nargs="+", default=(), metavar="NAME",
                   help="channel names for dataset.json (they pick nnU-Net's normalisation: 'CT' for CT); "
                        "default: the patterns when they are plain words, else channel_0 ..; one channel: 'image'")
    p.add_argument("--subject_level", type=int, default=None,
                   help="folder depth (0 = first folder below -i) that names the subject (default: a BIDS 'sub-*' "
                        "entity, else none)")
    p.add_argument("--session_level", type=int, default=None,
                   help="folder depth that names the session (default: a BIDS 'ses-*' entity, else none)")
    p.add_argument("--skip_incomplete", action="store_true", help="leave out cases that lack a channel")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, different dataset.json")
    p.add_argument("--quiet", action="store_true")

    def run():
        a = p.parse_args(argv)
        make_dataset(a.i, a.d, a.n, overwrite=a.overwrite, verbose=not a.quiet, glob=a.glob, channels=a.channels,
                     channel_names=a.channel_names, subject_level=a.subject_level, session_level=a.session_level,
                     skip_incomplete=a.skip_incomplete)
    run_cli(run)


if __name__ == "__main__":
    main()
