"""SSLTrainer: nnU-Net's trainer with the label-specific parts replaced by an SSL objective.

Reused from ``nnUNetTrainer``: plans/configuration handling, device and DDP conventions, the grad scaler,
``print_to_log_file``, pretrained-weight loading and the output layout. Replaced: the network is built
from ``sslPlans.json`` with ``num_classes = C_in`` and no deep supervision, wrapped by the method module
(views + heads + loss, :mod:`ssl_nnunet.methods`); data are unlabeled patches from the preprocessed
blosc2 folder; there is no Dice validation — validation reports the SSL loss on held-out cases with fixed
patches and masks; the schedule is per iteration (``--iterations`` overrides the plan's length).

Multi-process runs (torchrun, SLURM, ``-num_gpus``; :mod:`ssl_nnunet.training.distributed`): the plan's batch
size is the global batch, split over the ranks as nnU-Net splits it; parameters the objective never trains are
frozen so DDP needs no unused-parameter search; SIGUSR1 / SIGTERM stop every rank after its current iteration
with a mid-epoch checkpoint that ``--c`` continues at exactly that iteration. As in nnU-Net, ``self.local_rank``
is the rank in the whole job (rank 0 alone writes checkpoints and logs); the GPU index is ``LOCAL_RANK``.

Outputs: ``nnUNet_results/DatasetXXX_Name/SSL_<method>__<plans>__3d_fullres/``: ``checkpoint_latest.pth``
(every epoch and on a stop signal, atomic), ``checkpoint_final.pth``, ``progress.png``, ``training_log_*.txt``, previews,
``plans.json``, ``dataset.json``, ``dataset_fingerprint.json``.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import replace
from datetime import datetime
from typing import Dict, List, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

from ssl_nnunet.data.case_cache import DEFAULT_MAX_OPEN_CASES
from ssl_nnunet.data.loader import PrefetchLoader, SamplerFactory
from ssl_nnunet.data.multi_dataset import MultiDataset, resolve_dataset_weights, split_identifier
from ssl_nnunet.data.samplers import SamplerSpec
from ssl_nnunet.data.split import SPLIT_FILE, compile_subject_pattern, load_split, make_split, write_split
from ssl_nnunet.methods import get_method
from ssl_nnunet.training.distributed import local_device, split_global_batch
from ssl_nnunet.training.logger import SSLLogger
from ssl_nnunet.training.schedule import build_optimizer, learning_rate
from ssl_nnunet.utilities.errors import SSLInputError
from ssl_nnunet.paths import nnunet_preprocessed
from ssl_nnunet.utilities.file_io import (atomic_copy, atomic_save_json, atomic_torch_save, load_json,
                                          ssl_output_folder)
from ssl_nnunet.utilities.network import build_network_from_plans

MAX_CONSECUTIVE_NONFINITE = 5
VALIDATION_SEED = 12345

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_amp_dtype(requested: str, device: torch.device) -> Optional[torch.dtype]:
    """The autocast dtype of the plan's ``amp_dtype``: ``auto`` (default) takes bfloat16 where the device supports
    it (CUDA compute capability >= 8, no grad scaler needed) and float16 (with nnU-Net's grad scaler) otherwise;
    ``bfloat16`` / ``float16`` force one. None off CUDA (the trainer runs fp32 there)."""
    if device.type != "cuda":
        return None
    if requested == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if requested not in AMP_DTYPES:
        raise SSLInputError(f"plan key 'amp_dtype' is '{requested}': use auto, bfloat16 or float16.")
    if requested == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise SSLInputError(f"plan key 'amp_dtype' asks for bfloat16 but {torch.cuda.get_device_name(device)} does "
                            f"not support it: set amp_dtype to auto or float16.")
    return AMP_DTYPES[requested]


def amp_dtype_name(dtype: Optional[torch.dtype]) -> Optional[str]:
    """``"bfloat16"`` / ``"float16"`` of an autocast dtype, None for None (fp32)."""
    return str(dtype).replace("torch.", "") if dtype is not None else None


class SSLTrainer(nnUNetTrainer):
    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        # nnU-Net records the constructor's arguments by introspection, so the signature stays nnU-Net's;
        # the SSL run settings are given to configure() before initialize().
        self._requested_device = device
        self._log_ready = False
        plans = dict(plans)
        plans.setdefault("continue_training", False)
        super().__init__(plans, configuration, fold, dataset_json, device)
        if device.type != "cuda":
            self.device = device  # nnU-Net assumes CUDA under DDP; CPU (gloo) DDP is allowed here
            self.grad_scaler = None
        elif self.is_ddp:
            self.device = local_device(device)  # nnU-Net takes cuda:<global rank>: wrong beyond one node
        self._stray_folder = self.output_folder
        self.method = None
        self.model = None  # the module that computes the loss (DDP-wrapped under DDP)

    def configure(self, method: str, iterations: Optional[int] = None, seed: int = 0, num_prefetch: int = 2,
                  num_loader_workers: int = 0, max_open_cases: int = DEFAULT_MAX_OPEN_CASES,
                  tensorboard: bool = False, datasets: Optional[List[str]] = None, dataset_weights=None,
                  subject_pattern: Optional[str] = None):
        """Select the SSL method and run length; sets the output folder ``SSL_<method>__<plans>__<config>``.

        ``datasets``: the names of all pretraining datasets when there are several (the first is the plans'
        dataset; all share its plan): the run samples across them with ``dataset_weights`` (``None``/"cases",
        "equal" or numbers, :func:`~ssl_nnunet.data.multi_dataset.resolve_dataset_weights`) and its folder is
        ``..._multi_<ids>`` in the first dataset's results folder. ``subject_pattern``: the case-id pattern of
        the subject-aware held-out split (:mod:`ssl_nnunet.data.split`).

        ``num_loader_workers`` > 0 cuts the training patches in that many worker processes
        (:class:`~ssl_nnunet.data.loader.PrefetchLoader`), 0 in a thread; ``max_open_cases`` bounds the case
        files each sampler keeps open (:class:`~ssl_nnunet.data.case_cache.CaseCache`). ``tensorboard``: also log
        to ``<output folder>/tensorboard`` (:mod:`ssl_nnunet.utilities.tensorboard`)."""
        plans = self.plans_manager.plans
        if "ssl" not in plans or method not in plans["ssl"].get("methods", {}):
            raise SSLInputError(f"Plans '{self.plans_manager.plans_name}' have no ssl.methods.{method} entry. "
                                f"Re-run ssl_nnunet_plan_experiment for this dataset.")
        self.source_dataset_names = list(datasets) if datasets else [self.plans_manager.dataset_name]
        if self.source_dataset_names[0] != self.plans_manager.dataset_name:
            raise ValueError(f"datasets must start with the plans' dataset {self.plans_manager.dataset_name}")
        self.dataset_weights_spec = dataset_weights
        self.subject_pattern = subject_pattern
        compile_subject_pattern(subject_pattern)  # a bad pattern fails now, not after the network is built
        self.source_datasets = [{"name": n} for n in self.source_dataset_names]  # counts filled by the samplers
        self._resumed = False
        self.output_folder_base = ssl_output_folder(self.plans_manager.dataset_name, method,
                                                    self.plans_manager.plans_name, self.configuration_name,
                                                    self.source_dataset_names)
        self.output_folder = self.output_folder_base
        # nnU-Net's constructor made its own (empty) fold folder. Under DDP every rank's constructor creates it:
        # wait until all of them are past that point, then rank 0 alone removes it (a rank still inside
        # os.makedirs would otherwise find its parent gone)
        if self.is_ddp:
            dist.barrier()
        if self.local_rank == 0:
            for folder in (self._stray_folder, os.path.dirname(self._stray_folder)):
                try:
                    os.rmdir(folder)
                except OSError:
                    pass
        os.makedirs(self.output_folder, exist_ok=True)
        stamp = datetime.now().strftime("%Y_%m_%d_%H_%M_%S")
        self.log_file = os.path.join(self.output_folder, f"training_log_{stamp}.txt")
        self._log_ready = True

        self.method_name = method
        self.ssl_plan = plans["ssl"]
        self.method_plan = plans["ssl"]["methods"][method]
        mp = self.method_plan
        self.iterations_per_epoch = int(mp["iterations_per_epoch"])
        self.total_iterations = int(iterations) if iterations else int(mp["num_epochs"]) * self.iterations_per_epoch
        if self.total_iterations < 1:
            raise SSLInputError("--iterations must be at least 1")
        self.iterations_per_epoch = min(self.iterations_per_epoch, self.total_iterations)
        self.num_epochs = math.ceil(self.total_iterations / self.iterations_per_epoch)
        self.num_val_iterations_per_epoch = int(mp.get("num_val_iterations", 2))
        self.grad_clip = float(mp.get("grad_clip", 12.0))
        self.use_amp = bool(mp.get("use_amp", True)) and self.device.type == "cuda"
        self.amp_dtype = resolve_amp_dtype(mp.get("amp_dtype", "auto"), self.device) if self.use_amp else None
        if self.amp_dtype != torch.float16:
            self.grad_scaler = None  # bf16 keeps fp32's exponent range: nothing to scale
        self.seed = seed
        self.num_prefetch = num_prefetch
        self.tensorboard = bool(tensorboard)
        self.tb = None  # the TensorBoard sink of rank 0, opened in on_train_start
        if num_loader_workers < 0 or max_open_cases < 0:
            raise SSLInputError(f"-np_loader and --max_open_cases must be >= 0, got {num_loader_workers}, "
                                f"{max_open_cases}")
        self.num_loader_workers = int(num_loader_workers)
        self.max_open_cases = int(max_open_cases)
        self.logger = SSLLogger()
        self.nonfinite_steps = 0
        self.iteration_losses: List[float] = []  # total loss of every optimizer step (this rank)
        self.stop_signal: Optional[str] = None  # name of the signal that stopped the run (SIGUSR1 / SIGTERM)
        self._stop_requested: Optional[str] = None
        self._stop_agreed = False
        self._resume_step = 0  # first step of current_epoch to run (> 0 after a mid-epoch checkpoint)
        self._partial_epoch: Optional[dict] = None  # reduced means of the steps of current_epoch done before it
        self.preview_every = max(1, self.num_epochs // 5)
        return self

    # ------------------------------------------------------------------ setup
    def print_to_log_file(self, *args, also_print_to_console=True, add_timestamp=True):
        if getattr(self, "_log_ready", False):
            super().print_to_log_file(*args, also_print_to_console=also_print_to_console, add_timestamp=add_timestamp)

    @property
    def world_size(self) -> int:
        return dist.get_world_size() if self.is_ddp else 1

    def initialize(self):
        if self.was_initialized:
            raise RuntimeError("SSLTrainer.initialize() called twice")
        if not getattr(self, "_log_ready", False):
            raise RuntimeError("call SSLTrainer.configure(method, ...) before initialize()")
        torch.manual_seed(self.seed + 1000 * self.local_rank)
        self.num_input_channels = determine_num_input_channels(self.plans_manager, self.configuration_manager,
                                                               self.dataset_json)
        self._set_batch_size()
        network = build_network_from_plans(self.plans_manager.plans, self.num_input_channels, self.num_input_channels,
                                           deep_supervision=False, configuration=self.configuration_name)
        family = self.ssl_plan.get("architecture_family", "cnn")
        method_cls = get_method(self.method_name).variant_for(family)
        if method_cls is None:
            raise SSLInputError(f"Method '{self.method_name}' has no realisation on a {family} backbone (plans "
                                f"'{self.plans_manager.plans_name}'); use a CNN plan or another method.")
        self.method = method_cls(network, self.method_plan, self.ssl_plan, self.num_input_channels).to(self.device)
        self.network = self.method.network
        self._freeze_untrained_parameters()
        self.optimizer = build_optimizer([p for p in self.method.parameters() if p.requires_grad],
                                         self.method_plan["optimizer"])
        self.lr_scheduler = None
        if self.is_ddp:
            # every trainable parameter gets a gradient every step (untrained ones are frozen above), so DDP skips
            # the per-step search of the graph for unused parameters
            self.model = DDP(self.method, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                             find_unused_parameters=False, static_graph=method_cls.static_graph)
        else:
            self.model = self.method
        self.was_initialized = True

    def _set_batch_size(self):
        """The plan's ``batch_size`` is the global batch: split over the ranks as nnU-Net does (remainder on the
        first ranks; a world larger than the batch is refused). The learning rate is the plan's whatever the world
        size (the global batch does not change with it). With an uneven split every rank's loss is weighted by
        ``b_rank · world / B`` so that DDP's gradient average equals the mean over the global batch."""
        self.global_batch_size = int(self.method_plan["batch_size"])
        self.batch_sizes_per_rank = split_global_batch(
            self.global_batch_size, self.world_size,
            f"ssl.methods.{self.method_name}.batch_size of {self.plans_manager.plans_name}")
        self.batch_size = self.batch_sizes_per_rank[self.local_rank]
        self.loss_weight = self.batch_size * self.world_size / self.global_batch_size
        self.lr_scaling = "none: the plan's learning rate for the plan's global batch, any number of processes"

    def _freeze_untrained_parameters(self):
        names = set(self.method.untrained_parameters())
        frozen = [n for n, p in self.method.named_parameters() if n in names and p.requires_grad]
        for n, p in self.method.named_parameters():
            if n in names:
                p.requires_grad_(False)
        self.frozen_parameters = frozen
        if frozen:
            self.print_to_log_file(f"Not trained by {self.method_name} (frozen, exported at initialisation): "
                                   f"{', '.join(frozen)}", also_print_to_console=False)

    def _make_samplers(self):
        from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
        folder = self.preprocessed_dataset_folder
        if not os.path.isdir(folder):
            raise SSLInputError(f"Preprocessed data {folder} not found. Run ssl_nnunet_preprocess -d "
                                f"{self.plans_manager.dataset_name} first.")
        dataset_class = infer_dataset_class(folder)
        method_cls = type(self.method)
        needed = method_cls.cases_per_sample
        dataset, identifiers, dataset_jsons = self._source_data(dataset_class)
        if len(identifiers) < needed:
            raise SSLInputError(f"{self.method_name} needs at least {needed} preprocessed cases, {folder} has "
                                f"{len(identifiers)}.")
        train_ids, self.val_identifiers = self._held_out_split(identifiers, dataset_jsons, needed)
        if isinstance(dataset, MultiDataset):
            counts = {n: sum(split_identifier(i)[0] == n for i in train_ids) for n in dataset.names}
            dataset.weights = resolve_dataset_weights(self.dataset_weights_spec, counts)
            for entry in self.source_datasets:
                entry["weight"] = dataset.weights[entry["name"]]
            self.print_to_log_file("Datasets (training cases, sampling weight): " + ", ".join(
                f"{n} ({counts[n]}, {dataset.weights[n]:.3f})" for n in dataset.names))
        patch = method_cls.required_patch_size(self.method_plan)
        sampler_seed = self._sampler_seed()
        train_spec = SamplerSpec(dataset, train_ids, patch, self.batch_size, sampler_seed, self.method_plan,
                                 self.ssl_plan, folder, max_open_cases=self.max_open_cases)
        # built here also with workers: it checks the spec and writes per-dataset caches (Alice's geometry) once
        sampler = method_cls.make_sampler(train_spec)
        pin = self.device.type == "cuda"
        if self.num_loader_workers > 0:
            # worker w of rank r draws with worker_seed(sampler seed, r, w): reproducible for a given -np_loader
            self.dataloader_train = PrefetchLoader(
                None, max(1, self.num_prefetch), self.num_loader_workers, SamplerFactory(method_cls, train_spec),
                seed=sampler_seed, rank=self.local_rank, pin_memory=pin)
        else:
            self.dataloader_train = PrefetchLoader(sampler, self.num_prefetch, pin_memory=pin)
        self._val_spec = replace(train_spec, identifiers=self.val_identifiers, seed=VALIDATION_SEED)
        self.print_to_log_file(f"SSL method {self.method_name}: {len(train_ids)} training / "
                               f"{len(self.val_identifiers)} validation cases, data patch {patch}, global batch "
                               f"{self.global_batch_size} = {'+'.join(map(str, self.batch_sizes_per_rank))} over "
                               f"{self.world_size} process(es) (this rank: {self.batch_size}, loss weight "
                               f"{self.loss_weight:.3g}), LR scaling {self.lr_scaling}; {self.total_iterations} "
                               f"iterations ({self.num_epochs} epochs x {self.iterations_per_epoch}), "
                               f"{self.num_loader_workers} loader worker processes")

    def _source_data(self, dataset_class):
        """``(dataset, sorted identifiers, {dataset name or None: dataset.json})``: the plans' dataset, or a
        :class:`~ssl_nnunet.data.multi_dataset.MultiDataset` of every ``datasets`` entry (identifiers
        ``"<Dataset>/<case>"``)."""
        if len(self.source_dataset_names) == 1:
            folder = self.preprocessed_dataset_folder
            identifiers = sorted(dataset_class.get_identifiers(folder))
            self.source_datasets[0].update(preprocessed_cases=len(identifiers), weight=1.0)
            return dataset_class(folder), identifiers, {None: self.dataset_json}
        members, jsons = {}, {}
        for entry in self.source_datasets:
            name = entry["name"]
            base = os.path.join(nnunet_preprocessed(), name)
            folder = os.path.join(base, self.configuration_manager.data_identifier)
            if not os.path.isdir(folder):
                raise SSLInputError(f"Preprocessed data {folder} of {name} not found. Run "
                                    f"ssl_nnunet_plan_and_preprocess -d {' '.join(self.source_dataset_names)} "
                                    f"first.")
            members[name] = dataset_class(folder)
            jsons[name] = load_json(os.path.join(base, "dataset.json"), "dataset.json")
            entry["preprocessed_cases"] = len(members[name].identifiers)
        dataset = MultiDataset(members, {n: 1.0 for n in members})
        return dataset, dataset.identifiers, jsons

    def _held_out_split(self, identifiers: List[str], dataset_jsons: dict, needed: int):
        """``(train, val)`` identifiers of the subject-aware split (:mod:`ssl_nnunet.data.split`): made and
        written to ``ssl_split.json`` in the run folder (rank 0, atomic), or after a checkpoint was loaded
        (``--c``) the saved one, checked against the cases on disk. No held-out case: validation on the
        training cases (as before)."""
        split = load_split(self.output_folder, identifiers) if self._resumed else None
        how = "reused"
        if split is None:
            split = make_split(identifiers, dataset_jsons, needed, compile_subject_pattern(self.subject_pattern),
                               single_name=self.source_dataset_names[0])
            how = "written"
            if self.local_rank == 0:
                write_split(split, self.output_folder)
        by_name = {e["name"]: e for e in self.source_datasets}
        for name, info in split.get("datasets", {}).items():
            entry = by_name.get(name)
            if entry is not None:
                entry.update(train_cases=info["train_cases"], val_cases=info["val_cases"],
                             subjects=info["subjects"], subject_source=info["subject_source"])
        self.print_to_log_file(f"Held-out split {how} ({os.path.join(self.output_folder, SPLIT_FILE)}): "
                               + "; ".join(f"{n}: {i['train_cases']} training / {i['val_cases']} held-out cases, "
                                           f"{i['val_subjects']} of {i['subjects']} subjects held out "
                                           f"(subjects from {i['subject_source']})"
                                           for n, i in split.get("datasets", {}).items()))
        train = list(split["train"])
        return train, (list(split["val"]) or train)

    def _sampler_seed(self) -> int:
        """Seed of this rank's training sampler at the position the run starts from: ``seed + 1000·rank + epoch``
        at an epoch start (as before); after a mid-epoch checkpoint a seed drawn from (seed, rank, iteration) —
        torch's generator (the methods' masks and views) is re-seeded from the same triple — so a resumed run
        neither replays the batches of the run's first iterations nor depends on how far a loader had prefetched."""
        if self._resume_step == 0:
            return self.seed + 1000 * self.local_rank + self.current_epoch
        position = [self.seed, self.local_rank, self._iteration(self.current_epoch, self._resume_step)]
        seed = int(np.random.SeedSequence(position).generate_state(1)[0])
        torch.manual_seed(seed)
        return seed

    def on_train_start(self):
        if not self.was_initialized:
            self.initialize()
        self._make_samplers()
        if self.local_rank == 0:
            if self.tensorboard:
                from ssl_nnunet.utilities.tensorboard import open_log
                self.tb = open_log(os.path.join(self.output_folder, "tensorboard"))
            atomic_save_json(self.plans_manager.plans, os.path.join(self.output_folder, "plans.json"))
            atomic_save_json(self.dataset_json, os.path.join(self.output_folder, "dataset.json"))
            fp = os.path.join(self.preprocessed_dataset_folder_base, "dataset_fingerprint.json")
            if os.path.isfile(fp):
                atomic_copy(fp, os.path.join(self.output_folder, "dataset_fingerprint.json"))

    # ------------------------------------------------------------------ steps
    def _iteration(self, epoch: int, step: int) -> int:
        return epoch * self.iterations_per_epoch + step

    def _iterations_in_epoch(self, epoch: int) -> int:
        return min(self.iterations_per_epoch, self.total_iterations - epoch * self.iterations_per_epoch)

    def _autocast(self):
        if self.use_amp:
            return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=True)
        import contextlib
        return contextlib.nullcontext()

    def _all_ranks_agree(self, loss: torch.Tensor):
        """``(finite, stop)``: the loss is finite on every rank; some rank received a stop signal. One all-reduce
        (MIN of ``[finite, not stop]``) and one host sync per step, the one the non-finite check needs anyway."""
        flags = torch.stack([torch.isfinite(loss.detach()).float().reshape(()),
                             torch.tensor(0.0 if self._stop_requested else 1.0, device=loss.device)])
        if self.is_ddp:
            dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        finite, go_on = flags.tolist()
        return finite > 0, go_on == 0

    def train_step(self, batch: torch.Tensor, iteration: int) -> Optional[Dict[str, float]]:
        lr = learning_rate(self.method_plan["lr_schedule"], self.method_plan["optimizer"]["lr"], iteration,
                           self.total_iterations)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = batch.to(self.device, non_blocking=True)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            terms = self.model(batch)
        loss = terms["loss"]
        finite, self._stop_agreed = self._all_ranks_agree(loss)
        if not finite:
            self.nonfinite_steps += 1
            self._consecutive_nonfinite += 1
            self.print_to_log_file(f"WARNING: non-finite loss at iteration {iteration}; step skipped "
                                   f"({self._consecutive_nonfinite} in a row)")
            if self._consecutive_nonfinite >= MAX_CONSECUTIVE_NONFINITE:
                raise RuntimeError(
                    f"The SSL loss was NaN/inf for {MAX_CONSECUTIVE_NONFINITE} consecutive iterations (last: "
                    f"{iteration}). Training stopped; the last good checkpoint is kept in {self.output_folder} "
                    f"(resume with --c after lowering the learning rate in the plan, or check the data).")
            return None
        self._consecutive_nonfinite = 0
        if self.loss_weight != 1.0:
            loss = loss * self.loss_weight
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.grad_clip)
            self.optimizer.step()
        self.method.after_optimizer_step(iteration, self.total_iterations)
        return {k: float(v.detach().float().item()) for k, v in terms.items()}

    def _reduce_means(self, outputs: List[Dict[str, float]]) -> Dict[str, float]:
        keys = sorted(outputs[0]) if outputs else []
        means = torch.tensor([np.mean([o[k] for o in outputs]) for k in keys] or [0.0], dtype=torch.float64)
        if self.is_ddp:
            means = means.to(self.device) if self.device.type == "cuda" else means
            dist.all_reduce(means)
            means = means.cpu() / self.world_size
        return {k: float(v) for k, v in zip(keys, means)}

    @torch.no_grad()
    def validation_terms(self, num_iterations: Optional[int] = None) -> List[Dict[str, float]]:
        """Loss terms of each of ``num_iterations`` fixed held-out batches (default: the plan's
        ``num_val_iterations``): the same patches, masks and views every call, and the first k batches are the
        same for any count, so a longer evaluation (``ssl_nnunet_benchmark pretext``) extends the per-epoch one."""
        self.method.eval()
        sampler = type(self.method).make_sampler(replace(self._val_spec, seed=self._val_spec.seed + self.local_rank))
        generator = torch.Generator(device=self.device).manual_seed(VALIDATION_SEED + self.local_rank)
        outputs = []
        for _ in range(num_iterations or self.num_val_iterations_per_epoch):
            batch = sampler.next_batch().to(self.device)
            with self._autocast():
                terms = self.method(batch, generator=generator)
            outputs.append({k: float(v.detach().float().item()) for k, v in terms.items()})
        self.method.train()
        self._last_val_batch = batch
        return outputs

    def validate(self, num_iterations: Optional[int] = None) -> Dict[str, float]:
        """SSL loss on fixed patches and masks of the held-out cases (identical every epoch), averaged."""
        return self._reduce_means(self.validation_terms(num_iterations))

    # ------------------------------------------------------------------ loop
    def run_training(self):
        self.on_train_start()
        handlers = self._install_stop_handlers()
        try:
            self._train_epochs()
        finally:
            for sig, handler in handlers.items():
                signal.signal(sig, handler)
            # join the prefetch thread before the interpreter shuts down: a daemon thread still inside
            # torch/numpy at exit aborts the process ("terminate called without an active exception")
            if self.dataloader_train is not None:
                self.dataloader_train.close()
            if self.tb is not None:
                self.tb.close()

    def _install_stop_handlers(self) -> dict:
        """SIGUSR1 (SLURM's warning before the wall time) and SIGTERM (scancel, preemption, torchrun shutting its
        workers down) only set a flag; the step loop stops all ranks together after the current iteration."""
        if threading.current_thread() is not threading.main_thread():
            return {}
        previous = {}
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            previous[sig] = signal.signal(sig, self._request_stop)
        return previous

    def _request_stop(self, signum, frame):
        self._stop_requested = signal.Signals(signum).name

    def _train_epochs(self):
        from tqdm import tqdm
        self._consecutive_nonfinite = 0
        if self.current_epoch >= self.num_epochs:
            self.print_to_log_file("Training already finished.")
        while self.current_epoch < self.num_epochs:
            epoch = self.current_epoch
            t0 = time.time()
            wait0 = self.dataloader_train.wait_time
            self.method.train()
            outputs = []
            n_iter = self._iterations_in_epoch(epoch)
            first_step, self._resume_step = self._resume_step, 0
            bar = tqdm(range(first_step, n_iter), desc=f"Epoch {epoch + 1}/{self.num_epochs}", leave=False,
                       disable=self.local_rank != 0)
            for step in bar:
                out = self.train_step(next(self.dataloader_train), self._iteration(epoch, step))
                if out is not None:
                    outputs.append(out)
                    self.iteration_losses.append(out["loss"])
                    if self.tb is not None:
                        self.tb.scalars({"iteration/loss": out["loss"]}, self._iteration(epoch, step) + 1)
                    bar.set_postfix(loss=f"{out['loss']:.4f}")
                if self._stop_agreed and step + 1 < n_iter:
                    bar.close()
                    self._stop_mid_epoch(epoch, step + 1, outputs)
                    return
            bar.close()
            train = self._merge_partial_epoch(outputs)
            val = self.validate()
            elapsed = time.time() - t0
            for k, v in train.items():
                self.logger.log(f"train_{k}", v, epoch)
            for k, v in val.items():
                self.logger.log(f"val_{k}", v, epoch)
            self.logger.log("lr", self.optimizer.param_groups[0]["lr"], epoch)
            self.logger.log("epoch_time", elapsed, epoch)
            self.logger.log("data_wait_fraction", (self.dataloader_train.wait_time - wait0) / max(elapsed, 1e-9),
                            epoch)
            self.print_to_log_file(
                f"Epoch {epoch + 1}/{self.num_epochs} ({self._iteration(epoch, n_iter)} iterations): "
                + ", ".join(f"train_{k} {v:.4f}" for k, v in train.items()) + "; "
                + ", ".join(f"val_{k} {v:.4f}" for k, v in val.items())
                + f"; lr {self.optimizer.param_groups[0]['lr']:.2e}; {elapsed:.1f} s")
            if self.tb is not None:  # x axis: iterations done, so a resumed run continues its curves
                self.tb.scalars({**{f"train/{k}": v for k, v in train.items()},
                                 **{f"val/{k}": v for k, v in val.items()},
                                 "lr": self.optimizer.param_groups[0]["lr"], "epoch_time_s": elapsed,
                                 "data_wait_fraction": self.logger.get_value("data_wait_fraction", epoch)},
                                self._iteration(epoch, n_iter))
            self.current_epoch += 1
            if self.local_rank == 0:
                self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
                self.logger.plot_progress_png(self.output_folder)
                if epoch % self.preview_every == 0 or self.current_epoch == self.num_epochs:
                    self._save_preview(epoch)
            if self._stop_agreed and self.current_epoch < self.num_epochs:
                self.stop_signal = self._stop_requested or "signal on another rank"
                self.print_to_log_file(f"Stopped by {self.stop_signal} at the end of epoch {self.current_epoch}; "
                                       f"resume with --c.")
                return
        self.on_train_end()

    def _stop_mid_epoch(self, epoch: int, steps_done: int, outputs: List[Dict[str, float]]):
        """All ranks agreed to stop after step ``steps_done - 1`` of ``epoch``: rank 0 writes
        ``checkpoint_latest.pth`` at that position, with the reduced means of the epoch's steps so far."""
        self._partial_epoch = self._partial_means(outputs)
        self._resume_step = steps_done
        self.stop_signal = self._stop_requested or "signal on another rank"
        if self.local_rank == 0:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_latest.pth"))
        if self.is_ddp:
            dist.barrier()  # no rank exits (and lets a launcher tear the job down) before the checkpoint exists
        self.print_to_log_file(f"Stopped by {self.stop_signal} after iteration "
                               f"{self._iteration(epoch, steps_done)}/{self.total_iterations} (epoch {epoch + 1}, "
                               f"step {steps_done}/{self._iterations_in_epoch(epoch)}); checkpoint_latest.pth "
                               f"written, resume with --c.")

    def _partial_means(self, outputs: List[Dict[str, float]]) -> dict:
        """Means over all ranks of ``outputs`` merged with the steps done before a mid-epoch resume, and their
        count (the non-finite skip is taken by all ranks together, so every rank has the same count)."""
        count = len(outputs)
        means = self._reduce_means(outputs) if outputs else {}
        before = self._partial_epoch
        self._partial_epoch = None
        if before and before["count"]:
            total = count + before["count"]
            means = {k: (before["means"][k] * before["count"] + means.get(k, 0.0) * count) / total
                     for k in before["means"]}
            count = total
        return {"means": means, "count": count}

    def _merge_partial_epoch(self, outputs: List[Dict[str, float]]) -> Dict[str, float]:
        return self._partial_means(outputs)["means"]

    def on_train_end(self):
        if self.is_ddp:
            self.ddp_checksums = self._gather_weight_checksums()
        if self.local_rank == 0:
            self.save_checkpoint(os.path.join(self.output_folder, "checkpoint_final.pth"))
            latest = os.path.join(self.output_folder, "checkpoint_latest.pth")
            if os.path.isfile(latest):
                os.remove(latest)
            self.print_to_log_file(f"Training done. Final checkpoint: "
                                   f"{os.path.join(self.output_folder, 'checkpoint_final.pth')}")

    def _gather_weight_checksums(self) -> List[float]:
        local = torch.tensor([sum(float(p.detach().double().sum()) for p in self.network.parameters())],
                             dtype=torch.float64)
        gathered = [torch.zeros_like(local) for _ in range(self.world_size)]
        if self.device.type == "cuda":
            local = local.to(self.device)
            gathered = [g.to(self.device) for g in gathered]
        dist.all_gather(gathered, local)
        return [float(g.item()) for g in gathered]

    def _save_preview(self, epoch: int) -> None:
        rows = self.method.previews(self._last_val_batch)
        if not rows:
            return
        from ssl_nnunet.training.previews import save_preview_png
        path = save_preview_png(rows, os.path.join(self.output_folder, f"preview_epoch_{epoch + 1:04d}.png"),
                                title=f"{self.method_name}, epoch {epoch + 1}")
        if self.tb is not None:
            self.tb.image_file("preview", path, self._iteration(epoch, self._iterations_in_epoch(epoch)))
            self.tb.flush()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, filename: str) -> None:
        if self.local_rank != 0 or self.disable_checkpointing:
            return
        checkpoint = {
            "network_weights": {k: v.detach().cpu() for k, v in self.network.state_dict().items()},
            "ssl_method_state": {k: v.detach().cpu() for k, v in self.method.state_dict().items()},
            "optimizer_state": self.optimizer.state_dict(),
            "grad_scaler_state": self.grad_scaler.state_dict() if self.grad_scaler is not None else None,
            "amp_dtype": amp_dtype_name(self.amp_dtype),
            "logging": self.logger.get_checkpoint(),
            "_best_ema": None,
            "current_epoch": self.current_epoch,
            "iterations_done": min(self.total_iterations, self._iteration(self.current_epoch, self._resume_step)),
            "iteration_in_epoch": self._resume_step,
            "partial_epoch": self._partial_epoch,
            "stop_signal": self.stop_signal,
            "sampler_seed_rule": "epoch start: seed + 1000*rank + epoch; mid-epoch: "
                                 "SeedSequence([seed, rank, iterations_done]) (sampler and torch)",
            "seed": self.seed,
            "total_iterations": self.total_iterations,
            "world_size": self.world_size,
            "global_batch_size": self.global_batch_size,
            "batch_size_per_rank": list(self.batch_sizes_per_rank),
            "lr_scaling": self.lr_scaling,
            "frozen_parameters": list(self.frozen_parameters),
            "nonfinite_steps": self.nonfinite_steps,
            "iteration_losses": list(self.iteration_losses),
            "init_args": {"plans": self.plans_manager.plans, "configuration": self.configuration_name,
                          "fold": self.fold, "dataset_json": self.dataset_json, "device": torch.device("cpu")},
            "trainer_name": self.__class__.__name__,
            "ssl_method": self.method_name,
            "source_datasets": [dict(e) for e in self.source_datasets],
            "inference_allowed_mirroring_axes": None,
        }
        if getattr(self, "ddp_checksums", None) is not None:
            checkpoint["ddp_rank_weight_checksums"] = self.ddp_checksums
        atomic_torch_save(checkpoint, filename)

    def load_checkpoint(self, filename_or_checkpoint) -> None:
        if not self.was_initialized:
            self.initialize()
        ckpt = filename_or_checkpoint
        if isinstance(ckpt, str):
            ckpt = torch.load(ckpt, map_location=self.device, weights_only=False)
        if ckpt.get("ssl_method") not in (None, self.method_name):
            raise SSLInputError(f"Checkpoint was written by method '{ckpt['ssl_method']}', not "
                                f"'{self.method_name}'.")
        saved = [e.get("name") for e in ckpt.get("source_datasets") or []]
        if saved and saved != self.source_dataset_names:
            raise SSLInputError(f"Checkpoint was trained on {', '.join(saved)}, this run is on "
                                f"{', '.join(self.source_dataset_names)}; pass the same -d (same order).")
        self.method.load_state_dict(ckpt["ssl_method_state"])
        self.optimizer.load_state_dict(ckpt["optimizer_state"])
        if self.grad_scaler is not None and ckpt.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(ckpt["grad_scaler_state"])
        self.current_epoch = int(ckpt["current_epoch"])
        self._resumed = True  # the held-out split of the run folder is reused
        self._resume_step = int(ckpt.get("iteration_in_epoch", 0))
        self._partial_epoch = ckpt.get("partial_epoch") if self._resume_step else None
        self.nonfinite_steps = int(ckpt.get("nonfinite_steps", 0))
        done = self._iteration(self.current_epoch, self._resume_step)
        self.iteration_losses = list(ckpt.get("iteration_losses", []))[:done]
        self.logger.load_checkpoint(ckpt["logging"])
        self.logger.truncate(self.current_epoch)
        if ckpt.get("global_batch_size", self.global_batch_size) != self.global_batch_size:
            self.print_to_log_file(f"WARNING: the checkpoint was trained with global batch "
                                   f"{ckpt['global_batch_size']}, this run uses {self.global_batch_size}.")
        where = f", iteration {done}/{self.total_iterations} (mid-epoch)" if self._resume_step else ""
        self.print_to_log_file(f"Resumed from epoch {self.current_epoch}/{self.num_epochs}{where}")
