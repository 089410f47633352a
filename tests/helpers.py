"""Shared test helpers: synthetic nnU-Net raw datasets and the plan -> preprocess path (cpu_smoke).

Imported by test modules as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``); the nnU-Net
folders are set by ``conftest.py`` before anything imports nnunetv2.
"""
import os

import numpy as np


def write_synthetic_dataset(dataset_id: int, name: str, n_cases: int = 4, shape=(40, 44, 48),
                            spacing=(2.0, 2.0, 2.0), labeled: bool = False, channel_names=None, seed: int = 0):
    """A small nnU-Net raw dataset of noisy ellipsoid 'bodies' (array order z, y, x); returns its folder."""
    import SimpleITK as sitk
    from ssl_nnunet.utilities.file_io import atomic_save_json
    channel_names = channel_names or {"0": "MRI"}
    folder = os.path.join(os.environ["nnUNet_raw"], f"Dataset{dataset_id:03d}_{name}")
    os.makedirs(os.path.join(folder, "imagesTr"), exist_ok=True)
    if labeled:
        os.makedirs(os.path.join(folder, "labelsTr"), exist_ok=True)
    rng = np.random.RandomState(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    for i in range(n_cases):
        radii = rng.uniform(0.6, 0.85, 3)
        body = (grid ** 2 / radii[:, None, None, None] ** 2).sum(0) < 1
        inner = (grid ** 2 / (0.5 * radii[:, None, None, None]) ** 2).sum(0) < 1
        case = f"{name}_{i:03d}"
        for c in range(len(channel_names)):
            img = 100.0 * body + 80.0 * inner + rng.normal(0, 5, shape) * body
            itk = sitk.GetImageFromArray(img.astype(np.float32))
            itk.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(itk, os.path.join(folder, "imagesTr", f"{case}_{c:04d}.nii.gz"))
        if labeled:
            seg = sitk.GetImageFromArray((body.astype(np.uint8) + inner.astype(np.uint8)))
            seg.SetSpacing(tuple(float(s) for s in spacing[::-1]))
            sitk.WriteImage(seg, os.path.join(folder, "labelsTr", f"{case}.nii.gz"))
    labels = {"background": 0, "body": 1, "inner": 2} if labeled else {"background": 0}
    atomic_save_json({"channel_names": channel_names, "labels": labels, "numTraining": n_cases,
                      "file_ending": ".nii.gz"}, os.path.join(folder, "dataset.json"))
    return folder


def prepare_planned_dataset(dataset_id: int, name: str, method: str = None, method_updates: dict = None, **kw):
    """Synthetic dataset -> fingerprint -> cpu_smoke sslPlans.json -> preprocessing; optionally update the plan
    entry of ``method`` (e.g. ``iterations_per_epoch``). Returns the path of sslPlans.json."""
    import json
    from ssl_nnunet.experiment_planning.fingerprint import extract_fingerprint
    from ssl_nnunet.experiment_planning.planner import plan_experiment
    from ssl_nnunet.experiment_planning.preprocess import preprocess
    write_synthetic_dataset(dataset_id, name, **kw)
    extract_fingerprint(dataset_id, 1, verbose=False)
    plan_experiment(dataset_id, "cpu_smoke", verbose=False)
    preprocess(dataset_id, num_processes=1, verbose=False)
    path = os.path.join(os.environ["nnUNet_preprocessed"], f"Dataset{dataset_id:03d}_{name}", "sslPlans.json")
    if method_updates:
        with open(path) as f:
            plans = json.load(f)
        plans["ssl"]["methods"][method].update(method_updates)
        with open(path, "w") as f:
            json.dump(plans, f)
    return path


def tensorboard_scalars(log_dir):
    """``{tag: [(step, value), ...]}`` of every scalar in the TensorBoard event files under ``log_dir``, read
    with TensorBoard's own reader; also returns the image tags: ``(scalars, image_tags)``."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
    return scalars, list(tags["images"])


def load_primus_export_into_smoke_trainer_network(bundle: str, pretrained_state: dict, num_classes: int):
    """Load a Primus bundle's ``checkpoint_final.pth`` into the network nnU-Net's ``nnUNet_Primus_SSLSmoke_Trainer``
    builds from the bundle's plans (``load_pretrained_weights`` asserts every key and shape), then check each key:
    ``down_projection.*`` / ``eva.*`` equal the pretrained network's ``pretrained_state``, the rest the bundle's
    (fresh ``up_projection`` with ``num_classes`` outputs). Returns the loaded network."""
    import sys

    import torch
    from nnunetv2.run.load_pretrained_weights import load_pretrained_weights
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from ssl_nnunet.nnunet_trainers import trainer_dir
    sys.path.insert(0, trainer_dir())
    try:
        from nnUNet_Primus_SSLSmoke_Trainer import nnUNet_Primus_SSLSmoke_Trainer as trainer_class
    finally:
        sys.path.remove(trainer_dir())
    path = os.path.join(bundle, "checkpoint_final.pth")
    ckpt = torch.load(path, weights_only=True)
    pm = PlansManager(ckpt["init_args"]["plans"])
    net = trainer_class.build_network_architecture(pm, pm.get_configuration("3d_fullres"), 1, num_classes, False)
    load_pretrained_weights(net, path)
    loaded = net.state_dict()
    assert set(loaded) == set(ckpt["network_weights"])
    for k, v in loaded.items():
        expected = pretrained_state[k] if k.startswith(("down_projection.", "eva.")) else ckpt["network_weights"][k]
        assert torch.equal(v, expected.cpu()), k
    last = max(k for k in loaded if k.startswith("up_projection.") and k.endswith(".weight"))
    assert loaded[last].shape[1] == num_classes, last
    return net


def train_on_fixed_batch(method, batch, steps: int, lr: float = 2e-3):
    """``steps`` AdamW steps of ``method`` on one fixed ``batch`` (views drawn with the same seed every step, the
    method's per-step hook after each) -> the outputs of every step, ``[{term: float}]``."""
    import torch
    opt = torch.optim.AdamW([p for p in method.parameters() if p.requires_grad], lr=lr)
    outs = []
    for step in range(steps):
        out = method(batch, torch.Generator().manual_seed(0))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        method.after_optimizer_step(step, steps)
        outs.append({k: float(v.detach()) for k, v in out.items()})
    return outs
